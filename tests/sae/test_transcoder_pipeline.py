"""Stored transcoders (``sae.transcoder_pipeline``): the store round trip against the trained tensors
themselves (bit for bit), a repeat served without booting, a key that changes with every setting, the
store intact after a failure inside training, and the masked harvest of masked LMs against the
tokenizer, a binomial count and ``run_with_cache`` of the masked ids."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_llama import TOY_HELD as HELD
from _tiny_llama import TOY_TEXTS as TEXTS
from _tiny_bert import make_tiny_bert
from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError
from analysis.run import NotStoredError
from analysis.store import Store, entry_key

SMALL = {"k": 4, "expansion": 4, "n_tokens": 20 * 128, "batch_size": 128, "texts": TEXTS, "eval_texts": HELD,
         "loss_docs": 8, "device": "cpu"}
# ~55 WordPiece tokens per text: a text rarely goes unmasked, so "at least one [MASK] per text" barely biases the rate
LONG = [". ".join(TEXTS[i:i + 6]) for i in range(0, 120, 3)]
LONG_HELD = [". ".join(HELD[i:i + 4]) for i in range(0, 28, 2)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT with MiniLM's WordPiece tokenizer (a masked LM), bootable offline."""
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "model", max_positions=160)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _capture_training(monkeypatch) -> list:
    """Patch the job's trainer to keep a copy of every transcoder it trains (the independent truth)."""
    from sae import transcoder_job

    real, seen = transcoder_job.train_transcoder, []

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append({n: t.detach().clone() for n, t in res.transcoder.state_dict().items()})
        return res

    monkeypatch.setattr(transcoder_job, "train_transcoder", spy)
    return seen


def _no_boot(monkeypatch) -> None:
    from sae import requests

    monkeypatch.setattr(requests, "booted", lambda *a, **k: (_ for _ in ()).throw(AssertionError("booted")))


def test_stored_transcoder_reloads_bit_exactly_and_a_repeat_is_served(llama, tmp_path, monkeypatch):
    from app import api

    store = tmp_path / "store"
    seen = _capture_training(monkeypatch)
    run = api.sae_transcoder(str(llama), 1, skip=True, store=store, **SMALL)
    assert len(seen) == 1 and len(run.key) == 64
    (info,) = api.stored_sae_transcoders(store=store)
    assert info.key == run.key and info.analysis == "sae-transcoder" and info.params["layer"] == 1
    for key in (run.key, run.key[:10]):
        got = api.load_sae_transcoder(key, store=store)
        assert got.key == run.key
        state = got.transcoder.state_dict()
        assert set(state) == set(seen[0]) >= {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip"}
        for name, want in seen[0].items():  # the tensors training produced, bit for bit
            assert state[name].dtype == want.dtype and torch.equal(_bits(state[name]), _bits(want)), name
        assert got.metrics == run.metrics and got.history == run.history and len(got.history) >= 1
        assert got.cfg.to_dict() == run.cfg.to_dict() == info.meta["cfg"]
    assert math.isfinite(run.metrics["loss_recovered"]) and run.metrics["l0"] <= 4

    _no_boot(monkeypatch)  # the same call again: from the store, no model, no training
    again = api.sae_transcoder(str(llama), 1, skip=True, store=store, **SMALL)
    assert again.key == run.key and len(seen) == 1
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(again.transcoder.state_dict().values(),
                                                                 run.transcoder.state_dict().values()))
    found = api.find_sae_transcoder(str(llama), 1, skip=True, store=store, **{k: v for k, v in SMALL.items()
                                                                              if k != "device"})
    assert found is not None and found.key == run.key
    assert api.find_sae_transcoder(str(llama), 1, skip=False, store=store, texts=TEXTS) is None
    with pytest.raises(AssertionError, match="booted"):  # refresh trains again
        api.sae_transcoder(str(llama), 1, skip=True, store=store, refresh=True, **SMALL)
    with pytest.raises(NotStoredError, match="no stored result has key"):
        api.load_sae_transcoder("0" * 64, store=store)


def test_load_refuses_an_entry_of_another_analysis(tmp_path):
    from analysis.store import Result
    from app import api

    st = Store(tmp_path / "s")
    other = st.put("f" * 64, "circuits", {}, "circuits-1", Result(meta={"x": 1}))
    with pytest.raises(NotStoredError, match="holds a 'circuits' result, not 'sae-transcoder'"):
        api.load_sae_transcoder(other.key, store=st)


def _key(source, layer, **settings) -> str:
    from sae.transcoder_pipeline import TRANSCODER, transcoder_job

    src, job = transcoder_job(source, layer, **settings)
    return entry_key(src.fingerprint, TRANSCODER.name, job.store_params(), TRANSCODER.code_version)


