"""``lenslab sae export`` / ``lenslab sae import``: stored SAEs and transcoders in SAELens's format.

    lenslab sae export minilm out/sae --layer 3            # the SAE of minilm at layer 3 (SAE.load_from_disk)
    lenslab sae export minilm out/tc --sae KEY             # a stored SAE or relu/jumprelu transcoder, by key
    lenslab sae import out/sae minilm --layer 3            # a SAELens SAE into the store
    lenslab sae import out/tc minilm                       # a SAELens transcoder into the store ("sae-transcoder")

The commands are ``api.sae_export`` and ``api.sae_import`` (``sae.saelens_io``); registered on
``lenslab sae`` in ``app/cli/__init__.py``. Errors are LensLab's typed errors (one line, exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli.options import DeviceOpt, JsonOpt, StoreOpt, console, run_with_progress
from app.cli.sae import LayerOpt, SourceArg

ExportKeyOpt = Annotated[Optional[str], typer.Option("--sae", help="Store key (prefix) of the SAE or transcoder, as "
                                                                   "`lenslab sae ls` / `lenslab sae transcoders` show "
                                                                   "it; default: the one SAE of SOURCE at LAYER.")]


def export(
    source: SourceArg,
    directory: Annotated[Path, typer.Argument(help="Directory to write (cfg.json, sae_weights.safetensors, "
                                                   "sparsity.safetensors).")],
    layer: LayerOpt = 0,
    sae: ExportKeyOpt = None,
    store: StoreOpt = None,
) -> None:
    """Write the SAE in SAELens's format (SAELens: SAE.load_from_disk(DIRECTORY)). Its cfg.json says
    reshape_activations "hook_z": SAELens's encode expects [..., n_heads, d_head], not the flat [N, d_in].
    --sae KEY of a stored relu or jumprelu transcoder writes that transcoder (a TopK one has no SAELens format)."""
    from app import api

    if sae is not None and (tcs := [e for e in api.stored_sae_transcoders(store=store) if e.key.startswith(sae)]):
        out = api.sae_export(sae, directory, store=store)  # a TopK transcoder: ConfigError naming the fix
        c = api.load_sae_transcoder(tcs[0].key, store=store).cfg
        console.print(f"transcoder {tcs[0].key[:12]} written to {out} (SAELens format, {c.saelens_architecture}: "
                      f"{c.hook_in} -> {c.hook_out}); SAELens: SAE.load_from_disk({str(out)!r})", highlight=False)
        return
    key = api.find_sae(source, layer, sae, store=store)
    out = api.sae_export(key, directory, store=store)
    cfg = api.load_sae(key, store=store).sae.cfg
    if cfg.site != "hook_z":
        console.print(f"SAE {key[:12]} written to {out} (SAELens format); it reads {cfg.hook_name}, "
                      f"[N, {cfg.d_in}]", highlight=False)
        return
    heads = f"[..., {cfg.n_heads}, {cfg.d_head}]" if cfg.n_heads else "[..., n_heads, d_head]"
    console.print(f"SAE {key[:12]} written to {out} (SAELens format); SAELens's encode reads hook_z as {heads} "
                  f"(reshape_activations 'hook_z'): reshape flat [N, {cfg.d_in}] activations first", highlight=False)


def import_(
    directory: Annotated[Path, typer.Argument(help="A SAELens SAE or transcoder directory (cfg.json + "
                                                   "sae_weights.safetensors).")],
    source: SourceArg,
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", help="Layer it reads (default: the layer of its "
                                                                       "cfg.json hook).")] = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Store a SAELens-format SAE as an SAE of SOURCE, after checking its d_in against the hook's width; a
    SAELens transcoder is stored as a transcoder of SOURCE (`lenslab sae transcoders`), after checking it
    against SOURCE's MLP at its block. The same files again are served from the store."""
    from app import api

    got = run_with_progress(f"importing {directory} for {source}",  # the model boots to check it
                            lambda progress: api.sae_import(directory, source, layer, store=store, device=device))
    if isinstance(got, api.TranscoderRun):
        c = got.cfg
        if as_json:
            typer.echo(json.dumps({"key": got.key, "name": got.name, "stored": True, "analysis": "sae-transcoder",
                                   "config": c.to_dict()}, indent=1))
            return
        console.print(f"{c.kind} ({c.saelens_architecture}) {c.hook_in} -> {c.hook_out}: d_in {c.d_in}, d_sae "
                      f"{c.d_sae}, d_out {c.d_out}; stored as {got.key} (not evaluated on import); listed by "
                      f"lenslab sae transcoders, written back by lenslab sae export {source} OUT --sae {got.key[:12]}",
                      highlight=False)
        return
    if as_json:
        typer.echo(json.dumps({"key": got.key, "name": got.name, "config": got.sae.cfg.to_dict()}, indent=1))
        return
    cfg = got.sae.cfg
    site = "" if cfg.site == "hook_z" else f" --site {cfg.site}"
    console.print(f"{got.name}: stored as {got.key[:12]}; next: lenslab sae eval {source} --layer {cfg.layer}{site} "
                  f"--sae {got.key[:12]}", highlight=False)


__all__ = ["export", "import_"]
