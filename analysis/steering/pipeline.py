"""The stored steering analyses and their API (re-exported by ``app.api``).

    >>> from app import api
    >>> ext = api.steer_extract("bilinear-lm", "numpy-torch", hook="resid_post", position="last")
    >>> ext.table[["layer", "method", "auc_test", "rel_norm"]]          # per-layer separability
    >>> vec = api.steer_vector(ext, layer=0)                            # mean_diff at layer 0
    >>> api.save_steering_vector(vec, "torch.safetensors")
    >>> api.steer_apply("bilinear-lm", vec, "Returns a new", alpha=0.4, scale="norm")
    >>> dr = api.steer_dose("bilinear-lm", vec, "numpy-torch", scale="norm", alphas=(-0.6, -0.3, 0, 0.3, 0.6))
    >>> api.steer_layers("bilinear-lm", "numpy-torch", alpha=0.4, scale="norm")  # one row per layer
    >>> api.steer_orthogonalize("bilinear-lm", vec, "bilinear-lm-no-torch")

Three analyses go through the runner (``analysis.run``), stored under the model's fingerprint:
extractions (``steering.extract``), dose-responses over α (``steering.dose``) and layer sweeps
at one α (``steering.sweep``), all at code version ``steering-2``. Their store keys are the ones
``app/api_steering.py`` wrote before this module existed (the params dicts below are built
exactly as it built them), so existing stores keep serving.

Booted models come from the process's one model cache (``analysis.model_cache``): the plain
bridge, and for an encoder's capability cost the bridge with its trained masked-LM head
(variant ``"mlm-head"``). They are used under ``analysis.model_cache.LOCK``: the dashboard's
sessions share them, and a steering hook attached by one session must never run in another's
forward pass. ``device`` (``auto | cpu | cuda | mps``) chooses where they run; stored numbers
come back to CPU.

Reading back: ``stored_extractions`` / ``stored_dose_responses`` / ``stored_layer_sweeps`` list
index rows, ``load_*`` return one entry's result or raise ``analysis.run.NotStoredError``, and
``find_dose_response`` / ``find_layer_sweep`` return the result stored for exactly the given
settings or None. Booting, vectors, steered text and orthogonalisation store nothing:
``analysis.steering.pipeline_vectors``. Old names stay as deprecated aliases (``DEPRECATED``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.progress import Progress
from analysis.run import Analysis, RunContext, StoreLike, Subject, find, load, register, run, stored
from analysis.sources import Source, open_source
from analysis.steering import effect as eff
from analysis.steering import extract as st
from analysis.steering.contrasts import ContrastSet, load_contrasts
from analysis.steering.hooks import check_alpha
from analysis.steering.pipeline_vectors import (MLM_HEAD, ContrastLike, SourceLike, VectorLike, as_vector,
                                                boot_mlm_head, steer_apply)
from analysis.steering.vectors import SteeringVector, check_compatible, check_fingerprint
from analysis.store import EntryInfo, Result

CODE_VERSION = "steering-2"  # 2: logistic fitted to tol 1e-8; NaN rows for failed fits


# -- helpers ----------------------------------------------------------------------------------------
def _measuring_bridge(src: Source, capability: bool, ctx: RunContext) -> tuple[Any, bool]:
    """(bridge, uses the MLM head): an encoder measured with ``capability`` needs the head."""
    bridge = ctx.bridge(src)
    use_head = capability and not eff.is_causal(bridge)
    if use_head:
        bridge = ctx.bridge(src, variant=MLM_HEAD, boot=boot_mlm_head)
    return bridge, use_head


def _masked_batch(bridge: Any, cs: ContrastSet, mask_seed: int = 0):
    from analysis.models.masked_lm import mask_tokens

    pos, neg = cs.texts("test")
    return mask_tokens(bridge.tokenizer, pos + neg, seed=mask_seed)


def _vector_digest(vec: SteeringVector) -> str:
    """The vector's identity in a dose-response key: its float32 rows, layers and hook."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(vec.vectors, dtype=np.float32).tobytes())
    h.update(json.dumps([vec.layers, vec.hook]).encode())
    return h.hexdigest()


# -- extraction ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class ExtractParams:
    """Validated settings of an extraction. ``batch_size`` is not in the key: the directions agree
    across batch sizes to float32 rounding."""

    contrasts: ContrastSet
    hook: str
    position: st.PositionRule
    methods: tuple[str, ...]
    layers: tuple[int, ...] | None  # as given: validated against the model by the extraction
    padding_side: str
    max_tokens: Any  # as given: validated by the tokenisation, int() in the key
    k: int
    batch_size: int

    def store_params(self) -> dict[str, Any]:
        return {"contrast": self.contrasts.name, "contrast_fingerprint": self.contrasts.fingerprint,
                "hook": self.hook, "position": str(self.position), "methods": list(self.methods),
                "layers": None if self.layers is None else sorted(int(x) for x in self.layers),
                "padding_side": self.padding_side,
                "max_tokens": int(self.max_tokens), "k": int(self.k)}


