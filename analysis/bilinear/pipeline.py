"""The bilinear analysis through the runner (``analysis.run``): its store entry and its public API.

    >>> from app import api                                        # re-exports everything below
    >>> api.bilinear_train("digits")                               # the trained-model cache, not the store
    >>> rep = api.bilinear_decompose("bilinear-digits", direction="class:all")
    >>> pos, neg = api.bilinear_top(rep, 3, 4)                     # top +λ / −λ eigenvectors of class 3
    >>> api.bilinear_explain(rep, 7).contributions                 # what drives explored input 7

One stored analysis, ``bilinear.decompose`` (``DECOMPOSE``): ``analysis.bilinear.report.build_report``
on a GLU / bilinear layer, packed by ``report.to_result``. Its store key is the one LensLab wrote
before the runner existed: name ``"bilinear.decompose"``, code version ``report.CODE_VERSION``
(``"bilinear-1/report-1"``) and the params ``{"layer", "expert", "n_eval", "direction"}`` (the
canonical direction spec) plus ``"file_sha256"`` for the ``vector:`` / ``sae:`` specs that read a file.

Device: the decomposition computes in float64, so ``device="auto"`` means CUDA when available,
else CPU (MPS has no float64; asking for ``mps`` explicitly is a ConfigError). Training
(``bilinear_train``) runs in float32 on any device, ``auto`` included. Results are CPU arrays.

Reading back: ``stored_bilinear`` (index rows, newest first), ``load_bilinear(key)`` (raises
``NotStoredError``), ``find_bilinear(fingerprint, settings)`` (the entry for exactly these
settings, or None). Never computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.bilinear import evaluate
from analysis.bilinear import inputs as inputs_mod
from analysis.bilinear import report as report_mod
from analysis.bilinear.loader import spec_params
from analysis.bilinear.report import BilinearReport, Explanation
from analysis.device import resolve_device, resolve_float64_device
from analysis.errors import ConfigError
from analysis.models import tiny_lm
from analysis.models.trained_cache import TrainedModel
from analysis.progress import Progress
from analysis.run import Analysis, RunContext, StoreLike, Subject, find, load, register, run, stored
from analysis.sources import Source, open_source
from analysis.store import EntryInfo, Result

BILINEAR = "bilinear.decompose"  # the store's analysis name (in every key: never change it)
BILINEAR_TRAIN_KINDS = {"digits": "bilinear-digits", "lm": "bilinear-llama", "mixtral": "mixtral"}
HF_LM_VARIANT = "hf-causal-lm"  # the model cache's name for an LM booted as a plain HF causal LM
DEPRECATED: dict[str, str] = {}  # old name -> new name (none: every old name keeps its meaning)


@dataclass(frozen=True, kw_only=True)
class DecomposeParams:
    """Validated settings of one decomposition; ``store_params()`` is its store key's params."""

    layer: int = 0  # block index of the GLU / bilinear layer
    direction: str = "hosvd:8"  # canonical direction spec (analysis.bilinear.loader.canonical_spec)
    expert: int | None = None  # expert index for a mixture-of-experts layer
    n_eval: int = 256  # held-out LM positions evaluated (the digits model uses its whole test split)
    file_sha256: str | None = None  # sha256 of the file a vector: / sae: spec reads

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ConfigError(f"layer={self.layer} must be >= 0: it is the block index of the GLU layer "
                              "(0 for a model with one bilinear layer)")
        if self.expert is not None and self.expert < 0:
            raise ConfigError(f"expert={self.expert} must be >= 0, or None for a dense layer")
        if self.n_eval < 1:
            raise ConfigError(f"n_eval={self.n_eval} must be >= 1 (held-out positions to evaluate on)")

    @classmethod
    def of(cls, layer: int = 0, direction: str | None = None, expert: int | None = None,
           n_eval: int = 256) -> DecomposeParams:
        """From the API's arguments: the direction spec canonicalised (and its file hashed)."""
        spec = spec_params(direction)
        return cls(layer=int(layer), direction=spec["direction"], expert=None if expert is None else int(expert),
                   n_eval=int(n_eval), file_sha256=spec.get("file_sha256"))

    def store_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"layer": self.layer, "expert": self.expert, "n_eval": self.n_eval,
                                  "direction": self.direction}
        if self.file_sha256 is not None:
            params["file_sha256"] = self.file_sha256
        return params


