"""The stored ``circuits`` analysis: exact against dense float64 products of weights read independently of the
TransformerBridge (MiniLM's checkpoint tensors; a grouped-query tiny Llama's own q_proj/k_proj/v_proj/o_proj),
the store round trip and its key, and the read-back conventions (stored/load/find)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.circuits import pipeline, spectra
from analysis.circuits.pipeline import (CircuitParams, circuits, find_circuits, load_circuits,
                                        stored_circuits)
from analysis.errors import ConfigError, SourceError
from analysis.run import NotStoredError
from analysis.store import Result, Store

RTOL = 1e-10


def dense_spectrum(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Top k singular values of the dense float64 product a @ b (d_model x d_model)."""
    return np.linalg.svd(a.astype(np.float64) @ b.astype(np.float64), compute_uv=False)[:k]


def assert_row_matches(row: pd.Series, s: np.ndarray, d_model: int) -> None:
    """kappa, stable rank, effective rank of a stored row against numpy on the dense spectrum's top values."""
    p = s / s.sum()
    singular = s[-1] <= s[0] * d_model * np.finfo(np.float64).eps
    np.testing.assert_allclose(row["s_max"], s[0], rtol=RTOL)
    np.testing.assert_allclose(row["s_min"], s[-1], rtol=1e-8, atol=s[0] * 1e-13)
    assert row["kappa"] == math.inf if singular else np.isclose(row["kappa"], s[0] / s[-1], rtol=RTOL, atol=0)
    np.testing.assert_allclose(row["stable_rank"], (s**2).sum() / s[0] ** 2, rtol=RTOL)
    np.testing.assert_allclose(row["effective_rank"], np.exp(-(p * np.log(p)).sum()), rtol=RTOL)


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("circuits-store"))


@pytest.fixture(scope="module")
def minilm_circuits(minilm_store):
    return circuits("minilm", store=minilm_store, device="cpu")


def test_minilm_heads_match_dense_products_of_the_checkpoint_tensors(minilm_circuits, minilm):
    cs = minilm_circuits
    n_layers, n_heads, d_model, d_head = 6, 12, 384, 32
    assert (cs.meta["n_heads"], cs.meta["n_kv_heads"], cs.meta["d_model"], cs.meta["d_head"]) == \
        (n_heads, n_heads, d_model, d_head)
    assert list(cs.table.columns) == pipeline.COLUMNS and len(cs.table) == n_layers * n_heads * 2
    table = cs.table.set_index(["layer", "head", "circuit"])
    for layer in range(n_layers):
        w = {n: minilm.tensor(f"encoder.layer.{layer}.attention.{t}.weight").double().numpy()  # (out, in)
             for n, t in [("q", "self.query"), ("k", "self.key"), ("v", "self.value"), ("o", "output.dense")]}
        for head in range(n_heads):
            rows = slice(head * d_head, (head + 1) * d_head)
            qk = dense_spectrum(w["q"][rows].T, w["k"][rows], d_head)  # W_Q[h] (d_model, d_head) @ W_K[h]ᵀ
            ov = dense_spectrum(w["v"][rows].T, w["o"][:, rows].T, d_head)  # W_V[h] @ W_O[h] (d_head, d_model)
            for name, s in (("QK", qk), ("OV", ov)):
                np.testing.assert_allclose(cs.spectrum(layer, head, name), s, rtol=RTOL, atol=0)
                assert_row_matches(table.loc[(layer, head, name)], s, d_model)
    assert (cs.table["kv_head"] == cs.table["head"]).all()  # no grouping in BERT


def test_results_are_stored_and_served_without_recomputing(minilm_circuits, minilm_store, minilm, monkeypatch):
    (entry,) = stored_circuits(store=minilm_store)
    assert (entry.analysis, entry.code_version, entry.params, entry.fingerprint) == \
        ("circuits", "circuits-1", {"weights": "raw"}, minilm.fingerprint)
    assert stored_circuits(minilm.fingerprint[:8], store=minilm_store) == [entry]
    assert stored_circuits("0" * 32, store=minilm_store) == []

    def boom(*a, **k):
        raise AssertionError("recomputed instead of served from the store")

    monkeypatch.setattr(spectra, "circuit_singular_values", boom)
    for again in (circuits("minilm", store=minilm_store), load_circuits(entry.key, store=minilm_store),
                  load_circuits(entry.key[:10], store=minilm_store), find_circuits(minilm.fingerprint, minilm_store)):
        pd.testing.assert_frame_equal(again.table, minilm_circuits.table)
        assert again.singular_values.keys() == minilm_circuits.singular_values.keys()
        for name, values in again.singular_values.items():
            np.testing.assert_array_equal(values, minilm_circuits.singular_values[name])
            assert not values.flags.writeable
    with pytest.raises(AssertionError, match="recomputed"):
        circuits("minilm", store=minilm_store, refresh=True)
    assert [m.label for m in minilm_store.models()] == ["minilm"]


def test_grid_is_layers_by_heads(minilm_circuits):
    grid = minilm_circuits.grid("stable_rank", "ov")
    assert grid.shape == (6, 12) and list(grid.index) == list(range(6)) and list(grid.columns) == list(range(12))
    ov = minilm_circuits.table[minilm_circuits.table["circuit"] == "OV"]
    assert grid.loc[4, 7] == ov[(ov["layer"] == 4) & (ov["head"] == 7)]["stable_rank"].item()
    with pytest.raises(ConfigError, match="unknown metric 'alpha'; choose one of kappa"):
        minilm_circuits.grid("alpha")
    with pytest.raises(ConfigError, match="unknown circuit 'VO'; choose one of QK, OV"):
        minilm_circuits.grid("kappa", "VO")


