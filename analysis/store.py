"""The results store: SQLite (WAL) index + immutable, content-addressed array files.

Layout under the store root::

    index.sqlite            entries (one row per result) and models (one row per fingerprint)
    blobs/ab/<sha256>.parquet      a result's table
    blobs/cd/<sha256>.safetensors  a result's named arrays
    tmp/                    files being written; renamed into blobs/ with os.replace

A result becomes visible only when its index row commits, after its blobs are complete on
disk, so a writer killed at any point leaves no partial entry (at most an orphan temp file,
removed by ``gc``). Blob names are their SHA-256, checked on every read: a corrupt blob is
reported as ``CorruptEntryError`` and ``cached`` recomputes it instead of serving it.

Key = sha256 of the canonical JSON of (fingerprint, analysis, params, code_version).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError, CorruptEntryError, StoreError
from analysis.table_codec import from_parquet, to_parquet

ENV_VAR = "LENSLAB_STORE"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    analysis TEXT NOT NULL,
    params TEXT NOT NULL,
    code_version TEXT NOT NULL,
    created REAL NOT NULL,
    table_blob TEXT,
    arrays_blob TEXT,
    meta TEXT NOT NULL,
    n_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_model ON entries (fingerprint, analysis);
CREATE TABLE IF NOT EXISTS models (
    fingerprint TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    kind TEXT NOT NULL,
    n_tensors INTEGER,
    n_params INTEGER,
    first_seen REAL NOT NULL,
    info TEXT NOT NULL
);
"""


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


