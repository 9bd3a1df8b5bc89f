"""SAELens interop of stored SAEs (re-exported by ``app.api``).

    >>> from app import api
    >>> api.export_saelens(trained.key, "out/sae")            # cfg.json, sae_weights, sparsity
    >>> imported = api.import_saelens("out/sae", "minilm", layer=3)
    >>> api.evaluate_sae(imported.key)                          # then features, prompt, dashboard

``export_saelens`` writes a stored SAE in SAELens 6.x's format (``sae.saelens_format``), with
its stored ``log10_density`` as ``sparsity.safetensors``. ``import_saelens`` reads an SAE in
that format (ours, or one SAELens wrote), checks its width against the hook it reads
(``n_heads * d_head`` of ``blocks.L.attn.hook_z``), and stores it for that model, so it can be
evaluated, explained and shown like a trained one. Its evaluation and feature data use the
docstring corpus (``texts=`` picks other texts).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError, SourceError
from analysis.sources import open_source
from analysis.store import Store
from app.api_sae import REQUEST_VERSION, TrainedSAE, _bridge, _canonical, _corpus, _resolve, _spec, _store, load_sae
from sae import store_io
from sae.model import SAE

_WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec")


def export_saelens(key: str, directory: str | os.PathLike, *, store: Store | str | None = None) -> Path:
    """Write the stored SAE ``key`` (or unique prefix) as a SAELens directory (created): ``cfg.json``,
    ``sae_weights.safetensors`` and, when the store holds its density, ``sparsity.safetensors``
    (log10 firing frequency). Returns the directory. SAELens loads it with ``SAE.load_from_disk``."""
    from sae.saelens_format import save_saelens

    st = _store(store)
    entry = _resolve(key, st)
    result = st.get_by_key(entry.key)
    if result is None:
        raise ConfigError(f"the SAE {entry.key[:12]} was deleted meanwhile; train or import it again")
    density = store_io.stored_log10_density(result)
    return save_saelens(store_io.sae_from_result(result), directory,
                        sparsity=None if density is None else torch.from_numpy(density))


def import_saelens(directory: str | os.PathLike, source: Any = "minilm", layer: int | None = None, *,
                   store: Store | str | None = None, trust_pickle: bool = False) -> TrainedSAE:
    """Store the SAELens-format SAE in ``directory`` as an SAE of ``source`` at ``layer`` (default:
    the layer of the hook its cfg.json names). Returns it (``.key`` for ``evaluate_sae`` ...).

    Raises CorruptCheckpointError (malformed cfg.json, weights or sparsity file), ConfigError
    (an unsupported SAE, or ``layer`` other than its hook's), SourceError (an SAE exported from
    another model), ShapeError (its d_in is not the hook's n_heads * d_head). Nothing is stored
    on an error.
    """
    from sae.harvest import check_layer, head_shape
    from sae.saelens_format import load_saelens, load_saelens_sparsity, saelens_l1_coefficient

    d = Path(directory)
    sae = load_saelens(d)
    sparsity = load_saelens_sparsity(d)
    cfg = sae.cfg
    if sparsity is not None and (sparsity.numel() != cfg.d_sae or bool(torch.isnan(sparsity).any())):
        raise CorruptCheckpointError(f"{d / 'sparsity.safetensors'}: expected {cfg.d_sae} log10 densities without "
                                     f"NaN, got {sparsity.numel()} values; delete the file or re-save the SAE")
    if layer is None:
        layer = cfg.layer
    elif int(layer) != cfg.layer:
        raise ConfigError(f"{d}: the SAE reads {cfg.hook_name} but layer={layer} was given; import it with "
                          f"layer={cfg.layer}, the layer it was trained on")
    src = open_source(source, trust_pickle=trust_pickle)
    if cfg.source_fingerprint and cfg.source_fingerprint != src.fingerprint:
        raise SourceError(f"{d}: the SAE was exported from model {cfg.source_fingerprint[:8]}, not {src.label} "
                          f"({src.fingerprint[:8]}); import it for the model it was trained on")
    bridge = _bridge(src)
    hook = check_layer(bridge, cfg.layer)  # ConfigError listing the valid layers
    n_heads, d_head = head_shape(bridge)
    if cfg.d_in != n_heads * d_head or (cfg.n_heads is not None and (cfg.n_heads, cfg.d_head) != (n_heads, d_head)):
        heads = "" if cfg.n_heads is None else f" ({cfg.n_heads} heads x {cfg.d_head})"
        raise ShapeError(f"{d}: the SAE has d_in={cfg.d_in}{heads} but {hook} of {src.label} is n_heads*d_head = "
                         f"{n_heads}*{d_head} = {n_heads * d_head} wide; import it for the model and layer it was "
                         "trained on")
    mine = SAE(cfg.replace(n_heads=n_heads, d_head=d_head, source_fingerprint=src.fingerprint,
                           source_label=src.label))
    digest = hashlib.sha256()
    with torch.no_grad():
        for n in _WEIGHTS:
            w = getattr(sae, n).detach()
            getattr(mine, n).copy_(w)
            digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    tag = digest.hexdigest()[:16]
    _, corpus = _corpus("train", None, None, 0, 0.1)  # evaluate / explain on the docstring corpus by default
    request = _canonical({"version": REQUEST_VERSION, "layer": cfg.layer, "imported": tag,
                          "corpus": {**corpus, "max_tokens": 128}})
    st = _store(store)
    meta = {"request": request, "source_spec": _spec(src), "source_label": src.label,
            "imported_from": str(d.resolve())}
    if cfg.architecture == "relu" and saelens_l1_coefficient(d) is None:
        meta["l1_coefficient_recorded"] = False  # the label says so instead of showing the default 1.0
    key = store_io.put_sae(st, mine, params=store_io.sae_params(mine.cfg, imported=tag, corpus=request["corpus"]),
                           meta=meta, label=src.label,
                           log10_density=None if sparsity is None else sparsity.numpy())
    from app.api import register

    register(src, st)
    return load_sae(key, st)


__all__ = ["export_saelens", "import_saelens"]
