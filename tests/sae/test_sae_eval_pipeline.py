"""Offline SAE evaluation through the runner (``sae.eval_pipeline``): ground-truth runs and sparse probes
stored once and served again, read back by stored_/load_/find_, scores recomputed independently from the
stored SAE parameters, every supported architecture in the table at its default sparsity (a valid config each;
topk/relu store keys as before), the ranking against a pairwise brute force, bad settings refused before any work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError
from analysis.run import NotStoredError
from analysis.store import entry_key
from sae import eval_pipeline as ep
from sae import groundtruth_job
from sae.config import ARCHITECTURES, K_ARCHITECTURES, SAEConfig
from sae.ground_truth import score
from sae.groundtruth_job import (GT_SPARSITY, L0_TOLERANCE, architecture_fields, default_sparsity, ranked,
                                 synthetic_fingerprint)
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
    assert sorted(table["rank"]) == list(range(1, len(ARCHITECTURES) + 1))
    # each row ran at its architecture's default sparsity, and says which
    for r in table.to_dict(orient="records"):
        want = default_sparsity(r["architecture"], SPEC)
        got = {"k": r["k"], "l1_coefficient": r["l1_coefficient"], "l0_coefficient": r["l0_coefficient"]}
        assert {n: got[n] for n in want if n in got} == {n: v for n, v in want.items() if n in got}, r["architecture"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_has_a_valid_default_sparsity(arch):
    """The default ground-truth run of every architecture is a valid SAEConfig carrying its default sparsity:
    k = the spec's expected L0 (rounded) for the TopK family, the tuned coefficients for the others."""
    spec = SyntheticSpec()
    job = ep._gt_job(arch, None, None, None, None, 100, 100, 4096, 4096, 0, 0.9, {})
    cfg = job.config()  # SAEConfig's own checks
    assert cfg.architecture == arch and cfg.d_sae == spec.n_features and cfg.d_in == spec.d_in
    own = default_sparsity(arch, spec)
    assert own, f"{arch} has no default sparsity: add it to sae.groundtruth_job.GT_SPARSITY"
    for name, value in own.items():
        assert getattr(cfg, name) == value and job.sae_fields[name] == value, name
    if arch in K_ARCHITECTURES:
        assert own == {"k": round(spec.expected_l0)} and abs(cfg.k - spec.expected_l0) <= 0.5
    else:
        assert own == GT_SPARSITY[arch]


def test_explicit_settings_override_the_default_sparsity():
    gated = ep._gt_job("gated", None, None, None, 2.5, 100, 100, 4096, 4096, 0, 0.9, {})
    assert gated.config().l1_coefficient == 2.5
    jump = ep._gt_job("jumprelu", None, None, None, None, 100, 100, 4096, 4096, 0, 0.9, {"l0_coefficient": 0.7})
    assert jump.config().l0_coefficient == 0.7
    assert jump.config().jumprelu_init_threshold == GT_SPARSITY["jumprelu"]["jumprelu_init_threshold"]
    assert ep._gt_job("batchtopk", None, None, 4, None, 100, 100, 4096, 4096, 0, 0.9, {}).config().k == 4


@pytest.mark.parametrize("arch, sae", [
    ("topk", {"architecture": "topk", "k": 7}),
    ("relu", {"architecture": "relu", "l1_coefficient": 1.0}),
], ids=["topk", "relu"])
def test_default_store_keys_of_topk_and_relu_are_unchanged(arch, sae):
    """The settings the README's first table was stored under (k = 7; l1 = 1.0 at 8M tokens): the same key."""
    job = ep._gt_job(arch, None, None, None, None, **{n: ep.GT_DEFAULTS[n] for n in
                                                      ("n_train", "n_eval", "n_tokens", "batch_size", "seed")},
                     threshold=0.9, cfg_fields={})
    assert job.sae_fields == {**sae, "d_sae": 256, "n_tokens": 8_000_000, "batch_size": 4096, "seed": 0}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_sparsity_reaches_the_data_l0(arch, store):
    """The README's table: at the default setting (8M tokens, the default spec) each architecture's held-out L0
    is within L0_TOLERANCE of the data's expected L0, so the ranking compares at matched sparsity (~2-4 min each)."""
    r = ep.sae_groundtruth(arch, store=store, device="cpu")
    assert abs(r.metrics["l0"] / SyntheticSpec().expected_l0 - 1) <= L0_TOLERANCE, r.metrics["l0"]
    assert ep.sae_groundtruth_table([arch], store=store, device="cpu")["l0_matched"].all()  # served, ranked


def _brute_rank(rows: list[dict], tol: float) -> list[int]:
    """Rank by pairwise comparison: a row beats another when it is matched and the other is not, or both agree on
    that and its MCC (to 0.01) is higher, or equal with a lower NMSE; NaN counts as the worst value."""
    def better(a, b):
        ma, mb = abs(a["l0"] / a["expected_l0"] - 1) <= tol, abs(b["l0"] / b["expected_l0"] - 1) <= tol
        if ma != mb:
            return ma
        qa = -1.0 if np.isnan(a["mcc"]) else round(a["mcc"], 2)
        qb = -1.0 if np.isnan(b["mcc"]) else round(b["mcc"], 2)
        if qa != qb:
            return qa > qb
        na = np.inf if np.isnan(a["nmse"]) else a["nmse"]
        nb = np.inf if np.isnan(b["nmse"]) else b["nmse"]
        return na < nb
    return [1 + sum(better(o, r) for o in rows if o is not r) for r in rows]


def test_ranked_puts_matched_l0_first_then_mcc_then_nmse(rng):
    rows = [{"l0": 7.0, "expected_l0": 6.7, "mcc": 0.944, "nmse": 0.20},
            {"l0": 7.2, "expected_l0": 6.7, "mcc": 0.941, "nmse": 0.10},   # same MCC to 0.01: lower NMSE wins
            {"l0": 9.5, "expected_l0": 6.7, "mcc": 0.990, "nmse": 0.05},   # best scores, L0 42% too high: after
            {"l0": 6.0, "expected_l0": 6.7, "mcc": 0.900, "nmse": 0.30},
            {"l0": 6.5, "expected_l0": 6.7, "mcc": float("nan"), "nmse": 0.3}]
    for _ in range(5):
        rows.append({"l0": float(rng.uniform(4, 10)), "expected_l0": 6.7, "mcc": float(rng.uniform(0.8, 1.0)),
                     "nmse": float(rng.uniform(0, 1))})
    table = pd.DataFrame(rows)
    out = ranked(table, tolerance=0.15)
    assert out["rank"].tolist() == _brute_rank(rows, 0.15)
    assert out.loc[1, "rank"] < out.loc[0, "rank"] < out.loc[3, "rank"] and not out.loc[2, "l0_matched"]
    assert out.drop(columns=["rank", "l0_matched"]).equals(table)  # the rows themselves, in their order


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
