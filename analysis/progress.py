"""The one progress type and its helpers.

A progress callback is called as ``progress(done, total, label)`` (``done`` of ``total`` steps of
the current stage, ``label`` the item being worked on). ``None`` means nobody is listening.
Nested stages report through ``sub_progress``: the child's label is prefixed, so a CLI bar or a
``st.progress`` shows "harvest: batch 3/40" for the inner loop of a longer run.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # (done, total, current label)


def tick(progress: Progress | None, done: int, total: int, label: str) -> None:
    """Report to ``progress`` if there is one."""
    if progress is not None:
        progress(done, total, label)


def sub_progress(progress: Progress | None, prefix: str) -> Progress | None:
    """A child callback that reports to ``progress`` with ``prefix: `` before its labels."""
    if progress is None:
        return None
    return lambda done, total, label: progress(done, total, f"{prefix}: {label}" if label else prefix)
