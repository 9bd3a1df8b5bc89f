"""``lenslab analyze SRC1 SRC2 ... --executor local|ray``: the batch path of the analyze command.

``app.cli.weights.analyze`` hands over here when it gets several sources, a glob, or any of
``--executor --workers --ray-address --by-tensor``; one plain source runs in-process as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from analysis.errors import SourceError, StoreError
from app.cli.tables import print_table

BATCH_OPTIONS = ("executor", "workers", "ray_address", "by_tensor")


def wants_batch(sources: list[str], **options) -> bool:
    """Several sources, an unexpanded glob, or any executor option."""
    glob_like = any(set("*?[") & set(s) and not Path(s).expanduser().exists() for s in sources)
    return len(sources) > 1 or glob_like or any(options.get(k) for k in BATCH_OPTIONS)


def analyze_batch(sources: list[str], *, analysis: str, as_json: bool, refresh: bool, store: Path | None,
                  trust_pickle: bool, executor: str | None, workers: int | None, ray_address: str | None,
                  by_tensor: bool) -> None:
    """Run ``api.analyze_many`` with a progress bar, print one row per source (or JSON rows per
    matrix with a ``source`` key), and exit 2 when any source failed (the others are stored)."""
    from analysis.weights.spectra import CONDITIONING_COLUMNS
    from app import api
    from app.cli.options import console, json_safe as _json_safe, run_with_progress

    kind = executor or "local"
    items = run_with_progress(f"{analysis} of {len(sources)} source(s) on {kind}", api.analyze_many, sources,
                              executor=kind, workers=workers, ray_address=ray_address, by_tensor=by_tensor,
                              store=store, refresh=refresh, trust_pickle=trust_pickle)
    failed = [i for i in items if i.status == "error"]
    if as_json:
        rows = []
        for item in items:
            if item.status == "error":
                continue
            ws = api.find_spectra(item.fingerprint, store)
            if ws is None:
                raise StoreError(f"the spectra of {item.source} were stored by this run but cannot be read back "
                                 "(deleted or corrupted meanwhile); run `lenslab store check`, then analyse it again")
            table = ws.table
            if analysis == "conditioning":
                table = table[[c for c in CONDITIONING_COLUMNS + ["matrix", "status"] if c in table.columns]]
            rows += [{"source": item.source, **{k: _json_safe(v) for k, v in r.items()}}
                     for r in table.to_dict(orient="records")]
        typer.echo(json.dumps(rows, indent=1))
    else:
        out = Table(title=f"{analysis}: {len(items)} sources on {kind} "
                          f"({sum(i.status == 'computed' for i in items)} computed, "
                          f"{sum(i.status == 'cached' for i in items)} cached, {len(failed)} failed)")
        for c in ("source", "status", "matrices", "seconds", "fingerprint"):
            out.add_column(c, justify="right" if c in ("matrices", "seconds") else "left", overflow="fold")
        for i in items:
            out.add_row(i.source, i.status, str(i.n_matrices), f"{i.seconds:.1f}" if i.status == "computed" else "",
                        (i.fingerprint or "")[:12])
        print_table(out)
        if len(failed) < len(items):
            console.print("stored; `lenslab analyze SOURCE` or the dashboard shows one model's table")
    for i in failed:  # the source and error as plain text: a tensor name such as w[expert=0] is no markup
        console.print(Text.assemble(("failed:", "red"), f" {i.source}: {i.error}"), highlight=False)
    if failed:
        raise SourceError(f"{len(failed)} of {len(items)} sources failed (listed above); the other results are "
                          "stored: fix or drop those sources and run again")
