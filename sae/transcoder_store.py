"""Stored transcoders <-> ``analysis.store.Result``, and what reading one back returns.

An "sae-transcoder" entry (``sae.transcoder_pipeline`` registers the analysis):

- arrays: every tensor of the transcoder's ``state_dict()`` by its name (``W_enc`` [d_in, d_sae],
  ``W_dec`` [d_sae, d_out], ``b_enc`` [d_sae], ``b_dec`` [d_out], ``W_skip`` [d_out, d_in] for a
  skip transcoder, and whatever else its architecture holds), float32 as trained, so a transcoder
  reads back bit for bit;
- table: the training history (step, loss, nmse, l0, ...);
- meta: ``cfg`` (``TranscoderConfig.to_dict()``), ``metrics`` (held-out NMSE, L0, loss recovered
  ...), and what produced it (``source_spec``, ``source_label``, ``harvest``, ``training``, ``loss``);
  an imported SAELens file (``sae.transcoder_import``) has no metrics and records ``imported_from``
  (its directory), ``imported`` (its weights' hash) and ``saelens_architecture`` instead.

The metrics live in the meta, which the store's index holds, so listings (``transcoder_rows``)
read no blob. ``TranscoderConfig`` is rebuilt from its dict generically (its own ``from_dict`` when
it has one, else the dataclass fields of the dict), so fields added to the config later round-trip
without a change here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.errors import CorruptEntryError, LensLabError
from analysis.store import EntryInfo, Result
from sae.transcoder import KINDS, Transcoder, TranscoderConfig

ANALYSIS = "sae-transcoder"
CODE_VERSION = "sae-transcoder-1"
LIST_COLUMNS = ["key", "name", "source", "model", "layer", "kind", "architecture", "d_in", "d_sae", "k", "masked",
                "n_train_tokens", "l0", "nmse", "nmse_mask", "nmse_other", "loss_recovered", "created"]
_METRICS = ("l0", "nmse", "nmse_mask", "nmse_other", "loss_recovered")


@dataclass(frozen=True, eq=False)
class TranscoderRun:
    """A trained transcoder with its held-out metrics (NaN when not measured): ``nmse`` against the
    MLP output, ``l0``, and with loss ``loss_clean`` / ``loss_spliced`` / ``loss_zero`` /
    ``loss_recovered``; on masked LMs also ``nmse_mask`` / ``nmse_other`` at the [MASK] / other
    positions of masked held-out text. ``key``: its store entry; ``meta``: the entry's meta."""

    transcoder: Transcoder
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(repr=False)
    source_label: str = ""
    key: str = ""
    meta: dict = field(default_factory=dict, repr=False)

    @property
    def cfg(self) -> TranscoderConfig:
        return self.transcoder.cfg

    @property
    def name(self) -> str:
        return transcoder_name(self.meta)


def config_from_dict(data: Mapping[str, Any]) -> TranscoderConfig:
    """The ``TranscoderConfig`` whose ``to_dict()`` is ``data`` (derived keys such as the hook names ignored)."""
    from_dict = getattr(TranscoderConfig, "from_dict", None)
    if from_dict is not None:
        return from_dict(dict(data))
    names = {f.name for f in dataclasses.fields(TranscoderConfig)}
    return TranscoderConfig(**{k: v for k, v in data.items() if k in names})


def to_result(tc: Transcoder, metrics: Mapping[str, float], history: list[dict[str, float]], *,
              meta: Mapping[str, Any] | None = None) -> Result:
    """The Result of a trained transcoder (module docstring)."""
    arrays = {n: t.detach().cpu().contiguous().numpy().copy() for n, t in tc.state_dict().items()}
    table = pd.DataFrame(history) if history else None
    return Result(table=table, arrays=arrays, meta={**dict(meta or {}), "cfg": tc.cfg.to_dict(),
                                                    "metrics": {k: float(v) for k, v in metrics.items()}})


