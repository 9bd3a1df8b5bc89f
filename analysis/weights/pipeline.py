"""Entry points of the weight analyses: spectra and conditioning, KappaTune selection and export, and
the KappaTune forgetting experiment, each stored analysis declared once for the runner
(``analysis/run.py``); ``app.api`` re-exports every public name.

    >>> from app import api
    >>> ws = api.analyze("minilm")                     # computed once, then served from the store
    >>> sel = api.select("minilm", "20%")                # the linear weights PEFT would rank
    >>> api.export(sel, "peft", "lora.json")           # written atomically
    >>> res = api.experiment_kappatune("minilm", seeds=3)

Store keys (byte-identical to what earlier versions wrote, so their stores still load):

- spectra: analysis ``"spectra"``, code version ``spectra.CODE_VERSION`` (``"spectra-1"``), params
  ``spectra_params()`` = ``{"welore_tau": 0.175, "lrc_min_fraction": 0.5}``;
- the forgetting experiment: analysis ``forgetting.ANALYSIS``, code version
  ``forgetting.CODE_VERSION``, params ``ForgettingConfig.params()``.

The device is not in the keys. Spectra are float64 wherever they are computed: ``device="auto"``
means CUDA when available, else the CPU (MPS has no float64; asking for ``mps`` explicitly is a
ConfigError), and a CPU run is unchanged. The experiment trains in float32 on any device
(``auto``: CUDA, then MPS, else CPU); the spectra it ranks tensors by are computed on the CPU
when that device is MPS.

Reading back: ``find_spectra`` / ``has_spectra`` / ``list_spectra`` / ``load_spectra``;
``stored_experiments`` / ``load_experiment``. ``DEPRECATED`` maps each old name (still callable,
with its old behaviour and a DeprecationWarning) to its replacement.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from analysis.atomic_write import write_text_atomic
from analysis.device import resolve_device, resolve_float64_device
from analysis.errors import ConfigError, CorruptEntryError, SourceError
from analysis.models.encoder import load_encoder
from analysis.progress import Progress
from analysis.run import (Analysis, RunContext, StoreLike, Subject, find, has, load, open_store, register, run,
                          stored)
from analysis.sources import Source, open_source
from analysis.store import EntryInfo
from analysis.weights import forgetting as fg
from analysis.weights import forgetting_matched as fm
from analysis.weights import spectra as spectra_mod
from analysis.weights.export import export_selection
from analysis.weights.matrices import require_matrices
from analysis.weights.selection import RANKERS, Budget, Selection, select_tensors
from analysis.weights.spectra import CONDITIONING_COLUMNS, WeightSpectra

if TYPE_CHECKING:
    from analysis.store import Result

SPECTRA_NAME = "spectra"  # the store's analysis column of the spectra (in every key: never change it)
DEPRECATED = {  # old name -> new name (each old name still works as before, with a DeprecationWarning)
    "stored_spectra": "find_spectra",
    "kappatune_experiment": "experiment_forgetting",
    "stored_kappatune_experiments": "stored_experiments",  # then load_experiment(entry.key) for each
}


# -- spectra and conditioning -----------------------------------------------------------------
def spectra_params(welore_tau: float = spectra_mod.WELORE_TAU,
                   lrc_min_fraction: float = spectra_mod.LRC_MIN_FRACTION) -> dict[str, float]:
    """The spectra's store-key params: the WeLore settings of the ``welore_fraction`` and ``low_rank`` columns."""
    return {"welore_tau": welore_tau, "lrc_min_fraction": lrc_min_fraction}


def _compute_spectra(subject: Subject, params: dict[str, float], ctx: RunContext) -> Result:
    if params != spectra_params():
        raise ConfigError(f"spectra are computed with the default WeLore settings {spectra_params()}, not {params}; "
                          "call analyze() without custom spectra params")
    src = subject.source
    ws = spectra_mod.weight_spectra(src.iter_tensors(), total=len(src.tensor_infos()), progress=ctx.report,
                                    device=ctx.device)
    return spectra_mod.to_result(ws, {"label": src.label})


SPECTRA: Analysis[WeightSpectra] = register(Analysis(
    name=SPECTRA_NAME, code_version=spectra_mod.CODE_VERSION, compute=_compute_spectra,
    from_result=spectra_mod.from_result,
    doc="Singular-value spectra and conditioning of every weight matrix (analysis.weights.spectra)."))


