"""Shared helpers of the three attention-SAE pages: cached loaders (keyed on the store root and
entry keys only), the SAE picker and analyses launched under an ``st.progress`` bar."""

from __future__ import annotations


import streamlit as st

from analysis.store import Store
from app import api
from app.allowed_paths import check_source, check_stored_source
from app.state import FP_SHOWN, LINKED, pick_index, run_with_st_progress, write_query

SAE_STATE = "lenslab_sae"  # store key of the SAE last picked on any SAE page
SAE_PARAM = "sae"  # query parameter naming the SAE a view opens on (?sae=<key prefix>)
KEY_SHOWN = 8  # key characters shown after an SAE's name
PICKERS = ("sae_pick", "sae_feat_pick", "sae_prompt_pick")  # the SAE pages' picker widgets
FLASH = "sae_flash"


@st.cache_data(show_spinner="Loading the SAE list…", ttl=5, max_entries=4)
def _list(store_root: str):
    return api.sae_list(store_root)


def sae_table(store: Store):
    """``api.sae_list`` (cached for a few seconds: a new SAE shows up on the next rerun)."""
    return _list(str(store.root))


@st.cache_data(show_spinner="Loading feature data from the store…", max_entries=8)
def _features(store_root: str, key: str):
    return api.find_sae_features(key, store=store_root)


def load_features(store: Store, key: str):
    """Feature data of the SAE ``key`` with the settings the pages compute (``api.find_sae_features``)
    or None (only SAEs with some feature data stored go through the cache)."""
    if not api.has_sae_features(key, store=store):
        return None
    return _features(str(store.root), key)


@st.cache_data(show_spinner="Loading the evaluation…", max_entries=16)
def _evaluation(store_root: str, key: str):
    return api.find_sae_eval(key, store=store_root) or api.find_sae_eval(key, loss=False, store=store_root)


def load_evaluation(store: Store, key: str):
    """The evaluation of the SAE ``key`` with the settings the page runs (``api.find_sae_eval``), else the one
    without loss recovered (``lenslab sae eval --no-loss``, ``lenslab quickstart``), or None."""
    if not api.has_sae_eval(key, store=store):
        return None
    return _evaluation(str(store.root), key)


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=4)
def load_sae(store_root: str, key: str):
    return api.load_sae(key, store=store_root)


def sae_label(name: str, key: str) -> str:
    """An SAE's name with its store-key prefix: two SAEs of the same settings (a re-import) stay apart."""
    return f"{name} · {key[:KEY_SHOWN]}"


def choose_sae(key: str) -> None:
    """Open every SAE page on the SAE ``key`` (e.g. one just trained)."""
    st.session_state[SAE_STATE] = key
    for widget in PICKERS:
        st.session_state.pop(widget, None)


def _picked(widget: str) -> None:
    st.session_state[SAE_STATE] = st.session_state[widget]


def sae_picker(store: Store, table, *, key: str, label: str = "SAE"):
    """A select box over the stored SAEs (rows of ``api.sae_list``), named with their key prefix. It opens
    on the SAE last picked on any SAE page, else the one ``?sae=<key prefix>`` names, else the newest, and
    puts its choice in the URL. Returns the chosen row (a pandas Series)."""
    keys = list(table["key"])
    by_key = {r["key"]: r for _, r in table.iterrows()}
    remembered = st.session_state.get(SAE_STATE)
    query = st.query_params.get(SAE_PARAM, "").strip().lower()
    if remembered not in by_key and query and query != st.session_state.get(LINKED, {}).get(SAE_PARAM):
        found = [k for k in keys if len(query) >= 4 and k.startswith(query)]
        if len(found) == 1:
            remembered = st.session_state[SAE_STATE] = found[0]
        else:
            st.warning(f"The link's ?{SAE_PARAM}={query[:80]} names no SAE shown here (give 4 or more characters "
                       "of a stored SAE's key); showing another one.")
    choice = st.selectbox(label, keys, index=pick_index(key, keys, remembered), key=key,
                          format_func=lambda k: sae_label(by_key[k]["name"], k), on_change=_picked, args=(key,))
    write_query(SAE_PARAM, choice[:FP_SHOWN])
    return by_key[choice]


def train(spec: str, layer: int, **kwargs):
    """``api.sae_train`` on a typed source (refused outside the dashboard's allowed roots)."""
    return api.sae_train(check_source(spec), layer, **kwargs)


def evaluate(key: str, source: str, **kwargs):
    """``api.sae_eval`` of the SAE ``key``, reopening its stored ``source`` only inside the allowed roots."""
    return api.sae_eval(key, source=check_stored_source(source), **kwargs)


def features(key: str, source: str, **kwargs):
    """``api.sae_features`` of the SAE ``key``, reopening its stored ``source`` only inside the allowed roots."""
    return api.sae_features(key, source=check_stored_source(source), **kwargs)


def prompt(key: str, source: str, text: str, **kwargs):
    """``api.sae_prompt`` with the SAE ``key``, reopening its stored ``source`` only inside the allowed roots."""
    return api.sae_prompt(key, text, source=check_stored_source(source), **kwargs)


def run_with_progress(label: str, fn, *args, **kwargs):
    """Run an API call under ``st.progress``; returns its result, or None after ``st.error`` on a
    LensLab error (no traceback). Leaves a success message for the next rerun."""
    out = run_with_st_progress(label, fn, *args, flash_key=FLASH, **kwargs)
    if out is not None:
        _list.clear()
    return out


def flash() -> None:
    """Show (once) the message left by the last successful run."""
    if msg := st.session_state.pop(FLASH, None):
        st.success(msg)
