"""``lenslab sae groundtruth`` and ``lenslab sae probe``: SAE evaluation that runs offline on CPU.

    lenslab sae groundtruth                          # every architecture, default synthetic setting
    lenslab sae groundtruth -a topk -a relu --tokens 500000 --json
    lenslab sae probe minilm --layer 3 --task package  # k = 1, 2, 5 sparse probes vs the raw probe

Each command is its API function (``sae.eval_pipeline``): ``sae_groundtruth_table`` (one
``sae_groundtruth`` per architecture) and ``sae_probe``. Registered on ``lenslab sae`` in
``app/cli/__init__.py``.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import typer
from rich.table import Table

from app.cli.options import (DeviceOpt, JsonOpt, RefreshOpt, SeedOpt, StoreOpt, console, json_rows,
                             run_with_progress)
from app.cli.tables import print_table
from sae.eval_pipeline import GT_DEFAULTS

GT_COLUMNS = (("rank", "rank", "d"), ("architecture", "architecture", "s"), ("sparsity", "setting", "s"),
              ("l0", "L0", ".2f"), ("nmse", "NMSE", ".4f"), ("mcc", "MCC", ".3f"),
              ("mean_max_cosine", "mean max cos", ".3f"), ("precision", "precision", ".3f"),
              ("recall", "recall", ".3f"), ("absorption", "absorption", ".3f"),
              ("parent_split_fraction", "parents split", ".3f"), ("shrinkage", "shrinkage", ".3f"),
              ("dead_fraction", "dead", ".2%"))


def _sparsity(r: dict) -> str:
    """The run's sparsity setting: k, l1 or l0 (what each architecture was given)."""
    for name, short in (("k", "k"), ("l1_coefficient", "l1"), ("l0_coefficient", "l0")):
        v = r.get(name)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return f"{short} = {v:g}"
    return "-"


def _fmt(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt) if fmt != "s" else str(v)


def groundtruth(
    architecture: Annotated[Optional[list[str]], typer.Option(
        "--architecture", "-a", help="Architecture to score (repeat for several); default: every one the SAE "
                                     "config supports.")] = None,
    d_sae: Annotated[Optional[int], typer.Option("--d-sae", help="SAE width (default: the number of true "
                                                                 "features).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="k of architectures that take one (default: the "
                                                         "setting's expected L0).")] = None,
    l1: Annotated[Optional[float], typer.Option("--l1", help="L1 coefficient of relu and gated SAEs (default: each "
                                                             "one's tuned value, sae.groundtruth_job.GT_SPARSITY).")
                  ] = None,
    n_tokens: Annotated[int, typer.Option("--tokens", help="Training samples seen (they repeat in epochs).")
                        ] = GT_DEFAULTS["n_tokens"],
    n_train: Annotated[int, typer.Option("--n-train", help="Distinct synthetic training samples.")
                       ] = GT_DEFAULTS["n_train"],
    seed: SeedOpt = GT_DEFAULTS["seed"],
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train each SAE architecture on synthetic activations with a known dictionary (sae/synthetic.py)
    and score recovery: MCC, precision/recall at cos 0.9, absorption, splitting, shrinkage. Each architecture
    runs at its default sparsity (k = the data's expected L0, or a coefficient tuned to reach it); rows are
    ranked by matched L0, then MCC, then NMSE."""
    from app import api

    table = run_with_progress("ground-truth scoring", api.sae_groundtruth_table, architecture or None, d_sae=d_sae,
                              k=k, l1_coefficient=l1, n_tokens=n_tokens, n_train=n_train, seed=seed, store=store,
                              refresh=refresh, device=device)
    if as_json:
        typer.echo(json.dumps(json_rows(table), indent=1))
        return
    out = Table(title="Recovery of a known dictionary (synthetic setting: sae.synthetic.SyntheticSpec())",
                caption="MCC: Hungarian-matched |cos| of decoder rows and true features; precision/recall at "
                        "|cos| >= 0.9; absorption: the parent latent is off while other latents write >= half of "
                        "the parent's coefficient along its direction; shrinkage: latent / true magnitude "
                        "(sae/ground_truth.py). Rank: L0 within 15% of the data's expected L0 first, then MCC "
                        "(to 0.01), then NMSE")
    for _, label, _ in GT_COLUMNS:
        out.add_column(label, justify="left" if label == "architecture" else "right")
    for r in table.sort_values("rank").to_dict(orient="records"):
        r["sparsity"] = _sparsity(r)
        out.add_row(*[_fmt(r.get(name), fmt) for name, _, fmt in GT_COLUMNS])
    print_table(out)


def probe(
    source: Annotated[str, typer.Argument(help="minilm, bilinear-lm, tiny-mixtral or a HF model directory.")],
    layer: Annotated[int, typer.Option("--layer", "-l", help="Attention layer of the SAE.")] = 0,
    sae: Annotated[Optional[str], typer.Option("--sae", help="Store key (prefix) of the SAE; default: the newest "
                                                             "SAE of SOURCE at LAYER.")] = None,
    task: Annotated[str, typer.Option("--task", help="package (which package a docstring comes from) or code "
                                                     "(source code vs prose).")] = "package",
    ks: Annotated[Optional[list[int]], typer.Option("--k", help="Latents per sparse probe (repeat); default 1, 2, "
                                                                "5.")] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="Texts per class.")] = 60,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """k-sparse probes on the SAE's latents (k latents chosen by class-mean difference, then logistic
    regression) against a logistic probe on the raw activations; mean test accuracy over one-vs-rest tasks."""
    from app import api

    key = api.find_sae(source, layer, sae, store=store)
    res = run_with_progress(f"probing SAE {key[:12]}", api.sae_probe, key, task=task, ks=tuple(ks or (1, 2, 5)),
                            per_class=per_class, seed=seed, store=store, refresh=refresh, device=device)
    if as_json:
        typer.echo(json.dumps({"key": key, "task": task, "summary": res.summary, "rows": json_rows(res.table)},
                              indent=1))
        return
    out = Table(title=f"{task!r} probes on SAE {key[:12]} ({res.meta.get('n_texts')} texts, classes: "
                      f"{', '.join(res.meta.get('classes', []))})", caption="chance = 0.5 (balanced one-vs-rest)")
    out.add_column("probe")
    out.add_column("mean test accuracy", justify="right")
    for name, acc in res.summary.items():
        out.add_row(name, f"{acc:.3f}")
    print_table(out)
    console.print("per class: --json", highlight=False)
