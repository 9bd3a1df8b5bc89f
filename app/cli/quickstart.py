"""``lenslab quickstart``: fill the store with one small, real result per analysis (``app/first_run.py``).

    lenslab quickstart                       # every step into the default store (what `make run` does first)
    lenslab quickstart --step spectra --step sae --store /tmp/s
    lenslab quickstart --list                # the steps, what they compute, the pages they fill

Each step shows a progress bar on a terminal and one plain line per stage when piped, then one line:
how long it took and how many results it stored (0: found in the store). A step that fails is reported
and the others still run (exit 1 at the end); Ctrl-C stops at once (exit 130), keeping every finished
result. Registered on the main app in ``app/cli/__init__.py``.
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from app.cli.options import StoreOpt, console, run_with_progress


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def quickstart(
    store: StoreOpt = None,
    step: Annotated[Optional[list[str]], typer.Option("--step", help="Run only this step (repeatable); "
                                                                     "`--list` names them.")] = None,
    list_steps: Annotated[bool, typer.Option("--list", help="List the steps and exit.")] = False,
) -> None:
    """Fill the store with one small, real result per analysis, so every dashboard page shows one; results
    already stored are reused (a second run takes seconds)."""
    from app import api, first_run
    from app.cli.exit_codes import error, say

    if list_steps:
        for s in first_run.STEPS:
            typer.echo(f"{s.name:<11} {s.what} (pages: {', '.join(s.pages)})")
        return
    chosen = first_run.pick(step)
    st = api.open_store(store)
    console.print(f"quickstart: {len(chosen)} steps into {st.root}", soft_wrap=True, highlight=False)
    start = time.perf_counter()
    failed, new = [], 0
    for i, s in enumerate(chosen, 1):
        try:
            out = run_with_progress(f"[{i}/{len(chosen)}] {s.name}: {s.what}", first_run.run_step, s, st)
        except Exception as exc:  # noqa: BLE001  (one step's failure must not stop the others; Ctrl-C does)
            error(f"step {s.name} failed ({type(exc).__name__}: {exc}); the other steps go on")
            failed.append(s.name)
            continue
        new += out.new_entries
        done = f"{out.new_entries} new results stored" if out.new_entries else "found in the store"
        console.print(f"  {s.name}: {done} ({_duration(out.seconds)})", soft_wrap=True, highlight=False)
    total = _duration(time.perf_counter() - start)
    if failed:
        error(f"quickstart: {len(failed)} of {len(chosen)} steps failed ({', '.join(failed)}) in {total}; the "
              "others' results are in the store, run it again to retry")
        raise typer.Exit(1)
    say(f"quickstart: {len(chosen)} steps in {total}, {new} new results in {st.root}; "
        "`lenslab dashboard` shows them")
