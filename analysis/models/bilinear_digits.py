"""Bilinear layers and the digits image model (Pearce et al. 2025, "Bilinear MLPs").

``BilinearLayer``: out = P((W x + b_w) ⊙ (V x + b_v)) + b_p, no element-wise non-linearity.
``BilinearDigits``: scikit-learn digits (8×8 grey images, 10 classes) through

    pixels x (64,) in [0, 1] -> embedding e = E x (d_model) -> bilinear layer (d_model -> d_model)
    -> head logits = H out + b_H (10,)

trained with AdamW (decoupled weight decay) on cross-entropy, with dense Gaussian noise
(std ``noise``, in pixel units of [0, 1]) added to every training image: the paper's recipe,
which keeps the eigenvectors from latching onto single outlier pixels.

Tensor names (what ``analysis.bilinear.loader`` reads back from the safetensors file):
``embed.weight`` (d_model, 64), ``bilinear.w.weight`` / ``bilinear.v.weight`` (d_hidden,
d_model), ``bilinear.p.weight`` (d_model, d_hidden), ``head.weight`` (10, d_model),
``head.bias`` (10,), plus ``*.bias`` for the embedding and bilinear layer when ``bias=True``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from analysis.errors import ConfigError
from analysis.progress import Progress

N_PIXELS = 64
N_CLASSES = 10
IMAGE_SHAPE = (8, 8)


class BilinearLayer(nn.Module):
    """out = P((W x + b_w) ⊙ (V x + b_v)) + b_p: (batch, d_in) -> (batch, d_out)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, bias: bool = False) -> None:
        super().__init__()
        if min(d_in, d_hidden, d_out) < 1:
            raise ConfigError(f"BilinearLayer dims must be >= 1, got d_in={d_in}, d_hidden={d_hidden}, "
                              f"d_out={d_out}")
        self.w = nn.Linear(d_in, d_hidden, bias=bias)
        self.v = nn.Linear(d_in, d_hidden, bias=bias)
        self.p = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p(self.w(x) * self.v(x))


@dataclass(frozen=True, kw_only=True)
class DigitsConfig:
    """Everything that determines a trained digits model (hashed for its cache key)."""

    d_model: int = 64
    d_hidden: int = 128
    bias: bool = False  # biases on the embedding and the bilinear layer (the head always has one)
    noise: float = 0.4  # std of the Gaussian noise added to training pixels (pixels in [0, 1])
    weight_decay: float = 0.5  # AdamW decoupled weight decay
    lr: float = 3e-3
    steps: int = 3000
    batch_size: int = 256
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.d_model, self.d_hidden, self.steps, self.batch_size) < 1:
            raise ConfigError(f"digits config: d_model, d_hidden, steps, batch_size must be >= 1, got {self}")
        if self.noise < 0 or self.weight_decay < 0 or self.lr <= 0:
            raise ConfigError(f"digits config: need noise >= 0, weight_decay >= 0, lr > 0, got noise={self.noise}, "
                              f"weight_decay={self.weight_decay}, lr={self.lr}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"digits config: test_fraction={self.test_fraction} must lie in (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits (bundled with the package, no download) as float32 pixels in [0, 1]:
    ``(x_train (n, 64), y_train (n,), x_test (m, 64), y_test (m,))``, a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split((x / 16.0).astype(np.float32), y.astype(np.int64),
                                              test_size=test_fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


class BilinearDigits(nn.Module):
    """Embedding -> bilinear layer -> class head, for 8×8 digits. ``fit`` returns ``self``.

    Learned state after ``fit``: the parameters, ``train_loss_`` (final smoothed loss),
    ``test_accuracy_`` (on the held-out split), ``seconds_`` (training wall time).
    """

    def __init__(self, config: DigitsConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitsConfig()
        c = self.config
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(c.seed)
            self.embed = nn.Linear(N_PIXELS, c.d_model, bias=c.bias)
            self.bilinear = BilinearLayer(c.d_model, c.d_hidden, c.d_model, bias=c.bias)
            self.head = nn.Linear(c.d_model, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, 64) pixels in [0, 1] -> logits (batch, 10)."""
        return self.head(self.bilinear(self.embed(x)))

    def fit(self, x: np.ndarray | None = None, y: np.ndarray | None = None, *,
            progress: Progress | None = None, threads: int = 1,
            device: str | torch.device | None = None) -> BilinearDigits:
        """Train on (x, y) (default: the config's training split) on ``device`` (default CPU; the
        model stays there), then score the test split.

        Deterministic for a given config on one machine and device: the noise and batches come
        from ``torch.Generator().manual_seed(seed)`` on the CPU (then moved to ``device``);
        ``threads`` sets torch's intra-op threads during training (1 is fastest for a model this
        small, and robust on busy machines).
        """
        c = self.config
        x_tr, y_tr, x_te, y_te = digits_split(c.test_fraction, c.seed)
        if x is not None or y is not None:
            if x is None or y is None or len(x) != len(y):
                raise ConfigError("fit(x, y): give both pixels (n, 64) and labels (n,) of equal length, or neither")
            x_tr, y_tr = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.to(dev)
        xt, yt = torch.from_numpy(x_tr).to(dev), torch.from_numpy(y_tr).to(dev)
        gen = torch.Generator().manual_seed(c.seed)
        opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, c.steps)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads))
        start, ema = time.perf_counter(), None
        try:
            self.train()
            for step in range(c.steps):
                idx = torch.randint(0, len(xt), (min(c.batch_size, len(xt)),), generator=gen)
                noise = torch.randn(len(idx), N_PIXELS, generator=gen)
                idx, noise = idx.to(dev), noise.to(dev)
                noisy = xt[idx] + c.noise * noise
                loss = nn.functional.cross_entropy(self(noisy), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
                if progress is not None and (step % 100 == 0 or step == c.steps - 1):
                    progress(step + 1, c.steps, f"digits loss {ema:.3f}")
        finally:
            torch.set_num_threads(old_threads)
            self.eval()
        self.train_loss_ = float(ema)
        self.seconds_ = time.perf_counter() - start
        self.test_accuracy_ = self.accuracy(x_te, y_te)
        return self

    @torch.no_grad()
    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Share of images whose argmax logit is the label (computed on the model's device)."""
        dev = next(self.parameters()).device
        pred = self(torch.as_tensor(np.asarray(x, dtype=np.float32)).to(dev)).argmax(1).cpu().numpy()
        return float((pred == np.asarray(y)).mean())
