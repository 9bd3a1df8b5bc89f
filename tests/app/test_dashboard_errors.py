"""A page that fails shows one short line in the browser, never a traceback or a server path; the traceback
goes to the server log (``app.page_errors``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.errors import ConfigError

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
SECRET = "/srv/lenslab-internal/store/index.sqlite"  # a server path the browser must not see


def _open_steering() -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=90).run()
    at.switch_page("views/steering.py").run()
    return at


def _shown(at: AppTest) -> str:
    """Everything the page put on screen, as text."""
    return "\n".join(str(getattr(el, "value", "")) for el in at.main) + "\n".join(str(e.value) for e in at.exception)


@pytest.mark.usefixtures("dashboard_store", "page_errors_expected")
def test_an_unexpected_error_is_one_line_with_an_id_and_its_traceback_is_logged(monkeypatch, caplog):
    from app import api

    def broken(*args, **kwargs):
        raise PermissionError(13, "Permission denied", SECRET)

    monkeypatch.setattr(api, "stored_extractions", broken)
    with caplog.at_level(logging.ERROR, logger="lenslab.dashboard"):
        at = _open_steering()
    assert not at.exception, [e.value for e in at.exception]
    (error,) = [e.value for e in at.error]
    found = re.fullmatch(r"Unexpected error ([0-9a-f]{8}) \(PermissionError\)\. The details are in the dashboard's "
                         r"server log under this id; .*", error)
    assert found, error
    shown = _shown(at)
    assert error in shown and "Steering vectors" in shown  # what the page drew before it failed stays
    assert SECRET not in shown and "Traceback" not in shown and "steering.py" not in shown
    (record,) = [r for r in caplog.records if r.name == "lenslab.dashboard"]
    assert record.levelno == logging.ERROR and found.group(1) in record.getMessage()
    logged = caplog.text
    assert "Traceback" in logged and SECRET in logged and "steering.py" in logged


@pytest.mark.usefixtures("dashboard_store", "page_errors_expected")
def test_an_uncaught_lenslab_error_shows_its_message_only(monkeypatch, caplog):
    from app import api

    def refused(*args, **kwargs):
        raise ConfigError("alpha=7 is out of range [-1, 1]; give a smaller alpha")

    monkeypatch.setattr(api, "stored_extractions", refused)
    with caplog.at_level(logging.WARNING, logger="lenslab.dashboard"):
        at = _open_steering()
    assert not at.exception
    assert [e.value for e in at.error] == ["alpha=7 is out of range [-1, 1]; give a smaller alpha"]
    assert "Traceback" not in _shown(at) and "test_dashboard_errors.py" not in _shown(at)
    assert "Traceback" in caplog.text and "ConfigError: alpha=7" in caplog.text
