"""The jumprelu, batchtopk, matryoshka_batchtopk and gated SAEs (sae/activations.py, sae/train_arch.py):
each architecture's defining property, its gradients against independent references, and bad input.

Independent truths: counting (BatchTopK keeps int(k * B) entries of the batch), finite differences
of the kernel-smoothed loss (JumpReLU's straight-through threshold gradient is the exact gradient of
the loss whose step H is smoothed by the rectangle kernel: H_eps(u) = clamp(u / eps + 1/2, 0, 1),
with z replaced by theta in the JumpReLU term, as the estimator does), float64 losses written out
here from the papers / SAELens's formulas (Matryoshka's prefix sum, Gated's three terms) and
differentiated by autograd, and the dense autograd route against the hand-written sparse one.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from analysis.errors import ConfigError
from sae import activations
from sae.config import ARCH_FIELDS, SAEConfig, TrainSettings
from sae.model import SAE
from sae.store_io import sae_from_result, sae_to_result
from sae.train import train_sae
from sae.train_arch import (batch_topk_flat, dense_gradients, dense_jumprelu_gradients, gradients,
                            jumprelu_loss_terms, sparse_gradients)
from sae.train_gated import dense_gated_gradients
from sae.train_state import TrainState


def _planted(rng, n=12_000, d=32, n_true=96, p=0.03):
    dirs = rng.standard_normal((n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((n, n_true)) < p) * rng.uniform(0.5, 3.0, (n, n_true))
    x = codes @ dirs + 0.01 * rng.standard_normal((n, d)) + 0.5
    return torch.from_numpy(x.astype(np.float32)), dirs


def _state(arch: str, x: torch.Tensor, steps: int = 3, **kw) -> TrainState:
    cfg = SAEConfig(d_in=x.shape[1], d_sae=64, architecture=arch, batch_size=256, n_tokens=256 * 40,
                    dead_window=256 * 2, **kw)
    tr = TrainState(cfg, x)
    for _ in range(steps):
        tr.train_step()
    return tr


ARCH_KW = {"jumprelu": dict(l0_coefficient=0.2, jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.2),
           "batchtopk": dict(k=3.5), "matryoshka_batchtopk": dict(k=3, matryoshka_widths=(8, 24, 64)),
           "gated": dict(l1_coefficient=0.3)}


# ---------------------------------------------------------------------------------- BatchTopK
@pytest.mark.parametrize("k", [1, 3.5, 8])
def test_batch_topk_keeps_k_per_token_on_average(k, rng):
    pre = torch.from_numpy(rng.standard_normal((64, 50)).astype(np.float32)) + 1.5  # nearly all positive
    f = activations.batch_topk(pre, k)
    per_token = (f > 0).sum(-1)
    assert int(per_token.sum()) == int(k * 64)  # the batch keeps exactly int(k * B) entries
    assert per_token.float().std() > 0  # ... spread unevenly over its tokens
    kept = pre.relu()[f > 0]
    assert float(kept.min()) >= float(pre.relu()[f == 0].max())  # the largest ones


@pytest.mark.parametrize("case", ["spread", "one_row_dominates", "bf16_ties"])
def test_batch_topk_flat_keeps_the_largest_entries(case, rng):
    """The two-stage selection of the sparse step keeps the entries a full top-k over the batch keeps."""
    pre = torch.from_numpy(rng.standard_normal((300, 200)).astype(np.float32))
    if case == "one_row_dominates":  # the cutoff stage cannot hold them: exact fallback
        pre[7] += 50
    if case == "bf16_ties":
        pre = pre.to(torch.bfloat16)
    got = batch_topk_flat(pre, 2.5)
    want = pre.reshape(-1).topk(750)[1]
    assert got.numel() == 750 and torch.equal(got, got.sort()[0]) and got.unique().numel() == 750
    torch.testing.assert_close(pre.reshape(-1)[got].float().sort()[0], pre.reshape(-1)[want].float().sort()[0],
                               rtol=0, atol=0)


def test_batchtopk_training_l0_is_k_and_threshold_tracks_the_smallest_kept(rng):
    x, _ = _planted(rng, n=4000)
    tr = _state("batchtopk", x, steps=0, k=3.5)
    before = float(tr.extra_state["topk_threshold"])
    _, metrics, fired = tr.gradients(tr.batch(0), 1)
    assert metrics["l0"] == pytest.approx(3.5)  # int(3.5 * 256) = 896 positive entries kept
    kept_min = float(tr._kept[tr._kept > 0].min())
    lr = tr.cfg.topk_threshold_lr
    assert float(tr.extra_state["topk_threshold"]) == pytest.approx((1 - lr) * before + lr * kept_min, rel=1e-12)


def test_batchtopk_inference_l0_near_k_after_training(rng):
    x, _ = _planted(rng)
    cfg = SAEConfig(d_in=32, d_sae=192, architecture="batchtopk", k=4, batch_size=512, n_tokens=300 * 512,
                    lr=3e-3, dead_window=20 * 512)
    sae = train_sae(x, cfg).sae
    thr = sae.threshold.detach()
    assert torch.all(thr == thr[0]) and thr[0] > 0  # one threshold for every latent
    l0 = float((sae.encode(x[:4000]) > 0).sum(-1).float().mean())
    assert 3.0 < l0 < 5.0, l0  # the JumpReLU with the running threshold keeps ~k per token


def test_short_batchtopk_runs_warn_that_the_threshold_has_not_settled(rng):
    """The running threshold after n updates from 0 at rate lr is (1 - (1 - lr)^n) of its value: a run
    that stops below 95% says so (numbers from the formula); 300 steps at lr 0.01 (95.1%) does not."""
    import warnings

    x, _ = _planted(rng, n=4000)
    cfg = SAEConfig(d_in=32, d_sae=64, architecture="batchtopk", k=4, batch_size=256, n_tokens=20 * 256)
    with pytest.warns(UserWarning, match=rf"after 20 steps .* reached {1 - 0.99 ** 20:.0%} .* >= 299 steps"):
        train_sae(x, cfg)
    from sae.train import warn_short_threshold

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_short_threshold(replace(cfg, n_tokens=300 * 256), 300)
        warn_short_threshold(replace(cfg, architecture="matryoshka_batchtopk", matryoshka_widths=(16, 64)), 299)


# ---------------------------------------------------------------------------------- JumpReLU
def _smoothed_loss(z, theta, eps, readout, lam, theta0):
    """float64 loss mean_b sum_i (readout_i f_bi + lam H_eps(z_bi - theta_i)) with the step H smoothed
    by the rectangle kernel, H_eps(u) = clamp(u/eps + 1/2, 0, 1), and the code's jump taken as
    theta0 (the point the gradient is taken at): f = z H(z - theta) + theta0 (H_eps - H)."""
    h = (z > theta).double()
    h_eps = ((z - theta) / eps + 0.5).clamp(0, 1)
    f = z * h + theta0 * (h_eps - h)
    return (f @ readout).mean() + lam * h_eps.sum(-1).mean()


def test_jumprelu_threshold_gradient_matches_finite_difference_of_the_smoothed_loss(rng):
    """With a loss linear in the codes (any loss is, to first order: its gradient g_f enters as a
    readout), the straight-through threshold gradient of f and of the L0 term is the exact gradient
    of the kernel-smoothed loss: compare with its central finite difference."""
    n, d_sae, eps, lam = 4000, 6, 0.2, 0.7
    z = torch.from_numpy(rng.normal(1.0, 0.6, (n, d_sae)))
    readout = torch.from_numpy(rng.standard_normal(d_sae))
    theta0 = torch.from_numpy(rng.uniform(0.6, 1.4, d_sae))
    theta = theta0.clone().requires_grad_(True)
    f, l0 = jumprelu_loss_terms(z, theta, eps)
    loss = (f @ readout).mean() + lam * l0.mean()
    (g,) = torch.autograd.grad(loss, theta)
    hard = z * (z > theta0)
    assert float(loss.detach()) == pytest.approx(float((hard @ readout).mean() + lam * (z > theta0).double().sum(-1).mean()))
    h = 1e-6
    for i in range(d_sae):
        up, down = theta0.clone(), theta0.clone()
        up[i] += h
        down[i] -= h
        fd = (_smoothed_loss(z, up, eps, readout, lam, theta0)
              - _smoothed_loss(z, down, eps, readout, lam, theta0)) / (2 * h)
        assert float(g[i]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9), i
    assert torch.all(g != 0)


def test_jumprelu_encodes_above_threshold_only():
    sae = SAE(SAEConfig(d_in=4, d_sae=3, architecture="jumprelu"))
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.5, 0.0, 2.0]))
    pre = torch.tensor([[0.4, 0.1, 2.5], [0.6, -0.2, 2.0]])
    expected = torch.tensor([[0.0, 0.1, 2.5], [0.6, 0.0, 0.0]])  # H(0) = 0, as SAELens
    torch.testing.assert_close(sae.activate(pre), expected)


# ---------------------------------------------------------------------------------- Matryoshka
def _matryoshka_reference(tr: TrainState, x: torch.Tensor):
    """float64 sum over prefixes of ||f[:m] W_dec[:m] + b_dec - x||^2 (mean over tokens), with the
    batch-top-k codes; returns (loss, {name: grad})."""
    c = tr.cfg
    p = {n: t.detach().double().clone().requires_grad_(True) for n, t in tr.p.items()}
    xd = x.double()
    z = (xd - p["b_dec"]) @ p["W_encT"].T + p["b_enc"]
    f = z.relu() * activations.batch_topk_mask(z.detach(), c.k)
    loss = sum(((f[:, :m] @ p["W_dec"][:m] + p["b_dec"] - xd) ** 2).sum(-1).mean() for m in c.matryoshka_widths)
    loss.backward()
    return float(loss.detach()), {n: t.grad for n, t in p.items()}


@pytest.mark.parametrize("route", ["sparse", "dense"])
def test_matryoshka_loss_is_the_sum_of_prefix_losses(route, rng):
    x, _ = _planted(rng, n=3000)
    tr = _state("matryoshka_batchtopk", x, steps=2, **ARCH_KW["matryoshka_batchtopk"])
    xb = tr.batch(7)
    ref_loss, ref = _matryoshka_reference(tr, xb)
    fn = sparse_gradients if route == "sparse" else dense_gradients
    grads, metrics, _ = fn(tr, xb, 3)  # step 3 < dead window: no AuxK
    assert metrics["aux"] == 0
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    for n, g in grads.items():
        scale = float(ref[n].abs().max())
        torch.testing.assert_close(g.double(), ref[n], atol=1e-5 * scale, rtol=0, msg=n)


# ---------------------------------------------------------------------------------- Gated
def test_gated_gradients_match_float64_reference(rng):
    x, _ = _planted(rng, n=3000)
    tr = _state("gated", x, steps=3, **ARCH_KW["gated"])
    tr.p["W_dec"].mul_(torch.from_numpy(rng.uniform(0.5, 1.5, (64, 1)).astype(np.float32)))  # norms off 1
    with torch.no_grad():  # non-trivial magnitudes
        tr.p["r_mag"].copy_(torch.from_numpy(0.3 * rng.standard_normal(64).astype(np.float32)))
        tr.p["b_mag"].copy_(torch.from_numpy(0.1 * rng.standard_normal(64).astype(np.float32)))
    xb = tr.batch(5)
    p = {n: t.detach().double().clone().requires_grad_(True) for n, t in tr.p.items()}
    xd, l1 = xb.double(), tr.l1(5)
    sae_in = xd - p["b_dec"]
    pi = sae_in @ p["W_encT"].T + p["b_enc"]
    mag = sae_in @ (p["W_encT"].T * p["r_mag"].exp()) + p["b_mag"]
    f = (pi > 0).double() * mag.relu()
    recon = ((f @ p["W_dec"] + p["b_dec"] - xd) ** 2).sum(-1).mean()
    sparsity = l1 * (pi.relu() * p["W_dec"].norm(dim=1)).sum(-1).mean()
    aux = ((pi.relu() @ p["W_dec"] + p["b_dec"] - xd) ** 2).sum(-1).mean()
    (recon + sparsity + aux).backward()
    for route in (dense_gradients, sparse_gradients):
        grads, metrics, _ = route(tr, xb, 5)
        assert metrics["loss"] == pytest.approx(float(recon + sparsity + aux), rel=1e-5)
        for n, g in grads.items():
            scale = float(p[n].grad.abs().max())
            torch.testing.assert_close(g.double(), p[n].grad, atol=1e-5 * scale, rtol=0, msg=f"{route.__name__} {n}")


def test_gated_encode_is_gate_times_magnitude(rng):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="gated"))
    with torch.no_grad():
        for n in ("b_enc", "r_mag", "b_mag", "b_dec"):
            getattr(sae, n).copy_(torch.from_numpy(0.3 * rng.standard_normal(getattr(sae, n).shape).astype(np.float32)))
    x = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32))
    xc = (x - sae.b_dec).double()
    w = sae.W_enc.detach().double()
    gate = (xc @ w + sae.b_enc.double()) > 0
    mag = (xc @ (w * sae.r_mag.double().exp()) + sae.b_mag.double()).relu()
    torch.testing.assert_close(sae.encode(x).detach().double(), gate * mag, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- both routes
def test_dense_jumprelu_step_matches_autograd(rng):
    """The GEMM route JumpReLU takes while dense, against the autograd route (float32)."""
    x, _ = _planted(rng, n=3000)
    tr = _state("jumprelu", x, steps=2, **ARCH_KW["jumprelu"])
    xb = tr.batch(5)
    gh, mh, fh = dense_jumprelu_gradients(tr, xb, 6)
    ga, ma, fa = dense_gradients(tr, xb, 6)
    assert torch.equal(fh.long(), fa.long()) and mh["l0"] > 0.2 * 64  # dense: many latents fire
    for key in ("loss", "mse", "l0"):
        assert mh[key] == pytest.approx(ma[key], rel=1e-5), key
    for n in ga:
        scale = float(ga[n].abs().max())
        torch.testing.assert_close(gh[n], ga[n], atol=2e-6 * max(scale, 1.0), rtol=0, msg=n)


def _gated_edge_batch(tr: TrainState, xb: torch.Tensor, rng) -> torch.Tensor:
    """Off-1 decoder norms, non-trivial magnitudes, and gate edge cases: tokens x = b_dec (so pi = b_gate
    and mag = b_mag exactly) with b_gate = 0 (pi exactly 0: gate shut), b_gate > 0 and b_mag = 0 (mag
    exactly 0 under an open gate) or b_mag < 0 (mag < 0). The values are bfloat16 numbers, so both dtypes
    see the same edges."""
    d_sae = tr.cfg.d_sae
    tr.p["W_dec"].mul_(torch.from_numpy(rng.uniform(0.5, 1.5, (d_sae, 1)).astype(np.float32)))
    with torch.no_grad():
        tr.p["r_mag"].copy_(torch.from_numpy(0.3 * rng.standard_normal(d_sae).astype(np.float32)))
        tr.p["b_mag"].copy_(torch.from_numpy(0.1 * rng.standard_normal(d_sae).astype(np.float32)))
        tr.p["b_enc"][:8] = 0.0  # pi = 0 on the x = b_dec tokens
        tr.p["b_enc"][8:16] = 0.25
        tr.p["b_mag"][8:12] = 0.0  # mag = 0 there
        tr.p["b_mag"][12:16] = -0.125  # mag < 0 there
    xb = xb.clone()
    xb[:16] = tr.p["b_dec"]
    return xb


@pytest.mark.parametrize("step", [1, 6], ids=["l1_warmup", "full_l1"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_gated_step_matches_autograd(dtype, step, rng):
    """The GEMM route gated takes while many gates are open, against the autograd route with the same
    compute dtype: float32 to float32 rounding; bfloat16 to a few bf16 epsilons of each gradient's
    largest entry (both routes round their GEMMs' inputs and outputs to bfloat16, the hand-written one
    its magnitudes too, from the bf16 pi). Step 1 is inside the 4-step L1 warm-up (l1 / 4)."""
    x, _ = _planted(rng, n=3000)
    tr = _state("gated", x, steps=2, dtype=dtype, l1_warmup_steps=4, **ARCH_KW["gated"])
    xb = _gated_edge_batch(tr, tr.batch(5), rng)
    assert tr.l1(step) == pytest.approx(0.3 * min(1.0, step / 4))
    saved = {n: t.clone() for n, t in tr.p.items()}
    gh, mh, fh = dense_gated_gradients(tr, xb, step)
    gate_l0 = float(tr.extra_state["gate_l0"])
    ga, ma, fa = dense_gradients(tr, xb, step)
    assert all(torch.equal(saved[n], tr.p[n]) for n in saved)  # the step reads the weights only
    tol = 1e-6 if dtype == "float32" else 4 * 2.0 ** -8
    # both count the open gates (bf16: b_gate rides in the GEMM here, is added in float32 there)
    assert float(tr.extra_state["gate_l0"]) == pytest.approx(gate_l0, rel=0 if dtype == "float32" else 0.002)
    assert gate_l0 > 0.2 * 64 and mh["dense"] == 1.0
    pi = (xb[:16] - tr.p["b_dec"]) @ tr.p["W_encT"].T + tr.p["b_enc"]
    assert torch.all(pi[:, :8] == 0) and torch.all(pi[:, 8:16] == 0.25)  # the edges are exact
    fired_diff = int((fh.long() - fa.long()).abs().sum())
    assert fired_diff <= (0 if dtype == "float32" else 0.002 * int(fa.sum())), fired_diff
    for key in ("loss", "mse", "l0", "aux"):
        assert mh[key] == pytest.approx(ma[key], rel=max(tol, 1e-5)), key
    assert set(gh) == set(ga) == {"W_encT", "W_dec", "b_enc", "b_dec", "r_mag", "b_mag"}
    for n in ga:
        scale = float(ga[n].abs().max())
        torch.testing.assert_close(gh[n], ga[n], atol=tol * scale, rtol=0, msg=n)


def test_gated_routes_its_dense_steps_to_the_gemm_step(rng):
    x, _ = _planted(rng, n=3000)
    tr = _state("gated", x, steps=2, dtype="bfloat16", **ARCH_KW["gated"])
    xb = tr.batch(5)
    tr.extra_state["gate_l0"].fill_(64.0)
    g_route, m_route, _ = gradients(tr, xb, 6)
    tr.extra_state["gate_l0"].fill_(64.0)
    g_gemm, _, _ = dense_gated_gradients(tr, xb, 6)
    assert m_route["dense"] == 1.0
    assert all(torch.equal(g_route[n], g_gemm[n]) for n in g_gemm)
    tr.extra_state["gate_l0"].fill_(1.0)
    assert gradients(tr, xb, 6)[1]["dense"] == 0.0  # few open gates: the sparse route


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_training_loss_falls_through_the_dense_phase(dtype, rng):
    x, _ = _planted(rng, n=6000)
    cfg = SAEConfig(d_in=32, d_sae=64, architecture="gated", batch_size=256, n_tokens=60 * 256, lr=3e-3,
                    dtype=dtype, l1_coefficient=0.3)
    h = train_sae(x, cfg, log_every=1).history
    assert h.dense.iloc[0] == 1.0  # every gate starts near half open: the dense GEMM step
    assert h.loss.iloc[-5:].mean() < 0.5 * h.loss.iloc[:5].mean(), h.loss.tolist()
    assert np.isfinite(h.loss).all()


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "matryoshka_batchtopk", "gated"])
def test_sparse_route_matches_dense_autograd(arch, rng):
    x, _ = _planted(rng, n=3000)
    tr = _state(arch, x, steps=4, **ARCH_KW[arch])  # step 6 > dead window of 2 steps: AuxK may engage
    xb = tr.batch(5)
    saved = {n: t.clone() for n, t in tr.extra_state.items()}
    gs, ms, fs = sparse_gradients(tr, xb, 6)
    for n, t in saved.items():
        tr.extra_state[n].copy_(t)
    gd, md, fd = dense_gradients(tr, xb, 6)
    assert torch.equal(fs.long(), fd.long())
    for key in ("loss", "mse", "l0", "aux"):
        assert ms[key] == pytest.approx(md[key], rel=1e-5, abs=1e-7), key
    for n in gd:
        scale = float(gd[n].abs().max())
        torch.testing.assert_close(gs[n], gd[n], atol=2e-6 * max(scale, 1.0), rtol=0, msg=n)


@pytest.mark.parametrize("arch, kw, steps", [
    ("jumprelu", dict(l0_coefficient=0.5, jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.2), 300),
    ("batchtopk", dict(k=4), 600),
    ("gated", dict(l1_coefficient=2.0), 300),
], ids=["jumprelu", "batchtopk", "gated"])
def test_recovers_planted_dictionary_and_round_trips_through_the_store(arch, kw, steps, rng):
    x, dirs = _planted(rng)
    cfg = SAEConfig(d_in=32, d_sae=192, architecture=arch, batch_size=512, n_tokens=steps * 512, lr=3e-3,
                    dead_window=20 * 512, **kw)
    res = train_sae(x, cfg)
    last = res.history.iloc[-1]
    assert last.nmse < 0.2 and 1.5 < last.l0 < 12, res.history.tail()  # ~2.9 true features per token
    w = res.sae.W_dec.detach().double().numpy()
    assert float(((dirs @ w.T).max(1) > 0.9).mean()) > 0.8  # true directions found by a decoder row
    sae = res.sae
    again = sae_from_result(sae_to_result(sae, res))
    assert again.weight_names == sae.weight_names
    with torch.no_grad():
        torch.testing.assert_close(again(x[:100]), sae(x[:100]), rtol=0, atol=0)


def test_matryoshka_prefix_reconstructs_on_its_own(rng):
    """The defining property: the first prefix is trained to reconstruct alone, so its latents
    explain far more than the same-width prefix of a plain BatchTopK SAE trained alike."""
    x, _ = _planted(rng)
    nmse = {}
    for arch, extra in (("batchtopk", {}), ("matryoshka_batchtopk", dict(matryoshka_widths=(24, 192)))):
        cfg = SAEConfig(d_in=32, d_sae=192, architecture=arch, k=4, batch_size=512, n_tokens=250 * 512, lr=3e-3,
                        dead_window=20 * 512, **extra)
        sae = train_sae(x, cfg).sae
        with torch.no_grad():
            f = sae.encode(x[:4000])
            f[:, 24:] = 0
            err = ((sae.decode(f) - x[:4000]) ** 2).sum(-1).mean()
        nmse[arch] = float(err / ((x[:4000] - x[:4000].mean(0)) ** 2).sum(-1).mean())
    assert nmse["matryoshka_batchtopk"] < 0.75 * nmse["batchtopk"], nmse


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_relu_topk_config_dicts_keep_their_keys(arch):
    """Store keys are the config dicts: the new fields stay out of relu/topk ones."""
    cfg = SAEConfig(d_in=8, d_sae=16, architecture=arch, k=4 if arch == "topk" else None)
    assert not set(ARCH_FIELDS) & set(cfg.to_dict())
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    (dict(architecture="vanilla"), r"architecture='vanilla': must be one of relu, topk, jumprelu, batchtopk, "
                                   r"matryoshka_batchtopk, gated; use 'relu'"),
    (dict(architecture="batchtopk", k=16), r"k=16: a batchtopk SAE needs a number 0 < k < d_sae=16 .*pass k below"),
    (dict(architecture="batchtopk"), r"k=None: a batchtopk SAE needs a number"),
    (dict(architecture="matryoshka_batchtopk", k=20, matryoshka_widths=(4, 16)), r"k=20"),
    (dict(architecture="jumprelu", jumprelu_init_threshold=math.nan),
     r"jumprelu_init_threshold=nan: must be a finite number >= 0 \(NaN and inf are not thresholds\); pass e.g. "
     r"jumprelu_init_threshold=0.01"),
    (dict(architecture="jumprelu", jumprelu_init_threshold=-0.1), r"jumprelu_init_threshold=-0.1"),
    (dict(architecture="jumprelu", jumprelu_bandwidth=0.0), r"jumprelu_bandwidth=0.0: must be a finite number in"),
    (dict(architecture="jumprelu", l0_coefficient=math.inf), r"l0_coefficient=inf"),
    (dict(architecture="matryoshka_batchtopk", k=2), r"matryoshka_widths=None: a matryoshka_batchtopk SAE needs"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=(8, 4, 16)),
     r"must increase strictly from >= 1 and end at d_sae=16"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=(4, 8)), r"end at d_sae=16"),
    (dict(architecture="batchtopk", k=2, matryoshka_widths=(4, 16)), r"only a matryoshka_batchtopk SAE takes"),
    (dict(architecture="gated", k=2), r"k=2: only topk, batchtopk, matryoshka_batchtopk SAEs take k"),
], ids=lambda v: str(v)[:50])
def test_bad_settings_name_value_and_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        SAEConfig(d_in=8, d_sae=16, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(architecture="vanilla"), r"architecture 'vanilla' is unknown; use 'relu' .* 'gated'"),
    (dict(architecture="jumprelu", l1_coefficient=1.0), r"l1_coefficient applies to relu and gated SAEs only"),
    (dict(architecture="gated", k=4), r"k applies to topk, batchtopk, matryoshka_batchtopk SAEs only"),
    (dict(architecture="batchtopk", d_sae=32, k=32), r"k=32: a batchtopk SAE needs a number 0 < k < d_sae=32"),
    (dict(architecture="jumprelu", extra={"jumprelu_init_threshold": math.nan}), r"jumprelu_init_threshold=nan"),
], ids=lambda v: str(v)[:50])
def test_training_requests_check_architecture_settings(kw, match):
    """The request of ``api.sae_train`` / ``lenslab sae train`` fails on construction, before any model boots."""
    with pytest.raises(ConfigError, match=match):
        TrainSettings(**kw)


def test_training_request_records_architecture_settings():
    s = TrainSettings(architecture="matryoshka_batchtopk", d_sae=64, k=8,
                      extra={"matryoshka_widths": (16, 64), "topk_threshold_lr": 0.05})
    f = s.sae_fields()
    assert (f["architecture"], f["k"], f["matryoshka_widths"], f["topk_threshold_lr"]) == \
        ("matryoshka_batchtopk", 8, (16, 64), 0.05)
    assert "l1_coefficient" not in TrainSettings(architecture="jumprelu").sae_fields()
