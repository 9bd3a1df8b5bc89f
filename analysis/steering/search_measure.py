"""Score one steering setting: the behaviour effect on held-out prompts and the side effects on neutral text.

A setting adds α·n_L·v̂ at ``site`` of layer L (``analysis.steering.search_space``); the
unsteered model is measured once per search (``Baseline``) and every setting against it.

Causal LMs, at every real position t of a text (the prediction of token t + 1):

- ``effect``: on the held-out texts of the contrast set (both sides), the mean shift of
  log Σ_{c∈C⁺} p(c) − log Σ_{c∈C⁻} p(c) (target minus opposite concept-token classes, nats)
  from the unsteered model; without negative concept tokens only the C⁺ term;
- ``greedy_changed``: share of those positions whose greedy (argmax) next token changes;
- ``kl``: on neutral texts (corpus docstrings of another package), mean per-token
  KL(p_unsteered ‖ p_steered) (nats), the side effect the Pareto front is built on;
- ``nll_delta`` / ``ppl_ratio``: change of the neutral texts' next-token cross-entropy
  (nats per token) and the perplexity ratio exp(nll_delta).

Encoders (MiniLM), sentence embedding e = normalised mean of the last ``resid_post``:

- ``effect``: the probe-class shift: a logistic-regression probe fitted on the unsteered
  training pairs' embeddings (positive = 1), applied to the steered held-out *negative*
  texts: mean P(positive) steered minus unsteered;
- ``drift`` (the side effect): on neutral texts, mean 1 − cos(e_steered, e_unsteered);
- ``masked_loss_delta``: with a trained MLM head (``masked=True``), the change of the
  masked-token loss (nats per masked token) on neutral texts.

Forward passes: a setting costs ``passes_per_setting`` batched forward passes (held-out batches
plus neutral batches, ``BATCH_TEXTS`` texts each, plus the masked-loss batches for an encoder);
the baseline costs the same once. Pure torch on a given bridge; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from analysis.device import float64_home
from analysis.steering.collect import model_device, pad_id, pad_rows, token_rows
from analysis.steering.effect import BATCH_TEXTS, concept_ids, is_causal, sentence_embeddings
from analysis.steering.hooks import steering_hooks

LM_COLUMNS = ("effect", "kl", "nll_delta", "ppl_ratio", "greedy_changed")
ENCODER_COLUMNS = ("effect", "drift", "masked_loss_delta")
SIDE = {"lm": "kl", "encoder": "drift"}
MASK_BATCH = 32  # masked_token_loss's texts per forward pass


def n_batches(n_texts: int, batch: int = BATCH_TEXTS) -> int:
    return math.ceil(n_texts / batch)


def passes_per_setting(kind: str, n_held: int, n_neutral: int, masked: bool = False) -> int:
    """Batched forward passes one setting costs (held-out texts + neutral texts [+ masked batches])."""
    extra = n_batches(n_neutral, MASK_BATCH) if (kind == "encoder" and masked) else 0
    return n_batches(n_held) + n_batches(n_neutral) + extra


@dataclass(eq=False)
class Baseline:
    """The unsteered model's numbers every setting is compared with (kept in memory for one search)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


def setting_hooks(bridge: Any, vector: np.ndarray, alpha: float, layer: int, site: str) -> list:
    """Hooks adding α·vector at ``site`` of ``layer``: exactly what ``steer apply`` attaches for a
    one-layer vector file holding ``vector`` (float32) with ``--alpha α --scale absolute``."""
    return steering_hooks(bridge, np.asarray(vector, dtype=np.float32), alpha=alpha, layers=[layer], hook=site,
                          scale="absolute")


# -- causal LMs ------------------------------------------------------------------------------------------
def text_batches(bridge: Any, texts: Sequence[str], max_tokens: int):
    rows = token_rows(bridge, texts, max_tokens=max_tokens)
    return [pad_rows(rows[s:s + BATCH_TEXTS], pad_id(bridge), "right") for s in range(0, len(rows), BATCH_TEXTS)]


@torch.no_grad()
def log_probs(bridge: Any, ids: torch.Tensor, mask: torch.Tensor, hooks: list) -> torch.Tensor:
    device = model_device(bridge)
    with bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
        logits = bridge(ids.to(device), attention_mask=mask.to(device), return_type="logits")
    return torch.log_softmax(logits.to(float64_home(logits.device)).to(torch.float64), dim=-1)


def concept_margin(logp: torch.Tensor, pos_ids: list[int], neg_ids: list[int]) -> torch.Tensor:
    m = torch.logsumexp(logp[..., pos_ids], -1)
    return m - torch.logsumexp(logp[..., neg_ids], -1) if neg_ids else m


