"""``lenslab bilinear``: train the tiny bilinear models and decompose GLU layers into eigenvectors.

    lenslab bilinear train digits            # bilinear image model on sklearn digits, test accuracy
    lenslab bilinear train lm                # tiny bilinear Llama on the docstring corpus, loss
    lenslab bilinear decompose bilinear-digits --direction class:all
    lenslab bilinear decompose bilinear-lm --layer 1 --direction "token: the, return" --device cuda

Registered on the main app in ``app/cli/__init__.py``. Errors are LensLab's typed errors (one line, exit 2).
Both commands call ``app.api`` (``bilinear_train``, ``bilinear_decompose``) with the shared options of
``app.cli.options``.
"""

from __future__ import annotations

import json
import warnings
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from app.cli.options import DeviceOpt, JsonOpt, RefreshOpt, SeedOpt, StoreOpt, TrustOpt, console, run_with_progress
from app.cli.tables import print_table

bilinear_app = typer.Typer(no_args_is_help=True, help="Bilinear MLPs: train the tiny models, decompose GLU layers "
                                                      "into eigenvectors.")
_TRUNCATION_KS = (1, 2, 4, 8, 16)


@bilinear_app.command("train")
def train(
    kind: Annotated[str, typer.Argument(help="digits | lm | mixtral")],
    seed: SeedOpt = 0,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimiser steps (default: the kind's).")] = None,
    noise: Annotated[Optional[float], typer.Option("--noise", help="digits: std of the Gaussian input noise "
                                                                   "(pixels in [0, 1]).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if cached.")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train (or reuse from the model cache) KIND on --device and report test accuracy (digits) or loss (LMs)."""
    from analysis.errors import ConfigError
    from app import api

    overrides = {"seed": seed}
    if steps is not None:
        overrides["steps"] = steps
    if weight_decay is not None:
        overrides["weight_decay"] = weight_decay
    if noise is not None:
        if kind != "digits":
            raise ConfigError(f"--noise applies to the digits model only, not {kind!r}; drop it")
        overrides["noise"] = noise
    trained = run_with_progress(f"training {kind}", api.bilinear_train, kind, force=force, device=device,
                                **overrides)
    metrics = {k: v for k, v in trained.metrics.items() if k != "loss_curve"}
    if as_json:
        typer.echo(json.dumps({"kind": trained.kind, "path": str(trained.path), "reused": trained.reused,
                               "config": trained.config, "metrics": metrics}, indent=1))
        return
    how = "reused from the cache" if trained.reused else f"trained in {metrics.get('seconds', 0):.1f} s"
    if "test_accuracy" in metrics:
        summary = f"test accuracy {metrics['test_accuracy']:.2%}"
    else:
        summary = (f"train loss {metrics['train_loss']:.3f}, validation loss {metrics['val_loss']:.3f} nats/token "
                   f"(uniform {metrics['uniform_loss']:.3f})")
    typer.echo(f"{trained.kind}: {summary}; {how}\n{trained.path}")


def _curve_summary(report) -> dict[str, dict[str, float]]:
    tr = report.truncation
    if tr is None:
        return {}
    out = {}
    n = int(tr.ks[-1])
    for k in sorted({k for k in _TRUNCATION_KS if k < n} | {n}):
        i = int(np.searchsorted(tr.ks, k))
        out[str(k)] = {m: float(getattr(tr, m)[i]) for m in ("accuracy", "agreement", "relative_error")
                       if np.isfinite(getattr(tr, m)[i])}
    return out


@bilinear_app.command("decompose")
def decompose(
    source: Annotated[str, typer.Argument(help="bilinear-digits, bilinear-lm, tiny-mixtral, a HF directory or a "
                                               ".safetensors file.")],
    layer: Annotated[int, typer.Option("--layer", "-l", help="Block index of the GLU / bilinear layer.")] = 0,
    direction: Annotated[Optional[str], typer.Option(
        "--direction", "-d", help="class:all | class:3,5 | token:the,def | token:#17 | resid:0,1 | vector:u.npy | "
                                  "sae:DIR:5 | hosvd:8 (default: HOSVD).")] = None,
    expert: Annotated[Optional[int], typer.Option("--expert", help="Expert index for MoE layers.")] = None,
    top: Annotated[int, typer.Option("--top", help="Eigenvalues listed per direction.")] = 4,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Eigendecompose the interaction matrices of SOURCE's GLU at LAYER along each direction on
    --device and store the result (eigenvalues, eigenvectors, truncation curve, explorer data)."""
    from app import api

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bilinear-part note is printed below from the report
        rep = run_with_progress(f"decomposing {source} layer {layer}", api.bilinear_decompose, source, layer=layer,
                                direction=direction, expert=expert, store=store, refresh=refresh,
                                trust_pickle=trust_pickle, device=device)
    dec = rep.decomposition
    if as_json:
        typer.echo(json.dumps({
            "source": rep.source, "layer": rep.layer, "expert": rep.expert, "direction": rep.direction,
            "layer_name": rep.meta.get("layer_name"), "exact": dec.exact, "gate_act": dec.gate_act,
            "biased": dec.biased, "notes": list(dec.notes),
            "directions": [{"label": lab, "effective_rank": float(er), "eigenvalues": dec.eigenvalues[k, :top].tolist()}
                           for k, (lab, er) in enumerate(zip(dec.labels, dec.effective_rank))],
            "truncation": _curve_summary(rep)}, indent=1))
        return
    for note in dec.notes:
        console.print(Text.assemble(("note:", "yellow"), f" {note}"), highlight=False)  # the note as plain text
    out = Table(title=f"{rep.source} · {rep.meta.get('layer_name')} · {rep.direction} · n = "
                      f"{dec.eigenvalues.shape[1]} ({'exact' if dec.exact else 'bilinear part only'})")
    for c in ("direction", "effective rank", f"top {top} eigenvalues (by |λ|)", "top-4 share"):
        out.add_column(c, justify="left" if c == "direction" else "right", overflow="fold")
    for row, lam in zip(rep.table.to_dict(orient="records"), dec.eigenvalues):
        out.add_row(row["direction"], f"{row['effective_rank']:.2f}", " ".join(f"{v:+.3g}" for v in lam[:top]),
                    f"{row['top4_share']:.2f}")
    print_table(out)
    for k, metrics in _curve_summary(rep).items():
        typer.echo(f"keep {k:>3} eigenvectors per direction: "
                   + ", ".join(f"{m} {v:.3f}" for m, v in metrics.items()))
    if rep.top_tokens is not None and len(rep.top_tokens):
        first = rep.top_tokens[rep.top_tokens["direction"] == dec.labels[0]]
        for (eig, lam), grp in first.groupby(["eigen", "eigenvalue"], sort=False):
            typer.echo(f"{dec.labels[0]} eigenvector {eig} (λ={lam:+.3g}): "
                       + " ".join(repr(t) for t in grp.sort_values("rank")["token"]))
