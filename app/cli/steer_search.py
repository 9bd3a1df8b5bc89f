"""``lenslab steer search`` and ``lenslab steer audit``: the steering search (Pareto front of behaviour effect
against side effects, chosen setting and its export) and the audit of weight edits that remove a direction.

    lenslab steer search bilinear-lm numpy-torch --budget 240 --out chosen.safetensors --plot pareto.png
    lenslab steer search minilm positive-negative --layer 2 --layer 3 --budget 120
    lenslab steer audit bilinear-lm chosen.safetensors numpy-torch --lora chosen-lora --edit-out lm-np

Each command is the API function of the same name (``api.steer_search``, ``api.steer_audit``); registered on
``lenslab steer`` by ``register`` (``app/cli/__init__.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli.options import DeviceOpt, JsonOpt, RefreshOpt, StoreOpt, console, json_rows, run_with_progress
from app.cli.steer import ContrastArg, ForeignOpt, SourceArg, _print_table


def search(
    source: SourceArg,
    contrasts: ContrastArg,
    sources: Annotated[str, typer.Option("--sources", help="Comma-separated direction sources: mean_diff, pca, "
                                                           "logistic, file:PATH, sae:KEY:INDEX, "
                                                           "bilinear:KEY:DIRECTION:EIGEN.")] = "mean_diff,pca,logistic",
    layer: Annotated[Optional[list[int]], typer.Option("--layer", "-l", help="Layer(s) to search (default: "
                                                                             "all).")] = None,
    site: Annotated[str, typer.Option("--site", help="resid_pre | attn_out | resid_post (where the "
                                                     "vector is added).")] = "resid_post",
    strengths: Annotated[str, typer.Option("--strengths", help="α range lo,hi containing 0, in units of the "
                                                               "layer's mean token norm.")] = "-1,1",
    budget: Annotated[int, typer.Option("--budget", help="Forward passes (baseline + settings × passes per "
                                                         "setting).")] = 240,
    coarse: Annotated[int, typer.Option("--coarse", help="Strengths per (source, layer) in the coarse "
                                                         "grid.")] = 5,
    max_side: Annotated[Optional[float], typer.Option("--max-side", help="Side-effect limit of the chosen setting "
                                                                         "(default: KL 0.1 nats for an LM, drift "
                                                                         "0.02 for an encoder).")] = None,
    masked: Annotated[bool, typer.Option("--masked", help="Encoders: also the masked-token loss (trains MiniLM's "
                                                          "MLM head once).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Save the chosen setting's vector "
                                                                    "(.safetensors).")] = None,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="Also write it as a control-vector GGUF.")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Also write it as a weight edit (a new "
                                                                      "Llama model directory).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the Pareto plot (PNG).")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="Print every evaluated setting, not only the "
                                                         "front.")] = False,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Search layers × strengths × direction sources on CONTRASTS' held-out pairs: the behaviour effect
    against the side effects on neutral text; print the Pareto front, the per-source comparison and the
    chosen setting (stored; a re-run computes only settings not stored yet)."""
    from app import api

    from analysis.errors import ConfigError

    try:
        lo_hi = [float(x) for x in strengths.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--strengths {strengths!r} must be two comma-separated numbers lo,hi, e.g. -1,1") from None
    res = run_with_progress(f"steering search of {source}", api.steer_search, source, contrasts,
                            sources=[s for s in sources.split(",") if s.strip()], layers=layer or None, site=site,
                            strengths=lo_hi, budget=budget, n_coarse=coarse, max_side=max_side, masked=masked,
                            store=store, refresh=refresh, device=device)
    written = api.steer_search_export(res, out, gguf=gguf, weights=weights, source=source) \
        if (out or gguf or weights) else {}
    if plot is not None:
        from app.charts_steering_search import pareto_png

        written["plot"] = str(pareto_png(res.table, res.side, plot, title=f"{contrasts} in {source} · {site}"))
    m = res.meta
    if as_json:
        typer.echo(json.dumps({"meta": {k: v for k, v in m.items() if k not in ("comparison", "chosen")},
                               "chosen": {k: v for k, v in res.chosen.items() if k != "vector"},
                               "front": json_rows(res.front), "settings": json_rows(res.table),
                               "comparison": json_rows(res.comparison), "written": written}, indent=1, default=str))
        return
    cols = ["source", "layer", "alpha", "stage", "effect", *[c for c in res.table.columns
                                                               if c not in ("source", "layer", "alpha", "stage",
                                                                            "effect", "on_front", "chosen")]]
    shown = res.table if all_rows else res.front
    _print_table(shown[cols], f"{'settings' if all_rows else 'Pareto front'} · {contrasts} in {source} · {site} · "
                              f"effect vs {res.side}")
    _print_table(res.comparison, f"best effect at equal {res.side}, per source")
    c = res.chosen
    console.print(f"chosen: {c['source']} layer {c['layer']} α = {c['alpha']:+.4g} "
                  f"(× mean norm {c['mean_norm']:.4g}) "
                  f"at {c['site']}: effect {c['effect']:+.4g}, {res.side} {c[res.side]:.4g} "
                  f"(limit {m['max_side']:g})", highlight=False)
    console.print(f"budget {m['budget']} forward passes: baseline {m['baseline_passes']} + "
                  f"{m['n_settings']} settings × "
                  f"{m['passes_per_setting']}; the run that stored it computed {m['settings_computed']} new settings "
                  f"({m['passes_computed']} passes)", highlight=False)
    for what, path in written.items():
        console.print(f"wrote {what}: {path}", highlight=False)


def audit(
    source: SourceArg,
    vector: Annotated[Path, typer.Argument(help="A saved vector; its rows are the directions to remove.")],
    contrasts: Annotated[str, typer.Argument(help="Contrast set whose concept effect is measured.")] = "numpy-torch",
    edit_out: Annotated[Optional[Path], typer.Option("--edit-out", help="Also write the edited model here.")] = None,
    edit: Annotated[str, typer.Option("--edit", help="orthogonalized | norm_preserving (for --edit-out).")]
    = "norm_preserving",
    lora: Annotated[Optional[Path], typer.Option("--lora", help="Also write the orthogonalised edit as a PEFT LoRA "
                                                                "adapter (rank k) here.")] = None,
    allow_foreign: ForeignOpt = False,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Audit removing VECTOR's direction(s) from SOURCE's weights, orthogonalised and norm-preserving:
    concept effect retained, KL on neutral text, and per tensor κ, stable rank and α before/after (stored)."""
    from app import api

    res = run_with_progress(f"auditing edits of {source}", api.steer_audit, source, vector, contrasts,
                            allow_foreign=allow_foreign, store=store, refresh=refresh, device=device)
    written = {}
    if edit_out is not None:
        written["edit"] = str(api.steer_edit(source, vector, edit_out, edit=edit, allow_foreign=allow_foreign))
    if lora is not None:
        written["lora"] = str(api.steer_lora(source, vector, lora, allow_foreign=allow_foreign))
    if as_json:
        typer.echo(json.dumps({"summary": json_rows(res.summary), "tensors": json_rows(res.tensors),
                               "written": written}, indent=1, default=str))
        return
    _print_table(res.summary, f"weight edits removing {Path(vector).name} from {source} · {contrasts}")
    cols = ["edit", "tensor", "kappa_before", "kappa_after", "kappa_kept_before", "kappa_kept_after",
            "stable_rank_before", "stable_rank_after",
            "alpha_before", "alpha_after", "rel_change"]
    _print_table(res.tensors[[c for c in cols if c in res.tensors.columns]], "per tensor")
    for what, path in written.items():
        console.print(f"wrote {what}: {path}", highlight=False)



def register(steer_app: typer.Typer) -> None:
    """Add ``search`` and ``audit`` to ``lenslab steer``."""
    steer_app.command("search")(search)
    steer_app.command("audit")(audit)
