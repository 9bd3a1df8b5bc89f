"""Per-head attention circuit spectra, stored: the ``circuits`` analysis and its API.

    >>> from analysis.circuits.pipeline import circuits
    >>> cs = circuits("minilm")                    # computed once, then served from the store
    >>> cs.grid("kappa", "QK")                     # layers x heads
    >>> cs.spectrum(layer=0, head=3, circuit="OV") # (d_head,) float64, descending

The weights come from the booted TransformerBridge (the one model cache, ``ctx.bridge``); the maths is
``analysis.circuits.spectra`` (exact factored singular values in float64, metric conventions) and the
head layout ``analysis.circuits.weights`` (grouped-query attention). Reading back follows
``analysis.run``: ``stored_circuits`` lists index rows, ``load_circuits`` raises ``NotStoredError``,
``find_circuits`` returns None when absent; none of them computes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.circuits import spectra
from analysis.circuits.weights import attention_layers, iter_layer_weights
from analysis.errors import ConfigError, SourceError
from analysis.progress import Progress
from analysis.run import Analysis, RunContext, StoreLike, Subject, find, load, register, run, stored
from analysis.sources import Source, open_source
from analysis.store import EntryInfo, Result

CODE_VERSION = "circuits-1"
WEIGHTS = ("raw",)
COLUMNS = ["layer", "head", "kv_head", "circuit", "s_max", "s_min", "kappa", "stable_rank", "effective_rank"]
DEPRECATED: dict[str, str] = {}  # a new analysis: no old names


@dataclass(frozen=True, kw_only=True)
class CircuitParams:
    """Settings that go into the store key.

    ``weights``: which weights are factored; ``"raw"`` (the only one today) is the checkpoint's weights as
    the booted bridge holds them, with no LayerNorm folding or centring (TransformerLens's
    ``HookedTransformer.from_pretrained`` processing would change W_Q ... W_O and so the spectra)."""

    weights: str = "raw"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ConfigError(f"weights={self.weights!r} is not supported; use one of {', '.join(WEIGHTS)}")

    def store_params(self) -> dict[str, Any]:
        return {"weights": self.weights}


def _read_only(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class CircuitSpectra:
    """Spectra of every head's QK and OV circuit of one model.

    ``table``: one row per (layer, head, circuit) with ``COLUMNS`` (layer, head, kv_head, circuit in
    {"QK", "OV"}, s_max, s_min, kappa, stable_rank, effective_rank; units of the weights' products);
    ``singular_values``: ``"QK.L"`` / ``"OV.L"`` -> (n_heads, d_head) float64 descending, read-only, the
    spectrum of each head of layer L; ``meta``: label, fingerprint, d_model, d_head, n_heads, n_kv_heads, layers,
    and the device the maths ran on.
    """

    table: pd.DataFrame
    singular_values: Mapping[str, np.ndarray]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def spectrum(self, layer: int, head: int, circuit: str = "QK") -> np.ndarray:
        """Singular values (d_head,) of one head's circuit, descending."""
        name = f"{_circuit(circuit)}.{int(layer)}"
        if name not in self.singular_values:
            raise ConfigError(f"layer {layer} has no attention here; layers: {list(self.meta.get('layers', []))}")
        values = self.singular_values[name]
        if not 0 <= int(head) < len(values):
            raise ConfigError(f"head {head} is out of range; layer {layer} has heads 0..{len(values) - 1}")
        return values[int(head)]

    def grid(self, metric: str = "kappa", circuit: str = "QK") -> pd.DataFrame:
        """``metric`` of ``circuit`` as a layers x heads DataFrame (index layer, columns head)."""
        if metric not in spectra.METRICS:
            raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(spectra.METRICS)}")
        rows = self.table[self.table["circuit"] == _circuit(circuit)]
        return rows.pivot(index="layer", columns="head", values=metric).sort_index().sort_index(axis=1)


def _circuit(circuit: str) -> str:
    name = str(circuit).upper()
    if name not in spectra.CIRCUIT_KINDS:
        raise ConfigError(f"unknown circuit {circuit!r}; choose one of {', '.join(spectra.CIRCUIT_KINDS)}")
    return name


def to_result(cs: CircuitSpectra) -> Result:
    """Pack for the store: the table, one array per circuit and layer, the meta."""
    return Result(table=cs.table, arrays=dict(cs.singular_values), meta=dict(cs.meta))


