"""Python API of steering vectors (re-exported by ``app.api``).

    >>> from app import api
    >>> ext = api.steer_extract("bilinear-lm", "numpy-torch", hook="resid_post", position="last")
    >>> ext.table[["layer", "method", "auc_test", "rel_norm"]]          # per-layer separability
    >>> vec = api.steer_vector(ext, layer=0)                            # mean_diff at layer 0
    >>> api.save_steering_vector(vec, "torch.safetensors")
    >>> api.steer_generate("bilinear-lm", vec, "Returns a new", alpha=0.4, scale="norm")
    >>> dr = api.steer_dose_response("bilinear-lm", vec, "numpy-torch", scale="norm",
    ...                              alphas=(-0.6, -0.3, 0, 0.3, 0.6))
    >>> api.steer_orthogonalize("bilinear-lm", vec, "bilinear-lm-no-torch")
    >>> sub = api.steer_vector(ext, layer=1, method="svd", k=3)          # a 3-direction subspace
    >>> api.steer_orthogonalize("bilinear-lm", sub, "bilinear-lm-no-torch-3")
    >>> api.steer_sweep("bilinear-lm", "numpy-torch", alpha=0.4, scale="norm")  # one row per layer

Extractions (``steering.extract``), dose-responses (``steering.dose``) and layer sweeps
(``steering.sweep``) are cached in the results store under the model's fingerprint. Bridges are
booted once per process and model and used under a lock: the dashboard's sessions share them,
and a steering hook attached by one session must never run in another's forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.steering import effect as eff
from analysis.steering import extract as st
from analysis.steering.contrasts import ContrastSet, bundled_contrasts, load_contrasts
from analysis.errors import ConfigError
from analysis.sources import Source, open_source
from analysis.steering.vectors import SVD, SteeringVector, check_compatible, check_fingerprint, export_gguf, \
    from_extraction, load_vector, save_vector
from analysis.store import Result, Store

Progress = Callable[[int, int, str], None]
EXTRACT = "steering.extract"
DOSE = "steering.dose"
SWEEP = "steering.sweep"
CODE_VERSION = "steering-2"  # 2: logistic fitted to tol 1e-8; NaN rows for failed fits

_BRIDGES: dict[tuple[str, bool], Any] = {}
_LOCK = threading.RLock()


def _store(store: Store | str | os.PathLike | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


def bridge_for(source: str | os.PathLike | Source, *, mlm_head: bool = False) -> tuple[Source, Any]:
    """(source, TransformerBridge), booted once per process and model. ``mlm_head=True`` attaches
    the trained masked-LM head of a BERT-style encoder (``analysis.models.mlm_head``; trained on first use)."""
    src = open_source(source)
    key = (src.fingerprint, mlm_head)
    with _LOCK:
        if key not in _BRIDGES:
            if mlm_head:
                from analysis.models.mlm_head import mlm_bridge

                _BRIDGES[key] = mlm_bridge(src)
            else:
                _BRIDGES[key] = src.boot_bridge()
            while len(_BRIDGES) > 3:  # a handful of tiny models at most
                _BRIDGES.pop(next(iter(_BRIDGES)))
        return src, _BRIDGES[key]


def _vector(vector: SteeringVector | str | os.PathLike) -> SteeringVector:
    if isinstance(vector, SteeringVector):
        return vector
    if isinstance(vector, (str, os.PathLike)):
        return load_vector(vector)
    raise ConfigError(f"expected a SteeringVector or the path of a saved one, got {type(vector).__name__}")


def _vector_digest(vec: SteeringVector) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(vec.vectors, dtype=np.float32).tobytes())
    h.update(json.dumps([vec.layers, vec.hook]).encode())
    return h.hexdigest()


def _register(src: Source, st_: Store) -> None:
    from app import api

    api.register(src, st_)


# -- extraction ---------------------------------------------------------------------------------
def steer_extract(source: str | os.PathLike | Source = "bilinear-lm", contrasts: str | os.PathLike | ContrastSet =
                  "numpy-torch", *, hook: str = "resid_post", position: str = "last",
                  methods: Sequence[str] = st.METHODS, layers: Sequence[int] | None = None,
                  padding_side: str = "right", max_tokens: int = 128, k: int = 4,
                  batch_size: int = st.DEFAULT_BATCH_PAIRS, store: Store | str | None = None,
                  refresh: bool = False, progress: Progress | None = None) -> st.SteeringExtraction:
    """Per-layer steering directions of ``contrasts`` in ``source`` (``analysis.steering.extract.extract``), cached.

    ``batch_size``: contrast pairs per forward pass (bounds memory whatever the set's size; the
    directions agree across batch sizes to float32 rounding, so it is not part of the cache key)."""
    cs = load_contrasts(contrasts)
    methods = st.check_methods(methods)
    rule = st.PositionRule.parse(position)
    batch_size = st.check_batch_size(batch_size)
    k = st.check_k(k)
    src = open_source(source)
    st_ = _store(store)
    params = {"contrast": cs.name, "contrast_fingerprint": cs.fingerprint, "hook": hook, "position": str(rule),
              "methods": list(methods), "layers": None if layers is None else sorted(int(x) for x in layers),
              "padding_side": padding_side, "max_tokens": int(max_tokens), "k": int(k)}

    def compute() -> Result:
        _, bridge = bridge_for(src)
        with _LOCK:
            ext = st.extract(bridge, cs, hook=hook, layers=layers, position=rule, methods=methods,
                             padding_side=padding_side, max_tokens=max_tokens, k=k, batch_size=batch_size,
                             progress=progress)
        ext.meta.update({"fingerprint": src.fingerprint, "source": src.label, "contrast_origin": cs.origin})
        return st.to_result(ext)

    result = st_.cached(src.fingerprint, EXTRACT, params, CODE_VERSION, compute, refresh=refresh)
    _register(src, st_)
    return st.from_result(result)


def steer_vector(extraction: st.SteeringExtraction, layer: int | Sequence[int] | None = None,
                 method: str = "mean_diff", *, k: int | None = None) -> SteeringVector:
    """The ``method`` vector of ``layer`` (default: the layer with the best held-out AUC), with provenance.

    ``method="svd"`` gives the top-``k`` SVD directions of the layer as a k-row vector (a subspace
    for ``ablation`` / ``steer_orthogonalize``); its default layer is the best for ``pca``, the
    first SVD direction."""
    if layer is None:
        ranked = method if method != SVD else ("pca" if "pca" in extraction.methods else extraction.methods[0])
        layer = extraction.best_layer(ranked)
    return from_extraction(extraction, layer, method, fingerprint=extraction.meta.get("fingerprint", ""),
                           source=extraction.meta.get("source", ""), k=k)


def save_steering_vector(vector: SteeringVector, path: str | os.PathLike) -> Path:
    """Write a vector as safetensors with its provenance (``analysis.steering.vectors.save_vector``)."""
    return save_vector(vector, path)


def load_steering_vector(path: str | os.PathLike) -> SteeringVector:
    return load_vector(path)


def export_steering_gguf(vector: SteeringVector | str | os.PathLike, path: str | os.PathLike, *,
                         source: str | os.PathLike | Source | None = None, model_hint: str | None = None,
                         scale: float = 1.0) -> Path:
    """repeng / llama.cpp control-vector GGUF; ``model_hint`` defaults to the source's model_type."""
    vec = _vector(vector)
    if model_hint is None:
        src = open_source(source if source is not None else vec.source)
        if src.hf_dir is None:
            raise ConfigError("pass model_hint= (the model's config.json model_type): the source has no config.json")
        model_hint = str(json.loads((src.hf_dir / "config.json").read_text()).get("model_type", ""))
    return export_gguf(vec, path, model_hint=model_hint, scale=scale)


