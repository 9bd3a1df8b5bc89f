"""``lenslab steer``: extract steering vectors from contrast sets, apply them, measure, orthogonalise weights.

    lenslab steer extract bilinear-lm numpy-torch --layer 0 --out torch.safetensors
    lenslab steer apply bilinear-lm torch.safetensors --prompt "Returns a new" --alpha 0.4 --scale norm
    lenslab steer dose bilinear-lm numpy-torch --vector torch.safetensors --scale norm --alphas=-0.6,-0.3,0,0.3,0.6
    lenslab steer layers bilinear-lm numpy-torch --alpha 0.4 --scale norm
    lenslab steer orthogonalize bilinear-lm torch.safetensors --out bilinear-lm-no-torch
    lenslab steer extract bilinear-lm numpy-torch --method svd --k 3 --layer 1 --out torch-svd.safetensors
    lenslab steer search bilinear-lm numpy-torch --budget 240 --out chosen.safetensors   # app/cli/steer_search.py
    lenslab steer audit bilinear-lm chosen.safetensors numpy-torch --lora chosen-lora     # app/cli/steer_search.py

Each command is the API function ``steer_<verb>`` (``app.api``). ``steer sweep`` (the dose-response,
plus a layer sweep with ``--layer-alpha``) is the old name of ``steer dose``, kept hidden.
Contrast sets: a bundled name (numpy-torch, code-prose, positive-negative) or a JSONL file
(format: ``analysis/steering/contrasts.py``). Registered on the main app in ``app/cli/__init__.py``. Errors are
LensLab's typed errors (one line, exit 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from app.cli.options import DeviceOpt, JsonOpt, RefreshOpt, StoreOpt, console, json_rows, run_with_progress
from app.cli.tables import print_table

steer_app = typer.Typer(no_args_is_help=True, help="Steering vectors: extract from contrast sets, apply, measure the "
                                                   "dose-response and the layers, orthogonalise weights.")
DEPRECATED_COMMANDS = {"steer sweep": "steer dose (and steer layers for --layer-alpha)"}

SourceArg = Annotated[str, typer.Argument(help="bilinear-lm, tiny-mixtral, minilm, or a Hugging Face model directory.")]
ContrastArg = Annotated[str, typer.Argument(help="Bundled contrast set (numpy-torch, code-prose, positive-negative) "
                                                 "or a .jsonl file.")]
HookOpt = Annotated[str, typer.Option("--hook", help="resid_pre | resid_mid | resid_post | attn_out | mlp_out")]
PositionOpt = Annotated[str, typer.Option("--position", help="last | mean | index:K (K-th real token; needs pairs of "
                                                             "equal token length).")]
ScaleOpt = Annotated[str, typer.Option("--scale", help="absolute: h + α·v; norm: h + α·‖h‖·v/‖v‖ (α = fraction of "
                                                       "each token's norm).")]
ForeignOpt = Annotated[bool, typer.Option("--allow-foreign", help="Apply a vector extracted from another model.")]
AlphasOpt = Annotated[str, typer.Option("--alphas", help="Comma-separated strengths; 0 is always added.")]
VectorOpt = Annotated[Optional[Path], typer.Option("--vector", help="Saved vector (default: extract mean_diff at the "
                                                                    "best layer).")]
CapabilityOpt = Annotated[bool, typer.Option("--capability/--no-capability", help="Encoders: measure masked-token "
                                                                                  "loss (trains MiniLM's MLM head "
                                                                                  "once).")]
MethodOpt = Annotated[str, typer.Option("--method", help="mean_diff | pca | logistic: each layer's vector.")]
DEFAULT_ALPHAS = "-8,-4,-2,-1,0,1,2,4,8"


def _floats(text: str) -> list[float]:
    from analysis.errors import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"--alphas {text!r} must be comma-separated numbers, e.g. -4,-2,0,2,4") from exc
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--alphas {text!r} must be finite numbers, at least one (e.g. -4,-2,0,2,4)")
    return values


def _print_table(table, title: str, fmt: str = ".4g") -> None:
    out = Table(title=title)
    for c in table.columns:
        out.add_column(str(c), justify="left" if table[c].dtype == object else "right")
    for row in table.to_dict(orient="records"):
        out.add_row(*[format(v, fmt) if isinstance(v, float) else str(v) for v in row.values()])
    print_table(out)


@steer_app.command("extract")
def extract(
    source: SourceArg,
    contrasts: ContrastArg,
    hook: HookOpt = "resid_post",
    position: PositionOpt = "last",
    method: Annotated[str, typer.Option("--method", help="Vector to save: mean_diff | pca | logistic | svd (the "
                                                         "top-k SVD directions: a subspace to ablate or "
                                                         "orthogonalise away).")] = "mean_diff",
    k: Annotated[int, typer.Option("--k", help="SVD directions computed per layer (and saved with --method "
                                               "svd).")] = 4,
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", help="Layer of the saved vector (default: best "
                                                                       "held-out AUC).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Save the vector here (.safetensors).")] = None,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="Also write a repeng / llama.cpp control-vector "
                                                                ".gguf: resid_post of layer N >= 1 becomes "
                                                                "direction.N (llama.cpp never steers block 0).")] = None,
    padding_side: Annotated[str, typer.Option("--padding-side", help="right | left")] = "right",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Contrast pairs per forward pass (bounds memory "
                                                                 "whatever the file's size).")] = 32,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Extract per-layer directions of CONTRASTS in SOURCE (mean difference, PCA, logistic, top-k
    SVD) and report held-out separability; optionally save one layer's vector (or, with --method
    svd, its k directions)."""
    from app import api

    ext = run_with_progress(f"extracting {contrasts} from {source}", api.steer_extract, source, contrasts, hook=hook,
                            position=position, padding_side=padding_side, k=k, batch_size=batch_size, store=store,
                            refresh=refresh, device=device)
    vec = api.steer_vector(ext, layer, method, k=k) if (out or gguf or layer is not None) else None
    if out is not None:
        api.save_steering_vector(vec, out)
    if gguf is not None:
        api.export_steering_gguf(vec, gguf, source=source)
    if as_json:
        typer.echo(json.dumps({"meta": ext.meta, "layers": json_rows(ext.table),
                               "saved": str(out) if out else None, "gguf": str(gguf) if gguf else None}, indent=1,
                              default=str))
        return
    meta = ext.meta
    _print_table(ext.table.drop(columns=["act_norm"]),
                 f"{meta['contrast']} in {source} · {hook} · position {meta['position']} · "
                 f"{meta['n_train']} train / {meta['n_test']} held-out pairs")
    for method_name in ext.methods:
        console.print(f"best layer for {method_name}: {ext.best_layer(method_name)}", highlight=False)
    if vec is not None and out is not None:
        console.print(f"saved {vec.describe()} to {out}", highlight=False)
    if gguf is not None:
        console.print(f"wrote control-vector GGUF to {gguf}", highlight=False)


