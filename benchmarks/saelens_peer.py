"""SAELens peer: train / load SAEs with real sae-lens 6.x. Runs INSIDE ``.venv-saelens`` only.

Build the environment once with ``bash benchmarks/saelens_env.sh``. This file imports
``sae_lens`` and never ``lenslab`` modules (the two environments pin different TransformerLens
and transformers versions); ``benchmarks/sae.py`` drives it as a subprocess.

Modes (each prints one JSON object on stdout)::

    .venv-saelens/bin/python benchmarks/saelens_peer.py train --acts acts.npy \
        --architecture topk --d-sae 6144 --k 32 --n-tokens 409600 --eval-tokens 32768 \
        [--l1 5.0] [--lr 1.2e-3] [--batch 4096] [--seed 0] [--threads 2] [--save DIR]
    .venv-saelens/bin/python benchmarks/saelens_peer.py load DIR [--input x.npy --output out.npz]
    .venv-saelens/bin/python benchmarks/saelens_peer.py tiny tests/data/saelens_tiny [--transcoders-only]

``train``: ``acts.npy`` is float32 [tokens, d_in], already shuffled by the caller. The last
``--eval-tokens`` rows are held out; batches of ``--batch`` rows are read in order from the rest
(wrapping around) through SAETrainer's ``data_provider`` iterator. The timed region is
``SAETrainer.fit()`` alone (SAE construction, data loading and the optimiser set-up are
excluded); tokens/s = trained samples / that time, and also batch / the median step time
(each step timed between consecutive batch requests: robust to bursts of load from other
processes), and per CPU-second of the process (``time.process_time``, all threads). Every
step's L0 is logged too (``StepLog``: the growth of the trainer's own firing counter, read at
each batch request, between steps). ``--l1-warmup`` sets ``l1_warm_up_steps`` (the benchmark
passes LensLab's, 5% of the steps). Switched off, as in SAELens's runner defaults or because it is I/O and not
training: wandb logging (``log_to_wandb=False``), the evaluator (``None``), checkpoints
(``n_checkpoints=0``, ``save_final_checkpoint=False``), activation normalisation (``"none"``),
autocast (off unless ``--autocast``), ``torch.compile`` (off, the runner's default); tqdm is
silenced via ``TQDM_DISABLE``. Everything the trainer does per step stays: dead-feature
bookkeeping, grad-norm clipping, the LR and coefficient schedulers, the TopK AuxK loss (it
engages once a latent is dead for ``dead_feature_window`` = 1000 steps, SAELens's default).
SAE configs are SAELens's defaults apart from d_in, d_sae, k / l1_coefficient (e.g. TopK keeps
``rescale_acts_by_decoder_norm=True`` and ``decoder_init_norm=0.1``).
Held-out metrics use the trained SAE: L0 = mean number of non-zero features per token;
NMSE = sum ||x_hat - x||^2 / sum ||x||^2; FVU = sum ||x_hat - x||^2 / sum ||x - mean(x)||^2.
``--save DIR`` writes the SAE with ``save_inference_model`` (the format SAELens's runner writes
at the end: ``cfg.json`` + ``sae_weights.safetensors``) plus ``sparsity.safetensors``, then
reloads it with ``SAE.load_from_disk`` and reports the largest output difference.

``load``: ``SAE.load_from_disk(DIR)``; reports architecture, sizes and float64 checksums
(sum, sum of |.|) of every weight; with ``--input x.npy`` ([n, d_in] float32) also writes
``feature_acts`` [n, d_sae] and ``sae_out`` [n, d_in] (a transcoder's: [n, d_out]) (SAELens's
``encode`` / ``forward``) to ``--output`` (.npz) so the caller can compare them with its own SAE
(the report adds ``d_out`` and ``hook_name_out``, None for an SAE). An SAE whose cfg says
``reshape_activations="hook_z"`` gets the input as [n, n_heads, d_head] (``--d-head`` or
``metadata.d_head``), as SAELens applies it to a hook_z activation.

``tiny``: writes the committed compatibility fixture ``DIR/{standard,topk,topk_checkpoint,jumprelu,
batchtopk,matryoshka_batchtopk,gated}/`` (d_in 16 = 4 heads x 4, d_sae 32, k 4; trained 40 steps on
synthetic data so biases and decoder norms are non-trivial; ``standard`` and ``gated`` have
``reshape_activations="hook_z"``; ``topk_checkpoint`` is written by ``save_model`` with unfolded
decoder norms; batchtopk and matryoshka_batchtopk are saved, as SAELens saves them, as jumprelu
files; jumprelu: l0 0.05, initial threshold 0.05; matryoshka widths 8, 16, 32; gated: l1 2) and ``DIR/expected.json`` (inputs
[6, 16] and SAELens's ``encode`` / ``forward`` outputs on them, flattened to [6, d]); and the four
transcoder architectures ``DIR/{transcoder,skip_transcoder,jumprelu_transcoder,jumprelu_skip_transcoder}/``
(d_in = d_out = 32, d_sae 48, seeded random weights: SAELens has no transcoder trainer; written by
``save_model``) with their outputs on inputs [6, 32] under ``expected.json``'s ``transcoders``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sae_lens  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sae_lens import (  # noqa: E402
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402


class StepLog:
    """Wall-clock stamp and L0 of every SAETrainer step, read between steps (at each batch
    request), so nothing is added inside a step. L0 of a step = the growth of the trainer's own
    firing counter (``act_freq_scores``, which it updates every step for its dead-feature
    bookkeeping) / the batch size."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.l0: list[float] = []
        self.trainer: Any = None
        self._seen = (0.0, 0)

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())
        t = self.trainer
        if t is None or len(self.stamps) == 1:  # the first request: no step yet
            return
        total, n = float(t.act_freq_scores.sum()), int(t.n_frac_active_samples)
        last_total, last_n = self._seen
        # n <= last_n: the trainer reset its window (every feature_sampling_window steps) before
        # this request and dropped the last step's counts
        self.l0.append((total - last_total) / (n - last_n) if n > last_n else float("nan"))
        self._seen = (total, n)


