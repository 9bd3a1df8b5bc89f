"""The work behind a stored transcoder of one block (``sae.transcoder_pipeline`` registers it).

``compute_transcoder(subject, job, ctx)``: the model from the one model cache; both hooks checked
on it (``blocks.L.mlp.hook_in`` and ``blocks.L.hook_mlp_out``, a layer the model lacks lists the
valid ones); the MLP input and output of every real token of the training texts harvested in one
forward pass per batch that stops after the later hook (``harvest_pairs``); a transcoder trained
(``sae.transcoder``); NMSE against the MLP output on held-out texts, and loss recovered with the
MLP output replaced by the prediction (next-token loss for causal LMs, masked-token loss with the
trained MLM head for BERT encoders).

Masked LMs (``masked_lm_source``: BERT-style encoders such as MiniLM) are scored by the
masked-token loss, at positions whose input token is ``[MASK]``. A transcoder trained on plain text
never sees those positions, so with ``job.mask_rate`` > 0 the training pairs are harvested from
text masked by the masked-token loss's own rule (``harvest_masked_pairs``:
``analysis.models.masked_lm.mask_tokens``, each real non-special token replaced by ``[MASK]`` with
probability ``mask_rate``, at least one per text, drawn with the training seed). On masked LMs the
held-out metrics add ``nmse_mask`` / ``nmse_other``: NMSE at the [MASK] / other positions of the
held-out texts masked at ``MASK_RATE`` with ``EVAL_MASK_SEED`` (the loss's own masking).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.errors import ConfigError, SourceError
from analysis.forward import forward_until
from analysis.run import RunContext, Subject
from analysis.store import Result
from sae.transcoder import Splice, Transcoder, TranscoderConfig, nmse, train_transcoder
from sae.transcoder_store import TranscoderRun, to_result

MASK_RATE = 0.15  # BERT's masking rate: the MLM objective's, and the masked-token loss's (sae.lm_loss, sae.lm_kl)
EVAL_MASK_SEED = 0  # the masked-token loss masks held-out text with seed 0
# config.json model types TransformerLens boots as masked LMs (BERT-style encoders)
MASKED_LM_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "albert")


def masked_lm_source(src: Any) -> bool:
    """Whether ``src`` is a masked LM (its config.json names a BERT-style model type or a
    ``*ForMaskedLM`` class), read without booting it; False for a source without config.json."""
    hf_dir = getattr(src, "hf_dir", None)
    path = Path(hf_dir) / "config.json" if hf_dir is not None else None
    if path is None or not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read it as JSON ({exc}); fix or replace the model's config.json") from exc
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") in MASKED_LM_TYPES or any(str(a).endswith("ForMaskedLM") for a in archs)


def _pairs_of_ids(bridge: Any, layer: int, ids: list[list[int]], batch_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [tokens, d_in], y [tokens, d_out]) float32 on CPU at every token of ``ids``, in order."""
    from sae.harvest import model_device, pack_batches, pad_batch, pad_id_of
    from sae.sites import check_site

    names = [check_site(bridge, "mlp_in", layer), check_site(bridge, "mlp_out", layer)]
    if not ids:
        raise ConfigError("the corpus is empty (no non-blank texts); pass texts")
    pad, dev = pad_id_of(bridge.tokenizer), model_device(bridge)
    xs: list[Any] = [None] * len(ids)
    ys: list[Any] = [None] * len(ids)
    for batch in pack_batches([len(x) for x in ids], batch_tokens):
        input_ids, mask = pad_batch([ids[i] for i in batch], pad)
        with torch.inference_mode():
            got = forward_until(bridge, input_ids.to(dev), mask.to(dev), names)
        missing = [n for n in names if n not in got]
        if missing:
            raise SourceError(f"{missing} did not fire during the forward pass; this model's MLP is not routed "
                              "through those hooks")
        for j, i in enumerate(batch):
            xs[i] = got[names[0]][j, :len(ids[i])].float().cpu()
            ys[i] = got[names[1]][j, :len(ids[i])].float().cpu()
    return torch.cat(xs), torch.cat(ys)


