"""The work behind the SAE pipeline's stored analyses (``sae.pipeline`` registers them) and its
prompt view: each job is a frozen params object (``store_params()`` is what goes into the store
key, byte for byte what LensLab always stored) plus what the run needs besides (activations,
texts, the trained SAE), and a ``compute(subject, job, ctx)``.

- "sae": ``TrainJob`` (``prepare_training``: boot, check the layer, harvest hook_z, build the
  config; then ``compute_sae`` trains) or ``ImportJob`` (weights read from a SAELens file);
- "sae-eval": ``EvalJob`` -> ``compute_eval`` (reconstruction metrics and loss recovered);
- "sae-features": ``FeaturesJob`` -> ``compute_features`` (feature dashboard data);
- ``prompt_view``: one prompt's feature activations and DFA by head (not stored).

Models come from the one model cache on the run's device (``sae.requests.booted``) and run with
hooks under ``ctx.lock``; the SAE trains, encodes and decodes on ``ctx.device``; stored numbers
come back to CPU. ``ctx.tick`` / ``ctx.sub`` report progress ("harvest: ...", "train: ...").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.detokenise import is_wordpiece
from analysis.errors import SourceError
from analysis.run import RunContext, Subject
from analysis.sources import Source
from analysis.store import Result
from sae import features as feat
from sae import harvest as hv
from sae import lm_loss
from sae import requests
from sae import store_io
from sae import train as trainer
from sae.attribution import PromptView
from sae.config import SAEConfig, TrainSettings
from sae.model import SAE, sae_on
from sae.results import TrainedSAE


# -- "sae": training and imports ---------------------------------------------------------------------
@dataclass(frozen=True, eq=False, kw_only=True)
class TrainJob:
    """A training run ready to start: the full config (its width from the harvested hook), the
    activations, the request, the entry's meta and the checkpoint file."""

    cfg: SAEConfig
    cache: Any  # sae.harvest.ActivationCache
    request: dict
    meta: dict
    checkpoint: Path
    resume: bool = True
    checkpoint_every: int = 500

    def store_params(self) -> dict:
        """The config plus the corpus (``sae.store_io.sae_params``)."""
        return store_io.sae_params(self.cfg, corpus=self.request["corpus"])

    def make(self, subject: Subject, ctx: RunContext) -> Result:
        result = trainer.train_sae(self.cache, self.cfg, progress=ctx.sub("train"), checkpoint=self.checkpoint,
                                   checkpoint_every=self.checkpoint_every, resume=self.resume,
                                   log_every=max(1, min(25, self.checkpoint_every)), device=ctx.device)
        return store_io.sae_to_result(result.sae, result, meta=self.meta)


@dataclass(frozen=True, eq=False, kw_only=True)
class ImportJob:
    """An SAE read from a SAELens directory, checked against the hook, to be stored as ``sae``."""

    sae: SAE
    tag: str  # sha256 of its weights (16 hex digits)
    request: dict
    meta: dict
    log10_density: np.ndarray | None = None

    def store_params(self) -> dict:
        return store_io.sae_params(self.sae.cfg, imported=self.tag, corpus=self.request["corpus"])

    def make(self, subject: Subject, ctx: RunContext) -> Result:
        return store_io.sae_to_result(self.sae, meta=self.meta, log10_density=self.log10_density)


def compute_sae(subject: Subject, job: TrainJob | ImportJob, ctx: RunContext) -> Result:
    """The "sae" entry of a training run or an import."""
    return job.make(subject, ctx)


