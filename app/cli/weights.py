"""CLI of the weight analyses: ``lenslab analyze`` (spectra and conditioning, one source or a batch),
``lenslab select`` (KappaTune tensor selection and export) and ``lenslab experiment kappatune`` (the
forgetting experiment). Each command calls one ``app.api`` function of the same name
(``analyze`` / ``analyze_many``, ``select`` + ``export``, ``experiment_kappatune``); registered by
one line each in ``app/cli/__init__.py``.

    lenslab analyze minilm --analysis spectra --device auto
    lenslab select minilm --budget 20% --format peft -o lora.json
    lenslab experiment kappatune                    # parameter-matched, MiniLM and the tiny LM, 5 seeds
    lenslab experiment forgetting --seeds 3 --threads 1   # the first, tensor-budget design
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from analysis.device import resolve_device
from analysis.errors import ConfigError
from app.cli.options import DeviceOpt, RefreshOpt, StoreOpt, TrustOpt, console, json_rows, run_with_progress
from app.cli.tables import print_table

ANALYSES = ("conditioning", "spectra")
experiment_app = typer.Typer(no_args_is_help=True, help="Reproducible experiments (results go to the store).")


def analyze(
    sources: Annotated[list[str], typer.Argument(help="minilm, a HF directory, a .safetensors file or shard index; "
                                                     "several, or a quoted glob ('runs/ckpt-*'), run as a batch.")],
    analysis: Annotated[str, typer.Option("--analysis", "-a", help="conditioning | spectra")] = "conditioning",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows (inf as \"inf\", NaN as null).")] = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "auto",
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
    batch = wants_batch(sources, executor=executor, workers=workers, ray_address=ray_address, by_tensor=by_tensor)
    if batch and device.strip().lower() not in ("auto", "cpu"):
        raise ConfigError(f"--device {device} applies to one source analysed in this process; batch workers "
                          "compute on their CPUs: drop --device or analyse the sources one at a time")
    resolve_device(device)  # a bad --device fails before any progress line
    if batch:
        return analyze_batch(sources, analysis=analysis, as_json=as_json, refresh=refresh, store=store,
                             trust_pickle=trust_pickle, executor=executor, workers=workers, ray_address=ray_address,
                             by_tensor=by_tensor)
    source = sources[0]
    ws = run_with_progress(f"{analysis} of {source}", api.analyze, source, store=store, refresh=refresh,
                           trust_pickle=trust_pickle, device=device)
    table = ws.table
    if analysis == "conditioning":
        from analysis.weights.spectra import CONDITIONING_COLUMNS

        table = table[[c for c in CONDITIONING_COLUMNS + ["matrix", "status"] if c in table.columns]]
    if as_json:
        typer.echo(json.dumps(json_rows(table), indent=1))
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
    include_embeddings: Annotated[bool, typer.Option("--include-embeddings", help="Embedding tables are "
                                                     "candidates too (default: linear weights only, as PEFT).")] = False,
    include_heads: Annotated[bool, typer.Option("--include-heads", help="Output heads (lm_head, cls., "
                                                "classifier) are candidates too.")] = False,
    include_routers: Annotated[bool, typer.Option("--include-routers", help="MoE routers (mlp.gate) are "
                                                  "candidates too.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random ranker.")] = 0,
    fmt: Annotated[str, typer.Option("--format", "-f", help="params | peft | axolotl")] = "params",
    as_regex: Annotated[bool, typer.Option("--regex", help="peft: one target_modules regex, not a list.")] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", help="peft: LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="peft: LoRA alpha.")] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="peft: LoRA dropout.")] = 0.0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here (default: stdout).")] = None,
    store: StoreOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Pick the tensors of SOURCE to fine-tune (KappaTune: lowest condition number first) among its linear
    weight matrices (as PEFT's find_kappa_target_modules) and export them as parameter names, a PEFT
    LoraConfig JSON or an axolotl YAML fragment."""
    from analysis.weights.export import FORMATS
    from analysis.weights.selection import RANKERS, Budget
    from app import api

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if ranker not in RANKERS:
        raise ConfigError(f"unknown ranker {ranker!r}; choose one of {', '.join(RANKERS)}")
    parsed = Budget.parse(budget)
    resolve_device(device)
    sel = run_with_progress(f"spectra of {source}", api.select, source, parsed, ranker=ranker, include=include,
                            exclude=exclude, seed=seed, include_embeddings=include_embeddings,
                            include_heads=include_heads, include_routers=include_routers, store=store, trust_pickle=trust_pickle, device=device)
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


