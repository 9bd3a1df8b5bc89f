"""``lenslab sae transcoder``: a (skip) transcoder of one block's MLP (MLP input -> MLP output).

    lenslab sae transcoder minilm --layer 3                 # TopK transcoder, 8x width, docstring corpus
    lenslab sae transcoder minilm --layer 3 --skip --k 16   # skip transcoder (Paulo et al. 2025)
    lenslab sae transcoder minilm --layer 3 --architecture jumprelu --l0 0.1   # SAELens-saveable
    lenslab sae transcoder ./my-llama --layer 1 --texts notes.txt --json

The command is ``api.sae_transcoder`` (``sae.transcoder_job``); registered on ``lenslab sae`` in
``app/cli/__init__.py``. Not stored: it prints the held-out NMSE and loss recovered.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from app.cli.options import DeviceOpt, JsonOpt, SeedOpt, console, json_safe, run_with_progress
from app.cli.sae import SourceArg, TextsOpt, _texts


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
    per_package: Annotated[Optional[int], typer.Option("--per-package", help="Docstrings per package (default "
                                                                             "all).")] = None,
    texts: TextsOpt = None,
    loss: Annotated[bool, typer.Option("--loss/--no-loss", help="Measure loss recovered (MiniLM: its MLM "
                                                                "head, trained once and cached).")] = True,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train a transcoder (TopK, ReLU or JumpReLU) reading blocks.L.mlp.hook_in and predicting
    blocks.L.hook_mlp_out; print its held-out NMSE against the MLP output and loss recovered with the MLP
    output replaced by the prediction."""
    from app import api

    kind = "skip transcoder" if skip else "transcoder"
    run = run_with_progress(f"{architecture} {kind} of {source} block {layer}", api.sae_transcoder, source, layer,
                            skip=skip, k=k, architecture=architecture, l1_coefficient=l1, l0_coefficient=l0,
                            expansion=expansion, n_tokens=n_tokens, batch_size=batch_size, lr=lr, seed=seed,
                            per_package=per_package, texts=_texts(texts), loss=loss, device=device)
    if as_json:
        typer.echo(json.dumps({"config": run.cfg.to_dict(), "metrics": {k_: json_safe(v) for k_, v in
                                                                        run.metrics.items()}}, indent=1))
        return
    c = run.cfg
    sparsity = {"topk": f"k {c.k}", "relu": f"l1 {c.l1_coefficient:g}", "jumprelu": f"l0 {c.l0_coefficient:g}"}
    console.print(f"{c.architecture} {c.kind} {c.hook_in} -> {c.hook_out}: d_in {c.d_in}, d_sae {c.d_sae}, "
                  f"d_out {c.d_out}, {sparsity[c.architecture]}", highlight=False)
    for name, v in run.metrics.items():
        console.print(f"  {name:16s} {v:.4g}", highlight=False)
