"""SAE harvest and training on a ~1B-parameter decoder: ``nice -n 10 .venv/bin/python -m benchmarks.sae_1b``
(``make bench-sae-1b``; issue 13).

Everything is built offline and measured in this run, each stage in its own child process so its
peak memory is its own (``benchmarks.large_checkpoint.run_child``: the child's VmHWM, its
anonymous and file-backed peaks polled from ``/proc``, and the child's own ``ru_maxrss``):

1. write: a Llama-shaped decoder (default TinyLlama-1.1B widths: d_model 2048, 22 layers, 32 heads,
   4 KV heads, d_mlp 5632, vocab 32000, untied: ``n_params`` = 1,100,048,384 parameters) with random
   N(0, 0.02²) bf16 weights, streamed tensor by tensor into safetensors shards by
   ``benchmarks.large_checkpoint.write_checkpoint`` (one tensor in memory at a time), plus its
   config.json and a byte-level BPE tokenizer trained on the docstring corpus by LensLab's own
   tiny-LM tokenizer builder (``analysis.models.tiny_lm_data.train_tokenizer``), into a temp dir.
   The harvest texts are the first docstrings of ``sae_corpus("train")`` reaching
   ``--harvest-tokens`` real tokens (at most ``--max-length`` tokens each).
2. harvest (LensLab): ``analysis.sources.open_source(DIR)`` (+ its content fingerprint) and
   ``sae.harvest.boot_bridge(src, dtype)``: the loader ``lenslab sae train DIR`` goes through
   (``sae.requests.booted``), here with bf16 weights (``--model-dtype``; the CLI's run context boots
   float32 weights and runs bf16 autocast with ``--bf16``). Then ``sae.harvest.harvest`` at the middle
   layer's ``resid_post`` and ``hook_z`` (bf16 autocast, ``--harvest-dtype``), each after a 2-text
   warm-up. tokens/s counts real (non-pad) tokens over the whole call (tokenise, forward to the
   hook, write the memory-mapped cache).
3. peer: the plain Hugging Face forward, ``AutoModelForCausalLM.from_pretrained(DIR, dtype=bf16)``
   (default attention), full model with logits, a forward hook on ``model.layers[L]`` copying its
   output to float32, on the same packed batches (token ids read back from LensLab's cache, so the
   ids and batches are identical). The hook's firing time also gives the time to layer L (the work
   LensLab's resid_post harvest does). The hooked output of the first batch is compared with
   LensLab's resid_post rows.
4. train (LensLab): ``sae.train.train_sae`` on the resid_post cache, TopK, d_sae = 8 x d_model,
   bf16 compute, ``--train-steps`` steps of ``--batch`` (epochs over the harvested tokens when the
   steps ask for more). Before it allocates anything ``sae.memory.training_bytes`` predicts the
   peak growth; measured: VmHWM growth over the call (``/proc/self/clear_refs`` resets VmHWM after a
   small warm-up run) — printed side by side.

The table gives tokens/s with ratios against the HF full forward of this run, and every stage's peak
RSS / ``--limit-gib`` (24). Options: ``--layers 22`` ``--hidden 2048`` ``--intermediate 5632``
``--heads 32`` ``--kv-heads 4`` ``--vocab 32000`` ``--layer`` (default layers // 2)
``--harvest-tokens 8192`` ``--max-length 128`` ``--batch-tokens 8192`` ``--train-steps 40``
``--batch 4096`` ``--d-sae`` (default 8 x d_model) ``--k 32`` ``--threads 2`` ``--tmp-dir DIR``
``--keep`` ``--skip-hf`` ``--hf-attn default|sdpa|eager``. The temp dir (checkpoint, tokenizer, caches) is
deleted at the end, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.large_checkpoint import GIB, LlamaShape, _load, proc_status, run_child, write_checkpoint

MODULE = "benchmarks.sae_1b"
SITES = ("resid_post", "hook_z")


def log(msg: str) -> None:
    print(f"[sae-1b {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def n_params(shape: LlamaShape) -> int:
    """Parameters of an untied Llama decoder: embedding and lm_head V x d, per layer q, o (d x d),
    k, v (kv x d, kv = d / heads x kv_heads), gate, up, down (3 x d x d_mlp) and two RMSNorms (2 d),
    plus the final norm (d)."""
    d, f, v = shape.hidden, shape.intermediate, shape.vocab
    kv = d // shape.heads * shape.kv_heads
    return 2 * v * d + shape.layers * (2 * d * d + 2 * kv * d + 3 * d * f + 2 * d) + d


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _ticker(what: str, every_s: float = 20.0, tokens_per_unit: int = 1):
    """A ``Progress`` callback printing ``what: done/total (tokens/s)`` at most every ``every_s``
    (``done`` counts tokens, or units of ``tokens_per_unit`` tokens such as training steps)."""
    t0, last = time.perf_counter(), [0.0]

    def tick(done: int, total: int, label: str) -> None:
        now = time.perf_counter() - t0
        if now - last[0] >= every_s or done >= total:
            last[0] = now
            log(f"{what}: {done:,}/{total:,} ({done * tokens_per_unit / max(now, 1e-9):,.0f} tokens/s) {label}")
    return tick


# -- stage 1: the model directory ------------------------------------------------------------------------
def write_model(directory: Path, work: Path, shape: LlamaShape, *, harvest_tokens: int, max_length: int,
                tokenizer_vocab: int, texts: list[str] | None = None, seed: int = 0) -> dict:
    """The checkpoint, config and tokenizer in ``directory``; the harvest texts in ``work/texts.json``."""
    from transformers import PreTrainedTokenizerFast

    from analysis.models.tiny_lm_data import portable_tokenizer_config, train_tokenizer
    from sae.harvest import tokenize

    t0 = time.perf_counter()
    log(f"writing {shape.n_bytes() / 1e9:.2f} GB ({n_params(shape):,} parameters, {shape.dtype}) to {directory}")
    files = write_checkpoint(directory, shape, seed=seed, progress=lambda i, n, name: (
        log(f"write: {i}/{n} tensors ({name})") if i % 50 == 0 or i == n else None))
    write_s = time.perf_counter() - t0
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # analysis.models.tiny_lm_data.SPECIAL_TOKENS
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    if texts is None:
        from sae.harvest import sae_corpus

        log("building the docstring corpus and its tokenizer")
        texts = [d.text for d in sae_corpus("train")]
    tok = train_tokenizer(texts, min(tokenizer_vocab, shape.vocab))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=cfg["max_position_embeddings"])
    fast.save_pretrained(directory)
    portable_tokenizer_config(directory)
    chosen, total = [], 0
    for text, ids in zip(texts, tokenize(fast, texts, max_length)):
        chosen.append(text)
        total += len(ids)
        if total >= harvest_tokens:
            break
    (work / "texts.json").write_text(json.dumps(chosen))
    return {"seconds": time.perf_counter() - t0, "write_s": write_s, "bytes": sum(f.stat().st_size for f in files),
            "shards": len(files), "n_params": n_params(shape), "texts": len(chosen), "tokens": total,
            "tokenizer_vocab": tok.get_vocab_size(), "vm_hwm": proc_status()["VmHWM"], "ru_maxrss": _ru_maxrss()}


# -- stage 2: LensLab boot + harvest ----------------------------------------------------------------------
def harvest_stage(directory: Path, work: Path, *, layer: int, max_length: int, batch_tokens: int,
                  model_dtype: str, harvest_dtype: str, sites: tuple[str, ...] = SITES) -> dict:
    """Boot ``directory`` through LensLab's loader and harvest ``sites`` of ``layer`` (caches in ``work``)."""
    import torch

    from analysis.sources import open_source
    from sae.harvest import boot_bridge, harvest

    texts = json.loads((work / "texts.json").read_text())
    t0 = time.perf_counter()
    src = open_source(directory)
    _ = src.fingerprint  # what every store key needs: a read of every weight
    open_s = time.perf_counter() - t0
    log(f"opened and fingerprinted in {open_s:.1f} s; booting the TransformerBridge ({model_dtype} weights)")
    bridge = boot_bridge(src, getattr(torch, model_dtype))
    boot_s = time.perf_counter() - t0 - open_s
    boot = proc_status()
    log(f"booted in {boot_s:.1f} s, RSS {boot['VmRSS'] / GIB:.2f} GiB")
    out = {"open_s": open_s, "boot_s": boot_s, "boot_rss": boot["VmRSS"], "boot_hwm": boot["VmHWM"], "sites": {}}
    for site in sites:
        harvest(src, layer, texts[:2], max_tokens=max_length, batch_tokens=batch_tokens, dtype=harvest_dtype,
                cache_dir=work / "warmup", refresh=True, bridge=bridge, site=site)
        t0 = time.perf_counter()
        cache = harvest(src, layer, texts, max_tokens=max_length, batch_tokens=batch_tokens, dtype=harvest_dtype,
                        cache_dir=work / "activations", refresh=True, bridge=bridge, site=site,
                        progress=_ticker(f"LensLab harvest {site}"))
        seconds = time.perf_counter() - t0
        out["sites"][site] = {"hook": cache.hook_name, "tokens": cache.n_tokens, "seconds": seconds,
                              "loop_seconds": float(cache.meta["seconds"]), "d_in": cache.d_in,
                              "path": str(cache.path), "vm_hwm": proc_status()["VmHWM"]}
        log(f"harvested {cache.hook_name}: {cache.n_tokens:,} tokens in {seconds:.1f} s "
            f"({cache.n_tokens / seconds:,.0f} tokens/s)")
    shutil.rmtree(work / "warmup", ignore_errors=True)
    out.update(vm_hwm=proc_status()["VmHWM"], ru_maxrss=_ru_maxrss(), threads=torch.get_num_threads())
    return out