def prepare_training(src: Source, settings: TrainSettings, request: dict, texts: Callable[[], list[str]],
                     ctx: RunContext, *, resume: bool = True) -> TrainJob:
    """Check the layer, the settings that need the hook's width (k below d_sae, matryoshka widths)
    and the memory estimate (before the model boots when config.json gives the layer count and the
    hook's width: ``sae.preflight``; else before harvesting), boot the model, check the layer,
    harvest the site's hook on the training texts (disk-cached) and build the full config: the
    store key holds the hook's width and the label the activation cache records, known only here."""
    from sae import preflight

    hook_z = settings.site == "hook_z"
    dims = preflight.config_dims(src.hf_dir)  # config.json, read without booting
    preflight.check_layer(dims, settings.site, int(settings.layer))
    width = preflight.site_width(dims, settings.site)
    if width is not None:
        preflight.check_width(settings, width)
    requests.check_memory(settings, width)
    with ctx.lock:
        bridge = requests.booted(src, ctx)
        hv.check_layer(bridge, int(settings.layer), settings.site)  # an unknown layer fails before the corpus is built
        if width is None:  # no config.json saying it: the booted hook's width, before harvesting
            width = int(np.prod(hv.head_shape(bridge))) if hook_z else int(bridge.cfg.d_model)
            preflight.check_width(settings, width)
            requests.check_memory(settings, width)
        cache = hv.harvest(src, int(settings.layer), texts(), max_tokens=settings.max_tokens, dtype=settings.dtype,
                           bridge=bridge, progress=ctx.sub("harvest"), site=settings.site)
    cfg = trainer.config_from_cache(cache, d_sae=settings.d_sae, expansion=settings.width_expansion,
                                    **settings.sae_fields())
    meta = {"request": request, "source_spec": requests.spec_of(src), "source_label": src.label,
            "harvest": cache.meta}
    return TrainJob(cfg=cfg, cache=cache, request=request, meta=meta,
                    checkpoint=requests.checkpoint_path(src.fingerprint, request), resume=resume,
                    checkpoint_every=settings.checkpoint_every)


# -- "sae-eval" ---------------------------------------------------------------------------------------
def eval_params(sae_key: str, corpus: dict, loss: bool, loss_docs: int) -> dict:
    """Store params of an evaluation of the SAE ``sae_key``."""
    return {"sae": sae_key, "corpus": corpus, "loss": bool(loss), "loss_docs": int(loss_docs)}


@dataclass(frozen=True, eq=False, kw_only=True)
class EvalJob:
    """Evaluate ``trained`` on ``texts()`` (identified by ``corpus``); loss recovered on the first
    ``loss_docs`` texts when ``loss``; ``source`` reopens its model (default: the recorded spec)."""

    trained: TrainedSAE
    corpus: dict
    texts: Callable[[], list[str]]
    loss: bool = True
    loss_docs: int = 64
    source: Any = None

    def store_params(self) -> dict:
        return eval_params(self.trained.key, self.corpus, self.loss, self.loss_docs)


def _kl_fn(src: Source, bridge: Any, kind: str, layer: int, texts: list[str], max_tokens: int,
           ctx: RunContext, site: str = "hook_z") -> Callable[[Any], Any]:
    """The SAE's patch -> KL recovered (``sae.lm_kl``) on the same texts and positions as the loss."""
    from sae import lm_kl
    from sae.metrics import zero_patch

    batches = (lm_kl.causal_batches(bridge, layer, texts, max_tokens=max_tokens, site=site) if kind == "causal" else
               lm_kl.masked_batches(requests.mlm_booted(src, ctx), layer, texts, max_tokens=max_tokens, site=site))
    return lambda patch: lm_kl.kl_recovered(batches, patch, zero_patch)


def compute_eval(subject: Subject, job: EvalJob, ctx: RunContext) -> Result:
    """Reconstruction metrics on every held-out token and loss recovered (``sae.metrics``)."""
    from sae.metrics import evaluate

    trained, cfg = job.trained, job.trained.sae.cfg
    src = requests.reopen(trained.key, cfg, trained.meta, job.source)
    with ctx.lock:
        bridge = requests.booted(src, ctx)
        ctx.tick(0, 3, "harvesting held-out activations")
        text_list, max_tokens = job.texts(), job.corpus["max_tokens"]
        cache = hv.harvest(src, cfg.layer, text_list, max_tokens=max_tokens, bridge=bridge,
                           progress=ctx.sub("harvest"), site=cfg.site)
        loss_fn, loss_name, kl_fn = None, "", None
        if job.loss:
            ctx.tick(1, 3, "loss and KL divergence with the SAE spliced in")
            kind = lm_loss.model_kind(bridge)
            loss_fn = lm_loss.loss_fn_for(src, cfg.layer, text_list[:job.loss_docs], bridge=bridge,
                                          mlm=lambda s: requests.mlm_booted(s, ctx), max_tokens=max_tokens,
                                          site=cfg.site)
            loss_name = ("next-token cross-entropy" if kind == "causal"
                         else "masked-token cross-entropy (trained MLM head)")
            loss_name += f" on {min(job.loss_docs, len(text_list))} texts"
            kl_fn = _kl_fn(src, bridge, kind, cfg.layer, text_list[:job.loss_docs], max_tokens, ctx, cfg.site)
        ev = evaluate(sae_on(trained.sae, ctx.device), cache, loss_fn, kl_fn=kl_fn)
    ctx.tick(3, 3, "done")
    res = store_io.eval_to_result(ev, meta={"sae_key": trained.key, "corpus": job.corpus, "loss": loss_name})
    return Result(res.table, res.arrays, requests.canonical(dict(res.meta)))


