"""What the browser shows when a dashboard page fails, and what the server log gets.

Streamlit shows an uncaught exception with its message and traceback, which name files on the
server. ``run_page`` runs a page instead so that the browser gets one short line:

- a ``LensLabError`` (typed: its message names the value, the constraint and the fix): that message;
- any other exception: "Unexpected error <id>" with the exception's type and where to look, never
  its message or traceback.

Both are logged with their full traceback on the ``lenslab.dashboard`` logger (to the terminal
running the server), under the same id. What could still escape before a page runs is redacted by
Streamlit itself: ``client.showErrorDetails = "none"`` in ``.streamlit/config.toml`` and in the
flags of ``lenslab dashboard``.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import streamlit as st

from analysis.errors import LensLabError

LOG = logging.getLogger("lenslab.dashboard")


def unexpected_message(exc: BaseException, error_id: str) -> str:
    """The browser's line for an exception that is not a LensLabError (no message, no path)."""
    return (f"Unexpected error {error_id} ({type(exc).__name__}). The details are in the dashboard's server log "
            f"under this id; please report it with the steps that led here.")


def run_page(page: Any) -> None:
    """``page.run()`` (an ``st.Page``), showing a failure as one short ``st.error`` and logging its
    traceback. ``st.stop`` / ``st.rerun`` are not exceptions (BaseException) and pass through."""
    title = getattr(page, "title", "?")
    try:
        page.run()
    except LensLabError as exc:
        LOG.warning("page %r: %s: %s", title, type(exc).__name__, exc, exc_info=exc)
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001 -- the browser must never get the traceback
        error_id = secrets.token_hex(4)
        LOG.error("page %r failed with an unexpected error %s", title, error_id, exc_info=exc)
        st.error(unexpected_message(exc, error_id))
