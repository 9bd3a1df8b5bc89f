"""Sparse [batch, d_sae] patterns for the SAE training step (``sae.train``).

A ``Pattern`` holds the active (row, col) positions of a [batch, d_sae] matrix as CSR plus the
permutation to its transpose, and offers the three products the hand-written backward pass
needs: sampled dense-dense products at the pattern (``torch.sparse.sampled_addmm``),
S @ dense and S^T @ dense.
"""

from __future__ import annotations

import warnings

import torch


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class Pattern:
    """Active (row, col) positions of a [batch, d_sae] matrix as CSR, plus its transpose order."""

    def __init__(self, crow: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> None:
        self.crow, self.rows, self.cols, self.shape = crow, rows, cols, (n_rows, n_cols)
        self.ones = _csr(crow, cols, torch.ones(cols.shape[0]), self.shape)
        self.perm = torch.argsort(cols, stable=True)
        self.crow_t = torch.zeros(n_cols + 1, dtype=torch.long)
        self.crow_t[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
        self.rows_t = rows[self.perm]

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_cols: int) -> Pattern:
        b, k = indices.shape
        return cls(torch.arange(0, b * k + 1, k), torch.arange(b).repeat_interleave(k), indices.reshape(-1),
                   b, n_cols)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Pattern:
        rows, cols = mask.nonzero(as_tuple=True)
        crow = torch.zeros(mask.shape[0] + 1, dtype=torch.long)
        crow[1:] = torch.bincount(rows, minlength=mask.shape[0]).cumsum(0)
        return cls(crow, rows, cols, mask.shape[0], mask.shape[1])

    def sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b) at the pattern's positions, float32 [nnz]."""
        return torch.sparse.sampled_addmm(self.ones, a, b, beta=0.0).values()

    def matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S @ dense, S [n_rows, n_cols] with ``values`` at the pattern."""
        return _csr(self.crow, self.cols, values, self.shape) @ dense

    def t_matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S^T @ dense."""
        return _csr(self.crow_t, self.rows_t, values[self.perm], (self.shape[1], self.shape[0])) @ dense
