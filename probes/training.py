"""Probes on frozen features: a linear probe, a parameter-matched linear layer and MMoE probes.

Tasks (``FeatureSet``), both offline:

- ``digits``: scikit-learn's 8x8 digits (1,797 images, 10 classes), pixels / 16 as features.
- ``docstrings``: which package a docstring comes from (``analysis.corpus``), features =
  MiniLM sentence embeddings (mean of the last hidden states over real tokens, L2-normalised;
  ``analysis.models.encoder.mean_pool``). Computing them takes ~1 min on 2 cores; the
  API caches them in the store (``mmoe.features``).

Both are split per class (stratified) into train and test with a fixed seed.

Probe architectures (``ProbeClassifier(layer=..., hidden=...)``), on standardised features:

- ``layer="linear", hidden=None``: the linear probe, Linear(d, C).
- ``layer="linear", hidden=H``: Linear(d, H) -> GELU -> Linear(H, C) (the parameter-matched
  linear layer the MMoE replaces);
- ``layer="cp" | "tr", hidden=H``: MMoE(d, H) -> GELU -> Linear(H, C), the MMoE's rank chosen
  so it has at most as many parameters as Linear(d, H) (``budget``);
- ``layer="cp" | "tr", hidden=None``: the MMoE is the classifier head, MMoE(d, C); its
  logits are linear in the gate coefficients.

With hidden=None the budget of a C-class head, (d + 1) C, leaves room for fewer than C
experts (the gate alone costs d · N): the curve therefore uses a hidden layer by default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.errors import ConfigError, ShapeError
from analysis.progress import Progress
from probes.mmoe import GATES, KINDS, MMoE, build_mmoe, linear_params, rank_for_budget

LAYERS = ("linear", *KINDS)
DATASETS = ("digits", "docstrings")
# Nine packages with at least ~90 docstrings each: five scientific libraries, four stdlib modules.
DOC_PACKAGES = ("numpy", "scipy", "pandas", "torch", "sklearn", "asyncio", "http", "logging", "typing")



@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (restored after); None leaves it alone.

    The probes are small: one thread is several times faster than two when other processes
    share the cores (measured here: 2 s vs 15-25 s per fit under load)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """Frozen features of one labelled task, split into train and test.

    ``X`` (n, d) float32; ``y`` (n,) int64 in [0, C); ``is_test`` (n,) bool; ``texts`` one
    display string per sample; ``images`` (n, 8, 8) for digits, else None.
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    is_test: np.ndarray
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    images: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.y)
        if self.X.ndim != 2 or self.X.shape[0] != n or self.is_test.shape != (n,) or len(self.texts) != n:
            raise ShapeError(f"feature set {self.name!r}: X {self.X.shape}, y {self.y.shape}, is_test "
                             f"{self.is_test.shape} and {len(self.texts)} texts disagree on the sample count")
        if n and (self.y.min() < 0 or self.y.max() >= len(self.classes)):
            raise ConfigError(f"feature set {self.name!r}: labels must lie in [0, {len(self.classes)}); "
                              f"got {self.y.min()}..{self.y.max()}")

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X[~self.is_test], self.y[~self.is_test]

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X[self.is_test], self.y[self.is_test]


