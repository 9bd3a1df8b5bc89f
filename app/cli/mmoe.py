"""CLI: ``lenslab mmoe train|analyze|bias`` (MMoE probes) and ``lenslab experts SOURCE`` (routed MoEs).

Registered on the main app by ``register(app)`` (one line in ``app/cli/__init__.py``). Everything runs
through ``app.api`` and lands in the same store as the dashboard.

    lenslab mmoe analyze --experts 8,16,32,64,128,256 --figure curve.png   # digits, ~1 min
    lenslab mmoe analyze --data docstrings                                 # MiniLM features
    lenslab experts tiny-mixtral --device cuda
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli.options import (DeviceOpt, JsonOpt, RefreshOpt, SeedOpt, StoreOpt, TrustOpt, console, json_rows,
                             run_with_progress)

mmoe_app = typer.Typer(no_args_is_help=True, help="MMoE probes: train, expert specialisation, bias correction.")

DataOpt = Annotated[str, typer.Option("--data", "-d", help="digits (sklearn 8x8) | docstrings (MiniLM features "
                                                           "of the package-of-a-docstring task)")]
LayerOpt = Annotated[str, typer.Option("--layer", help="cp | tr (MMoE factorisation)")]
GateOpt = Annotated[str, typer.Option("--gate", help="entmax15 | softmax")]
HiddenOpt = Annotated[int, typer.Option("--hidden", help="Width of the replaced layer (the MMoE maps features to "
                                                         "it, then GELU + linear head); 0 = MMoE is the head.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Training epochs per probe.")]
PackagesOpt = Annotated[Optional[str], typer.Option("--packages", help="docstrings: comma-separated packages "
                                                                       "(the classes).")]
PerPackageOpt = Annotated[int, typer.Option("--per-package", help="docstrings: texts per package (at most).")]


def _data_settings(data: str, packages: str | None, per_package: int) -> dict:
    if data != "docstrings":
        return {}
    out: dict = {"per_package": per_package}
    if packages:
        out["packages"] = tuple(p.strip() for p in packages.split(",") if p.strip())
    return out


def _echo_json(table) -> None:
    typer.echo(json.dumps(json_rows(table), indent=1))


def _print_table(table, columns: list[str], title: str, headers: dict[str, str] | None = None) -> None:
    from rich.table import Table

    from app.cli.tables import print_table

    out = Table(title=title)
    for c in columns:
        out.add_column((headers or {}).get(c, c), justify="left" if c in ("probe", "class", "token") else "right",
                       overflow="fold")
    for row in table.to_dict(orient="records"):
        out.add_row(*[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    print_table(out)


@mmoe_app.command("train")
def train(
    data: DataOpt = "digits",
    experts: Annotated[int, typer.Option("--experts", "-n", help="Number of experts of the MMoE probe.")] = 64,
    layer: LayerOpt = "cp",
    gate: GateOpt = "entmax15",
    hidden: HiddenOpt = 512,
    epochs: EpochsOpt = 40,
    seed: SeedOpt = 0,
    budget: Annotated[Optional[int], typer.Option("--budget", help="Parameter budget of the MMoE layer (default: "
                                                                   "the linear layer it replaces).")] = None,
    packages: PackagesOpt = None,
    per_package: PerPackageOpt = 200,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a linear probe, the parameter-matched linear layer and an MMoE probe; print accuracies."""
    from app import api

    table = run_with_progress(f"probes on {data}", api.mmoe_train, data, experts, layer=layer, gate=gate,
                              hidden=hidden or None, epochs=epochs, seed=seed, budget=budget, store=store,
                              refresh=refresh, device=device, **_data_settings(data, packages, per_package))
    if as_json:
        _echo_json(table)
        return
    _print_table(table, ["probe", "layer_params", "budget", "rank", "n_params", "test_accuracy", "train_accuracy"],
                 f"probes on {data} (test accuracy; MMoE rank chosen to fit the linear layer's budget)")


