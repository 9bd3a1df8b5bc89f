"""Bilinear MLPs as quadratic forms: interaction matrices and their eigendecomposition.

A bilinear layer (Pearce et al. 2025) computes, for an input x (d_in,),

    out = P ((W x + b_w) ⊙ (V x + b_v)) + b_p          W, V: (d_hidden, d_in), P: (d_out, d_hidden)

It is a third-order tensor B (d_out, d_in, d_in) with B_aij = Σ_h P_ah W_hi V_hj: out_a = xᵀ B_a x.
Biases are folded by appending a constant input: x̃ = [x; 1], W̃ = [W | b_w], Ṽ = [V | b_v] and
b_p added to the constant-constant entry, so every layer is a pure quadratic form in x̃
(n = d_in + 1 inputs when the layer has any bias, n = d_in otherwise).

For an output direction u (d_out,) the interaction matrix is

    Q(u) = sym(W̃ᵀ diag(Pᵀu) Ṽ) + (u·b_p) e_n e_nᵀ,     sym(M) = (M + Mᵀ) / 2,

built per direction (batched, chunked) without ever forming the (d_out, n, n) tensor. Then,
exactly (up to float64 rounding), with Q = Σ_i λ_i v_i v_iᵀ its eigendecomposition,

    uᵀ out(x) = x̃ᵀ Q x̃ = Σ_i λ_i (v_i · x̃)².

Eigenvalues are sorted by |λ| (largest first); each eigenvector's sign is fixed so its
largest-magnitude entry is positive (the form is sign-invariant). Everything is float64; the
interaction matrices and their eigendecomposition run on the ``device`` given (default CPU) and
come back as CPU numpy arrays.

A GLU whose gate has a non-linearity (SwiGLU: silu(W x) ⊙ V x) is not a quadratic form: only
its bilinear part (the layer with the activation removed) is decomposed; ``decompose`` warns
with ``BilinearPartWarning`` and sets ``Decomposition.exact = False``.

The rest of the maths lives next door: ``analysis.bilinear.hosvd`` (the tensor's top output
directions) and ``analysis.bilinear.evaluate`` (contributions on inputs, truncation curves,
eigenvectors read back in the raw input space).

Pure: tensors and arrays in, frozen dataclasses out; no I/O.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis.errors import ConfigError, ShapeError

CODE_VERSION = "bilinear-1"
BILINEAR_ACTS = ("linear", "identity", "none", "bilinear")  # gate activations that keep the layer bilinear
_CHUNK_ELEMENTS = 1 << 24  # bound on the (chunk, n, d_hidden) intermediate: 128 MiB of float64


class BilinearPartWarning(UserWarning):
    """The gate of this GLU is non-linear: only the layer's bilinear part is decomposed."""


