"""The results store's SQLite connections, and what its low-level failures mean to a user.

``connect`` opens the index for reading and writing (WAL). ``connect_read_only`` opens it with
SQLite's ``mode=ro``, so a store on a read-only directory or a full disk can still be listed and
read; when even the WAL index (``-shm``) cannot be created there, it falls back to
``immutable=1`` (nothing can write to such a directory meanwhile, so nothing is missed).

``failure`` turns an ``OSError`` or ``sqlite3.Error`` into a ``StoreError`` whose message names
the store directory, what went wrong (full, read-only, damaged index, locked) and the fix.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from analysis.errors import StoreError

ENV_VAR = "LENSLAB_STORE"
BUSY_TIMEOUT_S = 60
SCHEMA = """
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

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


def connect(index_path: Path) -> sqlite3.Connection:
    """A read-write autocommit connection in WAL mode (creates the file if needed)."""
    con = sqlite3.connect(index_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    except BaseException:
        con.close()
        raise
    return con


def create_schema(index_path: Path) -> None:
    """Create the index tables if missing (a no-op write-free check when they exist)."""
    con = connect(index_path)
    try:
        con.executescript(SCHEMA)
    finally:
        con.close()


def connect_read_only(index_path: Path) -> sqlite3.Connection:
    """A connection that never writes: ``mode=ro``, or ``mode=ro&immutable=1`` when SQLite cannot
    open the WAL index of a read-only directory. Raises sqlite3.Error if the file cannot be read."""
    uri = index_path.resolve().as_uri()
    con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return con
    except sqlite3.OperationalError:  # "unable to open database file": no -shm/-wal and none can be created
        con.close()
    con = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)
    try:
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except BaseException:
        con.close()
        raise
    return con


def _sqlite_code(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", "") or ""


def is_corrupt(exc: BaseException) -> bool:
    """Whether SQLite reported a damaged index file (not a database / malformed image)."""
    text = str(exc)
    return (_sqlite_code(exc).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
            or "malformed" in text or "not a database" in text)


def is_full(exc: BaseException) -> bool:
    """Whether the failure is a full disk or an exhausted quota."""
    return (getattr(exc, "errno", None) in _FULL_ERRNOS or _sqlite_code(exc).startswith("SQLITE_FULL")
            or "disk is full" in str(exc))


def is_read_only(exc: BaseException) -> bool:
    """Whether the failure is a read-only file system or missing write permission."""
    return (getattr(exc, "errno", None) in _READ_ONLY_ERRNOS or _sqlite_code(exc).startswith("SQLITE_READONLY")
            or "readonly" in str(exc))


def failure(root: Path, index_path: Path, exc: BaseException, doing: str) -> StoreError:
    """A StoreError for ``exc`` raised while ``doing`` (e.g. "storing a result") in the store at ``root``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    elsewhere = f"pass --store DIR (or set {ENV_VAR})"
    if is_full(exc):
        return StoreError(f"store {root} is full: {doing} failed ({text}); free space on its disk or {elsewhere} "
                          "to a directory with room; results stored before are intact")
    if is_read_only(exc):
        return StoreError(f"store {root} is read-only: {doing} failed ({text}); its results can still be listed "
                          f"and read; make the directory writable or {elsewhere} to a writable directory")
    if is_corrupt(exc):
        return StoreError(f"store index {index_path} is damaged: {doing} failed ({text}); run `lenslab store "
                          f"check --store {root}`, then salvage it with `sqlite3 {index_path} .recover` or move it "
                          "aside (its results are then recomputed)")
    if _sqlite_code(exc).startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return StoreError(f"store {root} stayed locked by another process for {BUSY_TIMEOUT_S} s: {doing} failed "
                          f"({text}); retry when the other lenslab command has finished")
    return StoreError(f"store {root}: {doing} failed ({text}); check that the directory and {index_path.name} "
                      f"are readable, or {elsewhere} to another store")


def default_store_root() -> Path:
    """``$LENSLAB_STORE`` if set, else the user's cache dir (``~/.cache/lenslab/store`` on Linux)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lenslab")) / "store"