def stored_extractions(fingerprint: str | None = None, store: Store | str | None = None) -> list:
    """Index rows (``EntryInfo``) of stored extractions, newest first (never computes)."""
    return [e for e in _store(store).list(fingerprint=fingerprint, analysis=EXTRACT) if e.code_version == CODE_VERSION]


def load_extraction(key: str, store: Store | str | None = None) -> st.SteeringExtraction | None:
    result = _store(store).get_by_key(key)
    return st.from_result(result) if result is not None else None


# -- effect -------------------------------------------------------------------------------------
def _masked_batch(bridge: Any, cs: ContrastSet, mask_seed: int = 0):
    from analysis.models.masked_lm import mask_tokens

    pos, neg = cs.texts("test")
    return mask_tokens(bridge.tokenizer, pos + neg, seed=mask_seed)


def _dose_params(vec: SteeringVector, cs: ContrastSet, alphas: Sequence[float], layers: Sequence[int] | None,
                 scale: str, capability: bool) -> dict[str, Any]:
    return {"vector": _vector_digest(vec), "contrast_fingerprint": cs.fingerprint, "alphas": list(alphas),
            "layers": None if layers is None else sorted(int(x) for x in layers), "scale": scale,
            "capability": bool(capability)}


def stored_dose_response(fingerprint: str, vector: SteeringVector | str | os.PathLike,
                         contrasts: str | os.PathLike | ContrastSet, *, alphas: Sequence[float] = eff.DEFAULT_ALPHAS,
                         layers: Sequence[int] | None = None, scale: str = "absolute", capability: bool = True,
                         store: Store | str | None = None) -> eff.DoseResponse | None:
    """The stored dose-response with exactly these settings, or None (never computes)."""
    params = _dose_params(_vector(vector), load_contrasts(contrasts), eff.check_alphas(alphas), layers, scale,
                          capability)
    result = _store(store).get(fingerprint, DOSE, params, CODE_VERSION)
    return eff.from_result(result) if result is not None else None


