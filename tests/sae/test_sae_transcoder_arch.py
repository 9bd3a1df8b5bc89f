"""Transcoder architectures (topk, relu, jumprelu): the defining properties of each training loss
against independent float64 computations (JumpReLU's threshold gradient as the derivative of the
loss with each jump spread over the kernel's band, ReLU's decoder-norm-weighted L1), the skip path
starting at the least-squares map for every architecture, training on a synthetic MLP, and bad
settings refused before anything boots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.errors import ConfigError
from sae import activations
from sae.transcoder import (ARCHITECTURES, Transcoder, TranscoderConfig, _codes_and_penalty, least_squares_skip,
                            nmse, train_transcoder)


def _random_tc(arch: str, skip: bool, *, d_in: int = 6, d_out: int = 5, d_sae: int = 12, seed: int = 0,
               **kw) -> Transcoder:
    tc = Transcoder(TranscoderConfig(d_in=d_in, d_out=d_out, d_sae=d_sae, k=3, skip=skip, architecture=arch,
                                     seed=seed, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        tc.b_enc.copy_(0.2 * torch.randn(d_sae, generator=g))
        tc.W_dec.mul_(torch.rand(d_sae, 1, generator=g) + 0.5)  # rows off unit norm
        tc.b_dec.copy_(torch.randn(d_out, generator=g))
        if skip:
            tc.W_skip.copy_(0.3 * torch.randn(d_out, d_in, generator=g))
        if arch == "jumprelu":
            tc.threshold.copy_(0.1 + 0.4 * torch.rand(d_sae, generator=g))
    return tc


def _data(n: int = 64, d_in: int = 6, d_out: int = 5, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_is_the_architectures_nonlinearity(arch):
    tc = _random_tc(arch, skip=False)
    x, _ = _data()
    with torch.no_grad():
        pre = x.double() @ tc.W_enc.double() + tc.b_enc.double()
        want = {"topk": lambda p: activations.topk(p, 3), "relu": activations.relu,
                "jumprelu": lambda p: activations.jumprelu(p, tc.threshold.double())}[arch](pre)
        torch.testing.assert_close(tc.encode(x).double(), want, atol=1e-6, rtol=1e-6)


def test_jumprelu_threshold_gradient_is_the_derivative_of_the_band_smoothed_loss():
    """The straight-through gradient of theta equals the exact derivative of the loss in which each
    latent's jump (height theta_i at z = theta_i) and each L0 step are spread linearly over the
    kernel's band |z - theta_i| < eps/2 (H -> H_eps(u) = clamp(u / eps + 1/2, 0, 1)), by central
    differences in float64."""
    eps, lam = 0.4, 0.7
    tc = _random_tc("jumprelu", skip=True, jumprelu_bandwidth=eps, l0_coefficient=lam).double()
    x, y = (t.double() for t in _data(n=256))
    f, penalty = _codes_and_penalty(tc, x, step=1)
    loss = ((tc.decode(f, x) - y) ** 2).sum(-1).mean() + penalty
    (g_theta,) = torch.autograd.grad(loss, tc.threshold)

    theta0 = tc.threshold.detach().clone()
    with torch.no_grad():
        z = tc.pre_acts(x)
    assert int(((z - theta0).abs() < eps / 2).sum()) > 100  # the band holds enough entries to test

    def h_eps(u):
        return (u / eps + 0.5).clamp(0, 1)

    def smoothed(theta):
        with torch.no_grad():
            f0 = z * (z > theta0)
            f_s = f0 + theta0 * (h_eps(z - theta) - h_eps(z - theta0))
            y_hat = f_s @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T
            return float(((y_hat - y) ** 2).sum(-1).mean() + lam * h_eps(z - theta).sum(-1).mean())

    h = 1e-6
    fd = torch.zeros_like(theta0)
    for i in range(theta0.numel()):
        e = torch.zeros_like(theta0)
        e[i] = h
        fd[i] = (smoothed(theta0 + e) - smoothed(theta0 - e)) / (2 * h)
    assert float(fd.abs().max()) > 1e-2  # a real signal
    torch.testing.assert_close(g_theta, fd, atol=1e-6 * float(fd.abs().max()) + 1e-8, rtol=1e-5)


def test_jumprelu_codes_get_the_gradient_of_the_kept_entries_only():
    tc = _random_tc("jumprelu", skip=False).double()
    x, y = (t.double() for t in _data())
    pre = tc.pre_acts(x).detach().requires_grad_(True)
    f = activations.jumprelu(pre, tc.threshold)  # same forward
    from sae.train_arch import jumprelu_loss_terms

    f_ste, _ = jumprelu_loss_terms(pre, tc.threshold, tc.cfg.jumprelu_bandwidth)
    torch.testing.assert_close(f_ste, f)
    g_out = torch.randn_like(f_ste)
    (g_pre,) = torch.autograd.grad(f_ste, pre, g_out)
    torch.testing.assert_close(g_pre, g_out * (pre > tc.threshold))


def test_relu_l1_is_weighted_by_decoder_norms_with_its_gradients_and_warmup():
    """penalty = l1 mean_b sum_i f_bi ||W_dec[i]||: its gradients against the float64 formulas, its
    invariance to moving a latent's scale between encoder and decoder, and the linear warm-up."""
    lam = 0.3
    tc = _random_tc("relu", skip=False, l1_coefficient=lam, l1_warmup_steps=10).double()
    x, _ = (t.double() for t in _data())
    f, penalty = _codes_and_penalty(tc, x, step=10)
    norms = tc.W_dec.detach().norm(dim=1)
    fd = f.detach()
    assert float(penalty.detach()) == pytest.approx(lam * float((fd * norms).sum(-1).mean()), rel=1e-12)
    g_dec, g_benc = torch.autograd.grad(penalty, (tc.W_dec, tc.b_enc))
    n = x.shape[0]
    torch.testing.assert_close(g_dec, lam * fd.sum(0)[:, None] / n * tc.W_dec.detach() / norms[:, None])
    torch.testing.assert_close(g_benc, lam * norms * (fd > 0).sum(0) / n)
    # scale c_i moved from the decoder row into the encoder column: same codes x rows, same penalty
    c = torch.linspace(0.5, 2.0, tc.cfg.d_sae, dtype=torch.float64)
    with torch.no_grad():
        y0 = tc.decode(f, x)
        tc.W_enc.mul_(c)
        tc.b_enc.mul_(c)
        tc.W_dec.div_(c[:, None])
    f2, penalty2 = _codes_and_penalty(tc, x, step=10)
    torch.testing.assert_close(float(penalty2.detach()), float(penalty.detach()))
    torch.testing.assert_close(tc.decode(f2, x).detach(), y0.detach())
    assert [tc.cfg.l1_at(s) for s in (0, 5, 10, 20)] == pytest.approx([0, lam / 2, lam, lam])
    default = TranscoderConfig(d_in=2, d_out=2, d_sae=4, architecture="relu", n_tokens=200, batch_size=1)
    assert default.l1_at(5) == pytest.approx(0.5)  # None: over 5% of the 200 steps


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_skip_path_starts_at_the_least_squares_map(arch):
    x, _ = _data(n=400)
    g = torch.Generator().manual_seed(9)
    y = x @ torch.randn(6, 5, generator=g) + 0.3 * torch.randn(400, 5, generator=g) - 2.0
    tc = Transcoder(TranscoderConfig(d_in=6, d_out=5, d_sae=12, k=2, skip=True, architecture=arch))
    tc.fit_init(x, y)
    xd = np.hstack([x.double().numpy(), np.ones((400, 1))])
    sol = np.linalg.lstsq(xd, y.double().numpy(), rcond=None)[0]
    with torch.no_grad():
        np.testing.assert_allclose(tc.W_skip.T.numpy(), sol[:-1], atol=1e-5)
        tc.W_dec.zero_()
        np.testing.assert_allclose(tc(x).double().numpy(), xd @ sol, atol=1e-4)