def _bumped(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2
    if value is None:
        return 5
    return None


def test_the_key_changes_with_every_setting(llama, tiny_bert, tmp_path):
    from sae import transcoder as tmod
    from sae.transcoder import TranscoderConfig

    base = {"texts": TEXTS}
    keys = {"base": _key(str(llama), 1, **base)}
    assert _key(str(llama), 1, **base) == keys["base"]  # deterministic
    assert _key(str(llama), 1, k=32, expansion=8, loss=True, **base) == keys["base"]  # defaults spelled out
    variants = {"layer": dict(layer=0), "skip": dict(skip=True), "k": dict(k=8), "expansion": dict(expansion=4),
                "d_sae": dict(d_sae=96), "n_tokens": dict(n_tokens=1000), "batch_size": dict(batch_size=64),
                "lr": dict(lr=3e-3), "seed": dict(seed=1), "texts": dict(texts=TEXTS[:-1]),
                "eval_texts": dict(eval_texts=HELD), "per_package": dict(texts=None, per_package=5),
                "max_tokens": dict(max_tokens=64), "loss": dict(loss=False), "loss_docs": dict(loss_docs=9)}
    for name, change in variants.items():
        settings = {**base, **change}
        layer = settings.pop("layer", 1)
        keys[name] = _key(str(llama), layer, **settings)
    # every field of the config (those another architecture adds included), by its type
    for f in dataclasses.fields(TranscoderConfig):
        if f.name in ("d_in", "d_out", "d_sae", "layer", "skip", "k", "lr", "batch_size", "n_tokens", "seed"):
            continue
        new = _bumped(f.default)
        if new is None and f.name == "architecture":
            new = next(a for a in getattr(tmod, "ARCHITECTURES", ()) if a != f.default)
        assert new is not None, f"no test value for the new config field {f.name}"
        keys[f"cfg.{f.name}"] = _key(str(llama), 1, **base, **{f.name: new})
    other = make_tiny_llama(tmp_path / "other", seed=1)  # another model: another fingerprint
    keys["model"] = _key(str(other), 1, **base)
    # masked LMs: masking on by default; off, or at another rate, is another key
    keys["bert"] = _key(str(tiny_bert), 1, **base)
    assert _key(str(tiny_bert), 1, mask=True, **base) == keys["bert"]
    keys["bert mask off"] = _key(str(tiny_bert), 1, mask=False, **base)
    keys["bert mask rate"] = _key(str(tiny_bert), 1, mask_rate=0.3, **base)
    assert len(set(keys.values())) == len(keys), [n for n in keys if list(keys.values()).count(keys[n]) > 1]


def test_bad_settings_fail_before_the_model_boots(llama, tiny_bert, monkeypatch):
    from app import api

    _no_boot(monkeypatch)
    with pytest.raises(ConfigError, match=r"mask=True: .* is not a masked LM"):
        api.sae_transcoder(str(llama), 1, mask=True, texts=TEXTS)
    with pytest.raises(ConfigError, match=r"mask_rate=1.5: must be a number in \(0, 1\)"):
        api.sae_transcoder(str(tiny_bert), 1, mask_rate=1.5, texts=TEXTS)
    with pytest.raises(ConfigError, match=r"unknown transcoder setting\(s\) \['nope'\]"):
        api.sae_transcoder(str(llama), 1, nope=3, texts=TEXTS)
    with pytest.raises(ConfigError, match=r"transcoder d_in is set from the model"):
        api.sae_transcoder(str(llama), 1, d_in=3, texts=TEXTS)
    with pytest.raises(ConfigError, match=r"transcoder lr=-1"):
        api.find_sae_transcoder(str(llama), 1, lr=-1.0, texts=TEXTS)


def test_a_failure_inside_training_leaves_the_store_intact(llama, tmp_path, monkeypatch):
    from app import api
    from sae import transcoder_job

    store = tmp_path / "store"
    a = api.sae_transcoder(str(llama), 1, store=store, **SMALL)
    b = api.sae_transcoder(str(llama), 0, skip=True, store=store, **SMALL)
    before = {e.key: e.created for e in api.stored_sae_transcoders(store=store)}
    weights = {r.key: {n: t.clone() for n, t in r.transcoder.state_dict().items()} for r in (a, b)}
    real = transcoder_job.train_transcoder

    def fails_midway(x, y, cfg, *, progress=None, **kw):
        def stop(done, total, label):  # the first progress report of the training loop
            raise RuntimeError(f"disk on fire at step {done} of {total}")
        return real(x, y, cfg, progress=stop, **kw)

    monkeypatch.setattr(transcoder_job, "train_transcoder", fails_midway)
    # retraining both stored ones (their very keys) and a new one: each fails inside its training loop
    for layer, settings in ((1, dict(refresh=True)), (0, dict(skip=True, refresh=True)), (1, dict(seed=7))):
        with pytest.raises(RuntimeError, match="disk on fire at step"):
            api.sae_transcoder(str(llama), layer, store=store, **{**SMALL, **settings})
    assert {e.key: e.created for e in api.stored_sae_transcoders(store=store)} == before
    for key, want in weights.items():
        got = api.load_sae_transcoder(key, store=store).transcoder.state_dict()
        assert all(torch.equal(_bits(got[n]), _bits(t)) for n, t in want.items())
    assert Store(store).check().ok


# -- masked LMs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_bridge(tiny_bert):
    from sae.harvest import boot

    return boot(str(tiny_bert))[1]


def test_masked_harvest_masks_15_percent_of_the_real_tokens(bert_bridge):
    from sae.harvest import pad_batch, pad_id_of, tokenize
    from sae.transcoder_job import harvest_masked_pairs, harvest_pairs

    tok = bert_bridge.tokenizer
    mp = harvest_masked_pairs(bert_bridge, 1, LONG, mask_rate=0.15, seed=3)
    plain_ids = tokenize(tok, LONG, 128)
    plain = torch.tensor([i for ids in plain_ids for i in ids])
    assert mp.token_ids.shape == plain.shape == mp.masked.shape and mp.x.shape[0] == len(plain)
    special = torch.isin(plain, torch.tensor([tok.cls_token_id, tok.sep_token_id]))
    assert int(special.sum()) == 2 * len(LONG) and not mp.masked[special].any()  # [CLS], [SEP] never masked
    assert torch.equal(mp.token_ids == tok.mask_token_id, mp.masked)  # masked positions read [MASK] ...
    assert torch.equal(mp.token_ids[~mp.masked], plain[~mp.masked])  # ... the others the text's own tokens
    assert not (plain == tok.mask_token_id).any()
    n = int((~special).sum())
    share = float(mp.masked.sum()) / n
    assert abs(share - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n), (share, n)  # binomial: 4 standard deviations
    assert harvest_masked_pairs(bert_bridge, 1, LONG, mask_rate=0.15, seed=4).masked.tolist() != mp.masked.tolist()
    # the pairs are the MLP's input and output on the masked ids (run_with_cache), not on the plain text
    lengths = [len(ids) for ids in plain_ids]
    rows = list(torch.split(mp.token_ids, lengths))
    input_ids, mask = pad_batch([r.tolist() for r in rows], pad_id_of(tok))
    names = ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
    with torch.no_grad():
        _, c = bert_bridge.run_with_cache(input_ids, attention_mask=mask, names_filter=lambda nm: nm in names)
    for name, got in zip(names, (mp.x, mp.y)):
        want = torch.cat([c[name][i, :n_i] for i, n_i in enumerate(lengths)])
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))
    x_plain, _ = harvest_pairs(bert_bridge, 1, LONG)
    assert (mp.x[mp.masked] - x_plain[mp.masked]).norm(dim=1).min() > 1e-3


