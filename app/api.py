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

from analysis.weights import spectra as spectra_mod
from analysis.errors import SourceError
from analysis.sources import Source, open_source
from analysis.weights.spectra import CONDITIONING_COLUMNS, Progress, WeightSpectra
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
    """KappaTune-style tensor selection (``analysis.weights.selection.select_tensors``) on the cached spectra.

        >>> sel = api.select("minilm", "20%", exclude="embeddings")
        >>> api.export(sel, "peft", "lora.json")
    """
    from analysis.weights.selection import Budget, select_tensors

    budget = Budget.parse(budget)  # fail on a bad budget before any analysis runs
    src = open_source(source, trust_pickle=trust_pickle)
    ws = analyze(src, store=store, progress=progress)
    return select_tensors(ws.table, budget, ranker=ranker, include=include, exclude=exclude, seed=seed,
                          fingerprint=src.fingerprint)


def export(selection, fmt: str, path: str | os.PathLike | None = None, **opts) -> str:
    """Text of ``selection`` in ``fmt`` (params | peft | axolotl; ``opts`` as
    ``analysis.weights.export.export_selection``); also written atomically to ``path`` when given."""
    import tempfile

    from analysis.weights.export import export_selection

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


# -- experiments ------------------------------------------------------------------------------
def kappatune_experiment(source: str | os.PathLike | Source = "minilm", *, budget: str | int | float = "20%",
                         seeds: int = 3, steps: int = 100, store: Store | str | None = None,
                         progress: Progress | None = None, refresh: bool = False, **settings):
    """KappaTune forgetting experiment (``analysis.weights.forgetting``), cached in the store.

    Fine-tunes ``source`` (a Hugging Face encoder directory; default the bundled MiniLM) on the
    docstring-package task with each arm (lowest_kappa, highest_kappa, random, full, head_only)
    at the same ``budget`` for ``seeds`` seeds and ``steps`` steps, and measures held-out
    embedding drift. ``settings``: any other ``ForgettingConfig`` field (``autocast=True``,
    ``lr=...``). Returns a ``ForgettingResult`` (``.runs`` one row per arm x seed, ``.summary``
    one row per arm). Interrupting (Ctrl-C) stores no experiment entry.

        >>> res = api.kappatune_experiment("minilm", seeds=3)
        >>> res.summary[["arm", "accuracy_mean", "drift_mean", "spearman_mean"]]
    """
    from analysis.weights import forgetting as fg
    from analysis.errors import ConfigError

    unknown = sorted(set(settings) - set(fg.ForgettingConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown experiment setting(s) {unknown}; valid: "
                          f"{', '.join(fg.ForgettingConfig.__dataclass_fields__)}")
    config = fg.ForgettingConfig(budget=budget, seeds=seeds, steps=steps, **settings)
    src = open_source(source)
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: the forgetting experiment fine-tunes the model, so it needs a Hugging Face "
                          "encoder directory (config.json + tokenizer), e.g. 'minilm'")
    st = open_store(store)

    def compute():
        table = analyze(src, store=st).table if set(config.arms) & set(fg.SELECTION_ARMS) else None
        model, tokenizer = fg.load_encoder(src.model_dir())
        return fg.to_result(fg.kappatune_forgetting(model, tokenizer, table, config, progress=progress))

    result = st.cached(src.fingerprint, fg.ANALYSIS, config.params(), fg.CODE_VERSION, compute, refresh=refresh)
    register(src, st)
    return fg.from_result(result)


def stored_kappatune_experiments(store: Store | str | None = None) -> list:
    """Stored forgetting experiments, newest first: ``(EntryInfo, ForgettingResult)`` pairs (never computes).

    Entries whose blobs fail their checksum are skipped."""
    from analysis.weights import forgetting as fg
    from analysis.errors import CorruptEntryError

    st = open_store(store)
    out = []
    for entry in st.list(analysis=fg.ANALYSIS):
        if entry.code_version != fg.CODE_VERSION:
            continue
        try:
            result = st.get_by_key(entry.key)
        except CorruptEntryError:
            continue
        if result is not None:
            out.append((entry, fg.from_result(result)))
    return out


# -- bilinear MLPs (issue 4): train the tiny models, decompose GLU layers -------------------------
BILINEAR = "bilinear.decompose"
BILINEAR_TRAIN_KINDS = {"digits": "bilinear-digits", "lm": "bilinear-llama", "mixtral": "mixtral"}


