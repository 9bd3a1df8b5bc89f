"""``lenslab sae transcoder`` / ``lenslab sae transcoders``: (skip) transcoders of one block's MLP
(MLP input -> MLP output), trained once and stored.

    lenslab sae transcoder minilm --layer 3                 # TopK transcoder, 8x width, docstring corpus
    lenslab sae transcoder minilm --layer 3 --skip --k 16   # skip transcoder (Paulo et al. 2025)
    lenslab sae transcoder minilm --layer 3 --no-mask       # MiniLM: train on plain text, not masked text
    lenslab sae transcoder minilm --layer 3 --architecture jumprelu --l0 0.1   # SAELens-saveable
    lenslab sae transcoder ./my-llama --layer 1 --texts notes.txt --json
    lenslab sae transcoders                                 # the stored transcoders with their metrics

The commands are ``api.sae_transcoder`` and ``api.sae_transcoders`` (``sae.transcoder_pipeline``);
registered on ``lenslab sae`` in ``app/cli/__init__.py``. ``transcoder`` prints the store key and the
held-out NMSE and loss recovered; the same command again is served from the store.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import typer
from rich.table import Table

from app.cli.options import (DeviceOpt, JsonOpt, RefreshOpt, SeedOpt, StoreOpt, console, json_rows, json_safe,
                             run_with_progress)
from app.cli.sae import SourceArg, TextsOpt, _texts
from app.cli.tables import print_table


def transcoder(
    source: SourceArg,
    layer: Annotated[int, typer.Option("--layer", "-l", help="Block whose MLP it replaces.")] = 0,
    skip: Annotated[bool, typer.Option("--skip/--no-skip", help="Skip transcoder: add the affine skip path "
                                                                "W_skip (Paulo et al. 2025).")] = False,
    architecture: Annotated[str, typer.Option("--architecture", "-a", help="topk (k per token) | relu (L1 penalty, "
                                                                          "--l1) | jumprelu (thresholds, L0 "
                                                                          "penalty, --l0).")] = "topk",
    k: Annotated[int, typer.Option("--k", help="Latents kept per token (topk).")] = 32,
    l1: Annotated[float, typer.Option("--l1", help="relu: L1 coefficient.")] = 1.0,
    l0: Annotated[float, typer.Option("--l0", help="jumprelu: L0 coefficient.")] = 1.0,
    expansion: Annotated[int, typer.Option("--expansion", help="d_sae = expansion x d_model.")] = 8,
    n_tokens: Annotated[int, typer.Option("--tokens", help="Training tokens (activations repeat in epochs).")]
    = 200_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per optimiser step.")] = 1024,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    mask: Annotated[Optional[bool], typer.Option(
        "--mask/--no-mask", help="Masked LMs (MiniLM): train on text with 15% of the tokens replaced by [MASK], "
                                 "the positions the masked-token loss scores (default: on for masked LMs; "
                                 "refused for causal LMs).", show_default=False)] = None,
    per_package: Annotated[Optional[int], typer.Option("--per-package", help="Docstrings per package (default "
                                                                             "all).")] = None,
    texts: TextsOpt = None,
    loss: Annotated[bool, typer.Option("--loss/--no-loss", help="Measure loss recovered (MiniLM: its MLM "
                                                                "head, trained once and cached).")] = True,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a transcoder (TopK, ReLU or JumpReLU) reading blocks.L.mlp.hook_in and predicting
    blocks.L.hook_mlp_out, store it and print its key, held-out NMSE against the MLP output and loss recovered
    with the MLP output replaced by the prediction. The same command again is served from the store (--refresh
    trains again)."""
    from app import api

    kind = "skip transcoder" if skip else "transcoder"
    run = run_with_progress(f"{architecture} {kind} of {source} block {layer}", api.sae_transcoder, source, layer,
                            skip=skip, k=k, architecture=architecture, l1_coefficient=l1, l0_coefficient=l0,
                            expansion=expansion, n_tokens=n_tokens, batch_size=batch_size, lr=lr, seed=seed,
                            mask=mask, per_package=per_package, texts=_texts(texts), loss=loss, store=store,
                            refresh=refresh, device=device)
    if as_json:
        typer.echo(json.dumps({"key": run.key, "name": run.name, "config": run.cfg.to_dict(),
                               "metrics": {k_: json_safe(v) for k_, v in run.metrics.items()}}, indent=1))
        return
    c = run.cfg
    sparsity = {"topk": f"k {c.k}", "relu": f"l1 {c.l1_coefficient:g}", "jumprelu": f"l0 {c.l0_coefficient:g}"}
    console.print(f"{c.architecture} {c.kind} {c.hook_in} -> {c.hook_out}: d_in {c.d_in}, d_sae {c.d_sae}, "
                  f"d_out {c.d_out}, {sparsity[c.architecture]}"
                  + (", trained on masked text" if run.meta.get("harvest", {}).get("mask_rate") else ""),
                  highlight=False)
    for name, v in run.metrics.items():
        console.print(f"  {name:16s} {v:.4g}", highlight=False)
    typer.echo(f"stored as {run.key}")


TABLE = (("key", "key"), ("name", "name"), ("model", "model"), ("l0", "L0"), ("nmse", "NMSE"),
         ("nmse_mask", "NMSE [MASK]"), ("nmse_other", "NMSE other"), ("loss_recovered", "loss recovered"))


def transcoders(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the stored transcoders with their held-out metrics, newest first."""
    from app import api

    table = api.sae_transcoders(store=store)
    if as_json:
        typer.echo(json.dumps(json_rows(table.assign(created=[t.isoformat() for t in table["created"]])), indent=1))
        return
    out = Table(title=f"{len(table)} stored transcoder(s)",
                caption="NMSE against the MLP output on held-out text; NMSE [MASK] / other: at the masked / other "
                        "positions of masked held-out text (masked LMs); loss recovered: MLP output replaced by the "
                        "prediction, against zero-ablation")
    for _, label in TABLE:
        out.add_column(label, overflow="fold")
    for r in table.to_dict(orient="records"):
        out.add_row(*[str(r[c])[:12] if c == "key" else (
            ("-" if not math.isfinite(r[c]) else f"{r[c]:.4g}") if isinstance(r[c], float) else str(r[c]))
            for c, _ in TABLE])
    print_table(out)
