"""SAE config, model math, decoder constraint, SAELens format and store glue (sae/config.py,
sae/model.py, sae/saelens_format.py, sae/store_io.py).

Independent truths: numpy float64 forward passes written from the formulas, hand-built
top-k cases with ties, the projection formula for the decoder gradient, autograd for the
hand-written training gradients, and cfg.json dicts written the way SAELens 6.x writes them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis.errors import ConfigError, CorruptCheckpointError, CorruptEntryError, ShapeError
from sae.config import SAEConfig, hook_name_for
from sae.model import SAE
from sae.saelens_format import load_saelens, load_saelens_sparsity, save_saelens
from sae.store_io import ANALYSIS_SAE, get_sae, put_sae, sae_from_result, sae_to_result
from sae.train import TrainState


def _cfg(**kw) -> SAEConfig:
    base = dict(d_in=12, d_sae=40, n_heads=3, d_head=4, layer=2, hook_name=hook_name_for(2))
    return SAEConfig(**{**base, **kw})


def _randomise(sae: SAE, rng) -> SAE:
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
        sae.normalize_decoder_()
    return sae


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, match", [
    (dict(d_sae=0), "d_sae=0: must be a positive integer"),
    (dict(d_sae=-4), "d_sae=-4: must be a positive integer"),
    (dict(architecture="vanilla"), "architecture='vanilla': must be one of relu, topk, jumprelu, batchtopk, "
                                   "matryoshka_batchtopk, gated; use 'relu'"),
    (dict(architecture="topk"), "k=None: a topk SAE needs an integer 1 <= k <= d_sae=40"),
    (dict(architecture="topk", k=41), "k=41"),
    (dict(k=3), "k=3: only topk, batchtopk, matryoshka_batchtopk SAEs take k"),
    (dict(layer=3), "layer=3: disagrees with hook_name 'blocks.2.attn.hook_z'"),
    (dict(hook_name="blocks.2.hook_resid_post"), "must be blocks.L.attn.hook_z"),
    (dict(n_heads=4), "d_in=12: must equal n_heads\\*d_head = 4\\*4"),
    (dict(dtype="float16"), "dtype='float16'"),
    (dict(lr=0.0), "lr=0.0"),
    (dict(betas=(0.9, 1.0)), "betas"),
], ids=lambda v: str(v)[:40])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


def test_config_round_trips_through_json():
    cfg = _cfg(architecture="topk", k=5, resample_steps=(30, 10), betas=(0.8, 0.95), source_label="m")
    again = SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.resample_steps == (10, 30)
    with pytest.raises(ConfigError, match="unknown keys \\['d_inn'\\]"):
        SAEConfig.from_dict({**cfg.to_dict(), "d_inn": 3})
    with pytest.raises(ConfigError, match="misses \\['d_sae'\\]"):
        SAEConfig.from_dict({"d_in": 3})


def test_config_derived_schedule():
    cfg = _cfg(n_tokens=100 * 64, batch_size=64)
    assert cfg.steps == 100 and cfg.resample_schedule == (10, 20, 30, 40) and cfg.l1_warmup == 5
    assert _cfg(architecture="topk", k=2).resample_schedule == ()
    assert _cfg(n_tokens=10 * 64 + 1, batch_size=64).steps == 11


# -------------------------------------------------------------------------------------- model
def _numpy_forward(sae: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    W_enc, W_dec, b_enc, b_dec = (getattr(sae, n).detach().double().numpy() for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    pre = (x - b_dec) @ W_enc + b_enc
    if sae.cfg.architecture == "relu":
        f = np.maximum(pre, 0)
    else:
        f = np.zeros_like(pre)
        for i, row in enumerate(pre):
            top = np.argsort(-row, kind="stable")[:sae.cfg.k]
            f[i, top] = np.maximum(row[top], 0)
    return f, f @ W_dec + b_dec


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_forward_matches_numpy(arch, rng):
    sae = _randomise(SAE(_cfg(architecture=arch, k=6 if arch == "topk" else None)), rng)
    x = rng.standard_normal((7, 12))
    f_want, xhat_want = _numpy_forward(sae, x)
    xt = torch.from_numpy(x).float()
    with torch.no_grad():
        np.testing.assert_allclose(sae.encode(xt).double().numpy(), f_want, atol=1e-5)
        np.testing.assert_allclose(sae(xt).double().numpy(), xhat_want, atol=1e-5)
    # leading dims are kept: [batch, pos, d_in]
    assert sae(xt.reshape(7, 1, 12)).shape == (7, 1, 12)


def test_topk_keeps_exactly_k_under_ties():
    cfg = _cfg(d_in=4, d_sae=8, n_heads=None, d_head=None, architecture="topk", k=3)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        # pre-activations [5, 2, 2, 2, 2, 2, 1, 0]: five latents tie for places 2-6
        sae.b_enc.copy_(torch.tensor([5.0, 2, 2, 2, 2, 2, 1, 0]))
    f = sae.encode(torch.zeros(3, 4))
    assert ((f > 0).sum(1) == 3).all()
    assert (f[:, 0] == 5).all() and set(f[0][f[0] > 0].tolist()) == {5.0, 2.0}
    values, indices = sae.encode_topk(torch.zeros(3, 4))
    assert values.shape == (3, 3)
    torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode(f))
    # fewer than k positive pre-activations: the rest stay zero (ReLU after top-k, as SAELens)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([1.0, -1, -1, -1, -1, -1, -1, -1]))
    assert int((sae.encode(torch.zeros(1, 4)) > 0).sum()) == 1


def test_shape_errors_name_the_hook():
    sae = SAE(_cfg())
    with pytest.raises(ShapeError, match="last dimension 13 but this SAE expects 12 \\(blocks.2.attn.hook_z"):
        sae.encode(torch.zeros(2, 13))
    with pytest.raises(ShapeError, match="expects 40"):
        sae.decode(torch.zeros(2, 12))


def test_remove_parallel_grad_matches_projection(rng):
    w = rng.standard_normal((10, 6))
    g = rng.standard_normal((10, 6))
    wt, gt = torch.from_numpy(w), torch.from_numpy(g.copy())
    SAE.remove_parallel_grad_(wt, gt)
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    want = g - (g * u).sum(1, keepdims=True) * u
    np.testing.assert_allclose(gt.numpy(), want, atol=1e-12)
    np.testing.assert_allclose((gt.numpy() * w).sum(1), 0, atol=1e-12)


# ------------------------------------------------------------------ hand-written gradients
def _autograd_grads(tr: TrainState, x: torch.Tensor, step: int, dead: torch.Tensor | None):
    c = tr.cfg
    P = {"W_enc": tr.p["W_encT"].T.clone(), **{n: tr.p[n].clone() for n in ("W_dec", "b_enc", "b_dec")}}
    for t in P.values():
        t.requires_grad_(True)
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    if c.architecture == "relu":
        f = pre.relu()
    else:
        v, i = pre.topk(c.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    x_hat = f @ P["W_dec"] + P["b_dec"]
    loss = ((x_hat - x) ** 2).sum(1).mean()
    if c.architecture == "relu":
        loss = loss + tr.l1(step) * f.sum(1).mean()
    elif dead is not None:
        ka = min(c.aux_k_effective, int(dead.sum()))
        v, i = pre.masked_fill(~dead, float("-inf")).topk(ka, dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ P["W_dec"]
        scale = c.aux_coefficient * min(1.0, int(dead.sum()) / c.aux_k_effective)
        loss = loss + scale * ((e_hat - (x - x_hat).detach()) ** 2).sum(1).mean()
    loss.backward()
    return float(loss.detach()), {"W_encT": P["W_enc"].grad.T, **{n: P[n].grad for n in ("W_dec", "b_enc", "b_dec")}}


@pytest.mark.parametrize("case", ["relu-dense", "relu-sparse", "topk", "topk-auxk"])
def test_training_gradients_match_autograd(case, rng):
    arch = case.split("-")[0]
    kw = dict(l1_coefficient=0.5, l1_warmup_steps=10) if arch == "relu" else dict(k=6, aux_k=8)
    cfg = SAEConfig(d_in=24, d_sae=96, architecture=arch, batch_size=64, dead_window=64, **kw)
    x = torch.from_numpy(rng.standard_normal((300, 24)).astype(np.float32) * 2 + 0.3)
    tr = TrainState(cfg, x)
    with torch.no_grad():
        tr.p["b_enc"].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    step, dead = 5, None
    if arch == "topk":
        tr.last_fired[:] = 10  # "fired recently": nothing dead at step 5 ...
        if case == "topk-auxk":
            tr.last_fired[::3] = 0  # ... except every third latent, silent since the start
            dead = tr.last_fired <= step - 1 - cfg.dead_window_steps
            assert int(dead.sum()) == 32
    grads, metrics, _ = tr.gradients(x[:64], step, dense=case == "relu-dense")
    want_loss, want = _autograd_grads(tr, x[:64], step, dead)
    assert metrics["loss"] == pytest.approx(want_loss, rel=1e-5)
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, atol=2e-5, rtol=1e-4, msg=name)


def test_decoder_rows_stay_unit_norm_and_gradient_is_orthogonal(rng):
    cfg = SAEConfig(d_in=16, d_sae=64, batch_size=32, l1_coefficient=0.1)
    x = torch.from_numpy(rng.standard_normal((200, 16)).astype(np.float32))
    tr = TrainState(cfg, x)
    for _ in range(5):
        tr.train_step()
        torch.testing.assert_close(tr.sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)
    grads, _, _ = tr.gradients(tr.batch(5), 6)
    assert float(grads["W_dec"].abs().max()) > 1e-3  # the raw gradient has a parallel part ...
    assert float((grads["W_dec"] * tr.sae.W_dec).sum(1).abs().max()) > 1e-4
    SAE.remove_parallel_grad_(tr.sae.W_dec, grads["W_dec"])
    # ... which is gone: grad . W_dec row = 0 for every latent
    torch.testing.assert_close((grads["W_dec"] * tr.sae.W_dec).sum(1), torch.zeros(64), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ SAELens
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_saelens_round_trip(arch, tmp_path, rng):
    sae = _randomise(SAE(_cfg(architecture=arch, k=5 if arch == "topk" else None, source_label="tiny")), rng)
    sparsity = torch.from_numpy(rng.uniform(-6, 0, 40).astype(np.float32))
    save_saelens(sae, tmp_path / "sae", sparsity=sparsity)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == ("standard" if arch == "relu" else "topk")
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_name"], cfg["hook_layer"]) == (12, 40, "blocks.2.attn.hook_z", 2)
    assert cfg["reshape_activations"] == "hook_z" and cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is True and cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["metadata"]["hook_name"] == "blocks.2.attn.hook_z"
    assert cfg.get("k") == (5 if arch == "topk" else None)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "sae" / "sae_weights.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    back = load_saelens(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, n), getattr(sae, n))
    assert torch.equal(load_saelens_sparsity(tmp_path / "sae"), sparsity)


def _saelens_written(tmp_path, rng, **cfg_over):
    """A directory as SAELens 6.x's save_model writes it (no LensLab metadata)."""
    d = tmp_path / "from_saelens"
    d.mkdir()
    d_in, d_sae = 8, 16
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "hook_z",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                        "hook_name": "blocks.1.attn.hook_z", "model_name": "gpt2", "hook_head_index": None},
           "architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": False, **cfg_over}
    (d / "cfg.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    w = {"W_enc": rng.standard_normal((d_in, d_sae)), "W_dec": rng.standard_normal((d_sae, d_in)),
         "b_enc": rng.standard_normal(d_sae), "b_dec": rng.standard_normal(d_in)}
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in w.items()}, str(d / "sae_weights.safetensors"))
    return d, w


