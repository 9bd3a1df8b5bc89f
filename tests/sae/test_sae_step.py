"""Kernels of the SAE training step (sae/dense_relu.py, sae/sparse.py): the dense ReLU step in
bfloat16, firing counts, the integer sign test, the split L1 constant, CSR patterns.

Independent truths: float64 autograd of the loss written from its formula, ``mask.sum(0)``,
float comparisons, exact float64 arithmetic, dense matrix products.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.config import SAEConfig
from sae.dense_relu import split_constant
from sae.sparse import Pattern, column_counts, positive
from sae.train import TrainState


def _float64_grads(tr: TrainState, x: torch.Tensor, step: int):
    """Loss and gradients of ||x_hat - x||^2 + l1 sum f (batch mean) in float64 autograd."""
    P = {"W_enc": tr.p["W_encT"].T.double(), **{n: tr.p[n].double() for n in ("W_dec", "b_enc", "b_dec")}}
    for t in P.values():
        t.requires_grad_(True)
    xd = x.double()
    f = ((xd - P["b_dec"]) @ P["W_enc"] + P["b_enc"]).relu()
    loss = ((f @ P["W_dec"] + P["b_dec"] - xd) ** 2).sum(1).mean() + tr.l1(step) * f.sum(1).mean()
    loss.backward()
    return float(loss.detach()), {"W_encT": P["W_enc"].grad.T, **{n: P[n].grad for n in ("W_dec", "b_enc", "b_dec")}}


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("bfloat16", 2e-2)])
def test_dense_relu_gradients_match_float64_autograd(dtype, tol, rng):
    """bfloat16 rounds GEMM inputs and outputs (relative 2^-9 each): its gradients agree to ~1e-2
    (W_enc, the longest chain: 1.3e-2 here; the previous dense path did the same)."""
    cfg = SAEConfig(d_in=48, d_sae=256, architecture="relu", l1_coefficient=3.0, l1_warmup_steps=0,
                    batch_size=512, dtype=dtype)
    x = torch.from_numpy(rng.standard_normal((512, 48)).astype(np.float32) * 2 + 0.3)
    tr = TrainState(cfg, x)
    grads, metrics, fired = tr.gradients(x, 3, dense=True)
    want_loss, want = _float64_grads(tr, x, 3)
    assert metrics["loss"] == pytest.approx(want_loss, rel=tol / 10)
    for name, g in want.items():
        rel = float((grads[name].double() - g).norm() / g.norm())
        assert rel < tol, (name, rel)
    pre = (x.double() - tr.p["b_dec"].double()) @ tr.p["W_encT"].T.double() + tr.p["b_enc"].double()
    assert 0.3 < float((pre > 0).double().mean()) < 0.7  # dense indeed
    if dtype == "float32":
        assert torch.equal(fired.long(), (pre > 0).sum(0))


def test_split_constant_keeps_the_l1_gradient_exact_in_bfloat16():
    c = 0.87 / 4096
    hi, lo = split_constant(c, torch.bfloat16)
    assert float(torch.tensor(hi).to(torch.bfloat16)) == hi and float(torch.tensor(lo).to(torch.bfloat16)) == lo
    assert abs(c - hi) / c > 1e-4  # bfloat16 alone would change the L1 coefficient ...
    assert abs(c - (hi + lo)) / c < 1e-5  # ... the pair does not
    assert split_constant(0.25, torch.bfloat16) == (0.25, 0.0)


@pytest.mark.parametrize("n", [1, 127, 128, 300, 1024], ids=str)
def test_column_counts_match_sum(n, rng):
    mask = torch.from_numpy(rng.random((n, 37)) < 0.3)
    mask[:, 0] = True  # a full column: 128 per block, the uint8 block sums must not overflow
    mask[:, 1] = False
    got = column_counts(mask)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), mask.sum(0))
    assert int(got[0]) == n and int(got[1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_positive_matches_float_comparison(dtype):
    t = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 1e-45, -1e-45, 3.0, float("inf"), -float("inf")]).to(dtype)
    assert torch.equal(positive(t), t > 0)


def test_pattern_products_match_dense(rng):
    mask = torch.from_numpy(rng.random((20, 30)) < 0.2)
    mask[3] = False  # an empty row
    pat = Pattern.from_mask(mask)
    a, b = torch.randn(20, 5, dtype=torch.float32), torch.randn(5, 30, dtype=torch.float32)
    vals = pat.sample(a, b)
    dense = torch.zeros(20, 30).masked_scatter_(mask, vals)
    torch.testing.assert_close(dense, (a @ b) * mask)
    w = torch.randn(30, 4)
    torch.testing.assert_close(pat.matmul(vals, w), dense @ w)
    g = torch.randn(20, 4)
    torch.testing.assert_close(pat.t_matmul(vals, g), dense.T @ g)
    torch.testing.assert_close(pat.gather(torch.arange(30.0)), mask.nonzero()[:, 1].float())
    top = Pattern.from_topk(torch.tensor([[2, 0], [1, 2]]), 3)
    torch.testing.assert_close(top.t_matmul(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.eye(2)),
                               torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 4.0]]))