def extract_params(contrasts: ContrastLike, *, hook: str = "resid_post", position: str = "last",
                   methods: Sequence[str] = st.METHODS, layers: Sequence[int] | None = None,
                   padding_side: str = "right", max_tokens: int = 128, k: int = 4,
                   batch_size: int = st.DEFAULT_BATCH_PAIRS) -> ExtractParams:
    """Validate an extraction's settings (ConfigError before any model is booted)."""
    cs = load_contrasts(contrasts)
    methods = st.check_methods(methods)
    rule = st.PositionRule.parse(position)
    batch_size = st.check_batch_size(batch_size)
    k = st.check_k(k)
    return ExtractParams(contrasts=cs, hook=hook, position=rule, methods=methods,
                         layers=None if layers is None else tuple(layers),
                         padding_side=padding_side, max_tokens=max_tokens, k=k, batch_size=batch_size)


def _extract_compute(subject: Subject, p: ExtractParams, ctx: RunContext) -> Result:
    src = subject.source
    with ctx.lock:
        ext = st.extract(ctx.bridge(src), p.contrasts, hook=p.hook, layers=p.layers, position=p.position,
                         methods=p.methods, padding_side=p.padding_side, max_tokens=p.max_tokens, k=p.k,
                         batch_size=p.batch_size, progress=ctx.report)
    ext.meta.update({"fingerprint": src.fingerprint, "source": src.label, "contrast_origin": p.contrasts.origin})
    return st.to_result(ext)


EXTRACT = register(Analysis(name="steering.extract", code_version=CODE_VERSION, compute=_extract_compute,
                            from_result=st.from_result, doc="per-layer steering directions of a contrast set"))


def steer_extract(source: SourceLike = "bilinear-lm", contrasts: ContrastLike = "numpy-torch", *,
                  hook: str = "resid_post", position: str = "last", methods: Sequence[str] = st.METHODS,
                  layers: Sequence[int] | None = None, padding_side: str = "right", max_tokens: int = 128,
                  k: int = 4, batch_size: int = st.DEFAULT_BATCH_PAIRS, store: StoreLike = None,
                  refresh: bool = False, progress: Progress | None = None,
                  device: str = "auto") -> st.SteeringExtraction:
    """Per-layer steering directions of ``contrasts`` in ``source`` (``analysis.steering.extract.extract``), stored.

    ``batch_size``: contrast pairs per forward pass (bounds memory whatever the set's size; the
    directions agree across batch sizes to float32 rounding, so it is not part of the store key)."""
    params = extract_params(contrasts, hook=hook, position=position, methods=methods, layers=layers,
                            padding_side=padding_side, max_tokens=max_tokens, k=k, batch_size=batch_size)
    return run(EXTRACT, open_source(source), params, store=store, refresh=refresh, progress=progress, device=device)


