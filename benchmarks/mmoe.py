"""MMoE forward-cost benchmark: ``.venv/bin/python -m benchmarks.mmoe``.

Forward pass of one batch through, at each expert count N (same run, same input):

- ``linear``: ``nn.Linear(d, d)`` — the reference cost;
- ``CP``, ``TR``: the factorised MMoE layers (``probes.mmoe``), ranks chosen so their expert
  parameters match the linear layer (budget = linear + the gate, which every MoE here shares;
  TR expert-core ranks 4, 4);
- ``dense``: a soft MoE with the explicit weight tensor W (N, d + 1, d) (``DenseMMoE``), the
  cost the factorisation avoids.

Time: median of ``--repeats`` forwards after one warm-up, ``torch.no_grad``, ``--threads``
torch threads (default 1: steadier when the cores are shared). Peak: the largest amount of
memory the forward holds at once, from ``torch.profiler`` allocation events (allocations and
frees replayed in time order), output included, parameters excluded; params MB = the layer's
parameters (float32). Ratios are against the linear layer in the same run.

Options: ``--experts 64,128,256,512`` ``--d 384`` ``--batch 64`` ``--repeats 5`` ``--threads 1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from probes.mmoe import DenseMMoE, build_mmoe, gate_params, linear_params, rank_for_budget


def peak_forward_bytes(fn) -> int:
    """Peak bytes held during ``fn()`` (profiler allocation/free events replayed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        fn()
    points = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            points.append((e.time_range.start, delta))
    current = peak = 0
    for _, delta in sorted(points):
        current += delta
        peak = max(peak, current)
    return peak


def time_forward(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layers_for(n: int, d: int) -> dict[str, nn.Module]:
    budget = linear_params(d, d) + gate_params(d, n)
    out: dict[str, nn.Module] = {}
    for kind in ("cp", "tr"):
        out[kind.upper()] = build_mmoe(kind, d, d, n, rank_for_budget(kind, d, d, n, budget))
    out["dense"] = DenseMMoE(d, d, n)
    return out


def _rank(layer: nn.Module) -> str:
    if hasattr(layer, "rank"):
        return str(layer.rank)
    if hasattr(layer, "ranks"):
        return "x".join(map(str, layer.ranks))
    return "-"


def run(experts: list[int], d: int, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, d)
    linear = nn.Linear(d, d).eval()
    base_t = time_forward(lambda: linear(x), repeats)
    base_m = peak_forward_bytes(lambda: linear(x))
    rows = [{"layer": "linear", "experts": "-", "rank": "-", "params": linear_params(d, d), "time": base_t,
             "peak": base_m}]
    for n in experts:
        for name, layer in layers_for(n, d).items():
            layer.eval()
            t = time_forward(lambda layer=layer: layer(x), repeats)
            m = peak_forward_bytes(lambda layer=layer: layer(x))
            rows.append({"layer": name, "experts": n, "rank": _rank(layer),
                         "params": sum(p.numel() for p in layer.parameters()), "time": t, "peak": m})
            del layer
    for r in rows:
        r["time_x"] = r["time"] / base_t
        r["peak_x"] = r["peak"] / base_m
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["layer", "experts", "rank", "params", "params MB", "forward", "× linear", "peak MB", "× linear"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i > 0 else "---" for i in range(len(header)))
             + "|"]
    for r in rows:
        t = r["time"]
        lines.append("| " + " | ".join([
            r["layer"], str(r["experts"]), r["rank"], f"{r['params']:,}", f"{r['params'] * 4 / 1e6:.1f}",
            f"{t * 1e3:.2f} ms", f"{r['time_x']:.1f}", f"{r['peak'] / 1e6:.2f}", f"{r['peak_x']:.1f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mmoe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default="64,128,256,512", help="comma-separated expert counts")
    parser.add_argument("--d", type=int, default=384, help="input and output width (MiniLM: 384)")
    parser.add_argument("--batch", type=int, default=64, help="samples per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per layer (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    experts = [int(n) for n in args.experts.split(",") if n]
    start = time.perf_counter()
    rows = run(experts, args.d, args.batch, args.repeats)
    print(f"# MMoE forward cost: d_in = d_out = {args.d}, batch {args.batch}, float32, {args.threads} thread(s)\n")
    print(markdown(rows))
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    print(f"\n{dt.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, {cpu}, load average {load}; "
          f"median of {args.repeats}; total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
