"""The results store: SQLite (WAL) index + immutable, content-addressed array files.

Layout under the store root::

    index.sqlite            entries (one row per result) and models (one row per fingerprint)
    blobs/ab/<sha256>.parquet      a result's table
    blobs/cd/<sha256>.safetensors  a result's named arrays
    tmp/                    files being written; renamed into blobs/ with os.replace

A result becomes visible only when its index row commits, after its blobs are complete on
disk, so a writer killed at any point leaves no partial entry (at most an orphan temp file,
removed by ``gc``). Blob names are their SHA-256, checked on every read: a corrupt blob (or an
index row whose JSON no longer parses) is reported as ``CorruptEntryError`` and ``cached``
recomputes it instead of serving it. ``check`` reports orphaned, missing and corrupt blobs and
temp files, and collects the orphans (``analysis/store_check.py``).

A store whose directory cannot be written (read-only, or a full disk) still opens: it is read
through a read-only SQLite connection, and any write raises ``StoreError`` naming the directory
and the fix (``analysis/store_sqlite.py``). Every SQLite or file-system failure surfaces as a
``StoreError``; nothing stored before a failed write is touched. Key = sha256 of the canonical
JSON of (fingerprint, analysis, params, code_version). A model keeps its first label (aliases in ``info``).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis import store_sqlite
from analysis.errors import ConfigError, CorruptEntryError, StoreError
from analysis.store_records import (  # noqa: F401  (EntryInfo, ModelInfo, canonical_json: re-exported)
    EntryInfo,
    ModelInfo,
    Result,
    canonical_json,
    entry_info_from_row,
    entry_key,
    json_object,
    model_row,
)
from analysis.store_sqlite import ENV_VAR, default_store_root  # noqa: F401 (re-exported)
from analysis.table_codec import from_parquet, to_parquet

if TYPE_CHECKING:
    from analysis.store_check import StoreCheck


class Store:
    """Results store rooted at a directory. Safe to share across threads and processes:
    every operation opens its own short-lived SQLite connection.

    A store whose directory cannot be written (read-only, full disk) but holds an index still
    opens: ``read_only_reason`` says why, reads work, and writes raise StoreError."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_root()
        self.index_path = self.root / "index.sqlite"
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.read_only_reason: str | None = None  # why the last write probe failed; None: writable
        try:
            self._prepare()
        except (OSError, sqlite3.Error) as exc:
            if store_sqlite.is_corrupt(exc):
                raise self._failure(exc, "opening the store") from exc
            if not self._index_exists():
                raise StoreError(f"store directory {self.root} is not writable ({exc}); "
                                 f"pass --store DIR or set {ENV_VAR} to a writable directory") from exc
            self.read_only_reason = " ".join(str(exc).split()) or type(exc).__name__
            with self._connection("opening the store read-only") as con:
                con.execute("SELECT 1 FROM entries LIMIT 1").fetchall()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def _index_exists(self) -> bool:
        try:
            return self.index_path.is_file()
        except OSError:
            return False

    def _prepare(self) -> None:
        """Create the directories and the index schema; raises OSError or sqlite3.Error when the
        store cannot be written."""
        for d in (self.root, self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
        store_sqlite.create_schema(self.index_path)

    def _require_writable(self, doing: str) -> None:
        """Raise StoreError (directory, cause, fix) if this store cannot be written; a store that
        was read-only when opened is probed again, so it recovers once space or permission is back."""
        if self.read_only_reason is None:
            return
        try:
            self._prepare()
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, doing) from exc
        self.read_only_reason = None

    def _failure(self, exc: BaseException, doing: str) -> StoreError:
        return store_sqlite.failure(self.root, self.index_path, exc, doing)

    # -- connections ----------------------------------------------------------------------
    @contextmanager
    def _connection(self, doing: str, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A short-lived connection; SQLite and file-system failures inside become StoreError."""
        try:
            con = self._open(write)
        except sqlite3.Error as exc:
            raise self._failure(exc, doing) from exc
        try:
            yield con
        except StoreError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise self._failure(exc, doing) from exc
        finally:
            con.close()

    def _open(self, write: bool) -> sqlite3.Connection:
        if write or self.read_only_reason is None:
            try:
                return self._connect()
            except sqlite3.OperationalError:
                if write:
                    raise
                # e.g. the directory became read-only since: read without writing anything
        return store_sqlite.connect_read_only(self.index_path)

    def _connect(self) -> sqlite3.Connection:
        return store_sqlite.connect(self.index_path)

    @staticmethod
    def _rollback(con: sqlite3.Connection) -> None:
        """Roll back an open transaction; a connection too broken to roll back is closed anyway,
        which rolls back too, so the original error is the one reported."""
        try:
            if con.in_transaction:
                con.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- blobs ----------------------------------------------------------------------------
    def _blob_path(self, name: str) -> Path:
        return self.blob_dir / name[:2] / name

    def _write_blob(self, data: bytes, suffix: str) -> str:
        name = hashlib.sha256(data).hexdigest() + suffix
        final = self._blob_path(name)
        if final.is_file() and self._intact(final):
            return name  # content-addressed: an intact file with this name already holds these bytes
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as exc:  # incl. Ctrl-C: no temp file is left behind
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise self._failure(exc, f"writing blob {name[:12]} under {self.blob_dir}") from exc
            raise
        return name

    @staticmethod
    def _intact(path: Path) -> bool:
        try:
            with path.open("rb") as f:  # streamed: blobs (SAE weights) can be large
                return hashlib.file_digest(f, "sha256").hexdigest() == path.name.split(".", 1)[0]
        except OSError:
            return False

    def _read_blob(self, name: str, key: str) -> bytes:
        path = self._blob_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise CorruptEntryError(f"entry {key[:12]}: blob {name} is missing; it will be recomputed "
                                    "(or run `lenslab store rm` on it)") from exc
        except OSError as exc:
            raise self._failure(exc, f"reading blob {name[:12]}") from exc
        if hashlib.sha256(data).hexdigest() != name.split(".", 1)[0]:
            raise CorruptEntryError(f"entry {key[:12]}: blob {name} does not match its checksum; "
                                    "it will be recomputed (or run `lenslab store rm` on it)")
        return data

    # -- public API -----------------------------------------------------------------------
    def put(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str,
            result: Result) -> EntryInfo:
        """Store ``result`` under its key (replacing an older one with the same key).

        Raises StoreError (directory, cause, fix) if the store cannot be written; the entries
        stored before are then untouched."""
        key = entry_key(fingerprint, analysis, params, code_version)
        params_json, meta = canonical_json(dict(params)), canonical_json(dict(result.meta))
        self._require_writable(f"storing entry {key[:12]}")
        blobs: dict[str, tuple[bytes, str]] = {}
        if result.table is not None:
            blobs["table_blob"] = (to_parquet(result.table), ".parquet")
        if result.arrays:
            from safetensors.numpy import save

            arrays = {k: np.ascontiguousarray(v) for k, v in result.arrays.items()}
            blobs["arrays_blob"] = (save(arrays), ".safetensors")
        names = {col: self._write_blob(data, suffix) for col, (data, suffix) in blobs.items()}
        n_bytes = sum(len(d) for d, _ in blobs.values())
        created = time.time()
        with self._connection(f"storing entry {key[:12]}", write=True) as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                # A concurrent delete may have removed a blob with the same content between the
                # write above and this lock: write it again while we hold the lock.
                for col, name in names.items():
                    if not self._blob_path(name).is_file():
                        self._write_blob(*blobs[col])
                con.execute(
                    "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (key, fingerprint, analysis, params_json, code_version, created,
                     names.get("table_blob"), names.get("arrays_blob"), meta, n_bytes))
                con.execute("COMMIT")
            except BaseException:
                self._rollback(con)
                raise
        return EntryInfo(key, fingerprint, analysis, json.loads(params_json), code_version, created, n_bytes,
                         json.loads(meta))

    def _row(self, key: str) -> tuple | None:
        with self._connection(f"reading entry {key[:12]}") as con:
            return con.execute("SELECT * FROM entries WHERE key=?", (key,)).fetchone()

    def get(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str) -> Result | None:
        """The stored result, or None. Raises CorruptEntryError if its blobs fail their checksum or
        its index row no longer parses."""
        return self.get_by_key(entry_key(fingerprint, analysis, params, code_version))

    def get_by_key(self, key: str) -> Result | None:
        row = self._row(key)
        if row is None:
            return None
        info = entry_info_from_row(row)
        if info is None:
            raise CorruptEntryError(f"entry {key[:12]}: its params or meta in {self.index_path} are not valid JSON "
                                    f"objects; it will be recomputed (or run `lenslab store rm {key[:12]}`)")
        table_blob, arrays_blob = row[6], row[7]
        table = None
        arrays: dict[str, np.ndarray] = {}
        try:
            if table_blob:
                table = from_parquet(self._read_blob(table_blob, key))
            if arrays_blob:
                from safetensors.numpy import load

                arrays = load(self._read_blob(arrays_blob, key))
        except StoreError:
            raise
        except Exception as exc:  # a blob whose checksum matches but does not parse
            raise CorruptEntryError(f"entry {key[:12]}: blob does not parse ({exc}); it will be recomputed") from exc
        for a in arrays.values():
            a.flags.writeable = False
        return Result(table=table, arrays=arrays, meta=info.meta)

    def has(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str) -> bool:
        return self._row(entry_key(fingerprint, analysis, params, code_version)) is not None

    def list(self, fingerprint: str | None = None, analysis: str | None = None) -> list[EntryInfo]:
        """Index rows, newest first, optionally filtered by model fingerprint prefix (matched
        literally) and analysis. Rows whose JSON no longer parses are left out: see ``unreadable_keys``."""
        sql, args = "SELECT * FROM entries WHERE 1=1", []
        if fingerprint is not None:
            sql += " AND substr(fingerprint, 1, ?) = ?"
            args += [len(fingerprint), fingerprint]
        if analysis is not None:
            sql += " AND analysis=?"
            args.append(analysis)
        with self._connection("listing entries") as con:
            rows = con.execute(sql + " ORDER BY created DESC", args).fetchall()
        return [info for info in map(entry_info_from_row, rows) if info is not None]

    def unreadable_keys(self) -> list[str]:
        """Keys of entries whose params or meta JSON no longer parses (``list`` leaves them out,
        ``get`` raises CorruptEntryError, ``cached`` recomputes them)."""
        with self._connection("listing entries") as con:
            rows = con.execute("SELECT * FROM entries").fetchall()
        return [r[0] for r in rows if entry_info_from_row(r) is None]

    def delete(self, key_prefix: str) -> int:
        """Delete entries whose key (or model fingerprint) starts with ``key_prefix``, compared
        literally (``_`` and ``%`` are ordinary characters); returns the count.

        Blobs no longer referenced by any entry are removed in the same locked transaction."""
        if len(key_prefix) < 4:
            raise ConfigError(f"key prefix {key_prefix!r} is too short; give at least 4 characters")
        self._require_writable("deleting entries")
        n = len(key_prefix)
        with self._connection("deleting entries", write=True) as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                rows = con.execute("SELECT key, table_blob, arrays_blob FROM entries "
                                   "WHERE substr(key, 1, ?) = ? OR substr(fingerprint, 1, ?) = ?",
                                   (n, key_prefix, n, key_prefix)).fetchall()
                con.executemany("DELETE FROM entries WHERE key=?", [(r[0],) for r in rows])
                con.execute("DELETE FROM models WHERE fingerprint NOT IN (SELECT fingerprint FROM entries)")
                for blob in {b for r in rows for b in r[1:] if b}:
                    used = con.execute("SELECT 1 FROM entries WHERE table_blob=? OR arrays_blob=? LIMIT 1",
                                       (blob, blob)).fetchone()
                    if not used:
                        self._blob_path(blob).unlink(missing_ok=True)
                con.execute("COMMIT")
            except BaseException:
                self._rollback(con)
                raise
        return len(rows)

    def cached(self, fingerprint: str, analysis: str, params: Mapping[str, Any], code_version: str,
               compute: Callable[[], Result], *, refresh: bool = False) -> Result:
        """Return the stored result, or run ``compute()`` once and store it.

        A corrupt entry is recomputed and replaced, never served; ``refresh=True`` recomputes.
        A store that cannot be written raises StoreError before ``compute`` runs."""
        if not refresh:
            try:
                hit = self.get(fingerprint, analysis, params, code_version)
            except CorruptEntryError:
                hit = None
            if hit is not None:
                return hit
        self._require_writable(f"storing a {analysis} result")
        result = compute()
        self.put(fingerprint, analysis, params, code_version, result)
        return result

    # -- models ---------------------------------------------------------------------------
    def register_model(self, fingerprint: str, label: str, kind: str, *, n_tensors: int | None = None,
                       n_params: int | None = None, info: Mapping[str, Any] | None = None,
                       replace: bool = True) -> None:
        """Record a model the store holds results for. It keeps its first label; another label (the same
        weights by another path) joins ``ModelInfo.aliases`` and the rest is refreshed (``replace=False``:
        an existing record stays as it is). Writes only on a change, so a read-only store still serves."""
        select = "SELECT label, kind, n_tensors, n_params, info FROM models WHERE fingerprint=?"
        with self._connection("reading the model table") as con:
            row = con.execute(select, (fingerprint,)).fetchone()
        if row is not None and (not replace or row == model_row(row, label, kind, n_tensors, n_params, info)):
            return
        self._require_writable("recording a model")
        with self._connection("recording a model", write=True) as con:
            con.execute("BEGIN IMMEDIATE")  # read and update in one transaction: a concurrent alias is kept
            try:
                if (row := con.execute(select, (fingerprint,)).fetchone()) is None:
                    con.execute("INSERT INTO models VALUES (?,?,?,?,?,?,?)", (fingerprint, label, kind, n_tensors,
                                n_params, time.time(), canonical_json(dict(info or {}))))
                elif replace:
                    con.execute("UPDATE models SET kind=?, n_tensors=?, n_params=?, info=? WHERE fingerprint=?",
                                (*model_row(row, label, kind, n_tensors, n_params, info)[1:], fingerprint))
                con.execute("COMMIT")
            except BaseException:
                self._rollback(con)
                raise

    def models(self) -> list[ModelInfo]:
        """Models with at least one stored result, most recently seen first (an ``info`` whose
        JSON no longer parses reads as {})."""
        with self._connection("listing models") as con:
            rows = con.execute("SELECT m.*, MAX(e.created) AS last FROM models m JOIN entries e USING (fingerprint) "
                               "GROUP BY m.fingerprint ORDER BY last DESC").fetchall()
        return [ModelInfo(r[0], r[1], r[2], r[3], r[4], r[5], json_object(r[6])) for r in rows]

    # -- maintenance ----------------------------------------------------------------------
    def gc(self, older_than_s: float = 3600.0) -> int:
        """Remove temp files left by killed writers and blobs no entry references (both older than
        ``older_than_s``); returns the count."""
        from analysis.store_check import collect_garbage
        return collect_garbage(self, older_than_s)

    def check(self, *, fix: bool = False, tmp_min_age_s: float = 600.0) -> StoreCheck:
        """Report orphaned blobs (no index row, e.g. after a lost WAL), missing and corrupt blobs,
        unreadable index rows and temp files; with ``fix``, delete the orphans and the temp files
        older than ``tmp_min_age_s`` (see ``analysis.store_check``)."""
        from analysis.store_check import check_store

        return check_store(self, fix=fix, tmp_min_age_s=tmp_min_age_s)
