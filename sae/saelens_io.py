"""SAELens interop of stored SAEs: ``sae_export`` / ``sae_import`` (``lenslab sae export|import``).

    >>> from app import api
    >>> api.sae_export(trained.key, "out/sae")                 # cfg.json, sae_weights, sparsity
    >>> imported = api.sae_import("out/sae", "minilm", layer=3)
    >>> api.sae_eval(imported.key)                             # then features, prompt, dashboard

``sae_export`` writes a stored SAE in SAELens 6.x's format (``sae.saelens_format``), with its
stored ``log10_density`` as ``sparsity.safetensors``. ``sae_import`` reads an SAE in that format
(ours, or one SAELens wrote) at any SAE site (``sae.sites``), checks its layer and width against the
hook it reads (``n_heads * d_head`` of ``blocks.L.attn.hook_z``, d_model at the residual stream and the
MLP output; from config.json before the model boots, ``sae.preflight``), and stores it for that model through the runner (the "sae" analysis of
``sae.pipeline``), so it can be evaluated, explained and shown like a trained one. Its evaluation
and feature data use the docstring corpus (``texts=`` picks other texts). A directory holding one of
SAELens's transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
``jumprelu_skip_transcoder``: ``sae.saelens_transcoder``) is stored by ``import_transcoder`` as an
"sae-transcoder" entry (``sae.transcoder_import``), after checking it against the model's MLP at its
block; ``sae_export`` writes a stored relu / jumprelu transcoder back in SAELens's format.
``export_saelens`` and ``import_saelens`` are the deprecated old names (``sae.pipeline.DEPRECATED``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis import run as runner
from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError, SourceError
from analysis.run import NotStoredError, StoreLike, open_store
from analysis.sources import open_source
from analysis.store import entry_key
from sae import jobs, requests, store_io
from sae.model import SAE
from sae.pipeline import SAE as SAE_ANALYSIS
from sae.pipeline import deprecated_alias, load_sae
from sae.results import TrainedSAE, resolve
from sae.sites import DEFAULT_SITE
from sae.transcoder_store import TranscoderRun



def sae_export(key: str, directory: str | os.PathLike, *, store: StoreLike = None) -> Path:
    """Write the stored SAE ``key`` (or unique prefix) as a SAELens directory (created): ``cfg.json``,
    ``sae_weights.safetensors`` and, when the store holds its density, ``sparsity.safetensors``
    (log10 firing frequency). Returns the directory. SAELens loads it with ``SAE.load_from_disk``.
    The key of a stored transcoder writes it with ``save_transcoder_saelens`` (relu / jumprelu; a
    TopK transcoder raises ConfigError naming the fix, before anything is written).
    NotStoredError when no stored SAE or transcoder has this key."""
    from sae.saelens_format import save_saelens

    st = open_store(store)
    if (tc_entry := _transcoder_entry(key, st)) is not None:
        return _export_transcoder(tc_entry, directory, st)
    entry = resolve(key, st)
    result = st.get_by_key(entry.key)
    if result is None:
        raise NotStoredError(f"the SAE {entry.key[:12]} was deleted meanwhile; train or import it again")
    density = store_io.stored_log10_density(result)
    return save_saelens(store_io.sae_from_result(result), directory,
                        sparsity=None if density is None else torch.from_numpy(density))


def _transcoder_entry(key: str, st: Any) -> Any:
    """The index row of the stored transcoder whose key is or starts with ``key`` (4+ characters), or None.
    NotStoredError when the prefix matches several entries (transcoders, or a transcoder and an SAE)."""
    from sae.transcoder_pipeline import stored_sae_transcoders

    if not isinstance(key, str) or len(key) < 4:
        return None  # resolve() says what a key must be
    hits = [e for e in stored_sae_transcoders(store=st) if e.key.startswith(key)]
    if not hits:
        return None
    if len(hits) > 1 or resolve(key, st, missing_ok=True) is not None:
        raise NotStoredError(f"key prefix {key!r} matches several stored SAEs and transcoders; give more characters "
                             "(`lenslab sae ls`, `lenslab sae transcoders`)")
    return hits[0]


def _export_transcoder(entry: Any, directory: str | os.PathLike, st: Any) -> Path:
    from sae.saelens_transcoder import save_transcoder_saelens
    from sae.transcoder_pipeline import load_sae_transcoder
    from sae.transcoder_store import config_from_dict, transcoder_name

    cfg = config_from_dict(entry.meta.get("cfg", {}))
    if cfg.saelens_architecture is None:  # before the weights are read or anything is written
        raise ConfigError(f"transcoder {entry.key[:12]} ({transcoder_name(entry.meta)}) is a {cfg.architecture} "
                          "transcoder, which has no SAELens format: SAELens 6.54 registers ReLU and JumpReLU "
                          "transcoders only; train it with --architecture relu|jumprelu (lenslab sae transcoder "
                          "SOURCE --layer L --architecture relu|jumprelu; API architecture='relu' or 'jumprelu') "
                          "to export it")
    run = load_sae_transcoder(entry.key, st)
    run.transcoder.source_label = run.source_label
    return save_transcoder_saelens(run.transcoder, directory)


def _check_width(d: Path, cfg: Any, label: str, width: int, heads: tuple[int, int] | None) -> None:
    """ShapeError unless the SAE's d_in is the hook's ``width`` (hook_z: n_heads*d_head = ``heads``)."""
    if cfg.d_in == width and (heads is None or cfg.n_heads is None or (cfg.n_heads, cfg.d_head) == heads):
        return
    mine = "" if cfg.n_heads is None else f" ({cfg.n_heads} heads x {cfg.d_head})"
    theirs = (f"n_heads*d_head = {heads[0]}*{heads[1]} = {width}" if heads is not None
              else f"n_heads*d_head = {width}" if cfg.site == DEFAULT_SITE else f"d_model = {width}")
    raise ShapeError(f"{d}: the SAE has d_in={cfg.d_in}{mine} but {cfg.hook_name} of {label} is {theirs} wide; "
                     "import it for the model and layer it was trained on")


def _check_before_boot(d: Path, cfg: Any, src: Any) -> None:
    """The layer and width checks of ``sae_import`` from the model's config.json (``sae.preflight``),
    before it boots; what config.json does not say is checked on the booted model."""
    from sae import preflight

    dims = preflight.config_dims(src.hf_dir)
    preflight.check_layer(dims, cfg.site, cfg.layer,
                          fix=f"the SAE in {d} reads {cfg.hook_name}: import it for the model it was trained on")
    width = preflight.site_width(dims, cfg.site)
    if width is None:
        return
    heads = None
    if cfg.site == DEFAULT_SITE and dims.n_heads and width % dims.n_heads == 0:
        heads = (dims.n_heads, width // dims.n_heads)
    _check_width(d, cfg, src.label, width, heads)


def sae_import(directory: str | os.PathLike, source: Any = "minilm", layer: int | None = None, *,
               store: StoreLike = None, trust_pickle: bool = False, device: str = "auto"
               ) -> TrainedSAE | TranscoderRun:
    """Store the SAELens-format SAE in ``directory`` as an SAE of ``source`` at ``layer`` (default:
    the layer of the hook its cfg.json names). Returns it (``.key`` for ``sae_eval`` ...). The model
    boots (on ``device``, shared with later runs) to check the hook; its cfg.json hook_name may be
    any SAE site's (``sae.sites``: hook_z, resid_pre, resid_post, mlp_out), and the layer and width
    are first checked against the model's config.json, before it boots. A directory holding one of
    SAELens's transcoders is stored by ``import_transcoder`` (a ``TranscoderRun``, "sae-transcoder").

    Raises CorruptCheckpointError (malformed cfg.json, weights or sparsity file), ConfigError
    (an unsupported SAE, or ``layer`` other than its hook's), SourceError (an SAE exported from
    another model), ShapeError (its d_in is not the hook's width: n_heads * d_head for hook_z,
    d_model for the others). Nothing is stored
    on an error.
    """
    from sae.harvest import check_layer, head_shape
    from sae.saelens_format import load_saelens, load_saelens_sparsity, saelens_l1_coefficient
    from sae.saelens_transcoder import is_transcoder_dir

    d = Path(directory)
    if is_transcoder_dir(d):
        return import_transcoder(d, source, layer, store=store, trust_pickle=trust_pickle, device=device)
    sae = load_saelens(d)
    sparsity = load_saelens_sparsity(d)
    cfg = sae.cfg
    if sparsity is not None and (sparsity.numel() != cfg.d_sae or bool(torch.isnan(sparsity).any())):
        raise CorruptCheckpointError(f"{d / 'sparsity.safetensors'}: expected {cfg.d_sae} log10 densities without "
                                     f"NaN, got {sparsity.numel()} values; delete the file or re-save the SAE")
    if layer is not None and int(layer) != cfg.layer:
        raise ConfigError(f"{d}: the SAE reads {cfg.hook_name} but layer={layer} was given; import it with "
                          f"layer={cfg.layer}, the layer it was trained on")
    ctx = runner.context(store=store, device=device)
    src = open_source(source, trust_pickle=trust_pickle)
    if cfg.source_fingerprint and cfg.source_fingerprint != src.fingerprint:
        raise SourceError(f"{d}: the SAE was exported from model {cfg.source_fingerprint[:8]}, not {src.label} "
                          f"({src.fingerprint[:8]}); import it for the model it was trained on")
    _check_before_boot(d, cfg, src)
    bridge = requests.booted(src, ctx)
    check_layer(bridge, cfg.layer, cfg.site)  # ConfigError listing the valid layers
    heads = head_shape(bridge) if cfg.site == DEFAULT_SITE else None
    width = heads[0] * heads[1] if heads is not None else int(bridge.cfg.d_model)
    _check_width(d, cfg, src.label, width, heads)
    mine = SAE(cfg.replace(n_heads=None if heads is None else heads[0], d_head=None if heads is None else heads[1],
                           source_fingerprint=src.fingerprint, source_label=src.label))
    digest = hashlib.sha256()
    with torch.no_grad():
        for n in sae.weight_names:  # relu/topk: the four base weights, hashed as before
            w = getattr(sae, n).detach()
            getattr(mine, n).copy_(w)
            digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    tag = digest.hexdigest()[:16]
    request = requests.import_request(cfg.layer, tag)
    meta = {"request": request, "source_spec": requests.spec_of(src), "source_label": src.label,
            "imported_from": str(d.resolve())}
    if cfg.architecture == "relu" and saelens_l1_coefficient(d) is None:
        meta["l1_coefficient_recorded"] = False  # the label says so instead of showing the default 1.0
    job = jobs.ImportJob(sae=mine, tag=tag, request=request, meta=meta,
                         log10_density=None if sparsity is None else sparsity.numpy())
    runner.run(SAE_ANALYSIS, runner.Subject(src.fingerprint, src), job, ctx=ctx)
    return load_sae(entry_key(src.fingerprint, SAE_ANALYSIS.name, job.store_params(), SAE_ANALYSIS.code_version),
                    ctx.store)


def import_transcoder(directory: str | os.PathLike, source: Any = "minilm", layer: int | None = None, *,
                      store: StoreLike = None, trust_pickle: bool = False, device: str = "auto") -> TranscoderRun:
    """Store the SAELens transcoder in ``directory`` (``sae.saelens_transcoder``) as an "sae-transcoder"
    entry of ``source`` (``sae.transcoder_import``); returns it with its ``key`` (``load_sae_transcoder``,
    ``sae_transcoders``, ``sae_export``). Its key holds the weights' hash and its config, so the same
    files again are served from the store without booting the model. Otherwise the model boots (on
    ``device``) and the MLP input and output of its block must be d_in and d_out wide. It is not
    evaluated (no metrics), as an imported SAE is not. ConfigError when ``layer`` is not its block or
    the model lacks the block, ShapeError on a width mismatch (both before the model boots when its
    config.json says the block count and d_model), CorruptCheckpointError for a malformed directory."""
    from sae.saelens_transcoder import load_transcoder_saelens
    from sae.transcoder_import import TranscoderImportJob, check_before_boot, weights_tag
    from sae.transcoder_pipeline import TRANSCODER

    d = Path(directory)
    tc = load_transcoder_saelens(d)
    cfg = tc.cfg
    if layer is not None and int(layer) != cfg.layer:
        raise ConfigError(f"{d}: the transcoder reads {cfg.hook_in} but layer={layer} was given; import it with "
                          f"layer={cfg.layer}, the block it was trained on")
    ctx = runner.context(store=store, device=device)
    src = open_source(source, trust_pickle=trust_pickle)
    check_before_boot(d, tc, src)
    tc.source_label = src.label
    job = TranscoderImportJob(transcoder=tc, tag=weights_tag(tc), directory=str(d.resolve()),
                              saelens_architecture=str(cfg.saelens_architecture), source_spec=requests.spec_of(src))
    run = runner.run(TRANSCODER, runner.Subject(src.fingerprint, src), job, ctx=ctx)
    return replace(run, key=entry_key(src.fingerprint, TRANSCODER.name, job.store_params(), TRANSCODER.code_version))


export_saelens = deprecated_alias("export_saelens", sae_export)
import_saelens = deprecated_alias("import_saelens", sae_import)

__all__ = ["export_saelens", "import_transcoder", "import_saelens", "sae_export", "sae_import"]
