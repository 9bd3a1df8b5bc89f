"""Measured effect of steering: dose-response over α, layer sweeps, steered generation.

Causal LMs (the tiny LMs trained here), on held-out texts (the contrast set's test split, both
sides), at every real position t (the model's prediction of token t + 1), averaged:

- ``logp_pos`` / ``logp_neg``: log Σ_{c ∈ C} p(c | prefix) over the set's positive / negative
  concept tokens (nats); ``delta_pos`` / ``delta_neg``: the change from α = 0;
- ``kl``: KL(p_unsteered ‖ p_steered) of the next-token distribution (nats);
- ``nll``: cross-entropy of the real next token (nats; the capability cost).

Encoders (MiniLM), sentence embedding = L2-normalised mean of the last block's
``hook_resid_post`` over real tokens (sentence-transformers' pooling, ``analysis.models.encoder.mean_pool``):
held-out *negative* texts are steered toward the positive class; the targets are the
normalised centroids of the unsteered training positives (c⁺) and negatives (c⁻).

- ``cos_pos``: mean cos(e_α, c⁺); ``shift`` = cos_pos(α) − cos_pos(0); ``margin`` = mean
  [cos(e_α, c⁺) − cos(e_α, c⁻)];
- ``masked_loss``: masked-token cross-entropy (nats per masked token) on the held-out texts
  under the same steering, when a bridge with a trained MLM head is given
  (``analysis.models.mlm_head.mlm_bridge``, ``analysis.models.masked_lm``): the capability cost.

Device: the forward passes run where the bridge's weights are; token ids are moved there, the
log-probabilities are taken in float64 (on CPU when the model is on MPS, which has no float64)
and every number in the tables is a Python float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.steering.contrasts import ContrastSet
from analysis.device import float64_home
from analysis.errors import ConfigError
from analysis.steering.hooks import check_alpha, steering, steering_hooks
from analysis.steering.vectors import SteeringVector
from analysis.steering.collect import model_device, pad_id, pad_rows, run_activations, token_rows
from analysis.steering.extract import hook_name, tokenize
from analysis.progress import Progress

LM_COLUMNS = ("alpha", "logp_pos", "logp_neg", "delta_pos", "delta_neg", "kl", "nll")
ENCODER_COLUMNS = ("alpha", "cos_pos", "shift", "margin", "masked_loss")
DEFAULT_ALPHAS = (-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)
BATCH_TEXTS = 64  # texts per forward pass: memory holds one batch's logits (batch x pos x vocab), not the set's


def is_causal(bridge: Any) -> bool:
    return getattr(bridge.cfg, "attention_dir", "causal") == "causal"


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """Sorted distinct finite α values with 0 added (the unsteered reference)."""
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence) or not alphas:
        raise ConfigError(f"alphas={alphas!r} must be a non-empty list of finite numbers, e.g. -4,-2,0,2,4")
    return tuple(sorted({check_alpha(a) for a in alphas} | {0.0}))


def concept_ids(bridge: Any, tokens: Sequence[str]) -> list[int]:
    """Vocabulary ids of concept token strings; each must encode to exactly one token."""
    tok = bridge.tokenizer
    out = []
    for t in tokens:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = tok.convert_ids_to_tokens(ids)
            raise ConfigError(f"concept token {t!r} encodes to {len(ids)} tokens {pieces} in this model's vocabulary; "
                              "give strings that are single tokens (mind the leading space)")
        out.append(int(ids[0]))
    return out


@dataclass(frozen=True, eq=False)
class DoseResponse:
    """One row per α (``LM_COLUMNS`` or ``ENCODER_COLUMNS``); ``kind`` is "lm" or "encoder"."""

    table: pd.DataFrame
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)


def _apply(bridge: Any, vector: SteeringVector | np.ndarray, alpha: float, layers, hook, scale):
    return steering(bridge, vector, alpha=alpha, layers=layers, hook=hook, scale=scale)


@torch.no_grad()
def _lm_logprobs(bridge: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, pos, vocab) float64 log-probabilities; ``ids``/``mask`` on the model's device."""
    logits = bridge(ids, attention_mask=mask, return_type="logits")
    return torch.log_softmax(logits.to(float64_home(logits.device)).to(torch.float64), dim=-1)


