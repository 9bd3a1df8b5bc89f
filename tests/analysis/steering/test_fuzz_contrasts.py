"""Fuzzing the contrast-set (JSONL) loader: whatever the bytes or the path, ``load_contrasts`` ends in a
``ContrastSet`` or a typed ``LensLabError`` (SourceError / ConfigError), never another exception, a
hang or a memory blow-up (checked under an address-space limit in a child process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _bounded_pytest import bounded_batch, run_bounded
from analysis.steering.contrasts import CONTRAST_DIR, PAIR_KEYS, ContrastSet, load_contrasts, parse_contrasts
from analysis.errors import ConfigError, LensLabError, SourceError

pytestmark = pytest.mark.timeout(180)  # per test; the bounded batch below has its own
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID = (CONTRAST_DIR / "numpy-torch.jsonl").read_bytes()


def _load(path: Path) -> ContrastSet | None:
    """Load; only typed LensLab errors may escape (anything else fails the test with the input)."""
    try:
        cs = load_contrasts(path)
    except (SourceError, ConfigError):
        return None
    assert isinstance(cs, ContrastSet) and len(cs.train) >= 2 and len(cs.test) >= 1
    assert all(p.positive != p.negative and p.split in ("train", "test") for p in cs.pairs)
    return cs


@bounded_batch
@pytest.mark.timeout(120)
@FUZZ
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    _load(path)


@bounded_batch
@pytest.mark.timeout(120)
@FUZZ
@given(cut=st.integers(0, len(VALID)), flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)),
                                                      max_size=6),
       insert=st.sampled_from([b"", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\r\n", "\u2028".encode(),
                               b"\xef\xbb\xbf"]))
def test_truncated_bit_flipped_and_spliced_valid_file(tmp_path, cut, flips, insert):
    data = bytearray(VALID)
    for pos, mask in flips:
        data[pos] ^= mask
    data = bytes(data[:cut]) + insert + bytes(data[cut:])
    path = tmp_path / "mutated.jsonl"
    path.write_bytes(data)
    _load(path)


_scalar = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
_json = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=10)
_key = st.sampled_from([*PAIR_KEYS, "meta", "Positive", ""]) | st.text(max_size=6)
_record = st.one_of(_json, st.dictionaries(_key, st.one_of(_json, st.sampled_from(["train", "test", "a", "b", " ",
                                                                                      "\udc80"])), max_size=5))


@bounded_batch
@pytest.mark.timeout(120)
@FUZZ
@given(records=st.lists(_record, max_size=8), meta=st.one_of(st.none(), _json,
                                                             st.fixed_dictionaries({}, optional={
                                                                 "name": _json, "positive": _json,
                                                                 "concept_tokens": _json, "extra": _json})))
def test_random_records_wrong_types_keys_and_meta(tmp_path, records, meta):
    lines = ([json.dumps({"meta": meta})] if meta is not None else []) + [json.dumps(r) for r in records]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    _load(path)


@bounded_batch
@pytest.mark.timeout(120)
@FUZZ
@given(spec=st.one_of(st.text(max_size=40).filter(lambda t: not t.startswith("~")), st.just("a\x00b"),
                      st.just("x" * 5000), st.just("\udcff.jsonl"), st.binary(max_size=8), st.integers(), st.none()))
def test_arbitrary_path_strings_and_types(spec):
    if isinstance(spec, str) and "\x00" not in spec and os.path.lexists(spec):
        return  # hypothesis named an existing file or directory of this machine: not a fuzz case
    try:
        load_contrasts(spec)
    except LensLabError:
        pass


def test_unknown_home_directory_is_a_typed_error():
    # found by this fuzzing: Path.expanduser() raised RuntimeError for an unknown ~user
    with pytest.raises(SourceError, match="not a usable path"):
        load_contrasts("~no-such-user-xyz/set.jsonl")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"positive": "a", "negative": "b", "id": '
                                  + "9" * 5000 + "}", '{"positive": "a", "negative": 1e999999}',
                                  '{"positive": "\\ud800", "negative": "b"}'],
                         ids=["deep-nesting", "5000-digit-id", "infinite-number", "lone-surrogate"])
def test_pathological_json_lines(text):
    with pytest.raises(LensLabError):
        parse_contrasts(text + "\n" + '{"positive": "c", "negative": "d"}\n' * 3)


def test_directory_device_and_oversized_file(tmp_path):
    with pytest.raises(SourceError):
        load_contrasts(tmp_path)  # a directory
    with pytest.raises(SourceError):
        load_contrasts("/dev/zero")  # never read: not a regular file
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse 1 GiB: refused by its size, never read
    with pytest.raises(SourceError, match="more than a contrast set may hold"):
        load_contrasts(big)


def _run_bounded(files: list[Path], limit_mib: int = 512) -> dict:
    script = (Path(__file__).resolve().parents[2] / "_bounded_loader.py")
    out = subprocess.run([sys.executable, str(script), "contrasts", str(limit_mib), *map(str, files)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_inputs_stay_bounded_in_memory_and_time(tmp_path):
    """Files up to the 16 MiB cap built to be costly to parse: one huge line, a 15 MiB string."""
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(VALID)
    one_list = tmp_path / "one-big-list.jsonl"
    one_list.write_text("[" + "0," * (7 << 20) + "0]\n")
    long_text = tmp_path / "long-text.jsonl"
    long_text.write_text(json.dumps({"positive": "a" * (15 << 20), "negative": "b"}) + "\n")
    report = _run_bounded([valid, one_list, long_text])
    outcomes = {k: v["outcome"] for k, v in report["files"].items()}
    assert outcomes == {"valid.jsonl": "ok", "one-big-list.jsonl": "typed:ConfigError",
                        "long-text.jsonl": "typed:ConfigError"}, outcomes
    assert report["rss_growth"] < 256 * 2**20
    assert max(v["seconds"] for v in report["files"].values()) < 30


def test_many_tiny_records_stay_bounded_in_memory(tmp_path):
    # found by this fuzzing: every line was parsed before any was validated, so 16 MiB of '{}' lines
    # held ~5.6M dicts (~1.3 GiB resident)
    empties = tmp_path / "empty-objects.jsonl"
    empties.write_text("{}\n" * ((16 << 20) // 3 - 10))
    zeros = tmp_path / "zeros.jsonl"
    zeros.write_text("0\n" * ((16 << 20) // 2 - 10))
    report = _run_bounded([empties, zeros])
    assert {v["outcome"] for v in report["files"].values()} == {"typed:ConfigError"}, report
    assert report["rss_growth"] < 256 * 2**20
    assert max(v["seconds"] for v in report["files"].values()) < 10


@pytest.mark.timeout(180)
def test_coverage_guided_fuzzing_with_atheris(tmp_path):
    """libFuzzer mutations of the bundled sets guided by coverage of analysis/ (5 s here; run
    tests/atheris_loaders.py longer by hand): only LensLabErrors, no hang, no memory growth."""
    from _atheris_run import run_atheris

    assert run_atheris("contrasts", tmp_path, seconds=5) > 100


@pytest.mark.timeout(900)
def test_hypothesis_batch_is_bounded(tmp_path):
    """Every ``bounded_batch`` hypothesis test of this module, run in a child process whose address
    space may grow by 1 GiB at most (an allocation from a declared size fails there), each test
    under its own 120 s timeout."""
    run_bounded(__file__, tmp_path, limit_mib=1024)
