"""``lenslab store``: list, delete and check stored results.

    lenslab store ls [--model FP] [--json]     # newest first
    lenslab store rm KEY_OR_FINGERPRINT_PREFIX  # >= 4 characters, matched literally
    lenslab store check [--fix] [--json]       # orphaned / missing / corrupt blobs, temp files

Registered on the main app in ``app/cli/__init__.py``. Listing and checking work on a read-only store.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from app.cli.options import StoreOpt, console
from app.cli.tables import print_table

store_app = typer.Typer(no_args_is_help=True, help="List, delete or check stored results.")


def _note(message: str) -> None:
    console.print(message, soft_wrap=True, highlight=False, markup=False)


@store_app.command("ls")
def store_ls(
    store: StoreOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Fingerprint prefix.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List stored results, newest first."""
    from app import api

    st = api.open_store(store)
    labels = {m.fingerprint: m.label for m in st.models()}
    entries = st.list(fingerprint=model)
    if as_json:
        typer.echo(json.dumps([{"key": e.key, "fingerprint": e.fingerprint, "model": labels.get(e.fingerprint),
                                "analysis": e.analysis, "params": e.params, "code_version": e.code_version,
                                "created": e.created, "n_bytes": e.n_bytes} for e in entries], indent=1))
    else:
        read_only = " (read-only)" if st.read_only_reason else ""
        out = Table(title=f"store {st.root}{read_only}: {len(entries)} entries")
        for c in ("key", "model", "analysis", "params", "bytes"):
            out.add_column(c)
        for e in entries:
            out.add_row(e.key[:12], labels.get(e.fingerprint, e.fingerprint[:12]), e.analysis,
                        json.dumps(e.params)[:60], str(e.n_bytes))
        print_table(out)
    if unreadable := st.unreadable_keys():
        _note(f"{len(unreadable)} entries with unreadable metadata are not listed (they are recomputed when next "
              "used); `lenslab store check` names them")


@store_app.command("rm")
def store_rm(
    key: Annotated[str, typer.Argument(help="Entry key or model fingerprint prefix (>= 4 characters, matched "
                                            "literally).")],
    store: StoreOpt = None,
) -> None:
    """Delete entries by key or model fingerprint prefix."""
    from app import api

    n = api.open_store(store).delete(key)
    typer.echo(f"deleted {n} entr{'y' if n == 1 else 'ies'}"
               + ("" if n else f" (no entry key or model fingerprint starts with {key!r}; see `lenslab store ls`)"))


@store_app.command("check")
def store_check(
    fix: Annotated[bool, typer.Option("--fix", help="Delete orphaned blobs and temp files older than 10 minutes.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    store: StoreOpt = None,
) -> None:
    """Check every entry and blob: orphaned blobs (no index row, e.g. after a lost write-ahead log),
    missing or corrupt blobs, unreadable index rows and temp files of killed writers. --fix deletes
    the orphans and temp files. Exit code 1 while problems remain."""
    from app import api

    rep = api.open_store(store).check(fix=fix)
    removed = set(rep.removed)
    if as_json:
        typer.echo(json.dumps({
            "store": str(rep.root), "index": rep.index, "entries": rep.n_entries,
            "orphan_blobs": [str(p) for p in rep.orphan_blobs], "orphan_bytes": rep.orphan_bytes,
            "missing_blobs": [list(m) for m in rep.missing_blobs],
            "corrupt_blobs": [list(c) for c in rep.corrupt_blobs], "unreadable_entries": list(rep.unreadable_entries),
            "temp_files": [str(p) for p in rep.temp_files], "removed": [str(p) for p in rep.removed],
            "remaining": rep.remaining}, indent=1))
    else:
        lines = [f"store {rep.root}: {rep.n_entries} entries; index {rep.index}"]
        if rep.orphan_blobs:
            gone = sum(p in removed for p in rep.orphan_blobs)
            lines.append(f"orphaned blobs (no index row): {len(rep.orphan_blobs)}, {rep.orphan_bytes / 1e6:.2f} "
                         "MB; " + (f"removed {gone}" if fix else "`lenslab store check --fix` removes them"))
        for (key, name), what in [*((m, "missing") for m in rep.missing_blobs),
                                  *((c, "corrupt") for c in rep.corrupt_blobs)]:
            lines.append(f"{what} blob {name} of entry {key[:12]}: recomputed when next used, or "
                         f"`lenslab store rm {key[:12]}`")
        for key in rep.unreadable_entries:
            lines.append(f"unreadable params/meta JSON in entry {key[:12]}: recomputed when next used, or "
                         f"`lenslab store rm {key[:12]}`")
        if rep.temp_files:
            gone = sum(p in removed for p in rep.temp_files)
            lines.append(f"temp files of interrupted writers: {len(rep.temp_files)}; "
                         + (f"removed {gone}, kept {len(rep.temp_files) - gone} younger than 10 minutes (a writer "
                            "may still be running)" if fix else "`lenslab store check --fix` removes them"))
        lines.append("ok" if rep.ok else f"{rep.remaining} problem(s) remain")
        typer.echo("\n".join(lines))
    if not rep.ok:
        raise typer.Exit(1)
