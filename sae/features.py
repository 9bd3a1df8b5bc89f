"""Feature dashboard data of an SAE, computed once over a harvested activation cache.

``feature_data(sae, acts, token_ids, doc, pos, ...)`` encodes every cached row (acts [tokens, d_in]
with, per row, its token id and (document, position)) and keeps, for each feature i:

- density (fraction of rows where f_i > 0), max and mean (over firing rows) activation;
- ``n_top`` top-activating rows (largest f_i first; ties: lower row first) with a context window of
  ``before`` tokens before and ``after`` after the activating token (same document only) and f_i at
  every token of the window (exact: looked up among all nonzero activations);
- quantile-interval samples: the firing rows sorted by f_i are cut into ``n_intervals`` intervals
  of equal count (interval j holds ranks floor(j c/n) .. floor((j+1) c/n) - 1 of the c firing rows),
  and ``n_per_interval`` rows are drawn uniformly without replacement from each
  (``numpy.random.default_rng(seed)``, features in order), with the same context windows;
  ``quantile_edges`` [d_sae, n_intervals+1] holds each interval's lowest activation and the max;
- a histogram of the nonzero activations: ``n_bins`` equal bins on [0, max_i];
- logit effects (when W_O and W_U are given): the feature's decoder row split by head, each slice
  through its head's W_O, summed into a residual direction, through W_U:
  effect_i = sum_h W_dec[i, h slice] @ W_O[h] @ W_U  [vocab]; the ``n_logits`` most boosted and
  most suppressed tokens are kept (see ``sae.readout`` for which W_U);
- the weight-based head attribution (``sae.attribution.head_attribution``).

Padding is -1 in token arrays and 0 in activation arrays. Every nonzero activation is held in
memory (12 bytes each); ``max_nonzeros`` bounds that and ConfigError says to harvest fewer tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.detokenise import token_texts
from analysis.errors import ConfigError, ShapeError
from analysis.progress import Progress
from analysis.store import Result
from sae.attribution import _feature_index, head_attribution
from sae.model import sae_on

CODE_VERSION = "sae-features-1"
DEFAULTS = {"n_top": 10, "n_intervals": 5, "n_per_interval": 5, "before": 12, "after": 4, "n_bins": 40,
            "n_logits": 10, "seed": 0}
_ARRAYS = ("density", "max_act", "mean_act", "hist_counts", "hist_edges", "top_rows", "top_acts", "top_tokens",
           "top_token_acts", "quantile_edges", "quantile_rows", "quantile_acts", "quantile_tokens",
           "quantile_token_acts", "logit_pos_ids", "logit_pos_values", "logit_neg_ids", "logit_neg_values",
           "head_attribution")


@dataclass(frozen=True, eq=False)
class Context:
    """One context window of a feature: token texts, the feature's activation at each [window],
    the index of the token it was picked for, that activation, and its row in the cache."""

    tokens: list[str]
    acts: np.ndarray
    centre: int
    activation: float
    row: int
    wordpiece: bool = False  # tokens are WordPiece pieces (``##ing``)

    @property
    def texts(self) -> list[str]:
        """One display text per token, joined as the tokenizer decodes them (``analysis.detokenise``)."""
        return token_texts(self.tokens, wordpiece=self.wordpiece)


@dataclass(frozen=True, eq=False)
class FeatureData:
    """Dashboard data of every feature of one SAE (arrays read-only; shapes with d_sae first).

    density, max_act, mean_act: [d_sae]; hist_counts [d_sae, n_bins], hist_edges [d_sae, n_bins+1];
    top_rows / top_acts [d_sae, n_top]; top_tokens / top_token_acts [d_sae, n_top, before+1+after];
    quantile_edges [d_sae, n_intervals+1]; quantile_rows / quantile_acts [d_sae, n_intervals, n_per];
    quantile_tokens / quantile_token_acts [d_sae, n_intervals, n_per, window];
    logit_{pos,neg}_{ids,values} [d_sae, n_logits] or None; head_attribution [d_sae, n_heads] or None.
    token_strings: token id -> text for every id in the arrays. table: one row per feature.
    """

    table: pd.DataFrame
    density: np.ndarray
    max_act: np.ndarray
    mean_act: np.ndarray
    hist_counts: np.ndarray
    hist_edges: np.ndarray
    top_rows: np.ndarray
    top_acts: np.ndarray
    top_tokens: np.ndarray
    top_token_acts: np.ndarray
    quantile_edges: np.ndarray
    quantile_rows: np.ndarray
    quantile_acts: np.ndarray
    quantile_tokens: np.ndarray
    quantile_token_acts: np.ndarray
    logit_pos_ids: np.ndarray | None = None
    logit_pos_values: np.ndarray | None = None
    logit_neg_ids: np.ndarray | None = None
    logit_neg_values: np.ndarray | None = None
    head_attribution: np.ndarray | None = None
    token_strings: dict[int, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return len(self.density)

    @property
    def centre(self) -> int:
        """Index of the activating token inside a context window (= ``before``)."""
        return int(self.meta["settings"]["before"])

    def check_feature(self, i: int) -> int:
        """``i`` as an int, or ConfigError when it is not a feature index of this SAE."""
        return int(_feature_index([i], self.d_sae)[0])

    def token(self, t: int) -> str:
        return self.token_strings.get(int(t), f"#{int(t)}")

    def contexts(self, i: int, interval: int | None = None) -> list[Context]:
        """Contexts of feature ``i``: its top activations (``interval=None``, largest first) or the
        samples of one quantile interval (0 = lowest activations); padding positions dropped."""
        i = self.check_feature(i)
        if interval is None:
            rows, toks = self.top_rows[i], self.top_tokens[i]
            acts, centre_acts = self.top_token_acts[i], self.top_acts[i]
        else:
            if not 0 <= interval < self.quantile_rows.shape[1]:
                raise ConfigError(f"quantile interval {interval} is out of range: this SAE's feature data has "
                                  f"{self.quantile_rows.shape[1]} intervals (0..{self.quantile_rows.shape[1] - 1})")
            rows, toks = self.quantile_rows[i, interval], self.quantile_tokens[i, interval]
            acts, centre_acts = self.quantile_token_acts[i, interval], self.quantile_acts[i, interval]
        out = []
        for r, tk, ac, c in zip(rows, toks, acts, centre_acts):
            if r < 0:
                continue
            keep = tk >= 0
            out.append(Context([self.token(t) for t in tk[keep]], np.asarray(ac[keep]),
                               int(keep[: self.centre].sum()), float(c), int(r), bool(self.meta.get("wordpiece"))))
        return out

    def logit_table(self, i: int) -> pd.DataFrame | None:
        """Top boosted and suppressed tokens of feature ``i`` (rank, token, effect), or None (no LM)."""
        i = self.check_feature(i)
        if self.logit_pos_ids is None:
            return None
        rows = [{"rank": r, "boosted": self.token(t), "boost": float(v), "suppressed": self.token(u),
                 "suppression": float(w)}
                for r, (t, v, u, w) in enumerate(zip(self.logit_pos_ids[i], self.logit_pos_values[i],
                                                     self.logit_neg_ids[i], self.logit_neg_values[i]))]
        return pd.DataFrame(rows)


def _check_inputs(sae: Any, acts: Any, token_ids: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> int:
    n = acts.shape[0]
    if acts.ndim != 2 or acts.shape[1] != sae.cfg.d_in:
        raise ShapeError(f"activations of shape {tuple(acts.shape)} do not fit this SAE (d_in={sae.cfg.d_in}); "
                         f"pass the flattened hook_z cache of {sae.cfg.hook_name}")
    for name, a in (("token_ids", token_ids), ("doc", doc), ("pos", pos)):
        if np.shape(a) != (n,):
            raise ShapeError(f"{name} has shape {np.shape(a)} but the activation cache has {n} rows; "
                             "pass one entry per cached row")
    if n == 0:
        raise ShapeError("the activation cache is empty; harvest some text first")
    return n


def _nonzeros(sae: Any, acts: Any, batch_size: int, max_nonzeros: int, progress: Progress | None,
              device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows int64, features int64, values float32) of every f_i > 0, in row order; the SAE encodes
    on ``device`` (None: where it is)."""
    n = acts.shape[0]
    enc = sae_on(sae, device)
    dev = enc.W_enc.device
    rows, feats, vals, total = [], [], [], 0
    with torch.no_grad():
        for a in range(0, n, batch_size):
            x = torch.from_numpy(np.array(acts[a:a + batch_size], dtype=np.float32))
            f = enc.encode(x.to(dev))
            r, c = torch.nonzero(f > 0, as_tuple=True)
            total += len(r)
            if total > max_nonzeros:
                raise ConfigError(f"{total:,} nonzero activations after {a + len(x):,} of {n:,} rows exceed "
                                  f"max_nonzeros={max_nonzeros:,}; compute features on fewer tokens or raise the limit")
            rows.append(r.cpu().numpy() + a)
            feats.append(c.cpu().numpy())
            vals.append(f[r, c].to(torch.float32).cpu().numpy())
            if progress is not None:
                progress(min(a + batch_size, n), n, "encoding the activation cache")
    return (np.concatenate(rows).astype(np.int64), np.concatenate(feats).astype(np.int64),
            np.concatenate(vals).astype(np.float32))