# -- "sae-features" ------------------------------------------------------------------------------------
def features_params(sae_key: str, corpus: dict, settings: dict) -> dict:
    """Store params of the feature data of the SAE ``sae_key``."""
    return {"sae": sae_key, "corpus": corpus, "settings": settings}


@dataclass(frozen=True, eq=False, kw_only=True)
class FeaturesJob:
    """Feature data of ``trained`` over ``texts()`` with ``settings`` (all of ``sae.features.DEFAULTS``)."""

    trained: TrainedSAE
    corpus: dict
    texts: Callable[[], list[str]]
    settings: dict
    source: Any = None

    def store_params(self) -> dict:
        return features_params(self.trained.key, self.corpus, self.settings)


def decoder(tokenizer: Any) -> tuple[Callable[[Sequence[int]], list[str]], bool]:
    """(token ids -> texts, is WordPiece). WordPiece keeps its tokens (``##ing``); byte-level BPE
    decodes each id alone (``" the"``)."""
    if is_wordpiece(tokenizer):  # shown joined by analysis.detokenise, as the tokenizer decodes them
        return (lambda ids: list(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))), True
    return (lambda ids: [tokenizer.decode([int(i)]) for i in ids]), False


def compute_features(subject: Subject, job: FeaturesJob, ctx: RunContext) -> Result:
    """Feature dashboard data (``sae.features``), the memory estimate checked before the model boots."""
    from sae.memory import check_feature_data_memory
    from sae.readout import attention_output, unembedding

    trained, cfg, s = job.trained, job.trained.sae.cfg, job.settings
    check_feature_data_memory(cfg.d_sae, s)  # before the model boots
    src = requests.reopen(trained.key, cfg, trained.meta, job.source)
    with ctx.lock:
        bridge = requests.booted(src, ctx)
        cache = hv.harvest(src, cfg.layer, job.texts(), max_tokens=job.corpus["max_tokens"], bridge=bridge,
                           progress=ctx.sub("harvest"), site=cfg.site)
    try:
        W_U, note = unembedding(src)
        # hook_z goes through W_O; the other sites already live in the residual basis (one identity "head")
        W_O = (attention_output(src, cfg.layer, cfg.n_heads) if cfg.site == "hook_z"
               else torch.eye(cfg.d_in, dtype=torch.float32)[None])
    except SourceError as exc:
        W_O, W_U, note = None, None, f"no logit effects: {exc}"
    decode, wordpiece = decoder(bridge.tokenizer)
    fd = feat.feature_data(trained.sae, cache.acts, cache.token_ids, cache.doc_ids, cache.positions, W_O=W_O,
                           W_U=W_U, decode=decode, progress=ctx.sub("features"), device=ctx.device,
                           meta={"sae_key": trained.key, "layer": cfg.layer, "unembedding": note,
                                 "wordpiece": wordpiece, "source_label": src.label}, **s)
    return feat.to_result(fd)


# -- one prompt (not stored) ------------------------------------------------------------------------------
def prompt_view(trained: TrainedSAE, text: str, source: Any, ctx: RunContext) -> PromptView:
    """Run ``text`` through the SAE's model, encode its hook_z with the SAE: per-token feature
    activations and the DFA by head."""
    cfg = trained.sae.cfg
    src = requests.reopen(trained.key, cfg, trained.meta, source)
    ctx.tick(0, 2, f"booting {src.label}")
    max_tokens = int(trained.meta.get("request", {}).get("corpus", {}).get("max_tokens", 128))
    with ctx.lock:
        bridge = requests.booted(src, ctx)
        ids = hv.tokenize(bridge.tokenizer, [text], max_tokens)
        ctx.tick(1, 2, "running the prompt")
        (_, z), = list(hv.hook_z_batches(bridge, cfg.layer, ids, site=cfg.site))
    z = z[0, :len(ids[0])]
    with torch.no_grad():
        acts = sae_on(trained.sae, ctx.device).encode(z.to(ctx.device)).cpu().numpy()
    decode, _ = decoder(bridge.tokenizer)
    ctx.tick(2, 2, "done")
    heads = (cfg.n_heads, cfg.d_head) if cfg.n_heads is not None else (1, cfg.d_in)  # one "head" off hook_z
    return PromptView(trained.sae, decode(ids[0]), acts, z.numpy().reshape(len(ids[0]), *heads))
