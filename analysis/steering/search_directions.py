"""Unit directions of every source for a steering search (``analysis.steering.search_space``), resolved
before any model boots (files, stored SAEs, stored bilinear decompositions) or from the extraction.

Stored SAEs are read as raw store entries (their decoder rows ``W_dec`` and config), so the
analysis core does not import ``sae``. An SAE row d (n_heads·d_head, at ``blocks.L.attn.hook_z``)
becomes W_O d, with W_O the layer's attention output projection read from the checkpoint
(``…layers.L.self_attn.o_proj.weight``, (d_model, n_heads·d_head)): adding α·d to z adds exactly
α·W_O d to the attention output (``attn_out`` of layer L), which a pre-norm model adds to the stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.errors import ConfigError, ShapeError
from analysis.steering.search_space import DirectionSource, file_vector, unit

POST_NORM_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "albert")
SAE_HOOK = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


@dataclass(frozen=True, eq=False)
class Fixed:
    """A direction known before the model boots: unit (d_model,) float64 and the layers it may be used at
    (None: any searched layer)."""

    unit: np.ndarray
    layers: tuple[int, ...] | None
    per_layer: dict[int, np.ndarray] | None = None  # multi-layer vector files: a unit row per layer


def _entry(store: Any, key: str, analysis: str, fingerprint: str, spec: str):
    from analysis.run import entry

    info = entry(key, store=store)
    if info.analysis != analysis:
        raise ConfigError(f"source {spec!r}: entry {info.key[:12]} holds a {info.analysis!r} result, not {analysis!r}")
    if info.fingerprint != fingerprint:
        raise ConfigError(f"source {spec!r}: entry {info.key[:12]} belongs to another model (fingerprint "
                          f"{info.fingerprint[:12]}, this one {fingerprint[:12]}); use an entry of this model")
    result = store.get_by_key(info.key)
    if result is None:
        raise ConfigError(f"source {spec!r}: entry {info.key[:12]} could not be read; list entries with "
                          "`lenslab store ls`")
    return info, result


def sae_direction(source: DirectionSource, src: Any, store: Any, *, site: str, layers: tuple[int, ...],
                  model_type: str, d_model: int) -> Fixed:
    """W_O · (decoder row) of a stored SAE, checked against the search's site and layers."""
    import torch

    _, result = _entry(store, source.key, "sae", src.fingerprint, source.spec)
    hook = str(result.meta.get("cfg", {}).get("hook_name", ""))
    m = SAE_HOOK.match(hook)
    if m is None:
        raise ConfigError(f"source {source.spec!r}: the SAE reads {hook!r}, not an attention hook_z; only "
                          "attention-output SAEs can be mapped to the residual stream")
    layer = int(m.group(1))
    if site != "attn_out" or layer not in layers:
        raise ConfigError(f"source {source.spec!r}: the SAE reads {hook}, which joins the residual stream through "
                          f"attn_out of layer {layer}, but the search steers {site} of layers {list(layers)}; "
                          f"search with --site attn_out and include --layers {layer}")
    if model_type in POST_NORM_TYPES:
        raise ConfigError(f"source {source.spec!r}: {model_type} normalises the attention output before it joins "
                          "the stream, so an SAE feature has no exact residual direction; use a pre-norm model")
    w_dec = np.asarray(result.arrays["W_dec"], dtype=np.float64)
    if not 0 <= source.index < w_dec.shape[0]:
        raise ConfigError(f"source {source.spec!r}: decoder row {source.index} does not exist; the SAE has rows "
                          f"0..{w_dec.shape[0] - 1}")
    names = [i.name for i in src.weight_infos() if re.search(rf"layers\.{layer}\.self_attn\.o_proj\.weight$", i.name)]
    if len(names) != 1:
        raise ConfigError(f"source {source.spec!r}: found no single o_proj weight of layer {layer} in {src.label}; "
                          "the SAE source supports Hugging Face Llama-style layouts")
    w_o = src.tensor(names[0]).to(torch.float64).numpy()  # (d_model, n_heads * d_head)
    if w_o.shape != (d_model, w_dec.shape[1]):
        raise ShapeError(f"source {source.spec!r}: W_O {w_o.shape} does not map the SAE's width {w_dec.shape[1]} "
                         f"to d_model {d_model}; the SAE belongs to another model")
    return Fixed(unit(w_o @ w_dec[source.index], f"W_O · decoder row {source.index}"), (layer,))


def bilinear_direction(source: DirectionSource, src: Any, store: Any, *, layers: tuple[int, ...],
                       d_model: int) -> Fixed:
    from analysis.bilinear.report import from_result

    _, result = _entry(store, source.key, "bilinear.decompose", src.fingerprint, source.spec)
    rep = from_result(result)
    dec = rep.decomposition
    if not 0 <= source.index < dec.eigenvectors.shape[0]:
        raise ConfigError(f"source {source.spec!r}: direction {source.index} does not exist; the decomposition has "
                          f"0..{dec.eigenvectors.shape[0] - 1}")
    if not 0 <= source.eigen < dec.eigenvectors.shape[1]:
        raise ConfigError(f"source {source.spec!r}: eigenvector {source.eigen} does not exist; there are "
                          f"0..{dec.eigenvectors.shape[1] - 1}")
    v = np.asarray(dec.eigenvectors[source.index, source.eigen], dtype=np.float64)[:dec.d_in]
    if v.shape != (d_model,):
        raise ShapeError(f"source {source.spec!r}: the eigenvector has {v.shape[0]} entries, the model d_model "
                         f"{d_model}")
    if int(rep.layer) not in layers:
        raise ConfigError(f"source {source.spec!r}: the decomposition is of layer {rep.layer}; include --layers "
                          f"{rep.layer}")
    return Fixed(unit(v, f"eigenvector {source.eigen}"), (int(rep.layer),))


def fixed_direction(source: DirectionSource, src: Any, store: Any, *, site: str, layers: tuple[int, ...],
                    model_type: str, d_model: int) -> Fixed | None:
    """The direction of a non-extraction source (None for ``mean_diff`` / ``pca`` / ``logistic``)."""
    if source.kind == "method":
        return None
    if source.kind == "file":
        vec = file_vector(source, d_model)
        if len(vec.layers) == 1:
            return Fixed(unit(vec.vectors[0], source.spec), None)
        use = tuple(x for x in vec.layers if x in layers)
        if not use:
            raise ConfigError(f"source {source.spec!r} holds layers {list(vec.layers)}, none of the searched "
                              f"{list(layers)}")
        return Fixed(unit(vec.at(use[0]), source.spec), use,
                     {x: unit(vec.at(x), f"{source.spec} layer {x}") for x in use})
    if source.kind == "sae":
        return sae_direction(source, src, store, site=site, layers=layers, model_type=model_type, d_model=d_model)
    return bilinear_direction(source, src, store, layers=layers, d_model=d_model)


def fixed_digest(fixed: Fixed | None) -> str:
    import hashlib

    if fixed is None:
        return ""
    h = hashlib.blake2b(digest_size=12)
    rows = fixed.per_layer or {-1: fixed.unit}
    for k in sorted(rows):
        h.update(str(k).encode())
        h.update(np.ascontiguousarray(rows[k], dtype=np.float64).tobytes())
    return h.hexdigest()
