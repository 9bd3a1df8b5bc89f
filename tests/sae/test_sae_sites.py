"""SAE sites: hook names on MiniLM and a tiny Llama, harvests equal to a direct ``run_with_cache``,
the MLP identity behind transcoders, loss splicing at a site against a direct HF computation,
bad sites failing before the model boots, and hook_z store keys left as they were."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_llama import TOY_HELD as HELD
from _tiny_llama import TOY_TEXTS as TEXTS
from _tiny_llama import hf_loss_with_hook, make_tiny_llama

from analysis.errors import ConfigError
from sae.sites import SITE_HOOKS, SITES, check_site, hook_for, parse_hook



@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def llama_bridge(llama):
    from sae.harvest import boot

    return boot(str(llama))


@pytest.fixture(autouse=True)
def _activations(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    return tmp_path / "acts"


def _ids(bridge, texts):
    from sae.harvest import pad_batch, pad_id_of, tokenize

    ids = tokenize(bridge.tokenizer, texts, 32)
    return ids, pad_batch(ids, pad_id_of(bridge.tokenizer))


def test_site_names_round_trip_and_bad_names_are_typed():
    for site, pat in SITE_HOOKS.items():
        assert parse_hook(hook_for(site, 7)) == (site, 7) and pat.format(layer=7) == hook_for(site, 7)
    assert parse_hook("blocks.3.attn.hook_q") is None
    with pytest.raises(ConfigError, match=r"'mlp_inn' is unknown; valid sites: hook_z, resid_pre, resid_post, mlp_out"):
        hook_for("mlp_inn", 0)


@pytest.mark.parametrize("which", ["llama", "minilm"])
def test_every_site_resolves_on_the_real_models(which, llama_bridge, request):
    from sae.harvest import boot

    _, bridge = llama_bridge if which == "llama" else boot("minilm")
    n = bridge.cfg.n_layers
    for site in (*SITES, "mlp_in"):
        assert [check_site(bridge, site, layer) for layer in range(n)] == [hook_for(site, i) for i in range(n)]
    with pytest.raises(ConfigError, match=rf"layer {n} has no resid_post hook .*valid layers are \[0, .*{n - 1}\]"):
        check_site(bridge, "resid_post", n)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "mlp_out", "hook_z"])
def test_harvest_equals_run_with_cache(site, llama_bridge, tmp_path):
    from sae.harvest import harvest

    src, bridge = llama_bridge
    texts = TEXTS[:12]
    cache = harvest(src, 1, texts, max_tokens=32, bridge=bridge, site=site, cache_dir=tmp_path / "c")
    ids, (input_ids, mask) = _ids(bridge, texts)
    name = hook_for(site, 1)
    with torch.no_grad():
        _, c = bridge.run_with_cache(input_ids, attention_mask=mask, names_filter=lambda n: n == name)
    ref = c[name].reshape(*input_ids.shape, -1)  # hook_z: heads flattened head-major
    want = np.concatenate([ref[i, :len(x)].numpy() for i, x in enumerate(ids)])
    assert cache.hook_name == name and cache.site == site and cache.acts.shape == want.shape
    np.testing.assert_allclose(cache.acts, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert (cache.n_heads is None) == (site != "hook_z")


@pytest.mark.parametrize("which", ["llama", "minilm"])
def test_transcoder_target_is_the_mlps_own_output(which, llama_bridge):
    """MLP(blocks.L.mlp.hook_in) == blocks.L.hook_mlp_out, the MLP run directly from the HF modules."""
    from sae.harvest import boot

    _, bridge = llama_bridge if which == "llama" else boot("minilm")
    _, (input_ids, mask) = _ids(bridge, TEXTS[:4])
    x_name, y_name = hook_for("mlp_in", 1), hook_for("mlp_out", 1)
    with torch.no_grad():
        _, c = bridge.run_with_cache(input_ids, attention_mask=mask, names_filter=lambda n: n in (x_name, y_name))
        m = bridge.original_model
        if which == "minilm":  # post-LN BERT: intermediate (dense + GELU) then output.dense, before residual + LN
            lay = m.bert.encoder.layer[1]
            mlp = lay.output.dense(lay.intermediate(c[x_name]))
        else:
            mlp = m.model.layers[1].mlp(c[x_name])
    y = c[y_name]
    assert torch.allclose(mlp, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))



def test_loss_splicing_at_a_site_matches_a_direct_computation(llama_bridge):
    from sae.lm_loss import causal_lm_loss_fn

    _, bridge = llama_bridge
    texts = HELD[:8]
    _, (input_ids, mask) = _ids(bridge, texts)
    layers = bridge.original_model.model.layers
    for site, module in (("mlp_out", layers[0].mlp), ("resid_post", layers[0])):
        loss = causal_lm_loss_fn(bridge, 0, texts, max_tokens=32, site=site)

        def half(out):
            return (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5

        direct = hf_loss_with_hook(bridge, input_ids, mask, module, lambda x, out: half(out))
        clean = hf_loss_with_hook(bridge, input_ids, mask, module, lambda x, out: out)
        spliced = loss(lambda t: t * 0.5)
        assert abs(spliced - direct) < 1e-4 * direct and abs(loss(None) - clean) < 1e-4 * clean
        assert abs(spliced - clean) > 1e-3  # the splice took effect


def test_a_bad_site_fails_before_the_model_boots(llama, tmp_path, monkeypatch):
    from app import api
    from app.cli import app
    from sae import requests

    def no_boot(*a, **k):
        raise AssertionError("the model booted")

    monkeypatch.setattr(requests, "booted", no_boot)
    with pytest.raises(ConfigError, match=r"site 'mlp_inn' is unknown; valid sites: hook_z, resid_pre, resid_post"):
        api.sae_train(str(llama), 1, site="mlp_inn", texts=TEXTS, store=tmp_path / "s")
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    res = CliRunner().invoke(app, ["sae", "train", str(llama), "--site", "residual", "--texts", str(tmp_path / "t.txt"),
                                   "--store", str(tmp_path / "s")])
    with pytest.raises(ConfigError, match=r"site 'skip_transcoder': a transcoder .* use api.sae_transcoder"):
        api.sae_train(str(llama), 1, site="skip_transcoder", texts=TEXTS, store=tmp_path / "s")
    assert isinstance(res.exception, ConfigError) and "valid sites: hook_z, resid_pre, resid_post, mlp_out" in str(res.exception)


def test_a_layer_the_model_lacks_lists_the_valid_layers(llama, tmp_path):
    from app import api

    with pytest.raises(ConfigError, match=r"layer 5 has no mlp_out hook .*valid layers are \[0, 1\]"):
        api.sae_train(str(llama), 5, site="mlp_out", texts=TEXTS, store=tmp_path / "s")


def test_hook_z_configs_and_requests_keep_their_keys():
    from sae.config import SAEConfig, TrainSettings
    from sae.requests import train_request

    cfg = SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="blocks.1.attn.hook_z", layer=1,
                    n_heads=4, d_head=8)
    assert set(cfg.to_dict()) == {f.name for f in fields(SAEConfig)} - {"site"} - {
        "l0_coefficient", "l0_warmup_steps", "jumprelu_init_threshold", "jumprelu_bandwidth", "topk_threshold_lr",
        "matryoshka_widths"}
    assert cfg.replace(site="hook_z") == cfg and SAEConfig.from_dict(cfg.to_dict()) == cfg
    corpus = {"split": "train", "per_package": None, "seed": 0, "eval_fraction": 0.1}
    assert train_request(TrainSettings(layer=1, site="hook_z"), corpus) == train_request(TrainSettings(layer=1), corpus)
    assert "site" not in train_request(TrainSettings(layer=1), corpus)["fields"]
    other = SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="blocks.1.hook_mlp_out", layer=1,
                      site="mlp_out")
    assert other.to_dict()["site"] == "mlp_out" and SAEConfig.from_dict(other.to_dict()) == other
    with pytest.raises(ConfigError, match="hook_name='blocks.1.attn.hook_z': must be blocks.L.hook_mlp_out"):
        SAEConfig(d_in=32, d_sae=64, k=4, architecture="topk", layer=1, site="mlp_out",
                  hook_name="blocks.1.attn.hook_z")
    with pytest.raises(ConfigError, match="heads apply to hook_z SAEs only"):
        other.replace(n_heads=4, d_head=8)


def test_a_resid_post_sae_trains_evaluates_and_explains(llama, tmp_path):
    """Through the API: train at resid_post, evaluate (loss recovered spliced at that hook), feature
    data with logit effects and without heads; per-head views say they do not apply."""
    from app import api
    from app.cli import app
    from sae.harvest import boot
    from sae.lm_loss import causal_lm_loss_fn
    from sae.metrics import sae_patch, zero_patch

    st = tmp_path / "s"
    trained = api.sae_train(str(llama), 1, site="resid_post", d_sae=64, k=4, n_tokens=30 * 128, batch_size=128,
                            texts=TEXTS, store=st, device="cpu")
    cfg = trained.sae.cfg
    assert (cfg.site, cfg.hook_name, cfg.d_in, cfg.n_heads) == ("resid_post", "blocks.1.hook_resid_post", 32, None)
    assert trained.meta["request"]["fields"]["site"] == "resid_post"
    assert " L1 resid_post topk 64 (k=4)" in trained.name
    assert api.find_sae(str(llama), 1, site="resid_post", store=st) == trained.key
    with pytest.raises(ConfigError, match="site hook_z"):
        api.find_sae(str(llama), 1, site="hook_z", store=st)
    ev = api.sae_eval(trained.key, texts=HELD, loss_docs=16, store=st, device="cpu")
    _, bridge = boot(str(llama))
    fn = causal_lm_loss_fn(bridge, 1, HELD[:16], max_tokens=128, site="resid_post")
    clean, spliced, zero = fn(None), fn(sae_patch(trained.sae)), fn(zero_patch)
    assert ev.metrics["loss_recovered"] == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4, abs=1e-4)
    fd = api.sae_features(trained.key, texts=TEXTS, store=st, device="cpu")
    assert fd.head_attribution is None and fd.logit_table(int(np.argmax(fd.density))) is not None
    with pytest.raises(ConfigError, match="reads 'resid_post', which has no heads"):
        api.sae_polysemantic(trained.key, store=st)
    view = api.sae_prompt(trained.key, "the tensor of a frame", store=st, device="cpu")
    assert view.acts.shape[1] == 64
    with pytest.raises(ConfigError, match="per-head attribution applies to hook_z SAEs only"):
        view.dfa(view.top_features(1)[0])
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    res = CliRunner().invoke(app, ["sae", "features", str(llama), "--layer", "1", "--site", "resid_post", "--json",
                                   "--texts", str(tmp_path / "t.txt"), "--device", "cpu",
                                   "--store", str(st)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["key"] == trained.key and out["heads"] is None
