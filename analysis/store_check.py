"""Store maintenance: ``check_store`` (what ``lenslab store check`` reports) and ``collect_garbage``.

What can go wrong on disk, and what each check finds:

- orphaned blob: a file under ``blobs/`` that no index row references: a writer killed between
  renaming its blob and committing its row, or index writes lost with the ``-wal`` file.
  Harmless (never served) but it takes space; ``fix`` deletes it.
- missing / corrupt blob: an index row whose blob file is gone or fails its SHA-256. ``get``
  raises CorruptEntryError and ``cached`` recomputes the entry.
- unreadable entry: an index row whose params or meta JSON does not parse; treated as missing.
- temp file: a file in ``tmp/`` left by a killed writer; ``fix`` deletes those older than
  ``tmp_min_age_s`` (a younger one may belong to a writer still running).
- index: SQLite's ``PRAGMA quick_check``; with a damaged index no blob is called an orphan
  (rows that cannot be read may still reference it), so none is deleted.

Orphans are deleted under the index's write lock, after re-reading which blobs are referenced;
``Store.put`` re-checks its blobs under the same lock, so a concurrent writer never loses one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from analysis.errors import StoreError
from analysis.store_records import entry_info_from_row

if TYPE_CHECKING:
    from analysis.store import Store


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """What ``Store.check`` found and, with ``fix``, removed."""

    root: Path
    index: str  # "ok", or what SQLite's quick_check (or opening the index) reported
    n_entries: int
    orphan_blobs: tuple[Path, ...]  # blob files no index row references
    missing_blobs: tuple[tuple[str, str], ...]  # (entry key, blob name) whose file is gone
    corrupt_blobs: tuple[tuple[str, str], ...]  # (entry key, blob name) failing its checksum
    unreadable_entries: tuple[str, ...]  # keys whose params/meta JSON does not parse
    temp_files: tuple[Path, ...]  # files in tmp/
    removed: tuple[Path, ...] = ()  # orphans and temp files deleted by fix=True
    orphan_bytes: int = 0  # total size of the orphaned blobs, as found

    @property
    def remaining(self) -> int:
        """Problems left: everything found, less what the fix removed."""
        gone = set(self.removed)
        leftover = [p for p in (*self.orphan_blobs, *self.temp_files) if p not in gone]
        return ((self.index != "ok") + len(leftover) + len(self.missing_blobs) + len(self.corrupt_blobs)
                + len(self.unreadable_entries))

    @property
    def ok(self) -> bool:
        return self.remaining == 0


def _age(path: Path, now: float) -> float:
    """Seconds since ``path`` was modified; -inf if it vanished meanwhile (never collected)."""
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return float("-inf")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _files(directory: Path, pattern: str) -> list[Path]:
    return sorted(p for p in directory.glob(pattern) if p.is_file()) if directory.is_dir() else []


def _referenced(con) -> set[str]:
    return {b for row in con.execute("SELECT table_blob, arrays_blob FROM entries") for b in row if b}


def check_store(store: Store, *, fix: bool = False, tmp_min_age_s: float = 600.0) -> StoreCheck:
    """Check every index row and blob of ``store`` (reads and hashes every blob once); with
    ``fix``, delete orphaned blobs and temp files older than ``tmp_min_age_s`` seconds.

    Works on a read-only store without ``fix``; with it, raises StoreError if the store cannot be written."""
    index, rows = "ok", None
    try:
        with store._connection("checking the index") as con:
            findings = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            if findings != ["ok"]:
                index = "; ".join(findings[:5])
            rows = con.execute("SELECT * FROM entries").fetchall()
    except StoreError as exc:
        index = str(exc)
    missing, corrupt, unreadable, referenced = [], [], [], set()
    intact: dict[str, bool] = {}
    for row in rows or []:
        key = row[0]
        if entry_info_from_row(row) is None:
            unreadable.append(key)
        for name in (b for b in (row[6], row[7]) if b):
            referenced.add(name)
            path = store._blob_path(name)
            if not path.is_file():
                missing.append((key, name))
            elif not intact.setdefault(name, store._intact(path)):
                corrupt.append((key, name))
    orphans = [] if rows is None or index != "ok" else [p for p in _files(store.blob_dir, "*/*")
                                                         if p.name not in referenced]
    temps = _files(store.tmp_dir, "*")
    orphan_bytes = sum(map(_size, orphans))
    removed = _delete_unreferenced(store, "collecting orphaned blobs", orphans, temps, blob_min_age_s=0.0,
                                   tmp_min_age_s=tmp_min_age_s) if fix and (orphans or temps) else []
    return StoreCheck(store.root, index, len(rows or []), tuple(orphans), tuple(missing), tuple(corrupt),
                      tuple(unreadable), tuple(temps), tuple(removed), orphan_bytes)


def collect_garbage(store: Store, older_than_s: float = 3600.0) -> int:
    """Remove temp files left by killed writers and blobs no entry references, both at least
    ``older_than_s`` seconds old; returns the count (``Store.gc``)."""
    return len(_delete_unreferenced(store, "collecting garbage", _files(store.blob_dir, "*/*"),
                                    _files(store.tmp_dir, "*"), blob_min_age_s=older_than_s,
                                    tmp_min_age_s=older_than_s))


def _delete_unreferenced(store: Store, what: str, blobs: list[Path], temps: list[Path], *,
                         blob_min_age_s: float, tmp_min_age_s: float) -> list[Path]:
    """Delete the ``blobs`` no index row references and the ``temps``, each at least its minimum
    age, under the index write lock (the references are re-read there: a writer may have committed
    meanwhile). Returns what was deleted; StoreError if the store cannot be written."""
    store._require_writable(what)
    now, removed = time.time(), []
    with store._connection(what, write=True) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            used = _referenced(con)
            for p in blobs:
                if p.name not in used and _age(p, now) >= blob_min_age_s:
                    p.unlink(missing_ok=True)
                    removed.append(p)
            for p in temps:
                if _age(p, now) >= tmp_min_age_s:
                    p.unlink(missing_ok=True)
                    removed.append(p)
            con.execute("COMMIT")
        except BaseException:
            store._rollback(con)
            raise
    return removed
