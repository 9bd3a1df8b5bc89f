"""Larger-than-memory benchmark: ``.venv/bin/python -m benchmarks.large_checkpoint`` (``make bench-large``).

1. Writes a Llama-shaped checkpoint of about ``--size-gb`` GB (default 6) offline: a Hugging Face
   directory (``config.json``, ``model-0000i-of-0000N.safetensors`` shards of at most
   ``--shard-gb``, ``model.safetensors.index.json``) with random weights from a fixed seed.
   Each tensor is generated, written and dropped before the next (the safetensors header is
   computed first from the shapes), so the writer never holds more than one tensor.
2. Runs LensLab's conditioning + spectra (``app.api.analyze`` into a fresh store, then
   ``app.api.conditioning`` from it) in a child process, then WeightWatcher 0.7.7 on the same
   directory (``WeightWatcher(model=DIR).analyze()``: it opens ``model*safetensors`` lazily
   with ``safe_open`` and orders layers by the shard index) in another child process.
3. Prints one markdown table: wall time and peak RSS of each child (its VmHWM: resident
   pages, memory-mapped file pages included; split into anonymous and file-backed peaks
   by polling ``/proc``) next to the goal
   peak RSS <= 3 x the largest tensor + 1 GiB, and the agreement of the two tools on the
   layers both analyse.

Options: ``--size-gb 6`` ``--dir DIR`` (default: a temp dir, deleted after; an existing
checkpoint written by this script with the same settings is reused) ``--keep`` ``--hidden 2048``
``--intermediate 5632`` ``--kv-heads 4`` ``--vocab 32000`` ``--dtype F32`` ``--shard-gb 2``
``--skip-ww`` ``--ww-timeout 3600`` ``--ill-conditioned`` (the embedding, the largest matrix, gets
kappa ~1e6, so it takes the float64 SVD fall-back instead of the Gram route: the worst case for
memory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1 << 30
EMBEDDING = "model.embed_tokens.weight"
ILL_DECADES = 6  # --ill-conditioned: the embedding's columns are scaled from 1 down to 10^-6
_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2)}


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """Sizes of a Llama-architecture checkpoint (defaults: TinyLlama-1.1B widths, GQA)."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    dtype: str = "F32"  # safetensors dtype name: F32 | BF16 | F16
    ill_conditioned: bool = False  # embedding columns scaled over ILL_DECADES decades (kappa ~1e6)

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][1]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in Hugging Face ``LlamaForCausalLM`` naming and order."""
        d, f, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, d))]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            out += [(f"{p}.input_layernorm.weight", (d,)),
                    (f"{p}.self_attn.q_proj.weight", (d, d)), (f"{p}.self_attn.k_proj.weight", (kv, d)),
                    (f"{p}.self_attn.v_proj.weight", (kv, d)), (f"{p}.self_attn.o_proj.weight", (d, d)),
                    (f"{p}.post_attention_layernorm.weight", (d,)),
                    (f"{p}.mlp.gate_proj.weight", (f, d)), (f"{p}.mlp.up_proj.weight", (f, d)),
                    (f"{p}.mlp.down_proj.weight", (d, f))]
        out += [("model.norm.weight", (d,)), ("lm_head.weight", (self.vocab, d))]
        return out

    def n_bytes(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors()) * self.itemsize

    def largest_tensor_bytes(self) -> int:
        return max(math.prod(s) for _, s in self.tensors()) * self.itemsize

    def config(self) -> dict:
        """A ``LlamaConfig``-compatible config.json."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "hidden_act": "silu", "tie_word_embeddings": False,
                "torch_dtype": _DTYPES[self.dtype][0]}

    @staticmethod
    def for_size(size_gb: float, **sizes) -> LlamaShape:
        """The shape with as many layers as fit in ``size_gb`` (1e9 bytes), at least one."""
        one = LlamaShape(layers=1, **sizes)
        zero = LlamaShape(layers=0, **sizes)
        per_layer = one.n_bytes() - zero.n_bytes()
        layers = max(1, int((size_gb * 1e9 - zero.n_bytes()) // per_layer))
        return LlamaShape(layers=layers, **sizes)


def _tensor(shape: tuple[int, ...], dtype: str, seed: int, decades: int = 0):
    """Random weights for one tensor: N(0, 0.02²) matrices (Llama's init), ones for norms;
    with ``decades``, column j is scaled by 10^(−decades·j/(cols−1)) (kappa ~10^decades)."""
    import torch

    tdtype = getattr(torch, _DTYPES[dtype][0])
    if len(shape) == 1:
        return torch.ones(shape, dtype=tdtype)
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 0.02
    if decades:
        t *= torch.logspace(0, -decades, shape[-1])
    return t.to(tdtype)


def _shard_plan(shape: LlamaShape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = math.prod(s) * shape.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    return shards


def write_checkpoint(directory: Path, shape: LlamaShape, *, shard_bytes: int = 2 * GIB, seed: int = 0,
                     progress=None) -> list[Path]:
    """Write ``shape`` as a sharded safetensors checkpoint into ``directory``; returns the shards.

    Safetensors layout per shard: 8-byte little-endian header length, JSON header (name ->
    dtype, shape, data_offsets), padded with spaces to 8 bytes, then the tensors' bytes in
    header order. One tensor is held in memory at a time. Writes into a temp directory and
    renames it, so an interrupted run leaves no half-written checkpoint behind.
    """
    import torch

    plan = _shard_plan(shape, shard_bytes)
    tmp = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, files, index = {}, [], 0
    for k, tensors in enumerate(plan):
        fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, s in tensors:
            nbytes = math.prod(s) * shape.itemsize
            header[name] = {"dtype": shape.dtype, "shape": list(s), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (tmp / fname).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, s in tensors:
                decades = ILL_DECADES if shape.ill_conditioned and name == EMBEDDING else 0
                t = _tensor(s, shape.dtype, seed * 100_003 + index, decades)
                f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
                index += 1
                del t
                if progress:
                    progress(index, len(shape.tensors()), name)
        files.append(directory / fname)
    total = sum(math.prod(s) for _, s in shape.tensors()) * shape.itemsize
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(shape.config(), indent=1))
    (tmp / "lenslab-bench.json").write_text(json.dumps({"shape": asdict(shape), "seed": seed,
                                                        "shard_bytes": shard_bytes}))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return files


def _checkpoint_matches(directory: Path, shape: LlamaShape, seed: int, shard_bytes: int) -> bool:
    try:
        stamp = json.loads((directory / "lenslab-bench.json").read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"shape": asdict(shape), "seed": seed, "shard_bytes": shard_bytes}


# -- children: each tool runs in its own process so its peak RSS is its own ------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory fields of ``/proc/PID/status`` in bytes (VmHWM = peak RSS of the process image;
    RssAnon / RssFile = its anonymous and file-backed resident pages now)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _child_lenslab(directory: str, out: str) -> dict:
    from app import api

    base = proc_status()["VmHWM"]
    with tempfile.TemporaryDirectory(prefix="lenslab-bench-store-") as store:
        t0 = time.perf_counter()
        ws = api.analyze(directory, store=store)
        t_analyze = time.perf_counter() - t0
        t0 = time.perf_counter()
        cond = api.conditioning(directory, store=store)
        t_cond = time.perf_counter() - t0
    ws.table.to_parquet(out)
    return {"seconds": t_analyze + t_cond, "analyze_s": t_analyze, "conditioning_s": t_cond,
            "matrices": len(ws.table), "ok": int((ws.table["status"] == "ok").sum()),
            "routes": ws.table["route"].value_counts().to_dict(), "conditioning_rows": len(cond),
            "largest": _largest_rows(ws.table),
            "baseline_rss": base, "vm_hwm": proc_status()["VmHWM"]}


def _largest_rows(table) -> list[dict]:
    """Name, route and kappa of every matrix of the largest size (embedding and lm_head)."""
    size = table["rows"] * table["cols"]
    return [{"matrix": r["matrix"], "route": r["route"], "kappa": float(r["kappa"])}
            for _, r in table[size == size.max()].iterrows()]


def _child_weightwatcher(directory: str, out: str) -> dict:
    import contextlib
    import io
    import logging

    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    base = proc_status()["VmHWM"]
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        df = weightwatcher.WeightWatcher(model=directory).analyze()
    seconds = time.perf_counter() - t0
    df.to_parquet(out)
    return {"seconds": seconds, "matrices": len(df), "baseline_rss": base, "vm_hwm": proc_status()["VmHWM"],
            "version": weightwatcher.__version__}


def run_child(tool: str, directory: Path, out: Path, timeout: float | None = None, *,
              module: str = "benchmarks.large_checkpoint", extra: tuple[str, ...] = (),
              echo_stderr: bool = False) -> dict:
    """Run one tool in a child process; its report plus its peak RSS.

    The child is ``python -m MODULE --child TOOL DIR OUT EXTRA...`` and prints its report as the
    last line of its stdout (JSON, with its own ``vm_hwm``). ``echo_stderr``: the child's stderr
    (its progress lines) goes to ours as it runs instead of being collected. Interrupting the
    parent (Ctrl-C, an exception) kills the child before it propagates.

    ``peak_rss``: the child's own VmHWM (``/proc/PID/status``, bytes), read by the child at its
    end (``ru_maxrss`` is not used: Linux carries the parent's peak across ``exec`` into it).
    ``peak_anon`` / ``peak_file``: the largest anonymous / file-backed (memory-mapped) resident
    sizes seen by polling every 0.2 s; a timed-out child reports the last polled VmHWM.
    """
    cmd = [sys.executable, "-m", module, "--child", tool, str(directory), str(out), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if echo_stderr else subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parent.parent)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    timed_out = False
    try:
        while proc.poll() is None:
            for k, v in proc_status(proc.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                timed_out = True
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    base = {"peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"], "wall_s": wall}
    if timed_out:
        return {"error": f"stopped after {timeout:.0f} s", "peak_rss": peaks["VmHWM"], **base}
    if proc.returncode != 0:
        last = (stderr or "").strip().splitlines()[-1:] or [""]
        return {"error": f"exit {proc.returncode}: {last[0][:200]}", "peak_rss": peaks["VmHWM"], **base}
    report = json.loads(stdout.strip().splitlines()[-1])
    report.update(peak_rss=report["vm_hwm"], **base)
    return report


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _rss(r: dict) -> str:
    return f"{_gib(r['peak_rss'])} (anon {_gib(r['peak_anon'])}, mapped files {_gib(r['peak_file'])})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=6.0, help="checkpoint size in GB (1e9 bytes)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (reused if it "
                                                               "matches; default: a temp dir, deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint written into a temp dir")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="F32", choices=sorted(_DTYPES))
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest shard in GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ww", action="store_true", help="do not run WeightWatcher")
    parser.add_argument("--ill-conditioned", action="store_true",
                        help="make the embedding (the largest matrix) ill-conditioned (kappa ~1e6) so that it "
                             "takes the float64 SVD fall-back: the worst case for memory")
    parser.add_argument("--ww-timeout", type=float, default=3600.0, help="stop WeightWatcher after this many s")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tool, directory, out = args.child
        report = (_child_lenslab if tool == "lenslab" else _child_weightwatcher)(directory, out)
        print(json.dumps(report, default=str), flush=True)
        return 0

    shape = LlamaShape.for_size(args.size_gb, hidden=args.hidden, intermediate=args.intermediate,
                                heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, dtype=args.dtype,
                                ill_conditioned=args.ill_conditioned)
    shard_bytes = int(args.shard_gb * GIB)
    owned = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="lenslab-large-")) if owned else args.dir.parent
    directory = root / "llama-random" if owned else args.dir
    start, load0 = time.perf_counter(), _load()
    try:
        if _checkpoint_matches(directory, shape, args.seed, shard_bytes):
            print(f"reusing {directory}", file=sys.stderr)
            t_write = math.nan
        else:
            print(f"writing {shape.n_bytes() / 1e9:.2f} GB ({shape.layers} layers) to {directory} ...",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            write_checkpoint(directory, shape, shard_bytes=shard_bytes, seed=args.seed)
            t_write = time.perf_counter() - t0
        shards = sorted(directory.glob("model-*.safetensors"))
        largest = shape.largest_tensor_bytes()
        goal = 3 * largest + GIB
        print("LensLab conditioning + spectra ...", file=sys.stderr, flush=True)
        ours = run_child("lenslab", directory, root / "lenslab.parquet")
        print(f"LensLab: {ours}", file=sys.stderr, flush=True)
        ww = None
        if not args.skip_ww:
            print("WeightWatcher ...", file=sys.stderr, flush=True)
            ww = run_child("weightwatcher", directory, root / "ww.parquet", timeout=args.ww_timeout)
            print(f"WeightWatcher: {ww}", file=sys.stderr, flush=True)
        print(markdown_report(shape, shards, t_write, largest, goal, ours, ww, root))
        print()
        print(f"- {dt.date.today().isoformat()}, {platform.machine()}, {len(os.sched_getaffinity(0))} usable "
              f"cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM; load "
              f"average {load0} at start, {_load()} at end; total {time.perf_counter() - start:.0f} s")
        print("- Peak RSS is the child's VmHWM (resident pages, file pages it has memory-mapped included); "
              "the checkpoint was in the page cache for both tools (written just before, or read by the previous "
              "tool), which the RSS of a process does not count.")
    finally:
        if owned and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif owned:
            print(f"kept {directory}", file=sys.stderr)
    return 0


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _matrices(ours: dict) -> str:
    """'N matrices (k by the SVD fall-back; largest: NAME ROUTE kappa K, ...)' or the error."""
    if "error" in ours:
        return f"{ours.get('matrices', '?')} matrices ({ours['error']})"
    big = ", ".join(f"{b['matrix']} {b['route']} kappa {b['kappa']:.2g}" for b in ours["largest"])
    return f"{ours['matrices']} matrices ({ours['routes'].get('svd', 0)} by the SVD fall-back; largest: {big})"


def markdown_report(shape: LlamaShape, shards: list[Path], t_write: float, largest: int, goal: int, ours: dict,
           ww: dict | None, root: Path) -> str:
    """The markdown table of one run."""
    size = sum(p.stat().st_size for p in shards)
    weights = "random" + (f", embedding ill-conditioned (columns scaled over {ILL_DECADES} decades)"
                          if shape.ill_conditioned else "")
    rows = [["checkpoint", f"Llama-shaped, {shape.layers} layers, d_model {shape.hidden}, d_mlp {shape.intermediate}, "
             f"vocab {shape.vocab}, {shape.dtype}, {weights}", f"{size / 1e9:.2f} GB in {len(shards)} shards; "
             f"largest tensor {largest / 2**20:.0f} MiB", "n/a" if t_write != t_write else f"{t_write:.0f} s (write)",
             "", ""]]
    verdict = ("met" if ours.get("peak_rss", math.inf) <= goal else "NOT met") if "error" not in ours else "n/a"
    rows.append(["LensLab", "api.analyze (fingerprint + spectra + store) + api.conditioning",
                 _matrices(ours),
                 f"{ours['wall_s']:.0f} s", _rss(ours),
                 f"goal <= 3 x largest + 1 GiB = {_gib(goal)}: {verdict}"])
    if ww is not None:
        note = f"{ww.get('matrices', '?')} layers" + (f" ({ww['error']})" if "error" in ww else "")
        ratio_t = ww["wall_s"] / ours["wall_s"]
        ratio_m = ww["peak_rss"] / ours["peak_rss"]
        rows.append(["WeightWatcher", "WeightWatcher(model=DIR).analyze(), defaults", note, f"{ww['wall_s']:.0f} s "
                     f"({ratio_t:.1f}x LensLab)", f"{_rss(ww)}; {ratio_m:.1f}x LensLab", ""])
        if "error" not in ww and "error" not in ours:
            import pandas as pd

            from benchmarks.weights import agreement

            a = agreement(pd.read_parquet(root / "lenslab.parquet"), pd.read_parquet(root / "ww.parquet"))
            rows.append(["agreement", f"{a.n_matched} layers both analyse", f"max abs d alpha {a.max_abs_alpha:.2e}",
                         "", "", f"max rel d stable rank {a.max_rel_stable_rank:.2e}, spectral norm "
                         f"{a.max_rel_spectral_norm:.2e}"])
    header = ["tool", "what", "result", "time", "peak RSS", "memory goal"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


if __name__ == "__main__":
    sys.exit(main())
