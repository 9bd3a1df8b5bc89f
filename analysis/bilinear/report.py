"""One bilinear decomposition run of a Source, packed for the store and the surfaces.

``build_report(src, layer=, direction=)`` loads the layer (``analysis.bilinear.loader``),
resolves the directions, eigendecomposes every Q(u) (``analysis.bilinear.decompose``) and, when the
model has inputs to evaluate on (``analysis.bilinear.inputs``, ``analysis.bilinear.evaluate``), adds:

- image models (digits): every eigenvector through the embedding as an 8×8 image, the
  truncation curve (test accuracy and agreement with the full model vs eigenvectors kept per
  class; class head bias included), and per-image contributions λ_i (v_i·x̃)² (explorer);
- LMs: the top tokens of the top positive and negative eigenvectors (tokens whose
  embedding, through the MLP's RMSNorm, projects most on v), the truncation curve on
  held-out text (agreement of the argmax over the directions, relative error), and
  per-position contributions (explorer).

Torch work (eigendecompositions, the LM's forward passes) runs on ``device``; everything the
report holds is CPU numpy. ``to_result`` / ``from_result`` convert to and from the store's
``Result``; the store name and parameters are declared in ``analysis.bilinear.pipeline``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.bilinear import decompose as bl
from analysis.bilinear import evaluate as ev
from analysis.bilinear import inputs as inputs_mod
from analysis.bilinear import loader
from analysis.progress import Progress
from analysis.sources import Source

CODE_VERSION = bl.CODE_VERSION + "/report-1"
IMAGE_SHAPE = (8, 8)
N_TOP_EIGEN = 4  # top positive and top negative eigenvectors listed per direction (LM tokens)
N_TOP_TOKENS = 8


@dataclass(frozen=True, eq=False)
class BilinearReport:
    """A decomposition with everything the surfaces show. Arrays are read-only."""

    source: str  # source label
    layer: int
    expert: int | None
    direction: str  # canonical direction spec
    model_kind: str  # "image" | "lm" | "weights"
    decomposition: bl.Decomposition
    table: pd.DataFrame  # one row per direction
    offsets: np.ndarray | None = None  # (k,) added to each direction's output (class head bias)
    sigma: np.ndarray | None = None  # (k,) HOSVD singular values
    images: np.ndarray | None = None  # (k, n, 8, 8) every eigenvector through the embedding
    top_tokens: pd.DataFrame | None = None  # direction, eigen, eigenvalue, rank, token, score, contribution
    truncation: ev.TruncationCurve | None = None
    explorer_x: np.ndarray | None = None  # (N, 64) digits pixels of the explored inputs
    explorer_labels: np.ndarray | None = None  # (N,) their classes
    explorer_tokens: pd.DataFrame | None = None  # (N rows) position, token, context
    explorer_contrib: np.ndarray | None = None  # (N, k, n) float32 λ_i (v_i·x̃)²
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.decomposition.labels


def _summary(dec: bl.Decomposition, sigma: np.ndarray | None) -> pd.DataFrame:
    lam = dec.eigenvalues
    mag = np.abs(lam)
    total = mag.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        top4 = np.where(total > 0, mag[:, :4].sum(1) / total, np.nan)
    table = pd.DataFrame({
        "direction": list(dec.labels),
        "effective_rank": dec.effective_rank,
        "lambda_max": lam.max(1),
        "lambda_min": lam.min(1),
        "top4_share": top4,  # share of Σ|λ| in the 4 largest |λ|
        "n_positive": (lam > 0).sum(1),
        "n_negative": (lam < 0).sum(1),
        "direction_norm": np.linalg.norm(dec.directions, axis=1),
    })
    if sigma is not None:
        table["hosvd_sigma"] = sigma
    return table


def _top_tokens(dec: bl.Decomposition, token_x: np.ndarray, vocab: list[str]) -> pd.DataFrame:
    rows = []
    for k, label in enumerate(dec.labels):
        pos, neg = ev.top_signed(dec.eigenvalues[k], N_TOP_EIGEN)
        idx = np.concatenate([pos, neg])
        if not len(idx):
            continue
        scores = ev.token_scores(dec.eigenvectors[k, idx], token_x, biased=dec.biased)  # (m, vocab)
        for j, i in enumerate(idx):
            lam = float(dec.eigenvalues[k, i])
            for r, t in enumerate(np.argsort(-np.abs(scores[j]), kind="stable")[:N_TOP_TOKENS]):
                s = float(scores[j, t])
                rows.append({"direction": label, "eigen": int(i), "eigenvalue": lam, "sign": "+" if lam > 0 else "-",
                             "rank": r, "token_id": int(t), "token": vocab[t] if t < len(vocab) else f"#{t}",
                             "score": s, "contribution": lam * s * s})
    return pd.DataFrame(rows)


def _vocab(src: Source, size: int) -> list[str]:
    try:
        tok = loader.tokenizer(src)
    except Exception:  # a model without a tokenizer: show ids
        return [f"#{i}" for i in range(size)]
    return [tok.decode([i], skip_special_tokens=False) for i in range(size)]


def build_report(src: Source, *, layer: int = 0, direction: str | None = None, expert: int | None = None,
                 n_eval: int = 256, progress: Progress | None = None, device: str | torch.device | None = None,
                 lm_model: Callable[[], torch.nn.Module] | None = None,
                 lock: AbstractContextManager | None = None) -> BilinearReport:
    """Decompose ``src``'s GLU at ``layer`` along ``direction`` (a spec, see
    ``analysis.bilinear.loader``) and evaluate it where the model has inputs.

    Torch work runs on ``device`` (default CPU). For an LM, ``lm_model()`` gives its HF causal LM
    (default: loaded from ``src`` onto ``device``) and ``lock`` is held while hooks are on it.
    """
    step = (lambda i, label: progress(i, 5, label)) if progress else (lambda i, label: None)
    step(0, "loading the layer")
    ref, layer_w = loader.load_layer(src, layer, expert)
    step(1, "resolving directions")
    dirs = loader.resolve_directions(src, ref, layer_w, direction, device=device)
    step(2, f"eigendecomposing {len(dirs.labels)} interaction matrices")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bl.BilinearPartWarning)
        dec = bl.decompose(layer_w, dirs.vectors, dirs.labels, device=device)
    for w in caught:  # surface the bilinear-part warning to the caller too
        warnings.warn(w.message, w.category, stacklevel=2)
    kind = _model_kind(src, ref)
    meta = {"layer_name": ref.module, "family": ref.family, "gate_act": dec.gate_act, "exact": dec.exact,
            "biased": dec.biased, "d_in": dec.d_in, "n": dec.eigenvalues.shape[1], "d_hidden": layer_w.d_hidden,
            "d_out": layer_w.d_out, "direction_kind": dirs.kind, "direction_digest": dirs.digest,
            "notes": list(dec.notes)}
    extra: dict[str, Any] = {}
    step(3, "evaluating on held-out inputs")
    if kind == "image":
        emb, _ = inputs_mod.digits_embedding(src)
        vec = ev.through_embedding(dec.eigenvectors, emb)  # (k, n, 64)
        extra["images"] = vec.reshape(vec.shape[:2] + IMAGE_SHAPE)
        inputs = inputs_mod.digits_inputs(src)
        labels = None
        if dirs.class_ids is not None and len(dirs.class_ids) > 1:  # accuracy among the chosen classes, on test images of those classes
            position = {int(c): i for i, c in enumerate(dirs.class_ids)}
            keep = np.isin(inputs.labels, dirs.class_ids)
            inputs = inputs_mod.LayerInputs(inputs.x[keep], inputs.raw[keep], inputs.labels[keep])
            labels = np.array([position[int(c)] for c in inputs.labels], dtype=np.int64)
        extra["truncation"] = ev.truncation_curve(dec, inputs.x, offsets=dirs.offsets, labels=labels)
        extra["explorer_x"], extra["explorer_labels"] = inputs.raw, inputs.labels
        extra["explorer_contrib"] = ev.contributions(dec, inputs.x).astype(np.float32)
        meta["n_eval"] = len(inputs.x)
        meta["model_accuracy"] = float(extra["truncation"].accuracy[-1]) if labels is not None else None
    elif kind == "lm":
        token_x = inputs_mod.token_inputs(src, ref, device=device)
        extra["top_tokens"] = _top_tokens(dec, token_x, _vocab(src, len(token_x)))
        inputs = inputs_mod.lm_inputs(src, ref, n_tokens=n_eval, model=lm_model() if lm_model is not None else None,
                                      device=device, lock=lock)
        extra["truncation"] = ev.truncation_curve(dec, inputs.x, offsets=dirs.offsets)
        extra["explorer_tokens"] = pd.DataFrame({"position": np.arange(len(inputs.tokens)),
                                                 "token": list(inputs.tokens), "context": list(inputs.contexts)})
        extra["explorer_contrib"] = ev.contributions(dec, inputs.x).astype(np.float32)
        meta["n_eval"] = len(inputs.x)
    if kind == "weights":
        meta["notes"].append("no held-out inputs for this model (not the digits model, or an LM without "
                             "tokenizer.json): eigenvalues and eigenvectors only")
    step(5, "done")
    return BilinearReport(src.label, layer, expert, dirs.spec, kind, dec, _summary(dec, dirs.sigma),
                          offsets=dirs.offsets, sigma=dirs.sigma, meta=meta, **extra)


def _model_kind(src: Source, ref: loader.GluRef) -> str:
    """``image`` (a digits model: 64-pixel embedding and a class head), ``lm`` (a HF causal LM
    with its tokenizer) or ``weights`` (decomposition only: nothing to evaluate on)."""
    shapes = {i.name: i.shape for i in src.tensor_infos()}
    if ref.family == "lenslab" and shapes.get("embed.weight", (0, 0))[1:] == (64,) and "head.weight" in shapes:
        return "image"
    if ref.family in ("llama", "mixtral") and src.hf_dir is not None and (src.hf_dir / "tokenizer.json").is_file() \
            and ref.norm is not None:
        return "lm"
    return "weights"


@dataclass(frozen=True, eq=False)
class Explanation:
    """Which eigenvectors drive one explored input's outputs."""

    index: int  # row of the explorer inputs
    outputs: np.ndarray  # (k,) output along each direction: Σ_i λ_i (v_i·x̃)² + offset
    predicted: int  # argmax of outputs (the predicted class for class directions)
    direction: int  # the direction explained below
    contributions: pd.DataFrame  # eigen, eigenvalue, contribution, share; largest |contribution| first