def test_load_saelens_written_directory(tmp_path, rng):
    d, w = _saelens_written(tmp_path, rng)
    sae = load_saelens(d)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer, sae.cfg.n_heads) == ("topk", 4, 1, None)
    x = rng.standard_normal((5, 8))
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row)[:4]
        f[i, top] = np.maximum(row[top], 0)
    np.testing.assert_allclose(sae(torch.from_numpy(x).float()).detach().numpy(), f @ w["W_dec"] + w["b_dec"],
                               atol=1e-4)


def test_load_saelens_folds_b_dec_when_not_applied_to_input(tmp_path, rng):
    d, w = _saelens_written(tmp_path, rng, apply_b_dec_to_input=False, architecture="standard")
    sae = load_saelens(d)
    x = rng.standard_normal((5, 8))
    f = np.maximum(x @ w["W_enc"] + w["b_enc"], 0)  # SAELens: no b_dec subtraction on the way in
    np.testing.assert_allclose(sae(torch.from_numpy(x).float()).detach().numpy(), f @ w["W_dec"] + w["b_dec"],
                               atol=1e-4)


@pytest.mark.parametrize("damage, error, match", [
    ("truncate", CorruptCheckpointError, "truncated"),
    ("no_cfg", CorruptCheckpointError, "no cfg.json"),
    ("cfg_missing_d_sae", CorruptCheckpointError, "missing keys \\['d_sae'\\]"),
    ("cfg_not_json", CorruptCheckpointError, "not valid JSON"),
    ("topk_without_k", CorruptCheckpointError, "missing key 'k'"),
    ("wrong_d_in", CorruptCheckpointError, "W_enc has shape \\(8, 16\\) but cfg.json implies \\(9, 16\\)"),
    ("matching_pursuit", ConfigError, "SAELens architecture 'matching_pursuit' is not supported; LensLab loads "
                                      "standard, topk, jumprelu, gated SAEs .*retrain it here"),
    ("normalized", ConfigError, "normalize_activations='expected_average_only_in' is not supported"),
    ("attn_q_hook", ConfigError, "'blocks.1.attn.hook_q' is not a hook LensLab SAEs read"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_load_saelens_rejects_damaged_files(damage, error, match, tmp_path, rng):
    d, _ = _saelens_written(tmp_path, rng)
    cfg_path, weights = d / "cfg.json", d / "sae_weights.safetensors"
    cfg = json.loads(cfg_path.read_text())
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "no_cfg":
        cfg_path.unlink()
    elif damage == "cfg_not_json":
        cfg_path.write_text("{not json")
    else:
        if damage == "cfg_missing_d_sae":
            del cfg["d_sae"]
        elif damage == "topk_without_k":
            del cfg["k"]
        elif damage == "wrong_d_in":
            cfg["d_in"] = 9
        elif damage == "matching_pursuit":
            cfg["architecture"] = "matching_pursuit"
        elif damage == "normalized":
            cfg["normalize_activations"] = "expected_average_only_in"
        elif damage == "attn_q_hook":
            cfg["metadata"]["hook_name"] = "blocks.1.attn.hook_q"
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        load_saelens(d)


def test_save_saelens_replaces_files_atomically(tmp_path, rng):
    sae = _randomise(SAE(_cfg()), rng)
    save_saelens(sae, tmp_path / "s", sparsity=torch.zeros(40))
    save_saelens(sae, tmp_path / "s")  # no sparsity now: the stale file must go
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    with pytest.raises(ConfigError, match="sparsity has 3 entries but the SAE has d_sae=40"):
        save_saelens(sae, tmp_path / "t", sparsity=torch.zeros(3))


# ------------------------------------------------------------------------------- store
def test_store_round_trip_and_corrupt_entry(store, rng):
    sae = _randomise(SAE(_cfg(source_fingerprint="ab" * 16, source_label="tiny")), rng)
    key = put_sae(store, sae)
    assert [e.analysis for e in store.list("ab" * 16)] == [ANALYSIS_SAE]
    back = get_sae(store, key)
    assert back.cfg == sae.cfg and torch.equal(back.W_dec, sae.W_dec) and torch.equal(back.W_enc, sae.W_enc)
    result = sae_to_result(sae)
    broken = type(result)(table=None, arrays={k: v for k, v in result.arrays.items() if k != "W_dec"},
                          meta=result.meta)
    with pytest.raises(CorruptEntryError, match="weight W_dec is None, expected \\(40, 12\\)"):
        sae_from_result(broken)
