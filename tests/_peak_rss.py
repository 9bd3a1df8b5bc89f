"""Measure a LensLab call's peak memory in a separate process (used by memory tests):

    python tests/_peak_rss.py svd ROWS COLS DTYPE      # the SVD fall-back on an ill-conditioned matrix
    python tests/_peak_rss.py analyze DIR INFLIGHT_MIB # api.analyze (fingerprint + spectra + store)
    python tests/_peak_rss.py sae ARCH DTYPE D_IN D_SAE BATCH TOKENS STEPS
                                                       # sae.train.train_sae on random activations
                                                       # (a numpy array: copied in, as a cache is)
    python tests/_peak_rss.py steer N_PAIRS BATCH       # steering.collect on MiniLM, N short pairs

Imports and a warm-up call run first (so lazily loaded libraries are resident), then the peak
resident size is reset (``/proc/self/clear_refs`` = 5) and the call runs while a thread polls
``/proc/self/status`` every 2 ms. Prints one JSON object: ``growth`` (VmHWM after − VmHWM before:
peak resident growth, anonymous and file-backed pages), ``file_growth`` / ``anon_growth`` (the
largest RssFile / RssAnon seen minus their values before), plus what the call returned.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from benchmarks.large_checkpoint import proc_status as status  # noqa: E402  (/proc/self/status in bytes)


def measure(call) -> dict:
    """Run ``call()`` and return its result with the memory it grew by (see module docstring)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status()
    peaks = dict(before)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            now = status()
            for k in ("RssAnon", "RssFile"):
                peaks[k] = max(peaks[k], now[k])
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    try:
        result = call()
    finally:
        stop.set()
        poller.join()
    after = status()
    return {"result": result, "seconds": time.perf_counter() - t0, "growth": after["VmHWM"] - before["VmHWM"],
            "anon_growth": max(peaks["RssAnon"], after["RssAnon"]) - before["RssAnon"],
            "file_growth": max(peaks["RssFile"], after["RssFile"]) - before["RssFile"]}


def ill_conditioned(rows: int, cols: int, dtype: str):
    """Gaussian columns scaled over six decades: kappa far above the Gram route's 1e4 limit."""
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g)
    w *= torch.logspace(0, -6, cols)
    return w.to(getattr(torch, dtype))


def _sae(arch: str, dtype: str, d_in: str, d_sae: str, batch: str, tokens: str, steps: str) -> dict:
    """Train an SAE for STEPS steps on TOKENS random activations; report growth and the estimate."""
    import numpy as np
    import torch

    from sae.config import SAEConfig
    from sae.memory import training_bytes
    from sae.train import train_sae

    torch.set_num_threads(1)
    d_in, d_sae, batch, tokens, steps = map(int, (d_in, d_sae, batch, tokens, steps))
    acts = np.random.default_rng(0).standard_normal((tokens, d_in), dtype=np.float32)

    def cfg(width: int, bsz: int) -> SAEConfig:
        arch_kw = {"k": min(32, width)} if arch == "topk" else {}
        return SAEConfig(d_in=d_in, d_sae=width, architecture=arch, batch_size=bsz, n_tokens=bsz * steps,
                         dtype=dtype, resample_steps=(), **arch_kw)

    train_sae(acts[:256], cfg(64, 64))  # warm-up: imports, MKL's sparse and dense kernels
    report = measure(lambda: float(train_sae(acts, cfg(d_sae, batch), log_every=1).history["l0"].iloc[-1]))
    report["estimate"] = training_bytes(d_in=d_in, d_sae=d_sae, batch_size=batch, architecture=arch, dtype=dtype,
                                        n_tokens=tokens).total
    return report


def _steer(n_pairs: int, batch: int) -> dict:
    """``steering.collect`` of N short MiniLM pairs in batches of BATCH pairs (0: one forward)."""
    from analysis.steering import extract as steering
    from analysis.steering.contrasts import parse_contrasts
    from analysis.sources import open_source

    words = ["tensor", "array", "frame", "model", "value", "index", "shape", "file"]
    lines = [json.dumps({"positive": f"numpy returns an {words[i % 8]} number {i}",
                         "negative": f"torch returns a {words[(i + 3) % 8]} number {i}"}) for i in range(n_pairs)]
    cs = parse_contrasts("\n".join(lines))
    bridge = open_source("minilm").boot_bridge()
    bridge.eval()
    size = batch if batch > 0 else n_pairs
    warm = min(size, 64)
    steering.collect(bridge, parse_contrasts("\n".join(lines[:warm])), batch_size=warm)  # warm-up: same batch shape
    return measure(lambda: steering.collect(bridge, cs, batch_size=size).pos.shape)


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv[0] == "svd":
        from analysis.weights import singular_values as sv

        rows, cols, dtype = int(argv[1]), int(argv[2]), argv[3]
        sv.spectrum(ill_conditioned(64, 16, dtype))  # warm-up: both routes' LAPACK calls
        w = ill_conditioned(rows, cols, dtype)
        with sv.parallel(1):  # one BLAS thread, as weight_spectra runs every matrix
            report = measure(lambda: sv.spectrum(w)[1])
        report["matrix_bytes"] = w.numel() * w.element_size()
    elif argv[0] == "analyze":
        from analysis.weights import spectra
        from app import api

        directory, inflight = argv[1], int(argv[2]) << 20
        spectra.INFLIGHT_BYTES = inflight  # the only size-dependent bound of the pipeline, scaled to the test
        with tempfile.TemporaryDirectory() as store:
            from safetensors.torch import save_file

            warm = os.path.join(store, "warm.safetensors")
            save_file({"w": ill_conditioned(40, 8, "float32")}, warm)
            api.analyze(warm, store=os.path.join(store, "warm"))  # warm-up: imports, store, both routes
            report = measure(lambda: len(api.analyze(directory, store=os.path.join(store, "s")).table))
    elif argv[0] == "sae":
        report = _sae(*argv[1:])
    elif argv[0] == "steer":
        report = _steer(int(argv[1]), int(argv[2]))
    else:
        raise SystemExit(f"unknown scenario {argv[0]!r}; use svd, analyze, sae or steer")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
