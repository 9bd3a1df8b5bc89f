"""What the results store holds: a ``Result`` per analysis run, the index records describing
it (``EntryInfo``, ``ModelInfo``), and its key (sha256 of canonical JSON). Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Result:
    """What one analysis run stores: a table (one row per item), named arrays, JSON metadata."""

    table: pd.DataFrame | None = None
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """Index row of one stored result."""

    key: str
    fingerprint: str
    analysis: str
    params: dict[str, Any]
    code_version: str
    created: float  # unix seconds
    n_bytes: int
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the store has results for."""

    fingerprint: str
    label: str
    kind: str
    n_tensors: int | None
    n_params: int | None
    first_seen: float
    info: dict[str, Any]

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other labels the same weights were recorded under after the first (``label``), oldest first."""
        return tuple(a for a in self.info.get("aliases", ()) if isinstance(a, str))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, tuples as lists); raises ConfigError if not serialisable."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"analysis parameters must be JSON-serialisable, got {obj!r} ({exc}); "
                          "pass numbers, strings, lists or dicts") from exc


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def entry_key(fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str) -> str:
    """The store key: sha256 of the canonical JSON of the four parts."""
    payload = canonical_json({"fingerprint": fingerprint, "analysis": analysis,
                              "params": dict(params), "code_version": code_version})
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_info_from_row(row: tuple) -> EntryInfo | None:
    """The EntryInfo of an index row, or None when its params or meta JSON does not parse."""
    try:
        params, meta = json.loads(row[3]), json.loads(row[8])
    except (TypeError, ValueError):
        return None
    if not isinstance(params, dict) or not isinstance(meta, dict):
        return None
    return EntryInfo(row[0], row[1], row[2], params, row[4], row[5], row[9], meta)


def json_object(text: Any) -> dict[str, Any]:
    """``text`` parsed as a JSON object, or {} when it is not one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_row(row: tuple, label: str, kind: str, n_tensors: int | None, n_params: int | None,
               info: Mapping[str, Any] | None) -> tuple:
    """The model-table row after registering (label, kind, ...) over the stored ``row``: the first
    label stays, a new one joins the aliases (in the order first seen), the rest is refreshed."""
    first = row[0]
    aliases = [a for a in json_object(row[4]).get("aliases", []) if isinstance(a, str)]
    if label != first and label not in aliases:
        aliases.append(label)
    merged = dict(info or {}) | ({"aliases": aliases} if aliases else {})
    return (first, kind, n_tensors, n_params, canonical_json(merged))
