"""Bilinear decomposition benchmark: ``.venv/bin/python -m benchmarks.bilinear``.

Decomposing every output direction of a bilinear layer (the d_out residual basis vectors: the
whole tensor's information) and a few directions (16), two ways, on random float64 layers:

- efficient: ``analysis.bilinear.decompose.interaction_matrices`` builds Q(u) = sym(Wᵀ diag(Pᵀu) V)
  directly, chunked over directions; the (d_out, d_in, d_in) tensor is never formed;
- naive: ``analysis.bilinear.decompose.naive_interaction_matrices`` materialises B (d_out, d_in, d_in)
  with einsum, then contracts it with the directions.

Both then run the same batched ``eigendecompose``. Each (size, directions, path) runs in a fresh
process (multiprocessing spawn), so "peak" is that process's peak RSS (``ru_maxrss``) above
its RSS after building the weights: the extra memory the path needs, read in the same run.
Times are wall-clock, best of ``--repeats`` inside the process. The table also reports the
largest eigenvalue difference between the two paths (they must agree to rounding).

Options: ``--sizes 64x128x64,256x1024x256`` (d_in x d_hidden x d_out) ``--few 16``
``--repeats 2`` ``--threads 1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

DEFAULT_SIZES = "64x128x64,64x256x64,256x1024x256,384x1536x384"


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _child(path: str, dims: tuple[int, int, int], n_dirs: int | None, repeats: int, threads: int, conn) -> None:
    import torch

    from analysis.bilinear import decompose as bl

    torch.set_num_threads(threads)
    d_in, d_hidden, d_out = dims
    gen = torch.Generator().manual_seed(0)
    layer = bl.BilinearWeights(torch.randn(d_hidden, d_in, generator=gen, dtype=torch.float64),
                               torch.randn(d_hidden, d_in, generator=gen, dtype=torch.float64),
                               torch.randn(d_out, d_hidden, generator=gen, dtype=torch.float64) / d_hidden**0.5)
    u = torch.eye(d_out, dtype=torch.float64) if n_dirs is None else \
        torch.randn(n_dirs, d_out, generator=gen, dtype=torch.float64)
    build = bl.interaction_matrices if path == "efficient" else bl.naive_interaction_matrices
    bl.eigendecompose(build(layer, u[:1]))  # warm-up (LAPACK, allocator)
    base = _rss_kb()
    best_build = best_total = float("inf")
    lam = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = build(layer, u)
        t1 = time.perf_counter()
        lam, _ = bl.eigendecompose(q)
        t2 = time.perf_counter()
        del q
        best_build, best_total = min(best_build, t1 - t0), min(best_total, t2 - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    conn.send({"build": best_build, "total": best_total, "peak_mb": max(0, peak - base) / 1024,
               "lam": lam.numpy()})
    conn.close()


def run_case(path: str, dims: tuple[int, int, int], n_dirs: int | None, repeats: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(path, dims, n_dirs, repeats, threads, child))
    proc.start()
    child.close()
    out = parent.recv()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"{path} {dims} failed with exit code {proc.exitcode}")
    return out


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def main(argv: list[str] | None = None) -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--few", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    for spec in args.sizes.split(","):
        dims = tuple(int(v) for v in spec.lower().split("x"))
        if len(dims) != 3:
            raise SystemExit(f"size {spec!r}: give d_in x d_hidden x d_out, e.g. 256x1024x256")
        tensor_mb = dims[2] * dims[0] ** 2 * 8 / 2**20
        for n_dirs in (None, args.few):
            label = f"all {dims[2]}" if n_dirs is None else f"{n_dirs}"
            res = {}
            for path in ("efficient", "naive"):
                print(f"[{spec} · {label} directions] {path} ...", file=sys.stderr, flush=True)
                res[path] = run_case(path, dims, n_dirs, args.repeats, args.threads)
            diff = float(np.abs(res["efficient"]["lam"] - res["naive"]["lam"]).max())
            scale = float(np.abs(res["naive"]["lam"]).max())
            for path in ("efficient", "naive"):
                r = res[path]
                rows.append([spec, label, path, _fmt_s(r["build"]), _fmt_s(r["total"]), f"{r['peak_mb']:.0f} MB",
                             f"{tensor_mb:.0f} MB" if path == "naive" else "-",
                             f"{diff / scale:.1e}" if path == "naive" else ""])
    head = ["layer d_in×d_hidden×d_out", "directions", "path", "build Q", "build + eigh", "peak RSS extra",
            "3-tensor size", "eigenvalues: max diff / max"]
    print(f"Bilinear decomposition benchmark, {dt.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, torch threads {args.threads}, load {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
          f", best of {args.repeats}, float64\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