@mmoe_app.command("analyze")
def analyze(
    data: DataOpt = "digits",
    experts: Annotated[str, typer.Option("--experts", "-n", help="Comma-separated expert counts.")]
    = "8,16,32,64,128,256",
    layer: LayerOpt = "cp",
    gate: GateOpt = "entmax15",
    hidden: HiddenOpt = 512,
    epochs: EpochsOpt = 40,
    seed: SeedOpt = 0,
    eval_on: Annotated[str, typer.Option("--eval-on", help="Samples the experts are analysed on: all | test.")]
    = "all",
    figure: Annotated[Optional[Path], typer.Option("--figure", "-o", help="Save the specialisation curve as "
                                                                          "a PNG here.")] = None,
    packages: PackagesOpt = None,
    per_package: PerPackageOpt = 200,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train an MMoE probe per expert count and measure expert specialisation (the curve)."""
    from app import api

    curve = run_with_progress(f"expert specialisation on {data}", api.mmoe_analyze, data, experts, layer=layer,
                              gate=gate, hidden=hidden or None, epochs=epochs, seed=seed, store=store,
                              refresh=refresh, analysis={"eval_on": eval_on}, device=device,
                              **_data_settings(data, packages, per_package))
    if figure is not None:
        from app.charts_experts import save_curve_png

        matched = curve.meta.get("matched_linear") or {}
        save_curve_png(curve.table, figure, title=f"{layer.upper()} MMoE on {data}",
                       linear_probe=curve.meta["linear_probe"]["test_accuracy"],
                       matched_linear=matched.get("test_accuracy"))
        console.print(f"wrote {figure}")
    if as_json:
        _echo_json(curve.table)
        return
    m = curve.meta
    base = f"linear probe {m['linear_probe']['test_accuracy']:.3f}"
    if m.get("matched_linear"):
        base += f", parameter-matched linear layer {m['matched_linear']['test_accuracy']:.3f}"
    _print_table(curve.table, ["n_experts", "rank", "layer_params", "accuracy", "mean_polysemanticity",
                               "mean_null_polysemanticity", "n_experts_counted", "mean_effect_polysemanticity",
                               "mean_null_effect_polysemanticity", "experts_loaded"],
                 f"expert specialisation on {data} ({m['n_eval']} samples; {base}); polysemanticity in bits",
                 headers={"n_experts": "experts", "layer_params": "params", "mean_polysemanticity": "poly flips",
                          "mean_null_polysemanticity": "null", "n_experts_counted": "counted",
                          "mean_effect_polysemanticity": "poly effect", "mean_null_effect_polysemanticity": "null",
                          "experts_loaded": "loaded"})
    console.print(f"done in {m['seconds']:.1f} s; stored as mmoe.curve {curve.key[:12]} "
                  "(open the Experts page of `lenslab dashboard`)")


@mmoe_app.command("bias")
def bias(
    data: DataOpt = "docstrings",
    experts: Annotated[int, typer.Option("--experts", "-n", help="Number of experts.")] = 16,
    target: Annotated[str, typer.Option("--target", help="Class to correct (name or index).")] = "scipy",
    keep: Annotated[float, typer.Option("--keep", help="Share of the target's training samples kept (under-"
                                                       "representation that creates the bias).")] = 0.15,
    n_scaled: Annotated[int, typer.Option("--n-scaled", help="Experts scaled down.")] = 3,
    scale: Annotated[float, typer.Option("--scale", help="Factor applied to their coefficients, in [0, 1).")] = 0.0,
    layer: LayerOpt = "cp",
    hidden: HiddenOpt = 512,
    epochs: EpochsOpt = 40,
    seed: SeedOpt = 0,
    packages: PackagesOpt = None,
    per_package: PerPackageOpt = 200,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Bias-correction demo: scale down the experts most responsible for one class's errors."""
    from app import api

    demo = run_with_progress(f"bias correction on {data}", api.mmoe_bias, data, experts, target=target, keep=keep,
                             n_scaled=n_scaled, scale=scale, layer=layer, hidden=hidden or None, epochs=epochs,
                             seed=seed, store=store, refresh=refresh, device=device,
                             **_data_settings(data, packages, per_package))
    if as_json:
        _echo_json(demo.table)
        return
    _print_table(demo.table, ["class", "n_samples", "before", "after", "change"],
                 f"per-class accuracy after scaling experts {list(demo.experts)} by {scale} (target {demo.target})")
    console.print(f"accuracy {demo.accuracy_before:.3f} -> {demo.accuracy_after:.3f}; experts chosen on "
                  f"{demo.meta['n_select']} test samples ({demo.n_errors} errors of {demo.target}), evaluated on "
                  f"the other {demo.meta['n_eval']}")


def experts(
    source: Annotated[str, typer.Argument(help="A routed MoE: tiny-mixtral or a Mixtral-style HF directory.")],
    per_package: Annotated[int, typer.Option("--per-package", help="Docstrings per package routed.")] = 40,
    packages: PackagesOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per text.")] = 64,
    min_count: Annotated[int, typer.Option("--min-count", help="Token specialisation: minimum occurrences.")] = 5,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Expert usage of a routed MoE: load balance, routing entropy, token specialisation, co-activation."""
    from app import api

    pk = tuple(p.strip() for p in packages.split(",") if p.strip()) if packages else None
    stats = run_with_progress(f"routing of {source}", api.experts_routing, source, packages=pk, per_package=per_package,
                              max_tokens=max_tokens, min_count=min_count, store=store, refresh=refresh,
                              trust_pickle=trust_pickle, device=device)
    if as_json:
        _echo_json(stats.layers)
        return
    m = stats.meta
    _print_table(stats.layers, ["layer", "n_tokens", "load_balance", "routing_entropy", "max_entropy",
                                "usage_entropy", "token_specialisation", "baseline_k_over_e",
                                "shuffled_specialisation", "domain_mi"],
                 f"routing of {source}: {m['n_experts']} experts, top-{m['top_k']}, {m['n_tokens']} tokens of "
                 f"{m['n_texts']} docstrings (backend: {m['backend']})",
                 headers={"n_tokens": "tokens", "load_balance": "balance", "routing_entropy": "H route",
                          "max_entropy": "H max", "usage_entropy": "H usage", "token_specialisation": "tok spec",
                          "baseline_k_over_e": "k/E", "shuffled_specialisation": "shuffled", "domain_mi": "MI dom"})
    console.print("load_balance: E·Σ f_i P_i (1 = even); entropies in bits; token_specialisation: share of a token's "
                  "occurrences routed to its most frequent expert (vs k/E and a shuffled baseline)")


def register(app: typer.Typer) -> None:
    """Add ``mmoe`` and ``experts`` to the main ``lenslab`` app."""
    app.add_typer(mmoe_app, name="mmoe")
    app.command("experts")(experts)
