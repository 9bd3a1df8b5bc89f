"""Checkpoints of an SAE training run (a ``TrainState``): one safetensors file holding the weights,
the Adam moments and the firing counters, with the JSON state (step, counters, history, the
config and a signature of the activations) in its metadata.

A checkpoint is written to a temp file and renamed into place, so an interrupt leaves the last
complete one intact. Loading checks the version, the config and the activations' signature:
a run resumed from it ends with the weights of an uninterrupted run. Tensors are stored from
the host; loading copies them onto the run's device.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from analysis.errors import ConfigError, CorruptCheckpointError

if TYPE_CHECKING:
    from sae.train_state import TrainState

CHECKPOINT_VERSION = "sae-ckpt-1"
PARAMS = ("W_encT", "W_dec", "b_enc", "b_dec")  # optimiser layout (W_encT = W_enc.T)


def data_signature(tr: TrainState) -> dict[str, Any]:
    """Row count, width and two sums over every (n // 64)-th row of the run's activations."""
    stride = max(1, tr.n // 64)
    probe = tr.x[::stride].cpu().to(torch.float64)
    return {"n": tr.n, "d_in": int(tr.x.shape[1]), "probe_sum": float(probe.sum()),
            "probe_sq": float((probe ** 2).sum())}


def save_checkpoint(tr: TrainState, path: Path) -> None:
    """Write ``tr`` to ``path`` atomically (temp file, then ``os.replace``)."""
    from safetensors.torch import save_file

    tensors = {**{n: t.contiguous() for n, t in tr.p.items()},
               **{f"adam_m.{n}": t for n, t in tr.m.items()}, **{f"adam_v.{n}": t for n, t in tr.v.items()},
               "last_fired": tr.last_fired, "counts": tr.counts, "prev_counts": tr.prev_counts,
               **{f"state.{n}": t for n, t in tr.extra_state.items()}}
    tensors = {n: t.cpu() for n, t in tensors.items()}
    state = {"version": CHECKPOINT_VERSION, "cfg": tr.cfg.to_dict(), "step": tr.step,
             "count_tokens": tr.count_tokens, "prev_tokens": tr.prev_tokens,
             "prev_resample": tr.prev_resample, "n_resampled": tr.n_resampled, "l0_est": tr.l0_est,
             "history": tr.history, "data": data_signature(tr)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"lenslab_state": json.dumps(state)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(tr: TrainState, path: Path) -> None:
    """Restore ``tr`` from ``path``. CorruptCheckpointError for an unreadable file or another
    checkpoint version; ConfigError for a checkpoint of another config or other activations."""
    from safetensors import SafetensorError, safe_open

    from analysis.sources import read_safetensors_header

    header = read_safetensors_header(path)  # CorruptCheckpointError when truncated
    try:
        state = json.loads(header["__metadata__"]["lenslab_state"])
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise CorruptCheckpointError(f"{path}: not a LensLab SAE checkpoint ({exc}); delete it or pass "
                                     "resume=False (lenslab sae train --no-resume) to start over") from exc
    if state.get("version") != CHECKPOINT_VERSION:
        raise CorruptCheckpointError(f"{path}: checkpoint version {state.get('version')!r}, expected "
                                     f"{CHECKPOINT_VERSION!r}; delete it to start over")
    if state["cfg"] != tr.cfg.to_dict():
        diff = sorted(k for k in set(state["cfg"]) | set(tr.cfg.to_dict())
                      if state["cfg"].get(k) != tr.cfg.to_dict().get(k))
        raise ConfigError(f"{path}: the checkpoint was written with a different config (differs in {diff}); "
                          "train with the same config, delete the checkpoint, or pass resume=False "
                          "(lenslab sae train --no-resume)")
    if state["data"] != data_signature(tr):
        raise ConfigError(f"{path}: the checkpoint was trained on other activations ({state['data']} vs "
                          f"{data_signature(tr)}); resume on the same activations or pass resume=False "
                          "(lenslab sae train --no-resume)")
    for n in tr.p:  # PARAMS plus the architecture's own (jumprelu's threshold, gated's r_mag, b_mag)
        tr.p[n].copy_(tensors[n])
        tr.m[n].copy_(tensors[f"adam_m.{n}"])
        tr.v[n].copy_(tensors[f"adam_v.{n}"])
    for n, t in tr.extra_state.items():
        t.copy_(tensors[f"state.{n}"])
    tr.last_fired.copy_(tensors["last_fired"])
    tr.counts.copy_(tensors["counts"])
    tr.prev_counts.copy_(tensors["prev_counts"])
    tr.step = int(state["step"])
    tr.count_tokens, tr.prev_tokens = int(state["count_tokens"]), int(state["prev_tokens"])
    tr.prev_resample, tr.n_resampled = int(state["prev_resample"]), int(state["n_resampled"])
    tr.l0_est = float(state["l0_est"])
    tr.history = list(state["history"])