def from_result(result: Result) -> CircuitSpectra:
    """Inverse of ``to_result``."""
    return CircuitSpectra(table=result.table, singular_values={k: _read_only(v) for k, v in result.arrays.items()},
                          meta=dict(result.meta))


def _compute(subject: Subject, params: CircuitParams, ctx: RunContext) -> Result:
    src = subject.source
    ctx.tick(0, 1, "boot: loading the model")
    bridge = ctx.bridge(src)
    device = spectra.compute_device(ctx.device)
    rows, arrays, layers, shape = [], {}, [], {}
    with ctx.lock:  # the bridge is shared by the dashboard's sessions: read its weights while none runs it
        total = len(attention_layers(bridge))
        for lw in iter_layer_weights(bridge):
            ctx.tick(len(layers), total, f"QK and OV of the {lw.n_heads} heads of layer {lw.layer}")
            values = spectra.circuit_singular_values(lw.w_q, lw.w_k, lw.w_v, lw.w_o, lw.kv_head, device=device)
            d_model = int(lw.w_q.shape[1])
            for circuit in spectra.CIRCUIT_KINDS:
                s = values[circuit].cpu().numpy()
                arrays[f"{circuit}.{lw.layer}"] = s
                metrics = spectra.spectrum_metrics(s, d_model=d_model)
                rows += [{"layer": lw.layer, "head": h, "kv_head": int(lw.kv_head[h]), "circuit": circuit,
                          **{m: float(metrics[m][h]) for m in COLUMNS[4:]}} for h in range(lw.n_heads)]
            layers.append(lw.layer)
            shape = shape or {"d_model": d_model, "d_head": int(lw.w_q.shape[2]), "n_heads": lw.n_heads,
                              "n_kv_heads": lw.n_kv_heads}
    if not layers:
        raise SourceError(f"{src.label}: the booted model has no attention blocks, so it has no QK/OV circuits; "
                          "give a transformer with attention layers")
    ctx.tick(total, total, "done")
    meta = {"label": src.label, "fingerprint": subject.fingerprint, **shape, "n_layers": len(bridge.blocks),
            "layers": layers, "device": str(device), "dtype": "float64"}
    return to_result(CircuitSpectra(pd.DataFrame(rows, columns=COLUMNS), arrays, meta))


CIRCUITS = register(Analysis(
    name="circuits",
    code_version=CODE_VERSION,
    compute=_compute,
    from_result=from_result,
    doc="Per-head QK and OV circuit spectra (exact factored SVD in float64).",
))


def circuits(source: str | os.PathLike | torch.nn.Module | Source, *, store: StoreLike = None,
             refresh: bool = False, progress: Progress | None = None, device: str = "auto",
             trust_pickle: bool = False) -> CircuitSpectra:
    """Spectra of every attention head's QK and OV circuit of ``source`` (a Hugging Face model directory or a
    bundled name such as ``minilm``), cached in the store.

    Boots the model as a TransformerBridge (the process's model cache) and factors each head's
    W_Q W_Kᵀ and W_V W_O exactly in float64 on ``device`` (``auto | cpu | cuda | mps``; MPS computes
    on the CPU). Interrupting (Ctrl-C) stores nothing.

        >>> cs = circuits("minilm")
        >>> cs.table.sort_values("kappa").head()
    """
    params = CircuitParams()
    src = open_source(source, trust_pickle=trust_pickle)
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: circuit spectra read the attention weights through a TransformerBridge, "
                          "which needs a Hugging Face model directory (config.json); give the model's directory "
                          "instead of a bare weights file")
    return run(CIRCUITS, src, params, store=store, refresh=refresh, progress=progress, device=device)


def stored_circuits(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of stored circuit spectra (all models, or one fingerprint prefix), newest first; never computes."""
    return stored(CIRCUITS, fingerprint, store=store)


def load_circuits(key: str, store: StoreLike = None) -> CircuitSpectra:
    """The stored circuit spectra with entry ``key`` (or a unique prefix of 8+ characters); raises
    ``analysis.run.NotStoredError`` when there is none."""
    return load(key, store=store, analysis=CIRCUITS)


def find_circuits(fingerprint: str, store: StoreLike = None) -> CircuitSpectra | None:
    """The circuit spectra stored for this model fingerprint, or None (never computes)."""
    return find(CIRCUITS, fingerprint, CircuitParams(), store=store)