def _synthetic_mlp(n: int = 2048, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, 16] -> y = GELU(x W1 + b1) W2 [n, 12] (d_mlp 48), a nonlinear map a linear fit leaves far from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    h = torch.nn.functional.gelu(x @ torch.randn(16, 48, generator=g) + torch.randn(48, generator=g))
    return x, h @ torch.randn(48, 12, generator=g) / math.sqrt(48)


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip"])
@pytest.mark.parametrize("arch,kw", [("relu", dict(l1_coefficient=0.05)), ("jumprelu", dict(l0_coefficient=0.01))],
                         ids=["relu", "jumprelu"])
def test_each_architecture_trains_well_below_the_bias_only_baseline(arch, kw, skip):
    """The bias-only prediction (mean output) has NMSE 1; the skip path alone, the least-squares map."""
    x, y = _synthetic_mlp()
    cfg = TranscoderConfig(d_in=16, d_out=12, d_sae=96, skip=skip, architecture=arch, batch_size=256,
                           n_tokens=150 * 256, lr=3e-3, **kw)
    res = train_transcoder(x, y, cfg)
    w, b = least_squares_skip(x, y)
    linear = nmse(y, x @ w.T + b)
    assert linear > 0.2  # the target is far from affine
    assert res.nmse_train < 0.5 * linear and res.nmse_train < 0.15, (res.nmse_train, linear)
    with torch.no_grad():
        l0 = float((res.transcoder.encode(x) > 0).sum(-1).float().mean())
    assert 0 < l0 < 0.75 * cfg.d_sae  # sparse codes, and the penalty did not switch everything off
    assert res.history[-1]["l0"] == pytest.approx(l0, rel=0.5)