def lm_dose_response(bridge: Any, vector: SteeringVector | np.ndarray, texts: Sequence[str], alphas: Sequence[float],
                     *, concept_pos: Sequence[str], concept_neg: Sequence[str] = (),
                     layers: Sequence[int] | None = None, hook: str | None = None, scale: str = "absolute",
                     max_tokens: int = 64, progress: Progress | None = None) -> DoseResponse:
    """Dose-response of a causal LM (see the module docstring for the columns)."""
    if not is_causal(bridge):
        raise ConfigError("lm_dose_response needs a causal LM; for an encoder use encoder_dose_response")
    if not texts:
        raise ConfigError("no held-out texts to measure on")
    if not concept_pos:
        raise ConfigError("no positive concept tokens; give the contrast set's concept_tokens or --concept")
    alphas = check_alphas(alphas)
    steering_hooks(bridge, vector, alpha=1.0, layers=layers, hook=hook, scale=scale)  # validate before any work
    pos_ids, neg_ids = concept_ids(bridge, concept_pos), concept_ids(bridge, concept_neg)
    rows_tok = token_rows(bridge, texts, max_tokens=max_tokens)
    sums = {alpha: np.zeros(4) for alpha in alphas}  # logp_pos, logp_neg, kl (over real positions), nll
    n_real = n_next = 0
    device = model_device(bridge)
    wide = float64_home(device)
    starts = range(0, len(rows_tok), BATCH_TEXTS)
    for b, start in enumerate(starts):  # texts in batches, so memory holds one batch's logits
        if progress:
            progress(b, len(starts), f"texts {start + 1}-{min(start + BATCH_TEXTS, len(texts))} of {len(texts)}")
        ids, mask = pad_rows(rows_tok[start:start + BATCH_TEXTS], pad_id(bridge), "right")
        ids, mask = ids.to(wide), mask.to(wide)  # the statistics' device
        real = mask.to(torch.bool)
        nxt = real[:, :-1] & real[:, 1:]  # positions whose next token is real
        ids_d, mask_d = ids.to(device), mask.to(device)  # the forward pass's device
        logp0 = _lm_logprobs(bridge, ids_d, mask_d)
        for alpha in alphas:
            if alpha == 0.0:
                logp = logp0
            else:
                with _apply(bridge, vector, alpha, layers, hook, scale):
                    logp = _lm_logprobs(bridge, ids_d, mask_d)
            kl = (logp0.exp() * (logp0 - logp)).sum(-1)
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            sums[alpha] += [float(torch.logsumexp(logp[..., pos_ids], -1)[real].sum()),
                            float(torch.logsumexp(logp[..., neg_ids], -1)[real].sum()) if neg_ids else float("nan"),
                            float(kl[real].sum()), float(nll[nxt].sum())]
        n_real += int(real.sum())
        n_next += int(nxt.sum())
    rows = [{"alpha": alpha, "logp_pos": s_[0] / n_real, "logp_neg": s_[1] / n_real, "kl": s_[2] / n_real,
             "nll": s_[3] / n_next if n_next else float("nan")} for alpha, s_ in sums.items()]
    table = pd.DataFrame(rows)
    base = table.loc[table["alpha"] == 0.0].iloc[0]
    table["delta_pos"] = table["logp_pos"] - base["logp_pos"]
    table["delta_neg"] = table["logp_neg"] - base["logp_neg"]
    if progress:
        progress(len(starts), len(starts), "done")
    return DoseResponse(table[list(LM_COLUMNS)], "lm", {"n_texts": len(texts), "n_positions": n_real,
                                                        "concept_pos": list(concept_pos),
                                                        "concept_neg": list(concept_neg), "scale": scale})


