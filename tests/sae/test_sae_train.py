"""SAE training (sae/train.py): recovery of a planted dictionary, resampling, checkpoints,
interrupt and resume, bad input, and a short real run on MiniLM attention outputs.

Independent truths: synthetic activations built from a known sparse dictionary (the SAE must
find its directions), an uninterrupted run (a resumed run must end bit-identical), the
resampling rule written out (decoder row = unit centred input, encoder column scaled to the
live columns' mean norm, Adam moments zero).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError
from sae.config import SAEConfig
from sae.train import TrainState, train_sae


def _planted(rng, n=20_000, d=32, n_true=96, p=0.03, noise=0.01):
    """x = codes @ dirs + noise with unit dirs [n_true, d] and sparse non-negative codes."""
    dirs = rng.standard_normal((n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((n, n_true)) < p) * rng.uniform(0.5, 3.0, (n, n_true))
    x = codes @ dirs + noise * rng.standard_normal((n, d)) + 0.5
    return torch.from_numpy(x.astype(np.float32)), dirs


def _recovered(sae, dirs, thresh=0.9) -> float:
    """Fraction of true directions with a decoder row at cosine > thresh."""
    w = sae.W_dec.detach().double().numpy()
    return float(((dirs @ w.T).max(1) > thresh).mean())


@pytest.mark.parametrize("arch, kw, max_nmse", [("topk", dict(k=4), 0.15), ("relu", dict(l1_coefficient=1.0), 0.3)],
                         ids=["topk", "relu"])
def test_recovers_planted_dictionary(arch, kw, max_nmse, rng):
    x, dirs = _planted(rng)
    cfg = SAEConfig(d_in=32, d_sae=192, architecture=arch, batch_size=512, n_tokens=600 * 512, lr=3e-3,
                    dead_window=20 * 512, **kw)
    res = train_sae(x, cfg)
    last = res.history.iloc[-1]
    assert last.nmse < max_nmse, res.history.tail()  # relu pays for L1 shrinkage
    assert _recovered(res.sae, dirs) > 0.8
    if arch == "topk":
        assert 3.5 < last.l0 <= 4  # k, less the rows whose k-th pre-activation is <= 0
    else:
        assert 2 < last.l0 < 12  # ~2.9 true features per token
    torch.testing.assert_close(res.sae.W_dec.norm(dim=1), torch.ones(192), atol=1e-5, rtol=0)
    assert res.sae.W_enc.is_contiguous() and res.tokens_per_s > 0
    assert list(res.history.columns[:4]) == ["step", "tokens", "lr", "loss"]


def test_bfloat16_compute_matches_float32_quality(rng):
    x, _ = _planted(rng, n=8000)
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = SAEConfig(d_in=32, d_sae=128, architecture="topk", k=4, batch_size=512, n_tokens=200 * 512,
                        lr=3e-3, dtype=dtype)
        out[dtype] = train_sae(x, cfg).history.iloc[-1].nmse
    assert out["bfloat16"] == pytest.approx(out["float32"], rel=0.05)


def test_resampling_follows_the_rule(rng):
    x, _ = _planted(rng, n=4000)
    cfg = SAEConfig(d_in=32, d_sae=64, batch_size=256, n_tokens=50 * 256, l1_coefficient=0.1, resample_steps=(),
                    resample_sample=1024)
    tr = TrainState(cfg, x)
    for _ in range(3):
        tr.train_step()
    for state in (tr.m, tr.v):  # moments are non-zero before the reset
        assert float(state["W_dec"][:5].abs().sum()) > 0
    tr.last_fired[:5] = 0  # make latents 0-4 dead
    tr.last_fired[5:] = tr.step
    alive_norm = float(tr.p["W_encT"][5:].norm(dim=1).mean())
    assert tr.resample(tr.step) == 5
    W_dec = tr.p["W_dec"][:5].double()
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(5, dtype=torch.float64))
    # each new decoder row is a centred training input, normalised
    centred = (x - tr.p["b_dec"]).double()
    centred /= centred.norm(dim=1, keepdim=True)
    assert float((W_dec @ centred.T).max(1).values.min()) > 1 - 1e-6
    torch.testing.assert_close(tr.p["W_encT"][:5].norm(dim=1), torch.full((5,), 0.2 * alive_norm))
    torch.testing.assert_close(tr.p["W_encT"][:5] / (0.2 * alive_norm), tr.p["W_dec"][:5])
    assert float(tr.p["b_enc"][:5].abs().sum()) == 0
    for state in (tr.m, tr.v):
        assert float(state["W_dec"][:5].abs().sum() + state["W_encT"][:5].abs().sum() + state["b_enc"][:5].abs().sum()) == 0
        assert float(state["W_dec"][5:].abs().sum()) > 0
    tr.last_fired[:] = tr.step + 1  # all fired after the last resample: nothing to resample
    assert tr.resample(tr.step + 2) == 0


@pytest.mark.parametrize("arch, kw", [("relu", dict(l1_coefficient=0.2, resample_steps=(7, 14))),
                                      ("topk", dict(k=3, dead_window=2 * 256)),
                                      ("jumprelu", dict(l0_coefficient=0.3, jumprelu_init_threshold=0.3)),
                                      ("batchtopk", dict(k=3.5, dead_window=2 * 256)),
                                      ("matryoshka_batchtopk", dict(k=3, matryoshka_widths=(16, 64),
                                                                    dead_window=2 * 256)),
                                      ("gated", dict(l1_coefficient=0.3)),
                                      ("gated", dict(l1_coefficient=3.0, lr=3e-2))],
                         ids=["relu", "topk", "jumprelu", "batchtopk", "matryoshka", "gated", "gated_switch"])
def test_interrupt_and_resume_gives_identical_weights(arch, kw, tmp_path, rng):
    x, _ = _planted(rng, n=3000)  # 3000 is not a multiple of the batch: epochs straddle batches
    cfg = SAEConfig(d_in=32, d_sae=64, architecture=arch, batch_size=256, n_tokens=20 * 256,
                    dtype="bfloat16", **kw)
    full = train_sae(x, cfg, log_every=1)
    if arch == "gated":  # the dense GEMM step; gated_switch leaves it for the sparse one after the checkpoint
        dense = full.history.dense.to_numpy()
        assert dense[0] == 1.0 and (dense[10:].min() == 0.0) == ("lr" in kw), dense
    ckpt = tmp_path / "run.safetensors"

    def interrupt_at_13(done, total, label):
        if done == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(x, cfg, checkpoint=ckpt, checkpoint_every=5, log_every=1, progress=interrupt_at_13)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]  # no temp files left
    resumed = train_sae(x, cfg, checkpoint=ckpt, checkpoint_every=5)
    assert resumed.resumed_from == 10 and resumed.steps == 20
    if arch == "relu":
        assert resumed.n_resampled == full.n_resampled
    assert resumed.sae.weight_names == full.sae.weight_names
    for n in full.sae.weight_names:  # the architecture's threshold / r_mag / b_mag too
        assert torch.equal(getattr(resumed.sae, n), getattr(full.sae, n)), n
    np.testing.assert_array_equal(resumed.log10_density, full.log10_density)


def test_checkpoint_errors(tmp_path, rng):
    x, _ = _planted(rng, n=1000)
    cfg = SAEConfig(d_in=32, d_sae=64, batch_size=128, n_tokens=4 * 128)
    ckpt = tmp_path / "c.safetensors"
    train_sae(x, cfg, checkpoint=ckpt)
    with pytest.raises(ConfigError, match="different config \\(differs in \\['d_sae'\\]\\)"):
        train_sae(x, cfg.replace(d_sae=32), checkpoint=ckpt)
    with pytest.raises(ConfigError, match="trained on other activations"):
        train_sae(x + 1, cfg, checkpoint=ckpt)
    assert train_sae(x, cfg.replace(d_sae=32), checkpoint=ckpt, resume=False).steps == 4
    ckpt.write_bytes(ckpt.read_bytes()[:-64])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        train_sae(x, cfg.replace(d_sae=32), checkpoint=ckpt)


@pytest.mark.parametrize("acts, match", [
    (torch.full((10, 8), float("nan")), "the activation array holds 80 NaN/inf values"),
    (torch.zeros(10, 9), "activations have width 9 but the SAE has d_in=8"),
    (torch.zeros(0, 8), "must be \\[tokens, d_in\\] with >= 1 token"),
    (torch.zeros(2, 3, 8), "must be \\[tokens, d_in\\]"),
], ids=["nan", "width", "empty", "3d"])
def test_bad_activations(acts, match):
    with pytest.raises(ShapeError, match=match):
        train_sae(acts, SAEConfig(d_in=8, d_sae=16, batch_size=4, n_tokens=8))


def test_progress_reports_steps(rng):
    x, _ = _planted(rng, n=600)
    calls = []
    train_sae(x, SAEConfig(d_in=32, d_sae=64, batch_size=64, n_tokens=7 * 64), log_every=3,
              progress=lambda d, t, label: calls.append((d, t, label.split(" ")[0])))
    assert calls == [(3, 7, "step"), (6, 7, "step"), (7, 7, "step")]


# ------------------------------------------------------------------------ real activations
@pytest.fixture(scope="module")
def minilm_layer3(tmp_path_factory, minilm):
    """MiniLM blocks.3.attn.hook_z on every 10th training docstring and every 8th held-out one
    (64 tokens max): ~27k training and ~3.9k evaluation tokens."""
    from sae.harvest import boot, harvest, sae_corpus

    root = tmp_path_factory.mktemp("acts")
    src, bridge = boot(minilm)
    train = harvest(src, 3, sae_corpus("train")[::10], max_tokens=64, cache_dir=root, bridge=bridge)
    held = harvest(src, 3, sae_corpus("eval")[::8], max_tokens=64, cache_dir=root, bridge=bridge)
    return train, held


@pytest.mark.parametrize("arch, kw, l0_range, max_nmse", [
    ("topk", dict(k=16), (15.9, 16.0), 0.5),  # measured: eval L0 16, NMSE 0.39, EV 0.61, cos 0.84
    ("relu", dict(l1_coefficient=0.5), (20, 80), 0.55),  # measured: eval L0 42, NMSE 0.44, EV 0.56
], ids=["topk", "relu"])
def test_short_run_on_minilm_attention(arch, kw, l0_range, max_nmse, minilm_layer3):
    """A 2x SAE on MiniLM layer-3 hook_z, 120 steps of 1024 tokens (bf16): a few seconds."""
    from sae.metrics import reconstruction_metrics
    from sae.train import config_from_cache

    train, held = minilm_layer3
    assert (train.d_in, train.n_heads, train.d_head) == (384, 12, 32) and train.n_tokens > 20_000
    cfg = config_from_cache(train, expansion=2, architecture=arch, batch_size=1024, n_tokens=120 * 1024,
                            dtype="bfloat16", lr=3e-3, **kw)
    assert cfg.hook_name == "blocks.3.attn.hook_z" and cfg.source_label == "minilm"
    res = train_sae(train, cfg)
    m = reconstruction_metrics(res.sae, held)
    assert l0_range[0] <= m.l0 <= l0_range[1]
    assert m.nmse < max_nmse and m.explained_variance_sklearn > 1 - max_nmse - 0.05
    assert m.cosine > 0.75 and m.dead_fraction < 0.05
    assert res.history.iloc[-1].nmse < m.nmse + 0.05  # held-out is no better than training


@pytest.fixture(scope="module")
def minilm_layer3_full(tmp_path_factory, minilm):
    """MiniLM blocks.3.attn.hook_z on the whole train / held-out corpus split (128 tokens max),
    plus the masked-token loss function on the held-out texts."""
    from sae.harvest import boot, harvest, sae_corpus
    from sae.lm_loss import loss_fn_for

    root = tmp_path_factory.mktemp("acts-full")
    src, bridge = boot(minilm)
    held_docs = sae_corpus("eval")
    return (harvest(src, 3, sae_corpus("train"), cache_dir=root, bridge=bridge),
            harvest(src, 3, held_docs, cache_dir=root, bridge=bridge), loss_fn_for(src, 3, held_docs))


@pytest.mark.slow
@pytest.mark.parametrize("arch, kw, l0_range, max_nmse, min_recovered", [
    # measured here: L0 32.0, NMSE 0.210, EV 0.790, cos 0.920, dead 0.0, loss recovered 0.477 (0.525 with an MLM
    # head trained at 2 threads)
    ("topk", dict(k=32), (31.5, 32.0), 0.25, 0.35),
    # measured here: L0 62.5, NMSE 0.273, EV 0.728, cos 0.892, dead 0.0, loss recovered 0.157 (0.201 before the
    # dense-step rework, with an MLM head trained at 2 threads: coarse, the clean-to-zero gap is only 0.098 nats)
    ("relu", dict(l1_coefficient=0.5), (40, 90), 0.32, 0.05),
], ids=["topk", "relu"])
def test_documented_minilm_run(arch, kw, l0_range, max_nmse, min_recovered, minilm_layer3_full):
    """The README's MiniLM numbers: layer 3, d_sae 16 x 384 = 6144, 1000 steps of 4096 tokens
    (bf16) on the training split of the docstring corpus (~490k tokens, 128 max per text),
    evaluated on the held-out split (~55k tokens) with masked-token loss recovered (the trained
    MLM head of analysis.models.mlm_head; zero-ablating layer 3's hook_z costs only ~0.1 nats there, so
    loss recovered is a coarse signal). ~10 min per SAE on two busy cores."""
    from sae.metrics import evaluate
    from sae.train import config_from_cache

    train, held, loss_fn = minilm_layer3_full
    cfg = config_from_cache(train, d_sae=6144, architecture=arch, dtype="bfloat16", n_tokens=1000 * 4096, **kw)
    res = train_sae(train, cfg)
    s = evaluate(res.sae, held, loss_fn).scalars()
    print({k: round(v, 4) for k, v in s.items() if isinstance(v, float)}, f"{res.tokens_per_s:.0f} tok/s")
    assert l0_range[0] <= s["l0"] <= l0_range[1]
    assert s["nmse"] < max_nmse and s["explained_variance_sklearn"] > 1 - max_nmse - 0.03
    assert s["loss_recovered"] > min_recovered and s["dead_fraction"] < 0.05
