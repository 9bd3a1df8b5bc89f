"""What every ``lenslab`` command shares: the stderr console, the common options, the progress display.

Options are ``Annotated`` types, declared once here and used as ``store: StoreOpt = None`` in any
command module. ``run_with_progress`` shows a rich bar on a terminal and, when stderr is not a
terminal (CI logs, pipes), one plain line per stage instead of redrawn bars.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from analysis.device import DEVICES

console = Console(stderr=True)

StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Store directory (default: $LENSLAB_STORE "
                                                                  "or the user cache dir).")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow pickle checkpoints (weights_only=True).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON rows instead of a table.")]
RefreshOpt = Annotated[bool, typer.Option("--refresh", help="Recompute even if stored.")]
DeviceOpt = Annotated[str, typer.Option("--device", help=f"Where torch computes: {' | '.join(DEVICES)} "
                                                         "(auto: CUDA, then MPS, else CPU).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]


def _bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[item]}"), TimeElapsedColumn(), console=console, transient=True)


def _stage(label: str) -> str:
    """The stage of a progress label: its text before the first ': ' (``harvest: batch 3`` -> ``harvest``)."""
    return label.split(": ", 1)[0] if ": " in label else ""


def run_with_progress(description: str, fn, *args, **kwargs) -> Any:
    """Call ``fn(*args, progress=callback, **kwargs)`` with progress on stderr: a bar on a terminal,
    else one line when the run starts and one per new stage."""
    if not console.is_terminal:
        seen: set[str] = set()
        console.print(f"{description} …", soft_wrap=True, highlight=False)

        def line(done: int, total: int, item: str) -> None:
            stage = _stage(item)
            if stage and stage not in seen:
                seen.add(stage)
                console.print(f"  {stage} …", soft_wrap=True, highlight=False)

        return fn(*args, progress=line, **kwargs)
    with _bar() as bar:
        task = bar.add_task(description, total=None, item="")

        def callback(done: int, total: int, item: str) -> None:
            bar.update(task, completed=done, total=total or None, item=item[-60:])

        return fn(*args, progress=callback, **kwargs)


def json_rows(table: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as JSON-safe dicts (``json_safe`` on every value)."""
    return [{k: json_safe(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def json_safe(value: Any) -> Any:
    """A JSON-serialisable scalar: NaN -> None, ±inf -> "inf"/"-inf", numpy scalars -> Python."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item"):
        return json_safe(value.item())
    return value