def stored_extractions(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows (``EntryInfo``) of stored extractions, newest first (never computes)."""
    return stored(EXTRACT, fingerprint, store=store)


def load_extraction(key: str, store: StoreLike = None) -> st.SteeringExtraction:
    """The stored extraction with entry ``key`` (or a unique 8+ character prefix); ``NotStoredError`` if absent."""
    return load(key, store=store, analysis=EXTRACT)


# -- dose-response over alpha -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class DoseParams:
    """Validated settings of a dose-response; ``allow_foreign`` is a permission, not in the key."""

    vector: SteeringVector
    contrasts: ContrastSet
    alphas: tuple[float, ...]  # sorted, distinct, 0 included (``effect.check_alphas``)
    layers: Sequence[int] | None
    scale: str
    capability: bool
    allow_foreign: bool = False

    def store_params(self) -> dict[str, Any]:
        return {"vector": _vector_digest(self.vector), "contrast_fingerprint": self.contrasts.fingerprint,
                "alphas": list(self.alphas),
                "layers": None if self.layers is None else sorted(int(x) for x in self.layers),
                "scale": self.scale, "capability": bool(self.capability)}


def dose_params(vector: VectorLike, contrasts: ContrastLike, *, alphas: Sequence[float] = eff.DEFAULT_ALPHAS,
                layers: Sequence[int] | None = None, scale: str = "absolute", capability: bool = True,
                allow_foreign: bool = False) -> DoseParams:
    """Validate a dose-response's settings (before any model is booted)."""
    return DoseParams(vector=as_vector(vector), contrasts=load_contrasts(contrasts), alphas=eff.check_alphas(alphas),
                      layers=layers, scale=scale, capability=capability, allow_foreign=allow_foreign)


def _dose_compute(subject: Subject, p: DoseParams, ctx: RunContext) -> Result:
    src = subject.source
    with ctx.lock:
        bridge, use_head = _measuring_bridge(src, p.capability, ctx)
        check_compatible(p.vector, d_model=int(bridge.cfg.d_model), fingerprint=src.fingerprint,
                         allow_foreign=p.allow_foreign)
        dr = eff.dose_response(bridge, p.vector, p.contrasts, p.alphas, layers=p.layers, scale=p.scale,
                               masked_batch=_masked_batch(bridge, p.contrasts) if use_head else None,
                               progress=ctx.report)
    dr.meta.update({"vector": p.vector.describe(), "contrast": p.contrasts.name,
                    "layers": list(p.layers or p.vector.layers)})
    return eff.to_result(dr)


DOSE = register(Analysis(name="steering.dose", code_version=CODE_VERSION, compute=_dose_compute,
                         from_result=eff.from_result, doc="dose-response of a steering vector over alpha"))


def steer_dose(source: SourceLike, vector: VectorLike, contrasts: ContrastLike, *,
               alphas: Sequence[float] = eff.DEFAULT_ALPHAS, layers: Sequence[int] | None = None,
               scale: str = "absolute", capability: bool = True, allow_foreign: bool = False,
               store: StoreLike = None, refresh: bool = False, progress: Progress | None = None,
               device: str = "auto") -> eff.DoseResponse:
    """Dose-response of ``vector`` over ``alphas`` on the held-out split of ``contrasts``
    (``analysis.steering.effect``), stored. The vector's model is checked also on a store hit.

    For an encoder, ``capability=True`` adds the masked-token loss (trains MiniLM's MLM head on
    first use, about a minute)."""
    params = dose_params(vector, contrasts, alphas=alphas, layers=layers, scale=scale, capability=capability,
                         allow_foreign=allow_foreign)
    src = open_source(source)
    check_fingerprint(params.vector, src.fingerprint, allow_foreign=allow_foreign)
    return run(DOSE, src, params, store=store, refresh=refresh, progress=progress, device=device)


def find_dose_response(fingerprint: str, vector: VectorLike, contrasts: ContrastLike, *,
                       alphas: Sequence[float] = eff.DEFAULT_ALPHAS, layers: Sequence[int] | None = None,
                       scale: str = "absolute", capability: bool = True,
                       store: StoreLike = None) -> eff.DoseResponse | None:
    """The stored dose-response with exactly these settings, or None (never computes)."""
    params = dose_params(vector, contrasts, alphas=alphas, layers=layers, scale=scale, capability=capability)
    return find(DOSE, fingerprint, params, store=store)


def stored_dose_responses(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows (``EntryInfo``) of stored dose-responses, newest first (never computes)."""
    return stored(DOSE, fingerprint, store=store)


def load_dose_response(key: str, store: StoreLike = None) -> eff.DoseResponse:
    """The stored dose-response with entry ``key`` (or a unique prefix); ``NotStoredError`` if absent."""
    return load(key, store=store, analysis=DOSE)


# -- layer sweep at one alpha ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class LayerSweepParams:
    """Validated settings of a layer sweep: each layer of the default extraction at ``hook`` and
    ``position`` steered with its own ``method`` vector at ``alpha``."""

    contrasts: ContrastSet
    alpha: float
    method: str
    hook: str
    position: st.PositionRule
    scale: str
    capability: bool

    def store_params(self) -> dict[str, Any]:
        return {"extraction": [self.hook, str(self.position), self.contrasts.fingerprint], "alpha": self.alpha,
                "method": self.method, "scale": self.scale, "capability": bool(self.capability)}


def layer_sweep_params(contrasts: ContrastLike, *, alpha: float = 4.0, method: str = "mean_diff",
                       hook: str = "resid_post", position: str = "last", scale: str = "absolute",
                       capability: bool = False) -> LayerSweepParams:
    """Validate a layer sweep's settings (before any model is booted)."""
    alpha = check_alpha(alpha)
    return LayerSweepParams(contrasts=load_contrasts(contrasts), alpha=alpha, method=method, hook=hook,
                            position=st.PositionRule.parse(position), scale=scale, capability=capability)


def _layers_compute(subject: Subject, p: LayerSweepParams, ctx: RunContext) -> Result:
    ext = run(EXTRACT, subject, extract_params(p.contrasts, hook=p.hook, position=str(p.position)),
              ctx=ctx.child(ctx.sub("extract")))
    with ctx.lock:
        bridge, use_head = _measuring_bridge(subject.source, p.capability, ctx)
        table = eff.layer_sweep(bridge, ext, p.contrasts, alpha=p.alpha, method=p.method, scale=p.scale,
                                masked_batch=_masked_batch(bridge, p.contrasts) if use_head else None,
                                progress=ctx.report)
    return Result(table=table, meta={"contrast": p.contrasts.name, "alpha": p.alpha, "method": p.method})


def _table(result: Result) -> pd.DataFrame:
    return result.table


SWEEP = register(Analysis(name="steering.sweep", code_version=CODE_VERSION, compute=_layers_compute,
                          from_result=_table, doc="each layer's own steering vector at one alpha"))


def steer_layers(source: SourceLike, contrasts: ContrastLike, *, alpha: float = 4.0, method: str = "mean_diff",
                 hook: str = "resid_post", position: str = "last", scale: str = "absolute",
                 capability: bool = False, store: StoreLike = None, refresh: bool = False,
                 progress: Progress | None = None, device: str = "auto") -> pd.DataFrame:
    """Layer sweep: each layer's own ``method`` vector (of the stored default extraction at
    ``hook``/``position``, run first if needed) at ``alpha``; one row per layer
    (``analysis.steering.effect.layer_sweep``), stored."""
    params = layer_sweep_params(contrasts, alpha=alpha, method=method, hook=hook, position=position, scale=scale,
                                capability=capability)
    return run(SWEEP, open_source(source), params, store=store, refresh=refresh, progress=progress, device=device)


def find_layer_sweep(fingerprint: str, contrasts: ContrastLike, *, alpha: float = 4.0, method: str = "mean_diff",
                     hook: str = "resid_post", position: str = "last", scale: str = "absolute",
                     capability: bool = False, store: StoreLike = None) -> pd.DataFrame | None:
    """The stored layer sweep with exactly these settings, or None (never computes)."""
    params = layer_sweep_params(contrasts, alpha=alpha, method=method, hook=hook, position=position, scale=scale,
                                capability=capability)
    return find(SWEEP, fingerprint, params, store=store)


def stored_layer_sweeps(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows (``EntryInfo``) of stored layer sweeps, newest first (never computes)."""
    return stored(SWEEP, fingerprint, store=store)


def load_layer_sweep(key: str, store: StoreLike = None) -> pd.DataFrame:
    """The stored layer sweep with entry ``key`` (or a unique prefix); ``NotStoredError`` if absent."""
    return load(key, store=store, analysis=SWEEP)


# -- deprecated names (old name -> new name); each alias warns and behaves as before ----------------------
DEPRECATED = {
    "steer_generate": "steer_apply",
    "steer_dose_response": "steer_dose",
    "steer_sweep": "steer_layers",
    "stored_dose_response": "find_dose_response",
    "stored_layer_sweep": "find_layer_sweep",
}


def _warn(old: str) -> None:
    warnings.warn(f"{old} is deprecated; use {DEPRECATED[old]} (same arguments)", DeprecationWarning, stacklevel=3)


def steer_generate(*args: Any, **kwargs: Any) -> dict[str, str]:
    """Deprecated name of ``steer_apply``."""
    _warn("steer_generate")
    return steer_apply(*args, **kwargs)


def steer_dose_response(*args: Any, **kwargs: Any) -> eff.DoseResponse:
    """Deprecated name of ``steer_dose``."""
    _warn("steer_dose_response")
    return steer_dose(*args, **kwargs)


def steer_sweep(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """Deprecated name of ``steer_layers`` (the layer sweep; the dose-response over α is ``steer_dose``)."""
    _warn("steer_sweep")
    return steer_layers(*args, **kwargs)


def stored_dose_response(*args: Any, **kwargs: Any) -> eff.DoseResponse | None:
    """Deprecated name of ``find_dose_response`` (the result for exactly these settings, or None)."""
    _warn("stored_dose_response")
    return find_dose_response(*args, **kwargs)


def stored_layer_sweep(*args: Any, **kwargs: Any) -> pd.DataFrame | None:
    """Deprecated name of ``find_layer_sweep`` (the table for exactly these settings, or None)."""
    _warn("stored_layer_sweep")
    return find_layer_sweep(*args, **kwargs)
