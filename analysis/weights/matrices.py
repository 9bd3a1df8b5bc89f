"""Reshape policy: which 2-D matrices a stored weight tensor stands for.

- 1-D tensors (biases, norms) are not matrices: ``weight_matrices`` raises ShapeError and
  callers report them as skipped.
- 2-D tensors are used as stored, ``(d_out, d_in)`` for ``nn.Linear`` (GPT-2's ``Conv1D``
  stores ``(d_in, d_out)``: singular values are the same).
- Stacked experts: a 3-D tensor whose name mentions ``expert`` is ``(n_experts, a, b)``;
  each expert slice is its own matrix (``name[expert=k]``), so per-expert conditioning is
  reported, never a meaningless ``(n_experts·a, b)`` blend.
- Any other >= 3-D tensor (conv ``(out, in, kh, kw)``, conv1d ``(out, in, k)``) is viewed
  as ``W.reshape(shape[0], -1)``: each output unit's whole receptive field is one row.
  (WeightWatcher instead splits conv kernels per spatial position; compare with care.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from analysis.errors import ShapeError, SourceError

if TYPE_CHECKING:
    from analysis.sources import Source

_EXPERT = re.compile(r"expert", re.IGNORECASE)
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|block)\.(\d+)(?:\.|$)")


@dataclass(frozen=True, slots=True, eq=False)
class MatrixView:
    """One 2-D matrix drawn from a stored tensor."""

    tensor: str  # stored tensor name
    label: str  # unique label: tensor name, or "name[expert=k]"
    expert: int  # expert index, -1 when the tensor is not a stack of experts
    matrix: torch.Tensor  # (rows, cols), stored dtype


def is_expert_stack(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and bool(_EXPERT.search(name))


def matrix_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    """Labels ``weight_matrices`` would give, from the shape alone (no data read)."""
    if len(shape) < 2:
        return []
    if is_expert_stack(name, shape):
        return [f"{name}[expert={k}]" for k in range(shape[0])]
    return [name]


def require_matrices(src: Source) -> None:
    """Raise SourceError (naming the source, what it holds and the fix) unless ``src`` holds at least
    one weight matrix: a floating-point tensor of >= 2 dims with no empty axis. A folder of steering
    vectors, biases or other 1-D arrays is not a model; analysing it would store a model with 0
    matrices. Reads headers only."""
    if any(len(i.shape) >= 2 and 0 not in i.shape for i in src.weight_infos()):
        return
    infos = src.tensor_infos()
    shown = ", ".join(f"{i.name} {tuple(i.shape)} {i.dtype}" for i in infos[:4])
    more = f" and {len(infos) - 4} more" if len(infos) > 4 else ""
    found = f"{len(infos)} tensor(s), none a weight matrix ({shown}{more})" if infos else "no tensors"
    files = getattr(src, "files", None) or []
    where = f" in {', '.join(Path(f).name for f in files)}" if files else ""
    raise SourceError(f"{src.label}: nothing to analyse: found {found}{where}; spectra need a model's weight "
                      "matrices (2-D or larger). Give the model's directory or checkpoint file instead (steering "
                      "vectors, biases and other 1-D arrays are not a model)")


def weight_matrices(name: str, weight: torch.Tensor) -> list[MatrixView]:
    """The matrices of one stored tensor, following the policy in the module docstring.

    Raises ShapeError for < 2 dims or an empty axis.
    """
    shape = tuple(weight.shape)
    if weight.ndim < 2 or 0 in shape:
        raise ShapeError(f"{name}: expected >= 2 dims with no empty axis, got {shape}; "
                         "1-D tensors (biases, norms) have no singular values and are skipped")
    if is_expert_stack(name, shape):
        return [MatrixView(name, f"{name}[expert={k}]", k, weight[k]) for k in range(shape[0])]
    if weight.ndim == 2:
        return [MatrixView(name, name, -1, weight)]
    return [MatrixView(name, name, -1, weight.reshape(shape[0], -1))]


def layer_index(name: str) -> int:
    """Block index parsed from a parameter name (``encoder.layer.3.…`` -> 3), -1 if none."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def module_type(name: str) -> str:
    """Name with the block index and the ``.weight`` suffix removed, e.g.
    ``encoder.layer.3.attention.self.query.weight`` -> ``attention.self.query``;
    tensors outside blocks keep their module path (``embeddings.word_embeddings``)."""
    base = name.removesuffix(".weight")
    m = _LAYER.search(base)
    if m is None:
        return base
    return base[m.end():] or base[: m.start()]


def module_path(name: str) -> str:
    """Module path of a parameter (the name without ``.weight``/``.bias``)."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