def _windows(centres: np.ndarray, feature: np.ndarray, doc: np.ndarray, pos: np.ndarray, token_ids: np.ndarray,
             lookup: Callable[[np.ndarray, np.ndarray], np.ndarray], before: int, after: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and feature activations of the windows around ``centres`` (any shape; -1 = none)."""
    n = len(doc)
    order = np.lexsort((pos, doc))  # rows sorted by (document, position)
    where = np.empty(n, dtype=np.int64)
    where[order] = np.arange(n)
    c = centres.reshape(-1)
    offsets = np.arange(-before, after + 1)
    k = where[np.maximum(c, 0)][:, None] + offsets[None, :]
    inside = (k >= 0) & (k < n)
    nb = order[np.clip(k, 0, n - 1)]
    valid = inside & (c[:, None] >= 0) & (doc[nb] == doc[np.maximum(c, 0)][:, None])
    toks = np.where(valid, token_ids[nb], -1).astype(np.int32)
    f = np.broadcast_to(feature.reshape(-1)[:, None], nb.shape)
    acts = np.where(valid, lookup(nb, f), 0.0).astype(np.float32)
    shape = centres.shape + (len(offsets),)
    return toks.reshape(shape), acts.reshape(shape)


def logit_effects(W_dec: torch.Tensor, W_O: torch.Tensor, W_U: torch.Tensor, n_logits: int,
                  batch: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n_logits`` boosted and suppressed tokens per feature.

    W_dec [d_sae, n_heads*d_head], W_O [n_heads, d_head, d_model], W_U [d_model, vocab]. Effect of
    feature i = sum_h W_dec[i, h slice] @ W_O[h] @ W_U. Returns (pos_ids, pos_values, neg_ids,
    neg_values), each [d_sae, n_logits]; boosted descending, suppressed ascending (most negative first).
    """
    n_heads, d_head, d_model = W_O.shape
    if W_dec.shape[1] != n_heads * d_head or W_U.shape[0] != d_model:
        raise ShapeError(f"W_dec {tuple(W_dec.shape)}, W_O {tuple(W_O.shape)} and W_U {tuple(W_U.shape)} do not "
                         "chain: need W_dec [d_sae, n_heads*d_head], W_O [n_heads, d_head, d_model], "
                         "W_U [d_model, vocab]")
    k = min(n_logits, W_U.shape[1])
    w_o = W_O.to(torch.float32).reshape(n_heads * d_head, d_model)
    w_u = W_U.to(torch.float32)
    out = ([], [], [], [])
    with torch.no_grad():
        for a in range(0, W_dec.shape[0], batch):
            logits = (W_dec[a:a + batch].to(torch.float32) @ w_o) @ w_u
            top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
            for lst, t in zip(out, (top.indices, top.values, bottom.indices, bottom.values)):
                lst.append(t.numpy())
    pos_ids, pos_v, neg_ids, neg_v = (np.concatenate(x) for x in out)
    return pos_ids.astype(np.int32), pos_v, neg_ids.astype(np.int32), neg_v


def feature_data(sae: Any, acts: Any, token_ids: np.ndarray, doc: np.ndarray, pos: np.ndarray, *,
                 W_O: torch.Tensor | None = None, W_U: torch.Tensor | None = None,
                 decode: Callable[[Sequence[int]], Sequence[str]] | None = None, batch_size: int = 2048,
                 max_nonzeros: int = 150_000_000, progress: Progress | None = None, meta: dict | None = None,
                 device: torch.device | str | None = None, **settings: Any) -> FeatureData:
    """Dashboard data of every feature (see the module docstring).

    acts: [tokens, d_in] (array or memmap), token_ids / doc / pos: [tokens] ints. W_O / W_U: see
    ``logit_effects`` (both or neither). decode: token ids -> texts (for ``token_strings``).
    settings: overrides of ``DEFAULTS`` (n_top, n_intervals, n_per_interval, before, after, n_bins,
    n_logits, seed). device: where the SAE encodes the activations (None: where it is); the rest
    runs on CPU.
    """
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown feature-data setting(s) {unknown}; valid: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **settings}
    for name in ("n_top", "n_intervals", "n_per_interval", "n_bins", "n_logits"):
        if int(s[name]) < 1:
            raise ConfigError(f"{name}={s[name]}: must be >= 1")
    if s["before"] < 0 or s["after"] < 0:
        raise ConfigError(f"before={s['before']}, after={s['after']}: context sizes must be >= 0")
    if (W_O is None) != (W_U is None):
        raise ConfigError("logit effects need both W_O and W_U (or neither)")
    token_ids, doc, pos = (np.asarray(a, dtype=np.int64) for a in (token_ids, doc, pos))
    n = _check_inputs(sae, acts, token_ids, doc, pos)
    d_sae = sae.cfg.d_sae
    rows, feats, vals = _nonzeros(sae, acts, batch_size, max_nonzeros, progress, device)

    # sort by (feature, value ascending, row descending): the segment tail is the top, lower rows first
    order = np.lexsort((-rows, vals, feats))
    rows, feats, vals = rows[order], feats[order], vals[order]
    counts = np.bincount(feats, minlength=d_sae)
    ends = np.cumsum(counts)
    starts = ends - counts
    density = counts / n
    max_act = np.where(counts > 0, vals[np.maximum(ends - 1, 0)] if len(vals) else 0.0, 0.0)
    sums = np.bincount(feats, weights=vals.astype(np.float64), minlength=d_sae)
    mean_act = np.divide(sums, counts, out=np.zeros(d_sae), where=counts > 0)

    keys = feats * n + rows  # (feature, row) -> activation, sorted for searchsorted lookups
    key_order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_vals = keys[key_order], vals[key_order]

    def lookup(r: np.ndarray, f: np.ndarray) -> np.ndarray:
        q = f.astype(np.int64) * n + r
        j = np.clip(np.searchsorted(sorted_keys, q), 0, max(len(sorted_keys) - 1, 0))
        hit = (sorted_keys[j] == q) if len(sorted_keys) else np.zeros(q.shape, bool)
        return np.where(hit, sorted_vals[j] if len(sorted_vals) else 0.0, 0.0)

    # top activations
    n_top = int(s["n_top"])
    j = np.arange(n_top)
    idx = ends[:, None] - 1 - j[None, :]
    ok = j[None, :] < counts[:, None]
    safe = np.clip(idx, 0, max(len(rows) - 1, 0))
    top_rows = np.where(ok, rows[safe] if len(rows) else -1, -1)
    top_acts = np.where(ok, vals[safe] if len(vals) else 0.0, 0.0).astype(np.float32)

    # histogram on [0, max_i]
    nb = int(s["n_bins"])
    scale = np.where(max_act > 0, max_act, 1.0)
    b = np.minimum((vals / scale[feats] * nb).astype(np.int64), nb - 1)
    hist_counts = np.bincount(feats * nb + b, minlength=d_sae * nb).reshape(d_sae, nb)
    hist_edges = max_act[:, None] * np.linspace(0.0, 1.0, nb + 1)[None, :]

    # quantile-interval samples
    n_int, n_per = int(s["n_intervals"]), int(s["n_per_interval"])
    rng = np.random.default_rng(int(s["seed"]))
    q_rows = -np.ones((d_sae, n_int, n_per), dtype=np.int64)
    q_acts = np.zeros((d_sae, n_int, n_per), dtype=np.float32)
    q_edges = np.zeros((d_sae, n_int + 1))
    for i in np.flatnonzero(counts):
        c, s0 = int(counts[i]), int(starts[i])
        bounds = (np.arange(n_int + 1) * c) // n_int
        q_edges[i, :n_int] = vals[s0 + np.minimum(bounds[:-1], c - 1)]
        q_edges[i, n_int] = vals[s0 + c - 1]
        for t in range(n_int):
            lo, hi = int(bounds[t]), int(bounds[t + 1])
            if hi <= lo:
                continue
            pick = np.sort(rng.choice(hi - lo, size=min(n_per, hi - lo), replace=False)) + lo
            q_rows[i, t, :len(pick)] = rows[s0 + pick]
            q_acts[i, t, :len(pick)] = vals[s0 + pick]

    before, after = int(s["before"]), int(s["after"])
    feat_grid = np.arange(d_sae)
    top_tokens, top_token_acts = _windows(top_rows, np.broadcast_to(feat_grid[:, None], top_rows.shape), doc, pos,
                                          token_ids, lookup, before, after)
    q_tokens, q_token_acts = _windows(q_rows, np.broadcast_to(feat_grid[:, None, None], q_rows.shape), doc, pos,
                                      token_ids, lookup, before, after)

    logits: tuple = (None, None, None, None)
    if W_O is not None:
        if progress is not None:
            progress(n, n, "logit effects")
        logits = logit_effects(sae.W_dec.detach(), W_O, W_U, int(s["n_logits"]))
    attribution = head_attribution(sae) if sae.cfg.n_heads is not None else None

    ids = np.unique(np.concatenate([a.reshape(-1) for a in (top_tokens, q_tokens, logits[0], logits[2])
                                    if a is not None]))
    ids = [int(t) for t in ids if t >= 0]
    strings = dict(zip(ids, decode(ids))) if decode is not None and ids else {}
    fd = FeatureData(pd.DataFrame(), density, max_act.astype(np.float64), mean_act, hist_counts, hist_edges,
                     top_rows, top_acts, top_tokens, top_token_acts, q_edges, q_rows, q_acts, q_tokens,
                     q_token_acts, *logits, attribution, strings,
                     {"settings": s, "n_tokens": n, "n_docs": int(len(np.unique(doc))), "n_nonzeros": int(len(vals)),
                      **(meta or {})})
    object.__setattr__(fd, "table", summary_table(fd))
    return _frozen(fd)


