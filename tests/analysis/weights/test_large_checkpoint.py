"""The larger-than-memory benchmark's streaming checkpoint writer and its end-to-end run, at toy size."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from analysis.sources import open_source
from benchmarks import large_checkpoint as lc

TOY = dict(hidden=16, intermediate=24, heads=4, kv_heads=2, vocab=40)


@pytest.mark.parametrize("gb", [1.0, 6.0, 13.5])
def test_for_size_picks_the_most_layers_that_fit(gb):
    shape = lc.LlamaShape.for_size(gb)
    assert shape.n_bytes() <= gb * 1e9 < replace(shape, layers=shape.layers + 1).n_bytes()
    assert shape.largest_tensor_bytes() == 32000 * 2048 * 4  # the embedding (and lm_head)


def test_streamed_shards_hold_exactly_the_generated_tensors(tmp_path):
    shape = lc.LlamaShape(layers=2, **TOY)
    d = tmp_path / "ckpt"
    files = lc.write_checkpoint(d, shape, shard_bytes=4000, seed=3)
    assert len(files) >= 3 and all(f.is_file() for f in files)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    names = [n for n, _ in shape.tensors()]
    assert sorted(index["weight_map"]) == sorted(names)
    assert index["metadata"]["total_size"] == shape.n_bytes() == sum(
        math.prod(s) * 4 for _, s in shape.tensors())
    stored = {}
    for f in files:  # the reference reader: safetensors' own
        stored |= load_file(str(f))
    for k, (name, s) in enumerate(shape.tensors()):
        assert tuple(stored[name].shape) == s
        assert torch.equal(stored[name], lc._tensor(s, "F32", 3 * 100_003 + k))
    src = open_source(d)  # and LensLab's reader agrees
    assert {n: t for n, t in src.iter_tensors()}.keys() == stored.keys()
    assert all(torch.equal(t, stored[n]) for n, t in src.iter_tensors())
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 2
    assert not list(tmp_path.glob("*.partial-*"))


def test_bf16_checkpoint(tmp_path):
    shape = lc.LlamaShape(layers=1, dtype="BF16", **TOY)
    lc.write_checkpoint(tmp_path / "bf16", shape)
    src = open_source(tmp_path / "bf16")
    assert {str(t.dtype) for _, t in src.iter_tensors()} == {"torch.bfloat16"}


def test_end_to_end_toy_run_with_weightwatcher(tmp_path, capsys):
    pytest.importorskip("weightwatcher")
    d = tmp_path / "toy"
    args = ["--size-gb", "0.00005", "--dir", str(d), "--hidden", "32", "--intermediate", "48", "--heads", "4",
            "--kv-heads", "2", "--vocab", "64", "--shard-gb", "0.00001"]
    assert lc.main(args) == 0
    table = capsys.readouterr().out
    assert "| LensLab |" in table and "goal <= 3 x largest + 1 GiB" in table and ": met" in table
    ww_row = next(line for line in table.splitlines() if line.startswith("| WeightWatcher |"))
    assert "error" not in ww_row and "stopped" not in ww_row
    agreement = next(line for line in table.splitlines() if line.startswith("| agreement |"))
    n_layers = int(agreement.split("|")[2].split()[0])
    assert n_layers > 0
    assert d.is_dir()  # --dir is kept


def test_ill_conditioned_option_sends_the_embedding_to_the_svd_fallback(tmp_path):
    from analysis.weights.spectra import weight_spectra

    shape = lc.LlamaShape(layers=1, ill_conditioned=True, **TOY)
    d = tmp_path / "ill"
    lc.write_checkpoint(d, shape)
    assert lc._checkpoint_matches(d, shape, 0, 2 * lc.GIB)
    assert not lc._checkpoint_matches(d, replace(shape, ill_conditioned=False), 0, 2 * lc.GIB)  # not reused
    table = weight_spectra(open_source(d).iter_tensors()).table.set_index("matrix")
    assert table.loc[lc.EMBEDDING, "route"] == "svd" and table.loc[lc.EMBEDDING, "kappa"] > 1e5
    assert table.loc["lm_head.weight", "route"] == "gram"  # only the embedding is changed
    assert (table["route"] == "svd").sum() == 1


# -- streaming: peak memory does not grow with the checkpoint -------------------------------------------

LARGEST = 8192 * 256 * 4  # the embedding (and lm_head): 8 MiB in both checkpoints below
STREAM = dict(hidden=256, intermediate=1024, heads=4, kv_heads=2, vocab=8192)


def _analyze_in_child(directory, inflight_mib: int) -> dict:
    import subprocess
    import sys
    from pathlib import Path

    probe = (Path(__file__).resolve().parents[2] / "_peak_rss.py")
    out = subprocess.run([sys.executable, str(probe), "analyze", str(directory), str(inflight_mib)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_scale_with_checkpoint_size(tmp_path):
    """``api.analyze`` (fingerprint + spectra + store) of a ~40 MB and a ~160 MB sharded checkpoint
    with the same largest tensor, each in a child process: peak resident growth is the same for
    both (within 2x the largest tensor, for 4x the bytes read) and under 5x the largest tensor, and
    file-backed resident memory stays flat. Reading through a memory map (pages stay resident) or
    loading whole shards would grow with the size (by ~120 MB here). The matrices-in-flight bound
    (``INFLIGHT_BYTES``, 256 MiB by default) is scaled down to 16 MiB (counted as float64: one
    embedding) so that it sits below both sizes, as it does for a real multi-GB checkpoint.
    Measured: growth 27 / 31 MiB (small / large), file-backed growth 0.7 MiB for both."""
    runs = {}
    for label, layers in (("small", 6), ("large", 38)):
        shape = lc.LlamaShape(layers=layers, **STREAM)
        d = tmp_path / label
        files = lc.write_checkpoint(d, shape, shard_bytes=16 * 2**20)
        assert len(files) >= 3 and shape.largest_tensor_bytes() == LARGEST
        runs[label] = (shape.n_bytes(), _analyze_in_child(d, inflight_mib=16))
    (small_bytes, small), (large_bytes, large) = runs["small"], runs["large"]
    assert small_bytes < 45e6 and large_bytes > 150e6
    assert small["result"] == 2 + 7 * 6 and large["result"] == 2 + 7 * 38  # every matrix analysed
    for r in (small, large):
        assert r["file_growth"] < 8 * 2**20, r  # no memory map: file pages do not stay resident
        assert r["growth"] < 5 * LARGEST, r
    assert large["growth"] - small["growth"] < 2 * LARGEST, runs  # 4x the bytes read, not more memory
