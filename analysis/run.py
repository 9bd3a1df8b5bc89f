"""The runner: one way for every analysis to reach the store, the progress bar, the device and the
model cache.

An analysis declares itself once, in its folder's ``pipeline.py``::

    SPECTRA = register(Analysis(
        name="spectra",                    # the store's analysis column (never change it: it is in keys)
        code_version="spectra-1",          # bump when stored numbers would change
        compute=_compute,                  # (subject, params, ctx) -> Result
        from_result=spectra.from_result,   # Result -> the analysis's result object
    ))

and its API function validates its arguments into a frozen params object (anything with
``store_params() -> dict``, or a plain dict), opens the subject and calls ``run``::

    def analyze(source, *, store=None, refresh=False, progress=None, device="auto"):
        params = SpectraParams()                          # validated before any work
        return run(SPECTRA, open_source(source), params, store=store, refresh=refresh,
                   progress=progress, device=device)

``run`` serves a stored result or calls ``compute`` once and stores it (``Store.cached``: a
corrupt entry is recomputed, a failed or interrupted compute stores nothing), then records the
model in the store's model table. ``compute`` gets a ``RunContext``: the store (to read other
analyses' results through ``run`` again), the resolved device and dtype, the progress callback
(``ctx.tick``; ``ctx.sub(prefix)`` for a nested stage) and the shared model cache
(``ctx.bridge(src)``, used under ``ctx.lock``). Cancelling: Ctrl-C raises KeyboardInterrupt as
anywhere; a ``cancel`` event (the dashboard's Stop) makes the next ``ctx.tick`` raise
``RunCancelled``. Either way nothing is stored.

Reading back, one convention for every analysis: ``stored(analysis, fingerprint)`` lists index
rows (``EntryInfo``, newest first, this code version only; never computes), ``load(key)`` returns
the result object of any entry (dispatching on its analysis name) or raises ``NotStoredError``,
and ``find(analysis, fingerprint, params)`` returns the result stored for exactly these settings
or None.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from analysis import model_cache
from analysis.device import resolve_device, resolve_dtype
from analysis.errors import ConfigError, CorruptEntryError, LensLabError
from analysis.progress import Progress, sub_progress, tick
from analysis.store import EntryInfo, Result, Store

if TYPE_CHECKING:
    from analysis.sources import Source

T = TypeVar("T")
StoreLike = Store | str | os.PathLike | None


class NotStoredError(LensLabError, KeyError):
    """A key or fingerprint asked for has no entry in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunCancelled(KeyboardInterrupt):
    """A run was stopped through its cancel event; nothing was stored. A KeyboardInterrupt, so it
    passes every ``except Exception`` as Ctrl-C does (the CLI exits 130)."""


def open_store(store: StoreLike = None) -> Store:
    """A ``Store`` from a Store, a directory path, or None (``$LENSLAB_STORE`` or the cache dir)."""
    return store if isinstance(store, Store) else Store(store)


@dataclass(frozen=True, slots=True)
class Subject:
    """What a result is stored under: a fingerprint, and the source behind it when there is one
    (results keyed by their data, e.g. a probe's training set, have none)."""

    fingerprint: str
    source: Source | None = None


@dataclass(eq=False)
class RunContext:
    """What ``compute`` may use besides its params: store, device, dtype, progress, models."""

    store: Store
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    progress: Progress | None = None
    cancel: threading.Event | None = None
    refresh: bool = False

    lock = model_cache.LOCK  # held while a booted model runs with hooks attached

    def tick(self, done: int, total: int, label: str) -> None:
        """Report progress; raise ``RunCancelled`` if the run's cancel event is set."""
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelled(f"cancelled at {label!r} ({done}/{total}); nothing was stored")
        tick(self.progress, done, total, label)

    @property
    def report(self) -> Progress:
        """``tick`` as a plain progress callback, for analysis functions that take ``progress=``."""
        return self.tick

    def sub(self, prefix: str) -> Progress:
        """A progress callback for a nested stage: labels read ``prefix: label``."""
        return sub_progress(self.tick, prefix)

    def bridge(self, src: Source, *, variant: str = "",
               boot: Callable[[Source, torch.device, torch.dtype], Any] | None = None) -> Any:
        """The model of ``src`` from the process's one model cache, on this run's device."""
        return model_cache.bridge(src, device=self.device, dtype=torch.float32, variant=variant, boot=boot)

    def child(self, progress: Progress | None = None) -> RunContext:
        """The same context with another progress callback (for a dependency's run)."""
        return RunContext(store=self.store, device=self.device, dtype=self.dtype, progress=progress,
                          cancel=self.cancel, refresh=False)


@dataclass(frozen=True, eq=False)
class Analysis(Generic[T]):
    """One analysis: its store name and code version, how to compute a Result, how to read one."""

    name: str
    code_version: str
    compute: Callable[[Subject, Any, RunContext], Result]
    from_result: Callable[[Result], T]
    register_model: bool = True  # record the subject's source in the model table after a run
    doc: str = ""


REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis[T]) -> Analysis[T]:
    """Add an analysis to the registry (``load`` dispatches on its name); returns it."""
    known = REGISTRY.get(analysis.name)
    if known is not None and known is not analysis and known.code_version != analysis.code_version:
        raise ConfigError(f"analysis {analysis.name!r} registered twice with code versions "
                          f"{known.code_version!r} and {analysis.code_version!r}")
    REGISTRY[analysis.name] = analysis
    return analysis


def store_params(params: Any) -> dict[str, Any]:
    """The params mapping that goes into the store key."""
    if params is None:
        return {}
    if isinstance(params, Mapping):
        return dict(params)
    to_dict = getattr(params, "store_params", None)
    if to_dict is None:
        raise TypeError(f"params {type(params).__name__} has no store_params(); pass a dict or define one")
    return dict(to_dict())