def test_masked_lm_transcoders_train_on_masked_text_by_default(tiny_bert, bert_bridge, tmp_path):
    from app import api
    from sae.transcoder import nmse
    from sae.transcoder_job import EVAL_MASK_SEED, MASK_RATE, harvest_masked_pairs

    store = tmp_path / "store"
    settings = dict(k=4, expansion=2, n_tokens=30 * 128, batch_size=128, texts=LONG, eval_texts=LONG_HELD, loss=False,
                    store=store, device="cpu")
    masked = api.sae_transcoder(str(tiny_bert), 1, **settings)
    plain = api.sae_transcoder(str(tiny_bert), 1, mask=False, **settings)
    assert masked.key != plain.key
    h = masked.meta["harvest"]
    assert h["mask_rate"] == MASK_RATE and abs(h["masked_fraction"] - 0.15) < 0.03
    assert plain.meta["harvest"]["mask_rate"] == 0.0 and plain.meta["harvest"]["masked_fraction"] == 0.0
    held = harvest_masked_pairs(bert_bridge, 1, LONG_HELD, mask_rate=MASK_RATE, seed=EVAL_MASK_SEED)
    for run in (masked, plain):
        with torch.no_grad():
            pred = run.transcoder(held.x)
        assert run.metrics["nmse_mask"] == pytest.approx(nmse(held.y[held.masked], pred[held.masked]), rel=1e-5)
        assert run.metrics["nmse_other"] == pytest.approx(nmse(held.y[~held.masked], pred[~held.masked]), rel=1e-5)
    table = api.sae_transcoders(store=store).set_index("key")
    assert table.loc[masked.key, "masked"] and not table.loc[plain.key, "masked"]
    assert "(k=4, masked)" in table.loc[masked.key, "name"]
    np.testing.assert_allclose(table.loc[masked.key, "nmse_mask"], masked.metrics["nmse_mask"])
