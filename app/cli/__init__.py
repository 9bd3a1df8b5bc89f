"""The ``lenslab`` command line. Every command reads and writes the same store as the API and
the dashboard (``--store DIR`` or ``$LENSLAB_STORE``; default: the user's cache dir).

Exit codes (``app/cli/exit_codes.py``): 0 done; 1 unexpected error or a failed child process (its
code is passed on); 2 a typed LensLab error or a usage error, printed as one line
(``error: …``); 130 interrupted (Ctrl-C), with one line saying what was kept.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from analysis.errors import ConfigError
from app.cli.options import StoreOpt, TrustOpt, console, json_safe, run_with_progress
from app.cli.tables import print_table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LensLab: interpretability and weight-analysis workbench.")
from app.cli.store import store_app  # noqa: E402  (lenslab store ls|rm|check)
app.add_typer(store_app, name="store")
from app.cli.mmoe import register as _register_mmoe  # noqa: E402  (lenslab mmoe ..., lenslab experts)
_register_mmoe(app)
from app.cli.bilinear import bilinear_app  # noqa: E402  (lenslab bilinear train|decompose)
app.add_typer(bilinear_app, name="bilinear")
from app.cli.steer import steer_app  # noqa: E402  (lenslab steer extract|apply|sweep|orthogonalize)
app.add_typer(steer_app, name="steer")
from app.cli.sae import sae_app  # noqa: E402  (lenslab sae train|eval|features|ls)
app.add_typer(sae_app, name="sae")
from app.cli.circuits import circuits as _circuits  # noqa: E402  (lenslab circuits)
app.command("circuits")(_circuits)
experiment_app = typer.Typer(no_args_is_help=True, help="Reproducible experiments (results go to the store).")
app.add_typer(experiment_app, name="experiment")
ANALYSES = ("conditioning", "spectra")


@app.command()
def analyze(
    sources: Annotated[list[str], typer.Argument(help="minilm, a HF directory, a .safetensors file or shard index; "
                                                     "several, or a quoted glob ('runs/ckpt-*'), run as a batch.")],
    analysis: Annotated[str, typer.Option("--analysis", "-a", help="conditioning | spectra")] = "conditioning",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows (inf as \"inf\", NaN as null).")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Recompute even if stored.")] = False,
    store: StoreOpt = None,
    trust_pickle: TrustOpt = False,
    executor: Annotated[Optional[str], typer.Option("--executor", help="Batch runs on local processes (local, the "
                                                                       "default) or Ray tasks (ray).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Local processes, or CPUs of a local Ray "
                                                                     "(default: the usable CPUs).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="A running Ray cluster: auto, HOST:6379 "
                                                                             "or ray://HOST:10001 (default: start a "
                                                                             "local Ray).")] = None,
    by_tensor: Annotated[bool, typer.Option("--by-tensor", help="Also split each model's tensors across "
                                                                "workers.")] = False,
) -> None:
    """Run ANALYSIS over every weight matrix of SOURCE(S) and store the results (workers compute, this
    process writes the store)."""
    from app import api
    from app.cli.batch import analyze_batch, wants_batch

    if analysis not in ANALYSES:
        raise ConfigError(f"unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}")
    if wants_batch(sources, executor=executor, workers=workers, ray_address=ray_address, by_tensor=by_tensor):
        return analyze_batch(sources, analysis=analysis, as_json=as_json, refresh=refresh, store=store,
                             trust_pickle=trust_pickle, executor=executor, workers=workers, ray_address=ray_address,
                             by_tensor=by_tensor)
    source = sources[0]
    ws = run_with_progress(f"{analysis} of {source}", api.analyze, source, store=store, refresh=refresh,
                           trust_pickle=trust_pickle)
    table = ws.table
    if analysis == "conditioning":
        from analysis.weights.spectra import CONDITIONING_COLUMNS

        table = table[[c for c in CONDITIONING_COLUMNS + ["matrix", "status"] if c in table.columns]]
    if as_json:
        rows = [{k: json_safe(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{analysis} of {source}: {len(table)} matrices, {len(ws.skipped)} 1-D tensors skipped "
               f"(lowest kappa first; --json for every column)")
    out = Table()
    cols = ["matrix", "shape", "sigma_max", "sigma_min", "kappa", "stable_rank", "alpha", "status"]
    for c in cols:
        out.add_column(c, justify="left" if c in ("matrix", "shape", "status") else "right", overflow="fold")
    for row in table.sort_values("kappa").to_dict(orient="records"):
        out.add_row(*[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols])
    print_table(out)


@app.command()
def select(
    source: Annotated[str, typer.Argument(help="minilm, a HF directory, a .safetensors file or shard index.")],
    budget: Annotated[str, typer.Option("--budget", "-b", help="12 (tensors), 20% (of tensors) or 10%params "
                                                                "(of parameters).")] = "20%",
    ranker: Annotated[str, typer.Option("--ranker", help="lowest_kappa | highest_kappa | random | low_rank")]
    = "lowest_kappa",
    include: Annotated[Optional[str], typer.Option("--include", help="Keep tensors whose name matches "
                                                                     "this regex (re.search).")] = None,
    exclude: Annotated[Optional[str], typer.Option("--exclude", help="Drop tensors whose name matches "
                                                                     "this regex, e.g. embeddings.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random ranker.")] = 0,
    fmt: Annotated[str, typer.Option("--format", "-f", help="params | peft | axolotl")] = "params",
    as_regex: Annotated[bool, typer.Option("--regex", help="peft: one target_modules regex, not a list.")] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", help="peft: LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="peft: LoRA alpha.")] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="peft: LoRA dropout.")] = 0.0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here (default: stdout).")] = None,
    store: StoreOpt = None,
    trust_pickle: TrustOpt = False,
) -> None:
    """Pick the tensors of SOURCE to fine-tune (KappaTune: lowest condition number first) and
    export them as parameter names, a PEFT LoraConfig JSON or an axolotl YAML fragment."""
    from analysis.weights.export import FORMATS
    from analysis.weights.selection import RANKERS, Budget
    from app import api

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if ranker not in RANKERS:
        raise ConfigError(f"unknown ranker {ranker!r}; choose one of {', '.join(RANKERS)}")
    parsed = Budget.parse(budget)
    sel = run_with_progress(f"spectra of {source}", api.select, source, parsed, ranker=ranker, include=include,
                            exclude=exclude, seed=seed, store=store, trust_pickle=trust_pickle)
    text = api.export(sel, fmt, output, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      as_regex=as_regex)
    out = Table(title=sel.summary())
    for c in ("rank", "tensor", "shape", "kappa", "welore_fraction", "n_params"):
        out.add_column(c, justify="left" if c in ("tensor", "shape") else "right", overflow="fold")
    for row in sel.candidates[sel.candidates["selected"]].to_dict(orient="records"):
        out.add_row(str(row["rank"]), row["tensor"], row["shape"], f"{row['kappa']:.4g}",
                    f"{row['welore_fraction']:.3f}", f"{row['n_params']:,}")
    print_table(out, stderr=True)  # stdout carries the export
    if sel.excluded:
        console.print(f"excluded (non-finite weights): {', '.join(sel.excluded)}")
    if output is None:
        typer.echo(text, nl=False)
    else:
        console.print(f"wrote {fmt} selection to {output}")


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless you mean to share it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
    store: StoreOpt = None,
    allowed_root: Annotated[Optional[list[Path]], typer.Option(
        "--allowed-root", help="Directory the dashboard may open typed model paths in (repeatable; default: the "
                               "current dir, LensLab's models dir and the Hugging Face cache).")] = None,
) -> None:
    """Start the Streamlit dashboard on HOST:PORT (127.0.0.1 by default)."""
    _check_port(host, port)  # first: a busy port is reported at once
    from app import api
    from app.allowed_paths import ENV_VAR as ALLOWED_ROOT_VAR
    from app.cli.exit_codes import error

    env = dict(os.environ)
    env["LENSLAB_STORE"] = str(api.open_store(store).root)
    if allowed_root:
        env[ALLOWED_ROOT_VAR] = os.pathsep.join(str(p.expanduser().resolve()) for p in allowed_root)
    script = Path(__file__).resolve().parents[1] / "dashboard.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "viewer", "--client.showErrorDetails", "none"]
    console.print(f"dashboard on http://{host}:{port} (store {env['LENSLAB_STORE']})")
    rc = subprocess.call(cmd, env=env)  # Ctrl-C reaches streamlit too; call() then re-raises it here (exit 130)
    if rc != 0:
        error(f"streamlit exited with code {rc} (its messages are above); the store is unchanged")
        raise typer.Exit(rc)


def _check_port(host: str, port: int) -> None:
    """Raise ConfigError unless a server could listen on HOST:PORT now (checked before streamlit starts,
    which would otherwise fail later or pick another port)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port; give a number from 1 to 65535 (default 8501)")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc.strerror}); pass an address of this machine, "
                          "e.g. 127.0.0.1") from exc
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closing socket is no clash
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use; pass --port with a free port (e.g. "
                                  f"--port {port + 1}) or stop the server listening there") from exc
            if exc.errno == errno.EACCES:
                raise ConfigError(f"port {port} on {host} needs privileges ({exc.strerror}); pass --port with a "
                                  "port above 1023") from exc
            # anything else (e.g. an address family this host lacks): streamlit decides, its code is passed on