def _f64(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.detach().to(device="cpu", dtype=torch.float64).contiguous()


def _device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (None: CPU). Resolving ``auto`` is the caller's job (analysis.device)."""
    return torch.device("cpu") if device is None else torch.device(device)


@dataclass(frozen=True, eq=False)
class BilinearWeights:
    """One bilinear layer (or the bilinear part of a GLU), held in float64.

    ``w`` (d_hidden, d_in) is the gate factor (``gate_proj``), ``v`` (d_hidden, d_in) the
    linear factor (``up_proj``), ``p`` (d_out, d_hidden) the output projection (``down_proj``).
    ``gate_act`` names the gate's activation: one of ``BILINEAR_ACTS`` for an exact bilinear
    layer, anything else (``silu``, ``gelu``...) for a GLU of which only the bilinear part is
    decomposed.
    """

    w: torch.Tensor
    v: torch.Tensor
    p: torch.Tensor
    w_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    p_bias: torch.Tensor | None = None
    gate_act: str = "linear"
    name: str = "bilinear"

    def __post_init__(self) -> None:
        for attr in ("w", "v", "p", "w_bias", "v_bias", "p_bias"):
            value = getattr(self, attr)
            if value is not None:
                object.__setattr__(self, attr, _f64(value))
        w, v, p = self.w, self.v, self.p
        if w.ndim != 2 or v.ndim != 2 or p.ndim != 2:
            raise ShapeError(f"{self.name}: W, V, P must be 2-D matrices, got {tuple(w.shape)}, {tuple(v.shape)}, "
                             f"{tuple(p.shape)}; pass nn.Linear weights (d_out, d_in)")
        if w.shape != v.shape or p.shape[1] != w.shape[0] or 0 in w.shape or 0 in p.shape:
            raise ShapeError(f"{self.name}: need W and V of equal shape (d_hidden, d_in) and P (d_out, d_hidden), "
                             f"got W {tuple(w.shape)}, V {tuple(v.shape)}, P {tuple(p.shape)}; check which "
                             "tensors are the gate, up and down projections")
        for attr, n in (("w_bias", w.shape[0]), ("v_bias", w.shape[0]), ("p_bias", p.shape[0])):
            b = getattr(self, attr)
            if b is not None and tuple(b.shape) != (n,):
                raise ShapeError(f"{self.name}: {attr} has shape {tuple(b.shape)}, expected ({n},)")
        for attr in ("w", "v", "p", "w_bias", "v_bias", "p_bias"):
            t = getattr(self, attr)
            if t is not None and not torch.isfinite(t).all():
                raise ConfigError(f"{self.name}: {attr} holds NaN or Inf values; the decomposition needs finite "
                                  "weights: check the checkpoint")

    @property
    def d_in(self) -> int:
        return self.w.shape[1]

    @property
    def d_hidden(self) -> int:
        return self.w.shape[0]

    @property
    def d_out(self) -> int:
        return self.p.shape[0]

    @property
    def biased(self) -> bool:
        """Whether any bias is present (then inputs get a constant 1 appended)."""
        return any(b is not None for b in (self.w_bias, self.v_bias, self.p_bias))

    @property
    def n(self) -> int:
        """Size of the quadratic form: d_in, plus 1 for the constant input when biased."""
        return self.d_in + int(self.biased)

    @property
    def exact(self) -> bool:
        """True when the layer is bilinear (no non-linearity on the gate)."""
        return self.gate_act.lower() in BILINEAR_ACTS

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W̃, Ṽ (d_hidden, n): the factors with their biases as an extra input column."""
        if not self.biased:
            return self.w, self.v
        zero = torch.zeros(self.d_hidden, 1, dtype=torch.float64)
        wb = zero if self.w_bias is None else self.w_bias[:, None]
        vb = zero if self.v_bias is None else self.v_bias[:, None]
        return torch.cat([self.w, wb], 1), torch.cat([self.v, vb], 1)

    def augment(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """x (batch, d_in) -> x̃ (batch, n) in float64 (a column of ones appended when biased)."""
        x = _f64(x)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ShapeError(f"{self.name}: inputs must be (batch, d_in={self.d_in}), got {tuple(x.shape)}; "
                             "pass the layer's inputs (for an LM: the normalised residual the MLP reads)")
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1) if self.biased else x

    def forward(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """out (batch, d_out) = P((W x + b_w) ⊙ (V x + b_v)) + b_p: the bilinear part, float64."""
        w, v = self.folded()
        xt = self.augment(x)
        out = ((xt @ w.T) * (xt @ v.T)) @ self.p.T
        return out if self.p_bias is None else out + self.p_bias


def as_directions(directions: torch.Tensor | np.ndarray | Sequence, d_out: int, *,
                  labels: Sequence[str] | None = None, name: str = "layer") -> torch.Tensor:
    """Validate output directions: (d_out,) or (k, d_out) -> (k, d_out) float64.

    Raises ShapeError for a wrong width or rank, ConfigError for a zero or non-finite row.
    """
    if isinstance(directions, torch.Tensor):
        u = _f64(directions)
    else:
        u = torch.from_numpy(np.array(directions, dtype=np.float64))
    if u.ndim == 1:
        u = u[None]
    if u.ndim != 2 or u.shape[0] == 0 or u.shape[1] != d_out:
        raise ShapeError(f"direction of shape {tuple(np.shape(directions))} does not fit {name}, which writes "
                         f"d_out={d_out} outputs; give a ({d_out},) vector or a (k, {d_out}) stack")
    bad = ~torch.isfinite(u).all(1)
    zero = u.abs().sum(1) == 0
    for mask, what in ((bad, "holds NaN or Inf"), (zero, "is the zero vector (its interaction matrix is 0)")):
        if mask.any():
            i = int(mask.nonzero()[0])
            lab = f" ({labels[i]})" if labels is not None and i < len(labels) else ""
            raise ConfigError(f"direction {i}{lab} {what}; pick a non-zero, finite direction in the layer's "
                              "output space")
    return u


def interaction_matrices(layer: BilinearWeights, directions: torch.Tensor | np.ndarray, *,
                         chunk_size: int | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """Q(u_k) for every direction: (k, n, n), symmetric, float64, on ``device`` (default CPU).

    Q(u) = sym(W̃ᵀ diag(Pᵀu) Ṽ) + (u·b_p) e_n e_nᵀ, computed ``chunk_size`` directions at a
    time (default: as many as keep the (chunk, n, d_hidden) intermediate under 128 MiB).
    Never forms the (d_out, n, n) tensor.
    """
    dev = _device(device)
    u = as_directions(directions, layer.d_out, name=layer.name).to(dev)
    w, v = (t.to(dev) for t in layer.folded())
    coef = u @ layer.p.to(dev)  # (k, d_hidden): Pᵀu for each direction
    n = layer.n
    step = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, n * layer.d_hidden))
    out = torch.empty(len(u), n, n, dtype=torch.float64, device=dev)
    wt = w.T  # (n, d_hidden)
    for start in range(0, len(u), step):
        c = coef[start:start + step]  # (c, d_hidden)
        q = torch.matmul(wt[None] * c[:, None, :], v)  # (c, n, n)
        out[start:start + step] = (q + q.transpose(1, 2)) / 2
    if layer.p_bias is not None:
        out[:, -1, -1] += u @ layer.p_bias.to(dev)
    return out


def interaction_tensor(layer: BilinearWeights) -> torch.Tensor:
    """The full tensor B (d_out, n, n), B_aij = Σ_h P_ah W̃_hi Ṽ_hj (+ b_p on the constant entry).

    Not symmetrised. The naive reference: O(d_out n²) memory; use ``interaction_matrices``.
    """
    w, v = layer.folded()
    b = torch.einsum("ah,hi,hj->aij", layer.p, w, v)
    if layer.p_bias is not None:
        b[:, -1, -1] += layer.p_bias
    return b


def naive_interaction_matrices(layer: BilinearWeights, directions: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Q(u_k) by contracting the materialised tensor: sym(Σ_a u_a B_a). Test/benchmark reference."""
    u = as_directions(directions, layer.d_out, name=layer.name)
    q = torch.tensordot(u, interaction_tensor(layer), dims=1)
    return (q + q.transpose(1, 2)) / 2


def eigendecompose(q: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (k, n) sorted by |λ| descending and eigenvectors (k, n, n) as rows
    (``vecs[k, i]`` is v_i, unit norm, largest-magnitude entry positive) of symmetric q (k, n, n).

    Runs in float64 on q's device (a numpy array: CPU); the results stay there."""
    q = torch.as_tensor(q).detach().to(dtype=torch.float64).contiguous()
    with one_lapack_thread(q.device.type == "cpu" and q.shape[-1] <= 1024):
        lam, vec = torch.linalg.eigh(q)
    order = torch.argsort(-lam.abs(), dim=1, stable=True)
    lam = torch.gather(lam, 1, order)
    vec = torch.gather(vec.transpose(1, 2), 1, order[..., None].expand(-1, -1, vec.shape[1]))
    peak = torch.gather(vec, 2, vec.abs().argmax(2, keepdim=True))
    return lam, vec * torch.where(peak < 0, -1.0, 1.0)


@contextmanager
def one_lapack_thread(active: bool) -> Iterator[None]:
    """Run LAPACK on one thread: a batch of small eigenproblems gains nothing from more, and on a
    shared machine OpenMP spin-waiting made a (10, 65, 65) eigh ~400x slower with 2 threads."""
    old = torch.get_num_threads()
    if active and old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def effective_rank(eigenvalues: np.ndarray | torch.Tensor) -> np.ndarray:
    """(‖λ‖₁ / ‖λ‖₂)² over the last axis: 1 for one eigenvalue, n for n equal magnitudes; 0 for all-zero."""
    lam = np.abs(np.asarray(eigenvalues, dtype=np.float64))
    l1, l2sq = lam.sum(-1), (lam**2).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(l2sq > 0, l1**2 / np.where(l2sq > 0, l2sq, 1.0), 0.0)


def readonly(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, read-only view (or copy) of ``a``: how results hold their arrays."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Decomposition:
    """Eigendecomposition of the interaction matrices of one layer along k directions.

    Shapes: n = d_in + int(biased). ``eigenvectors[k, i]`` is v_i of direction k in the
    folded input space (entries 0..d_in-1 act on x, entry d_in on the constant 1 when biased);
    uᵀ out(x) = Σ_i eigenvalues[k, i] (eigenvectors[k, i] · x̃)², exactly when ``exact``.
    """

    name: str  # layer name, e.g. "model.layers.0.mlp"
    labels: tuple[str, ...]  # (k,) what each direction is ("class 3", "token ' def'")
    directions: np.ndarray  # (k, d_out) the u vectors, as given
    eigenvalues: np.ndarray  # (k, n) sorted by |λ| descending
    eigenvectors: np.ndarray  # (k, n, n) rows are unit eigenvectors
    biased: bool  # inputs carry an appended constant 1
    gate_act: str  # the gate's activation ("linear" for a bilinear layer)
    exact: bool  # False: a non-linear gate, only the bilinear part is decomposed
    notes: tuple[str, ...] = field(default=())

    @property
    def d_in(self) -> int:
        return self.eigenvalues.shape[1] - int(self.biased)

    @property
    def effective_rank(self) -> np.ndarray:
        """(k,) (‖λ‖₁/‖λ‖₂)² per direction."""
        return effective_rank(self.eigenvalues)


def decompose(layer: BilinearWeights, directions: torch.Tensor | np.ndarray, labels: Sequence[str] | None = None,
              *, chunk_size: int | None = None, device: str | torch.device | None = None) -> Decomposition:
    """Eigendecompose Q(u) for each direction (k, d_out) of ``layer``, on ``device`` (default CPU;
    the arrays of the result are CPU numpy either way).

    Warns ``BilinearPartWarning`` (and returns ``exact=False``) for a non-linear gate.
    """
    u = as_directions(directions, layer.d_out, labels=labels, name=layer.name)
    labels = tuple(labels) if labels is not None else tuple(f"direction {i}" for i in range(len(u)))
    if len(labels) != len(u):
        raise ConfigError(f"{len(labels)} labels for {len(u)} directions; give one label per direction")
    notes: tuple[str, ...] = ()
    if not layer.exact:
        note = (f"{layer.name}: the gate applies {layer.gate_act!r}, so this GLU is not bilinear; only its "
                "bilinear part P((W x) ⊙ (V x)) (activation removed) is decomposed, not the layer's output")
        warnings.warn(note, BilinearPartWarning, stacklevel=2)
        notes = (note,)
    lam, vec = eigendecompose(interaction_matrices(layer, u, chunk_size=chunk_size, device=device))
    return Decomposition(layer.name, labels, readonly(u.numpy()), readonly(lam.cpu().numpy()),
                         readonly(vec.cpu().numpy()), layer.biased, layer.gate_act, layer.exact, notes)