def stratified_test_mask(y: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: floor(test_fraction · n_c) random samples of every class c are test samples."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        mask[rng.permutation(idx)[: int(math.floor(test_fraction * len(idx)))]] = True
    return mask


def digits_features(*, test_fraction: float = 0.2, seed: int = 0) -> FeatureSet:
    """scikit-learn digits (bundled with the package: no download); X = pixels / 16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    y = data.target.astype(np.int64)
    texts = tuple(f"digit {int(t)} (image #{i})" for i, t in enumerate(y))
    return FeatureSet("digits", (data.data / 16.0).astype(np.float32), y, stratified_test_mask(y, test_fraction, seed),
                      tuple(str(c) for c in range(10)), texts, images=data.images.astype(np.float32) / 16.0)


def docstring_items(packages: Sequence[str] = DOC_PACKAGES, *, per_package: int = 200, seed: int = 0,
                    min_per_package: int = 5):
    """The labelled docstrings (``analysis.corpus.DocText``) of the docstring task; ConfigError
    when a package has fewer than ``min_per_package``."""
    from analysis.corpus import docstring_corpus

    items = docstring_corpus(tuple(packages), per_package=per_package, seed=seed)
    counts = {p: sum(d.package == p for d in items) for p in packages}
    if short := [p for p, n in counts.items() if n < min_per_package]:
        raise ConfigError(f"packages {short} have fewer than {min_per_package} docstrings ({counts}); drop them "
                          "from --packages or lower per_package")
    return items


def embed_texts(hf_dir: Any, texts: Sequence[str], *, max_tokens: int = 128, batch_size: int = 32,
                progress: Progress | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """MiniLM-style sentence embeddings (n, d_model) float32 on the CPU: masked mean pooling + L2
    norm, the encoder run on ``device``."""
    from analysis.models.encoder import collate, load_encoder, mean_pool, tokenize

    device = torch.device(device)
    model, tokenizer = load_encoder(hf_dir)
    model = model.to(device)
    pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    ids = tokenize(tokenizer, list(texts), max_tokens)
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths per batch: less padding
    out = np.empty((len(ids), int(model.config.hidden_size)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = order[start:start + batch_size]
            x, mask = collate([ids[i] for i in chunk], pad_id)
            x, mask = x.to(device), mask.to(device)
            out[chunk] = mean_pool(model(input_ids=x, attention_mask=mask).last_hidden_state, mask).cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, len(ids)), len(ids), "MiniLM embeddings")
    return out


def docstring_features(items: Sequence[Any], X: np.ndarray, packages: Sequence[str], *, test_fraction: float = 0.2,
                       seed: int = 0) -> FeatureSet:
    """FeatureSet from docstrings ``items`` and their embeddings ``X`` (n, d)."""
    index = {p: i for i, p in enumerate(packages)}
    y = np.array([index[d.package] for d in items], dtype=np.int64)
    return FeatureSet("docstrings", np.asarray(X, dtype=np.float32), y, stratified_test_mask(y, test_fraction, seed),
                      tuple(packages), tuple(d.text for d in items))


# -- probes -------------------------------------------------------------------------------
class _ProbeNet(nn.Module):
    def __init__(self, layer: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.layer = layer
        self.head = head

    def forward(self, x: torch.Tensor, gate_scale: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.layer, MMoE) and gate_scale is not None:
            (a,) = self.layer.gate_coefficients(x)
            h = self.layer(x, a=a * gate_scale)
        else:
            h = self.layer(x)
        return h if self.head is None else self.head(nn.functional.gelu(h))


class ProbeClassifier:
    """A classifier trained on frozen features (see the module docstring for the layouts).

    ``fit(X, y)`` returns self and sets: ``net_`` (torch module), ``n_classes_``, ``mean_``/``scale_``
    (feature standardisation), ``rank_`` (MMoE rank, None for linear), ``budget_`` (parameter
    budget of the first layer), ``layer_params_`` (its parameters), ``n_params_`` (whole probe),
    ``losses_`` (training loss per epoch, nats), ``fit_seconds_``.

    Device: ``fit(X, y, device=...)`` trains on that device (the weights are initialised on the
    CPU first, so a CPU fit is bit-identical whatever device is asked for later); ``to(device)``
    moves a fitted probe. Inputs and outputs are CPU numpy arrays wherever the probe runs.
    """

    def __init__(self, *, layer: str = "cp", n_experts: int | None = None, hidden: int | None = 512,
                 gate: str = "entmax15", budget: int | None = None, epochs: int = 40, batch_size: int = 128,
                 lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, threads: int | None = 1) -> None:
        self.layer, self.n_experts, self.hidden, self.gate, self.budget = layer, n_experts, hidden, gate, budget
        self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed = epochs, batch_size, lr, weight_decay, seed
        self.threads = threads  # torch threads while fitting and predicting (not part of params())
        self._validate()

    def _validate(self) -> None:
        if self.layer not in LAYERS:
            raise ConfigError(f"unknown probe layer {self.layer!r}; choose one of {', '.join(LAYERS)}")
        if self.gate not in GATES:
            raise ConfigError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.layer != "linear" and (self.n_experts is None or int(self.n_experts) < 1):
            raise ConfigError(f"an MMoE probe needs n_experts >= 1, got {self.n_experts!r}")
        if self.hidden is not None and int(self.hidden) < 1:
            raise ConfigError(f"hidden={self.hidden}: give a width >= 1, or None for a single-layer probe")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")

    def params(self) -> dict[str, Any]:
        """Constructor arguments as JSON values (part of the store key)."""
        return {"layer": self.layer, "n_experts": self.n_experts, "hidden": self.hidden, "gate": self.gate,
                "budget": self.budget, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "seed": self.seed}

    # -- building ----------------------------------------------------------------------------
    def _build(self, d_in: int, n_classes: int) -> None:
        width = n_classes if self.hidden is None else int(self.hidden)
        self.budget_ = linear_params(d_in, width) if self.budget is None else int(self.budget)
        self._check_memory(d_in, width, n_classes)
        if self.layer == "linear":
            first: nn.Module = nn.Linear(d_in, width)
            self.rank_ = None
        else:
            self.rank_ = rank_for_budget(self.layer, d_in, width, int(self.n_experts), self.budget_)
            first = build_mmoe(self.layer, d_in, width, int(self.n_experts), self.rank_, gate=self.gate)
        head = None if self.hidden is None else nn.Linear(width, n_classes)
        self.net_ = _ProbeNet(first, head)
        self.layer_params_ = sum(p.numel() for p in first.parameters())
        self.n_params_ = sum(p.numel() for p in self.net_.parameters())
        self.n_classes_ = n_classes

    def _check_memory(self, d_in: int, width: int, n_classes: int) -> None:
        """ConfigError before any layer is allocated when the probe's parameters (the first
        layer fills its budget at most) times 16 bytes (weights, gradients, AdamW's two moments)
        exceed ``analysis.memory.memory_limit()``."""
        from analysis.memory import gib, require_fits

        first = linear_params(d_in, width) if self.layer == "linear" else self.budget_
        n = first + (0 if self.hidden is None else linear_params(width, n_classes))
        require_fits(16 * n, lambda limit: f"the probe ({self.describe()}) would need at least {gib(16 * n)} ({n:,} "
                                           f"parameters x 16 bytes: weights, gradients, AdamW moments) but the memory "
                                           f"limit is {limit.describe()}; lower hidden (--hidden) or budget (--budget)")

    def _standardise(self, X: np.ndarray) -> torch.Tensor:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.mean_.shape[0]:
            raise ShapeError(f"expected features (n, {self.mean_.shape[0]}), got {X.shape}")
        return torch.from_numpy((X - self.mean_) / self.scale_).to(self.device_)

    @property
    def device_(self) -> torch.device:
        """Where the fitted network lives (CPU before ``fit``)."""
        net = getattr(self, "net_", None)
        return next(net.parameters()).device if net is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> ProbeClassifier:
        """Move the fitted network to ``device``; returns self."""
        self._check_fitted()
        self.net_ = self.net_.to(torch.device(device))
        return self

    def fit(self, X: np.ndarray, y: np.ndarray, *, progress: Progress | None = None,
            device: str | torch.device = "cpu") -> ProbeClassifier:
        """Train on features ``X`` (n, d) and labels ``y`` (n,) in [0, C) on ``device``; returns self."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < 2:
            raise ShapeError(f"expected X (n >= 2, d) and y (n,), got {X.shape} and {y.shape}")
        if y.dtype.kind not in "iu" or y.min() < 0:
            raise ConfigError("labels must be non-negative integers (class indices); map names to 0..C-1 first")
        n_classes = int(y.max()) + 1
        self.mean_ = X.mean(0)
        self.scale_ = np.where(X.std(0) > 1e-8, X.std(0), 1.0).astype(np.float32)
        with torch_threads(self.threads):
            return self._fit(X, y, n_classes, progress, torch.device(device))

    def _fit(self, X: np.ndarray, y: np.ndarray, n_classes: int, progress: Progress | None,
             device: torch.device) -> ProbeClassifier:
        torch.manual_seed(self.seed)
        self._build(X.shape[1], n_classes)  # initialised on the CPU: the same weights on every device
        self.net_ = self.net_.to(device)
        xt, yt = self._standardise(X), torch.from_numpy(y.astype(np.int64)).to(device)
        opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)
        self.losses_ = np.empty(self.epochs)
        t0 = time.perf_counter()
        self.net_.train()
        for epoch in range(self.epochs):
            order = rng.permutation(len(y))
            total, count = 0.0, 0
            for start in range(0, len(y), self.batch_size):
                idx = order[start:start + self.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                loss = nn.functional.cross_entropy(self.net_(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            self.losses_[epoch] = total / max(count, 1)
            if progress is not None:
                progress(epoch + 1, self.epochs, f"{self.describe()} epoch {epoch + 1}/{self.epochs}")
        self.net_.eval()
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def describe(self) -> str:
        if self.layer == "linear":
            return "linear probe" if self.hidden is None else f"linear layer (hidden {self.hidden})"
        return f"{self.layer.upper()} MMoE, {self.n_experts} experts"

    # -- inference ---------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise ConfigError("this probe is not fitted yet; call fit(X, y) first")

    def logits(self, X: np.ndarray, gate_scale: np.ndarray | None = None) -> np.ndarray:
        """(n, C) logits; ``gate_scale`` (n_experts,) multiplies every expert's coefficient
        (0 ablates an expert: its term a_k W_k^T x' is removed exactly)."""
        self._check_fitted()
        scale = None
        if gate_scale is not None:
            if self.layer == "linear":
                raise ConfigError("gate_scale applies to MMoE probes only; this probe is linear")
            scale = torch.as_tensor(np.asarray(gate_scale, dtype=np.float32))
            if scale.shape != (int(self.n_experts),):
                raise ShapeError(f"gate_scale must be ({self.n_experts},), got {tuple(scale.shape)}")
            scale = scale.to(self.device_)
        with torch_threads(self.threads), torch.inference_mode():
            return self.net_(self._standardise(X), scale).cpu().numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.logits(X).argmax(1)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy in [0, 1]."""
        return float((self.predict(X) == np.asarray(y)).mean())

    def gates(self, X: np.ndarray) -> np.ndarray:
        """(n, n_experts) gate coefficients a (rows sum to 1) of an MMoE probe."""
        self._check_fitted()
        if not isinstance(self.net_.layer, MMoE):
            raise ConfigError("gates() needs an MMoE probe; this probe is linear")
        with torch_threads(self.threads), torch.inference_mode():
            (a,) = self.net_.layer.gate_coefficients(self._standardise(X))
        return a.cpu().numpy()

    # -- persistence (store arrays) ----------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything ``from_state`` needs, as named numpy arrays (weights, BatchNorm stats, scaling)."""
        self._check_fitted()
        out = {f"net.{k}": v.detach().cpu().numpy().copy() for k, v in self.net_.state_dict().items()}
        out |= {"mean": self.mean_, "scale": self.scale_, "losses": self.losses_}
        return out

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray], n_classes: int) -> ProbeClassifier:
        """Rebuild a fitted probe from ``params()`` and ``state_arrays()``."""
        probe = cls(**params)
        probe.mean_ = np.array(arrays["mean"], dtype=np.float32)
        probe.scale_ = np.array(arrays["scale"], dtype=np.float32)
        probe.losses_ = np.array(arrays["losses"])
        probe._build(probe.mean_.shape[0], n_classes)
        state = {k.removeprefix("net."): torch.from_numpy(np.array(v)) for k, v in arrays.items()
                 if k.startswith("net.")}
        probe.net_.load_state_dict(state)
        probe.net_.eval()
        probe.fit_seconds_ = math.nan
        return probe