@torch.no_grad()
def sentence_embeddings(bridge: Any, texts: Sequence[str], *, max_tokens: int = 128) -> torch.Tensor:
    """Unit-norm mean-pooled last-layer embeddings (n, d_model) float32 on CPU under whatever hooks
    are attached; ``BATCH_TEXTS`` texts per forward pass, each stopped at the last block (no logits)."""
    from analysis.models.encoder import mean_pool

    rows = token_rows(bridge, texts, max_tokens=max_tokens)
    last = hook_name(bridge, int(bridge.cfg.n_layers) - 1, "resid_post")
    out = []
    for start in range(0, len(rows), BATCH_TEXTS):
        ids, mask = pad_rows(rows[start:start + BATCH_TEXTS], pad_id(bridge), "right")
        acts = run_activations(bridge, ids, mask, [last])[last]
        out.append(mean_pool(acts, mask.to(acts.device)).cpu())
    return torch.cat(out)


def encoder_dose_response(bridge: Any, vector: SteeringVector | np.ndarray, texts: Sequence[str],
                          alphas: Sequence[float], *, target_pos: Sequence[str], target_neg: Sequence[str],
                          layers: Sequence[int] | None = None, hook: str | None = None, scale: str = "absolute",
                          masked_batch: Any = None, max_tokens: int = 128,
                          progress: Progress | None = None) -> DoseResponse:
    """Dose-response of an encoder: ``texts`` (held-out negatives) steered toward the class of
    ``target_pos`` (see the module docstring). ``masked_batch`` (``masked_lm.mask_tokens``) adds
    the masked-token loss; the bridge must then carry a trained MLM head."""
    if is_causal(bridge):
        raise ConfigError("encoder_dose_response needs a bidirectional encoder; for a causal LM use lm_dose_response")
    if not texts or not target_pos or not target_neg:
        raise ConfigError("need held-out texts and both target classes' texts")
    alphas = check_alphas(alphas)
    steering_hooks(bridge, vector, alpha=1.0, layers=layers, hook=hook, scale=scale)  # validate before any work
    cpos = torch.nn.functional.normalize(sentence_embeddings(bridge, target_pos, max_tokens=max_tokens).mean(0), dim=0)
    cneg = torch.nn.functional.normalize(sentence_embeddings(bridge, target_neg, max_tokens=max_tokens).mean(0), dim=0)
    rows = []
    for i, alpha in enumerate(alphas):
        if progress:
            progress(i, len(alphas), f"alpha {alpha:+g}")
        with _apply(bridge, vector, alpha, layers, hook, scale):
            e = sentence_embeddings(bridge, texts, max_tokens=max_tokens)
            loss = float("nan")
            if masked_batch is not None:
                from analysis.models.masked_lm import masked_token_loss

                loss = masked_token_loss(bridge, masked_batch)
        rows.append({"alpha": alpha, "cos_pos": float((e @ cpos).mean()),
                     "margin": float((e @ cpos - e @ cneg).mean()), "masked_loss": loss})
    table = pd.DataFrame(rows)
    table["shift"] = table["cos_pos"] - float(table.loc[table["alpha"] == 0.0, "cos_pos"].iloc[0])
    if progress:
        progress(len(alphas), len(alphas), "done")
    return DoseResponse(table[list(ENCODER_COLUMNS)], "encoder", {"n_texts": len(texts), "scale": scale,
                                                                  "masked": masked_batch is not None})


def dose_response(bridge: Any, vector: SteeringVector | np.ndarray, contrasts: ContrastSet,
                  alphas: Sequence[float] = DEFAULT_ALPHAS, *, layers: Sequence[int] | None = None,
                  hook: str | None = None, scale: str = "absolute", concept_pos: Sequence[str] | None = None,
                  concept_neg: Sequence[str] | None = None, masked_batch: Any = None,
                  progress: Progress | None = None) -> DoseResponse:
    """LM or encoder dose-response on the held-out split of ``contrasts``."""
    test_pos, test_neg = contrasts.texts("test")
    if is_causal(bridge):
        return lm_dose_response(bridge, vector, test_pos + test_neg, alphas,
                                concept_pos=contrasts.concept_positive if concept_pos is None else concept_pos,
                                concept_neg=contrasts.concept_negative if concept_neg is None else concept_neg,
                                layers=layers, hook=hook, scale=scale, progress=progress)
    train_pos, train_neg = contrasts.texts("train")
    return encoder_dose_response(bridge, vector, test_neg, alphas, target_pos=train_pos, target_neg=train_neg,
                                 layers=layers, hook=hook, scale=scale, masked_batch=masked_batch, progress=progress)