def lm_baseline(bridge: Any, held: Sequence[str], neutral: Sequence[str], *, concept_pos: Sequence[str],
                concept_neg: Sequence[str], max_tokens: int = 64) -> Baseline:
    pos_ids, neg_ids = concept_ids(bridge, concept_pos), concept_ids(bridge, concept_neg)
    held_b, neutral_b = text_batches(bridge, held, max_tokens), text_batches(bridge, neutral, max_tokens)
    held0, neutral0 = [], []
    for ids, mask in held_b:
        logp = log_probs(bridge, ids, mask, [])
        held0.append((concept_margin(logp, pos_ids, neg_ids), logp.argmax(-1)))
    for ids, mask in neutral_b:
        neutral0.append(log_probs(bridge, ids, mask, []))
    return Baseline("lm", {"pos_ids": pos_ids, "neg_ids": neg_ids, "held": held_b, "neutral": neutral_b,
                           "held0": held0, "neutral0": neutral0})


def lm_score(bridge: Any, base: Baseline, hooks: list) -> dict[str, float]:
    d = base.data
    wide = float64_home(model_device(bridge))
    eff_sum = changed = n_held = 0.0
    for (ids, mask), (m0, g0) in zip(d["held"], d["held0"]):
        logp = log_probs(bridge, ids, mask, hooks)
        real = mask.to(wide).bool()
        eff_sum += float((concept_margin(logp, d["pos_ids"], d["neg_ids"]) - m0)[real].sum())
        changed += float((logp.argmax(-1) != g0)[real].sum())
        n_held += int(real.sum())
    kl_sum = nll_delta = n_real = n_next = 0.0
    for (ids, mask), logp0 in zip(d["neutral"], d["neutral0"]):
        logp = log_probs(bridge, ids, mask, hooks)
        real = mask.to(wide).bool()
        ids_w = ids.to(wide)
        kl_sum += float((logp0.exp() * (logp0 - logp)).sum(-1)[real].sum())
        nxt = real[:, :-1] & real[:, 1:]
        tgt = ids_w[:, 1:, None]
        nll = -logp[:, :-1].gather(-1, tgt).squeeze(-1)
        nll0 = -logp0[:, :-1].gather(-1, tgt).squeeze(-1)
        nll_delta += float((nll - nll0)[nxt].sum())
        n_real += int(real.sum())
        n_next += int(nxt.sum())
    dn = nll_delta / n_next if n_next else float("nan")
    return {"effect": eff_sum / n_held, "kl": kl_sum / n_real, "nll_delta": dn, "ppl_ratio": math.exp(dn),
            "greedy_changed": changed / n_held}


# -- encoders --------------------------------------------------------------------------------------------
def _embed(bridge: Any, texts: Sequence[str], hooks: list, max_tokens: int) -> torch.Tensor:
    with bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
        return sentence_embeddings(bridge, texts, max_tokens=max_tokens).to(torch.float64)


def encoder_baseline(bridge: Any, train_pos: Sequence[str], train_neg: Sequence[str], held_neg: Sequence[str],
                     neutral: Sequence[str], *, masked_batch: Any = None, max_tokens: int = 128) -> Baseline:
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([_embed(bridge, train_pos, [], max_tokens), _embed(bridge, train_neg, [], max_tokens)]).numpy()
    y = np.r_[np.ones(len(train_pos)), np.zeros(len(train_neg))]
    probe = LogisticRegression(C=1.0, tol=1e-8, max_iter=10_000).fit(x, y)
    e_held = _embed(bridge, held_neg, [], max_tokens).numpy()
    data = {"probe": probe, "held": list(held_neg), "neutral": list(neutral), "max_tokens": max_tokens,
            "p0": float(probe.predict_proba(e_held)[:, 1].mean()), "e0": _embed(bridge, neutral, [], max_tokens),
            "masked_batch": masked_batch}
    if masked_batch is not None:
        from analysis.models.masked_lm import masked_token_loss

        data["loss0"] = masked_token_loss(bridge, masked_batch, batch_size=MASK_BATCH)
    return Baseline("encoder", data)


def encoder_score(bridge: Any, base: Baseline, hooks: list) -> dict[str, float]:
    d = base.data
    e_held = _embed(bridge, d["held"], hooks, d["max_tokens"]).numpy()
    p = float(d["probe"].predict_proba(e_held)[:, 1].mean())
    e = _embed(bridge, d["neutral"], hooks, d["max_tokens"])
    drift = float((1.0 - (e * d["e0"]).sum(-1) / (e.norm(dim=-1) * d["e0"].norm(dim=-1))).mean())
    loss_delta = float("nan")
    if d["masked_batch"] is not None:
        from analysis.models.masked_lm import masked_token_loss

        loss_delta = masked_token_loss(bridge, d["masked_batch"], fwd_hooks=hooks, batch_size=MASK_BATCH) - d["loss0"]
    return {"effect": p - d["p0"], "drift": drift, "masked_loss_delta": loss_delta}


def score(bridge: Any, base: Baseline, vector: np.ndarray, alpha: float, layer: int, site: str) -> dict[str, float]:
    """The setting's row (``LM_COLUMNS`` or ``ENCODER_COLUMNS``) against ``base``."""
    hooks = setting_hooks(bridge, vector, alpha, layer, site)
    return lm_score(bridge, base, hooks) if base.kind == "lm" else encoder_score(bridge, base, hooks)


def kind_of(bridge: Any) -> str:
    return "lm" if is_causal(bridge) else "encoder"