def test_read_back_never_computes_and_absent_keys_raise(store):
    assert stored_circuits(store=store) == [] and find_circuits("f" * 32, store) is None
    with pytest.raises(NotStoredError, match="no stored result has key"):
        load_circuits("0" * 64, store=store)
    other = store.put("f" * 32, "spectra", {}, "spectra-1", Result(meta={"x": 1})).key
    with pytest.raises(NotStoredError, match="holds a 'spectra' result, not 'circuits'"):
        load_circuits(other, store=store)
    assert store.list(analysis="circuits") == []


def test_an_entry_stored_under_the_literal_key_is_read(store, rng):
    """The store key is pinned: name "circuits", code version "circuits-1", params {"weights": "raw"}."""
    table = pd.DataFrame([{"layer": 0, "head": 0, "kv_head": 0, "circuit": c, "s_max": 2.0, "s_min": 1.0,
                           "kappa": 2.0, "stable_rank": 1.25, "effective_rank": 1.9} for c in ("QK", "OV")])
    arrays = {"QK.0": np.array([[2.0, 1.0]]), "OV.0": np.array([[2.0, 1.0]])}
    key = store.put("a" * 32, "circuits", {"weights": "raw"}, "circuits-1", Result(table=table, arrays=arrays,
                                                                                  meta={"layers": [0]})).key
    assert CircuitParams().store_params() == {"weights": "raw"}
    for got in (find_circuits("a" * 32, store), load_circuits(key, store)):
        pd.testing.assert_frame_equal(got.table, table)
        np.testing.assert_array_equal(got.spectrum(0, 0, "OV"), [2.0, 1.0])


def test_bad_arguments_fail_before_any_work(tmp_path, minilm, store):
    with pytest.raises(ConfigError, match="weights='folded' is not supported; use one of raw"):
        CircuitParams(weights="folded")
    bare = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4)}, str(bare))
    with pytest.raises(SourceError, match="needs a Hugging Face model directory"):
        circuits(bare, store=store)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        circuits("minilm", store=store, device="tpu")
    assert store.list() == []


# ------------------------------------------------------------------------------------ grouped-query Llama
N_HEADS, N_KV, D_MODEL, N_LAYERS = 4, 2, 32, 2


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama with 4 query heads sharing 2 key/value heads, saved with a tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from _tiny_llama import make_tiny_llama

    root = tmp_path_factory.mktemp("gqa")
    tok = AutoTokenizer.from_pretrained(make_tiny_llama(root / "base"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL,
                          num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
                          max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.2)
    model.save_pretrained(root / "gqa")
    tok.save_pretrained(root / "gqa")
    return root / "gqa"


def test_grouped_query_heads_share_k_and_v_and_match_the_hf_projections(gqa_llama, store):
    from transformers import LlamaForCausalLM

    ticks: list[str] = []
    cs = circuits(gqa_llama, store=store, progress=lambda done, total, label: ticks.append(label))
    d_head = D_MODEL // N_HEADS
    assert (cs.meta["n_heads"], cs.meta["n_kv_heads"], cs.meta["d_head"]) == (N_HEADS, N_KV, d_head)
    assert ticks[0] == "boot: loading the model" and "QK and OV of the 4 heads of layer 1" in ticks
    qk = cs.table[cs.table["circuit"] == "QK"]
    assert qk[qk["layer"] == 0]["kv_head"].tolist() == [0, 0, 1, 1]
    hf = LlamaForCausalLM.from_pretrained(gqa_llama, torch_dtype=torch.float64)
    table = cs.table.set_index(["layer", "head", "circuit"])
    for layer in range(N_LAYERS):
        attn = hf.model.layers[layer].self_attn
        q, k, v, o = (getattr(attn, n).weight.detach().numpy() for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert k.shape == (N_KV * d_head, D_MODEL)  # grouped in the checkpoint
        for head in range(N_HEADS):
            group = head // (N_HEADS // N_KV)  # transformers' repeat_kv
            hq, hk = slice(head * d_head, (head + 1) * d_head), slice(group * d_head, (group + 1) * d_head)
            want = {"QK": dense_spectrum(q[hq].T, k[hk], d_head), "OV": dense_spectrum(v[hk].T, o[:, hq].T, d_head)}
            for name, s in want.items():
                np.testing.assert_allclose(cs.spectrum(layer, head, name), s, rtol=RTOL, atol=0)
                assert_row_matches(table.loc[(layer, head, name)], s, D_MODEL)
        # the two query heads of a group read the same K: the other group's K gives other values
        other = dense_spectrum(q[:d_head].T, k[d_head:2 * d_head], d_head)
        assert not np.allclose(cs.spectrum(layer, 0, "QK"), other, rtol=1e-3)


def test_grouped_query_values_agree_with_the_bridge_factored_matrices(gqa_llama, store):
    """TransformerLens's own QK / OV FactoredMatrix of the same bridge (its W_K repeated per query head)."""
    from analysis.run import context
    from analysis.sources import open_source

    cs = circuits(gqa_llama, store=store)
    bridge = context(device="cpu").bridge(open_source(gqa_llama))
    for name, fm in (("QK", bridge.QK), ("OV", bridge.OV)):
        dense = fm.A.detach().double() @ fm.B.detach().double()  # (n_layers, n_heads, d_model, d_model)
        s = torch.linalg.svdvals(dense)[..., :D_MODEL // N_HEADS].numpy()
        for layer in range(N_LAYERS):
            np.testing.assert_allclose(cs.singular_values[f"{name}.{layer}"], s[layer], rtol=RTOL, atol=0)