@steer_app.command("apply")
def apply(
    source: SourceArg,
    vector: Annotated[Path, typer.Argument(help="A vector saved by `lenslab steer extract --out`.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="Steering strength (negative steers away).")] = 4.0,
    layer: Annotated[Optional[list[int]], typer.Option("--layer", "-l", help="Layer(s) to steer (default: the "
                                                                             "vector's).")] = None,
    scale: ScaleOpt = "absolute",
    row: Annotated[Optional[int], typer.Option("--row", help="For a k-row (svd) vector: the row to steer "
                                                              "with.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate (greedy).")] = 24,
    allow_foreign: ForeignOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the prompt and both continuations as JSON.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Continue PROMPT greedily with SOURCE, without and with VECTOR added at strength ALPHA."""
    from app import api

    vec = api.load_steering_vector(vector)
    vec = vec.row(row) if row is not None else vec
    out = run_with_progress(f"continuing the prompt with {source}, without and with the vector",
                            lambda progress: api.steer_apply(source, vec, prompt, alpha=alpha, layers=layer or None,
                                                             scale=scale, max_new_tokens=max_new_tokens,
                                                             allow_foreign=allow_foreign, device=device))
    if as_json:
        typer.echo(json.dumps({"prompt": prompt, "alpha": alpha, **out}, indent=1))
        return
    typer.echo(f"prompt     {prompt!r}\nunsteered  {out['unsteered']!r}\nsteered    {out['steered']!r}  "
               f"(alpha {alpha:+g}, scale {scale})")


def _dose(source: str, contrasts: str, vector: Optional[Path], alphas: str, scale: str, hook: str, position: str,
          capability: bool, allow_foreign: bool, refresh: bool, store: Optional[Path], device: str):
    """(vector, DoseResponse): the saved vector, or the best layer's mean_diff of a stored extraction."""
    from app import api

    values = _floats(alphas)
    if vector is not None:
        vec = api.load_steering_vector(vector)
    else:
        ext = run_with_progress(f"extracting {contrasts} from {source}", api.steer_extract, source, contrasts,
                                hook=hook, position=position, store=store, device=device)
        vec = api.steer_vector(ext)
    dr = run_with_progress("dose-response", api.steer_dose, source, vec, contrasts, alphas=values, scale=scale,
                           capability=capability, allow_foreign=allow_foreign, store=store, refresh=refresh,
                           device=device)
    return vec, dr


def _layers(source: str, contrasts: str, *, alpha: float, method: str, hook: str, position: str, scale: str,
            capability: bool, refresh: bool, store: Optional[Path], device: str):
    from app import api

    return run_with_progress("layer sweep", api.steer_layers, source, contrasts, alpha=alpha, method=method,
                             hook=hook, position=position, scale=scale, capability=capability, store=store,
                             refresh=refresh, device=device)


@steer_app.command("dose")
def dose(
    source: SourceArg,
    contrasts: ContrastArg,
    vector: VectorOpt = None,
    alphas: AlphasOpt = DEFAULT_ALPHAS,
    scale: ScaleOpt = "absolute",
    hook: HookOpt = "resid_post",
    position: PositionOpt = "last",
    capability: CapabilityOpt = True,
    allow_foreign: ForeignOpt = False,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Dose-response of a steering vector over α on the held-out pairs of CONTRASTS (stored)."""
    vec, dr = _dose(source, contrasts, vector, alphas, scale, hook, position, capability, allow_foreign, refresh,
                    store, device)
    if as_json:
        typer.echo(json.dumps({"vector": vec.describe(), "kind": dr.kind, "dose_response": json_rows(dr.table)},
                              indent=1))
        return
    _print_table(dr.table, f"dose-response · {vec.describe()} · scale {scale}")


@steer_app.command("layers")
def layers(
    source: SourceArg,
    contrasts: ContrastArg,
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="Steering strength of every layer's vector.")] = 4.0,
    method: MethodOpt = "mean_diff",
    scale: ScaleOpt = "absolute",
    hook: HookOpt = "resid_post",
    position: PositionOpt = "last",
    capability: CapabilityOpt = False,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Layer sweep: each layer steered with its own vector (of the extraction at HOOK and POSITION) at
    α, on the held-out pairs of CONTRASTS; one row per layer (stored)."""
    table = _layers(source, contrasts, alpha=alpha, method=method, hook=hook, position=position, scale=scale,
                    capability=capability, refresh=refresh, store=store, device=device)
    if as_json:
        typer.echo(json.dumps({"contrast": contrasts, "alpha": alpha, "method": method, "scale": scale,
                               "layers": json_rows(table)}, indent=1))
        return
    _print_table(table, f"layer sweep at α = {alpha:+g} · {method} · scale {scale}")


@steer_app.command("sweep", hidden=True, deprecated=True)
def sweep(
    source: SourceArg,
    contrasts: ContrastArg,
    vector: VectorOpt = None,
    alphas: AlphasOpt = DEFAULT_ALPHAS,
    scale: ScaleOpt = "absolute",
    layer_alpha: Annotated[Optional[float], typer.Option("--layer-alpha", help="Also sweep layers at this α "
                                                                               "(each layer's own vector).")] = None,
    hook: HookOpt = "resid_post",
    position: PositionOpt = "last",
    capability: CapabilityOpt = True,
    allow_foreign: ForeignOpt = False,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Deprecated: `lenslab steer dose` (and `lenslab steer layers` for --layer-alpha)."""
    vec, dr = _dose(source, contrasts, vector, alphas, scale, hook, position, capability, allow_foreign, refresh,
                    store, device)
    layers_table = None
    if layer_alpha is not None:
        layers_table = _layers(source, contrasts, alpha=layer_alpha, method="mean_diff", hook=vec.hook,
                               position=vec.position, scale=scale, capability=capability, refresh=refresh,
                               store=store, device=device)
    if as_json:
        typer.echo(json.dumps({"vector": vec.describe(), "kind": dr.kind, "dose_response": json_rows(dr.table),
                               "layers": json_rows(layers_table) if layers_table is not None else None}, indent=1))
        return
    _print_table(dr.table, f"dose-response · {vec.describe()} · scale {scale}")
    if layers_table is not None:
        _print_table(layers_table, f"layer sweep at α = {layer_alpha:+g}")


@steer_app.command("orthogonalize")
def orthogonalize(
    source: SourceArg,
    vector: Annotated[Path, typer.Argument(help="A saved vector; every row of every layer (k rows for an svd "
                                                 "vector) is a direction to remove.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New model directory (must not exist or be empty).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
    allow_foreign: ForeignOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Write SOURCE with VECTOR's direction(s) projected out of every matrix that writes to the
    residual stream (W ← W − r̂ r̂ᵀ W, and the embedding): a new safetensors checkpoint."""
    from analysis.steering.orthogonalize import residual_component
    from app import api

    vec = api.load_steering_vector(vector)
    res = run_with_progress(f"orthogonalising {source}", api.steer_orthogonalize, source, vec, out,
                            overwrite=overwrite, allow_foreign=allow_foreign, device=device)
    worst = residual_component(res.path, vec.vectors)
    typer.echo(f"wrote {res.path}: {len(res.tensors)} tensors projected ({res.n_directions} direction(s)); "
               f"largest remaining |r̂·W| = {worst:.2e}")
