"""Train and evaluate a (skip) transcoder of one block: ``sae_transcoder(source, layer, ...)``.

Steps: settings checked (ConfigError before any model boots); the model from the one model cache;
both hooks checked on it (``blocks.L.mlp.hook_in`` and ``blocks.L.hook_mlp_out``, a layer the
model lacks lists the valid ones); the MLP input and output of every real token harvested in one
forward pass per batch that stops after the later hook (``harvest_pairs``); a transcoder
trained (``sae.transcoder``); NMSE against the MLP output on held-out texts, and loss recovered
with the MLP output replaced by the prediction (next-token loss for causal LMs, masked-token loss
with the trained MLM head for BERT encoders). Not stored: the result is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from analysis.errors import ConfigError, SourceError
from analysis.forward import forward_until
from sae.transcoder import Splice, Transcoder, TranscoderConfig, nmse, train_transcoder


def harvest_pairs(bridge: Any, layer: int, texts: Sequence[str], *, max_tokens: int = 128,
                  batch_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [tokens, d_in], y [tokens, d_out]) float32 on CPU: the MLP input and output of block
    ``layer`` at every real token of ``texts``, in text order, from one forward pass per batch that
    stops once both hooks have fired."""
    from sae.harvest import model_device, pack_batches, pad_batch, pad_id_of, tokenize
    from sae.sites import check_site

    names = [check_site(bridge, "mlp_in", layer), check_site(bridge, "mlp_out", layer)]
    ids = tokenize(bridge.tokenizer, [t for t in texts if t.strip()], max_tokens)
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


@dataclass(frozen=True, eq=False)
class TranscoderRun:
    """A trained transcoder with its held-out NMSE and loss recovered (NaN when not measured)."""

    transcoder: Transcoder
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(repr=False)
    source_label: str = ""

    @property
    def cfg(self) -> TranscoderConfig:
        return self.transcoder.cfg


def sae_transcoder(source: Any = "minilm", layer: int = 0, *, skip: bool = False, k: int = 32,
                   expansion: int | None = 8, d_sae: int | None = None, n_tokens: int = 200_000,
                   batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, texts: Sequence[str] | None = None,
                   eval_texts: Sequence[str] | None = None, per_package: int | None = None, max_tokens: int = 128,
                   loss: bool = True, loss_docs: int = 64, progress: Any = None, device: str = "auto",
                   trust_pickle: bool = False, architecture: str = "topk", l1_coefficient: float = 1.0,
                   l0_coefficient: float = 1.0, jumprelu_init_threshold: float = 0.01) -> TranscoderRun:
    """Train a transcoder (``architecture`` topk, relu or jumprelu with ``l1_coefficient`` /
    ``l0_coefficient``, ``sae.transcoder``; ``skip``: a skip transcoder) of block ``layer``'s MLP: MLP input ->
    MLP output. Text: the docstring corpus (train split for training, eval split for the metrics)
    or ``texts`` / ``eval_texts``. Returns the transcoder with held-out ``nmse`` and, with ``loss``,
    ``loss_clean`` / ``loss_spliced`` / ``loss_zero`` / ``loss_recovered`` (MLP output replaced by
    the prediction vs zero-ablated). Not stored."""
    from analysis import run as runner
    from analysis.sources import open_source
    from sae import lm_loss, requests
    from sae.sites import check_site

    if expansion is None and d_sae is None:
        raise ConfigError("give d_sae or expansion (d_sae = expansion x d_model)")
    if d_sae is None and (isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1):
        raise ConfigError(f"transcoder expansion={expansion!r}: must be an integer >= 1; pass e.g. expansion=8")
    arch = dict(architecture=architecture, l1_coefficient=l1_coefficient, l0_coefficient=l0_coefficient,
                jumprelu_init_threshold=jumprelu_init_threshold)
    TranscoderConfig(d_in=1, d_out=1, d_sae=d_sae or max(k, 1), k=k, skip=skip, layer=layer, lr=lr,
                     batch_size=batch_size, n_tokens=n_tokens, seed=seed, **arch)  # settings checked before the boot
    ctx = runner.context(progress=progress, device=device)
    src = open_source(source, trust_pickle=trust_pickle)
    train_build, _ = requests.corpus("train", texts, per_package, seed, 0.1)
    eval_build, _ = requests.corpus("eval", eval_texts if eval_texts is not None else texts, per_package, seed, 0.1)
    with ctx.lock:
        bridge = requests.booted(src, ctx)
        check_site(bridge, "mlp_in", layer)  # a layer the model lacks fails before harvesting
        ctx.tick(0, 4, "harvesting MLP inputs and outputs")
        x, y = harvest_pairs(bridge, layer, train_build(), max_tokens=max_tokens)
        cfg = TranscoderConfig(d_in=x.shape[1], d_out=y.shape[1], d_sae=d_sae or expansion * x.shape[1], k=k,
                               skip=skip, layer=layer, lr=lr, batch_size=batch_size, n_tokens=n_tokens, seed=seed,
                               **arch)
        ctx.tick(1, 4, f"training a {cfg.kind}")
        res = train_transcoder(x, y, cfg, progress=ctx.sub("train"))
        tc = res.transcoder
        ctx.tick(2, 4, "held-out NMSE and loss recovered")
        held = eval_build()
        xe, ye = harvest_pairs(bridge, layer, held, max_tokens=max_tokens)
        with torch.no_grad():
            metrics = {"nmse": nmse(ye, tc(xe)), "nmse_train": res.nmse_train,
                       "l0": float((tc.encode(xe) > 0).sum(-1).float().mean()), "n_tokens_eval": float(len(xe))}
        if loss:
            fn = lm_loss.loss_fn_for(src, layer, held[:loss_docs], bridge=bridge,
                                     mlm=lambda s: requests.mlm_booted(s, ctx), max_tokens=max_tokens,
                                     site="mlp_out")
            clean, spliced, zero = fn(None), fn(Splice(tc)), fn(lambda t: torch.zeros_like(t))
            denom = zero - clean
            metrics.update(loss_clean=clean, loss_spliced=spliced, loss_zero=zero,
                           loss_recovered=(zero - spliced) / denom if denom != 0 else float("nan"))
    ctx.tick(4, 4, "done")
    return TranscoderRun(tc, {k_: float(v) for k_, v in metrics.items()}, res.history, src.label)


__all__ = ["TranscoderRun", "harvest_pairs", "sae_transcoder"]
