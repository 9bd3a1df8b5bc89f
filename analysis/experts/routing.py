"""Expert usage of routed (sparse, top-k) mixtures of experts such as Mixtral.

``collect_routing`` runs a model over texts and logs, per layer and token, the k experts the
router picked and its softmax probabilities over all E experts. It runs a TransformerLens
``TransformerBridge`` (given, e.g. from the model cache, or booted) and reads
``blocks.L.mlp.hook_expert_indices`` (tokens, k) and ``blocks.L.mlp.gate.hook_out`` (the router
logits, tokens x E); when the bridge has no such hooks it falls back to the Hugging Face forward
with ``output_router_logits=True`` (and top-k of those logits), and records which backend it
used. Texts run one at a time (no padding) on the models' device; the log is CPU numpy.

``routing_stats`` (pure) computes, per layer, with T tokens, k experts per token, E experts:

- usage f_e = share of the T·k assignments that go to expert e (sums to 1);
- router probability P_e = mean over tokens of the softmax router probability of e;
- load-balance coefficient E · sum_e f_e P_e: 1 for perfectly even routing and router
  probabilities, up to E when one expert takes everything. (HF Mixtral's auxiliary loss
  counts assignments per token instead of per assignment, so it equals k times this.)
- routing entropy: mean over tokens of H(router probabilities), in bits (max log2 E);
  usage entropy H(f) in bits;
- token specialisation: for each token id with at least ``min_count`` occurrences, the share
  of its occurrences routed (among the k) to its most frequent expert; the layer score is the
  mean over such tokens. Baselines: k/E (routing that ignores the token, evenly), and a
  shuffled baseline (the same score after permuting the routing decisions across the
  positions of the counted tokens, which keeps expert loads and the small-count bias);
- co-activation P(j | i) = share of the tokens routed to i that are also routed to j
  (diagonal 1; NaN for an expert that never fires);
- per-domain usage: for each domain (e.g. the package a docstring comes from), the share of
  its assignments going to each expert; and the mutual information I(domain; expert), bits,
  of the assignment counts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError, ShapeError, SourceError
from analysis.progress import Progress

CODE_VERSION = "routing-1"
ROUTER_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOPK_CONFIG_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")


@dataclass(frozen=True, eq=False)
class RoutingLog:
    """Routing decisions of one model on a set of texts.

    ``token_ids`` (T,) int64; ``domain`` (T,) int64 index into ``domains``; ``doc`` (T,) text
    index; ``indices`` (L, T, k) int64 experts picked (router order); ``probs`` (L, T, E)
    softmax router probabilities; ``tokens``: id -> string for the ids seen; ``backend``:
    "bridge" or "hf".
    """

    token_ids: np.ndarray
    domain: np.ndarray
    doc: np.ndarray
    indices: np.ndarray
    probs: np.ndarray
    domains: tuple[str, ...]
    tokens: dict[int, str]
    backend: str = "bridge"

    def __post_init__(self) -> None:
        if self.indices.ndim != 3 or self.probs.ndim != 3:
            raise ShapeError(f"indices must be (L, T, k) and probs (L, T, E); got {self.indices.shape} "
                             f"and {self.probs.shape}")
        L, T, k = self.indices.shape
        if self.probs.shape[:2] != (L, T) or self.token_ids.shape != (T,) or self.domain.shape != (T,):
            raise ShapeError(f"routing log arrays disagree: indices {self.indices.shape}, probs {self.probs.shape}, "
                             f"token_ids {self.token_ids.shape}, domain {self.domain.shape}")
        E = self.probs.shape[2]
        if k > E or (T and (self.indices.min() < 0 or self.indices.max() >= E)):
            raise ShapeError(f"expert indices must lie in [0, {E}) with k <= E; got k={k}")

    @property
    def n_layers(self) -> int:
        return self.indices.shape[0]

    @property
    def n_experts(self) -> int:
        return self.probs.shape[2]

    @property
    def top_k(self) -> int:
        return self.indices.shape[2]


# -- pure statistics --------------------------------------------------------------------------------
def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum(axis=axis, keepdims=True)
    return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=axis)


def assignment_matrix(indices: np.ndarray, n_experts: int) -> np.ndarray:
    """(T, E) 0/1: token t routed to expert e (one layer's (T, k) indices)."""
    T = indices.shape[0]
    out = np.zeros((T, n_experts), dtype=np.int64)
    np.put_along_axis(out, indices, 1, axis=1)
    return out


def load_balance(indices: np.ndarray, probs: np.ndarray) -> float:
    """E · sum_e f_e P_e for one layer: (T, k) indices, (T, E) router probabilities."""
    E = probs.shape[1]
    f = np.bincount(indices.reshape(-1), minlength=E) / indices.size
    return float(E * (f * probs.mean(0)).sum())


def coactivation(indices: np.ndarray, n_experts: int) -> np.ndarray:
    """(E, E) P(j | i): share of tokens routed to i also routed to j (NaN row if i never fires)."""
    A = assignment_matrix(indices, n_experts).astype(np.float64)
    both = A.T @ A
    with np.errstate(invalid="ignore", divide="ignore"):
        return both / np.diag(both)[:, None]


def token_specialisation(token_ids: np.ndarray, indices: np.ndarray, n_experts: int,
                         min_count: int = 5) -> tuple[float, pd.DataFrame]:
    """(mean share, per-token table) for one layer; the table has token_id, count, top_expert, share."""
    A = assignment_matrix(indices, n_experts)
    ids, inverse, counts = np.unique(token_ids, return_inverse=True, return_counts=True)
    per_token = np.zeros((len(ids), n_experts), dtype=np.int64)
    np.add.at(per_token, inverse, A)
    keep = counts >= min_count
    share = per_token.max(1) / counts
    table = pd.DataFrame({"token_id": ids[keep], "count": counts[keep], "top_expert": per_token.argmax(1)[keep],
                          "share": share[keep]})
    return (float(share[keep].mean()) if keep.any() else float("nan")), table


def mutual_information_bits(counts: np.ndarray) -> float:
    """I(X; Y) in bits of a (|X|, |Y|) contingency table of counts."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n <= 0:
        return float("nan")
    p = c / n
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (px * py)), 0.0)
    return float(terms.sum())


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """``routing_stats`` output. ``layers``: one row per layer (layer, n_tokens, load_balance,
    routing_entropy, max_entropy, usage_entropy, token_specialisation, baseline_k_over_e,
    shuffled_specialisation, n_tokens_counted, domain_mi); ``usage`` / ``router_prob`` (L, E);
    ``coactivation`` (L, E, E); ``domain_usage`` (L, D, E); ``tokens``: per layer and counted
    token (layer, token_id, token, count, top_expert, share)."""

    layers: pd.DataFrame
    usage: np.ndarray
    router_prob: np.ndarray
    coactivation: np.ndarray
    domain_usage: np.ndarray
    tokens: pd.DataFrame
    domains: tuple[str, ...]
    meta: dict


def routing_stats(log: RoutingLog, *, min_count: int = 5, seed: int = 0) -> RoutingStats:
    """All per-layer statistics of the module docstring."""
    if min_count < 1:
        raise ConfigError(f"min_count={min_count} must be >= 1")
    L, E, k, D = log.n_layers, log.n_experts, log.top_k, len(log.domains)
    rng = np.random.default_rng(seed)
    rows, token_tables = [], []
    usage = np.zeros((L, E))
    router_prob = np.zeros((L, E))
    coact = np.zeros((L, E, E))
    dom = np.full((L, D, E), np.nan)
    for layer in range(L):
        idx, probs = log.indices[layer], log.probs[layer]
        A = assignment_matrix(idx, E)
        usage[layer] = A.sum(0) / A.sum()
        router_prob[layer] = probs.mean(0)
        coact[layer] = coactivation(idx, E)
        counts = np.stack([A[log.domain == d].sum(0) for d in range(D)])  # (D, E)
        with np.errstate(invalid="ignore", divide="ignore"):
            dom[layer] = counts / counts.sum(1, keepdims=True)
        spec, table = token_specialisation(log.token_ids, idx, E, min_count)
        counted = np.isin(log.token_ids, table["token_id"].to_numpy())
        shuffled_idx = idx.copy()
        pos = np.flatnonzero(counted)
        shuffled_idx[pos] = idx[rng.permutation(pos)]
        shuffled, _ = token_specialisation(log.token_ids, shuffled_idx, E, min_count)
        token_tables.append(table.assign(layer=layer, token=[log.tokens.get(int(t), str(t))
                                                             for t in table["token_id"]]))
        rows.append({"layer": layer, "n_tokens": int(idx.shape[0]), "load_balance": load_balance(idx, probs),
                     "routing_entropy": float(_entropy_bits(probs, 1).mean()), "max_entropy": float(np.log2(E)),
                     "usage_entropy": float(_entropy_bits(usage[layer])), "token_specialisation": spec,
                     "baseline_k_over_e": k / E, "shuffled_specialisation": shuffled,
                     "n_tokens_counted": int(len(table)), "domain_mi": mutual_information_bits(counts)})
    tokens = (pd.concat(token_tables, ignore_index=True) if token_tables else
              pd.DataFrame(columns=["token_id", "count", "top_expert", "share", "layer", "token"]))
    tokens = tokens[["layer", "token_id", "token", "count", "top_expert", "share"]]
    meta = {"n_layers": L, "n_experts": E, "top_k": k, "n_tokens": int(log.token_ids.shape[0]),
            "n_texts": int(len(np.unique(log.doc))), "min_count": min_count, "backend": log.backend}
    return RoutingStats(pd.DataFrame(rows), usage, router_prob, coact, dom, tokens, log.domains, meta)


def to_result(stats: RoutingStats):
    from analysis.store import Result

    return Result(table=stats.layers, arrays={"usage": stats.usage, "router_prob": stats.router_prob,
                                              "coactivation": stats.coactivation, "domain_usage": stats.domain_usage},
                  meta={**stats.meta, "domains": list(stats.domains),
                        "tokens": json.loads(stats.tokens.to_json(orient="records"))})


def from_result(result) -> RoutingStats:
    meta = dict(result.meta)
    tokens = pd.DataFrame(meta.pop("tokens"), columns=["layer", "token_id", "token", "count", "top_expert", "share"])
    a = result.arrays
    return RoutingStats(result.table, np.array(a["usage"]), np.array(a["router_prob"]), np.array(a["coactivation"]),
                        np.array(a["domain_usage"]), tokens, tuple(meta.pop("domains")), meta)


# -- collection (runs the model) ---------------------------------------------------------------------
def _config(src) -> dict[str, Any]:
    if src.hf_dir is None or not (src.hf_dir / "config.json").is_file():
        return {}
    try:
        return json.loads((src.hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def require_routers(src) -> tuple[int, int]:
    """(n_experts, top_k) of a routed MoE source; SourceError naming the fix otherwise."""
    cfg = _config(src)
    n = next((int(cfg[k]) for k in ROUTER_CONFIG_KEYS if isinstance(cfg.get(k), int)), 0)
    k = next((int(cfg[key]) for key in TOPK_CONFIG_KEYS if isinstance(cfg.get(key), int)), 0)
    if n < 2 or k < 1:
        what = cfg.get("model_type", "no config.json") if cfg else "no config.json"
        raise SourceError(f"{src.label}: no expert routers found ({what}; config needs num_local_experts >= 2 and "
                          f"num_experts_per_tok >= 1); `lenslab experts` needs a routed MoE such as tiny-mixtral "
                          "(a Hugging Face Mixtral-style directory)")
    return n, k


def routing_hooks(bridge) -> set[str] | None:
    """The hook names ``collect_routing`` reads on ``bridge``, or None when it lacks them (the HF backend)."""
    n_layers = int(bridge.cfg.n_layers)
    names = {f"blocks.{i}.mlp.{h}" for i in range(n_layers) for h in ("hook_expert_indices", "gate.hook_out")}
    return names if names <= set(bridge.hook_dict) else None


def boot_hf_model(src, device=None, dtype=None):
    """A fresh Hugging Face causal LM of ``src`` in eval mode (the bridge's wrapped model records each
    router several times, so the HF backend needs its own); a ``boot`` for ``analysis.model_cache``."""
    from transformers import AutoModelForCausalLM

    from analysis.source_layout import from_pretrained_kwargs

    model_dir = src.model_dir()  # transformers loads exactly the fingerprinted weights from here
    model = AutoModelForCausalLM.from_pretrained(model_dir, **from_pretrained_kwargs(model_dir)).eval()
    return model if device is None else model.to(device)


def collect_routing(src, texts: Sequence[str], domains: Sequence[str], *, max_tokens: int = 64,
                    progress: Progress | None = None, bridge=None, hf_model=None) -> RoutingLog:
    """Run ``src`` over ``texts`` (one at a time) and log every layer's routing (see the module docstring).

    ``bridge``: the booted model of ``src`` (booted on the CPU when None); ``hf_model``: the HF model
    for a bridge without routing hooks (``boot_hf_model`` when None). Tokens go to the device the
    model is on; hold ``analysis.model_cache.LOCK`` around a call with a shared bridge."""
    import torch
    from transformers import AutoTokenizer

    n_experts, top_k = require_routers(src)
    if len(texts) != len(domains) or not texts:
        raise ShapeError(f"need one domain per text and at least one text; got {len(texts)} texts, "
                         f"{len(domains)} domains")
    tokenizer = AutoTokenizer.from_pretrained(src.model_dir())
    bridge = src.boot_bridge() if bridge is None else bridge
    n_layers = int(bridge.cfg.n_layers)
    names = routing_hooks(bridge)
    backend = "bridge" if names is not None else "hf"
    model = bridge
    if backend == "hf":
        hf_model = boot_hf_model(src) if hf_model is None else hf_model
        model = hf_model
    device = next(iter(model.parameters())).device
    domain_names = tuple(dict.fromkeys(domains))
    dom_index = {d: i for i, d in enumerate(domain_names)}
    ids_all, dom_all, doc_all, idx_all, prob_all = [], [], [], [], []
    with torch.inference_mode():
        for t, (text, d) in enumerate(zip(texts, domains)):
            ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                continue
            ids = ids.to(device)
            if backend == "bridge":
                _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in names)
                logits = [cache[f"blocks.{i}.mlp.gate.hook_out"].reshape(-1, n_experts) for i in range(n_layers)]
                picked = [cache[f"blocks.{i}.mlp.hook_expert_indices"].reshape(-1, top_k) for i in range(n_layers)]
            else:
                out = hf_model(ids, output_router_logits=True)
                if len(out.router_logits) != n_layers:
                    raise ShapeError(f"{src.label}: the model returned {len(out.router_logits)} router logits for "
                                     f"{n_layers} layers; this architecture's routing cannot be read")
                logits = [r.reshape(-1, n_experts) for r in out.router_logits]
                picked = [torch.topk(lg, top_k, dim=-1).indices for lg in logits]
            ids_all.append(ids[0].cpu().numpy())
            dom_all.append(np.full(ids.shape[1], dom_index[d]))
            doc_all.append(np.full(ids.shape[1], t))
            idx_all.append(np.stack([p.cpu().numpy() for p in picked]))
            prob_all.append(np.stack([torch.softmax(lg.float(), -1).cpu().numpy() for lg in logits]))
            if progress is not None:
                progress(t + 1, len(texts), "routing")
    token_ids = np.concatenate(ids_all).astype(np.int64)
    tokens = {int(i): tokenizer.convert_ids_to_tokens(int(i)) for i in np.unique(token_ids)}
    return RoutingLog(token_ids, np.concatenate(dom_all).astype(np.int64), np.concatenate(doc_all).astype(np.int64),
                      np.concatenate(idx_all, axis=1).astype(np.int64), np.concatenate(prob_all, axis=1),
                      domain_names, tokens, backend)
