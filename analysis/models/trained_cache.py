"""The on-disk cache of models LensLab trains itself: where they live, their keys and records, and
how a finished model is published.

Cache: ``<user cache>/lenslab/models/<kind>-<hash>`` (``$LENSLAB_MODELS`` overrides the root),
hash = sha256 of the full config (seed and steps included) and ``TRAIN_VERSION``. A model is
written into a temp dir next to its target and renamed into place (``os.replace``), so a killed
run leaves no half model; later runs reuse it. ``lenslab_training.json`` in each directory
records the kind, the config, the metrics (losses, accuracy, wall time) and ``TRAIN_VERSION``.

Used by ``analysis.models.tiny_lm`` (the tiny LMs and the digits model) and
``analysis.models.mlm_head`` (``config_key``, ``models_dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.errors import SourceError

MODELS_ENV = "LENSLAB_MODELS"
TRAIN_VERSION = "tiny-1"
INFO_FILE = "lenslab_training.json"


def models_dir() -> Path:
    """Root of the trained-model cache: ``$LENSLAB_MODELS`` or ``<user cache>/lenslab/models``."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lenslab")) / "models"


def config_key(config: dict[str, Any]) -> str:
    """12 hex characters of sha256 over the canonical config and ``TRAIN_VERSION``."""
    payload = json.dumps({"config": config, "version": TRAIN_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TrainedModel:
    """A trained model on disk and what its training recorded."""

    kind: str  # "bilinear-llama" | "mixtral" | "bilinear-digits"
    path: Path  # directory with model.safetensors (+ tokenizer and config.json for LMs)
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)  # losses, accuracy, seconds
    reused: bool = False  # True when read back from the cache


def read_training_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``lenslab_training.json`` of a trained model directory."""
    p = Path(path) / INFO_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{p}: missing or unreadable training record ({exc}); retrain with "
                          "`lenslab bilinear train` (or delete the directory)") from exc


def complete(d: Path, needs: tuple[str, ...]) -> bool:
    """Whether ``d`` holds the record, ``model.safetensors`` and every file in ``needs``."""
    return all((d / n).is_file() for n in (INFO_FILE, "model.safetensors", *needs))


def publish(tmp: Path, final: Path, needs: tuple[str, ...], config: dict[str, Any], force: bool) -> Path:
    """Rename the finished ``tmp`` dir to ``final`` (atomic). An existing complete model with the
    same config (a concurrent run won the race) is kept unless ``force``; anything else there
    (another config, a partial copy) is moved aside and deleted first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        same = complete(final, needs) and read_training_info(final).get("config") == config
        if same and not force:
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # a concurrent run published between our check and the rename: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not complete(final, needs):
            raise
    return final


def target_dir(kind: str, config: dict[str, Any], out_dir: str | os.PathLike | None) -> Path:
    """``out_dir`` when given, else ``<models_dir>/<kind>-<config_key>``."""
    return Path(out_dir).expanduser() if out_dir is not None else models_dir() / f"{kind}-{config_key(config)}"


def reuse(kind: str, target: Path, config: dict[str, Any], needs: tuple[str, ...]) -> TrainedModel | None:
    """The model at ``target`` when it is complete and was trained with exactly ``config`` by this
    ``TRAIN_VERSION``, else None."""
    if not complete(target, needs):
        return None
    info = read_training_info(target)
    if info.get("config") != config or info.get("version") != TRAIN_VERSION:
        return None
    return TrainedModel(kind, target, config, info.get("metrics", {}), reused=True)


def tmp_dir(target: Path) -> Path:
    """A fresh hidden directory next to ``target`` to write a model into before ``publish``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def write_info(d: Path, kind: str, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Write the training record ``INFO_FILE`` into ``d``."""
    (d / INFO_FILE).write_text(json.dumps({"kind": kind, "version": TRAIN_VERSION, "config": config,
                                           "metrics": metrics}, indent=1))