def steer_dose_response(source: str | os.PathLike | Source, vector: SteeringVector | str | os.PathLike,
                        contrasts: str | os.PathLike | ContrastSet, *, alphas: Sequence[float] = eff.DEFAULT_ALPHAS,
                        layers: Sequence[int] | None = None, scale: str = "absolute", capability: bool = True,
                        allow_foreign: bool = False, store: Store | str | None = None, refresh: bool = False,
                        progress: Progress | None = None) -> eff.DoseResponse:
    """Dose-response of ``vector`` on the held-out split of ``contrasts`` (``analysis.steering.effect``), cached.

    For an encoder, ``capability=True`` adds the masked-token loss (trains MiniLM's MLM head on
    first use, about a minute)."""
    vec = _vector(vector)
    cs = load_contrasts(contrasts)
    alphas = eff.check_alphas(alphas)
    src = open_source(source)
    check_fingerprint(vec, src.fingerprint, allow_foreign=allow_foreign)  # also on a cache hit
    st_ = _store(store)
    params = _dose_params(vec, cs, alphas, layers, scale, capability)

    def compute() -> Result:
        _, bridge = bridge_for(src)
        use_head = capability and not eff.is_causal(bridge)
        if use_head:
            _, bridge = bridge_for(src, mlm_head=True)
        check_compatible(vec, d_model=int(bridge.cfg.d_model), fingerprint=src.fingerprint, allow_foreign=allow_foreign)
        with _LOCK:
            dr = eff.dose_response(bridge, vec, cs, alphas, layers=layers, scale=scale,
                                   masked_batch=_masked_batch(bridge, cs) if use_head else None, progress=progress)
        dr.meta.update({"vector": vec.describe(), "contrast": cs.name, "layers": list(layers or vec.layers)})
        return eff.to_result(dr)

    result = st_.cached(src.fingerprint, DOSE, params, CODE_VERSION, compute, refresh=refresh)
    _register(src, st_)
    return eff.from_result(result)


def _sweep_params(cs: ContrastSet, *, alpha: float, method: str, hook: str, position: str, scale: str,
                  capability: bool) -> dict[str, Any]:
    return {"extraction": [hook, str(st.PositionRule.parse(position)), cs.fingerprint], "alpha": alpha,
            "method": method, "scale": scale, "capability": bool(capability)}