def from_result(result: Result) -> TranscoderRun:
    """The transcoder of an "sae-transcoder" entry (``key`` left empty: the pipeline fills it);
    CorruptEntryError when its config or weights do not fit."""
    meta = dict(result.meta)
    try:
        cfg = config_from_dict(meta["cfg"])
    except (KeyError, TypeError, LensLabError) as exc:
        raise CorruptEntryError(f"stored transcoder has no valid config ({exc}); train it again with "
                                "refresh=True (`lenslab sae transcoder ... --refresh`)") from exc
    tc = Transcoder(cfg)
    state = tc.state_dict()
    for name, want in state.items():
        a = result.arrays.get(name)
        if a is None or tuple(a.shape) != tuple(want.shape):
            raise CorruptEntryError(f"stored transcoder weight {name} is {None if a is None else tuple(a.shape)}, "
                                    f"expected {tuple(want.shape)}; train it again with refresh=True")
    tc.load_state_dict({n: torch.from_numpy(np.array(result.arrays[n], dtype=state[n].numpy().dtype))
                        for n in state})
    tc.eval()
    history = [] if result.table is None else result.table.to_dict(orient="records")
    return TranscoderRun(tc, dict(meta.get("metrics", {})), history, str(meta.get("source_label", "")), "", meta)


def kind_and_architecture(cfg: Mapping[str, Any]) -> tuple[str, str]:
    """("transcoder" | "skip_transcoder", the latent activation: "topk", ...) of a config dict."""
    kind = KINDS[int(bool(cfg.get("skip", False)))]
    arch = cfg.get("architecture", "topk")
    return kind, ("topk" if arch in KINDS else str(arch))


def transcoder_name(meta: Mapping[str, Any]) -> str:
    """Short label: "minilm L3 skip_transcoder 3072 (k=32, masked)" (", seed 1" when the seed is not 0;
    "(relu, imported)" for a SAELens file stored by ``lenslab sae import``)."""
    c = meta.get("cfg", {})
    kind, arch = kind_and_architecture(c)
    extra = [f"k={c.get('k')}" if arch == "topk" else arch]
    if meta.get("imported_from"):
        extra.append("imported")
    if meta.get("harvest", {}).get("mask_rate"):
        extra.append("masked")
    if c.get("seed", 0):
        extra.append(f"seed {c['seed']}")
    label = meta.get("source_spec") or meta.get("source_label") or ""
    short = os.path.basename(str(label)) or label
    return f"{short} L{c.get('layer')} {kind} {c.get('d_sae')} ({', '.join(extra)})"


def transcoder_rows(entries: list[EntryInfo], labels: Mapping[str, str]) -> pd.DataFrame:
    """One row per stored transcoder (``LIST_COLUMNS``) from index rows (no blob read); ``labels``:
    model fingerprint -> label."""
    rows = []
    for e in entries:
        c, m = e.meta.get("cfg", {}), e.meta.get("metrics", {})
        kind, arch = kind_and_architecture(c)
        rows.append({"key": e.key, "name": transcoder_name(e.meta), "source": e.meta.get("source_spec") or "",
                     "model": labels.get(e.fingerprint, e.fingerprint[:8]), "layer": c.get("layer"), "kind": kind,
                     "architecture": arch, "d_in": c.get("d_in"), "d_sae": c.get("d_sae"),
                     "k": c.get("k") if arch == "topk" else None,
                     "masked": bool(e.meta.get("harvest", {}).get("mask_rate")),
                     "n_train_tokens": None if e.meta.get("imported_from") else c.get("n_tokens"),
                     **{n: m.get(n, np.nan) for n in _METRICS},
                     "created": pd.Timestamp(e.created, unit="s")})
    return pd.DataFrame(rows, columns=LIST_COLUMNS)


__all__ = ["ANALYSIS", "CODE_VERSION", "LIST_COLUMNS", "TranscoderRun", "config_from_dict", "from_result",
           "kind_and_architecture", "to_result", "transcoder_name", "transcoder_rows"]