def analyze(source: str | os.PathLike | torch.nn.Module | Source, *, store: StoreLike = None, refresh: bool = False,
            progress: Progress | None = None, trust_pickle: bool = False,
            device: str | torch.device = "auto") -> WeightSpectra:
    """Spectra and conditioning of every weight matrix of ``source``, cached in the store.

    Reads the checkpoint one tensor at a time; singular values are float64 on ``device`` (``auto``:
    CUDA when available, else the CPU's LAPACK route; ``cpu``; ``cuda``). Interrupting (Ctrl-C)
    stores nothing. Raises SourceError for a checkpoint without floating-point tensors, ConfigError
    for an unknown or unavailable device (``mps`` included) before any work.
    """
    dev = resolve_float64_device(device, "spectra")
    src = open_source(source, trust_pickle=trust_pickle)
    if not src.weight_infos():
        raise SourceError(f"{src.label}: the checkpoint holds no floating-point tensors, so there is nothing to "
                          "analyse; check that the file is the model's weights and not an empty export")
    require_matrices(src)  # a folder of 1-D vectors is an error, never a stored model with 0 matrices
    return run(SPECTRA, src, spectra_params(), store=store, refresh=refresh, progress=progress, device=dev)


def conditioning(source: str | os.PathLike | torch.nn.Module | Source, **kwargs: Any) -> pd.DataFrame:
    """The conditioning columns of ``analyze(source, **kwargs)``, one row per matrix, lowest kappa first."""
    table = analyze(source, **kwargs).table
    cols = [c for c in CONDITIONING_COLUMNS if c in table.columns] + ["matrix", "status"]
    return table[cols].sort_values("kappa", kind="stable").reset_index(drop=True)


def has_spectra(fingerprint: str, store: StoreLike = None) -> bool:
    """Whether the store holds spectra for this model fingerprint (an index lookup, no blob read)."""
    return has(SPECTRA, fingerprint, spectra_params(), store=store)


def find_spectra(fingerprint: str, store: StoreLike = None) -> WeightSpectra | None:
    """The spectra stored for this model fingerprint, or None (never computes; a corrupt entry reads as None)."""
    return find(SPECTRA, fingerprint, spectra_params(), store=store)


