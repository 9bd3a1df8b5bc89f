"""Recovery of a known dictionary by an SAE: exact scores against the truth of ``sae.synthetic``.

Pure: arrays in, frozen dataclasses out, float64, no I/O. Inputs (glossary names):

    W_dec  [d_sae, d_in]        the SAE's decoder rows (any norm; compared by direction)
    D      [n_features, d_in]   the true dictionary (``sae.synthetic.dictionary``)
    codes  [n, d_sae]           the SAE's latents on n samples (``sae.encode(x)``), >= 0
    coefs  [n, n_features]      the true coefficients a of the same samples (dense or scipy CSR)

Definitions (C = |cos(W_dec_j, D_i)|, a [d_sae, n_features] matrix; signs are ignored as in the
identifiability literature, so a sign-flipped decoder row matches its feature):

- **mean max cosine** (Sharkey et al. 2022): mean over true features i of max_j C[j, i].
- **MCC** (mean correlation coefficient of the matched pairs, Hyvarinen & Morioka 2016; as
  SynthSAEBench scores decoders): a one-to-one matching of latents to features maximising the
  summed C (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``; min(d_sae, N) pairs);
  MCC = mean C over the matched pairs.
- **precision / recall at threshold tau** (default 0.9): a matched pair with C >= tau is a
  recovered feature. recall = recovered / n_features; precision = recovered / latents considered
  (all latents, or the ``alive`` ones when given: latents that never fire cannot be precise or
  imprecise, they are not counted).
- **absorption** (Chanin et al. 2024, "A is for Absorption"), per parent feature p of a
  parent/child hierarchy whose matched latent ("the parent latent", j) is recovered (C >= tau):
  among samples where p and one of its children are active, the fraction where the parent
  latent is off (<= 0) while the other latents still write the parent's direction: their
  reconstruction's component along D_p, sum_{j' != j} f_j'(t) (W_dec_j' . D_p), is at least
  ``absorb_fraction`` (default 0.5) of the parent's coefficient a_p(t). (A rule on latents
  merely aligned with D_p would count chance alignments: with 256 random features in 64
  dimensions several have |cos| > 0.3 with any one.) Beside it, the miss rates of the parent
  latent with and without a child active, so a parent latent that is simply weak is told
  apart (its miss rate without children is high too, and nothing carries its direction).
- **splitting**: feature i is split when two or more latents have C >= ``split_tau`` (default
  0.5) with it. A child latent that absorbed its parent's direction counts as a piece of the
  parent: absorption is the parent split along its children. Reported over all features and
  over the parents.
- **shrinkage** (Wright & Sharkey 2024, "Addressing feature suppression in SAEs"): per recovered
  feature i matched to latent j, sum_t f_j(t) ||W_dec_j|| / sum_t a_i(t) over the samples where
  both a_i(t) > 0 and f_j(t) > 0 (1 = the right magnitude, < 1 shrunk; samples where the latent
  misses its feature are a recall failure, not shrinkage, and are left out); the summary is the
  mean over recovered features. ``norm_ratio``: mean over samples with a != 0 of
  ||f W_dec|| / ||a D|| (every sample, misses included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from analysis.errors import ConfigError, ShapeError

THRESHOLD = 0.9
ABSORB_FRACTION = 0.5
SPLIT_TAU = 0.5


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if sp.issparse(x):
        x = x.toarray()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ShapeError(f"{name} must be 2-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ShapeError(f"{name} holds NaN/inf values; score a finite SAE")
    return a


def abs_cosines(W_dec: Any, D: Any) -> np.ndarray:
    """|cos| of every decoder row with every true feature: [d_sae, n_features] float64 (a zero row scores 0)."""
    w, d = _array(W_dec, "W_dec"), _array(D, "D")
    if w.shape[1] != d.shape[1]:
        raise ShapeError(f"W_dec has width {w.shape[1]} but the dictionary has d_in={d.shape[1]}; score an SAE "
                         "trained on activations of this synthetic setting")
    wn = np.linalg.norm(w, axis=1, keepdims=True)
    dn = np.linalg.norm(d, axis=1, keepdims=True)
    return np.abs((w / np.where(wn > 0, wn, 1)) @ (d / np.where(dn > 0, dn, 1)).T)


@dataclass(frozen=True, eq=False)
class Recovery:
    """Decoder-only recovery scores (module docstring). Arrays read-only, one entry per true feature."""

    mean_max_cosine: float
    mcc: float
    precision: float
    recall: float
    threshold: float
    n_latents: int  # latents considered for precision (alive ones when given)
    max_cosine: np.ndarray  # [n_features] max_j C[j, i]
    matched_latent: np.ndarray  # [n_features] Hungarian partner, -1 when unmatched (d_sae < n_features)
    matched_cosine: np.ndarray  # [n_features] C of that pair, 0 when unmatched
    n_split: np.ndarray  # [n_features] latents with C >= split_tau

    @property
    def recovered(self) -> np.ndarray:
        """[n_features] bool: matched with C >= threshold."""
        return self.matched_cosine >= self.threshold


def recovery(W_dec: Any, D: Any, *, threshold: float = THRESHOLD, alive: Any = None,
             split_tau: float = SPLIT_TAU) -> Recovery:
    """Mean max cosine, MCC, precision and recall of ``W_dec`` against ``D``; ``alive`` [d_sae] bool
    restricts matching and precision to latents that fire. Raises ConfigError for a threshold
    outside (0, 1], ShapeError for widths that differ."""
    if not (0 < threshold <= 1) or not (0 < split_tau <= 1):
        raise ConfigError(f"threshold={threshold}, split_tau={split_tau} must be in (0, 1]; e.g. 0.9 and 0.5")
    C = abs_cosines(W_dec, D)
    d_sae, n = C.shape
    keep = np.ones(d_sae, bool) if alive is None else np.asarray(alive, bool).reshape(-1)
    if keep.shape != (d_sae,):
        raise ShapeError(f"alive has {keep.size} entries but the SAE has d_sae={d_sae}")
    latents = np.flatnonzero(keep)
    matched = np.full(n, -1, dtype=np.int64)
    mcos = np.zeros(n)
    if len(latents):
        rows, cols = linear_sum_assignment(C[latents], maximize=True)
        matched[cols] = latents[rows]
        mcos[cols] = C[latents[rows], cols]
    n_pairs = min(len(latents), n)
    recovered = int((mcos >= threshold).sum())
    Ck = C[latents] if len(latents) else np.zeros((1, n))
    return Recovery(
        mean_max_cosine=float(Ck.max(axis=0).mean()), mcc=float(mcos.sum() / n_pairs) if n_pairs else 0.0,
        precision=recovered / len(latents) if len(latents) else 0.0, recall=recovered / n, threshold=float(threshold),
        n_latents=int(len(latents)), max_cosine=_ro(Ck.max(axis=0)), matched_latent=_ro(matched),
        matched_cosine=_ro(mcos), n_split=_ro((Ck >= split_tau).sum(axis=0).astype(np.int64)))


@dataclass(frozen=True, eq=False)
class Absorption:
    """Per parent feature (read-only arrays, NaN where the parent is not recovered or never has a child)."""

    parents: np.ndarray  # [P] feature indices
    parent_latent: np.ndarray  # [P] matched latent, -1 when not recovered
    absorption: np.ndarray  # [P] fraction of parent+child samples absorbed (module docstring)
    miss_with_child: np.ndarray  # [P] P(parent latent off | parent and a child on)
    miss_without_child: np.ndarray  # [P] P(parent latent off | parent on, no child on)
    absorb_fraction: float

    @property
    def mean(self) -> float:
        """Mean absorption over the parents where it is defined (NaN when none)."""
        v = self.absorption[np.isfinite(self.absorption)]
        return float(v.mean()) if v.size else float("nan")


def absorption(rec: Recovery, W_dec: Any, D: Any, codes: Any, coefs: Any, parents: Any, children: Any, *,
               absorb_fraction: float = ABSORB_FRACTION) -> Absorption:
    """Absorption of each parent in ``parents`` (feature indices) by the latents, with ``children[k]`` the
    child feature indices of ``parents[k]``; ``rec`` from ``recovery`` on the same W_dec and D."""
    f, a = _array(codes, "codes"), coefs
    a = a.tocsc() if sp.issparse(a) else _array(a, "coefs")
    if f.shape[0] != a.shape[0]:
        raise ShapeError(f"codes has {f.shape[0]} samples but coefs has {a.shape[0]}; pass the same samples")
    w, d = _array(W_dec, "W_dec"), _array(D, "D")
    d = d / np.linalg.norm(d, axis=1, keepdims=True)

    def on(i: int) -> np.ndarray:
        col = a[:, [i]].toarray().ravel() if sp.issparse(a) else a[:, i]
        return col > 0

    active = f > 0
    P = len(parents)
    out = {k: np.full(P, np.nan) for k in ("absorption", "miss_with_child", "miss_without_child")}
    plat = np.full(P, -1, dtype=np.int64)
    for k, p in enumerate(np.asarray(parents, dtype=np.int64)):
        if not rec.recovered[p]:
            continue
        j = int(rec.matched_latent[p])
        plat[k] = j
        p_on = on(p)
        child_on = np.zeros_like(p_on)
        for c in children[k]:
            child_on |= on(int(c))
        off = ~active[:, j]
        along = w @ d[p]  # [d_sae] each latent's decoder component along the parent
        along[j] = 0.0
        col = a[:, [p]].toarray().ravel() if sp.issparse(a) else a[:, p]
        carried = f @ along >= absorb_fraction * col
        both, alone = p_on & child_on, p_on & ~child_on
        if both.any():
            out["absorption"][k] = float((off & carried)[both].mean())
            out["miss_with_child"][k] = float(off[both].mean())
        if alone.any():
            out["miss_without_child"][k] = float(off[alone].mean())
    return Absorption(_ro(np.asarray(parents, dtype=np.int64)), _ro(plat), *(_ro(out[k]) for k in
                      ("absorption", "miss_with_child", "miss_without_child")), float(absorb_fraction))


@dataclass(frozen=True, eq=False)
class Shrinkage:
    """Magnitudes of recovered features against their true coefficients."""

    ratio: np.ndarray  # [n_features] sum f_j ||W_j|| / sum a_i where both > 0; NaN when not recovered or never on
    mean: float  # mean of the finite ratios
    norm_ratio: float  # mean over samples with a != 0 of ||f W_dec|| / ||a D||


def shrinkage(rec: Recovery, W_dec: Any, D: Any, codes: Any, coefs: Any) -> Shrinkage:
    """Shrinkage of the recovered features (module docstring)."""
    w, d, f = _array(W_dec, "W_dec"), _array(D, "D"), _array(codes, "codes")
    a = coefs.tocsc() if sp.issparse(coefs) else _array(coefs, "coefs")
    if f.shape[0] != a.shape[0] or f.shape[1] != w.shape[0]:
        raise ShapeError(f"codes {f.shape} must be [n, d_sae={w.shape[0]}] with n = the coefs' {a.shape[0]} samples")
    wnorm = np.linalg.norm(w, axis=1)
    ratio = np.full(d.shape[0], np.nan)
    for i in np.flatnonzero(rec.recovered):
        col = a[:, [i]].toarray().ravel() if sp.issparse(a) else a[:, i]
        j = rec.matched_latent[i]
        on = (col > 0) & (f[:, j] > 0)
        if on.any():
            ratio[i] = float(f[on, j].sum() * wnorm[j] / col[on].sum())
    signal = np.asarray(a @ d) if sp.issparse(a) else a @ d
    sn, rn = np.linalg.norm(signal, axis=1), np.linalg.norm(f @ w, axis=1)
    ok = sn > 0
    finite = ratio[np.isfinite(ratio)]
    return Shrinkage(_ro(ratio), float(finite.mean()) if finite.size else float("nan"),
                     float((rn[ok] / sn[ok]).mean()) if ok.any() else float("nan"))


@dataclass(frozen=True, eq=False)
class GroundTruthScores:
    """Everything ``score`` measures."""

    recovery: Recovery
    absorption: Absorption
    shrinkage: Shrinkage

    def scalars(self) -> dict[str, float]:
        r = self.recovery
        P = self.absorption.parents
        return {"mean_max_cosine": r.mean_max_cosine, "mcc": r.mcc, "precision": r.precision, "recall": r.recall,
                "threshold": r.threshold, "n_latents": float(r.n_latents),
                "absorption": self.absorption.mean,
                "parent_miss_with_child": _nanmean(self.absorption.miss_with_child),
                "parent_miss_without_child": _nanmean(self.absorption.miss_without_child),
                "split_fraction": float((r.n_split >= 2).mean()),
                "parent_split_fraction": float((r.n_split[P] >= 2).mean()) if len(P) else float("nan"),
                "shrinkage": self.shrinkage.mean, "norm_ratio": self.shrinkage.norm_ratio}


def _nanmean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def score(W_dec: Any, D: Any, codes: Any, coefs: Any, parents: Any = (), children: Any = (), *,
          threshold: float = THRESHOLD, absorb_fraction: float = ABSORB_FRACTION, split_tau: float = SPLIT_TAU,
          only_alive: bool = True) -> GroundTruthScores:
    """Recovery, absorption and shrinkage in one call; ``only_alive``: precision over latents that fire on
    ``codes`` (module docstring)."""
    f = _array(codes, "codes")
    alive = (f > 0).any(axis=0) if only_alive else None
    rec = recovery(W_dec, D, threshold=threshold, alive=alive, split_tau=split_tau)
    return GroundTruthScores(rec, absorption(rec, W_dec, D, f, coefs, parents, children,
                                                        absorb_fraction=absorb_fraction),
                             shrinkage(rec, W_dec, D, f, coefs))

