"""Batch spectra over many sources (e.g. every checkpoint of a training run), on local processes or a
Ray cluster; re-exported from ``app.api``.

    >>> items = api.analyze_many(["runs/ckpt-*"], executor="ray", ray_address="auto")
    >>> [(i.source, i.status, i.n_matrices) for i in items]

Workers compute, the driver writes: each task opens its source by spec, fingerprints or
analyses it and returns the result; only this process touches the store. So a multi-node Ray
cluster needs the checkpoints at the same path on every node and LensLab installed there, but
never the store. Entries are the ones ``analyze`` writes (the ``SPECTRA`` analysis of
``analysis.weights.pipeline``: same key, same bitwise values), so the dashboard and
``find_spectra`` see them; results are stored with the runner's ``record`` (same key as ``run``), which fills the model table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from analysis.errors import LensLabError
from analysis.executor import ExecutorConfig, make_executor, usable_cpus
from analysis.progress import Progress
from analysis.run import StoreLike, Subject, find, open_store, record, register_source
from analysis.weights import spectra as spectra_mod
from analysis.weights.batch import (SourceSummary, SpectraTask, expand_sources, merge_spectra, spectra_task,
                                    split_tensors, summarize_task)
from analysis.weights.pipeline import SPECTRA, spectra_params
from analysis.weights.spectra import WeightSpectra


@dataclass(frozen=True, slots=True)
class BatchItem:
    """Outcome for one source of a batch run."""

    source: str  # the spec (paths made absolute)
    status: str  # "computed" | "cached" | "error"
    fingerprint: str | None = None
    label: str | None = None
    n_matrices: int = 0
    seconds: float = 0.0  # wall time from submitting its compute task(s) to storing the result
    error: str | None = None


def analyze_many(sources: list[str], *, executor: str = "local", workers: int | None = None,
                 ray_address: str | None = None, mode: str = "process", by_tensor: bool = False,
                 store: StoreLike = None, refresh: bool = False, trust_pickle: bool = False,
                 progress: Progress | None = None) -> list[BatchItem]:
    """Spectra of every source into the store; one ``BatchItem`` per source, in input order.

    ``sources``: bundled names, paths or quoted globs (expanded here). ``executor``: ``local``
    (``workers`` processes, or threads with ``mode="thread"``) or ``ray`` (``ray_address`` of a
    running cluster, else a local Ray with ``workers`` CPUs). ``by_tensor``: also split each
    model's tensors into runs analysed by different workers (for few, large models).
    Phase 1 fingerprints every source on the workers; sources already stored are ``cached``
    (unless ``refresh``; a corrupt entry is recomputed); phase 2 computes the rest, and the driver
    stores each as it arrives. A source that fails is reported with ``status="error"`` and the
    rest go on.
    """
    specs = expand_sources([str(s) for s in sources])
    config = ExecutorConfig(kind=executor, workers=workers, mode=mode, address=ray_address)
    st = open_store(store)
    params = spectra_params()
    items: dict[int, BatchItem] = {}
    summaries: dict[int, SourceSummary] = {}
    done = [0]

    def tick(total: int, label: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total, label)

    with make_executor(config) as ex:
        total = len(specs)
        for i, summary, error in ex.imap_unordered(summarize_task, [(s, trust_pickle) for s in specs]):
            tick(total, f"fingerprint {specs[i]}")
            if error is not None:
                items[i] = BatchItem(specs[i], "error", error=_message(error))
            elif summary.n_weights == 0:
                items[i] = BatchItem(specs[i], "error", summary.fingerprint, summary.label,
                                     error=f"{summary.label}: the checkpoint holds no floating-point tensors")
            elif not refresh and (ws := find(SPECTRA, summary.fingerprint, params, store=st)) is not None:
                register_source(summary, st)
                items[i] = BatchItem(specs[i], "cached", summary.fingerprint, summary.label, len(ws.table))
            else:
                summaries[i] = summary

        split = {i: split_tensors(s.tensors, ex.parallelism) if by_tensor else [None] for i, s in summaries.items()}
        at_once = min(ex.parallelism, max(1, sum(len(p) for p in split.values())))
        threads = 1 if config.kind == "ray" else max(1, usable_cpus() // at_once)  # a Ray task reserves 1 CPU
        tasks = [(i, SpectraTask(summaries[i].spec, names, threads, trust_pickle))
                 for i, parts in split.items() for names in parts]
        pending = {i: sum(1 for j, _ in tasks if j == i) for i in summaries}
        results: dict[int, dict[int, WeightSpectra]] = {i: {} for i in summaries}
        start = {i: time.perf_counter() for i in summaries}
        done[0], total = 0, len(tasks)
        for k, ws, error in ex.imap_unordered(spectra_task, [t for _, t in tasks]):
            i = tasks[k][0]
            summary = summaries[i]
            tick(total, summary.label)
            if i in items:  # an earlier part of this source failed
                continue
            if error is not None:
                items[i] = BatchItem(summary.spec, "error", summary.fingerprint, summary.label, error=_message(error))
                continue
            results[i][k] = ws
            if len(results[i]) < pending[i]:
                continue
            merged = merge_spectra([results[i][key] for key in sorted(results[i])])
            results[i].clear()
            record(SPECTRA, Subject(summary.fingerprint, summary), params,
                   spectra_mod.to_result(merged, {"label": summary.label}), store=st)
            items[i] = BatchItem(summary.spec, "computed", summary.fingerprint, summary.label, len(merged.table),
                                 time.perf_counter() - start[i])
    return [items[i] for i in range(len(specs))]


def _message(error: BaseException) -> str:
    """A LensLab error's own message; anything else prefixed with its type."""
    return str(error) if isinstance(error, LensLabError) else f"{type(error).__name__}: {error}"