@experiment_app.command("kappatune")
def experiment_kappatune(
    source: Annotated[str, typer.Option("--source", help="Encoder to fine-tune: minilm or a HF directory.")] = "minilm",
    budget: Annotated[str, typer.Option("--budget", help="Tensors per selection arm: 20% of tensors, a count "
                                                         "like 7, or 10%params.")] = "20%",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds 0..N-1 per arm.")] = 3,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per arm and seed.")] = 100,
    arms: Annotated[Optional[str], typer.Option("--arms", help="Comma-separated subset of lowest_kappa, "
                                                               "highest_kappa, random, full, head_only.")] = None,
    per_class: Annotated[Optional[int], typer.Option("--per-class", help="Docstrings per task package "
                                                                         "(default 200).")] = None,
    include: Annotated[Optional[str], typer.Option("--include", help="Regex: only matching tensors are "
                                                                     "selection candidates, e.g. attention.")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast for training (metrics stay float32).")] = False,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (0: default); 1 is faster on a busy "
                                                           "machine.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-arm summary as JSON.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Recompute even if stored.")] = False,
    store: StoreOpt = None,
) -> None:
    """KappaTune forgetting experiment: fine-tune SOURCE on a docstring task with KappaTune (lowest κ),
    highest-κ, random and full selections at one budget; store and print held-out embedding drift."""
    from app import api

    settings: dict = {"autocast": bf16, "threads": threads}
    if arms is not None:
        settings["arms"] = tuple(a.strip() for a in arms.split(",") if a.strip())
    if per_class is not None:
        settings["per_class"] = per_class
    if include:
        settings["include"] = include
    res = run_with_progress(f"kappatune experiment on {source}", api.kappatune_experiment, source, budget=budget,
                            seeds=seeds, steps=steps, store=store, refresh=refresh, **settings)
    summary = res.summary
    if as_json:
        rows = [{k: json_safe(v) for k, v in row.items()} for row in summary.to_dict(orient="records")]
        typer.echo(json.dumps(rows, indent=1))
        return
    cfg = res.config
    out = Table(title=f"KappaTune forgetting on {source}: budget {cfg.get('budget')}, {cfg.get('seeds')} seed(s), "
                      f"{cfg.get('steps')} steps (mean ± std over seeds)")
    for c in ("arm", "tensors", "params", "accuracy", "drift 1−cos", "spearman"):
        out.add_column(c, justify="left" if c == "arm" else "right", no_wrap=c == "arm")

    def pm(row: dict, m: str, fmt: str) -> str:
        std = row[f"{m}_std"]
        return format(row[f"{m}_mean"], fmt) + ("" if math.isnan(std) else " ± " + format(std, fmt))

    for row in summary.to_dict(orient="records"):
        out.add_row(row["arm"], f"{row['n_tensors_mean']:.0f}", f"{row['n_params_mean']:,.0f}",
                    pm(row, "accuracy", ".3f"), pm(row, "drift", ".4f"), pm(row, "spearman", ".4f"))
    print_table(out)
    console.print("stored; see the Experiments page of `lenslab dashboard`")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command on ``argv`` (default ``sys.argv[1:]``) and exit
    with its code (``app/cli/exit_codes.py``: 0, 1, 2 for a typed error or usage error, 130 on Ctrl-C)."""
    from app.cli.exit_codes import run

    sys.exit(run(app, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