def bilinear_train(kind: str = "digits", *, force: bool = False, progress=None, **overrides):
    """Train (or reuse from the model cache) ``digits`` | ``lm`` | ``mixtral``; ``overrides`` are
    ``analysis.models.bilinear_digits.DigitsConfig`` / ``analysis.models.tiny_lm.TinyLMConfig`` fields.
    Returns ``analysis.models.tiny_lm.TrainedModel`` (path, config, metrics such as test accuracy or loss)."""
    from analysis.models import tiny_lm as tiny_models
    from analysis.errors import ConfigError

    if kind not in BILINEAR_TRAIN_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of {', '.join(BILINEAR_TRAIN_KINDS)}")
    if kind == "digits":
        return tiny_models.train_digits(force=force, progress=progress, **overrides)
    return tiny_models.train_tiny_lm(BILINEAR_TRAIN_KINDS[kind], force=force, progress=progress, **overrides)


def bilinear_params(layer: int = 0, direction: str | None = None, expert: int | None = None,
                    n_eval: int = 256) -> dict:
    """Store parameters of a decomposition (the direction spec in canonical form)."""
    from analysis.bilinear.loader import spec_params

    return {"layer": int(layer), "expert": expert, "n_eval": int(n_eval), **spec_params(direction)}


def bilinear_decompose(source: str | os.PathLike | torch.nn.Module | Source = "bilinear-digits", *, layer: int = 0,
                       direction: str | None = None, expert: int | None = None, n_eval: int = 256,
                       store: Store | str | None = None, refresh: bool = False, progress=None,
                       trust_pickle: bool = False):
    """Eigendecomposition of the GLU / bilinear layer ``layer`` of ``source`` along ``direction``
    (``class:all``, ``token:the,def``, ``resid:3``, ``vector:u.npy``, ``sae:DIR:5``, ``hosvd:8``;
    None = HOSVD), cached in the store. Returns ``analysis.bilinear.report.BilinearReport``.

        >>> rep = api.bilinear_decompose("bilinear-digits", direction="class:all")
        >>> rep.images.shape           # (10 classes, 64 eigenvectors, 8, 8)
    """
    from analysis.bilinear import report as bilinear_report

    params = bilinear_params(layer, direction, expert, n_eval)  # fails on a bad spec before any work
    src = open_source(source, trust_pickle=trust_pickle)
    st = open_store(store)

    def compute():
        return bilinear_report.to_result(bilinear_report.build_report(
            src, layer=layer, direction=params["direction"], expert=expert, n_eval=n_eval, progress=progress))

    result = st.cached(src.fingerprint, BILINEAR, params, bilinear_report.CODE_VERSION, compute, refresh=refresh)
    register(src, st)
    return bilinear_report.from_result(result)


def stored_bilinear(fingerprint: str | None = None, store: Store | str | None = None) -> list:
    """Index rows (``EntryInfo``) of stored decompositions, newest first (never computes)."""
    from analysis.bilinear import report as bilinear_report

    st = open_store(store)
    return [e for e in st.list(fingerprint=fingerprint, analysis=BILINEAR)
            if e.code_version == bilinear_report.CODE_VERSION]


def load_bilinear(key: str, store: Store | str | None = None):
    """The stored decomposition with this entry key, or None."""
    from analysis.bilinear import report as bilinear_report

    result = open_store(store).get_by_key(key)
    return bilinear_report.from_result(result) if result is not None else None


# -- MMoE probes, expert specialisation, routed MoEs (issue 5): implemented in app/api_mmoe.py ----
from app.api_mmoe import (BiasDemo, DataSpec, ExpertReport, MMoECurve, experts_routing,  # noqa: E402,F401
                          load_expert_report, load_mmoe_curve, mmoe_analyze, mmoe_bias, mmoe_curves, mmoe_features,
                          mmoe_probe, mmoe_train, stored_bias_demos, stored_routing)

# -- steering vectors (issue 6): implemented in app/api_steering.py ---------------------------------
from app.api_steering import (contrast_sets, export_steering_gguf, load_dose_response,  # noqa: E402,F401
                              load_extraction, load_steering_vector, save_steering_vector, steer_dose_response,
                              steer_extract, steer_generate, steer_orthogonalize, steer_sweep, steer_vector,
                              stored_dose_response, stored_dose_responses, stored_extractions,
                              stored_layer_sweep)

# -- batch runs over many sources, local processes or Ray (issue 7): app/api_batch.py -----------------
from app.api_batch import BatchItem, analyze_many  # noqa: E402,F401

# -- attention-output SAEs (issue 3): sae/pipeline.py, sae/saelens_io.py ----------------------------
from sae.pipeline import (SAEEvaluation, TrainedSAE, evaluate_sae, find_sae, find_sae_eval,  # noqa: E402,F401
                          find_sae_features, has_sae_eval, has_sae_features, list_saes, load_sae, sae_eval,
                          sae_features, sae_list, sae_polysemantic, sae_prompt, sae_train, stored_sae_eval,
                          stored_sae_features, train_sae)
from sae.saelens_io import export_saelens, import_saelens, sae_export, sae_import  # noqa: E402,F401
