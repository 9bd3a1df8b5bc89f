"""How every ``lenslab`` command prints a result table (on stdout, or stderr when stdout carries data)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 160  # columns when the stream is not a terminal (a pipe, a file, `make run`)


def print_table(table: Table, *, stderr: bool = False) -> None:
    """Print ``table`` on stdout (``stderr=True``: on stderr, for commands whose stdout is the
    data, e.g. ``lenslab select``): at the terminal's width, or ``PIPED_WIDTH`` columns when that
    stream is piped (rich would assume 80 and fold every tensor name)."""
    console = Console(stderr=stderr)
    (console if console.is_terminal else Console(stderr=stderr, width=PIPED_WIDTH)).print(table)
