"""What every ``lenslab`` command shares: the stderr console, the common options, the progress display.

Options are ``Annotated`` types, declared once here and used as ``store: StoreOpt = None`` in any
command module. ``run_with_progress`` shows a rich bar on a terminal and, when stderr is not a
terminal (CI logs, pipes), plain lines instead of redrawn bars: one when the run starts, one when
each stage ends with its counts and rate (``  harvest: 40,960/40,960 tokens, 9,120 tokens/s,
4.5 s``), one whenever ``HEARTBEAT_S`` seconds passed without one (with the counts so far, or, in
a phase that reports nothing such as a model booting, the time since the last report), and one
when the run is done.
Off a terminal nothing is wrapped at 80 columns: ``console`` prints each message on one line, and
``app.cli.tables.print_table`` widens a table to its natural width.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from analysis.device import DEVICES


class _Console(Console):
    """A rich console that never wraps a message when its stream is not a terminal (a pipe, a file,
    a CI log): rich would fold at 80 columns and split tensor names and paths. Its messages are
    plain text, not markup (``w[expert=0]`` would lose its bracket): style with ``rich.text.Text``."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:  # noqa: A003
        super().print(*objects, soft_wrap=(not self.is_terminal) if soft_wrap is None else soft_wrap, **kwargs)


console = _Console(stderr=True, markup=False)

StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Store directory (default: $LENSLAB_STORE "
                                                                  "or the user cache dir).")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow pickle checkpoints (weights_only=True).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON rows instead of a table.")]
RefreshOpt = Annotated[bool, typer.Option("--refresh", help="Recompute even if stored.")]
DeviceOpt = Annotated[str, typer.Option("--device", help=f"Where torch computes: {' | '.join(DEVICES)} "
                                                         "(auto: CUDA, then MPS, else CPU).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]

HEARTBEAT_S = 30.0  # off a terminal, a line at least this often while a command runs
BEAT_EVERY_S = 5.0  # how often the timer thread checks (``PipedProgress.beat``)
# What a stage's progress counts (the stage is the label's text before ": "); others print bare counts.
UNITS = {"harvest": "tokens", "train": "steps", "features": "tokens", "spectra": "tensors"}


def _bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[item]}", markup=False), TimeElapsedColumn(), console=console, transient=True)


def _stage(label: str) -> str:
    """The stage of a progress label: its text before the first ': ' (``harvest: batch 3`` -> ``harvest``)."""
    return label.split(": ", 1)[0] if ": " in label else ""


def _rate(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 else f"{n:.1f}" if n >= 1 else f"{n:.2g}"


class PipedProgress:
    """A progress callback printing plain lines (see the module docstring) for a stream that is not a
    terminal. A stage's rate is measured between its first and its last report (what was done before
    the first report is not timed), or, for a stage reported once, from the report before it;
    ``clock`` is injectable for tests. ``beat()``, called from a timer thread, prints a line when
    nothing was printed for ``HEARTBEAT_S`` seconds, so a phase that reports nothing (a model
    booting) is not silent either."""

    def __init__(self, description: str, *, clock=None) -> None:
        self.clock = clock or time.monotonic
        self.lock = threading.Lock()
        self.stage: str | None = None  # current stage ("" for labels without one)
        self.done = self.total = self.first_done = 0
        self.label = ""
        self.start = self.before = self.first = self.last = self.last_line = self.clock()
        console.print(f"{description} …", highlight=False, markup=False)

    def __call__(self, done: int, total: int, label: str) -> None:
        with self.lock:
            now = self.clock()
            stage = _stage(label)
            if stage != self.stage:
                self._end_stage()
                self.stage, self.before, self.first, self.first_done = stage, self.last, now, int(done)
            self.done, self.total, self.last, self.label = int(done), int(total or 0), now, label
            if now - self.last_line >= HEARTBEAT_S:
                self._line(now, self._beat_text(now))

    def beat(self) -> None:
        """A line if none was printed for ``HEARTBEAT_S`` seconds (``_beat_text``)."""
        with self.lock:
            now = self.clock()
            if now - self.last_line >= HEARTBEAT_S:
                self._line(now, self._beat_text(now))

    def _beat_text(self, now: float) -> str:
        """The counts and rate so far when a report came in the last ``HEARTBEAT_S`` seconds, else how
        long it has been since the last report and what it said."""
        if self.label and now - self.last < HEARTBEAT_S:
            return f"{self._counts(self.stage or '', self.first, self.first_done)} so far ({self.label})"
        what = f" (last report: {self.label})" if self.label else ""
        return f"working, {now - self.start:,.0f} s in, {now - self.last:,.0f} s since the last report{what}"

    def finish(self) -> None:
        """Print the last stage's line, then the run's total time (with its counts and rate when its
        labels name no stage: ``done: 104/104, 111/s, 0.9 s``, timed from the start of the run)."""
        with self.lock:
            now = self.clock()
            top = self.stage == "" and self.done
            self._end_stage()
            self.last = now
            self._line(now, f"done: {self._counts('', self.start, 0)}" if top
                       else f"done in {now - self.start:,.1f} s")

    def _counts(self, stage: str, since: float, since_done: int) -> str:
        unit = UNITS.get(stage, "")
        counts = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        seconds, n = self.last - since, self.done - since_done
        rate = f", {_rate(n / seconds)}{f' {unit}/s' if unit else '/s'}" if seconds > 0 and n > 0 else ""
        return f"{stage + ': ' if stage else ''}{counts}{' ' + unit if unit else ''}{rate}, {seconds:,.1f} s"

    def _end_stage(self) -> None:
        if self.stage:  # a named stage ended: its counts, rate and time (one report: timed from the one before)
            one = self.last == self.first or self.done == self.first_done
            self._line(self.last, self._counts(self.stage, self.before if one else self.first,
                                               0 if one else self.first_done))
        self.stage = None

    def _line(self, now: float, text: str) -> None:
        self.last_line = now
        console.print(f"  {text}", highlight=False, markup=False)


def quiet_library_bars() -> None:
    """Turn off the tqdm bars of transformers and huggingface_hub ("Loading weights: 0%|…" redrawn with
    carriage returns), which would interleave with the plain lines off a terminal."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is first imported
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def run_with_progress(description: str, fn, *args, **kwargs) -> Any:
    """Call ``fn(*args, progress=callback, **kwargs)`` with progress on stderr: a bar on a terminal,
    else plain lines (``PipedProgress``)."""
    if not console.is_terminal:
        quiet_library_bars()
        lines, stop = PipedProgress(description), threading.Event()

        def beat_until_stopped() -> None:
            while not stop.wait(BEAT_EVERY_S):
                lines.beat()

        beats = threading.Thread(target=beat_until_stopped, name="lenslab-progress", daemon=True)
        beats.start()
        try:
            out = fn(*args, progress=lines, **kwargs)
        finally:
            stop.set()
            beats.join()
        lines.finish()
        return out
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
