"""Contrast sets: pairs of texts that differ in one concept, the input of steering-vector extraction.

File format (JSON Lines, UTF-8, one JSON object per line; blank lines are skipped):

- an optional **first** record ``{"meta": {...}}`` describing the set, every field optional::

      {"meta": {"name": "numpy-torch", "description": "...", "positive": "torch", "negative": "numpy",
                "concept_tokens": {"positive": [" torch", " tensor"], "negative": [" np", " array"]}}}

  ``positive`` / ``negative`` name the two sides; ``concept_tokens`` are strings that each encode
  to one token of the model under study (the dose-response measures their log-probability);
- then one record per pair::

      {"id": "nt-01", "positive": "Return a tensor ...", "negative": "Return an array ...", "split": "train"}

  ``positive`` and ``negative`` are required non-empty strings; ``id`` (string or integer,
  unique; default ``"<line number>"``) and ``split`` (``"train"`` or ``"test"``) are optional.
  No other keys are accepted (a typo would otherwise be silently ignored).

Limits: 16 MiB and 100,000 pairs per file, 20,000 characters per text.

Held-out split: when no record names a split, every 4th pair (pairs 4, 8, ...) is a test pair;
when some do, the others are training pairs. A set needs >= 2 training pairs and >= 1 test pair.

Bundled sets live in ``data/contrasts/<name>.jsonl``: ``load_contrasts("numpy-torch")``.
Every malformed input ends in ``SourceError`` (unreadable, not UTF-8, not JSON) or
``ConfigError`` (valid JSON that breaks the schema), never another exception.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.errors import ConfigError, SourceError

CONTRAST_DIR = Path(__file__).resolve().parents[2] / "data" / "contrasts"
SPLITS = ("train", "test")
PAIR_KEYS = ("id", "positive", "negative", "split")
META_KEYS = ("name", "description", "positive", "negative", "concept_tokens")
MAX_BYTES = 16 * 1024 * 1024  # a contrast set is hand-sized text; refuse anything larger
MAX_TEXT_CHARS = 20_000  # per text: a sentence or a docstring, not a book
TEST_EVERY = 4  # default split: every 4th pair is held out
MAX_PAIRS = 100_000


def _lines(text: str):
    """(line number, line) split on "\\n" only (not ``splitlines``: U+2028 may sit inside a JSON
    string), one at a time, so a file of millions of short lines is never a list in memory."""
    start, lineno = 0, 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        lineno += 1
        yield lineno, text[start:end]
        start = end + 1


@dataclass(frozen=True, slots=True)
class ContrastPair:
    """Two texts differing in one concept: ``positive`` has it, ``negative`` does not."""

    id: str
    positive: str
    negative: str
    split: str  # "train" | "test"


@dataclass(frozen=True, eq=False)
class ContrastSet:
    """A validated contrast set (see the module docstring for the file format)."""

    name: str
    pairs: tuple[ContrastPair, ...]
    description: str = ""
    positive_label: str = "positive"
    negative_label: str = "negative"
    concept_positive: tuple[str, ...] = ()  # token strings whose log-probability steering should raise
    concept_negative: tuple[str, ...] = ()
    origin: str = "<memory>"  # file path or "bundled:<name>"
    fingerprint: str = field(default="", repr=False)  # 32 hex: content hash of the pairs and meta

    def split(self, which: str) -> tuple[ContrastPair, ...]:
        """Pairs of one split (``"train"`` or ``"test"``)."""
        if which not in SPLITS:
            raise ConfigError(f"unknown split {which!r}; choose one of {', '.join(SPLITS)}")
        return tuple(p for p in self.pairs if p.split == which)

    @property
    def train(self) -> tuple[ContrastPair, ...]:
        return self.split("train")

    @property
    def test(self) -> tuple[ContrastPair, ...]:
        return self.split("test")

    def texts(self, split: str | None = None) -> tuple[list[str], list[str]]:
        """(positive texts, negative texts) of one split, or of every pair when ``split`` is None."""
        pairs = self.pairs if split is None else self.split(split)
        return [p.positive for p in pairs], [p.negative for p in pairs]

    def summary(self) -> str:
        return (f"{self.name}: {len(self.pairs)} pairs ({len(self.train)} train, {len(self.test)} test), "
                f"{self.positive_label} vs {self.negative_label}")


def bundled_contrasts() -> list[str]:
    """Names of the contrast sets shipped in ``data/contrasts``."""
    return sorted(p.stem for p in CONTRAST_DIR.glob("*.jsonl")) if CONTRAST_DIR.is_dir() else []


def load_contrasts(path_or_name: str | os.PathLike | ContrastSet) -> ContrastSet:
    """A bundled set by name (``numpy-torch``, ``code-prose``, ``positive-negative``; also written
    ``bundled:numpy-torch``, a set's ``origin``) or a JSONL file.

    Raises SourceError (unknown name, unreadable file, not UTF-8, bad JSON) or ConfigError
    (schema: missing or one-sided pairs, wrong types, duplicate ids, empty set or split).
    """
    if isinstance(path_or_name, ContrastSet):
        return path_or_name
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise SourceError(f"a contrast set is named by a string or a path, not {type(path_or_name).__name__}; "
                          f"give a bundled name ({', '.join(bundled_contrasts())}) or a .jsonl file")
    text = os.fspath(path_or_name)
    if isinstance(text, bytes):
        raise SourceError("give the contrast-set path as text, not bytes")
    bundled = bundled_contrasts()
    if isinstance(path_or_name, str) and text.startswith("bundled:"):  # a ContrastSet.origin names it so
        text = text.removeprefix("bundled:")
    if isinstance(path_or_name, str) and text in bundled:
        path, origin = CONTRAST_DIR / f"{text}.jsonl", f"bundled:{text}"
    else:
        try:
            path = Path(text).expanduser()
            exists = path.is_file()
        except (OSError, ValueError, RuntimeError) as exc:  # embedded NUL, name too long, ~user unknown, ...
            raise SourceError(f"{text!r} is not a usable path ({exc}); give a bundled contrast-set name "
                              f"({', '.join(bundled)}) or a .jsonl file") from exc
        if not exists:
            raise SourceError(f"{text!r} is neither a bundled contrast set ({', '.join(bundled) or 'none found'}) "
                              "nor an existing file; check the spelling or give the path of a .jsonl file")
        origin = str(path.resolve())
    try:
        if path.stat().st_size > MAX_BYTES:
            raise SourceError(f"{path}: {path.stat().st_size} bytes is more than a contrast set may hold "
                              f"({MAX_BYTES} bytes); keep a few hundred pairs per file")
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc}); check the path and its permissions") from exc
    default_name = path.stem if origin.startswith("bundled:") or path.suffix == ".jsonl" else path.name
    return parse_contrasts(data, origin=origin, default_name=default_name)


def parse_contrasts(data: bytes | str, *, origin: str = "<memory>", default_name: str = "contrasts") -> ContrastSet:
    """Parse and validate JSONL contrast-set text (bytes must be UTF-8; a BOM is allowed)."""
    if isinstance(data, bytes):
        if len(data) > MAX_BYTES:
            raise SourceError(f"{origin}: {len(data)} bytes is more than a contrast set may hold ({MAX_BYTES})")
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SourceError(f"{origin}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as "
                              "UTF-8 JSON Lines") from exc
    elif not isinstance(data, str):
        raise SourceError(f"{origin}: expected the file's bytes or text, got {type(data).__name__}")
    # Records are validated as they are read, so memory holds pairs, never a list of raw lines or records.
    fields: dict[str, Any] | None = None
    pairs: list[ContrastPair] = []
    seen: dict[str, int] = {}
    for lineno, line in _lines(data):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
            raise SourceError(f"{origin} line {lineno}: not valid JSON ({str(exc)[:120]}); each line must be one "
                              'JSON object such as {"positive": "...", "negative": "..."}') from None
        if fields is None:
            if isinstance(rec, dict) and "meta" in rec:
                if set(rec) != {"meta"} or not isinstance(rec["meta"], dict):
                    raise ConfigError(f"{origin} line {lineno}: the header record must be exactly "
                                      '{"meta": {...}} with an object inside; move other keys into pair records')
                fields = _meta_fields(rec["meta"], origin, default_name)
                continue
            fields = _meta_fields({}, origin, default_name)
        p = _pair(rec, lineno, origin)
        if p.id in seen:
            raise ConfigError(f"{origin} line {lineno}: pair id {p.id!r} already used on line {seen[p.id]}; "
                              "give every pair a unique id (or leave ids out)")
        seen[p.id] = lineno
        pairs.append(p)
        if len(pairs) > MAX_PAIRS:
            raise ConfigError(f"{origin}: more than {MAX_PAIRS} pairs; a contrast set is hand-sized, split the file")
    if fields is None:
        fields = _meta_fields({}, origin, default_name)
    if not pairs:
        raise ConfigError(f"{origin}: the contrast set holds no pairs; add lines like "
                          '{"positive": "text with the concept", "negative": "text without it"}')
    if all(p.split == "" for p in pairs):
        pairs = [ContrastPair(p.id, p.positive, p.negative, "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train")
                 for i, p in enumerate(pairs)]
    else:
        pairs = [p if p.split else ContrastPair(p.id, p.positive, p.negative, "train") for p in pairs]
    n_train = sum(p.split == "train" for p in pairs)
    n_test = len(pairs) - n_train
    if n_train < 2 or n_test < 1:
        raise ConfigError(f"{origin}: {n_train} training and {n_test} test pairs; extraction needs >= 2 training "
                          "pairs and >= 1 held-out test pair: add pairs or mark some with \"split\": \"test\"")
    canonical = json.dumps({"meta": fields, "pairs": [[p.id, p.positive, p.negative, p.split] for p in pairs]},
                           sort_keys=True, ensure_ascii=True)
    fp = hashlib.blake2b(canonical.encode("ascii"), digest_size=16).hexdigest()
    return ContrastSet(name=fields["name"], pairs=tuple(pairs), description=fields["description"],
                       positive_label=fields["positive"], negative_label=fields["negative"],
                       concept_positive=tuple(fields["concept_tokens"]["positive"]),
                       concept_negative=tuple(fields["concept_tokens"]["negative"]), origin=origin, fingerprint=fp)


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {what} must be a string, got {type(value).__name__} ({_short(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: {what} holds a lone surrogate escape (\\ud8xx); write the character itself "
                          "or a valid surrogate pair") from None
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _meta_fields(meta: Mapping[str, Any], origin: str, default_name: str) -> dict[str, Any]:
    where = f"{origin} meta"
    if unknown := sorted(set(map(str, meta)) - set(META_KEYS)):
        raise ConfigError(f"{where}: unknown key(s) {unknown}; the header accepts {', '.join(META_KEYS)}")
    out: dict[str, Any] = {"name": default_name, "description": "", "positive": "positive", "negative": "negative"}
    for key in ("name", "description", "positive", "negative"):
        if key in meta:
            out[key] = _text(meta[key], key, where)
    if not out["name"].strip():
        raise ConfigError(f"{where}: name is empty; name the set or drop the field")
    concept = meta.get("concept_tokens", {})
    if not isinstance(concept, dict) or set(map(str, concept)) - {"positive", "negative"}:
        raise ConfigError(f"{where}: concept_tokens must be an object with optional lists \"positive\" and "
                          f"\"negative\", got {_short(concept)}")
    tokens: dict[str, list[str]] = {}
    for side in ("positive", "negative"):
        values = concept.get(side, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{where}: concept_tokens.{side} must be a list of non-empty strings, "
                              f"got {_short(values)}")
        tokens[side] = [_text(v, f"concept_tokens.{side}", where) for v in values]
    out["concept_tokens"] = tokens
    return out


def _pair(rec: Any, lineno: int, origin: str) -> ContrastPair:
    where = f"{origin} line {lineno}"
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: expected a JSON object with \"positive\" and \"negative\", got "
                          f"{type(rec).__name__} ({_short(rec)})")
    if unknown := sorted(set(rec) - set(PAIR_KEYS)):
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a pair accepts {', '.join(PAIR_KEYS)}"
                          + ("; the {\"meta\": ...} header must be the first record" if "meta" in unknown else ""))
    missing = [k for k in ("positive", "negative") if k not in rec or (isinstance(rec[k], str) and not rec[k].strip())]
    if len(missing) == 2:
        raise ConfigError(f"{where}: the pair has neither a positive nor a negative text; every pair needs both")
    if missing:
        have = "negative" if missing[0] == "positive" else "positive"
        raise ConfigError(f"{where}: one-sided pair: it has a {have} text but no {missing[0]} text; every pair "
                          "needs both sides (a direction is the difference between them)")
    pos, neg = _text(rec["positive"], "positive", where), _text(rec["negative"], "negative", where)
    for what, t in (("positive", pos), ("negative", neg)):
        if len(t) > MAX_TEXT_CHARS:
            raise ConfigError(f"{where}: the {what} text has {len(t)} characters (limit {MAX_TEXT_CHARS}); "
                              "contrast texts are sentences or docstrings: shorten it")
    if pos == neg:
        raise ConfigError(f"{where}: positive and negative texts are identical, so the pair contrasts nothing; "
                          "change one side or drop the pair")
    pid = rec.get("id", str(lineno))
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise ConfigError(f"{where}: id must be a string or an integer, got {type(pid).__name__} ({_short(pid)})")
    pid = _text(str(pid), "id", where)
    split = rec.get("split", "")
    if split != "" and split not in SPLITS:
        raise ConfigError(f"{where}: split {_short(split)} must be one of {', '.join(SPLITS)} (or left out)")
    return ContrastPair(pid, pos, neg, split)
