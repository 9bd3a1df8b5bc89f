"""``lenslab circuits``: singular-value spectra of every attention head's QK and OV circuit.

    lenslab circuits minilm                               # kappa of the QK circuits, layers x heads
    lenslab circuits minilm --circuit OV --metric stable_rank
    lenslab circuits path/to/hf-model --json              # one JSON row per head (every metric)

Registered on the main app in ``app/cli/__init__.py``. Errors are LensLab's typed errors (one line, exit 2).
"""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer
from rich.table import Table

from analysis.errors import ConfigError
from app.cli.options import DeviceOpt, JsonOpt, RefreshOpt, StoreOpt, TrustOpt, run_with_progress
from app.cli.tables import print_table

CIRCUIT_KINDS = ("QK", "OV")
GRID_METRICS = ("kappa", "stable_rank", "effective_rank", "s_max")


def _cell(value: float) -> str:
    return "inf" if math.isinf(value) else "" if math.isnan(value) else f"{value:.4g}"


def circuits(
    source: Annotated[str, typer.Argument(help="minilm or a Hugging Face model directory (config.json).")],
    circuit: Annotated[str, typer.Option("--circuit", help="QK (W_Q W_Kᵀ: where heads attend) or OV (W_V W_O: "
                                                           "what they write).")] = "QK",
    metric: Annotated[str, typer.Option("--metric", help=" | ".join(GRID_METRICS) + " (the table's cells).")]
    = "kappa",
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    refresh: RefreshOpt = False,
    device: DeviceOpt = "auto",
    trust_pickle: TrustOpt = False,
) -> None:
    """Singular-value spectra of every attention head's QK and OV circuit of SOURCE (exact, float64), stored;
    prints METRIC of CIRCUIT as a layers x heads table (kappa inf: the circuit is rank-deficient)."""
    from app import api
    from app.cli.options import json_rows

    kind = circuit.upper()
    if kind not in CIRCUIT_KINDS:
        raise ConfigError(f"unknown circuit {circuit!r}; choose one of {', '.join(CIRCUIT_KINDS)}")
    if metric not in GRID_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(GRID_METRICS)}")
    cs = run_with_progress(f"circuits of {source}", api.circuits, source, store=store, refresh=refresh,
                           device=device, trust_pickle=trust_pickle)
    if as_json:
        typer.echo(json.dumps(json_rows(cs.table[cs.table["circuit"] == kind]), indent=1))
        return
    grid = cs.grid(metric, kind)
    m = cs.meta
    typer.echo(f"{metric} of the {kind} circuits of {source}: {len(grid)} layers x {grid.shape[1]} heads (d_model "
               f"{m.get('d_model')}, d_head {m.get('d_head')}, {m.get('n_kv_heads')} key/value heads; --json for every "
               "metric)")
    out = Table()
    out.add_column("layer", justify="right")
    for head in grid.columns:
        out.add_column(f"h{head}", justify="right")
    for layer, row in grid.iterrows():
        out.add_row(str(layer), *[_cell(float(v)) for v in row])
    print_table(out)
