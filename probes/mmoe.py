"""Multilinear Mixture of Experts layers (μMoE; Oldfield et al. 2024), in factorised form.

An MMoE layer mixes N linear experts W_n: (d_in + 1, d_out) with input-dependent coefficients:

    y = sum_n a_n W_n^T x',   x' = [x; 1] (the bias is folded in as an extra input),
    a = gate(Norm(x G)),      G: (d_in, N) initialised to zero, Norm = BatchNorm1d(N, affine=False),
    gate = entmax-1.5 (sparse, ``probes.entmax``) or softmax.

The weight tensor W: (N, d_in + 1, d_out) is never built in the forward pass:

- CP (``CPMMoE``), rank R: W[n, i, o] = sum_r U_N[n, r] U_I[i, r] U_O[o, r], so
  y = U_O ((a U_N) * (x' U_I)) — cost O(R (N + d_in + d_out)) per sample.
- Tensor ring (``TRMMoE``), ranks (r0, r1, r2): cores C_N (r0, N, r1), C_I (r1, d_in + 1, r2),
  C_O (r2, d_out, r0), W[n, i, o] = Tr(C_N[:, n, :] C_I[:, i, :] C_O[:, o, :]), so
  y_o = Tr((sum_n a_n C_N[:, n, :]) (sum_i x'_i C_I[:, i, :]) C_O[:, o, :]).
- Hierarchical (two-level) variants: ``n_experts=(N1, N2)`` gives N1·N2 experts W[n1, n2] with
  coefficients a1[n1]·a2[n2] from two gates; CP adds a factor U_N2 (one more Hadamard
  factor), TR one more core (ranks (r0, r1, r2, r3)).

``y`` is linear in ``a``: zeroing a_k removes exactly expert k's term a_k W_k^T x'.

Parameters (gate G counted, BatchNorm has none): CP R (sum N_l + d_in + 1 + d_out) + d_in sum N_l;
TR sum of the core sizes + d_in sum N_l. ``rank_for_budget`` picks the largest rank within a
budget such as a linear layer's (d_in + 1) d_out. ``DenseMMoE`` keeps the explicit tensor:
a test reference and the "soft MoE" of the benchmark, never used by the probes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from analysis.errors import ConfigError, ShapeError
from probes.entmax import entmax15

GATES = ("entmax15", "softmax")
KINDS = ("cp", "tr")
DEFAULT_TR_RANKS = (4, 4)  # TR ranks fixed for the expert cores; the input/output rank is fitted


def _levels(n_experts: int | Sequence[int]) -> tuple[int, ...]:
    levels = (int(n_experts),) if isinstance(n_experts, (int,)) else tuple(int(n) for n in n_experts)
    if not 1 <= len(levels) <= 2:
        raise ConfigError(f"n_experts={n_experts!r}: give one expert count (N) or two for a hierarchical layer "
                          "(N1, N2)")
    if any(n < 1 for n in levels):
        raise ConfigError(f"n_experts={n_experts!r}: every expert count must be >= 1")
    return levels


def _check_dims(d_in: int, d_out: int) -> None:
    if d_in < 1 or d_out < 1:
        raise ConfigError(f"d_in={d_in}, d_out={d_out}: both dimensions must be >= 1")


# -- parameter counts and budgets ---------------------------------------------------------
def linear_params(d_in: int, d_out: int, *, bias: bool = True) -> int:
    """Parameters of ``nn.Linear(d_in, d_out, bias)``: (d_in + bias) d_out."""
    return (d_in + int(bias)) * d_out


def gate_params(d_in: int, n_experts: int | Sequence[int]) -> int:
    """Parameters of the gates: d_in · sum of the expert counts (BatchNorm is not affine)."""
    return d_in * sum(_levels(n_experts))


def cp_params(d_in: int, d_out: int, n_experts: int | Sequence[int], rank: int, *, bias: bool = True) -> int:
    """Parameters of a CP MMoE layer: R (sum N_l + d_in + bias + d_out) + d_in sum N_l."""
    levels = _levels(n_experts)
    return rank * (sum(levels) + d_in + int(bias) + d_out) + d_in * sum(levels)


def tr_ranks(levels: Sequence[int], rank: int, fixed: Sequence[int] = DEFAULT_TR_RANKS) -> tuple[int, ...]:
    """Full TR rank tuple (r0, ..., r_{L+1}) for L expert levels: the expert-core ranks from
    ``fixed`` (cycled) and ``rank`` between the input and output cores."""
    n = len(levels) + 1
    return tuple(fixed[i % len(fixed)] for i in range(n)) + (rank,)


def tr_params(d_in: int, d_out: int, n_experts: int | Sequence[int], ranks: Sequence[int], *,
              bias: bool = True) -> int:
    """Parameters of a TR MMoE layer with ranks (r0, ..., r_{L+1}): sum of the core sizes
    r_k · dim_k · r_{k+1} (cyclic) + d_in sum N_l."""
    levels = _levels(n_experts)
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) != len(levels) + 2:
        raise ConfigError(f"ranks={ranks}: a TR layer with {len(levels)} expert level(s) needs "
                          f"{len(levels) + 2} ranks (r0, ..., r{len(levels) + 1})")
    dims = (*levels, d_in + int(bias), d_out)
    cores = sum(ranks[k] * dims[k] * ranks[(k + 1) % len(ranks)] for k in range(len(dims)))
    return cores + d_in * sum(levels)


def mmoe_params(kind: str, d_in: int, d_out: int, n_experts: int | Sequence[int], rank: int, *,
                bias: bool = True, fixed_tr_ranks: Sequence[int] = DEFAULT_TR_RANKS) -> int:
    """Parameters of a ``kind`` ('cp' | 'tr') layer; for TR ``rank`` is the input/output rank."""
    if kind == "cp":
        return cp_params(d_in, d_out, n_experts, rank, bias=bias)
    if kind == "tr":
        return tr_params(d_in, d_out, n_experts, tr_ranks(_levels(n_experts), rank, fixed_tr_ranks), bias=bias)
    raise ConfigError(f"unknown MMoE kind {kind!r}; choose one of {', '.join(KINDS)}")


def _rank_terms(kind: str, d_in: int, d_out: int, levels: tuple[int, ...], bias: bool,
                fixed: Sequence[int]) -> tuple[int, int]:
    """(fixed cost, cost per unit of rank): params = fixed + per_rank · rank (both kinds are affine in it)."""
    p0 = mmoe_params(kind, d_in, d_out, levels, 0, bias=bias, fixed_tr_ranks=fixed)
    p1 = mmoe_params(kind, d_in, d_out, levels, 1, bias=bias, fixed_tr_ranks=fixed)
    return p0, p1 - p0


def max_experts(kind: str, d_in: int, d_out: int, budget: int, *, levels: int = 1, bias: bool = True,
                fixed_tr_ranks: Sequence[int] = DEFAULT_TR_RANKS) -> int:
    """Largest N such that ``levels`` expert modes of size N each fit ``budget`` at rank 1 (0 if none)."""
    def fits(n: int) -> bool:
        return mmoe_params(kind, d_in, d_out, (n,) * levels, 1, bias=bias, fixed_tr_ranks=fixed_tr_ranks) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # params grow monotonically with N
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def rank_for_budget(kind: str, d_in: int, d_out: int, n_experts: int | Sequence[int], budget: int, *,
                    bias: bool = True, fixed_tr_ranks: Sequence[int] = DEFAULT_TR_RANKS) -> int:
    """Largest rank whose layer has at most ``budget`` parameters (for TR: the input/output rank,
    the expert-core ranks being ``fixed_tr_ranks``).

    The paper matches a linear layer by rounding up; we round down, so the MMoE never has
    more parameters than the budget. Raises ConfigError when even rank 1 does not fit, naming
    the largest expert count that does.
    """
    levels = _levels(n_experts)
    _check_dims(d_in, d_out)
    if budget < 1:
        raise ConfigError(f"budget={budget}: the parameter budget must be >= 1")
    fixed, per_rank = _rank_terms(kind, d_in, d_out, levels, bias, fixed_tr_ranks)
    rank = (budget - fixed) // per_rank
    if rank < 1:
        top = max_experts(kind, d_in, d_out, budget, levels=len(levels), bias=bias, fixed_tr_ranks=fixed_tr_ranks)
        shape = "N" if len(levels) == 1 else "N per level"
        raise ConfigError(
            f"{'x'.join(map(str, levels))} experts do not fit a budget of {budget:,} parameters for a {kind.upper()} "
            f"MMoE {d_in} -> {d_out} (rank 1 already needs {fixed + per_rank:,}); at most {shape} = {top} experts "
            f"fit: use fewer experts or a larger budget")
    return int(rank)


# -- gating -------------------------------------------------------------------------------
class ExpertGate(nn.Module):
    """a = gate(BatchNorm1d(x G)): (batch, d_in) -> (batch, n_experts), rows on the simplex.

    G starts at zero, so every expert starts with coefficient 1/N.
    """

    def __init__(self, d_in: int, n_experts: int, gate: str = "entmax15") -> None:
        super().__init__()
        if gate not in GATES:
            raise ConfigError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")
        self.gate = gate
        self.weight = nn.Parameter(torch.zeros(d_in, n_experts))
        self.norm = nn.BatchNorm1d(n_experts, affine=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised gate scores Norm(x G): (batch, n_experts)."""
        return self.norm(x @ self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scores(x)
        return entmax15(s, dim=-1) if self.gate == "entmax15" else torch.softmax(s, dim=-1)


class MMoE(nn.Module):
    """Shared part of the factorised layers: gates, bias folding, input shapes, counting.

    ``forward(x, a=None)``: x (..., d_in) -> (..., d_out). ``a``: the gate coefficients, one
    (batch, N_l) tensor per level (a bare tensor for one level); computed from x when None.
    """

    kind = "abstract"

    def __init__(self, d_in: int, d_out: int, n_experts: int | Sequence[int], *, bias: bool = True,
                 gate: str = "entmax15") -> None:
        super().__init__()
        _check_dims(d_in, d_out)
        self.d_in, self.d_out, self.bias = int(d_in), int(d_out), bool(bias)
        self.levels = _levels(n_experts)
        self.gates = nn.ModuleList(ExpertGate(d_in, n, gate) for n in self.levels)

    @property
    def n_experts(self) -> int:
        """Total number of experts (product of the levels)."""
        return math.prod(self.levels)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def gate_coefficients(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per level, (batch, N_l) coefficients for x (..., d_in) flattened to (batch, d_in)."""
        flat = self._flat(x)
        return [g(flat) for g in self.gates]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise ShapeError(f"expected input (..., d_in={self.d_in}), got {tuple(x.shape)}; "
                             "pass features with the layer's input width")
        return x.reshape(-1, self.d_in)

    def _augment(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.bias:
            return flat
        return torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)

    def _coefficients(self, a: torch.Tensor | Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
        a_list = [a] if isinstance(a, torch.Tensor) else list(a)
        if len(a_list) != len(self.levels):
            raise ShapeError(f"expected {len(self.levels)} gate tensor(s), one per expert level, got {len(a_list)}")
        for a_l, n in zip(a_list, self.levels):
            if tuple(a_l.shape) != (batch, n):
                raise ShapeError(f"gate coefficients must be (batch={batch}, n_experts={n}), got {tuple(a_l.shape)}")
        return a_list

    def forward(self, x: torch.Tensor, a: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        flat = self._flat(x)
        coeffs = [g(flat) for g in self.gates] if a is None else self._coefficients(a, flat.shape[0])
        y = self._mix(self._augment(flat), coeffs)
        return y.reshape(*x.shape[:-1], self.d_out)

    def _mix(self, z: torch.Tensor, a: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert_weights(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The explicit tensor W (*levels, d_in + bias, d_out). Materialises it: tests and small layers only."""
        raise NotImplementedError


class CPMMoE(MMoE):
    """CP-factorised MMoE: W[n.., i, o] = sum_r prod_l U_l[n_l, r] · U_I[i, r] · U_O[o, r]."""

    kind = "cp"

    def __init__(self, d_in: int, d_out: int, n_experts: int | Sequence[int], rank: int, *, bias: bool = True,
                 gate: str = "entmax15") -> None:
        super().__init__(d_in, d_out, n_experts, bias=bias, gate=gate)
        if int(rank) < 1:
            raise ConfigError(f"rank={rank}: the CP rank must be >= 1 (use rank_for_budget to pick one)")
        self.rank = int(rank)
        d_aug = self.d_in + int(self.bias)
        # Level-1 expert factor ~ N(1, 1): experts start as perturbations of one shared linear map;
        # further levels start at 1 so they begin as a no-op.
        factors = [torch.randn(n, self.rank) + 1.0 if lvl == 0 else torch.ones(n, self.rank)
                   for lvl, n in enumerate(self.levels)]
        self.expert_factors = nn.ParameterList(nn.Parameter(f) for f in factors)
        self.in_factor = nn.Parameter(torch.empty(d_aug, self.rank).uniform_(-1, 1) / math.sqrt(self.d_in))
        self.out_factor = nn.Parameter(torch.empty(self.d_out, self.rank).uniform_(-1, 1) / math.sqrt(self.rank))

    def _mix(self, z: torch.Tensor, a: list[torch.Tensor]) -> torch.Tensor:
        h = z @ self.in_factor  # (batch, rank)
        for a_l, u_l in zip(a, self.expert_factors):
            h = h * (a_l @ u_l)
        return h @ self.out_factor.T  # (batch, d_out)

    def expert_weights(self) -> torch.Tensor:
        w = torch.einsum("ir,or->ior", self.in_factor, self.out_factor)
        if len(self.levels) == 1:
            return torch.einsum("nr,ior->nio", self.expert_factors[0], w)
        return torch.einsum("nr,mr,ior->nmio", self.expert_factors[0], self.expert_factors[1], w)


class TRMMoE(MMoE):
    """Tensor-ring MMoE: W[n.., i, o] = Tr(C_1[:, n1, :] (C_2[:, n2, :]) C_I[:, i, :] C_O[:, o, :]).

    ``ranks``: (r0, ..., r_{L+1}) for L expert levels; core k is (r_k, dim_k, r_{k+1}), cyclic.
    """

    kind = "tr"

    def __init__(self, d_in: int, d_out: int, n_experts: int | Sequence[int], ranks: Sequence[int], *,
                 bias: bool = True, gate: str = "entmax15") -> None:
        super().__init__(d_in, d_out, n_experts, bias=bias, gate=gate)
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != len(self.levels) + 2:
            raise ConfigError(f"ranks={ranks}: a TR layer with {len(self.levels)} expert level(s) needs "
                              f"{len(self.levels) + 2} ranks (r0, ..., r{len(self.levels) + 1})")
        if min(ranks) < 1:
            raise ConfigError(f"ranks={ranks}: every TR rank must be >= 1 (use rank_for_budget to pick one)")
        self.ranks = ranks
        L = len(self.levels)
        cores = []
        for lvl, n in enumerate(self.levels):
            r_a, r_b = ranks[lvl], ranks[lvl + 1]
            eye = torch.eye(r_a, r_b)
            # each expert slice starts as a (noisy, for level 1) identity: a product of identities
            noise = torch.randn(n, r_a, r_b) if lvl == 0 else torch.zeros(n, r_a, r_b)
            cores.append((eye * (1.0 + noise)).permute(1, 0, 2).contiguous())
        self.expert_cores = nn.ParameterList(nn.Parameter(c) for c in cores)
        d_aug = self.d_in + int(self.bias)
        self.in_core = nn.Parameter(torch.empty(ranks[L], d_aug, ranks[L + 1]).uniform_(-1, 1) / math.sqrt(self.d_in))
        self.out_core = nn.Parameter(torch.empty(ranks[L + 1], self.d_out, ranks[0]).uniform_(-1, 1)
                                     / math.sqrt(ranks[L + 1] * ranks[0]))

    def _mix(self, z: torch.Tensor, a: list[torch.Tensor]) -> torch.Tensor:
        m = None
        for a_l, core in zip(a, self.expert_cores):
            m_l = torch.einsum("bn,pnq->bpq", a_l, core)  # (batch, r_l, r_{l+1})
            m = m_l if m is None else torch.bmm(m, m_l)
        m = torch.bmm(m, torch.einsum("bi,piq->bpq", z, self.in_core))  # (batch, r0, r_{L+1})
        return torch.einsum("bpq,qop->bo", m, self.out_core)

    def expert_weights(self) -> torch.Tensor:
        if len(self.levels) == 1:
            return torch.einsum("pnq,qir,rop->nio", self.expert_cores[0], self.in_core, self.out_core)
        return torch.einsum("pnq,qms,sir,rop->nmio", self.expert_cores[0], self.expert_cores[1], self.in_core,
                            self.out_core)


def build_mmoe(kind: str, d_in: int, d_out: int, n_experts: int | Sequence[int], rank: int, *, bias: bool = True,
               gate: str = "entmax15", fixed_tr_ranks: Sequence[int] = DEFAULT_TR_RANKS) -> MMoE:
    """A ``kind`` layer; for TR, ``rank`` is the input/output rank (expert cores use ``fixed_tr_ranks``)."""
    if kind == "cp":
        return CPMMoE(d_in, d_out, n_experts, rank, bias=bias, gate=gate)
    if kind == "tr":
        if int(rank) < 1:
            raise ConfigError(f"rank={rank}: the TR rank must be >= 1 (use rank_for_budget to pick one)")
        return TRMMoE(d_in, d_out, n_experts, tr_ranks(_levels(n_experts), int(rank), fixed_tr_ranks),
                      bias=bias, gate=gate)
    raise ConfigError(f"unknown MMoE kind {kind!r}; choose one of {', '.join(KINDS)}")


def mmoe_for_budget(kind: str, d_in: int, d_out: int, n_experts: int | Sequence[int], budget: int | None = None, *,
                    bias: bool = True, gate: str = "entmax15") -> MMoE:
    """A layer with the largest rank within ``budget`` (default: ``linear_params(d_in, d_out)``)."""
    budget = linear_params(d_in, d_out, bias=bias) if budget is None else int(budget)
    rank = rank_for_budget(kind, d_in, d_out, n_experts, budget, bias=bias)
    return build_mmoe(kind, d_in, d_out, n_experts, rank, bias=bias, gate=gate)


class DenseMMoE(nn.Module):
    """Soft MoE with the explicit weight tensor W (*levels, d_in + bias, d_out) and the same gates.

    Reference for tests (``from_factorised``) and the dense baseline of the benchmark; its
    forward costs O(N · d_in · d_out) per sample.
    """

    def __init__(self, d_in: int, d_out: int, n_experts: int | Sequence[int], *, bias: bool = True,
                 gate: str = "entmax15") -> None:
        super().__init__()
        _check_dims(d_in, d_out)
        self.d_in, self.d_out, self.bias = int(d_in), int(d_out), bool(bias)
        self.levels = _levels(n_experts)
        self.gates = nn.ModuleList(ExpertGate(d_in, n, gate) for n in self.levels)
        d_aug = self.d_in + int(self.bias)
        self.weight = nn.Parameter(torch.empty(*self.levels, d_aug, self.d_out).uniform_(-1, 1) / math.sqrt(d_in))

    @classmethod
    def from_factorised(cls, layer: MMoE) -> DenseMMoE:
        """The dense layer computing exactly what ``layer`` computes (gates copied, W materialised)."""
        ref = next(layer.parameters())
        dense = cls(layer.d_in, layer.d_out, layer.levels, bias=layer.bias, gate=layer.gates[0].gate)
        dense = dense.to(dtype=ref.dtype, device=ref.device)
        dense.gates.load_state_dict(layer.gates.state_dict())
        with torch.no_grad():
            w = layer.expert_weights()
            dense.weight = nn.Parameter(w.detach().clone())
        dense.train(layer.training)
        return dense

    def forward(self, x: torch.Tensor, a: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.d_in)
        coeffs = [g(flat) for g in self.gates] if a is None else ([a] if isinstance(a, torch.Tensor) else list(a))
        full = coeffs[0]
        for a_l in coeffs[1:]:  # experts (n1, n2) get a1[n1] a2[n2], flattened row-major like W
            full = (full[:, :, None] * a_l[:, None, :]).reshape(full.shape[0], -1)
        z = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1) if self.bias else flat
        w = self.weight.reshape(-1, z.shape[1], self.d_out)  # (N, d_aug, d_out)
        mixed = (full[:, :, None] * z[:, None, :]).reshape(flat.shape[0], -1)  # (batch, N · d_aug)
        y = mixed @ w.reshape(-1, self.d_out)
        return y.reshape(*x.shape[:-1], self.d_out)
