"""The labelled features the MMoE probes train on: which data (``DataSpec``), its fingerprint
(``data_id``), and the docstring embeddings stored as ``mmoe.features``.

Two tasks (``probes.training``): ``digits`` (sklearn 8x8 images, loaded instantly, fingerprint =
``data_id`` of its features) and ``docstrings`` (MiniLM sentence embeddings of the package-of-a-
docstring task, computed once and stored under the encoder's fingerprint; the corpus settings and
the installed package versions are in the params, so an upgrade re-embeds).

Every MMoE result is stored under a dataset fingerprint; ``FeatureSubject`` carries the features
with it into the runner, so a probe's ``compute`` trains on exactly the data its key names.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError
from analysis.run import RunContext, Subject
from analysis.store import Result
from probes.training import DATASETS, DOC_PACKAGES, FeatureSet

DIGITS_LABEL = "sklearn digits (8x8)"
POOLING = "mean+l2"


def data_id(X: np.ndarray, y: np.ndarray) -> str:
    """32-hex content hash of features ``X`` (n, d) and labels ``y`` (n,) (float32 / int64 bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Which labelled features the probes train on (validated; ConfigError on bad values)."""

    data: str = "digits"  # digits | docstrings
    packages: tuple[str, ...] = DOC_PACKAGES  # docstrings: the classes
    per_package: int = 200  # docstrings: at most this many texts per package
    max_tokens: int = 128  # docstrings: MiniLM truncation
    encoder: str = "minilm"  # docstrings: source of the sentence encoder
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ConfigError(f"unknown data {self.data!r}; choose one of {', '.join(DATASETS)}")
        object.__setattr__(self, "packages", tuple(self.packages))
        if len(self.packages) < 2:
            raise ConfigError(f"packages={self.packages}: a classification task needs at least 2 packages")
        if self.per_package < 5 or self.max_tokens < 4:
            raise ConfigError(f"per_package={self.per_package} must be >= 5 and max_tokens={self.max_tokens} >= 4")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction={self.test_fraction} must lie strictly between 0 and 1")

    def params(self) -> dict[str, Any]:
        """The data settings as they appear in the params of every MMoE entry (part of store keys)."""
        base = {"data": self.data, "test_fraction": self.test_fraction, "seed": self.seed}
        if self.data == "docstrings":
            base |= {"packages": list(self.packages), "per_package": self.per_package,
                     "max_tokens": self.max_tokens, "encoder": self.encoder}
        return base

    @property
    def label(self) -> str:
        """Display name of the data (curve metadata)."""
        return DIGITS_LABEL if self.data == "digits" else f"docstrings · {self.encoder}"


def corpus_versions(packages: Sequence[str]) -> dict[str, str]:
    """Python's version and each package's installed version ("stdlib" when it is not a distribution):
    the docstring corpus changes with them, so they are part of the store params."""
    from importlib.metadata import PackageNotFoundError, version

    dist = {"sklearn": "scikit-learn"}
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = version(dist.get(p, p))
        except PackageNotFoundError:
            out[p] = "stdlib"
    return out


@dataclass(frozen=True, slots=True, eq=False)
class FeatureSubject(Subject):
    """A dataset fingerprint with the features it names (``source`` None: nothing is registered)."""

    features: FeatureSet | None = None


def feature_subject(features: FeatureSet, fingerprint: str) -> FeatureSubject:
    return FeatureSubject(fingerprint, None, features)


# -- mmoe.features: docstring embeddings ----------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureParams:
    """Settings of the stored docstring embeddings; ``items`` (the corpus walk, ``analysis.corpus.DocText``)
    is what gets embedded and is not part of the key (its settings and the package versions are)."""

    packages: tuple[str, ...]
    per_package: int
    max_tokens: int
    seed: int
    versions: dict[str, str]
    items: tuple[Any, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, spec: DataSpec) -> FeatureParams:
        from probes.training import docstring_items

        items = docstring_items(spec.packages, per_package=spec.per_package, seed=spec.seed)
        return cls(packages=spec.packages, per_package=spec.per_package, max_tokens=spec.max_tokens, seed=spec.seed,
                   versions=corpus_versions(spec.packages), items=tuple(items))

    def store_params(self) -> dict[str, Any]:
        return {"packages": list(self.packages), "per_package": self.per_package, "max_tokens": self.max_tokens,
                "seed": self.seed, "pooling": POOLING, "versions": dict(self.versions)}


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Stored sentence embeddings: ``texts`` one row per text (text, package, qualname), ``X`` (n, d_model)."""

    texts: pd.DataFrame
    X: np.ndarray

    def matches(self, items: Sequence[Any]) -> bool:
        """Whether these are the embeddings of exactly ``items`` (same texts, same order)."""
        return list(self.texts["text"]) == [d.text for d in items]


def compute_features(subject: Subject, params: FeatureParams, ctx: RunContext) -> Result:
    """Embed ``params.items`` with the encoder of ``subject.source`` on ``ctx.device``."""
    from probes.training import embed_texts

    items = params.items
    X = embed_texts(subject.source.model_dir(), [d.text for d in items], max_tokens=params.max_tokens,
                    progress=ctx.report, device=ctx.device)
    table = pd.DataFrame({"text": [d.text for d in items], "package": [d.package for d in items],
                          "qualname": [d.qualname for d in items]})
    return Result(table=table, arrays={"X": X}, meta={"n": len(items), "d_model": int(X.shape[1])})


def embeddings_from_result(result: Result) -> Embeddings:
    return Embeddings(result.table, np.array(result.arrays["X"]))


def docstring_feature_set(spec: DataSpec, params: FeatureParams, emb: Embeddings) -> FeatureSet:
    """The docstring ``FeatureSet`` of ``spec`` from its stored embeddings."""
    from probes.training import docstring_features

    return docstring_features(params.items, emb.X, spec.packages, test_fraction=spec.test_fraction, seed=spec.seed)


def digits_feature_set(spec: DataSpec) -> tuple[FeatureSet, str]:
    """(digits features, their ``data_id``)."""
    from probes.training import digits_features

    fs = digits_features(test_fraction=spec.test_fraction, seed=spec.seed)
    return fs, data_id(fs.X, fs.y)
