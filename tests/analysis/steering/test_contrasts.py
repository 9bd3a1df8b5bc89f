"""Contrast-set loader: the bundled sets, the JSONL format, and typed errors for every malformed input."""

from __future__ import annotations

import json

import pytest

from analysis.steering.contrasts import (CONTRAST_DIR, TEST_EVERY, ContrastSet, bundled_contrasts, load_contrasts,
                                parse_contrasts)
from analysis.errors import ConfigError, SourceError

BUNDLED = ("code-prose", "numpy-torch", "positive-negative")


def jsonl(*records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def pairs(n: int, **extra) -> list[dict]:
    return [{"positive": f"with concept {i}", "negative": f"without concept {i}", **extra} for i in range(n)]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_sets_have_train_and_test_pairs(name):
    cs = load_contrasts(name)
    assert cs.origin == f"bundled:{name}" and cs.name == name
    assert load_contrasts(cs.origin).fingerprint == cs.fingerprint
    raw = [json.loads(line) for line in (CONTRAST_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    assert len(cs.pairs) == len(raw) - 1 and 40 <= len(cs.pairs) <= 80  # first line is the meta header
    assert [p.split for p in cs.pairs] == [r["split"] for r in raw[1:]]
    assert len(cs.train) >= 2 * len(cs.test) > 0
    assert len({p.id for p in cs.pairs}) == len(cs.pairs)
    assert all(p.positive != p.negative for p in cs.pairs)
    assert cs.concept_positive and cs.concept_negative
    pos, neg = cs.texts("test")
    assert pos == [p.positive for p in cs.test] and neg == [p.negative for p in cs.test]


def test_bundled_names_are_listed():
    assert set(BUNDLED) <= set(bundled_contrasts())


def test_a_file_path_loads_and_the_fingerprint_follows_content(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(jsonl({"meta": {"positive": "yes", "concept_tokens": {"positive": [" a"]}}}, *pairs(8)))
    cs = load_contrasts(path)
    assert isinstance(cs, ContrastSet) and cs.name == "mine" and cs.positive_label == "yes"
    assert cs.concept_positive == (" a",) and cs.concept_negative == ()
    assert load_contrasts(str(path)).fingerprint == cs.fingerprint and len(cs.fingerprint) == 32
    path.write_bytes(jsonl(*pairs(8)[:-1], {"positive": "changed", "negative": "text"}))
    assert load_contrasts(path).fingerprint != cs.fingerprint
    assert load_contrasts(cs) is cs


def test_default_split_holds_out_every_fourth_pair():
    cs = parse_contrasts(jsonl(*pairs(10)))
    assert [p.split for p in cs.pairs] == ["test" if i % TEST_EVERY == TEST_EVERY - 1 else "train" for i in range(10)]
    assert [p.id for p in cs.pairs] == [str(i + 1) for i in range(10)]  # line numbers


def test_explicit_splits_win_and_missing_ones_train():
    recs = pairs(4)
    recs[0]["split"] = "test"
    cs = parse_contrasts(jsonl(*recs))
    assert [p.split for p in cs.pairs] == ["test", "train", "train", "train"]


def test_blank_lines_crlf_and_bom_are_accepted():
    data = b"\xef\xbb\xbf" + jsonl(*pairs(4)).replace(b"\n", b"\r\n\r\n")
    assert len(parse_contrasts(data).pairs) == 4


def test_a_line_separator_inside_a_string_is_text_not_a_new_line():
    recs = pairs(4)
    recs[0]["positive"] = "one\u2028two"
    cs = parse_contrasts("\n".join(json.dumps(r, ensure_ascii=False) for r in recs).encode())
    assert cs.pairs[0].positive == "one\u2028two"


@pytest.mark.parametrize(("data", "error", "match"), [
    (b"", ConfigError, "holds no pairs"),
    (b"\n  \n", ConfigError, "holds no pairs"),
    (b"\xff\xfe{}", SourceError, "not UTF-8"),
    (b'{"positive": "a", "negative": ', SourceError, "line 1: not valid JSON"),
    (b"[" * 50_000, SourceError, "not valid JSON"),
    (b"[1, 2]", ConfigError, "expected a JSON object"),
    (b'"text"', ConfigError, "expected a JSON object"),
    (b'{"positive": "a"}', ConfigError, "one-sided pair: it has a positive text but no negative"),
    (b'{"negative": "a", "positive": "   "}', ConfigError, "one-sided pair: it has a negative text but no positive"),
    (b'{"id": 3}', ConfigError, "neither a positive nor a negative"),
    (b'{"positive": 1, "negative": "b"}', ConfigError, "positive must be a string, got int"),
    (b'{"positive": "a", "negative": null}', ConfigError, "negative must be a string, got NoneType"),
    (b'{"positive": "a", "negative": "a"}', ConfigError, "identical"),
    (b'{"positive": "a", "negative": "b", "lable": 1}', ConfigError, r"unknown key\(s\) \['lable'\]"),
    (b'{"positive": "a", "negative": "b", "split": "dev"}', ConfigError, "split 'dev' must be one of train, test"),
    (b'{"positive": "a", "negative": "b", "id": 1.5}', ConfigError, "id must be a string or an integer"),
    (b'{"positive": "\\ud800", "negative": "b"}', ConfigError, "lone surrogate"),
    (b'{"meta": {"name": 3}}\n{"positive": "a", "negative": "b"}', ConfigError, "name must be a string"),
    (b'{"meta": {"colour": "red"}}', ConfigError, r"unknown key\(s\) \['colour'\]"),
    (b'{"meta": [1]}', ConfigError, "header record must be exactly"),
    (b'{"meta": {"concept_tokens": {"positive": [""]}}}', ConfigError, "list of non-empty strings"),
    (b'{"meta": {"concept_tokens": ["a"]}}', ConfigError, "concept_tokens must be an object"),
    (b'{"positive": "a", "negative": "b"}\n{"meta": {}}', ConfigError, "header must be the first record"),
    (b'{"positive": "a", "negative": "b"}\n{"positive": "c", "negative": "d"}', ConfigError,
     "2 training and 0 test pairs"),
    (b'{"positive": "a", "negative": "b", "split": "test"}\n' * 3, ConfigError, "0 training and 3 test"),
], ids=lambda v: v[:28] if isinstance(v, bytes) else None)
def test_malformed_input_raises_a_typed_error(data, error, match):
    with pytest.raises(error, match=match):
        parse_contrasts(data)


def test_duplicate_ids_name_both_lines():
    with pytest.raises(ConfigError, match="pair id 'x' already used on line 1"):
        parse_contrasts(jsonl(*[dict(p, id="x") for p in pairs(2)]))


def test_too_long_text_is_refused():
    with pytest.raises(ConfigError, match="characters \\(limit"):
        parse_contrasts(jsonl({"positive": "a" * 30_000, "negative": "b"}))


@pytest.mark.parametrize("spec", ["no-such-set", "/no/such/file.jsonl", "bad\x00name"])
def test_unknown_names_list_the_bundled_sets(spec):
    with pytest.raises(SourceError, match="numpy-torch"):
        load_contrasts(spec)


def test_a_directory_or_non_string_is_refused(tmp_path):
    with pytest.raises(SourceError, match="neither a bundled contrast set"):
        load_contrasts(tmp_path)
    with pytest.raises(SourceError, match="not list"):
        load_contrasts(["numpy-torch"])
