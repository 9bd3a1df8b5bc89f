"""Transcoders: paired harvest equal to a direct run_with_cache, the least-squares skip against
numpy in float64, splicing against a direct HF forward hook, training, bad settings before boot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_llama import TOY_HELD as HELD
from _tiny_llama import TOY_TEXTS as TEXTS
from _tiny_llama import hf_loss_with_hook, make_tiny_llama

from analysis.errors import ConfigError
from sae.transcoder import Splice, Transcoder, TranscoderConfig, least_squares_skip, nmse, train_transcoder



@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def bridge(llama):
    from sae.harvest import boot

    return boot(str(llama))[1]


def test_harvest_pairs_equal_run_with_cache_and_the_mlp(bridge):
    from sae.harvest import pad_batch, pad_id_of, tokenize
    from sae.transcoder_job import harvest_pairs

    texts = TEXTS[:10]
    x, y = harvest_pairs(bridge, 1, texts, max_tokens=32)
    ids = tokenize(bridge.tokenizer, texts, 32)
    input_ids, mask = pad_batch(ids, pad_id_of(bridge.tokenizer))
    names = ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
    with torch.no_grad():
        _, c = bridge.run_with_cache(input_ids, attention_mask=mask, names_filter=lambda n: n in names)
        mlp = bridge.original_model.model.layers[1].mlp
        assert torch.allclose(mlp(x), y, atol=1e-5 * float(y.abs().max()))  # the target is the MLP's own output
    for name, got in zip(names, (x, y)):
        want = torch.cat([c[name][i, :len(t)] for i, t in enumerate(ids)])
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))


def test_skip_transcoder_with_no_latents_is_the_least_squares_affine_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    y = x @ torch.randn(6, 5, generator=g) + 0.3 * torch.randn(500, 5, generator=g) + 1.5
    xd = np.hstack([x.double().numpy(), np.ones((500, 1))])
    sol = np.linalg.lstsq(xd, y.double().numpy(), rcond=None)[0]
    w, b = least_squares_skip(x, y)
    np.testing.assert_allclose(w.T.numpy(), sol[:-1], atol=1e-5)
    np.testing.assert_allclose(b.numpy(), sol[-1], atol=1e-5)
    tc = Transcoder(TranscoderConfig(d_in=6, d_out=5, d_sae=12, k=2, skip=True))
    tc.fit_init(x, y)
    with torch.no_grad():
        tc.W_dec.zero_()  # no latent writes anything: the prediction is the skip path alone
        np.testing.assert_allclose(tc(x).double().numpy(), xd @ sol, atol=1e-4)


def test_training_fits_the_mlp_and_the_skip_starts_at_least_squares(bridge):
    from sae.transcoder_job import harvest_pairs

    x, y = harvest_pairs(bridge, 0, TEXTS, max_tokens=32)
    for skip in (False, True):
        cfg = TranscoderConfig(d_in=32, d_out=32, d_sae=128, k=8, skip=skip, layer=0, batch_size=128,
                               n_tokens=60 * 128, lr=3e-3)
        res = train_transcoder(x, y, cfg)
        assert res.nmse_train < 0.5 and res.history[-1]["l0"] <= 8
        if skip:  # never worse than the affine map it starts from by much
            w, b = least_squares_skip(x, y)
            assert res.nmse_train < nmse(y, x @ w.T + b) + 0.05



def test_splicing_replaces_the_mlp_output_with_the_prediction(bridge):
    from sae.harvest import pad_batch, pad_id_of, tokenize
    from sae.lm_loss import causal_lm_loss_fn

    tc = Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=64, k=4, skip=True, layer=0))
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1)
    texts = HELD[:8]
    fn = causal_lm_loss_fn(bridge, 0, texts, max_tokens=32, site="mlp_out")
    input_ids, mask = pad_batch(tokenize(bridge.tokenizer, texts, 32), pad_id_of(bridge.tokenizer))
    mlp = bridge.original_model.model.layers[0].mlp
    direct = hf_loss_with_hook(bridge, input_ids, mask, mlp, lambda x, out: tc(x))
    clean = hf_loss_with_hook(bridge, input_ids, mask, mlp, lambda x, out: out)
    spliced = fn(Splice(tc))
    assert abs(spliced - direct) < 1e-4 * direct and abs(spliced - clean) > 1e-3


def test_sae_transcoder_end_to_end_and_bad_settings_before_boot(llama, monkeypatch):
    from app import api
    from sae import requests

    run = api.sae_transcoder(str(llama), 1, skip=True, k=4, expansion=4, n_tokens=30 * 128, batch_size=128,
                             texts=TEXTS, eval_texts=HELD, loss_docs=16, device="cpu")
    m = run.metrics
    assert run.cfg.kind == "skip_transcoder" and run.cfg.d_sae == 128 and m["nmse_train"] < 1
    from sae.harvest import boot
    from sae.transcoder_job import harvest_pairs

    xe, ye = harvest_pairs(boot(str(llama))[1], 1, HELD, max_tokens=128)
    with torch.no_grad():
        assert m["nmse"] == pytest.approx(nmse(ye, run.transcoder(xe)), rel=1e-5)
    assert m["loss_recovered"] == pytest.approx((m["loss_zero"] - m["loss_spliced"]) / (m["loss_zero"] - m["loss_clean"]))
    monkeypatch.setattr(requests, "booted", lambda *a, **k: (_ for _ in ()).throw(AssertionError("booted")))
    with pytest.raises(ConfigError, match=r"transcoder k=0: must be an integer 1 <= k"):
        api.sae_transcoder(str(llama), 1, k=0, texts=TEXTS)
    with pytest.raises(ConfigError, match=r"expansion=0"):
        api.sae_transcoder(str(llama), 1, expansion=0, texts=TEXTS)


def test_cli_transcoder_is_api_sae_transcoder(llama, tmp_path):
    import json

    from typer.testing import CliRunner

    from app import api
    from app.cli import app

    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    res = CliRunner().invoke(app, ["sae", "transcoder", str(llama), "--layer", "0", "--skip", "--k", "4",
                                   "--expansion", "2", "--tokens", "1280", "--batch-size", "128", "--texts",
                                   str(tmp_path / "t.txt"), "--json", "--device", "cpu"])
    assert res.exit_code == 0, (res.output, repr(res.exception))
    out = json.loads(res.stdout)
    run = api.sae_transcoder(str(llama), 0, skip=True, k=4, expansion=2, n_tokens=1280, batch_size=128,
                             texts=TEXTS, device="cpu")
    assert out["config"] == run.cfg.to_dict() and out["metrics"] == pytest.approx(run.metrics)
    assert out["key"] == run.key  # the command stored it; the API call was served that entry


def test_splicing_on_post_ln_bert_matches_hf_hooks():
    """MiniLM: the splice replaces output.dense's result (before the residual add and LayerNorm) with the
    transcoder's prediction from the intermediate layer's input, exactly as HF forward hooks do."""
    from sae.harvest import boot, pad_batch, pad_id_of, tokenize

    _, bridge = boot("minilm")
    tc = Transcoder(TranscoderConfig(d_in=384, d_out=384, d_sae=96, k=8, skip=True, layer=2))
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.05)
    input_ids, mask = pad_batch(tokenize(bridge.tokenizer, HELD[:4], 32), pad_id_of(bridge.tokenizer))
    with torch.no_grad():
        spliced = bridge.run_with_hooks(input_ids, fwd_hooks=Splice(tc).hooks(), attention_mask=mask)
        clean = bridge.run_with_hooks(input_ids, fwd_hooks=[], attention_mask=mask)
    lay, seen = bridge.original_model.bert.encoder.layer[2], {}
    hooks = [lay.intermediate.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0])),
             lay.output.dense.register_forward_hook(lambda m, inp, out: tc(seen["x"]))]
    try:
        with torch.no_grad():
            direct = bridge.original_model(input_ids=input_ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()
    spliced, clean = (getattr(t, "logits", t) for t in (spliced, clean))
    assert torch.allclose(spliced, direct, atol=1e-4 * float(direct.abs().max()))
    assert (spliced - clean).abs().max() > 1e-2


def test_training_does_not_depend_on_the_activation_scales():
    """Inputs x 100 and outputs x 0.01 train the same transcoder, its predictions scaled by 0.01."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 8, generator=g)
    y = torch.relu(x @ torch.randn(8, 16, generator=g)) @ torch.randn(16, 6, generator=g)
    cfg = TranscoderConfig(d_in=8, d_out=6, d_sae=32, k=4, skip=True, batch_size=256, n_tokens=40 * 256)
    a, b = train_transcoder(x, y, cfg), train_transcoder(100 * x, 0.01 * y, cfg)
    with torch.no_grad():
        pa, pb = a.transcoder(x), b.transcoder(100 * x)
    assert torch.allclose(0.01 * pa, pb, atol=1e-4 * float(pb.abs().max()))
    assert a.nmse_train == pytest.approx(b.nmse_train, rel=1e-3) and a.nmse_train < 0.5
