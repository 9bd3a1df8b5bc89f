"""Worker tasks of batch runs (many sources, or one model's tensors split across workers).

Each task opens its source by spec inside the worker, computes, and returns a picklable
result to the driver; tasks never touch the store. The driver
(``analysis.weights.batch_pipeline.analyze_many``) writes.
Results do not depend on where a task ran: ``weight_spectra`` is bitwise reproducible whatever
its thread count, and a model split by tensors merges back into the table a single run gives.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.errors import SourceError
from analysis.sources import BUNDLED, TensorInfo, open_source
from analysis.weights.matrices import require_matrices
from analysis.weights.spectra import WeightSpectra, weight_spectra

_GLOB_CHARS = set("*?[")


def expand_sources(specs: list[str]) -> list[str]:
    """Bundled names as given; paths made absolute (workers may run elsewhere); shell-style
    globs (``'runs/ckpt-*'``) expanded in sorted order; duplicates dropped, order kept.

    Raises SourceError for a glob that matches nothing or an empty list."""
    out: list[str] = []
    for spec in specs:
        if spec in BUNDLED:
            out.append(spec)
        elif _GLOB_CHARS & set(spec):
            hits = sorted(glob.glob(os.path.expanduser(spec)))
            if not hits:
                raise SourceError(f"the pattern {spec!r} matches no file or directory; check it (quote it so the "
                                  "shell does not expand it first)")
            out.extend(str(Path(h).resolve()) for h in hits)
        else:
            out.append(str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec)
    if not out:
        raise SourceError("no sources given; name at least one model (e.g. minilm or a checkpoint directory)")
    return list(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class SourceSummary:
    """What the driver needs before computing: the content fingerprint and the model table row."""

    spec: str
    fingerprint: str
    label: str
    kind: str
    n_tensors: int  # every stored tensor (the progress total)
    n_weights: int  # floating-point tensors
    n_params: int
    hf_dir: str | None
    tensors: tuple[tuple[str, int], ...]  # (name, n_params) of every tensor, in reading order

    def describe(self) -> dict[str, Any]:
        """The model-table fields as ``Source.describe()`` gives them (``analysis.run.register_source``
        records a summary as it records a source)."""
        return {"label": self.label, "kind": self.kind, "n_tensors": self.n_weights, "n_params": self.n_params,
                "hf_dir": self.hf_dir}


@dataclass(frozen=True, slots=True)
class SpectraTask:
    """Spectra of ``spec`` (only ``names`` when given), with ``threads`` matrix threads."""

    spec: str
    names: tuple[str, ...] | None = None
    threads: int = 1
    trust_pickle: bool = False


def summarize_task(item: tuple[str, bool]) -> SourceSummary:
    """Worker: open ``spec`` and fingerprint it (reads every tensor once)."""
    spec, trust_pickle = item
    src = open_source(spec, trust_pickle=trust_pickle)
    if src.weight_infos():
        require_matrices(src)  # as analyze(): 1-D vectors alone are an error for this source, not an entry
    d = src.describe()
    infos: list[TensorInfo] = src.tensor_infos()
    return SourceSummary(spec, src.fingerprint, d["label"], d["kind"], len(infos), d["n_tensors"], d["n_params"],
                         d["hf_dir"], tuple((i.name, i.n_params) for i in infos))


def spectra_task(task: SpectraTask) -> WeightSpectra:
    """Worker: ``weight_spectra`` over the source's tensors (or the named subset)."""
    src = open_source(task.spec, trust_pickle=task.trust_pickle)
    names = list(task.names) if task.names is not None else None
    return weight_spectra(src.iter_tensors(names), n_workers=task.threads)


def split_tensors(tensors: tuple[tuple[str, int], ...], parts: int) -> list[tuple[str, ...]]:
    """Contiguous runs of tensor names (reading order kept) with about equal parameter counts."""
    total = sum(n for _, n in tensors) or 1
    out: list[list[str]] = [[]]
    acc = 0
    for name, n in tensors:
        if out[-1] and len(out) < parts and acc >= total * len(out) / parts:
            out.append([])
        out[-1].append(name)
        acc += n
    return [tuple(c) for c in out if c]


def merge_spectra(parts: list[WeightSpectra]) -> WeightSpectra:
    """One ``WeightSpectra`` from parts computed over consecutive runs of tensors, in order: the
    table is rebuilt from the rows (as ``weight_spectra`` builds it) so dtypes match a single run."""
    rows = [r for p in parts for r in p.table.to_dict(orient="records")]
    table = pd.DataFrame(rows) if rows else parts[0].table
    svs = {k: v for p in parts for k, v in p.singular_values.items()}
    return WeightSpectra(table=table, singular_values=svs, skipped=[s for p in parts for s in p.skipped])
