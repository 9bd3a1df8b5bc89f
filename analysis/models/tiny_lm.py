"""Tiny models trained here, offline, reproducibly, and cached: LensLab's own test subjects.

- ``train_tiny_lm("bilinear-llama")``: a Hugging Face ``LlamaForCausalLM`` with
  ``hidden_act="linear"``, so every MLP is exactly down((gate·x) ⊙ (up·x)): a bilinear layer.
- ``train_tiny_lm("mixtral")``: a ``MixtralForCausalLM`` with real top-k routers
  (default 4 experts, top-2, SwiGLU experts, load-balancing loss).
- ``train_digits()``: the bilinear digits image model (``analysis.models.bilinear_digits.BilinearDigits``).

Both LMs are trained on the docstring corpus with their own byte-level BPE tokenizer
(``analysis.models.tiny_lm_data``), saved next to ``model.safetensors``: the directory boots
with ``TransformerBridge.boot_transformers(dir)`` offline.

Trained models are cached on disk (``analysis.models.trained_cache``: ``$LENSLAB_MODELS`` or
``<user cache>/lenslab/models/<kind>-<hash of the config>``, published atomically, reused after).
Training runs on ``device`` (default CPU; the device is not part of the cache key). Init, noise
and batches come from seeded CPU generators, so training is deterministic for a given seed on
one machine and device (one torch thread by default); the saved weights are CPU tensors.

Bundled source names registered here: ``bilinear-digits``, ``bilinear-lm``, ``tiny-mixtral``;
``open_source(name)`` trains on first use (progress on stderr) and reuses the cache after.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from analysis.errors import ConfigError
from analysis.models.tiny_lm_data import (PORTABLE_TOKENIZER_CLASS, SPECIAL_TOKENS,  # noqa: F401 (re-exported)
                                          corpus_texts, portable_tokenizer_config, token_stream, train_tokenizer)
from analysis.models.trained_cache import (INFO_FILE, MODELS_ENV, TRAIN_VERSION, TrainedModel,  # noqa: F401
                                           config_key, models_dir, publish, read_training_info, reuse, target_dir,
                                           tmp_dir, write_info)
from analysis.progress import Progress

LM_KINDS = ("bilinear-llama", "mixtral")


@dataclass(frozen=True, kw_only=True)
class TinyLMConfig:
    """Everything that determines a trained tiny LM (all of it goes into the cache key)."""

    kind: str = "bilinear-llama"
    vocab_size: int = 1024
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int | None = None  # MLP width (per expert for mixtral); None = 256 (bilinear-llama), 128 (mixtral)
    n_experts: int = 4  # mixtral only
    top_k: int = 2  # mixtral only
    router_aux_coef: float = 0.02  # mixtral only: weight of the load-balancing loss
    mlp_bias: bool = False  # bilinear-llama only: biases on gate/up/down
    ctx: int = 64
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50
    val_fraction: float = 0.1
    packages: tuple[str, ...] | None = None  # corpus packages; None = analysis.corpus.DEFAULT_PACKAGES
    per_package: int | None = None  # cap on corpus items per package (smaller, faster runs)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LM_KINDS:
            raise ConfigError(f"unknown tiny LM kind {self.kind!r}; choose one of {', '.join(LM_KINDS)}")
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 256 if self.kind == "bilinear-llama" else 128)
        ints = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp", "n_experts", "top_k",
                              "ctx", "batch_size", "steps")}
        if (bad := [k for k, v in ints.items() if int(v) < 1]):
            raise ConfigError(f"tiny LM config: {bad[0]}={ints[bad[0]]} must be >= 1")
        if self.vocab_size < 260:
            raise ConfigError(f"vocab_size={self.vocab_size} must be >= 260 (256 byte symbols + 4 special tokens)")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k={self.top_k} cannot exceed n_experts={self.n_experts}")
        if not 0 < self.val_fraction < 1 or self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ConfigError(f"tiny LM config: need 0 < val_fraction < 1, lr > 0, weight_decay >= 0, warmup >= 0; "
                              f"got {self.val_fraction}, {self.lr}, {self.weight_decay}, {self.warmup}")
        if self.packages is not None:
            object.__setattr__(self, "packages", tuple(self.packages))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packages"] = list(self.packages) if self.packages is not None else None
        return d


# -- digits --------------------------------------------------------------------------------
def train_digits(out_dir: str | os.PathLike | None = None, *, progress: Progress | None = None,
                 force: bool = False, device: str | torch.device | None = None, **overrides: Any) -> TrainedModel:
    """Train (or reuse) the bilinear digits model on ``device`` (default CPU); ``overrides`` are
    ``DigitsConfig`` fields.

    Writes ``model.safetensors`` and ``lenslab_training.json`` (config + test accuracy).
    """
    from safetensors.torch import save_file

    from analysis.models.bilinear_digits import BilinearDigits, DigitsConfig

    config = DigitsConfig(**overrides).to_dict()
    target = target_dir("bilinear-digits", config, out_dir)
    if not force and (hit := reuse("bilinear-digits", target, config, ())) is not None:
        return hit
    model = BilinearDigits(DigitsConfig(**config)).fit(progress=progress, device=device)
    metrics = {"test_accuracy": model.test_accuracy_, "train_loss": model.train_loss_, "seconds": model.seconds_}
    tmp = tmp_dir(target)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt", "lenslab": "bilinear-digits"})
        write_info(tmp, "bilinear-digits", config, metrics)
        final = publish(tmp, target, (), config, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainedModel("bilinear-digits", final, config, metrics)


# -- tiny LMs ------------------------------------------------------------------------------
def _hf_model(cfg: TinyLMConfig, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                  max_position_embeddings=max(128, cfg.ctx), tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if cfg.kind == "bilinear-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(hidden_act="linear", mlp_bias=cfg.mlp_bias, **common))
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                                            router_aux_loss_coef=cfg.router_aux_coef, **common))


def _lr(step: int, cfg: TinyLMConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _lm_loss(model, batch: torch.Tensor, cfg: TinyLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, training loss incl. the router's load-balancing term) of (b, ctx + 1) ids."""
    kwargs = {"output_router_logits": True} if cfg.kind == "mixtral" else {}
    out = model(input_ids=batch[:, :-1], **kwargs)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
    aux = getattr(out, "aux_loss", None)
    return ce, (ce + cfg.router_aux_coef * aux if aux is not None else ce)


