"""Python API for notebooks: open sources and the store, run analyses through the cache.

    >>> from app import api
    >>> spectra = api.analyze("minilm")            # computed once, then served from the store
    >>> api.conditioning("minilm").head()          # one row per matrix, lowest kappa first

Every function takes ``store=`` (a ``Store``, a directory, or None for the default store).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from analysis import spectra as spectra_mod
from analysis.errors import SourceError
from analysis.sources import Source, open_source
from analysis.spectra import CONDITIONING_COLUMNS, Progress, WeightSpectra
from analysis.store import Store

SPECTRA = "spectra"


def open_store(store: Store | str | os.PathLike | None = None) -> Store:
    """A ``Store`` from a Store, a directory path, or None (``$LENSLAB_STORE`` or the cache dir)."""
    return store if isinstance(store, Store) else Store(store)


def spectra_params(welore_tau: float = spectra_mod.WELORE_TAU,
                   lrc_min_fraction: float = spectra_mod.LRC_MIN_FRACTION) -> dict:
    return {"welore_tau": welore_tau, "lrc_min_fraction": lrc_min_fraction}


def register(src: Source, store: Store) -> None:
    """Record the source in the store's model table (label, kind, size)."""
    d = src.describe()
    store.register_model(src.fingerprint, d["label"], d["kind"], n_tensors=d["n_tensors"],
                         n_params=d["n_params"], info={"hf_dir": d["hf_dir"]})


def analyze(source: str | os.PathLike | torch.nn.Module | Source, *, store: Store | str | None = None,
            refresh: bool = False, progress: Progress | None = None, trust_pickle: bool = False) -> WeightSpectra:
    """Spectra and conditioning of every weight matrix of ``source``, cached in the store.

    Reads the checkpoint one tensor at a time. Interrupting (Ctrl-C) stores nothing.
    """
    src = open_source(source, trust_pickle=trust_pickle)
    if not src.weight_infos():
        raise SourceError(f"{src.label}: the checkpoint holds no floating-point tensors, so there is nothing to "
                          "analyse; check that the file is the model's weights and not an empty export")
    st = open_store(store)
    params = spectra_params()

    def compute():
        ws = spectra_mod.weight_spectra(src.iter_tensors(), total=len(src.tensor_infos()), progress=progress)
        return spectra_mod.to_result(ws, {"label": src.label})

    result = st.cached(src.fingerprint, SPECTRA, params, spectra_mod.CODE_VERSION, compute, refresh=refresh)
    register(src, st)
    return spectra_mod.from_result(result)


def conditioning(source: str | os.PathLike | torch.nn.Module | Source, **kwargs) -> pd.DataFrame:
    """The conditioning columns of ``analyze(source)``, one row per matrix, lowest kappa first."""
    table = analyze(source, **kwargs).table
    cols = [c for c in CONDITIONING_COLUMNS if c in table.columns] + ["matrix", "status"]
    return table[cols].sort_values("kappa", kind="stable").reset_index(drop=True)


def stored_spectra(fingerprint: str, store: Store | str | None = None) -> WeightSpectra | None:
    """Spectra already in the store for a model fingerprint, or None (never computes)."""
    st = open_store(store)
    result = st.get(fingerprint, SPECTRA, spectra_params(), spectra_mod.CODE_VERSION)
    return spectra_mod.from_result(result) if result is not None else None


def has_spectra(fingerprint: str, store: Store | str | None = None) -> bool:
    """Whether the store holds spectra for this model fingerprint (an index lookup, no blob read)."""
    return open_store(store).has(fingerprint, SPECTRA, spectra_params(), spectra_mod.CODE_VERSION)


def default_store_dir() -> Path:
    return open_store(None).root


def select(source: str | os.PathLike | torch.nn.Module | Source, budget, *, ranker: str = "lowest_kappa",
           include: str | None = None, exclude: str | None = None, seed: int = 0,
           store: Store | str | None = None, trust_pickle: bool = False, progress: Progress | None = None):
    """KappaTune-style tensor selection (``analysis.selection.select_tensors``) on the cached spectra.

        >>> sel = api.select("minilm", "20%", exclude="embeddings")
        >>> api.export(sel, "peft", "lora.json")
    """
    from analysis.selection import Budget, select_tensors

    budget = Budget.parse(budget)  # fail on a bad budget before any analysis runs
    src = open_source(source, trust_pickle=trust_pickle)
    ws = analyze(src, store=store, progress=progress)
    return select_tensors(ws.table, budget, ranker=ranker, include=include, exclude=exclude, seed=seed,
                          fingerprint=src.fingerprint)


def export(selection, fmt: str, path: str | os.PathLike | None = None, **opts) -> str:
    """Text of ``selection`` in ``fmt`` (params | peft | axolotl; ``opts`` as
    ``analysis.export.export_selection``); also written atomically to ``path`` when given."""
    import tempfile

    from analysis.export import export_selection

    text = export_selection(selection, fmt, **opts)
    if path is not None:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return text
