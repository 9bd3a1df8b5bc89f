"""Inputs of a GLU / bilinear layer, for truncation curves, top tokens and the input explorer.

- digits model: the test split it was scored on (``analysis.models.bilinear_digits.digits_split`` with the seed
  and fraction of its training record), embedded: e = E x (+ b);
- LMs: the MLP's actual inputs on held-out text (the validation split of the docstring corpus
  the model was trained on, else the default corpus), captured by a forward hook on the block's
  ``post_attention_layernorm`` of the Hugging Face model: the RMSNorm'd residual the MLP reads
  (the forward passes run on the model's device, under the caller's lock while the hooks are
  attached; the captured inputs come back as CPU float64);
- tokens alone: ``token_inputs`` = γ ⊙ E_t / rms(E_t), what the MLP would read if a token's
  embedding reached it untouched (used to name eigenvectors by their top tokens).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from analysis.bilinear import loader
from analysis.bilinear.loader import GluRef
from analysis.errors import ConfigError, ShapeError, SourceError
from analysis.source_layout import from_pretrained_kwargs
from analysis.sources import Source


@dataclass(frozen=True, eq=False)
class LayerInputs:
    """Held-out inputs of the layer (float64) and what they stand for."""

    x: np.ndarray  # (N, d_in) the layer's inputs
    raw: np.ndarray | None = None  # (N, 64) digits pixels, or None
    labels: np.ndarray | None = None  # (N,) digit classes
    tokens: tuple[str, ...] = ()  # LM: the token at each position
    contexts: tuple[str, ...] = ()  # LM: the text up to and including that token (tail)


def digits_embedding(src: Source) -> tuple[np.ndarray, np.ndarray | None]:
    """E (d_model, 64) and its bias of the digits model (``embed.weight``)."""
    e = loader.tensor_or_none(src, "embed.weight")
    if e is None:
        raise ConfigError(f"{src.label}: no embed.weight; pixel images need the digits model's embedding")
    b = loader.tensor_or_none(src, "embed.bias")
    return e.numpy(), (b.numpy() if b is not None else None)


def digits_inputs(src: Source) -> LayerInputs:
    """The digits test split (the one the model was scored on) as layer inputs e = E x + b."""
    from analysis.models.bilinear_digits import DigitsConfig, digits_split

    cfg = loader.training_info(src).get("config", {})
    defaults = DigitsConfig()
    _, _, x_te, y_te = digits_split(cfg.get("test_fraction", defaults.test_fraction), cfg.get("seed", defaults.seed))
    emb, bias = digits_embedding(src)
    if emb.shape[1] != x_te.shape[1]:
        raise ShapeError(f"{src.label}: embed.weight is {emb.shape}, expected (d_model, {x_te.shape[1]}) for 8x8 digits")
    x = x_te.astype(np.float64) @ emb.T + (bias if bias is not None else 0.0)
    return LayerInputs(x, raw=x_te.astype(np.float64), labels=y_te)


def token_inputs(src: Source, ref: GluRef, *, device: str | torch.device | None = None) -> np.ndarray:
    """(vocab, d_model): γ ⊙ E_t / rms(E_t), the MLP input a token's embedding alone would give
    (ignores attention and earlier layers; rms uses config.json's ``rms_norm_eps``). float64,
    computed on ``device`` (default CPU), returned as a CPU array."""
    emb = loader.tensor_or_none(src, f"{loader.lm_prefix(ref)}embed_tokens.weight")
    if emb is None:
        raise ConfigError(f"{src.label}: no embed_tokens.weight; top tokens need the token embedding")
    dev = torch.device("cpu") if device is None else torch.device(device)
    emb = emb.to(dev)
    eps = float(loader.hf_config(src).get("rms_norm_eps", 1e-6))
    x = emb / torch.sqrt((emb**2).mean(-1, keepdim=True) + eps)
    if ref.norm is not None:
        x = x * src.tensor(ref.norm).to(device=dev, dtype=torch.float64)
    return x.cpu().numpy()


def _texts(src: Source, n_texts: int) -> list[str]:
    from analysis.corpus import DEFAULT_PACKAGES, docstring_corpus, split

    cfg = loader.training_info(src).get("config", {})
    items = docstring_corpus(tuple(cfg.get("packages") or DEFAULT_PACKAGES), per_package=cfg.get("per_package"),
                             seed=cfg.get("seed", 0))
    _, val = split(items, [1 - cfg.get("val_fraction", 0.1), cfg.get("val_fraction", 0.1)], seed=cfg.get("seed", 0),
                   by=lambda d: d.package)
    return [d.text for d in val[:n_texts]]


def load_hf_model(src: Source) -> torch.nn.Module:
    """The HF causal LM behind ``src`` (float32, eval mode, offline, no remote code)."""
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: layer inputs of an LM need its Hugging Face directory (config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = src.model_dir()  # transformers loads exactly the fingerprinted weights from here
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False,
                                                     **from_pretrained_kwargs(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{src.hf_dir}: transformers could not load this model ({exc})") from exc
    return model.eval()


def _submodule(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    try:
        return model.get_submodule(dotted)
    except AttributeError as exc:
        raise SourceError(f"module {dotted!r} not found in the loaded model; the checkpoint and its class disagree") from exc


@torch.no_grad()
def lm_inputs(src: Source, ref: GluRef, *, n_tokens: int = 256, texts: list[str] | None = None, ctx: int = 64,
              model: torch.nn.Module | None = None, with_outputs: bool = False,
              device: str | torch.device | None = None, lock: AbstractContextManager | None = None
              ) -> LayerInputs | tuple[LayerInputs, np.ndarray]:
    """MLP inputs of block ``ref.layer`` on held-out text (the validation split of the corpus the
    model was trained on, else the default docstring corpus): the RMSNorm output the MLP reads,
    (N, d_model) CPU float64.

    ``model``: the HF causal LM of ``src`` (default: loaded with ``load_hf_model`` onto ``device``,
    default CPU); the forward passes run on the model's device. ``lock`` is held while the hooks
    are attached (a model shared through the model cache). ``with_outputs`` also returns the MLP
    module's actual outputs (N, d_model) (dense MLPs only).
    """
    norm_path = ref.norm.removesuffix(".weight") if ref.norm else None
    mlp_path = ref.module if ref.family == "llama" else None
    if norm_path is None:
        raise SourceError(f"{src.label}: {ref.module} has no post_attention_layernorm; cannot locate the MLP input")
    if with_outputs and mlp_path is None:
        raise ConfigError("with_outputs needs a dense GLU MLP (not a mixture of experts)")
    if model is None:
        model = load_hf_model(src).to(torch.device("cpu") if device is None else torch.device(device))
    dev = next(model.parameters()).device
    tok = loader.tokenizer(src)
    texts = texts or _texts(src, max(8, n_tokens // 16))
    xs, outs, tokens, contexts = [], [], [], []
    captured: dict[str, torch.Tensor] = {}
    with lock if lock is not None else nullcontext():
        hooks = [_submodule(model, norm_path).register_forward_hook(
            lambda m, a, o: captured.__setitem__("x", o.detach()))]
        if with_outputs:
            hooks.append(_submodule(model, mlp_path).register_forward_hook(
                lambda m, a, o: captured.__setitem__("out", (o[0] if isinstance(o, tuple) else o).detach())))
        try:
            total = 0
            for text in texts:
                ids = [1, *tok.encode(text, add_special_tokens=False).ids][:ctx]
                model(input_ids=torch.tensor([ids], device=dev))
                take = min(len(ids), n_tokens - total)
                xs.append(captured["x"][0, :take].to(device="cpu", dtype=torch.float64))
                if with_outputs:
                    outs.append(captured["out"][0, :take].to(device="cpu", dtype=torch.float64))
                pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
                for j in range(take):
                    tokens.append(pieces[j])
                    contexts.append(tok.decode(ids[max(0, j - 11):j + 1], skip_special_tokens=False))
                total += take
                if total >= n_tokens:
                    break
        finally:
            for h in hooks:
                h.remove()
    inputs = LayerInputs(torch.cat(xs).numpy(), tokens=tuple(tokens), contexts=tuple(contexts))
    return (inputs, torch.cat(outs).numpy()) if with_outputs else inputs