def summary_table(fd: FeatureData) -> pd.DataFrame:
    """One row per feature: feature, density, log10_density, max_act, mean_act, top_head,
    top_head_weight, top_token (text at its largest activation), boosted / suppressed (top 3 tokens)."""
    d = fd.d_sae
    table = pd.DataFrame({"feature": np.arange(d), "density": fd.density,
                          "log10_density": np.log10(np.where(fd.density > 0, fd.density, np.nan)),
                          "max_act": fd.max_act, "mean_act": fd.mean_act})
    if fd.head_attribution is not None:
        table["top_head"] = fd.head_attribution.argmax(axis=1)
        table["top_head_weight"] = fd.head_attribution.max(axis=1)
    c = fd.centre
    table["top_token"] = [fd.token(t) if t >= 0 else "" for t in fd.top_tokens[:, 0, c]] if fd.top_tokens.size else ""
    if fd.logit_pos_ids is not None:
        table["boosted"] = [" ".join(fd.token(t) for t in row[:3]) for row in fd.logit_pos_ids]
        table["suppressed"] = [" ".join(fd.token(t) for t in row[:3]) for row in fd.logit_neg_ids]
    return table


def _frozen(fd: FeatureData) -> FeatureData:
    for name in _ARRAYS:
        a = getattr(fd, name)
        if isinstance(a, np.ndarray):
            a.flags.writeable = False
    return fd


def to_result(fd: FeatureData) -> Result:
    """Store form: the summary table, every array, meta with the token texts."""
    arrays = {k: getattr(fd, k) for k in _ARRAYS if getattr(fd, k) is not None}
    meta = {**fd.meta, "token_strings": {str(k): v for k, v in fd.token_strings.items()}}
    return Result(table=fd.table, arrays=arrays, meta=meta)


def from_result(result: Result) -> FeatureData:
    """Inverse of ``to_result``."""
    meta = dict(result.meta)
    strings = {int(k): v for k, v in meta.pop("token_strings", {}).items()}
    a = result.arrays
    fd = FeatureData(result.table, *(np.asarray(a[k]) if k in a else None for k in _ARRAYS),
                     token_strings=strings, meta=meta)
    return _frozen(fd)
