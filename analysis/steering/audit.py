"""Weight edits that remove a direction, what they do to each tensor, and their LoRA form.

For orthonormal directions R̂ (k, d_model) and a residual writer whose d_model-long slices are
w_j (the columns of ``o_proj`` / ``down_proj``, the rows of the embedding; ``orthogonalize.writer_axis``):

- ``orthogonalized``: w_j ← w_j − R̂ᵀR̂ w_j (``orthogonalize.orthogonalize_tensor``);
- ``norm_preserving``: the same projection, then each slice rescaled to its old norm,
  w_j ← (w_j − R̂ᵀR̂ w_j)·‖w_j‖/‖w_j − R̂ᵀR̂ w_j‖ (a slice lying inside the span stays zero). The
  output still has no component along R̂; the norms the next LayerNorm/RMSNorm sees per input
  unit are kept.

Per tensor (``tensor_audit``): κ, stable rank and power-law α before and after, from
``analysis.weights.spectra.spectrum_metrics`` on float64 singular values, and ‖ΔW‖_F/‖W‖_F.

LoRA form of the orthogonalised edit (``lora_factors``): ΔW = −R̂ᵀ(R̂W) is rank k exactly. For a
Linear W (d_model, d_in) (PEFT: ΔW = B A · lora_alpha/r): B = −R̂ᵀ (d_model, k), A = R̂W (k, d_in),
lora_alpha = r = k. For an embedding E (vocab, d_model) (PEFT: ΔE = Aᵀ Bᵀ · scaling):
A = R̂Eᵀ (k, vocab), B = −R̂ᵀ (d_model, k). The norm-preserving delta W(diag(s) − I) − R̂ᵀR̂W diag(s)
is full rank in general, so it has no exact LoRA form.

Pure: tensors in, tensors and rows out.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from analysis.weights.singular_values import singular_values
from analysis.weights.spectra import spectrum_metrics

EDITS = ("orthogonalized", "norm_preserving")


def edit_tensor(w: torch.Tensor, basis: torch.Tensor, axis: int, edit: str) -> torch.Tensor:
    """``w`` with the span of ``basis`` (k, d_model, orthonormal) removed along ``axis`` by ``edit``;
    computed in float64, returned in ``w``'s dtype."""
    x = w.to(dtype=torch.float64).movedim(axis, -1)
    b = basis.to(torch.float64)
    y = x - (x @ b.T) @ b
    if edit == "norm_preserving":
        old, new = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
        y = torch.where(new > 0, y * (old / new.clamp_min(1e-300)), torch.zeros_like(y))
    elif edit != "orthogonalized":
        raise ValueError(f"unknown edit {edit!r}")
    return y.movedim(-1, axis).to(dtype=w.dtype).contiguous()


def _metrics(m: torch.Tensor, k: int) -> dict[str, float]:
    sv = singular_values(m.to(torch.float64))
    got = spectrum_metrics(sv, int(m.shape[0]), int(m.shape[1]))
    kept = sv[:len(sv) - k] if len(sv) > k else sv[:1]
    return {"kappa": got["kappa"], "kappa_kept": float(kept[0] / kept[-1]) if kept[-1] > 0 else math.inf,
            "stable_rank": got["stable_rank"], "alpha": got["alpha"]}


def tensor_audit(name: str, before: torch.Tensor, after: torch.Tensor, edit: str, k: int = 1) -> dict:
    """One row: κ, stable rank, α before and after (2-D tensors; NaN otherwise) and the relative change.

    Removing k directions from the d_model side leaves the matrix rank-deficient by k when
    d_model is its smaller side, so κ after is 1/rounding; ``kappa_kept`` = σ₁/σ_{r−k} (the k
    smallest singular values dropped) compares the part the edit keeps."""
    row: dict = {"tensor": name, "edit": edit, "shape": "×".join(map(str, before.shape))}
    b, a = before.to(torch.float64), after.to(torch.float64)
    row["rel_change"] = float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else math.nan
    if before.ndim == 2 and min(before.shape) > 1:
        mb, ma = _metrics(b, k), _metrics(a, k)
        for k in mb:
            row[f"{k}_before"], row[f"{k}_after"] = mb[k], ma[k]
            row[f"d_{k}"] = ma[k] - mb[k] if math.isfinite(ma[k]) and math.isfinite(mb[k]) else math.nan
    return row


def lora_factors(w: torch.Tensor, basis: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the orthogonalised edit of ``w`` in PEFT's layout (module docstring), float64."""
    r = basis.to(torch.float64)
    x = w.to(torch.float64)
    if axis == 0:  # Linear (d_model, d_in)
        return r @ x, -r.T
    return r @ x.T, -r.T  # embedding (vocab, d_model): A (k, vocab), B (d_model, k)


def delta_from_lora(a: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """The ΔW PEFT adds for factors (A, B) with scaling 1 (an independent reconstruction for tests)."""
    return b @ a if axis == 0 else a.T @ b.T


def as_numpy_rows(rows: list[dict]) -> list[dict]:
    return [{k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in r.items()} for r in rows]