def stored_layer_sweep(fingerprint: str, contrasts: str | os.PathLike | ContrastSet, *, alpha: float = 4.0,
                       method: str = "mean_diff", hook: str = "resid_post", position: str = "last",
                       scale: str = "absolute", capability: bool = False,
                       store: Store | str | None = None) -> pd.DataFrame | None:
    """The stored layer sweep with exactly these settings, or None (never computes)."""
    from analysis.steering.hooks import check_alpha

    params = _sweep_params(load_contrasts(contrasts), alpha=check_alpha(alpha), method=method, hook=hook,
                           position=position, scale=scale, capability=capability)
    result = _store(store).get(fingerprint, SWEEP, params, CODE_VERSION)
    return result.table if result is not None else None


def steer_sweep(source: str | os.PathLike | Source, contrasts: str | os.PathLike | ContrastSet, *, alpha: float = 4.0,
                method: str = "mean_diff", hook: str = "resid_post", position: str = "last", scale: str = "absolute",
                capability: bool = False, store: Store | str | None = None, refresh: bool = False,
                progress: Progress | None = None) -> pd.DataFrame:
    """Layer sweep: each layer's own vector at ``alpha``; one row per layer (``steer_effect.layer_sweep``)."""
    from analysis.steering.hooks import check_alpha

    alpha = check_alpha(alpha)
    cs = load_contrasts(contrasts)
    src = open_source(source)
    st_ = _store(store)
    ext = steer_extract(src, cs, hook=hook, position=position, store=st_)
    params = _sweep_params(cs, alpha=alpha, method=method, hook=hook, position=position, scale=scale,
                           capability=capability)

    def compute() -> Result:
        _, bridge = bridge_for(src)
        use_head = capability and not eff.is_causal(bridge)
        if use_head:
            _, bridge = bridge_for(src, mlm_head=True)
        with _LOCK:
            table = eff.layer_sweep(bridge, ext, cs, alpha=alpha, method=method, scale=scale,
                                    masked_batch=_masked_batch(bridge, cs) if use_head else None, progress=progress)
        return Result(table=table, meta={"contrast": cs.name, "alpha": alpha, "method": method})

    result = st_.cached(src.fingerprint, SWEEP, params, CODE_VERSION, compute, refresh=refresh)
    return result.table


def steer_generate(source: str | os.PathLike | Source, vector: SteeringVector | str | os.PathLike, prompt: str, *,
                   alpha: float, layers: Sequence[int] | None = None, scale: str = "absolute",
                   max_new_tokens: int = 24, allow_foreign: bool = False) -> dict[str, str]:
    """Greedy continuations of ``prompt`` without and with steering: ``{"unsteered", "steered"}``."""
    vec = _vector(vector)
    src, bridge = bridge_for(source)
    check_compatible(vec, d_model=int(bridge.cfg.d_model), fingerprint=src.fingerprint, allow_foreign=allow_foreign)
    with _LOCK:
        return eff.compare_generations(bridge, vec, prompt, alpha=alpha, layers=layers, scale=scale,
                                       max_new_tokens=max_new_tokens)


def stored_dose_responses(fingerprint: str | None = None, store: Store | str | None = None) -> list:
    return [e for e in _store(store).list(fingerprint=fingerprint, analysis=DOSE) if e.code_version == CODE_VERSION]


def load_dose_response(key: str, store: Store | str | None = None) -> eff.DoseResponse | None:
    result = _store(store).get_by_key(key)
    return eff.from_result(result) if result is not None else None


# -- weights ------------------------------------------------------------------------------------
def steer_orthogonalize(source: str | os.PathLike | Source, vector: SteeringVector | str | os.PathLike | np.ndarray,
                        out_dir: str | os.PathLike, *, overwrite: bool = False, allow_foreign: bool = False,
                        progress: Progress | None = None):
    """Project the vector's direction(s) out of every residual writer and write a new checkpoint
    (``analysis.steering.orthogonalize``). Returns ``OrthogonalizedModel`` (path, changed tensors)."""
    from analysis.steering.orthogonalize import orthogonalize

    directions = vector if isinstance(vector, np.ndarray) else _vector(vector)
    return orthogonalize(source, directions, out_dir, overwrite=overwrite, allow_foreign=allow_foreign,
                         progress=progress)


def contrast_sets() -> list[str]:
    """Names of the bundled contrast sets."""
    return bundled_contrasts()
