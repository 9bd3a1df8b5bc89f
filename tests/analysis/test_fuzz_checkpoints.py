"""Fuzzing the safetensors loader and the shard index: whatever the bytes, opening and reading a
checkpoint ends in tensors or a typed ``SourceError``, never another exception, a hang or a huge
allocation (checked under an address-space limit in a child process)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from _bounded_pytest import bounded_batch, run_bounded
from analysis.errors import CorruptCheckpointError, SourceError
from analysis.sources import open_source

pytestmark = pytest.mark.timeout(180)  # per test; the bounded batch below has its own
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


@bounded_batch
@pytest.mark.timeout(120)
@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    _open_and_read(path)


@bounded_batch
@pytest.mark.timeout(120)
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


_dims = st.one_of(st.integers(-3, 6), st.just(2**40), st.just(2**62), st.text(max_size=2), st.booleans(),
                  st.floats(0, 4))
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F99", "", "f32"]),
    "shape": st.one_of(st.lists(_dims, max_size=4), st.lists(_dims, min_size=30, max_size=300)),
    "data_offsets": st.lists(st.one_of(st.integers(-8, 64), st.just(2**63 - 1), st.booleans()), min_size=0,
                             max_size=3),
})


@bounded_batch
@pytest.mark.timeout(120)
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


@bounded_batch
@pytest.mark.timeout(120)
@FUZZ
@given(prefix=st.sampled_from([b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "', b'{"', b"",
                               b'{"__metadata__": {"k": "']),
       junk=st.binary(min_size=1, max_size=32).filter(lambda b: not _is_utf8(b)))
def test_non_utf8_bytes_anywhere_in_the_header(tmp_path, prefix, junk):
    raw = prefix + junk + b'": 1}'
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)
    with pytest.raises(SourceError, match="not valid UTF-8 JSON"):
        open_source(path)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)
_shard_names = st.one_of(st.just("model-00001-of-00001.safetensors"), st.just("../outside.safetensors"),
                         st.just("/etc/hostname"), st.just("."), st.just("x" * 300), st.just("a\x00b"),
                         st.text(max_size=12), _json)


@bounded_batch
@pytest.mark.timeout(120)
@FUZZ
@given(weight_map=st.one_of(_json, st.dictionaries(st.text(max_size=10), _shard_names, max_size=4)),
       wrap=st.booleans())
def test_random_shard_indexes(tmp_path, weight_map, wrap):
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "model-00001-of-00001.safetensors").write_bytes(_valid_bytes(tmp_path))
    (tmp_path / "outside.safetensors").write_bytes(_valid_bytes(tmp_path))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map} if wrap else weight_map))
    try:
        src = open_source(d)
        names = {i.name for i in src.tensor_infos()}
        for _, t in src.iter_tensors():
            assert isinstance(t, torch.Tensor)
    except SourceError:
        return
    # only a mapping onto the real shard opens (an empty one opens with no tensors: analyze refuses it)
    assert isinstance(weight_map, dict) and names == set(weight_map)
    assert all(v == "model-00001-of-00001.safetensors" for v in weight_map.values())


def test_shard_index_cannot_name_files_outside_its_directory(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(_valid_bytes(tmp_path))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../secret.safetensors"}}))
    with pytest.raises(SourceError, match="lies outside the checkpoint directory"):
        open_source(d)


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,
                                 b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
                                 json.dumps({"a": {"dtype": "F32", "shape": [True, 1],
                                                   "data_offsets": [0, 4]}}).encode()],
                         ids=["deeply-nested", "5000-digit-number", "boolean-dimension"])
def test_pathological_json_headers(tmp_path, raw):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)
    with pytest.raises(SourceError):
        open_source(path)


_BIG = 2**62
_BOMBS = {  # name: (shape, data_offsets, message); each opened in well under a second
    "300-dims-of-2**62": ([_BIG] * 300, [0, 4], "declares 300 dimensions"),
    "300k-dims-6MB-file": ([_BIG] * 300_000, [0, 4], "declares 300000 dimensions"),
    "33-dims": ([1] * 33, [0, 4], "declares 33 dimensions"),
    "[2**63, 0]": ([2**63, 0], [0, 0], "dimension 9223372036854775808"),
    "[2**64, 0]": ([2**64, 0], [0, 0], "dimension 18446744073709551616"),
    "[2**62, 2**62, 0]": ([_BIG, _BIG, 0], [0, 0], "overflows 64 bits"),
    "[2**32]*8": ([2**32] * 8, [0, 4], "overflows 64 bits"),
    "[0]+[2**40]*31": ([0] + [2**40] * 31, [0, 0], "overflows 64 bits"),
    "negative": ([-1, 4], [0, 4], "dimension -1"),
    "fractional": ([1.5], [0, 4], "dimension 1.5"),
    "offsets-2**64": ([1], [0, 2**64], "declares offsets"),
    "offsets-not-a-pair": ([1], [0, 4, 8], "not two integers"),
}


@pytest.mark.parametrize("name", list(_BOMBS))
def test_header_bombs_are_typed_errors(tmp_path, name):
    """Shapes that are huge, deep or overflowing: a CorruptCheckpointError naming the value, from a
    check linear in the header's size (before: a crash formatting a 5000-digit number, minutes of
    quadratic arithmetic on 300 000 dimensions, or an untyped overflow inside torch.reshape)."""
    shape, offsets, message = _BOMBS[name]
    raw = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)
    with pytest.raises(CorruptCheckpointError, match=re.escape(message)):
        for _, t in open_source(path).iter_tensors():
            t.sum()


def test_the_most_dimensions_accepted_still_open(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"w": torch.ones([1] * 31 + [2]), "z": torch.zeros([2**31, 0, 2**31 - 1])}, str(path))
    assert {n: tuple(t.shape) for n, t in open_source(path).iter_tensors()} == {"w": (1,) * 31 + (2,),
                                                                                 "z": (2**31, 0, 2**31 - 1)}


@pytest.mark.parametrize("spec", ["a\x00b", "x" * 5000, "~no-such-user-xyz/model", "\udcff"], ids=repr)
def test_unusable_path_strings_are_typed_errors(spec):
    with pytest.raises(SourceError, match="not a usable path|neither a bundled model name"):
        open_source(spec)


def _memory_corpus(d: Path) -> list[Path]:
    """Files whose headers declare far more than they hold (the loader must not allocate it)."""
    def header_file(name: str, header: dict | bytes, declared: int | None = None, data: int = 16) -> Path:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        p = d / name
        p.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + b"\x00" * data)
        return p

    valid = d / "valid.safetensors"
    valid.write_bytes(_valid_bytes(d))
    tb = 2**40
    return [
        valid,
        header_file("header-2e63.safetensors", b"{}", declared=2**63 - 1),
        header_file("header-1tb.safetensors", b"{}", declared=tb),
        header_file("header-at-limit.safetensors", b"{}", declared=100 * 2**20),
        header_file("tensor-4tb-consistent-offsets.safetensors",
                    {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4 * tb]}}),
        header_file("tensor-overflowing-shape.safetensors",
                    {"w": {"dtype": "F64", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 8]}}),
        header_file("many-tensors-all-huge.safetensors",
                    {f"w{i}": {"dtype": "BF16", "shape": [2**30], "data_offsets": [0, 2**31]} for i in range(1000)}),
    ]


def test_huge_declared_sizes_never_allocate_them(tmp_path):
    """In a child process limited to +512 MiB of address space, every file above fails with a
    SourceError (or opens, for the valid one) and resident memory grows by < 64 MiB."""
    files = _memory_corpus(tmp_path)
    script = (Path(__file__).resolve().parents[1] / "_bounded_loader.py")
    out = subprocess.run([sys.executable, str(script), "checkpoint", "512", *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    outcomes = {name: r["outcome"] for name, r in report["files"].items()}
    assert outcomes.pop("valid.safetensors") == "ok"
    assert set(outcomes.values()) == {"typed:CorruptCheckpointError"}, outcomes
    assert report["rss_growth"] < 64 * 2**20
    assert max(r["seconds"] for r in report["files"].values()) < 10


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", ["checkpoint", "index"])
def test_coverage_guided_fuzzing_with_atheris(tmp_path, target):
    """libFuzzer mutations guided by coverage of analysis/ (5 s per target here; run
    tests/atheris_loaders.py longer by hand): only LensLabErrors, no hang, no memory growth."""
    from _atheris_run import run_atheris

    assert run_atheris(target, tmp_path, seconds=5) > 100


@pytest.mark.timeout(900)
def test_hypothesis_batch_is_bounded(tmp_path):
    """Every ``bounded_batch`` hypothesis test of this module, run in a child process whose address
    space may grow by 1 GiB at most (an allocation from a declared size fails there), each test
    under its own 120 s timeout."""
    run_bounded(__file__, tmp_path, limit_mib=1024)
