"""Shared helpers for the dashboard pages: the store, cached loaders, the model picker and
analyses launched with a progress bar.

Caches are keyed on strings only (the store root path and model fingerprints), never on
tensors or arrays: Streamlit hashes large arrays by sampling, so two different arrays could
share a key. ``st.cache_resource`` objects are shared by every session of the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import streamlit as st

from analysis.errors import LensLabError
from analysis.weights.spectra import WeightSpectra
from analysis.store import ModelInfo, Store, default_store_root
from app.allowed_paths import check_source

MODEL_STATE = "lenslab_model"  # fingerprint of the model last picked on any page
MODEL_PARAM = "model"  # query parameter naming the model a view opens on (?model=<fingerprint prefix | label>)
FP_SHOWN = 12  # fingerprint characters in the query parameter
LINKED = "lenslab_linked"  # query values this session wrote itself (not a link to follow): {param: value}
MISSING = "–"  # how a missing value reads in tables and metrics (st.dataframe placeholder)


def store_root() -> str:
    """The store directory as a string: ``$LENSLAB_STORE`` or the user's cache dir."""
    return str(default_store_root())


@st.cache_resource(show_spinner=False)
def _open_store(root: str) -> Store:
    return Store(root)


def get_store() -> Store:
    """The dashboard's store (one ``Store`` per root path, shared across sessions)."""
    return _open_store(store_root())


def has_spectra(store: Store, fingerprint: str) -> bool:
    """Whether the store holds spectra for this model (uncached: a cheap index lookup)."""
    from app import api

    return api.has_spectra(fingerprint, store)


@st.cache_data(show_spinner="Loading spectra from the store…", max_entries=16)
def _load_spectra(store_root: str, key: str) -> WeightSpectra:
    from app import api

    return api.load_spectra(key, _open_store(store_root))


def load_spectra(store: Store, fingerprint: str) -> WeightSpectra | None:
    """Stored spectra of a model, or None when there are none yet (never computes).

    Only present entries go through the cache (keyed by entry key), so a later "Compute" is seen
    at once. Raises CorruptEntryError when the stored blobs fail their checksum.
    """
    from app import api

    params = api.spectra_params()
    key = next((e.key for e in api.list_spectra(fingerprint, store) if e.params == params), None)
    return None if key is None else _load_spectra(str(store.root), key)


def model_label(model: ModelInfo) -> str:
    return f"{model.label} ({model.fingerprint[:8]})"


def _query_match(value: str, models: Sequence[ModelInfo]) -> str | None:
    """The fingerprint ``?model=VALUE`` names: a fingerprint prefix (4+ characters, unique), a label or an alias."""
    value = value.strip()
    exact = [m.fingerprint for m in models if value == m.label or value in m.aliases]
    prefix = [m.fingerprint for m in models if len(value) >= 4 and m.fingerprint.startswith(value.lower())]
    found = list(dict.fromkeys(exact or prefix))
    return found[0] if len(found) == 1 else None


def remembered_model(candidates: Sequence[str], models: Sequence[ModelInfo],
                     preferred: Iterable[str] = ()) -> str | None:
    """The fingerprint a picker over ``candidates`` opens on: the model last chosen on any page of this
    session, else the one the ``?model=`` query parameter names (a linked view; remembered from then on),
    else the first of ``preferred`` (e.g. the models holding what the page shows), else None (the picker's
    first entry). A query value that names no candidate is said in a warning."""
    cands = set(candidates)
    if (fp := st.session_state.get(MODEL_STATE)) in cands:
        return fp
    if (query := st.query_params.get(MODEL_PARAM)) and query != st.session_state.get(LINKED, {}).get(MODEL_PARAM):
        if (fp := _query_match(query, models)) in cands:
            remember_model(fp)
            return fp
        if fp is None or fp != st.session_state.get(MODEL_STATE):
            st.warning(f"The link's ?{MODEL_PARAM}={query[:80]} names no model shown on this page (give a "
                       "fingerprint prefix, a label or an alias of a stored model); showing another one.")
    return next((fp for fp in preferred if fp in cands), None)


def remember_model(fingerprint: str) -> None:
    """Keep ``fingerprint`` as the model chosen for every page of this session."""
    st.session_state[MODEL_STATE] = fingerprint


