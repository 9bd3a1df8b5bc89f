"""``lenslab sae``: attention-output SAEs (train, evaluate, feature dashboards) on hook_z.

    lenslab sae train minilm --layer 3                     # TopK SAE, 8x width, docstring corpus
    lenslab sae train minilm --layer 3 --architecture relu --l1 2
    lenslab sae eval minilm --layer 3                      # L0, NMSE, explained variance, loss recovered
    lenslab sae eval minilm --layer 3 --no-loss            # skip loss recovered (MiniLM's MLM head)
    lenslab sae features minilm --layer 3 --feature 12     # dashboard data; one feature's contexts
    lenslab sae prompt minilm "Return a new array" --layer 3  # features firing on each token
    lenslab sae list                                       # stored SAEs with their metrics (also: sae ls)
    lenslab sae train ./my-model --layer 1 --texts notes.txt  # your own texts, one per line
    lenslab sae export minilm out/sae --layer 3            # SAELens format (SAE.load_from_disk)
    lenslab sae import out/sae minilm --layer 3            # a SAELens-format SAE or transcoder into the store

Each command is the API function ``sae_<verb>`` (``sae.pipeline``, ``sae.saelens_io``); the
defaults of ``train`` are ``sae.config.TRAIN_DEFAULTS``. ``eval``, ``features``, ``prompt`` and
``export`` use the SAE of SOURCE at LAYER; when several are stored they refuse with the list of their
keys (as ``sae ls`` shows them) and ``--sae KEY`` picks one.
``export`` and ``import`` live in ``app/cli/sae_saelens.py``.
Registered on the main app in ``app/cli/__init__.py``; errors are LensLab's typed errors (one line,
exit 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from app.cli.options import (DeviceOpt, JsonOpt, RefreshOpt, SeedOpt, StoreOpt, console, json_rows, json_safe,
                             run_with_progress)
from app.cli.tables import print_table
from sae.config import TOPK_K
from sae.config import TRAIN_DEFAULTS as _D
from sae.config import config_default

sae_app = typer.Typer(no_args_is_help=True, help="Attention-output SAEs: train, evaluate, feature dashboards.")

SourceArg = Annotated[str, typer.Argument(help="minilm, bilinear-lm, tiny-mixtral or a HF model directory.")]
LayerOpt = Annotated[int, typer.Option("--layer", "-l", help="Block (blocks.L.attn.hook_z, or the --site hook).")]
SiteOpt = Annotated[str, typer.Option("--site", help="What the SAE reads: hook_z (attention outputs before W_O) | "
                                                     "resid_pre | resid_post | mlp_out.")]
FindSiteOpt = Annotated[Optional[str], typer.Option("--site", help="Pick the SAE at this site (hook_z | "
                                                                   "resid_pre | resid_post | mlp_out; default any).")]
SaeOpt = Annotated[Optional[str], typer.Option("--sae", help="Store key (prefix) of the SAE, as `lenslab sae ls` "
                                                             "shows it; default: the one SAE of SOURCE at LAYER "
                                                             "(when several are stored, the error lists them).")]
TextsOpt = Annotated[Optional[Path], typer.Option("--texts", help="A text file, one text per line, used instead of "
                                                                  "the docstring corpus.")]
METRICS = (("l0", "L0", ".2f"), ("nmse", "NMSE", ".4f"),
           ("explained_variance_saelens", "explained variance (SAELens: 1 - NMSE)", ".4f"),
           ("explained_variance_sklearn", "explained variance (sklearn: variance-weighted)", ".4f"),
           ("cosine", "cosine", ".4f"), ("loss_recovered", "loss recovered", ".4f"),
           ("kl_recovered", "KL recovered", ".4f"),
           ("dead_fraction", "dead features", ".2%"), ("dense_fraction", "dense features", ".2%"))
EV_NOTE = ("EV SAELens = 1 - NMSE, SAELens's explained_variance; EV sklearn = sklearn's variance-weighted "
           "explained_variance_score, which ignores a constant offset of the reconstruction (see sae/metrics.py)")


def _texts(path: Path | None) -> list[str] | None:
    from analysis.errors import ConfigError

    if path is None:
        return None
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--texts {path}: cannot read it as UTF-8 text ({exc}); give a text file, one text "
                          "per line") from exc
    texts = [ln for ln in lines if ln]
    if not texts:
        raise ConfigError(f"--texts {path}: the file holds no non-empty line; give one text per line")
    return texts


def _print_metrics(title: str, metrics: dict) -> None:
    out = Table(title=title)
    out.add_column("metric")
    out.add_column("value", justify="right")
    for name, label, fmt in METRICS:
        v = metrics.get(name)
        if v is not None:
            out.add_row(label, format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else str(v))
    print_table(out)


@sae_app.command("train")
def train(
    source: SourceArg,
    layer: LayerOpt = _D.layer,
    site: SiteOpt = _D.site,
    architecture: Annotated[str, typer.Option("--architecture", "-a", help="topk | relu | jumprelu | batchtopk | "
                                                                           "matryoshka_batchtopk | gated")]
    = _D.architecture,
    k: Annotated[Optional[float], typer.Option("--k", help=f"topk: latents kept per token (the L0; default "
                                                           f"{TOPK_K}); batchtopk, matryoshka_batchtopk: on "
                                                           "average over the batch.")] = _D.k,
    l1: Annotated[Optional[float], typer.Option("--l1", help="relu, gated: L1 coefficient (default "
                                                             f"{config_default('l1_coefficient')}).")]
    = _D.l1_coefficient,
    l0: Annotated[Optional[float], typer.Option("--l0", help="jumprelu: L0 coefficient (default "
                                                             f"{config_default('l0_coefficient')}).")] = None,
    init_threshold: Annotated[Optional[float], typer.Option("--init-threshold", help="jumprelu: initial threshold "
                                                            f"(default {config_default('jumprelu_init_threshold')}).")]
    = None,
    bandwidth: Annotated[Optional[float], typer.Option("--bandwidth", help="jumprelu: bandwidth of the threshold's "
                                                       "straight-through estimator (default "
                                                       f"{config_default('jumprelu_bandwidth')}).")] = None,
    widths: Annotated[Optional[str], typer.Option("--widths", help="matryoshka_batchtopk: prefix widths, "
                                                  "comma-separated, ending at d_sae (e.g. 384,1536,3072).")] = None,
    expansion: Annotated[int, typer.Option("--expansion", help="d_sae = expansion x d_in.")] = _D.expansion,
    d_sae: Annotated[Optional[int], typer.Option("--d-sae", help="Number of features (overrides --expansion).")]
    = _D.d_sae,
    n_tokens: Annotated[int, typer.Option("--tokens", help="Training tokens (activations repeat in epochs).")]
    = _D.n_tokens,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per optimiser step.")] = _D.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = _D.lr,
    per_package: Annotated[Optional[int], typer.Option("--per-package", help="Docstrings per package (default all).")]
    = _D.per_package,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens kept per text.")] = _D.max_tokens,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of the docstring corpus held "
                                                                         "out for evaluation.")] = _D.eval_fraction,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 compute (harvest and training matmuls).")]
    = _D.dtype == "bfloat16",
    seed: SeedOpt = _D.seed,
    texts: TextsOpt = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume an interrupted run of the same "
                                                                      "command from its checkpoint (default), or "
                                                                      "start over.")] = True,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")]
    = _D.checkpoint_every,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Harvest hook_z of LAYER on the docstring corpus and train an SAE on it (stored; reused if present).
    Interrupted (Ctrl-C), the same command resumes from the last checkpoint."""
    from app import api

    arch_fields = {name: v for name, v in (("l0_coefficient", l0), ("jumprelu_init_threshold", init_threshold),
                                            ("jumprelu_bandwidth", bandwidth)) if v is not None}
    if widths is not None:
        try:
            arch_fields["matryoshka_widths"] = tuple(int(w) for w in widths.split(","))
        except ValueError:
            from analysis.errors import ConfigError

            raise ConfigError(f"--widths {widths!r}: expected comma-separated integers ending at d_sae, such as "
                              "384,1536,3072") from None
    if k is not None and float(k).is_integer():
        k = int(k)  # topk takes an integer; batchtopk any number
    try:
        trained = run_with_progress(f"SAE on {source} layer {layer}", api.sae_train, source, layer, **arch_fields,
                                    site=site, architecture=architecture, k=k, l1_coefficient=l1, expansion=expansion,
                                    d_sae=d_sae, n_tokens=n_tokens, batch_size=batch_size, lr=lr,
                                    per_package=per_package, max_tokens=max_tokens, eval_fraction=eval_fraction,
                                    dtype="bfloat16" if bf16 else "float32", seed=seed, texts=_texts(texts),
                                    store=store, refresh=refresh, resume=resume, checkpoint_every=checkpoint_every,
                                    device=device)
    except KeyboardInterrupt:
        console.print(f"training interrupted; its last checkpoint (every {checkpoint_every} steps) is kept: run the "
                      "same command again to resume, or add --no-resume to start over", highlight=False)
        raise
    if as_json:
        typer.echo(json.dumps({"key": trained.key, "name": trained.name, "config": trained.sae.cfg.to_dict(),
                               "training": {k_: json_safe(v) for k_, v in trained.training.items()
                                            if not isinstance(v, (list, dict))}}, indent=1))
        return
    cfg = trained.sae.cfg
    shape = f"{cfg.n_heads} heads x {cfg.d_head}" if cfg.n_heads is not None else cfg.hook_name
    console.print(f"{trained.name}: d_in {cfg.d_in} ({shape}), d_sae {cfg.d_sae}; "
                  f"store key {trained.key[:12]}", highlight=False)
    _print_metrics("training (last steps)", trained.training)
    at = "" if site == _D.site else f" --site {site}"
    console.print(f"next: lenslab sae eval {source} --layer {layer}{at} --sae {trained.key[:12]}", highlight=False)


