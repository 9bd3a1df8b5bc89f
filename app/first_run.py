"""The first-run job (``lenslab quickstart``, ``api.quickstart``, ``make run``): one small, real result per
analysis in the store, so every dashboard page opens on a result.

``STEPS`` is an ordered list with ONE entry per analysis: its name, what it computes, the dashboard
pages it fills and a callable ``(store, *, progress)`` that calls the public API functions (the very
functions ``app.api`` re-exports, imported from their pipelines so that ``app.api`` can re-export this
module) with explicit settings. Every call goes through the runner (``analysis.run``), so each result
is computed once and stored, and the models LensLab trains are cached under ``~/.cache/lenslab/models``:
a second run finds everything and computes nothing. A new analysis adds one ``Step`` line here.

Where a page looks a result up with fixed settings (the steering page's dose-response and layer sweep
at its default method, scale and alpha; the SAE pages' feature data) the step stores exactly those, so
the page shows it without a click; ``tests/app/test_first_run_pages.py`` checks every page against the
store this job builds.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.bilinear.pipeline import bilinear_decompose, bilinear_train
from analysis.circuits.pipeline import circuits
from analysis.errors import ConfigError
from analysis.experts.pipeline import experts_routing, mmoe_analyze
from analysis.progress import Progress, sub_progress
from analysis.run import StoreLike, open_store
from analysis.steering.pipeline import steer_dose, steer_extract, steer_layers
from analysis.steering.pipeline_audit import steer_audit
from analysis.steering.pipeline_search import steer_search, steer_search_export
from analysis.steering.pipeline_vectors import steer_vector
from analysis.store import Store
from analysis.weights.pipeline import analyze, experiment_kappatune, select
from sae.eval_pipeline import sae_groundtruth_table
from sae.pipeline import sae_eval, sae_features, sae_train

MINILM = "minilm"
LM = "tiny-mixtral"  # a causal LM trained here (~1-2 min, once): routed experts, and steered text works
CONTRASTS = "numpy-torch"
# The steering page's default view (app/views/steering.py): the first method, norm scale, alpha 0.4 and
# these dose-response alphas; the step stores the dose-response and layer sweep the page looks up.
STEER_METHOD = "mean_diff"
STEER_SCALE = "norm"
STEER_ALPHA = 0.4
STEER_ALPHAS = (-0.6, -0.4, -0.2, -0.1, 0.0, 0.1, 0.2, 0.4, 0.6)
SAE_LAYER = 3
SEARCH_LM = "bilinear-lm"  # the tiny Llama-shaped LM trained here (~40 s, once): search, audit and experiment
SEARCH_BUDGET = 60  # forward passes of the steering search (the CLI's default is 240)
GT_TOKENS = 2_000_000  # training tokens per architecture in the ground-truth table


@dataclass(frozen=True)
class Step:
    """One analysis of the first run: ``run(store, progress=...)`` computes (or finds) its results."""

    name: str
    what: str  # one line: what it computes (progress display, ``lenslab quickstart --list``, README)
    pages: tuple[str, ...]  # the dashboard pages it fills: stems of app/views/*.py
    run: Callable[..., Any]


@dataclass(frozen=True)
class StepOutcome:
    """What one step did: its wall time and how many store entries it added (0: all found in the store)."""

    name: str
    seconds: float
    new_entries: int


def _spectra(store: Store, *, progress: Progress | None = None) -> Any:
    analyze(MINILM, store=store, progress=progress)
    # the selection the KappaTune page previews by default: 20% of the tensors, lowest kappa first
    return select(MINILM, "20%", ranker="lowest_kappa", store=store)


def _circuits(store: Store, *, progress: Progress | None = None) -> Any:
    return circuits(MINILM, store=store, progress=progress)


def _bilinear(store: Store, *, progress: Progress | None = None) -> Any:
    bilinear_train("digits", progress=sub_progress(progress, "train"))
    return bilinear_decompose("bilinear-digits", layer=0, direction="class:all", store=store,
                              progress=sub_progress(progress, "decompose"))


def _mmoe(store: Store, *, progress: Progress | None = None) -> Any:
    return mmoe_analyze("digits", (8, 16, 32, 64), layer="cp", epochs=40, store=store, progress=progress)


def _routing(store: Store, *, progress: Progress | None = None) -> Any:
    bilinear_train("mixtral", progress=sub_progress(progress, "train"))
    return experts_routing(LM, store=store, progress=sub_progress(progress, "routing"))


def _steering(store: Store, *, progress: Progress | None = None) -> Any:
    ext = steer_extract(LM, CONTRASTS, hook="resid_post", position="last", store=store,
                        progress=sub_progress(progress, "extract"))
    vec = steer_vector(ext, ext.best_layer(STEER_METHOD), STEER_METHOD)
    dose = steer_dose(LM, vec, CONTRASTS, alphas=STEER_ALPHAS, scale=STEER_SCALE, capability=True, store=store,
                      progress=sub_progress(progress, "dose"))
    steer_layers(LM, CONTRASTS, alpha=STEER_ALPHA, method=STEER_METHOD, hook="resid_post", position="last",
                 scale=STEER_SCALE, capability=False, store=store, progress=sub_progress(progress, "layers"))
    return dose


def _sae(store: Store, *, progress: Progress | None = None) -> Any:
    trained = sae_train(MINILM, SAE_LAYER, architecture="topk", expansion=4, k=16, n_tokens=200_000,
                        per_package=40, store=store, progress=sub_progress(progress, "train"))
    # no loss recovered: on MiniLM it needs a masked-LM head trained first (minutes); `lenslab sae eval` adds it
    sae_eval(trained.key, loss=False, store=store, progress=sub_progress(progress, "eval"))
    return sae_features(trained.key, store=store, progress=sub_progress(progress, "features"))


def _search(store: Store, *, progress: Progress | None = None) -> Any:
    found = steer_search(SEARCH_LM, CONTRASTS, budget=SEARCH_BUDGET, store=store,
                         progress=sub_progress(progress, "search"))
    # the audit keys on the vector's bytes, so the exported file may live in a temporary directory
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "chosen.safetensors"
        steer_search_export(found, out, source=SEARCH_LM, store=store)
        steer_audit(SEARCH_LM, out, CONTRASTS, store=store, progress=sub_progress(progress, "audit"))
    return found


def _experiment(store: Store, *, progress: Progress | None = None) -> Any:
    # the parameter-matched experiment on the tiny causal LM, 2 seeds x 50 steps (the default is 5 x 100 on
    # MiniLM and the LM): every arm, intervals and the Pareto plot, in seconds
    return experiment_kappatune(SEARCH_LM, seeds=2, steps=50, store=store, progress=progress)


def _groundtruth(store: Store, *, progress: Progress | None = None) -> Any:
    # every architecture on the default synthetic dictionary, with a short schedule (the README's table
    # trains 8M tokens each)
    return sae_groundtruth_table(n_tokens=GT_TOKENS, n_train=20_000, n_eval=5_000, store=store,
                                 progress=progress)


# Ordered so that a MiniLM step comes last: MiniLM is then the store's most recently seen model, the one the
# model pickers (spectra, selection, circuits) show first; and so that the steering step's extraction is newer than
# the search's, since the Steering page opens on the newest extraction.
STEPS: tuple[Step, ...] = (
    Step("bilinear", "train the bilinear digits MLP and eigendecompose its layer along every class",
         ("bilinear",), _bilinear),
    Step("mmoe", "MMoE specialisation curve on digits (8, 16, 32, 64 experts)", ("experts",), _mmoe),
    Step("routing", f"train {LM} (4 experts, top-2) and measure its routing on docstrings", ("experts",), _routing),
    Step("search", f"steering search on {SEARCH_LM} ({SEARCH_BUDGET} forward passes) and the audit of its "
                   "chosen direction as a weight edit", ("steering_search",), _search),
    Step("experiment", f"KappaTune experiment on {SEARCH_LM}, every arm parameter-matched (2 seeds, 50 steps)",
         ("experiments",), _experiment),
    Step("steering", f"{CONTRASTS} steering directions of {LM}, their dose-response and layer sweep",
         ("steering",), _steering),
    Step("spectra", "MiniLM's weight spectra (kappa, alpha, ESD) and a KappaTune selection (20%, lowest kappa)",
         ("home", "spectra", "selection"), _spectra),
    Step("circuits", "QK and OV circuit spectra of MiniLM's 72 attention heads", ("circuits",), _circuits),
    Step("sae", f"a TopK SAE on MiniLM layer {SAE_LAYER}'s attention output (200k tokens), its evaluation and "
                "feature data", ("sae", "sae_features", "sae_prompt"), _sae),
    Step("groundtruth", f"every SAE architecture scored against a known synthetic dictionary "
                        f"({GT_TOKENS // 1000}k tokens each)", ("sae_compare",), _groundtruth),
)


def step_names() -> list[str]:
    """The names of ``STEPS`` in order."""
    return [s.name for s in STEPS]


def pick(names: Sequence[str] | None = None) -> list[Step]:
    """The steps named (in ``STEPS`` order), or all of them; ConfigError for an unknown name."""
    if not names:
        return list(STEPS)
    if unknown := sorted(set(names) - set(step_names())):
        raise ConfigError(f"unknown quickstart step(s) {unknown}; choose from {', '.join(step_names())}")
    return [s for s in STEPS if s.name in set(names)]


def _entries(store: Store) -> set[tuple[str, float]]:
    return {(e.key, e.created) for e in store.list()}


def run_step(step: Step, store: Store, *, progress: Progress | None = None) -> StepOutcome:
    """Run one step into ``store``; its outcome counts the entries it added (an interrupted or failed
    step stores nothing partial: the runner writes each result whole or not at all)."""
    before = _entries(store)
    start = time.perf_counter()
    step.run(store, progress=progress)
    return StepOutcome(step.name, time.perf_counter() - start, len(_entries(store) - before))


def quickstart(store: StoreLike = None, *, steps: Sequence[str] | None = None,
               progress: Progress | None = None) -> list[StepOutcome]:
    """Fill ``store`` (default: the default store) with one small, real result per analysis, the steps of
    ``STEPS`` (or those named in ``steps``) in order; results already stored are served, not recomputed.

        >>> [o.new_entries for o in api.quickstart()]   # second run: all 0

    Progress labels read ``step: stage: item``. Raises the first step's error (the results of the
    steps before it are kept)."""
    chosen = pick(steps)
    st = open_store(store)
    return [run_step(step, st, progress=sub_progress(progress, step.name)) for step in chosen]
