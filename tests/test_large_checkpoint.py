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