@sae_app.command("eval")
def evaluate(
    source: SourceArg,
    layer: LayerOpt = 0,
    sae: SaeOpt = None,
    site: FindSiteOpt = None,
    texts: TextsOpt = None,
    loss: Annotated[bool, typer.Option("--loss/--no-loss", help="Measure loss recovered (default). MiniLM needs "
                                                                "its MLM head for it, trained once (~5 min) and "
                                                                "cached; --no-loss skips it.")] = True,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Evaluate the SAE on held-out docstrings (or --texts): L0, NMSE, explained variance (SAELens's and
    sklearn's), loss recovered, dead/dense fractions."""
    from app import api

    key = api.find_sae(source, layer, sae, store=store, site=site)
    ev = run_with_progress(f"evaluating SAE {key[:12]}", api.sae_eval, key, texts=_texts(texts), loss=loss,
                           store=store, refresh=refresh, device=device)
    if as_json:
        typer.echo(json.dumps({"key": key, "metrics": {k: json_safe(v) for k, v in ev.metrics.items()}}, indent=1))
        return
    _print_metrics(f"SAE {key[:12]} on {source} layer {layer}", ev.metrics)
    console.print(ev.caption, highlight=False)


@sae_app.command("features")
def features(
    source: SourceArg,
    layer: LayerOpt = 0,
    sae: SaeOpt = None,
    site: FindSiteOpt = None,
    feature: Annotated[Optional[int], typer.Option("--feature", "-f", help="Print this feature's top contexts "
                                                                           "and logit effects.")] = None,
    top: Annotated[int, typer.Option("--top", help="Contexts printed for --feature.")] = 5,
    texts: TextsOpt = None,
    as_json: JsonOpt = False,
    refresh: RefreshOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Compute and store the SAE's feature dashboard data; print the polysemantic-head table
    (and one feature's top contexts with --feature)."""
    from app import api

    key = api.find_sae(source, layer, sae, store=store, site=site)
    d_sae = api.load_sae(key, store=store).sae.cfg.d_sae
    if feature is not None and not 0 <= feature < d_sae:  # before minutes of computing feature data
        from analysis.errors import ConfigError

        raise ConfigError(f"feature index {feature} is out of range: this SAE has {d_sae} features "
                          f"(0..{d_sae - 1}); pick an index in that range (--feature)")
    fd = run_with_progress(f"feature data of SAE {key[:12]}", api.sae_features, key, texts=_texts(texts),
                           store=store, refresh=refresh, device=device)
    # heads exist at hook_z only: SAEs of other sites have no per-head attribution (it does not apply)
    poly = api.sae_polysemantic(key, store=store, features=fd) if fd.head_attribution is not None else None
    if as_json:
        out = {"key": key, "n_features": fd.d_sae, "dead": int((fd.density == 0).sum()),
               "polysemantic_heads": None if poly is None else poly.n_polysemantic,
               "heads_counted": None if poly is None else poly.n_counted,
               "heads": None if poly is None else json_rows(poly.table)}
        if feature is not None:
            lt = fd.logit_table(feature)
            out["feature"] = {"index": feature, "density": float(fd.density[feature]),
                              "max_act": float(fd.max_act[feature]),
                              "head_attribution": None if fd.head_attribution is None
                              else fd.head_attribution[feature].tolist(),
                              "contexts": [{"tokens": c.tokens, "text": "".join(c.texts), "acts": c.acts.tolist(),
                                            "centre": c.centre, "activation": c.activation}
                                           for c in fd.contexts(feature)[:top]],
                              "boosted": None if lt is None else list(lt["boosted"]),
                              "suppressed": None if lt is None else list(lt["suppressed"])}
        typer.echo(json.dumps(out, indent=1))
        return
    if poly is None:
        console.print(f"{fd.d_sae} features, {int((fd.density == 0).sum())} dead; per-head attribution does not "
                      "apply (this SAE does not read hook_z)", highlight=False)
    else:
        _print_heads(fd, poly)
    if feature is None:
        return
    _print_feature(fd, feature, top)


def _print_heads(fd: Any, poly: Any) -> None:
    console.print(f"{fd.d_sae} features, {int((fd.density == 0).sum())} dead; {poly.n_polysemantic} of "
                  f"{poly.n_counted} heads carry >= 2 unrelated feature families", highlight=False)
    out = Table(title="heads: top features and their families")
    for c in ("head", "n_belonging", "n_top", "n_families", "family_sizes", "polysemantic", "families"):
        out.add_column(c, overflow="fold", justify="left" if c == "families" else "right")
    for r in poly.table.to_dict(orient="records"):
        out.add_row(*[str(r[c]) for c in ("head", "n_belonging", "n_top", "n_families", "family_sizes",
                                          "polysemantic", "families")])
    print_table(out)


def _print_feature(fd: Any, feature: int, top: int) -> None:
    heads = "" if fd.head_attribution is None else " ".join(f"H{h}:{w:.2f}" for h, w in
                                                            enumerate(fd.head_attribution[feature]))
    typer.echo(f"feature {feature}: density {fd.density[feature]:.3g}, max {fd.max_act[feature]:.3g}; heads {heads}")
    for c in fd.contexts(feature)[:top]:  # pieces joined as the tokenizer decodes them; the picked token in [[ ]]
        text = "".join(_mark(t) if j == c.centre else t for j, t in enumerate(c.texts))
        typer.echo(f"  {c.activation:8.3f}  {text}")
    lt = fd.logit_table(feature)
    if lt is not None:
        typer.echo("  boosts:     " + " ".join(repr(t) for t in lt["boosted"]))
        typer.echo("  suppresses: " + " ".join(repr(t) for t in lt["suppressed"]))


def _mark(text: str) -> str:
    """``text`` in ``[[ ]]``, after its leading space (`` gaussian`` -> `` [[gaussian]]``)."""
    body = text.lstrip(" ")
    return f"{text[:len(text) - len(body)]}[[{body}]]"


@sae_app.command("prompt")
def prompt(
    source: SourceArg,
    text: Annotated[str, typer.Argument(help="The prompt.")],
    layer: LayerOpt = 0,
    sae: SaeOpt = None,
    top: Annotated[int, typer.Option("--top", help="Strongest features listed per token.")] = 5,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Run TEXT through the model and show the SAE features firing on each token (not stored)."""
    from app import api

    key = api.find_sae(source, layer, sae, store=store)
    view = run_with_progress(f"prompt through SAE {key[:12]}", api.sae_prompt, key, text, store=store, device=device)
    table = view.token_table(top)
    if as_json:
        typer.echo(json.dumps({"key": key, "tokens": view.tokens, "top_features": view.top_features(top),
                               "rows": json_rows(table)}, indent=1))
        return
    out = Table(title=f"SAE {key[:12]} on {len(view.tokens)} tokens")
    for c in table.columns:
        out.add_column(str(c), overflow="fold")
    for r in table.to_dict(orient="records"):
        out.add_row(*[str(v) for v in r.values()])
    print_table(out)


@sae_app.command("list")
def list_(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List stored SAEs with their evaluation metrics (also `lenslab sae ls`)."""
    from app import api

    table = api.sae_list(store=store)
    if as_json:
        typer.echo(json.dumps(json_rows(table.assign(created=[t.isoformat() for t in table["created"]])), indent=1))
        return
    out = Table(title=f"{len(table)} stored SAE(s)", caption=EV_NOTE)
    cols = ["key", "name", "l0", "nmse", "explained_variance_saelens", "explained_variance_sklearn", "loss_recovered",
            "dead_fraction", "features"]
    headers = {"explained_variance_saelens": "EV SAELens", "explained_variance_sklearn": "EV sklearn"}
    for c in cols:
        out.add_column(headers.get(c, c), overflow="fold")
    for r in table.to_dict(orient="records"):
        out.add_row(*[r[c][:12] if c == "key" else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                      for c in cols])
    print_table(out)


sae_app.command("ls", help="List stored SAEs with their evaluation metrics (as `sae list`).")(list_)