def list_spectra(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of the stored spectra (of one model, or all), newest first; never computes."""
    return stored(SPECTRA, fingerprint, store=store)


def load_spectra(key: str, store: StoreLike = None) -> WeightSpectra:
    """The spectra stored under entry ``key`` (or a unique prefix of 8+ characters).

    Raises NotStoredError when there is no such spectra entry, CorruptEntryError when its blobs
    fail their checksum."""
    return load(key, store=store, analysis=SPECTRA)


def stored_spectra(fingerprint: str, store: StoreLike = None) -> WeightSpectra | None:
    """Deprecated: ``find_spectra``. Spectra stored for a model fingerprint, or None (never computes);
    unlike ``find_spectra`` a corrupt entry raises CorruptEntryError, as it always did."""
    warnings.warn("stored_spectra is deprecated; use find_spectra (the result or None), or list_spectra for the "
                  "index rows", DeprecationWarning, stacklevel=2)
    result = open_store(store).get(fingerprint, SPECTRA.name, spectra_params(), SPECTRA.code_version)
    return SPECTRA.from_result(result) if result is not None else None


# -- KappaTune selection and export -------------------------------------------------------------
def select(source: str | os.PathLike | torch.nn.Module | Source, budget: Budget | str | int | float, *,
           ranker: str = "lowest_kappa", include: str | None = None, exclude: str | None = None, seed: int = 0,
           include_embeddings: bool = False, include_heads: bool = False, include_routers: bool = False,
           store: StoreLike = None, trust_pickle: bool = False, progress: Progress | None = None,
           device: str | torch.device = "auto") -> Selection:
    """KappaTune-style tensor selection (``analysis.weights.selection``) on the spectra of ``source``
    (``analyze``: computed on ``device`` once, then served from the store).

    Candidates are the linear weight matrices (and stacked experts), as PEFT's
    ``find_kappa_target_modules`` ranks; embedding tables, output heads and MoE routers are
    opt-in (``include_embeddings`` / ``include_heads`` / ``include_routers``).

        >>> sel = api.select("minilm", "20%")
        >>> api.export(sel, "peft", "lora.json")
    """
    budget = Budget.parse(budget)  # fail on a bad budget, ranker or device before any analysis runs
    if ranker not in RANKERS:
        raise ConfigError(f"unknown ranker {ranker!r}; choose one of {', '.join(RANKERS)}")
    dev = resolve_float64_device(device, "spectra")
    src = open_source(source, trust_pickle=trust_pickle)
    ws = analyze(src, store=store, progress=progress, device=dev)
    return select_from_spectra(ws, budget, ranker=ranker, include=include, exclude=exclude, seed=seed,
                               fingerprint=src.fingerprint, include_embeddings=include_embeddings,
                               include_heads=include_heads, include_routers=include_routers)


def select_from_spectra(spectra: WeightSpectra | pd.DataFrame, budget: Budget | str | int | float, *,
                        ranker: str = "lowest_kappa", include: str | None = None, exclude: str | None = None,
                        seed: int = 0, fingerprint: str | None = None, include_embeddings: bool = False,
                        include_heads: bool = False, include_routers: bool = False) -> Selection:
    """The selection of ``select`` from spectra already in hand (a ``WeightSpectra`` or its table):
    no store, no source (the dashboard's selection page works from the stored spectra alone)."""
    table = spectra.table if isinstance(spectra, WeightSpectra) else spectra
    return select_tensors(table, budget, ranker=ranker, include=include, exclude=exclude, seed=seed,
                          fingerprint=fingerprint, include_embeddings=include_embeddings, include_heads=include_heads,
                          include_routers=include_routers)


def export_text(selection: Selection, fmt: str, **opts: Any) -> str:
    """Text of ``selection`` in ``fmt`` (params | peft | axolotl; ``opts`` as
    ``analysis.weights.export.export_selection``); writes nothing."""
    return export_selection(selection, fmt, **opts)


def export(selection: Selection, fmt: str, path: str | os.PathLike | None = None, **opts: Any) -> str:
    """``export_text(selection, fmt, **opts)``, also written atomically to ``path`` when given
    (``analysis.atomic_write``: the old file or the new one, never a partial write)."""
    text = export_text(selection, fmt, **opts)
    if path is not None:
        write_text_atomic(Path(path), text)
    return text


# -- the KappaTune forgetting experiment --------------------------------------------------------
def _compute_experiment(subject: Subject, config: fg.ForgettingConfig, ctx: RunContext) -> Result:
    src = subject.source
    table = None
    if set(config.arms) & set(fg.SELECTION_ARMS):  # the selection arms rank the model's stored spectra
        table = run(SPECTRA, src, spectra_params(), ctx=ctx.child(ctx.sub("spectra"))).table
    model, tokenizer = load_encoder(src.model_dir())
    model.to(ctx.device)
    return fg.to_result(fg.kappatune_forgetting(model, tokenizer, table, config, progress=ctx.report))


EXPERIMENT: Analysis[fg.ForgettingResult] = register(Analysis(
    name=fg.ANALYSIS, code_version=fg.CODE_VERSION, compute=_compute_experiment, from_result=fg.from_result,
    doc="KappaTune forgetting experiment: fine-tune by selection arm, measure held-out drift "
        "(analysis.weights.forgetting)."))


def _compute_matched(subject: Subject, config: fm.KappaTuneConfig, ctx: RunContext) -> Result:
    src = subject.source
    table = run(SPECTRA, src, spectra_params(), ctx=ctx.child(ctx.sub("spectra"))).table
    return fm.to_result(fm.kappatune_matched(str(src.model_dir()), table, config, label=src.label,
                                             progress=ctx.report))


MATCHED: Analysis[fm.KappaTuneResult] = register(Analysis(
    name=fm.ANALYSIS, code_version=fm.CODE_VERSION, compute=_compute_matched, from_result=fm.from_result,
    doc="KappaTune, settled: parameter-matched arms on an encoder (embedding drift) or a causal LM "
        "(perplexity), bootstrap intervals and paired comparisons (analysis.weights.forgetting_matched)."))


def experiment_kappatune(source: str | os.PathLike | Source = "minilm", *, budget: str | int | float = "12.5%params",
                         seeds: int = 5, steps: int = 100, store: StoreLike = None, progress: Progress | None = None,
                         refresh: bool = False, device: str | torch.device = "auto",
                         **settings: Any) -> fm.KappaTuneResult:
    """KappaTune, settled (``analysis.weights.forgetting_matched``; ``lenslab experiment kappatune``):
    every arm (``forgetting_arms.ARMS``) at the same trained-parameter budget (±5%), ``seeds``
    seeds, on ``source``: an encoder directory (default MiniLM; forgetting = held-out embedding
    drift) or a causal LM directory such as ``"bilinear-lm"`` (forgetting = held-out stdlib
    perplexity). Arms run through the executor (``executor="local"`` processes, ``workers=N``, or
    ``executor="ray"``, ``ray_address=...``), on the CPU (``device``: auto or cpu; another device
    is a ConfigError). ``settings``: any other
    ``KappaTuneConfig`` field. Cached in the store; Ctrl-C stores nothing.

        >>> res = api.experiment_kappatune("bilinear-lm")
        >>> res.summary[["arm", "gain_mean", "gain_lo", "gain_hi", "forgetting_mean"]]; res.paired
    """
    fields = fm.KappaTuneConfig.__dataclass_fields__
    if unknown := sorted(set(settings) - set(fields)):
        raise ConfigError(f"unknown experiment setting(s) {unknown}; valid: {', '.join(fields)}")
    config = fm.KappaTuneConfig(budget=str(budget), seeds=seeds, steps=steps, **settings)
    if resolve_device(device).type != "cpu":
        raise ConfigError(f"device {device!r}: the experiment's arms run in CPU worker processes; use device='cpu' "
                          "(or 'auto')")
    src = open_source(source)
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: the KappaTune experiment fine-tunes the model, so it needs a Hugging Face "
                          "directory (config.json + tokenizer), e.g. 'minilm' or 'bilinear-lm'")
    return run(MATCHED, src, config, store=store, refresh=refresh, progress=progress, device="cpu")


def experiment_forgetting(source: str | os.PathLike | Source = "minilm", *, budget: str | int | float = "20%",
                          seeds: int = 3, steps: int = 100, store: StoreLike = None, progress: Progress | None = None,
                          refresh: bool = False, device: str | torch.device = "auto",
                          **settings: Any) -> fg.ForgettingResult:
    """The first KappaTune forgetting experiment (``analysis.weights.forgetting``; encoder only, a
    tensor-count budget, embedding drift), cached in the store (``lenslab experiment forgetting``).
    ``experiment_kappatune`` is its parameter-matched successor.

    Fine-tunes ``source`` (a Hugging Face encoder directory; default the bundled MiniLM) on the
    docstring-package task with each arm (lowest_kappa, highest_kappa, random, full, head_only)
    at the same ``budget`` for ``seeds`` seeds and ``steps`` steps on ``device``, and measures
    held-out embedding drift. ``settings``: any other ``ForgettingConfig`` field (``autocast=True``,
    ``lr=...``). Returns a ``ForgettingResult`` (``.runs`` one row per arm x seed, ``.summary``
    one row per arm). Interrupting (Ctrl-C) stores no experiment entry.

        >>> res = api.experiment_forgetting("minilm", seeds=3)
        >>> res.summary[["arm", "accuracy_mean", "drift_mean", "spearman_mean"]]
    """
    fields = fg.ForgettingConfig.__dataclass_fields__
    if unknown := sorted(set(settings) - set(fields)):
        raise ConfigError(f"unknown experiment setting(s) {unknown}; valid: {', '.join(fields)}")
    config = fg.ForgettingConfig(budget=budget, seeds=seeds, steps=steps, **settings)
    resolve_device(device)
    src = open_source(source)
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: the forgetting experiment fine-tunes the model, so it needs a Hugging Face "
                          "encoder directory (config.json + tokenizer), e.g. 'minilm'")
    return run(EXPERIMENT, src, config, store=store, refresh=refresh, progress=progress, device=device)