def explain(report: BilinearReport, index: int, direction: int | None = None, top: int = 12) -> Explanation:
    """Top ``top`` eigenvector contributions λ_i (v_i·x̃)² of explored input ``index`` along
    ``direction`` (default: the predicted one). Reads the stored contributions only."""
    from analysis.errors import ConfigError

    contrib = report.explorer_contrib
    if contrib is None:
        raise ConfigError(f"{report.source}: this decomposition has no explored inputs (a weights-only model)")
    if not 0 <= index < len(contrib):
        raise ConfigError(f"input index {index} is out of range 0..{len(contrib) - 1}")
    row = contrib[index].astype(np.float64)  # (k, n)
    outputs = row.sum(1) + (report.offsets if report.offsets is not None else 0.0)
    predicted = int(np.argmax(outputs))
    k = predicted if direction is None else int(direction)
    if not 0 <= k < row.shape[0]:
        raise ConfigError(f"direction index {k} is out of range 0..{row.shape[0] - 1}")
    order = np.argsort(-np.abs(row[k]), kind="stable")[:top]
    total = np.abs(row[k]).sum() or 1.0
    table = pd.DataFrame({"eigen": order, "eigenvalue": report.decomposition.eigenvalues[k, order],
                          "contribution": row[k, order], "share": np.abs(row[k, order]) / total})
    return Explanation(index, outputs, predicted, k, table)


