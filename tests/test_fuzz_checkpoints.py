"""Fuzzing the safetensors loader: whatever the bytes, opening and reading a checkpoint ends in
tensors or a typed ``SourceError``, never another exception, a hang or a huge allocation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from analysis.errors import SourceError
from analysis.sources import open_source

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_bytes(tmp: Path) -> bytes:
    path = tmp / "valid.safetensors"
    rng = np.random.default_rng(0)
    save_file({"a.weight": torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32)),
               "b.bias": torch.arange(5, dtype=torch.float16)}, str(path))
    return path.read_bytes()


def _open_and_read(path: Path) -> None:
    """Open and read every tensor; only typed SourceErrors may escape."""
    try:
        src = open_source(path)
        for _, t in src.iter_tensors():
            assert isinstance(t, torch.Tensor)
    except SourceError:
        pass


@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    _open_and_read(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)),
                                                                     max_size=4))
def test_truncated_and_bit_flipped_valid_file(tmp_path, cut, flips):
    data = bytearray(_valid_bytes(tmp_path))
    for pos, mask in flips:
        if pos < len(data):
            data[pos] ^= mask
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(data[: max(cut, 0) if cut < len(data) else len(data)]))
    _open_and_read(path)


_dims = st.one_of(st.integers(-3, 6), st.just(2**40), st.just(2**62), st.text(max_size=2))
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F99", "", "f32"]),
    "shape": st.lists(_dims, max_size=4),
    "data_offsets": st.lists(st.one_of(st.integers(-8, 64), st.just(2**63 - 1)), min_size=0, max_size=3),
})


@FUZZ
@given(header=st.dictionaries(st.text(min_size=1, max_size=8), _entry, max_size=4),
       data_len=st.integers(0, 64), declared_extra=st.sampled_from([0, 0, 0, 1, -1, 2**40]))
def test_random_headers_wrong_dtypes_shapes_offsets_and_huge_sizes(tmp_path, header, data_len, declared_extra):
    raw = json.dumps(header).encode()
    declared = max(len(raw) + declared_extra, 0)
    path = tmp_path / "header.safetensors"
    path.write_bytes(struct.pack("<Q", declared) + raw + b"\x00" * data_len)
    _open_and_read(path)


def test_non_utf8_header_and_shard_index(tmp_path):
    path = tmp_path / "latin1.safetensors"
    raw = '{"é": 1}'.encode("latin-1")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SourceError, match="UTF-8"):
        open_source(path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b"\xff\xfe not json")
    with pytest.raises(SourceError, match="shard index"):
        open_source(index)