def stored_experiments(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of the stored KappaTune experiments, both designs (``entry.analysis``: the matched
    ``fm.ANALYSIS`` or the first ``fg.ANALYSIS``), of one model or all, newest first; never computes.
    ``entry.params`` holds the experiment's settings; ``load_experiment(entry.key)`` its result."""
    rows = stored(MATCHED, fingerprint, store=store) + stored(EXPERIMENT, fingerprint, store=store)
    return sorted(rows, key=lambda e: e.created, reverse=True)


def load_experiment(key: str, store: StoreLike = None) -> fm.KappaTuneResult | fg.ForgettingResult:
    """The KappaTune experiment stored under entry ``key`` (or a unique prefix of 8+ characters): a
    ``KappaTuneResult`` for the matched design, a ``ForgettingResult`` for the first one.

    Raises NotStoredError when there is no such experiment, CorruptEntryError when its blobs fail
    their checksum."""
    from analysis.run import entry

    kind = entry(key, store=store).analysis
    return load(key, store=store, analysis=MATCHED if kind == MATCHED.name else EXPERIMENT)


def kappatune_experiment(source: str | os.PathLike | Source = "minilm", **kwargs: Any) -> fg.ForgettingResult:
    """Deprecated: ``experiment_forgetting`` (same arguments, same result as before)."""
    warnings.warn("kappatune_experiment is deprecated; use experiment_forgetting (or experiment_kappatune, the "
                  "parameter-matched design)", DeprecationWarning, stacklevel=2)
    return experiment_forgetting(source, **kwargs)


def stored_kappatune_experiments(store: StoreLike = None) -> list[tuple[EntryInfo, fg.ForgettingResult]]:
    """Deprecated: ``stored_experiments`` then ``load_experiment``. Stored forgetting experiments,
    newest first, as ``(EntryInfo, ForgettingResult)`` pairs (never computes); entries whose blobs
    fail their checksum are skipped."""
    warnings.warn("stored_kappatune_experiments is deprecated; use stored_experiments (index rows) and "
                  "load_experiment(entry.key)", DeprecationWarning, stacklevel=2)
    st = open_store(store)
    out = []
    for entry in stored(EXPERIMENT, store=st):
        try:
            result = st.get_by_key(entry.key)
        except CorruptEntryError:
            continue
        if result is not None:
            out.append((entry, EXPERIMENT.from_result(result)))
    return out