def _subject(subject: Source | Subject | str) -> Subject:
    if isinstance(subject, Subject):
        return subject
    if isinstance(subject, str):
        return Subject(subject)
    return Subject(subject.fingerprint, subject)


def register_source(src: Source, store: Store) -> None:
    """Record the source in the store's model table (label, kind, size)."""
    d = src.describe()
    store.register_model(src.fingerprint, d["label"], d["kind"], n_tensors=d["n_tensors"],
                         n_params=d["n_params"], info={"hf_dir": d["hf_dir"]})


def context(*, store: StoreLike = None, progress: Progress | None = None, device: str | torch.device | None = "auto",
            dtype: str | torch.dtype | None = None, cancel: threading.Event | None = None,
            refresh: bool = False) -> RunContext:
    """A ``RunContext`` with the store opened and the device and dtype resolved (errors before any work)."""
    return RunContext(store=open_store(store), device=resolve_device(device), dtype=resolve_dtype(dtype),
                      progress=progress, cancel=cancel, refresh=refresh)


def run(analysis: Analysis[T], subject: Source | Subject | str, params: Any = None, *,
        ctx: RunContext | None = None, store: StoreLike = None, refresh: bool = False,
        progress: Progress | None = None, device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None, cancel: threading.Event | None = None) -> T:
    """The result of ``analysis`` on ``subject`` with ``params``: from the store, or computed once and stored.

    Pass either ``ctx`` (inside another analysis's compute) or the store/progress/device options."""
    if ctx is None:
        ctx = context(store=store, progress=progress, device=device, dtype=dtype, cancel=cancel, refresh=refresh)
    subj = _subject(subject)
    result = ctx.store.cached(subj.fingerprint, analysis.name, store_params(params), analysis.code_version,
                              lambda: analysis.compute(subj, params, ctx), refresh=ctx.refresh)
    if analysis.register_model and subj.source is not None:
        register_source(subj.source, ctx.store)
    return analysis.from_result(result)


def record(analysis: Analysis[T], subject: Source | Subject | str, params: Any, result: Result, *,
           store: StoreLike = None) -> EntryInfo:
    """Store a ``result`` of ``analysis`` that was computed elsewhere (batch workers compute, the caller
    records), under the same key ``run`` would use, and register the subject's source."""
    st = open_store(store)
    subj = _subject(subject)
    info = st.put(subj.fingerprint, analysis.name, store_params(params), analysis.code_version, result)
    if analysis.register_model and subj.source is not None:
        register_source(subj.source, st)
    return info


def find(analysis: Analysis[T], fingerprint: str, params: Any = None, *, store: StoreLike = None) -> T | None:
    """The result stored for exactly these settings, or None (never computes; a corrupt entry reads as None)."""
    try:
        result = open_store(store).get(fingerprint, analysis.name, store_params(params), analysis.code_version)
    except CorruptEntryError:
        return None
    return analysis.from_result(result) if result is not None else None


def has(analysis: Analysis, fingerprint: str, params: Any = None, *, store: StoreLike = None) -> bool:
    """Whether the store holds this result (an index lookup, no blob read)."""
    return open_store(store).has(fingerprint, analysis.name, store_params(params), analysis.code_version)


def stored(analysis: Analysis | str, fingerprint: str | None = None, *, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of the stored results of ``analysis`` (this code version), newest first; never computes."""
    a = analysis if isinstance(analysis, Analysis) else _registered(analysis)
    return [e for e in open_store(store).list(fingerprint=fingerprint, analysis=a.name)
            if e.code_version == a.code_version]


def _registered(name: str) -> Analysis:
    if name not in REGISTRY:
        raise ConfigError(f"unknown analysis {name!r}; registered: {', '.join(sorted(REGISTRY)) or 'none'}")
    return REGISTRY[name]


def entry(key: str, *, store: StoreLike = None) -> EntryInfo:
    """The index row of the entry whose key is ``key`` or starts with it (a unique prefix of 8+ characters)."""
    st = open_store(store)
    key = str(key).strip()
    entries = st.list()
    matches = [e for e in entries if e.key == key] or (
        [e for e in entries if e.key.startswith(key)] if len(key) >= 8 else [])
    if not matches:
        raise NotStoredError(f"no stored result has key {key!r} in {st.root}; list them with `lenslab store ls`")
    if len(matches) > 1:
        raise NotStoredError(f"key prefix {key!r} matches {len(matches)} stored results; give more characters")
    return matches[0]


def load(key: str, *, store: StoreLike = None, analysis: Analysis | str | None = None) -> Any:
    """The result object of the stored entry ``key`` (any registered analysis), or ``NotStoredError``.

    ``analysis`` given: the entry must be one of its results (a typed error otherwise)."""
    st = open_store(store)
    info = entry(key, store=st)
    a = _registered(info.analysis) if analysis is None else (
        analysis if isinstance(analysis, Analysis) else _registered(analysis))
    if info.analysis != a.name:
        raise NotStoredError(f"entry {info.key[:12]} holds a {info.analysis!r} result, not {a.name!r}")
    if info.code_version != a.code_version:
        raise NotStoredError(f"entry {info.key[:12]} was stored by code version {info.code_version!r}; this LensLab "
                             f"reads {a.code_version!r}: run the analysis again to recompute it")
    result = st.get_by_key(info.key)
    if result is None:  # deleted between the listing and the read
        raise NotStoredError(f"entry {info.key[:12]} was deleted while it was being read")
    return a.from_result(result)