def batches(train: torch.Tensor, batch_size: int, log: StepLog | None = None) -> Iterator[torch.Tensor]:
    """Endless in-order batches [batch_size, d_in] of ``train`` (wraps; drops the last partial).
    With ``log``, calls ``log.mark()`` at every request: one step per interval."""
    n_full = train.shape[0] // batch_size
    if n_full == 0:
        raise SystemExit(f"saelens_peer: {train.shape[0]} training rows < batch {batch_size}; "
                         "harvest more tokens or lower --batch")
    i = 0
    while True:
        if log is not None:
            log.mark()
        start = (i % n_full) * batch_size
        yield train[start:start + batch_size]
        i += 1


ARCHITECTURES = ["relu", "standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk", "gated"]


def build_sae(architecture: str, d_in: int, d_sae: int, k: float, l1: float, l1_warmup: int,
              hook_name: str, reshape: str = "none", model_name: str = "lenslab-benchmark", *,
              l0: float = 1.0, init_threshold: float = 0.01, bandwidth: float = 0.05,
              widths: list[int] | None = None) -> Any:
    """A SAELens training SAE with SAELens's defaults except the arguments given (``k``: topk,
    batchtopk, matryoshka; ``l1``: relu, gated; ``l0``, ``init_threshold``, ``bandwidth``:
    jumprelu; ``widths``: matryoshka prefix widths)."""
    meta = SAEMetadata(hook_name=hook_name, model_name=model_name)
    common = dict(d_in=d_in, d_sae=d_sae, metadata=meta, reshape_activations=reshape)
    if architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=int(k), **common))
    if architecture in ("relu", "standard"):
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1, l1_warm_up_steps=l1_warmup, **common))
    if architecture == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            l0_coefficient=l0, jumprelu_init_threshold=init_threshold, jumprelu_bandwidth=bandwidth, **common))
    if architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **common))
    if architecture == "matryoshka_batchtopk":
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            k=k, matryoshka_widths=list(widths or [d_sae // 4, d_sae]), **common))
    if architecture == "gated":
        return GatedTrainingSAE(GatedTrainingSAEConfig(l1_coefficient=l1, l1_warm_up_steps=l1_warmup, **common))
    raise SystemExit(f"saelens_peer: architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")


def train_sae(sae: Any, train: torch.Tensor, n_tokens: int, batch: int, lr: float,
              betas: tuple[float, float], autocast: bool) -> tuple[SAETrainer, float, list[float], float, list[float]]:
    """Run SAETrainer.fit over ``n_tokens`` samples; returns the trainer, the fit() seconds, the
    wall time of every step (between consecutive batch requests; the last step ends when fit()
    returns), the CPU seconds of fit() (all threads of this process) and the L0 of every step.

    Constant LR (the trainer's default scheduler); ``lr_end`` = lr / 10 as the runner's config sets it.
    """
    cfg = SAETrainerConfig(
        total_training_samples=n_tokens, train_batch_size_samples=batch, lr=lr, lr_end=lr / 10,
        adam_beta1=betas[0], adam_beta2=betas[1], device="cpu", autocast=autocast,
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    log = StepLog()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(train, batch, log), evaluator=None)
    log.trainer = trainer
    c0, t0 = time.process_time(), time.perf_counter()
    trainer.fit()
    t1, c1 = time.perf_counter(), time.process_time()
    log.mark()  # the last step's L0 (its stamp is not used: the last step ends at t1)
    ends = log.stamps[1:-1] + [t1]
    return trainer, t1 - t0, [b - a for a, b in zip(log.stamps, ends)], c1 - c0, log.l0


@torch.no_grad()
def evaluate(sae: Any, x: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Held-out L0, NMSE, FVU and dead fraction of ``sae`` on x [n, d_in] (float64 sums)."""
    sae.eval()
    se = sq = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = x.double().mean(0)
    var = 0.0
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        f = sae.encode(xb)
        x_hat = sae.decode(f)
        se += (x_hat.double() - xb.double()).pow(2).sum().item()
        sq += xb.double().pow(2).sum().item()
        var += (xb.double() - mean).pow(2).sum().item()
        nz = f != 0
        l0 += nz.sum().item()
        fired |= nz.any(0)
    n = x.shape[0]
    return {"l0": l0 / n, "nmse": se / sq, "fvu": se / var, "dead_fraction": 1.0 - fired.float().mean().item(),
            "eval_tokens": n}


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    acts = np.load(a.acts, mmap_mode="r")
    if acts.ndim != 2 or acts.dtype != np.float32:
        raise SystemExit(f"saelens_peer: {a.acts} must be float32 [tokens, d_in], got {acts.dtype} {acts.shape}")
    data = torch.from_numpy(np.ascontiguousarray(acts))  # read fully before timing
    if a.eval_tokens >= data.shape[0]:
        raise SystemExit(f"saelens_peer: --eval-tokens {a.eval_tokens} >= {data.shape[0]} rows")
    train, held_out = data[:-a.eval_tokens], data[-a.eval_tokens:]
    sae = build_sae(a.architecture, data.shape[1], a.d_sae, a.k, a.l1, a.l1_warmup, a.hook_name, l0=a.l0,
                    init_threshold=a.init_threshold, bandwidth=a.bandwidth,
                    widths=[int(w) for w in a.widths.split(",")] if a.widths else None)
    trainer, seconds, step_s, cpu_s, step_l0 = train_sae(sae, train, a.n_tokens, a.batch, a.lr, (a.beta1, a.beta2),
                                                         a.autocast)
    out = {
        "tool": "sae_lens", "sae_lens_version": sae_lens.__version__, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "architecture": a.architecture, "d_in": int(data.shape[1]),
        "d_sae": a.d_sae, "k": a.k if "topk" in a.architecture else None,
        "l1_coefficient": a.l1 if a.architecture in ("relu", "standard", "gated") else None,
        "l1_warmup_steps": a.l1_warmup if a.architecture in ("relu", "standard", "gated") else None,
        "l0_coefficient": a.l0 if a.architecture == "jumprelu" else None,
        "matryoshka_widths": a.widths if a.architecture == "matryoshka_batchtopk" else None, "lr": a.lr,
        "batch": a.batch,
        "n_tokens": trainer.n_training_samples, "steps": trainer.n_training_steps, "train_seconds": seconds,
        "tokens_per_s": trainer.n_training_samples / seconds, "step_seconds": step_s, "step_l0": step_l0,
        "median_step_s": float(np.median(step_s)), "cpu_seconds": cpu_s,
        "tokens_per_cpu_s": trainer.n_training_samples / cpu_s, "tokens_per_s_median_step": a.batch / float(np.median(step_s)),
        "autocast": a.autocast,
        "train_l0_last_window": float(trainer.feature_sparsity.sum()),
        **({} if a.skip_eval else evaluate(sae, held_out)),
    }
    if a.save:
        sae.save_inference_model(a.save)
        save_file({"sparsity": trainer.log_feature_sparsity}, str(Path(a.save) / "sparsity.safetensors"))
        loaded = SAE.load_from_disk(a.save)
        with torch.no_grad():
            xb = held_out[:512]
            out["reload_max_abs_diff"] = (loaded(xb) - sae(xb)).abs().max().item()
        out["saved_to"] = str(a.save)
    return out


def checksums(sae: Any) -> dict[str, dict[str, Any]]:
    """float64 sum and sum of |.| of every parameter, with its shape."""
    return {name: {"shape": list(p.shape), "sum": p.double().sum().item(), "abs_sum": p.double().abs().sum().item()}
            for name, p in sae.state_dict().items()}


def cmd_load(a: argparse.Namespace) -> dict[str, Any]:
    sae = SAE.load_from_disk(a.directory)
    reshape = sae.cfg.reshape_activations
    out: dict[str, Any] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                           "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": sae.cfg.dtype,
                           "hook_name": sae.cfg.metadata.hook_name, "reshape_activations": reshape,
                           "d_out": getattr(sae.cfg, "d_out", None), "hook_name_out": sae.cfg.metadata.hook_name_out,
                           "k": getattr(sae.cfg, "k", None), "checksums": checksums(sae)}
    if a.input:
        x = torch.from_numpy(np.load(a.input)).to(torch.float32)
        n = x.shape[0]
        if reshape == "hook_z":
            # SAELens's inference SAE then takes hook_z as the model emits it: [..., n_heads, d_head]
            d_head = a.d_head or sae.cfg.metadata.get("d_head")
            if not d_head:
                raise SystemExit("saelens_peer: reshape_activations='hook_z' needs --d-head (or metadata.d_head)")
            x = x.view(n, -1, int(d_head))
        with torch.no_grad():
            feats, recon = sae.encode(x), sae(x)
        np.savez(a.output, feature_acts=feats.reshape(n, -1).numpy(), sae_out=recon.reshape(n, -1).numpy())
        out["output"] = a.output
    return out


def cmd_tiny(a: argparse.Namespace) -> dict[str, Any]:
    """Write the committed fixture: tiny SAEs and transcoders saved by SAELens and its outputs on fixed
    inputs (``--transcoders-only``: the transcoders alone, updating ``expected.json``'s "transcoders")."""
    torch.set_num_threads(1)
    root = Path(a.directory)
    if a.transcoders_only:
        path = root / "expected.json"
        expected = json.loads(path.read_text()) if path.is_file() else {}
        expected["transcoders"] = tiny_transcoders(root)
        path.write_text(json.dumps(expected, indent=1) + "\n")
        return {"written": [str(p) for p in sorted(root.rglob("*transcoder*/*")) if p.is_file()]}
    n_heads, d_head, d_sae = 4, 4, 32
    d_in = n_heads * d_head
    gen = torch.Generator().manual_seed(0)
    # sparse-ish synthetic data: 64 ground-truth directions, ~3 active per row, plus an offset
    dirs = torch.randn(64, d_in, generator=gen)
    codes = torch.rand(4096, 64, generator=gen) * (torch.rand(4096, 64, generator=gen) < 0.05)
    data = (codes @ dirs + 0.3).float()
    x = torch.randn(6, d_in, generator=gen) + 0.3
    expected: dict[str, Any] = {"sae_lens_version": sae_lens.__version__, "input": x.tolist(),
                                "n_heads": n_heads, "d_head": d_head, "saes": {}}
    # name: (architecture, hook, reshape, writer). "topk_checkpoint" is the same TopK SAE written
    # with save_model (what SAETrainer checkpoints hold): rescale_acts_by_decoder_norm=true and
    # decoder rows NOT unit norm, so a loader must fold the norms to reproduce SAELens.
    specs = {"standard": ("relu", "blocks.0.attn.hook_z", "hook_z", "save_inference_model"),
             "topk": ("topk", "blocks.1.attn.hook_z", "none", "save_inference_model"),
             "topk_checkpoint": ("topk", "blocks.1.attn.hook_z", "none", "save_model"),
             # written as SAELens's runner writes them: batchtopk and matryoshka become "jumprelu" files
             "jumprelu": ("jumprelu", "blocks.0.attn.hook_z", "none", "save_inference_model"),
             "batchtopk": ("batchtopk", "blocks.1.attn.hook_z", "none", "save_inference_model"),
             "matryoshka_batchtopk": ("matryoshka_batchtopk", "blocks.1.attn.hook_z", "none", "save_inference_model"),
             "gated": ("gated", "blocks.0.attn.hook_z", "hook_z", "save_inference_model")}
    trained: dict[tuple[str, str], tuple[Any, Any]] = {}
    for name, (arch, hook, reshape, writer) in specs.items():
        if (arch, hook) not in trained:
            torch.manual_seed(1)
            sae = build_sae(arch, d_in, d_sae, k=4, l1=2.0, l1_warmup=0, hook_name=hook, reshape=reshape,
                            model_name="saelens-tiny-fixture", l0=0.05, init_threshold=0.05, bandwidth=0.05,
                            widths=[8, 16, d_sae])
            trainer = train_sae(sae, data, n_tokens=40 * 256, batch=256, lr=1e-2, betas=(0.9, 0.99),
                                autocast=False)[0]
            trained[arch, hook] = sae, trainer
        sae, trainer = trained[arch, hook]
        out_dir = root / name
        getattr(sae, writer)(out_dir)
        save_file({"sparsity": trainer.log_feature_sparsity}, str(out_dir / "sparsity.safetensors"))
        loaded = SAE.load_from_disk(out_dir)
        # an inference SAE with reshape "hook_z" takes [..., n_heads, d_head]; flatten its outputs back
        xin = x.view(-1, n_heads, d_head) if reshape == "hook_z" else x
        with torch.no_grad():
            feats = loaded.encode(xin)
            recon = loaded(xin).reshape(x.shape[0], d_in)
        expected["saes"][name] = {
            "architecture": loaded.cfg.architecture(), "class": type(loaded).__name__, "hook_name": hook,
            "writer": writer, "reshape_activations": reshape, "k": getattr(loaded.cfg, "k", None),
            "rescale_acts_by_decoder_norm": getattr(loaded.cfg, "rescale_acts_by_decoder_norm", None),
            "trained_as": arch, "feature_acts": feats.tolist(), "sae_out": recon.tolist(),
            "l0": (feats != 0).sum(-1).float().mean().item(),
            "w_dec_row_norms": loaded.W_dec.norm(dim=-1).tolist(),
            "checksums": checksums(loaded),
        }
    expected["transcoders"] = tiny_transcoders(root)
    (root / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return {"written": [str(p) for p in sorted(root.rglob("*")) if p.is_file()]}


TRANSCODER_CLASSES = {"transcoder": (Transcoder, TranscoderConfig),
                      "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
                      "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
                      "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)}


def tiny_transcoders(root: Path) -> dict[str, Any]:
    """The four SAELens transcoder architectures, d_in = d_out = 32 (the tiny Llama of the tests),
    d_sae 48, with seeded random weights (SAELens has no transcoder trainer): biases off zero,
    decoder rows off unit norm, a few latents firing per input; saved by ``save_model`` (the
    inference class's writer) into ``root/<architecture>/`` and reloaded with ``SAE.load_from_disk``
    for the expected outputs on fixed inputs [6, 32]."""
    d_in = d_out = 32
    d_sae = 48
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(6, d_in, generator=gen)
    out: dict[str, Any] = {"input": x.tolist(), "d_in": d_in, "d_out": d_out, "d_sae": d_sae, "saes": {}}
    for layer, (arch, (cls, cfg_cls)) in enumerate(TRANSCODER_CLASSES.items()):
        layer = layer % 2
        meta = SAEMetadata(hook_name=f"blocks.{layer}.mlp.hook_in", hook_name_out=f"blocks.{layer}.hook_mlp_out",
                           model_name="saelens-tiny-fixture")
        tc = cls(cfg_cls(d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False, metadata=meta))
        with torch.no_grad():
            tc.W_enc.copy_(0.3 * torch.randn(d_in, d_sae, generator=gen))
            tc.b_enc.copy_(0.3 * torch.randn(d_sae, generator=gen) - 0.6)  # about a third fire
            tc.W_dec.copy_(torch.randn(d_sae, d_out, generator=gen) * (0.1 + 0.3 * torch.rand(d_sae, 1, generator=gen)))
            tc.b_dec.copy_(0.5 * torch.randn(d_out, generator=gen))
            if hasattr(tc, "W_skip"):
                tc.W_skip.copy_(0.2 * torch.randn(d_out, d_in, generator=gen))
            if hasattr(tc, "threshold"):
                tc.threshold.copy_(0.5 * torch.rand(d_sae, generator=gen))
        out_dir = root / arch
        tc.save_model(out_dir)
        loaded = SAE.load_from_disk(out_dir)
        with torch.no_grad():
            feats, recon = loaded.encode(x), loaded(x)
        out["saes"][arch] = {
            "architecture": loaded.cfg.architecture(), "class": type(loaded).__name__, "writer": "save_model",
            "hook_name": loaded.cfg.metadata.hook_name, "hook_name_out": loaded.cfg.metadata.hook_name_out,
            "d_out": loaded.cfg.d_out, "feature_acts": feats.tolist(), "sae_out": recon.tolist(),
            "l0": (feats != 0).sum(-1).float().mean().item(), "checksums": checksums(loaded),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="saelens_peer.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("train", help="train with SAELens's SAETrainer and report tokens/s, L0, NMSE")
    t.add_argument("--acts", required=True, help="float32 .npy [tokens, d_in], shuffled")
    t.add_argument("--architecture", choices=ARCHITECTURES, default="topk")
    t.add_argument("--d-sae", type=int, required=True)
    t.add_argument("--k", type=float, default=32, help="topk: active features per token; batchtopk: on average")
    t.add_argument("--l1", type=float, default=5.0, help="relu/standard/gated: l1 coefficient")
    t.add_argument("--l1-warmup", type=int, default=0, help="relu/standard/gated: l1 warm-up steps")
    t.add_argument("--l0", type=float, default=1.0, help="jumprelu: l0 coefficient")
    t.add_argument("--init-threshold", type=float, default=0.01, help="jumprelu: initial threshold")
    t.add_argument("--bandwidth", type=float, default=0.05, help="jumprelu: STE kernel bandwidth")
    t.add_argument("--widths", default=None, help="matryoshka: comma-separated prefix widths ending at d_sae")
    t.add_argument("--lr", type=float, default=1.2e-3)
    t.add_argument("--beta1", type=float, default=0.9)
    t.add_argument("--beta2", type=float, default=0.99)
    t.add_argument("--batch", type=int, default=4096)
    t.add_argument("--n-tokens", type=int, required=True, help="training samples (a multiple of --batch)")
    t.add_argument("--eval-tokens", type=int, default=16384, help="held-out rows at the end of --acts")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--autocast", action="store_true", help="bf16 autocast (SAETrainerConfig.autocast)")
    t.add_argument("--hook-name", default="blocks.0.attn.hook_z")
    t.add_argument("--skip-eval", action="store_true", help="timing only: no held-out metrics")
    t.add_argument("--save", default=None, help="directory for save_inference_model + sparsity")
    ld = sub.add_parser("load", help="SAE.load_from_disk(DIR): checksums, optional outputs on --input")
    ld.add_argument("directory")
    ld.add_argument("--input", default=None, help="float32 .npy [n, d_in]")
    ld.add_argument("--output", default="saelens_outputs.npz")
    ld.add_argument("--d-head", type=int, default=None, help="for reshape_activations='hook_z' SAEs")
    ti = sub.add_parser("tiny", help="write the tiny SAELens fixture for tests")
    ti.add_argument("directory")
    ti.add_argument("--transcoders-only", action="store_true", help="write only the four transcoders (and their "
                                                                    "entry of expected.json)")
    a = p.parse_args(argv)
    fn = {"train": cmd_train, "load": cmd_load, "tiny": cmd_tiny}[a.mode]
    print(json.dumps(fn(a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