@pytest.mark.parametrize("field,value,match", [
    ("architecture", "gelu", r"architecture='gelu' is unknown; valid: topk, relu, jumprelu"),
    ("l1_coefficient", -1.0, r"l1_coefficient=-1.0: must be a finite number >= 0"),
    ("l0_coefficient", float("inf"), r"l0_coefficient=inf: must be a finite number >= 0"),
    ("jumprelu_init_threshold", float("nan"), r"jumprelu_init_threshold=nan: must be a finite number >= 0 \(NaN"),
    ("jumprelu_bandwidth", 0.0, r"jumprelu_bandwidth=0.0: must be a finite number > 0"),
    ("l1_warmup_steps", -3, r"l1_warmup_steps=-3: must be an integer >= 0"),
])
def test_bad_architecture_settings_raise_config_errors(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TranscoderConfig(d_in=4, d_out=4, d_sae=64, **{field: value})


def test_k_is_checked_for_topk_only():
    with pytest.raises(ConfigError, match=r"k=64: must be an integer 1 <= k <= d_sae=8"):
        TranscoderConfig(d_in=4, d_out=4, d_sae=8, k=64)
    assert TranscoderConfig(d_in=4, d_out=4, d_sae=8, k=64, architecture="relu").d_sae == 8


def test_config_dict_round_trips_and_keeps_the_topk_dict():
    topk = TranscoderConfig(d_in=4, d_out=3, d_sae=8, k=2, skip=True, layer=1)
    d = topk.to_dict()
    assert not {"l1_coefficient", "l0_coefficient", "jumprelu_bandwidth"} & set(d)  # defaults left out
    assert (d["architecture"], d["kind"], d["hook_name"], d["hook_name_out"]) == \
        ("topk", "skip_transcoder", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
    jr = TranscoderConfig(d_in=4, d_out=3, d_sae=8, architecture="jumprelu", l0_coefficient=0.2)
    for cfg in (topk, jr):
        assert TranscoderConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in d.items() if k not in ("kind",)} | {"architecture": "skip_transcoder"}
    assert TranscoderConfig.from_dict(old) == topk  # a dict from before architectures existed
    with pytest.raises(ConfigError, match=r"unknown keys \['l2'\]"):
        TranscoderConfig.from_dict({**jr.to_dict(), "l2": 1})


def test_api_refuses_bad_architecture_settings_before_boot(monkeypatch):
    from app import api
    from sae import requests

    monkeypatch.setattr(requests, "booted", lambda *a, **k: (_ for _ in ()).throw(AssertionError("booted")))
    with pytest.raises(ConfigError, match=r"architecture='batchtopk' is unknown"):
        api.sae_transcoder("minilm", 0, architecture="batchtopk", texts=["a b"])
    with pytest.raises(ConfigError, match=r"jumprelu_init_threshold=nan"):
        api.sae_transcoder("minilm", 0, architecture="jumprelu", jumprelu_init_threshold=float("nan"),
                           texts=["a b"])
    with pytest.raises(ConfigError, match=r"l1_coefficient=-0.5"):
        api.sae_transcoder("minilm", 0, architecture="relu", l1_coefficient=-0.5, texts=["a b"])


def test_cli_architecture_option_reaches_the_config_check(capsys):
    from app.cli import app
    from app.cli.exit_codes import run

    assert run(app, ["sae", "transcoder", "minilm", "--architecture", "gelu"]) == 2  # a typed error, one line
    err = capsys.readouterr().err
    assert "architecture='gelu' is unknown" in " ".join(err.split()) and "Traceback" not in err
