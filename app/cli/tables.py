"""How every ``lenslab`` command prints a result table (on stdout, or stderr when stdout carries data)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

PIPED_WIDTH = 160  # the least width of a table when the stream is not a terminal (a pipe, a file, `make run`)


def print_table(table: Table, *, stderr: bool = False) -> None:
    """Print ``table`` on stdout (``stderr=True``: on stderr, for commands whose stdout is the
    data, e.g. ``lenslab select``): at the terminal's width, or, when that stream is piped, at the
    table's natural width (at least ``PIPED_WIDTH``), so no cell is folded: rich would assume 80
    columns and split every long tensor name. Cells, title and caption are plain text, never rich
    markup: ``w[expert=0]`` or a ``[unused0]`` token would otherwise vanish as a style tag."""
    _plain(table)
    console = Console(stderr=stderr)
    if console.is_terminal:
        console.print(table)
        return
    wide = Console(stderr=stderr, width=100_000)
    width = max(PIPED_WIDTH, wide.measure(table).maximum)
    out = Console(stderr=stderr, width=width)
    # a title or caption wider than the table would wrap at the table's width: print it as its own line
    title, caption = table.title, table.caption
    if title and wide.measure(title).maximum > wide.measure(table).maximum:
        table.title = None
        out.print(title, soft_wrap=True, highlight=False)
    if caption and wide.measure(caption).maximum > wide.measure(table).maximum:
        table.caption = None
    out.print(table)
    if caption is not None and table.caption is None:
        out.print(caption, soft_wrap=True, highlight=False, style="dim")


def _plain(table: Table) -> None:
    """Every string cell, the title and the caption of ``table`` as ``Text`` (no markup parsing)."""
    for column in table.columns:
        column._cells = [Text(c) if isinstance(c, str) else c for c in column._cells]
    if isinstance(table.title, str):
        table.title = Text(table.title, style="table.title")
    if isinstance(table.caption, str):
        table.caption = Text(table.caption, style="table.caption")
