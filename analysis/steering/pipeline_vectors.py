"""The steering API that stores nothing: booted models, vectors, steered text, orthogonalised weights
(re-exported by ``app.api``; the stored analyses are in ``analysis.steering.pipeline``).

    >>> vec = api.steer_vector(ext, layer=0)                            # mean_diff at layer 0
    >>> api.save_steering_vector(vec, "torch.safetensors")
    >>> api.steer_apply("bilinear-lm", vec, "Returns a new", alpha=0.4, scale="norm")
    >>> sub = api.steer_vector(ext, layer=1, method="svd", k=3)          # a 3-direction subspace
    >>> api.steer_orthogonalize("bilinear-lm", sub, "bilinear-lm-no-torch-3")

Booted models come from the process's one model cache (``analysis.model_cache``) and run with
hooks attached only under its lock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis import model_cache
from analysis.device import resolve_device
from analysis.errors import ConfigError
from analysis.progress import Progress
from analysis.sources import Source, open_source
from analysis.steering import effect as eff
from analysis.steering import extract as st
from analysis.steering.contrasts import ContrastSet, bundled_contrasts
from analysis.steering.vectors import SVD, SteeringVector, check_compatible, export_gguf, from_extraction, \
    load_vector, save_vector

MLM_HEAD = "mlm-head"  # model-cache variant: the encoder with its trained masked-LM head
SourceLike = str | os.PathLike | Source
VectorLike = SteeringVector | str | os.PathLike
ContrastLike = str | os.PathLike | ContrastSet


# -- booted models ----------------------------------------------------------------------------------
def boot_mlm_head(src: Source, device: torch.device, dtype: torch.dtype) -> Any:
    """The model cache's boot of variant ``MLM_HEAD``: the bridge with the trained masked-LM head
    (``analysis.models.mlm_head``; trained on first use). The cache moves it to ``device``."""
    from analysis.models.mlm_head import mlm_bridge

    return mlm_bridge(src)


def bridge_for(source: SourceLike, *, mlm_head: bool = False,
               device: str | torch.device = "auto") -> tuple[Source, Any]:
    """(source, TransformerBridge on ``device``) from the one model cache. ``mlm_head=True`` gives the
    bridge of a BERT-style encoder with its trained masked-LM head attached (trained on first use).
    Attach hooks only under ``analysis.model_cache.LOCK``."""
    src = open_source(source)
    if mlm_head:
        return src, model_cache.bridge(src, device=resolve_device(device), variant=MLM_HEAD, boot=boot_mlm_head)
    return src, model_cache.bridge(src, device=resolve_device(device))


def as_vector(vector: VectorLike) -> SteeringVector:
    """A SteeringVector, or the one saved at a path (``load_steering_vector``)."""
    if isinstance(vector, SteeringVector):
        return vector
    if isinstance(vector, (str, os.PathLike)):
        return load_vector(vector)
    raise ConfigError(f"expected a SteeringVector or the path of a saved one, got {type(vector).__name__}")


# -- vectors --------------------------------------------------------------------------------------------
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
    """A vector written by ``save_steering_vector`` (or ``lenslab steer extract --out``)."""
    return load_vector(path)


def export_steering_gguf(vector: VectorLike, path: str | os.PathLike, *, source: SourceLike | None = None,
                         model_hint: str | None = None, scale: float = 1.0) -> Path:
    """repeng / llama.cpp control-vector GGUF; ``model_hint`` defaults to the source's model_type."""
    vec = as_vector(vector)
    if model_hint is None:
        src = open_source(source if source is not None else vec.source)
        if src.hf_dir is None:
            raise ConfigError("pass model_hint= (the model's config.json model_type): the source has no config.json")
        model_hint = str(json.loads((src.hf_dir / "config.json").read_text()).get("model_type", ""))
    return export_gguf(vec, path, model_hint=model_hint, scale=scale)


def contrast_sets() -> list[str]:
    """Names of the bundled contrast sets."""
    return bundled_contrasts()


# -- applying -----------------------------------------------------------------------------------------
def steer_apply(source: SourceLike, vector: VectorLike, prompt: str, *, alpha: float,
                layers: Sequence[int] | None = None, scale: str = "absolute", max_new_tokens: int = 24,
                allow_foreign: bool = False, device: str = "auto") -> dict[str, str]:
    """Greedy continuations of ``prompt`` without and with steering: ``{"unsteered", "steered"}``
    (``analysis.steering.effect.compare_generations``; causal LMs). Not stored."""
    vec = as_vector(vector)
    src, bridge = bridge_for(source, device=device)
    check_compatible(vec, d_model=int(bridge.cfg.d_model), fingerprint=src.fingerprint, allow_foreign=allow_foreign)
    with model_cache.LOCK:
        return eff.compare_generations(bridge, vec, prompt, alpha=alpha, layers=layers, scale=scale,
                                       max_new_tokens=max_new_tokens)


def steer_orthogonalize(source: SourceLike, vector: VectorLike | np.ndarray, out_dir: str | os.PathLike, *,
                        overwrite: bool = False, allow_foreign: bool = False, progress: Progress | None = None,
                        device: str = "auto"):
    """Project the vector's direction(s) out of every residual writer and write a new checkpoint
    (``analysis.steering.orthogonalize``; the projections run on ``device``). Returns
    ``OrthogonalizedModel`` (path, changed tensors)."""
    from analysis.steering.orthogonalize import orthogonalize

    directions = vector if isinstance(vector, np.ndarray) else as_vector(vector)
    return orthogonalize(source, directions, out_dir, overwrite=overwrite, allow_foreign=allow_foreign,
                         progress=progress, device=device)