def picked(key: str, fingerprint_of: Callable[[Any], str] | None = None) -> None:
    """``on_change`` callback of a model (or per-model entry) picker: remember the model the user picked.
    Only a user's pick is remembered, never the entry a page opened on by default."""
    value = st.session_state[key]
    remember_model(value if fingerprint_of is None else fingerprint_of(value))


def link_model(fingerprint: str) -> None:
    """Put the model a view shows in its URL (``?model=<fingerprint prefix>``) so the view can be linked."""
    write_query(MODEL_PARAM, fingerprint[:FP_SHOWN])


def write_query(param: str, value: str) -> None:
    """Set ``?param=value`` in the URL, noting that this session wrote it: only a value that came from a link
    opens a picker on it (a page showing another entry by default must not turn that into a choice)."""
    st.session_state.setdefault(LINKED, {})[param] = value
    if st.query_params.get(param) != value:
        st.query_params[param] = value


def pick_index(key: str, options: Sequence[str], default: str | None) -> int:
    """Index of ``default`` in ``options`` (0 when absent); drops a stale widget value (a deleted option)."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
    return list(options).index(default) if default in options else 0


def model_picker(store: Store, *, key: str, label: str = "Model", empty: str | None = None,
                 prefer: Callable[[ModelInfo], bool] | None = None) -> ModelInfo | None:
    """A select box over the store's models that opens on ``remembered_model`` (the model chosen on any
    page, or the linked one, or the newest for which ``prefer`` holds) and remembers the choice.

    Shows an info box (``empty``, or how to analyse a first model) and returns None when the store holds no models.
    """
    models = store.models()
    if not models:
        st.info(empty or "No models in the store yet. Run `lenslab analyze minilm` in a terminal, "
                         "or press **Analyse** on the Models page.")
        return None
    by_fp = {m.fingerprint: m for m in models}
    fps = list(by_fp)
    preferred = [m.fingerprint for m in models if prefer is not None and prefer(m)]
    index = pick_index(key, fps, remembered_model(fps, models, preferred))
    fp = st.selectbox(label, fps, index=index, key=key, format_func=lambda f: model_label(by_fp[f]),
                      on_change=picked, args=(key,))
    link_model(fp)
    return by_fp[fp]


def analyze_with_progress(spec: str, store: Store, *, refresh: bool = False) -> WeightSpectra | None:
    """Run ``app.api.analyze(spec)`` into ``store`` under an ``st.progress`` bar.

    Returns the spectra, or None after showing a LensLab error with ``st.error`` (no traceback).
    The source spec is a bundled name, or a path on the server's disk inside the allowed roots
    (``app.allowed_paths``); a path outside them is refused without being opened.
    """
    from app import api

    try:
        source = check_source(spec)
    except LensLabError as exc:
        st.error(str(exc))
        return None
    bar = st.progress(0.0, text=f"Analysing {spec}: reading the checkpoint…")

    def progress(done: int, total: int, item: str) -> None:
        frac = min(done / total, 1.0) if total else 0.0
        bar.progress(frac, text=f"Analysing {spec}: {done}/{total or '?'} tensors · {item[-60:]}")

    start = time.perf_counter()
    try:
        ws = api.analyze(source, store=store, refresh=refresh, progress=progress)
    except LensLabError as exc:
        bar.empty()
        st.error(str(exc))
        return None
    bar.progress(1.0, text=f"Analysed {spec}: {len(ws.table)} matrices in {time.perf_counter() - start:.1f} s")
    return ws


def clear_caches() -> None:
    """Drop every cached store handle and loaded result (used by tests and after deletes)."""
    _load_spectra.clear()
    _open_store.clear()


def run_with_st_progress(label: str, fn, *args, flash_key: str, **kwargs):
    """Run an API call ``fn(*args, progress=..., **kwargs)`` under ``st.progress``; returns its
    result, or None after ``st.error`` on a LensLab error (no traceback). On success leaves
    "LABEL: done in N s." under ``st.session_state[flash_key]`` for the next rerun to show."""
    bar = st.progress(0.0, text=f"{label}…")

    def progress(done: int, total: int, item: str) -> None:
        bar.progress(min(done / total, 1.0) if total else 0.0, text=f"{label}: {item[-80:]}")

    start = time.perf_counter()
    try:
        out = fn(*args, progress=progress, **kwargs)
    except LensLabError as exc:
        bar.empty()
        st.error(str(exc))
        return None
    bar.empty()
    st.session_state[flash_key] = f"{label}: done in {time.perf_counter() - start:.1f} s."
    return out
