"""Offline SAE evaluation through the runner (``sae.eval_pipeline``): ground-truth runs and sparse probes
stored once and served again, read back by stored_/load_/find_, scores recomputed independently from the
stored SAE parameters, every supported architecture in the table, bad settings refused before any work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError
from analysis.run import NotStoredError
from analysis.store import entry_key
from sae import eval_pipeline as ep
from sae import groundtruth_job
from sae.config import ARCHITECTURES, SAEConfig
from sae.ground_truth import score
from sae.groundtruth_job import architecture_fields, synthetic_fingerprint
from sae.model import SAE
from sae.synthetic import SyntheticSpec, dictionary, sample

SPEC = SyntheticSpec(n_features=32, d_in=16, mean_l0=3.0, n_parents=2, n_children=2, n_correlated_pairs=2)
TINY = dict(spec=SPEC, n_train=4000, n_eval=1500, n_tokens=60 * 256, batch_size=256)


def _same(a: dict, b: dict) -> bool:
    """Equal metric dicts, NaN equal to NaN (a score is NaN when nothing qualifies, e.g. no parent recovered)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


@pytest.fixture
def boom(monkeypatch):
    def install(module, name):
        def fail(*a, **k):
            raise AssertionError(f"{module.__name__}.{name} was called: the stored result was not served")
        monkeypatch.setattr(module, name, fail)
    return install


def test_groundtruth_round_trip_and_independent_rescoring(store, boom):
    r = ep.sae_groundtruth("topk", k=3, store=store, device="cpu", **TINY)
    assert r.architecture == "topk" and len(r.features) == SPEC.n_features
    rows = ep.stored_sae_groundtruth(store=store)
    assert len(rows) == 1 and rows[0].fingerprint == synthetic_fingerprint(SPEC)
    job = ep._gt_job("topk", SPEC, None, 3, None, 4000, 1500, 60 * 256, 256, 0, 0.9, {})
    assert rows[0].key == entry_key(rows[0].fingerprint, "sae-groundtruth", job.store_params(), "sae-groundtruth-1")
    # The stored SAE, rebuilt from its parameters, gives the stored scores when scored again here.
    cfg = SAEConfig.from_dict(r.meta["cfg"])
    sae = SAE(cfg)
    sae.load_state_dict({n: torch.from_numpy(v) for n, v in r.params.items()})
    held = sample(SPEC, 1500, seed=groundtruth_job.EVAL_SEED)
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(held.x.astype(np.float32))).double().numpy()
    again = score(sae.W_dec.detach().double().numpy(), dictionary(SPEC), codes, held.coefficients, SPEC.parents,
                  [SPEC.children(p) for p in SPEC.parents]).scalars()
    for name in ("mcc", "precision", "recall", "absorption", "shrinkage", "mean_max_cosine"):
        assert r.metrics[name] == pytest.approx(again[name], rel=1e-9, nan_ok=True), name
    assert r.metrics["l0"] == pytest.approx((codes > 0).sum(1).mean())
    # Served from the store: nothing trains or samples again.
    boom(groundtruth_job, "sample")
    served = ep.sae_groundtruth("topk", k=3, store=store, device="cpu", **TINY)
    assert _same(served.metrics, r.metrics)
    assert _same(ep.load_sae_groundtruth(rows[0].key, store=store).metrics, r.metrics)
    assert _same(ep.find_sae_groundtruth("topk", k=3, store=store, **TINY).metrics, r.metrics)
    assert ep.find_sae_groundtruth("topk", k=2, store=store, **TINY) is None
    with pytest.raises(NotStoredError):
        ep.load_sae_groundtruth("f" * 64, store=store)
    table = ep.groundtruth_rows(store=store)
    assert table["architecture"].tolist() == ["topk"] and table["mcc"].iloc[0] == r.metrics["mcc"]


def test_the_table_scores_every_supported_architecture(store):
    table = ep.sae_groundtruth_table(store=store, device="cpu", **TINY)
    assert table["architecture"].tolist() == list(ARCHITECTURES)
    for col in ("l0", "nmse", "mcc", "precision", "recall", "absorption", "shrinkage"):
        assert col in table
    assert table["mcc"].between(0, 1).all() and table["recall"].between(0, 1).all()