def layer_sweep(bridge: Any, extraction: Any, contrasts: ContrastSet, *, alpha: float = 4.0,
                method: str = "mean_diff", scale: str = "absolute", masked_batch: Any = None,
                progress: Progress | None = None) -> pd.DataFrame:
    """Steer with each extracted layer's own vector at ``alpha``: one row per layer with the
    extraction's separability (auc_test, rel_norm) and the effect at α (LM: delta_pos, kl, nll;
    encoder: shift, margin, masked_loss)."""
    check_alpha(alpha)
    hook = extraction.meta.get("hook", "resid_post")
    rows = []
    for i, layer in enumerate(extraction.layers):
        if progress:
            progress(i, len(extraction.layers), f"layer {layer}")
        vec = extraction.vector(layer, method)
        dr = dose_response(bridge, vec, contrasts, (alpha,), layers=(layer,), hook=hook, scale=scale,
                           masked_batch=masked_batch)
        at = dr.table.loc[dr.table["alpha"] == float(alpha)].iloc[0].to_dict()
        sep = extraction.table[(extraction.table["layer"] == layer) & (extraction.table["method"] == method)].iloc[0]
        rows.append({"layer": layer, "auc_test": float(sep["auc_test"]), "rel_norm": float(sep["rel_norm"]),
                     **{k: float(v) for k, v in at.items() if k != "alpha"}})
    if progress:
        progress(len(extraction.layers), len(extraction.layers), "done")
    return pd.DataFrame(rows)


@torch.no_grad()
def greedy_generate(bridge: Any, prompt: str, *, max_new_tokens: int = 24, max_tokens: int = 128) -> str:
    """Greedy continuation of ``prompt`` (no KV cache: every step reruns the whole prefix, so
    hooks act on every position, prompt included). Returns the new text only."""
    if not is_causal(bridge):
        raise ConfigError("generation needs a causal LM; an encoder has no next-token head")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 512:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer in 1..512")
    ids, mask = tokenize(bridge, [prompt if prompt else " "], max_tokens=max_tokens)
    ids = ids.to(model_device(bridge))
    limit = int(getattr(bridge.cfg, "n_ctx", 0) or 10**6)
    eos = getattr(bridge.tokenizer, "eos_token_id", None)
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        if ids.shape[1] >= limit:
            break
        logits = bridge(ids, return_type="logits")
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return bridge.tokenizer.decode(ids[0, start:].tolist(), skip_special_tokens=True)


def compare_generations(bridge: Any, vector: SteeringVector | np.ndarray, prompt: str, *, alpha: float,
                        layers: Sequence[int] | None = None, hook: str | None = None, scale: str = "absolute",
                        max_new_tokens: int = 24) -> dict[str, str]:
    """``{"unsteered": ..., "steered": ...}`` greedy continuations of ``prompt``."""
    check_alpha(alpha)
    plain = greedy_generate(bridge, prompt, max_new_tokens=max_new_tokens)
    with _apply(bridge, vector, alpha, layers, hook, scale):
        steered = greedy_generate(bridge, prompt, max_new_tokens=max_new_tokens)
    return {"unsteered": plain, "steered": steered}


def to_result(dr: DoseResponse):
    """The store's ``Result`` of a dose-response (table + meta with the kind)."""
    from analysis.store import Result

    return Result(table=dr.table, meta={**dr.meta, "kind": dr.kind})


def from_result(result) -> DoseResponse:
    meta = dict(result.meta)
    return DoseResponse(result.table, meta.pop("kind"), meta)