@experiment_app.command("forgetting")
def experiment_forgetting(
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
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """The first KappaTune forgetting experiment (encoder only, a tensor budget): fine-tune SOURCE on a
    docstring task with lowest-κ, highest-κ, random and full selections; store and print embedding drift."""
    from app import api

    resolve_device(device)
    settings: dict = {"autocast": bf16, "threads": threads}
    if arms is not None:
        settings["arms"] = tuple(a.strip() for a in arms.split(",") if a.strip())
    if per_class is not None:
        settings["per_class"] = per_class
    if include:
        settings["include"] = include
    res = run_with_progress(f"forgetting experiment on {source}", api.experiment_forgetting, source, budget=budget,
                            seeds=seeds, steps=steps, store=store, refresh=refresh, device=device, **settings)
    summary = res.summary
    if as_json:
        typer.echo(json.dumps(json_rows(summary), indent=1))
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


@experiment_app.command("kappatune")
def experiment_kappatune(
    sources: Annotated[Optional[list[str]], typer.Option("--source", help="Model(s) to fine-tune: an encoder "
                                                         "(minilm) or a causal LM (bilinear-lm); repeat for several "
                                                         "(default: both).")] = None,
    budget: Annotated[str, typer.Option("--budget", help="12.5%params (matched: every arm within ±5% of that "
                                                         "many trained parameters) or a tensor budget like 7 or "
                                                         "20% (unmatched).")] = "12.5%params",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds 0..N-1 per arm.")] = 5,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per arm and seed.")] = 100,
    arms: Annotated[Optional[str], typer.Option("--arms", help="Comma-separated subset of the arms "
                                                               "(default: all).")] = None,
    per_class: Annotated[Optional[int], typer.Option("--per-class", help="Encoder: docstrings per task "
                                                                         "package (default 200).")] = None,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="Encoder training under bf16 autocast "
                                                             "(default; metrics stay fp32).")] = True,
    executor: Annotated[str, typer.Option("--executor", help="Arms run on local processes (local) or Ray "
                                                             "tasks (ray).")] = "local",
    workers: Annotated[Optional[int], typer.Option("--workers", help="Local processes, or CPUs of a local Ray "
                                                                     "(default: the usable CPUs).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="A running Ray cluster.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write the Pareto plot (HTML) here; with "
                                                                "several sources, one file per model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print summaries and paired comparisons as JSON.")] = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """KappaTune, settled: lowest κ against highest κ, random, per-type, low-rank, LoRA, full and head-only
    arms at the same trained-parameter count, on an encoder (embedding drift) and a causal LM (perplexity);
    stores and prints mean [bootstrap 95% interval] per arm and lowest κ's paired differences."""
    from app import api

    if resolve_device(device).type != "cpu":
        raise ConfigError(f"--device {device}: the experiment's arms run in CPU worker processes; drop --device "
                          "(or use --device cpu)")
    settings: dict = {"device": device, "autocast": bf16, "executor": executor, "workers": workers, "ray_address": ray_address}
    if arms is not None:
        settings["arms"] = tuple(a.strip() for a in arms.split(",") if a.strip())
    if per_class is not None:
        settings["per_class"] = per_class
    from analysis.weights.forgetting_matched import DEFAULT_SOURCES, KappaTuneConfig

    KappaTuneConfig(budget=budget, seeds=seeds, steps=steps,  # bad settings fail before any work
                    **{k: v for k, v in settings.items() if k != "device"})
    out_json = []
    for source in sources or DEFAULT_SOURCES:
        res = run_with_progress(f"kappatune on {source}", api.experiment_kappatune, source, budget=budget,
                                seeds=seeds, steps=steps, store=store, refresh=refresh, **settings)
        if plot is not None:
            from app.experiment_charts import pareto_plot

            target = plot if len(sources or DEFAULT_SOURCES) == 1 else plot.with_name(f"{plot.stem}-{source}{plot.suffix}")
            pareto_plot(res.summary, res.runs, res.meta).write_html(str(target))
            console.print(f"wrote the Pareto plot of {source} to {target}")
        if as_json:
            out_json.append({"source": source, "summary": json_rows(res.summary), "paired": json_rows(res.paired)})
            continue
        print_kappatune(source, res)
    if as_json:
        typer.echo(json.dumps(out_json, indent=1))
    else:
        console.print("stored; see the Experiments page of `lenslab dashboard`")


def print_kappatune(source: str, res) -> None:
    """The per-arm table (mean [95% interval]) and the paired table of one model's result."""
    units = res.meta.get("units", {})
    cfg = res.config
    out = Table(title=f"KappaTune on {source}: budget {cfg.get('budget')} (target {res.meta.get('target', 0):,} "
                      f"params), {cfg.get('seeds')} seeds, {cfg.get('steps')} steps; gain = {units.get('gain')}; "
                      f"forgetting = {units.get('forgetting')}; mean [bootstrap 95% interval]")
    for c in ("arm", "params", "matched", "gain", "forgetting"):
        out.add_column(c, justify="left" if c == "arm" else "right", no_wrap=c == "arm")
    matched = res.runs.groupby("arm", sort=False)["matched"].all()
    for row in res.summary.to_dict(orient="records"):
        out.add_row(row["arm"], f"{row['n_params_mean']:,.0f}", "yes" if matched.get(row["arm"]) else "no",
                    f"{row['gain_mean']:.4f} [{row['gain_lo']:.4f}, {row['gain_hi']:.4f}]",
                    f"{row['forgetting_mean']:.4f} [{row['forgetting_lo']:.4f}, {row['forgetting_hi']:.4f}]")
    print_table(out)
    if res.paired.empty:
        return
    pt = Table(title="lowest κ minus each control, per seed (mean [95% interval]); seeds where lowest κ forgot "
                     "less / gained more")
    for c in ("control", "Δ gain", "Δ forgetting", "forgets less", "gains more"):
        pt.add_column(c, justify="left" if c == "control" else "right", no_wrap=c == "control")
    for row in res.paired.to_dict(orient="records"):
        n = row["n_seeds"]
        pt.add_row(row["control"], f"{row['gain_diff']:+.4f} [{row['gain_diff_lo']:+.4f}, {row['gain_diff_hi']:+.4f}]",
                   f"{row['forgetting_diff']:+.4f} [{row['forgetting_diff_lo']:+.4f}, "
                   f"{row['forgetting_diff_hi']:+.4f}]", f"{row['forgets_less']}/{n}", f"{row['gains_more']}/{n}")
    print_table(pt)
