"""Sparse [batch, d_sae] patterns for the SAE training step (``sae.train``).

A ``Pattern`` holds the active (row, col) positions of a [batch, d_sae] matrix as CSR plus the
permutation to its transpose, and offers the three products the hand-written backward pass
needs: sampled dense-dense products at the pattern (``torch.sparse.sampled_addmm``),
S @ dense and S^T @ dense.
"""

from __future__ import annotations

import warnings

import torch


def positive(t: torch.Tensor) -> torch.Tensor:
    """``t > 0`` for a finite float32/bfloat16 tensor, compared as integers of the same width
    (sign bit clear and not +0): twice as fast as the float comparison on CPU."""
    as_int = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(t.dtype)
    return t > 0 if as_int is None else t.view(as_int) > 0


def column_counts(mask: torch.Tensor) -> torch.Tensor:
    """True entries per column of a bool [n, m] mask, int32 [m].

    Blocks of 128 rows are summed in uint8 (at most 128 per block: no overflow), then the block
    sums in int32: on CPU ~30x faster than ``mask.sum(0)``, whose reduction over the outer axis
    converts every element."""
    n, m = mask.shape
    u = mask.contiguous().view(torch.uint8)
    full = n - n % 128
    out = torch.zeros(m, dtype=torch.int32, device=mask.device)
    if full:
        out += u[:full].view(full // 128, 128, m).sum(1, dtype=torch.uint8).sum(0, dtype=torch.int32)
    if n > full:
        out += u[full:].sum(0, dtype=torch.int32)
    return out


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class Pattern:
    """Active (row, col) positions of a [batch, d_sae] matrix as CSR, plus its transpose order.

    Indices are int32 (MKL's sparse products and the stable sort run faster on them); gathers
    use ``index_select``, several times faster than advanced indexing on CPU."""

    def __init__(self, crow: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> None:
        self.crow, self.rows, self.cols, self.shape = crow, rows, cols, (n_rows, n_cols)
        self.ones = _csr(crow, cols, torch.ones(cols.shape[0], device=cols.device), self.shape)
        self.perm = torch.sort(cols, stable=True)[1]  # CSR position of each entry in column-major order
        self.crow_t = _offsets(torch.bincount(cols, minlength=n_cols))
        self.rows_t = rows.index_select(0, self.perm)

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_cols: int) -> Pattern:
        b, k = indices.shape
        dev = indices.device
        return cls(torch.arange(0, b * k + 1, k, dtype=torch.int32, device=dev),
                   torch.arange(b, dtype=torch.int32, device=dev).repeat_interleave(k),
                   indices.reshape(-1).to(torch.int32),
                   b, n_cols)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Pattern:
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(_offsets(torch.bincount(rows, minlength=mask.shape[0])), rows.to(torch.int32),
                   cols.to(torch.int32), mask.shape[0], mask.shape[1])

    def sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b) at the pattern's positions, float32 [nnz]."""
        return torch.sparse.sampled_addmm(self.ones, a, b, beta=0.0).values()

    def gather(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` [n_cols] at every entry's column, [nnz]."""
        return vector.index_select(0, self.cols)

    def matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S @ dense, S [n_rows, n_cols] with ``values`` at the pattern."""
        return _csr(self.crow, self.cols, values, self.shape) @ dense

    def t_matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S^T @ dense."""
        return _csr(self.crow_t, self.rows_t, values.index_select(0, self.perm), (self.shape[1], self.shape[0])) @ dense


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """CSR row offsets [n + 1] (int32) from per-row counts [n]."""
    out = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out