def _boot_hf_lm(src: Source, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return inputs_mod.load_hf_model(src)  # float32; the model cache moves it to ``device``


def _compute(subject: Subject, params: DecomposeParams, ctx: RunContext) -> Result:
    src = subject.source
    rep = report_mod.build_report(
        src, layer=params.layer, direction=params.direction, expert=params.expert, n_eval=params.n_eval,
        progress=ctx.report, device=ctx.device, lock=ctx.lock,
        lm_model=lambda: ctx.bridge(src, variant=HF_LM_VARIANT, boot=_boot_hf_lm))
    return report_mod.to_result(rep)


DECOMPOSE: Analysis[BilinearReport] = register(Analysis(
    name=BILINEAR, code_version=report_mod.CODE_VERSION, compute=_compute, from_result=report_mod.from_result,
    doc="Eigendecomposition of a GLU / bilinear layer's interaction matrices along output directions."))


# -- API ---------------------------------------------------------------------------------------
def bilinear_train(kind: str = "digits", *, force: bool = False, progress: Progress | None = None,
                   device: str | torch.device | None = "auto", **overrides: Any) -> TrainedModel:
    """Train (or reuse from the model cache) ``digits`` | ``lm`` | ``mixtral`` on ``device``;
    ``overrides`` are ``analysis.models.bilinear_digits.DigitsConfig`` / ``analysis.models.tiny_lm.TinyLMConfig``
    fields. Returns ``TrainedModel`` (path, config, metrics such as test accuracy or loss).
    The device is not part of the cache key: a model trained elsewhere with the same config is reused."""
    if kind not in BILINEAR_TRAIN_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of {', '.join(BILINEAR_TRAIN_KINDS)}")
    dev = resolve_device(device)
    if kind == "digits":
        return tiny_lm.train_digits(force=force, progress=progress, device=dev, **overrides)
    return tiny_lm.train_tiny_lm(BILINEAR_TRAIN_KINDS[kind], force=force, progress=progress, device=dev, **overrides)


def bilinear_params(layer: int = 0, direction: str | None = None, expert: int | None = None,
                    n_eval: int = 256) -> dict[str, Any]:
    """Store parameters of a decomposition (the direction spec in canonical form)."""
    return DecomposeParams.of(layer, direction, expert, n_eval).store_params()


def bilinear_decompose(source: str | os.PathLike | torch.nn.Module | Source = "bilinear-digits", *, layer: int = 0,
                       direction: str | None = None, expert: int | None = None, n_eval: int = 256,
                       store: StoreLike = None, refresh: bool = False, progress: Progress | None = None,
                       trust_pickle: bool = False, device: str | torch.device | None = "auto") -> BilinearReport:
    """Eigendecomposition of the GLU / bilinear layer ``layer`` of ``source`` along ``direction``
    (``class:all``, ``token:the,def``, ``resid:3``, ``vector:u.npy``, ``sae:DIR:5``, ``hosvd:8``;
    None = HOSVD), cached in the store. Torch work runs on ``device`` (see the module docstring).
    Interrupting stores nothing.

        >>> rep = bilinear_decompose("bilinear-digits", direction="class:all")
        >>> rep.images.shape           # (10 classes, 64 eigenvectors, 8, 8)
    """
    params = DecomposeParams.of(layer, direction, expert, n_eval)  # fails on a bad spec before any work
    dev = resolve_float64_device(device, "the bilinear decomposition")
    src = open_source(source, trust_pickle=trust_pickle)
    return run(DECOMPOSE, src, params, store=store, refresh=refresh, progress=progress, device=dev)


def stored_bilinear(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows (``EntryInfo``) of stored decompositions, newest first (never computes)."""
    return stored(DECOMPOSE, fingerprint, store=store)


def load_bilinear(key: str, store: StoreLike = None) -> BilinearReport:
    """The stored decomposition with this entry key (or a unique prefix of 8+ characters).

    Raises ``analysis.run.NotStoredError`` when there is none (or the entry is another analysis's)."""
    return load(key, store=store, analysis=DECOMPOSE)


def find_bilinear(fingerprint: str, *, layer: int = 0, direction: str | None = None, expert: int | None = None,
                  n_eval: int = 256, store: StoreLike = None) -> BilinearReport | None:
    """The decomposition stored for exactly these settings of the model ``fingerprint``, or None
    (never computes)."""
    return find(DECOMPOSE, fingerprint, DecomposeParams.of(layer, direction, expert, n_eval), store=store)


def _direction_index(report: BilinearReport, direction: int) -> int:
    k = len(report.decomposition.labels)
    if not 0 <= int(direction) < k:
        raise ConfigError(f"direction index {direction} is out of range 0..{k - 1} ({report.direction})")
    return int(direction)


def bilinear_top(report: BilinearReport, direction: int, m: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``m`` most positive and the ``m`` most negative eigenvalues of direction
    number ``direction`` of ``report`` (each ordered by magnitude; fewer when a sign has fewer)."""
    if m < 1:
        raise ConfigError(f"m={m} must be >= 1 (eigenvectors per sign)")
    return evaluate.top_signed(report.decomposition.eigenvalues[_direction_index(report, direction)], m)


def bilinear_explain(report: BilinearReport, index: int, direction: int | None = None,
                     top: int = 12) -> Explanation:
    """Which eigenvectors drive explored input ``index`` of ``report``: its output along every
    direction and the ``top`` largest contributions λ_i (v_i·x̃)² along ``direction`` (default:
    the largest output). Reads the stored contributions only."""
    return report_mod.explain(report, index, direction=direction, top=top)