def test_architecture_fields_follow_the_config():
    assert architecture_fields("topk", k=5)["k"] == 5
    relu = architecture_fields("relu", k=5, l1_coefficient=2.0)
    assert relu["l1_coefficient"] == 2.0 and "k" not in relu
    with pytest.raises(ConfigError, match="architecture 'nope' is unknown"):
        architecture_fields("nope")


@pytest.mark.parametrize("kw, match", [
    ({"n_train": 0}, "n_train=0 must be an integer >= 1"),
    ({"k": 99}, "k=99"),
    ({"d_sae": 0}, "d_sae=0"),
], ids=str)
def test_bad_settings_fail_before_sampling(kw, match, store, boom):
    boom(groundtruth_job, "sample")
    with pytest.raises(ConfigError, match=match):
        ep.sae_groundtruth("topk", store=store, **{**TINY, **kw})


# -- probes on a stored SAE of a tiny model ------------------------------------------------------------
WORDS = ["tensor", "array", "frame", "model", "value", "index", "shape", "file", "path", "list", "json", "string"]
TRAIN = [f"the {a} of a {b} returns a new {c}" for a in WORDS for b in WORDS[:8] for c in WORDS[:3]][:240]


@pytest.fixture(autouse=True)
def _activations(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    return tmp_path / "acts"


def test_probe_round_trip(tmp_path, store, boom, monkeypatch):
    from analysis import corpus
    from app import api
    from sae import probe_job

    # A small stand-in for the installed packages' docstrings (walking them all takes ~10 s).
    docs = [corpus.DocText(f"Return the {a} of the {b}, as a new {a}.", pkg, f"{pkg}.f{i}")
            for i, (a, b) in enumerate(zip(WORDS * 2, WORDS[::-1] * 2)) for pkg in ("numpy", "pandas")]
    monkeypatch.setattr(corpus, "docstring_corpus", lambda *a, **k: docs)

    llama = make_tiny_llama(tmp_path / "llama")
    key = api.sae_train(str(llama), layer=0, texts=TRAIN, d_sae=32, k=4, n_tokens=20 * 128, batch_size=128,
                        store=store, device="cpu").key
    res = ep.sae_probe(key, task="code", ks=(1, 2), per_class=12, store=store, device="cpu")
    assert set(res.summary) == {"sae k=1", "sae k=2", "raw"}
    assert res.meta["classes"] == ["code", "prose"] and res.table["accuracy"].between(0, 1).all()
    assert len(ep.stored_sae_probe(store=store)) == 1
    boom(probe_job, "task_texts")
    assert ep.sae_probe(key, task="code", ks=(1, 2), per_class=12, store=store, device="cpu").summary == res.summary
    assert ep.find_sae_probe(key, task="code", ks=(1, 2), per_class=12, store=store).summary == res.summary
    assert ep.find_sae_probe(key, task="package", store=store) is None
    with pytest.raises(ConfigError, match="probe task 'nope' is unknown"):
        ep.sae_probe(key, task="nope", store=store)
    with pytest.raises(ConfigError, match=r"ks=\[0\]"):
        ep.sae_probe(key, task="code", ks=(0,), store=store)


def test_probe_reads_the_site_the_sae_was_trained_on(tmp_path, store, monkeypatch):
    """A resid_post SAE is probed on resid_post activations, not hook_z (the tiny Llama's hook_z has the
    residual width, so reading the wrong site would not fail on shapes; harvesting at each site is checked
    against run_with_cache in test_sae_sites)."""
    from analysis import corpus
    from app import api
    from sae import harvest as hv

    docs = [corpus.DocText(f"Return the {a} of the {b}.", pkg, f"{pkg}.f{i}")
            for i, (a, b) in enumerate(zip(WORDS, WORDS[::-1])) for pkg in ("numpy", "pandas")]
    monkeypatch.setattr(corpus, "docstring_corpus", lambda *a, **k: docs)
    llama = make_tiny_llama(tmp_path / "llama")
    key = api.sae_train(str(llama), layer=0, site="resid_post", texts=TRAIN, d_sae=32, k=4, n_tokens=20 * 128,
                        batch_size=128, store=store, device="cpu").key
    sites: list[str] = []
    real = hv.harvest
    monkeypatch.setattr(hv, "harvest", lambda *a, **k: sites.append(k.get("site", "hook_z")) or real(*a, **k))
    ep.sae_probe(key, task="code", ks=(1,), per_class=8, store=store, device="cpu")
    assert sites == ["resid_post"]