# -- store packing -------------------------------------------------------------------------
_ARRAYS = ("offsets", "sigma", "images", "explorer_x", "explorer_labels", "explorer_contrib")
_FRAMES = ("top_tokens", "explorer_tokens")


def to_result(report: BilinearReport):
    """Pack for the store: the per-direction table, named arrays, frames and scalars as meta."""
    from analysis.store import Result

    dec = report.decomposition
    arrays: dict[str, np.ndarray] = {"directions": dec.directions, "eigenvalues": dec.eigenvalues,
                                     "eigenvectors": dec.eigenvectors}
    for name in _ARRAYS:
        value = getattr(report, name)
        if value is not None:
            arrays[name] = np.asarray(value)
    if report.truncation is not None:
        for f in ("ks", "accuracy", "agreement", "relative_error"):
            arrays[f"truncation_{f}"] = np.asarray(getattr(report.truncation, f))
    frames = {name: getattr(report, name).to_dict(orient="list") for name in _FRAMES
              if getattr(report, name) is not None}
    meta = {**report.meta, "source": report.source, "layer": report.layer, "expert": report.expert,
            "direction": report.direction, "model_kind": report.model_kind, "labels": list(dec.labels),
            "gate_act": dec.gate_act, "exact": dec.exact, "biased": dec.biased,
            "notes": list(report.meta.get("notes", dec.notes)),
            "frames": frames}
    return Result(table=report.table, arrays=arrays, meta=meta)


def from_result(result) -> BilinearReport:
    """Inverse of ``to_result`` (arrays read-only, as the store returns them)."""
    a, meta = dict(result.arrays), dict(result.meta)
    dec = bl.Decomposition(meta["layer_name"], tuple(meta["labels"]), a["directions"], a["eigenvalues"],
                           a["eigenvectors"], bool(meta["biased"]), meta["gate_act"], bool(meta["exact"]),
                           tuple(meta.get("notes", ())))
    trunc = None
    if "truncation_ks" in a:
        trunc = ev.TruncationCurve(*(a[f"truncation_{f}"] for f in ("ks", "accuracy", "agreement", "relative_error")))
    frames = {name: pd.DataFrame(value) for name, value in meta.pop("frames", {}).items()}
    keep = {k: v for k, v in meta.items() if k not in ("source", "layer", "expert", "direction", "model_kind", "labels")}
    return BilinearReport(meta["source"], int(meta["layer"]), meta["expert"], meta["direction"], meta["model_kind"],
                          dec, result.table, truncation=trunc, meta=keep,
                          **{n: a.get(n) for n in _ARRAYS}, **{n: frames.get(n) for n in _FRAMES})