# -- stage 3: the plain Hugging Face forward -----------------------------------------------------------------
def hf_stage(directory: Path, work: Path, cache_path: str, *, layer: int, batch_tokens: int, model_dtype: str,
             attn: str = "default") -> dict:
    """HF forward (full model) with a hook on ``model.layers[layer]`` over the cache's own token ids."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae.harvest import open_activation_cache, pack_batches, pad_batch, pad_id_of

    cache = open_activation_cache(cache_path)
    token_ids, doc_ids = np.asarray(cache.token_ids), np.asarray(cache.doc_ids)
    lengths = np.bincount(doc_ids, minlength=len(cache.texts))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = [token_ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(lengths))]
    t0 = time.perf_counter()
    kw = {} if attn == "default" else {"attn_implementation": attn}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, model_dtype), **kw).eval()
    load_s = time.perf_counter() - t0
    log(f"HF model loaded in {load_s:.1f} s, RSS {proc_status()['VmRSS'] / GIB:.2f} GiB")
    pad = pad_id_of(AutoTokenizer.from_pretrained(directory))
    packed = pack_batches(lengths.tolist(), batch_tokens)
    state: dict = {}

    def hook(module, args, output) -> None:
        state["t_hook"] = time.perf_counter()
        state["h"] = (output[0] if isinstance(output, tuple) else output).float()

    handle = model.model.layers[layer].register_forward_hook(hook)
    full = to_hook = 0.0
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids[0][:8]]))  # warm-up
            for k, batch in enumerate(packed):
                input_ids, mask = pad_batch([ids[i] for i in batch], pad)
                t = time.perf_counter()
                model(input_ids=input_ids, attention_mask=mask)
                full += time.perf_counter() - t
                to_hook += state["t_hook"] - t
                if k == 0:
                    rows = np.concatenate([state["h"][j, :lengths[i]].numpy() for j, i in enumerate(batch)])
                    np.save(work / "hf_first.npy", rows)
                    (work / "hf_first.json").write_text(json.dumps([int(i) for i in batch]))
                if (k + 1) % max(1, len(packed) // 4) == 0:
                    log(f"HF forward: batch {k + 1}/{len(packed)}")
    finally:
        handle.remove()
    return {"tokens": int(lengths.sum()), "seconds": full, "to_hook_seconds": to_hook, "load_s": load_s,
            "batches": len(packed), "n_params": sum(p.numel() for p in model.parameters()),
            "attn": str(getattr(model.config, "_attn_implementation", "?")),
            "vm_hwm": proc_status()["VmHWM"], "ru_maxrss": _ru_maxrss()}


# -- stage 4: SAE training ---------------------------------------------------------------------------------------
def train_stage(cache_path: str, *, d_sae: int, k: int, batch: int, steps: int, dtype: str, seed: int = 0) -> dict:
    """TopK SAE on the cache; the memory estimate made before allocation vs the peak growth measured."""
    import gc

    import numpy as np

    from sae.config import SAEConfig
    from sae.harvest import open_activation_cache
    from sae.memory import training_bytes
    from sae.train import config_from_cache, train_sae

    cache = open_activation_cache(cache_path)
    cfg = config_from_cache(cache, d_sae=d_sae, site=cache.site, architecture="topk", k=k, batch_size=batch,
                            n_tokens=steps * batch, dtype=dtype, seed=seed)
    est = training_bytes(d_in=cfg.d_in, d_sae=cfg.d_sae, batch_size=cfg.batch_size, architecture=cfg.architecture,
                         dtype=cfg.dtype, n_tokens=cache.n_tokens)  # the trainer copies the cache in
    log(f"SAE d_in {cfg.d_in} x d_sae {cfg.d_sae}, TopK k={k}, {dtype}, {steps} steps of {batch}: predicted peak "
        f"growth {est.total / GIB:.2f} GiB ({', '.join(f'{n} {b / GIB:.2f}' for n, b in est.parts.items())})")
    warm = SAEConfig(d_in=cfg.d_in, d_sae=128, architecture="topk", k=8, aux_k=16, batch_size=64, n_tokens=128,
                     dtype=dtype)
    train_sae(np.random.default_rng(0).standard_normal((256, cfg.d_in), dtype=np.float32), warm)  # load kernels
    gc.collect()
    hwm_before = proc_status()["VmHWM"]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    before = proc_status()
    peaks = dict(before)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for key, v in proc_status().items():
                if key in ("RssAnon", "RssFile"):
                    peaks[key] = max(peaks[key], v)
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        res = train_sae(cache, cfg, progress=_ticker("SAE training steps", 15.0, batch), log_every=max(1, steps // 10))
    finally:
        stop.set()
        poller.join()
    after = proc_status()
    last = res.history.iloc[-1]
    return {"tokens": res.n_tokens, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s,
            "cpu_seconds": res.cpu_seconds, "steps": res.steps, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
            "harvested": cache.n_tokens, "l0": float(last["l0"]), "nmse": float(last["nmse"]),
            "predicted": est.total, "predicted_parts": est.parts, "reset": reset, "rss_before": before["VmRSS"],
            "growth": after["VmHWM"] - before["VmHWM"] if reset else after["VmHWM"] - before["VmRSS"],
            "anon_growth": max(peaks["RssAnon"], after["RssAnon"]) - before["RssAnon"],
            "file_growth": max(peaks["RssFile"], after["RssFile"]) - before["RssFile"],
            "vm_hwm": max(after["VmHWM"], hwm_before), "ru_maxrss": _ru_maxrss()}


# -- report --------------------------------------------------------------------------------------------------------
def agreement(work: Path, resid_cache: str) -> tuple[float, float, int] | None:
    """(max |LensLab resid_post - HF layer output|, max |HF|, tokens) on the first batch; None without an HF run."""
    import numpy as np

    ref_path = work / "hf_first.npy"
    if not ref_path.is_file():
        return None
    ref = np.load(ref_path)
    batch = json.loads((work / "hf_first.json").read_text())
    acts, docs = np.load(Path(resid_cache) / "acts.npy", mmap_mode="r"), np.load(Path(resid_cache) / "doc_ids.npy")
    ours = np.concatenate([np.asarray(acts[docs == i]) for i in batch])
    return float(np.abs(ours - ref).max()), float(np.abs(ref).max()), len(ref)


def _agreement_text(a: tuple[float, float, int] | None) -> str:
    if a is None:
        return "n/a (no HF run)"
    diff, scale, n = a
    return f"max abs diff {diff:.3g} = {diff / scale:.2%} of max abs {scale:.3g} ({n:,} tokens)"


def _g(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _mem(r: dict, limit: int) -> list[str]:
    """[peak RSS (anon / file), ru_maxrss, peak / limit] of one child."""
    return [f"{_g(r['peak_rss'])} (anon {_g(r['peak_anon'])}, file {_g(r['peak_file'])})", _g(r["ru_maxrss"]),
            f"{r['peak_rss'] / limit:.1%}"]


def report(shape: LlamaShape, layer: int, args, w: dict, h: dict, hf: dict | None, t: dict,
           agree: tuple[float, float, int] | None) -> str:
    """The markdown table of one run (each stage's dict as ``run_child`` returns it)."""
    limit = int(args.limit_gib * GIB)
    base = hf["tokens"] / hf["seconds"] if hf else None

    def ratio(tps: float) -> str:
        return f"{tps / base:.2f}x" if base else ""

    rows = [["write", f"checkpoint: {n_params(shape):,} parameters, {shape.dtype}, {w['shards']} shards + tokenizer "
             f"(BPE, vocab {w['tokenizer_vocab']})", f"{w['bytes'] / 1e9:.2f} GB", f"{w['seconds']:.0f}", "", "",
             *_mem(w, limit)],
            ["boot", f"LensLab open_source + fingerprint ({h['open_s']:.0f} s) + sae.harvest.boot_bridge, "
             f"{args.model_dtype}", f"RSS after boot {_g(h['boot_rss'])}", f"{h['open_s'] + h['boot_s']:.0f}", "", "",
             "", "", ""]]
    if hf:
        rows.append(["harvest", f"HF AutoModelForCausalLM forward, {args.model_dtype}, full model + logits, hook on "
                     f"layers[{layer}] (baseline; attention {hf['attn']})", f"{hf['tokens']:,}",
                     f"{hf['seconds']:.0f}", f"{base:,.0f}", "1.00x", *_mem(hf, limit)])
        tps = hf["tokens"] / hf["to_hook_seconds"]
        rows.append(["harvest", f"HF, the same forward up to the hook firing (layers 0-{layer})", f"{hf['tokens']:,}",
                     f"{hf['to_hook_seconds']:.0f}", f"{tps:,.0f}", ratio(tps), "", "", ""])
    for i, (site, s) in enumerate(h["sites"].items()):
        tps = s["tokens"] / s["seconds"]
        rows.append(["harvest", f"LensLab sae.harvest.harvest() {s['hook']}, {args.harvest_dtype} (tokenise + "
                     f"forward to the hook + write cache; d_in {s['d_in']})", f"{s['tokens']:,}", f"{s['seconds']:.0f}",
                     f"{tps:,.0f}", ratio(tps), *(_mem(h, limit) if i == 0 else ["", "", ""])])
    rows.append(["harvest", "agreement: LensLab resid_post vs HF hooked layer output, first batch",
                 _agreement_text(agree), "", "", "", "", "", ""])
    rows.append(["train", f"LensLab sae.train.train_sae TopK k={args.k}, d_in {t['d_in']} x d_sae {t['d_sae']}, "
                 f"{args.train_dtype}, {t['steps']} steps of {args.batch} ({t['tokens'] / t['harvested']:.1f} epochs "
                 f"of {t['harvested']:,} tokens); last-step L0 {t['l0']:.1f}, NMSE {t['nmse']:.3f}",
                 f"{t['tokens']:,}", f"{t['seconds']:.0f}", f"{t['tokens_per_s']:,.0f}", "", *_mem(t, limit)])
    rows.append(["train", "memory: sae.memory.training_bytes (before allocation) vs measured VmHWM growth over "
                 "train_sae", f"predicted {_g(t['predicted'])}, measured {_g(t['growth'])} (anon "
                 f"{_g(t['anon_growth'])}, file {_g(t['file_growth'])}): measured / predicted "
                 f"{t['growth'] / t['predicted']:.2f}", "", "", "", "", "", ""])
    peak = max(r["peak_rss"] for r in (w, h, hf, t) if r)
    verdict = "met" if peak <= limit else "NOT met"
    rows.append(["all", f"largest peak RSS of any stage <= {args.limit_gib:g} GiB", "", "", "", "", _g(peak), "",
                 f"{peak / limit:.1%}: {verdict}"])
    header = ["stage", "what", "tokens / result", "s", "tokens/s", "ratio vs HF full forward", "peak RSS (VmHWM)",
              "ru_maxrss", f"peak / {args.limit_gib:g} GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 22), ("hidden", 2048), ("intermediate", 5632), ("heads", 32), ("kv_heads", 4),
                          ("vocab", 32000)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--layer", type=int, default=None, help="layer to harvest (default: layers // 2)")
    p.add_argument("--harvest-tokens", type=int, default=8192, help="real tokens harvested per site")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward (LensLab's default)")
    p.add_argument("--tokenizer-vocab", type=int, default=4096)
    p.add_argument("--model-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--harvest-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--train-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4096, help="SAE training batch (tokens)")
    p.add_argument("--d-sae", type=int, default=None, help="default 8 x d_model")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every stage")
    p.add_argument("--limit-gib", type=float, default=24.0, help="the memory limit the peaks are compared with")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where the temp dir goes (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (checkpoint and caches)")
    p.add_argument("--skip-hf", action="store_true", help="no Hugging Face peer (no ratios)")
    p.add_argument("--hf-attn", default="default", choices=("default", "sdpa", "eager"),
                   help="attention of the HF peer (default: transformers' choice)")
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=3, metavar=("TOOL", "DIR", "WORK"), help=argparse.SUPPRESS)
    return p


def _child(args, shape: LlamaShape, layer: int) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    tool, directory, work = args.child[0], Path(args.child[1]), Path(args.child[2])
    if tool == "write":
        return write_model(directory, work, shape, harvest_tokens=args.harvest_tokens, max_length=args.max_length,
                           tokenizer_vocab=args.tokenizer_vocab)
    if tool == "harvest":
        return harvest_stage(directory, work, layer=layer, max_length=args.max_length, batch_tokens=args.batch_tokens,
                             model_dtype=args.model_dtype, harvest_dtype=args.harvest_dtype)
    if tool == "hf":
        return hf_stage(directory, work, args.cache, layer=layer, batch_tokens=args.batch_tokens,
                        model_dtype=args.model_dtype, attn=args.hf_attn)
    return train_stage(args.cache, d_sae=args.d_sae or 8 * shape.hidden, k=args.k, batch=args.batch,
                       steps=args.train_steps, dtype=args.train_dtype)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, vocab=args.vocab, dtype="BF16")
    layer = args.layer if args.layer is not None else shape.layers // 2
    if not 0 <= layer < shape.layers:
        raise SystemExit(f"--layer {layer} must be in [0, {shape.layers - 1}]")
    if args.child:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        print(json.dumps(_child(args, shape, layer), default=str), flush=True)
        return 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    root = Path(tempfile.mkdtemp(prefix="lenslab-sae1b-", dir=args.tmp_dir))
    directory = root / "llama"
    start, loads, walls = time.perf_counter(), {"start": _load()}, {}
    sampled: list[float] = []  # the 1-minute load average every 5 s while the stages run
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            sampled.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    try:
        def stage(tool: str, what: str, extra: tuple[str, ...] = ()) -> dict:
            log(f"stage {tool}: {what} (load average {_load()})")
            r = run_child(tool, directory, root, module=MODULE, extra=tuple(argv) + extra, echo_stderr=True)
            if "error" in r:
                raise SystemExit(f"stage {tool} failed: {r['error']}")
            loads[f"after {tool}"] = _load()
            walls[tool] = r["wall_s"]
            r["ru_maxrss"] = r.get("ru_maxrss", 0)
            return r

        w = stage("write", f"a {n_params(shape):,}-parameter Llama-shaped decoder, tokenizer and texts")
        h = stage("harvest", f"LensLab boot ({args.model_dtype}) + harvest of layer {layer}: {', '.join(SITES)}")
        cache = ("--cache", h["sites"]["resid_post"]["path"])
        hf = None if args.skip_hf else stage("hf", "plain Hugging Face forward on the same batches", cache)
        t = stage("train", "LensLab SAE training on the resid_post activations", cache)
        agree = agreement(root, h["sites"]["resid_post"]["path"])
        if hf and hf["n_params"] != n_params(shape):
            raise SystemExit(f"the HF model has {hf['n_params']:,} parameters, the formula says {n_params(shape):,}")
        print(report(shape, layer, args, w, h, hf, t, agree))
        print()
        print(f"- {dt.date.today().isoformat()}, {platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB RAM, {args.threads} torch "
              f"threads per stage; total {time.perf_counter() - start:.0f} s; load average (1/5/15 min) "
              + "; ".join(f"{k} {v}" for k, v in loads.items()) + "; wall time per stage (child process, imports "
              "and loading included): " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))
        if sampled:
            print(f"- 1-minute load average sampled every 5 s during the run: min {min(sampled):.2f}, median "
                  f"{sorted(sampled)[len(sampled) // 2]:.2f}, max {max(sampled):.2f} (this benchmark's own threads "
                  f"count: {args.threads} per stage)")
        print(f"- model: Llama-shaped, {shape.layers} layers, d_model {shape.hidden}, {shape.heads} heads "
              f"({shape.kv_heads} KV), d_mlp {shape.intermediate}, vocab {shape.vocab}, untied: {n_params(shape):,} "
              f"parameters (= sum(p.numel()) of the HF model{'' if hf else ', not checked: --skip-hf'}), random "
              f"N(0, 0.02^2) bf16 weights; harvest layer {layer}; {w['texts']} docstring texts, <= {args.max_length} "
              f"tokens each, packed into forwards of <= {args.batch_tokens} padded tokens")
        print("- peak RSS = the stage's child VmHWM (resident pages, memory-mapped checkpoint and cache pages "
              "included), anon / file = the largest anonymous / file-backed resident sizes polled every 0.2 s (a "
              "bf16 checkpoint loaded in bf16 stays memory-mapped: its pages become resident as a forward touches "
              "them, so a forward that stops at layer L maps about the layers up to L); "
              "ru_maxrss = the child's getrusage(RUSAGE_SELF) (Linux carries the parent's peak across exec: the "
              "parent here holds no model)")
        if hf:
            print(f"- attention: the HF peer ran {hf['attn']} attention (--hf-attn), LensLab's TransformerBridge runs "
                  "eager (TransformerLens forces it so that hooks see the attention patterns)")
        if not t["reset"]:
            print("- /proc/self/clear_refs was not writable: measured growth = VmHWM after - VmRSS before")
    finally:
        done.set()
        signal.signal(signal.SIGTERM, old)
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
