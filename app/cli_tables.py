"""How every ``lenslab`` command prints a result table on stdout."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 160  # columns when stdout is not a terminal (a pipe, a file, `make run`)


def print_table(table: Table) -> None:
    """Print ``table`` on stdout: at the terminal's width, or ``PIPED_WIDTH`` columns when piped
    (rich would assume 80 and fold every tensor name)."""
    console = Console()
    (console if console.is_terminal else Console(width=PIPED_WIDTH)).print(table)