def default_store_root() -> Path:
    """``$LENSLAB_STORE`` if set, else the user's cache dir (``~/.cache/lenslab/store`` on Linux)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lenslab")) / "store"


class Store:
    """Results store rooted at a directory. Safe to share across threads and processes:
    every operation opens its own short-lived SQLite connection."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_root()
        self.index_path = self.root / "index.sqlite"
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        try:
            for d in (self.root, self.blob_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"store directory {self.root} is not writable ({exc}); "
                             f"pass --store DIR or set {ENV_VAR} to a writable directory") from exc

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- connections ----------------------------------------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            con = self._connect()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.index_path} ({exc}); check the store directory") from exc
        try:
            yield con
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.index_path, timeout=60, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=60000")
        return con

    # -- blobs ----------------------------------------------------------------------------
    def _blob_path(self, name: str) -> Path:
        return self.blob_dir / name[:2] / name

    def _write_blob(self, data: bytes, suffix: str) -> str:
        name = hashlib.sha256(data).hexdigest() + suffix
        final = self._blob_path(name)
        if final.is_file() and self._intact(final):
            return name  # content-addressed: an intact file with this name already holds these bytes
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write a blob under {self.blob_dir} ({exc}); "
                             "free disk space or choose another --store") from exc
        return name

    @staticmethod
    def _intact(path: Path) -> bool:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest() == path.name.split(".", 1)[0]
        except OSError:
            return False

    def _read_blob(self, name: str, key: str) -> bytes:
        path = self._blob_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise CorruptEntryError(f"entry {key[:12]}: blob {name} is missing; it will be recomputed "
                                    "(or run `lenslab store rm` on it)") from exc
        if hashlib.sha256(data).hexdigest() != name.split(".", 1)[0]:
            raise CorruptEntryError(f"entry {key[:12]}: blob {name} does not match its checksum; "
                                    "it will be recomputed (or run `lenslab store rm` on it)")
        return data

    # -- public API -----------------------------------------------------------------------
    def put(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str,
            result: Result) -> EntryInfo:
        """Store ``result`` under its key (replacing an older one with the same key)."""
        key = entry_key(fingerprint, analysis, params, code_version)
        blobs: dict[str, tuple[bytes, str]] = {}
        if result.table is not None:
            blobs["table_blob"] = (to_parquet(result.table), ".parquet")
        if result.arrays:
            from safetensors.numpy import save

            arrays = {k: np.ascontiguousarray(v) for k, v in result.arrays.items()}
            blobs["arrays_blob"] = (save(arrays), ".safetensors")
        names = {col: self._write_blob(data, suffix) for col, (data, suffix) in blobs.items()}
        n_bytes = sum(len(d) for d, _ in blobs.values())
        meta = canonical_json(dict(result.meta))
        created = time.time()
        with self._connection() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                # A concurrent delete may have removed a blob with the same content between the
                # write above and this lock: write it again while we hold the lock.
                for col, name in names.items():
                    if not self._blob_path(name).is_file():
                        self._write_blob(*blobs[col])
                con.execute(
                    "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (key, fingerprint, analysis, canonical_json(dict(params)), code_version, created,
                     names.get("table_blob"), names.get("arrays_blob"), meta, n_bytes))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        return EntryInfo(key, fingerprint, analysis, json.loads(canonical_json(dict(params))), code_version,
                         created, n_bytes, json.loads(meta))

    def _row(self, key: str) -> tuple | None:
        with self._connection() as con:
            return con.execute("SELECT * FROM entries WHERE key=?", (key,)).fetchone()

    def get(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str) -> Result | None:
        """The stored result, or None. Raises CorruptEntryError if its blobs fail their checksum."""
        return self.get_by_key(entry_key(fingerprint, analysis, params, code_version))

    def get_by_key(self, key: str) -> Result | None:
        row = self._row(key)
        if row is None:
            return None
        table_blob, arrays_blob, meta = row[6], row[7], row[8]
        table = None
        arrays: dict[str, np.ndarray] = {}
        try:
            if table_blob:
                table = from_parquet(self._read_blob(table_blob, key))
            if arrays_blob:
                from safetensors.numpy import load

                arrays = load(self._read_blob(arrays_blob, key))
        except CorruptEntryError:
            raise
        except Exception as exc:  # a blob whose checksum matches but does not parse
            raise CorruptEntryError(f"entry {key[:12]}: blob does not parse ({exc}); it will be recomputed") from exc
        for a in arrays.values():
            a.flags.writeable = False
        return Result(table=table, arrays=arrays, meta=json.loads(meta))

    def has(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str) -> bool:
        return self._row(entry_key(fingerprint, analysis, params, code_version)) is not None

    def list(self, fingerprint: str | None = None, analysis: str | None = None) -> list[EntryInfo]:
        """Index rows, newest first, optionally filtered by model fingerprint and analysis."""
        sql, args = "SELECT * FROM entries WHERE 1=1", []
        if fingerprint is not None:
            sql += " AND fingerprint LIKE ?"
            args.append(fingerprint + "%")
        if analysis is not None:
            sql += " AND analysis=?"
            args.append(analysis)
        with self._connection() as con:
            rows = con.execute(sql + " ORDER BY created DESC", args).fetchall()
        return [EntryInfo(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[9], json.loads(r[8])) for r in rows]

    def delete(self, key_prefix: str) -> int:
        """Delete entries whose key (or model fingerprint) starts with ``key_prefix``; returns the count.

        Blobs no longer referenced by any entry are removed in the same locked transaction."""
        if len(key_prefix) < 4:
            raise ConfigError(f"key prefix {key_prefix!r} is too short; give at least 4 characters")
        with self._connection() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                rows = con.execute("SELECT key, table_blob, arrays_blob FROM entries "
                                   "WHERE key LIKE ? OR fingerprint LIKE ?",
                                   (key_prefix + "%", key_prefix + "%")).fetchall()
                con.executemany("DELETE FROM entries WHERE key=?", [(r[0],) for r in rows])
                con.execute("DELETE FROM models WHERE fingerprint NOT IN (SELECT fingerprint FROM entries)")
                for blob in {b for r in rows for b in r[1:] if b}:
                    used = con.execute("SELECT 1 FROM entries WHERE table_blob=? OR arrays_blob=? LIMIT 1",
                                       (blob, blob)).fetchone()
                    if not used:
                        self._blob_path(blob).unlink(missing_ok=True)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        return len(rows)

    def cached(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str,
               compute: Callable[[], Result], *, refresh: bool = False) -> Result:
        """Return the stored result, or run ``compute()`` once and store it.

        A corrupt entry is recomputed and replaced, never served; ``refresh=True`` recomputes."""
        if not refresh:
            try:
                hit = self.get(fingerprint, analysis, params, code_version)
            except CorruptEntryError:
                hit = None
            if hit is not None:
                return hit
        result = compute()
        self.put(fingerprint, analysis, params, code_version, result)
        return result

    # -- models ---------------------------------------------------------------------------
    def register_model(self, fingerprint: str, label: str, kind: str, *, n_tensors: int | None = None,
                       n_params: int | None = None, info: Mapping[str, Any] | None = None,
                       replace: bool = True) -> None:
        """Record (or refresh the label of) a model the store holds results for; with
        ``replace=False`` an existing record is kept as it is."""
        conflict = ("DO UPDATE SET label=excluded.label, kind=excluded.kind, n_tensors=excluded.n_tensors, "
                    "n_params=excluded.n_params, info=excluded.info") if replace else "DO NOTHING"
        with self._connection() as con:
            con.execute(
                f"INSERT INTO models VALUES (?,?,?,?,?,?,?) ON CONFLICT(fingerprint) {conflict}",
                (fingerprint, label, kind, n_tensors, n_params, time.time(), canonical_json(dict(info or {}))))

    def models(self) -> list[ModelInfo]:
        """Models with at least one stored result, most recently seen first."""
        with self._connection() as con:
            rows = con.execute(
                "SELECT m.*, MAX(e.created) AS last FROM models m JOIN entries e USING (fingerprint) "
                "GROUP BY m.fingerprint ORDER BY last DESC").fetchall()
        return [ModelInfo(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def gc(self, older_than_s: float = 3600.0) -> int:
        """Remove temp files left by killed writers and blobs no entry references; returns the count."""
        removed = 0
        now = time.time()
        for p in self.tmp_dir.iterdir():
            if now - p.stat().st_mtime > older_than_s:
                p.unlink(missing_ok=True)
                removed += 1
        with self._connection() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                used = {b for row in con.execute("SELECT table_blob, arrays_blob FROM entries") for b in row if b}
                for p in self.blob_dir.glob("*/*"):
                    if p.name not in used and now - p.stat().st_mtime > older_than_s:
                        p.unlink(missing_ok=True)
                        removed += 1
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return removed