@torch.no_grad()
def _val_loss(model, stream: torch.Tensor, cfg: TinyLMConfig, max_windows: int = 64) -> float:
    n = min(max_windows, (len(stream) - 1) // cfg.ctx)
    windows = torch.stack([stream[i * cfg.ctx:(i + 1) * cfg.ctx + 1] for i in range(n)])
    windows = windows.to(next(model.parameters()).device)
    losses = [_lm_loss(model, windows[i:i + cfg.batch_size], cfg)[0].item() * len(windows[i:i + cfg.batch_size])
              for i in range(0, n, cfg.batch_size)]
    return sum(losses) / n


def train_tiny_lm(kind: str = "bilinear-llama", out_dir: str | os.PathLike | None = None, *, seed: int = 0,
                  steps: int | None = None, progress: Progress | None = None, force: bool = False, threads: int = 1,
                  device: str | torch.device | None = None, **overrides: Any) -> TrainedModel:
    """Train (or reuse) a tiny causal LM of ``kind`` on the docstring corpus, on ``device`` (default CPU).

    ``overrides`` are ``TinyLMConfig`` fields (d_model, n_layers, vocab_size, ...). Without
    ``out_dir`` the model lands in the cache (see the module docstring); with it, there
    (reused when it holds the same config). Returns the directory and the losses
    (``train_loss``: smoothed final training cross-entropy, ``val_loss`` on held-out texts,
    ``uniform_loss`` = ln(vocab) for scale, nats per token).
    """
    cfg = TinyLMConfig(kind=kind, seed=seed, **({"steps": steps} if steps is not None else {}), **overrides)
    config = cfg.to_dict()
    needs = ("config.json", "tokenizer.json")
    target = target_dir(kind, config, out_dir)
    if not force and (hit := reuse(kind, target, config, needs)) is not None:
        portable_tokenizer_config(target)  # a model cached before the rewrite existed
        return hit
    dev = torch.device("cpu") if device is None else torch.device(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars: progress goes to the callback

    start = time.perf_counter()
    if progress:
        progress(0, cfg.steps, "building the docstring corpus")
    train_texts, val_texts = corpus_texts(cfg.packages, cfg.per_package, cfg.seed, cfg.val_fraction)
    tok = train_tokenizer(train_texts, cfg.vocab_size)
    train_ids, val_ids = token_stream(tok, train_texts), token_stream(tok, val_texts)
    if len(train_ids) <= cfg.ctx + 1 or len(val_ids) <= cfg.ctx + 1:
        raise ConfigError(f"corpus too small for ctx={cfg.ctx}: {len(train_ids)} training / {len(val_ids)} "
                          "validation tokens; lower ctx or use more text")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = _hf_model(cfg, tok.get_vocab_size()).to(dev)  # seeded init on the CPU, then moved
        gen = torch.Generator().manual_seed(cfg.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        offsets = torch.arange(cfg.ctx + 1)
        ema, curve = None, []
        model.train()
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg)
            starts = torch.randint(0, len(train_ids) - cfg.ctx - 1, (cfg.batch_size,), generator=gen)
            ce, loss = _lm_loss(model, train_ids[starts[:, None] + offsets].to(dev), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
            if step % 10 == 0 or step == cfg.steps - 1:
                curve.append([step + 1, round(ema, 5)])
                if progress:
                    progress(step + 1, cfg.steps, f"{kind} loss {ema:.3f}")
        model.eval()
        val = _val_loss(model, val_ids, cfg)
        model.to("cpu")  # saved from the CPU
    finally:
        torch.set_num_threads(old_threads)
    metrics = {"train_loss": ema, "val_loss": val, "uniform_loss": math.log(tok.get_vocab_size()),
               "seconds": time.perf_counter() - start, "train_tokens": int(len(train_ids)),
               "val_tokens": int(len(val_ids)), "tokens_seen": cfg.steps * cfg.batch_size * cfg.ctx,
               "n_params": sum(p.numel() for p in model.parameters()), "loss_curve": curve}
    tmp = tmp_dir(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", model_max_length=max(128, cfg.ctx)).save_pretrained(tmp)
        portable_tokenizer_config(tmp)
        write_info(tmp, kind, config, metrics)
        final = publish(tmp, target, needs, config, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainedModel(kind, final, config, metrics)


# -- bundled source names ------------------------------------------------------------------
def stderr_progress(description: str) -> Progress:
    """A progress callback printing ``description: done/total label`` to stderr (throttled)."""
    last = [0.0]

    def callback(done: int, total: int, label: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 2.0 or done >= total:
            last[0] = now
            print(f"{description}: {done}/{total} {label}", file=sys.stderr, flush=True)

    return callback


def _bundled_digits() -> Path:
    return train_digits(progress=stderr_progress("training bilinear-digits (first use, cached after)")).path


def _bundled_lm() -> Path:
    return train_tiny_lm("bilinear-llama",
                         progress=stderr_progress("training bilinear-lm (first use, cached after)")).path


def _bundled_mixtral() -> Path:
    return train_tiny_lm("mixtral", progress=stderr_progress("training tiny-mixtral (first use, cached after)")).path


# Located through analysis.sources.BUNDLED (which imports this module only when one is asked for).
BUNDLED_TRAINED = {"bilinear-digits": _bundled_digits, "bilinear-lm": _bundled_lm, "tiny-mixtral": _bundled_mixtral}