def harvest_pairs(bridge: Any, layer: int, texts: Sequence[str], *, max_tokens: int = 128,
                  batch_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [tokens, d_in], y [tokens, d_out]) float32 on CPU: the MLP input and output of block
    ``layer`` at every real token of ``texts``, in text order, from one forward pass per batch that
    stops once both hooks have fired."""
    from sae.harvest import tokenize

    return _pairs_of_ids(bridge, layer, tokenize(bridge.tokenizer, [t for t in texts if t.strip()], max_tokens),
                         batch_tokens)


@dataclass(frozen=True, eq=False)
class MaskedPairs:
    """MLP inputs and outputs of masked text: x [tokens, d_in], y [tokens, d_out], the token ids the
    model read (``[MASK]`` included) [tokens] int64, and which of them are masked [tokens] bool."""

    x: torch.Tensor
    y: torch.Tensor
    token_ids: torch.Tensor
    masked: torch.Tensor


def harvest_masked_pairs(bridge: Any, layer: int, texts: Sequence[str], *, mask_rate: float = MASK_RATE,
                         seed: int = 0, max_tokens: int = 128, batch_tokens: int = 8192) -> MaskedPairs:
    """``harvest_pairs`` of ``texts`` with each real non-special token replaced by ``[MASK]`` with
    probability ``mask_rate`` (at least one per text; ``analysis.models.masked_lm.mask_tokens``, the
    masked-token loss's rule, seeded by ``seed``). SourceError for a tokenizer without [MASK]."""
    from analysis.models.masked_lm import IGNORE, mask_tokens

    batch = mask_tokens(bridge.tokenizer, list(texts), mask_rate=mask_rate, seed=seed, max_tokens=max_tokens)
    real = batch.attention_mask.bool()
    ids = [row[keep].tolist() for row, keep in zip(batch.input_ids, real)]
    x, y = _pairs_of_ids(bridge, layer, ids, batch_tokens)
    return MaskedPairs(x, y, batch.input_ids[real], (batch.labels != IGNORE)[real])


@dataclass(frozen=True, eq=False, kw_only=True)
class TranscoderJob:
    """A transcoder request, checked: ``settings`` = the ``TranscoderConfig`` fields the caller fixed
    (every field but the widths, ``TranscoderConfig.to_dict()`` form), the width rule, the corpora
    (params identify them in the key; ``train_texts`` / ``eval_texts`` build them), the masking and
    the loss settings. ``store_params()`` is the store key's params."""

    settings: dict
    fields: dict  # TranscoderConfig keyword arguments other than d_in, d_out, d_sae
    expansion: int | None
    d_sae: int | None
    corpus: dict
    eval_corpus: dict
    train_texts: Callable[[], list[str]]
    eval_texts: Callable[[], list[str]]
    max_tokens: int = 128
    mask_rate: float = 0.0  # 0: plain text
    masked_lm: bool = False
    loss: bool = True
    loss_docs: int = 64
    source_spec: str | None = None

    def store_params(self) -> dict:
        width = {"d_sae": self.d_sae} if self.d_sae is not None else {"expansion": self.expansion}
        return {"layer": self.settings["layer"], "transcoder": self.settings, "width": width,
                "corpus": {**self.corpus, "max_tokens": self.max_tokens},
                "eval": {**self.eval_corpus, "loss": self.loss, "loss_docs": self.loss_docs if self.loss else None},
                "mask": {"rate": self.mask_rate} if self.mask_rate else None}


def _predict(tc: Transcoder, x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, float]:
    """(predictions [tokens, d_out], mean L0) in chunks, on CPU."""
    outs, active = [], 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            f = tc.encode(x[s:s + chunk])
            outs.append(tc.decode(f, x[s:s + chunk]))
            active += float((f > 0).sum())
    return torch.cat(outs), active / max(x.shape[0], 1)


def compute_transcoder(subject: Subject, job: TranscoderJob, ctx: RunContext) -> Result:
    """Harvest, train and evaluate the transcoder of ``job`` on the subject's model (module docstring)."""
    from sae import lm_loss, requests
    from sae.sites import check_site

    src, layer = subject.source, int(job.settings["layer"])
    with ctx.lock:
        bridge = requests.booted(src, ctx)
        check_site(bridge, "mlp_in", layer)  # a layer the model lacks fails before harvesting
        ctx.tick(0, 4, "harvesting MLP inputs and outputs" + (" of masked text" if job.mask_rate else ""))
        seed = int(job.fields.get("seed", 0))
        if job.mask_rate:
            pairs = harvest_masked_pairs(bridge, layer, job.train_texts(), mask_rate=job.mask_rate, seed=seed,
                                         max_tokens=job.max_tokens)
            x, y, masked_fraction = pairs.x, pairs.y, float(pairs.masked.float().mean())
        else:
            x, y = harvest_pairs(bridge, layer, job.train_texts(), max_tokens=job.max_tokens)
            masked_fraction = 0.0
        cfg = TranscoderConfig(d_in=x.shape[1], d_out=y.shape[1],
                               d_sae=job.d_sae or int(job.expansion) * x.shape[1], **job.fields)
        ctx.tick(1, 4, f"training a {cfg.kind}")
        start = time.perf_counter()
        res = train_transcoder(x, y, cfg, progress=ctx.sub("train"))
        seconds = time.perf_counter() - start
        tc = res.transcoder
        ctx.tick(2, 4, "held-out NMSE and loss recovered")
        held = job.eval_texts()
        xe, ye = harvest_pairs(bridge, layer, held, max_tokens=job.max_tokens)
        ye_hat, l0 = _predict(tc, xe)
        metrics = {"nmse": nmse(ye, ye_hat), "nmse_train": res.nmse_train, "l0": l0, "n_tokens_eval": float(len(xe))}
        if job.masked_lm:
            mp = harvest_masked_pairs(bridge, layer, held, mask_rate=MASK_RATE, seed=EVAL_MASK_SEED,
                                      max_tokens=job.max_tokens)
            mp_hat, _ = _predict(tc, mp.x)
            for name, where in (("nmse_mask", mp.masked), ("nmse_other", ~mp.masked)):
                metrics[name] = nmse(mp.y[where], mp_hat[where]) if int(where.sum()) > 1 else float("nan")
            metrics["n_masked_eval"] = float(mp.masked.sum())
        loss_name = ""
        if job.loss:
            docs = held[:job.loss_docs]
            fn = lm_loss.loss_fn_for(src, layer, docs, bridge=bridge, mlm=lambda s: requests.mlm_booted(s, ctx),
                                     max_tokens=job.max_tokens, site="mlp_out")
            clean, spliced, zero = fn(None), fn(Splice(tc)), fn(lambda t: torch.zeros_like(t))
            denom = zero - clean
            metrics.update(loss_clean=clean, loss_spliced=spliced, loss_zero=zero,
                           loss_recovered=(zero - spliced) / denom if denom != 0 else float("nan"))
            loss_name = ("masked-token cross-entropy (trained MLM head)" if job.masked_lm
                         else "next-token cross-entropy") + f" on {min(job.loss_docs, len(held))} texts"
    ctx.tick(4, 4, "done")
    meta = {"source_spec": job.source_spec, "source_label": src.label, "loss": loss_name,
            "harvest": {"n_tokens": int(x.shape[0]), "mask_rate": job.mask_rate, "masked_fraction": masked_fraction},
            "training": {"steps": cfg.steps, "seconds": seconds}}
    return to_result(tc, metrics, res.history, meta=meta)


__all__ = ["EVAL_MASK_SEED", "MASKED_LM_TYPES", "MASK_RATE", "MaskedPairs", "TranscoderJob", "TranscoderRun",
           "compute_transcoder", "harvest_masked_pairs", "harvest_pairs", "masked_lm_source"]
