"""The expert analyses through the runner (``analysis.run``): what is stored, and the Python API
(re-exported by ``app.api``).

    >>> from app import api
    >>> curve = api.mmoe_analyze("digits", experts=(8, 16, 32, 64, 128, 256))
    >>> curve.table[["n_experts", "accuracy", "mean_effect_polysemanticity"]]
    >>> report = api.load_expert_report(curve.keys[64])      # one MMoE's experts in detail
    >>> routing = api.experts_routing("tiny-mixtral")           # a routed (sparse) MoE

Stored kinds (name, code version; never change them: they are in the store keys):

- ``mmoe.features`` (``mmoe-1``): MiniLM sentence embeddings of the docstring task, under the
  encoder's fingerprint (params: corpus settings + installed package versions);
- ``mmoe.probe`` (``mmoe-1``): one trained probe (weights, BatchNorm statistics, scaling, accuracies);
- ``mmoe.specialisation`` (``mmoe-1/experts-1``): one MMoE's expert report;
- ``mmoe.curve`` (``mmoe-1``): one row per expert count, what the specialisation figure plots;
- ``mmoe.bias`` (``mmoe-1/experts-1``): the bias-correction demo;
- ``experts.routing`` (``routing-1``): routing statistics of a routed MoE, under its fingerprint.

MMoE entries are keyed by a dataset fingerprint: for digits ``data_id`` of the data, for the
docstring task MiniLM's fingerprint (the data id is in the params). Reading back: ``stored_*``
lists index rows (``EntryInfo``, newest first), ``load_*(key)`` returns the result or raises
``analysis.run.NotStoredError``. Every function that runs torch takes ``device`` (auto | cpu |
cuda | mps); results are CPU numpy, identical on the CPU to earlier versions.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd

from analysis import run as runner
from analysis.errors import SourceError
from analysis.experts import bias as bias_mod
from analysis.experts import curves, routing
from analysis.experts import specialisation as ex
from analysis.experts.bias import BiasDemo, BiasParams
from analysis.experts.curves import DEFAULT_EXPERTS, CurveParams, ExpertReport, MMoECurve, SpecialisationParams
from analysis.experts.data import (DIGITS_LABEL, DataSpec, FeatureParams, FeatureSubject, compute_features,
                                   corpus_versions, data_id, digits_feature_set, docstring_feature_set,
                                   embeddings_from_result, feature_subject)
from analysis.experts.probe_fit import (LINEAR_PROBE_LR, META_COLUMNS, ProbeParams, baseline_probes,
                                        compute_probe, probe_from_result, probe_settings)
from analysis.progress import Progress
from analysis.run import Analysis, RunContext, StoreLike, Subject, open_store, register, run
from analysis.store import EntryInfo, Result, entry_key
from probes.training import DOC_PACKAGES, FeatureSet, ProbeClassifier

CODE_VERSION = "mmoe-1"
EXPERTS_VERSION = f"{CODE_VERSION}/{ex.CODE_VERSION}"


# -- the registered analyses ----------------------------------------------------------------------
def _probe(subject: FeatureSubject, probe: dict[str, Any], ctx: RunContext) -> tuple[ProbeClassifier, dict]:
    """The probe ``probe`` on ``subject``'s features, stored or trained: (fitted probe on ctx.device, meta)."""
    params = ProbeParams.of(subject.features, probe)
    fit = run(PROBE, subject, params, ctx=ctx)
    return fit.classifier(params.probe, ctx.device), dict(fit.meta)


def _compute_specialisation(subject: FeatureSubject, params: SpecialisationParams, ctx: RunContext) -> Result:
    clf, meta = _probe(subject, params.probe, ctx.child(ctx.sub("probe")))
    return curves.report_result(clf, subject.features, params, meta)


def _compute_curve(subject: FeatureSubject, params: CurveParams, ctx: RunContext) -> Result:
    """Baselines, then per expert count one MMoE probe and its report (each stored on its own)."""
    fs, t_start = subject.features, time.perf_counter()
    total = len(params.experts) + 2
    ctx.tick(0, total, "baselines")
    quiet = ctx.child()  # the baselines are reused even with refresh
    common = {"epochs": params.epochs, "seed": params.seed}
    _, lin = _probe(subject, {"layer": "linear", "hidden": None, **common, "lr": LINEAR_PROBE_LR}, quiet)
    matched = _probe(subject, {"layer": "linear", "hidden": params.hidden, **common}, quiet)[1] if params.hidden \
        else None
    again = dataclasses.replace(ctx.child(), refresh=ctx.refresh)  # refresh reaches the MMoE probes and reports
    rows, keys = [], {}
    for i, n in enumerate(params.experts):
        ctx.tick(i + 1, total, f"{params.layer.upper()} MMoE with {n} experts")
        t0 = time.perf_counter()
        clf, meta = _probe(subject, params.probe(n), again)
        spec_params = SpecialisationParams(probe=clf.params(), data_id=data_id(fs.X, fs.y), data=params.data,
                                           analysis=params.analysis)
        report = run(SPECIALISATION, subject, spec_params, ctx=again)
        keys[n] = entry_key(subject.fingerprint, SPECIALISATION.name, spec_params.store_params(),
                            SPECIALISATION.code_version)
        rows.append(curves.curve_row(n, meta, report.summary, lin, matched, time.perf_counter() - t0))
    ctx.tick(total, total, "done")
    idx = curves.eval_split(fs, params.analysis["eval_on"])
    return curves.curve_result(rows, keys, params, fs, len(idx), lin, matched, time.perf_counter() - t_start)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RoutingParams:
    """Store params of a routing analysis: the docstring corpus routed and the statistics' settings."""

    packages: tuple[str, ...]
    per_package: int
    max_tokens: int
    min_count: int
    seed: int
    versions: dict[str, str]

    def store_params(self) -> dict[str, Any]:
        return {"packages": list(self.packages), "per_package": self.per_package, "max_tokens": self.max_tokens,
                "min_count": self.min_count, "seed": self.seed, "versions": dict(self.versions)}


def _compute_routing(subject: Subject, params: RoutingParams, ctx: RunContext) -> Result:
    from probes.training import docstring_items

    src = subject.source
    items = docstring_items(params.packages, per_package=params.per_package, seed=params.seed, min_per_package=1)
    with ctx.lock:  # the bridge is shared; its hooks run in this forward pass only
        bridge = ctx.bridge(src)
        hf_model = None if routing.routing_hooks(bridge) is not None else \
            ctx.bridge(src, variant="hf-causal-lm", boot=routing.boot_hf_model)
        log = routing.collect_routing(src, [d.text for d in items], [d.package for d in items],
                                      max_tokens=params.max_tokens, progress=ctx.report, bridge=bridge,
                                      hf_model=hf_model)
    return routing.to_result(routing.routing_stats(log, min_count=params.min_count, seed=params.seed))


FEATURES = register(Analysis(name="mmoe.features", code_version=CODE_VERSION, compute=compute_features,
                             from_result=embeddings_from_result, doc="docstring-task sentence embeddings"))
PROBE = register(Analysis(name="mmoe.probe", code_version=CODE_VERSION, compute=compute_probe,
                          from_result=probe_from_result, doc="one trained probe"))
SPECIALISATION = register(Analysis(name="mmoe.specialisation", code_version=EXPERTS_VERSION,
                                   compute=_compute_specialisation, from_result=curves.report_from_result,
                                   doc="one MMoE probe's expert report"))
CURVE = register(Analysis(name="mmoe.curve", code_version=CODE_VERSION, compute=_compute_curve,
                          from_result=curves.curve_from_result, doc="specialisation against the number of experts"))
BIAS = register(Analysis(name="mmoe.bias", code_version=EXPERTS_VERSION, compute=bias_mod.compute_bias,
                         from_result=bias_mod.bias_from_result, doc="bias-correction demo"))
ROUTING = register(Analysis(name="experts.routing", code_version=routing.CODE_VERSION, compute=_compute_routing,
                            from_result=routing.from_result, doc="routing statistics of a routed MoE"))


# -- API ------------------------------------------------------------------------------------------
def _features(spec: DataSpec, ctx: RunContext) -> tuple[FeatureSet, str]:
    if spec.data == "digits":
        fs, fp = digits_feature_set(spec)
        ctx.store.register_model(fp, DIGITS_LABEL, "dataset", n_tensors=1, n_params=int(fs.X.size),
                                 info={"classes": list(fs.classes)})
        return fs, fp
    from analysis.sources import open_source

    src = open_source(spec.encoder)
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: sentence features need a Hugging Face encoder directory (config.json + "
                          "tokenizer), e.g. 'minilm'")
    params = FeatureParams.of(spec)
    emb = run(FEATURES, src, params, ctx=ctx)
    if not emb.matches(params.items):  # same params, different corpus walk: recompute
        emb = run(FEATURES, src, params, ctx=dataclasses.replace(ctx, refresh=True))
    return docstring_feature_set(spec, params, emb), src.fingerprint


def mmoe_features(spec: DataSpec | None = None, *, store: StoreLike = None, refresh: bool = False,
                  progress: Progress | None = None, device: str = "auto") -> tuple[FeatureSet, str]:
    """(features, dataset fingerprint). Digits load instantly; docstring embeddings are computed
    once with MiniLM on ``device`` and stored (``mmoe.features``)."""
    spec = spec or DataSpec()
    return _features(spec, runner.context(store=store, progress=progress, device=device, refresh=refresh))


def mmoe_probe(fs: FeatureSet, fingerprint: str, probe: dict[str, Any], *, store: StoreLike = None,
               refresh: bool = False, progress: Progress | None = None,
               device: str = "auto") -> tuple[ProbeClassifier, dict[str, Any]]:
    """Train (or load) one probe on ``fs``'s train split: (fitted probe on ``device``, its stored meta)."""
    probe_settings(probe)  # ConfigError before the store is opened
    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    return _probe(feature_subject(fs, fingerprint), probe, ctx)


def mmoe_train(data: str = "digits", n_experts: int = 64, *, layer: str = "cp", gate: str = "entmax15",
               hidden: int | None = 512, epochs: int = 40, seed: int = 0, budget: int | None = None,
               store: StoreLike = None, refresh: bool = False, progress: Progress | None = None,
               device: str = "auto", **data_settings: Any) -> pd.DataFrame:
    """Train the linear probe, the parameter-matched linear layer and the MMoE probe.

    Returns one row per probe: probe, layer_params (the replaced layer), budget, rank,
    n_params (whole probe), test_accuracy, train_accuracy, seconds. ``data_settings``:
    ``DataSpec`` fields (packages, per_package, max_tokens, encoder, test_fraction).
    """
    spec = DataSpec(data=data, seed=seed, **data_settings)
    ctx = runner.context(store=store, progress=progress, device=device)
    fs, fp = _features(spec, ctx)
    probes = baseline_probes(layer, n_experts, gate=gate, hidden=hidden, epochs=epochs, seed=seed, budget=budget)
    train_ctx = dataclasses.replace(ctx.child(), refresh=refresh)
    rows = []
    for i, p in enumerate(probes):
        ctx.tick(i, len(probes), f"training probe {i + 1}/{len(probes)}")
        _, meta = _probe(feature_subject(fs, fp), p, train_ctx)
        rows.append({"probe": meta["describe"], **{k: meta[k] for k in META_COLUMNS}})
    return pd.DataFrame(rows)


def mmoe_analyze(data: str = "digits", experts: int | str | Sequence[int] = DEFAULT_EXPERTS, *, layer: str = "cp",
                 gate: str = "entmax15", hidden: int | None = 512, epochs: int = 40, seed: int = 0,
                 budget: int | None = None, store: StoreLike = None, refresh: bool = False,
                 progress: Progress | None = None, analysis: dict[str, Any] | None = None, device: str = "auto",
                 **data_settings: Any) -> MMoECurve:
    """Train an MMoE probe per expert count, analyse its experts and assemble the curve (``mmoe.curve``).

    Every probe and report is stored separately (adding an expert count reuses the others);
    ``refresh`` retrains the MMoE probes and recomputes their reports (not the baselines).
    ``analysis``: overrides of ``ANALYSIS_DEFAULTS`` (eval_on all | test, top_k, load_threshold,
    min_flips, min_effect, null_draws). The rank of every MMoE is chosen so its first layer
    has at most as many parameters as the linear layer it replaces (``budget``).
    """
    counts = curves.parse_experts(experts)
    settings = curves.analysis_settings(analysis)
    spec = DataSpec(data=data, seed=seed, **data_settings)
    params = CurveParams(experts=counts, layer=layer, gate=gate, hidden=hidden, epochs=epochs, budget=budget,
                         data=spec, analysis=settings)
    for n in counts:
        probe_settings(params.probe(n))  # ConfigError (layer, gate, epochs) before any training
    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    fs, fp = _features(spec, dataclasses.replace(ctx, refresh=False))
    curve = run(CURVE, feature_subject(fs, fp), params, ctx=ctx)
    return dataclasses.replace(curve, key=entry_key(fp, CURVE.name, params.store_params(), CURVE.code_version))


def mmoe_bias(data: str = "docstrings", n_experts: int = 16, *, target: str | int = "scipy", keep: float = 0.15,
              n_scaled: int = 3, scale: float = 0.0, layer: str = "cp", gate: str = "entmax15",
              hidden: int | None = 512, epochs: int = 40, seed: int = 0, store: StoreLike = None,
              refresh: bool = False, progress: Progress | None = None, device: str = "auto",
              **data_settings: Any) -> BiasDemo:
    """Bias-correction demo (``mmoe.bias``): train an MMoE probe with only ``keep`` of ``target``'s
    training samples (an under-represented class), choose on one half of the test split the
    ``n_scaled`` experts most responsible for ``target``'s errors, scale their coefficients
    by ``scale`` and report per-class accuracy on the other half (before, after, change)."""
    bias_mod.check_keep(keep)
    spec = DataSpec(data=data, seed=seed, **data_settings)
    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    fs, fp = _features(spec, dataclasses.replace(ctx, refresh=False))
    t = bias_mod.target_index(target, fs.classes)
    probe = {"layer": layer, "n_experts": n_experts, "hidden": hidden, "gate": gate, "epochs": epochs, "seed": seed}
    params = BiasParams(probe=probe_settings(probe), data=spec, target=t, keep=keep, n_scaled=n_scaled, scale=scale,
                        data_id=data_id(fs.X, fs.y))
    return run(BIAS, feature_subject(fs, fp), params, ctx=ctx)


def experts_routing(source: Any = "tiny-mixtral", *, packages: Sequence[str] | None = None, per_package: int = 40,
                    max_tokens: int = 64, min_count: int = 5, seed: int = 0, store: StoreLike = None,
                    refresh: bool = False, progress: Progress | None = None, trust_pickle: bool = False,
                    device: str = "auto") -> routing.RoutingStats:
    """Routing statistics of a routed MoE (``analysis.experts.routing``) on docstrings, stored as
    ``experts.routing``; the model runs on ``device``. Raises SourceError for a model without routers."""
    from analysis.sources import open_source

    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    src = open_source(source, trust_pickle=trust_pickle)
    routing.require_routers(src)  # typed error before booting anything
    pk = tuple(packages) if packages else DOC_PACKAGES
    params = RoutingParams(packages=pk, per_package=per_package, max_tokens=max_tokens, min_count=min_count,
                           seed=seed, versions=corpus_versions(pk))
    return run(ROUTING, src, params, ctx=ctx)


# -- reading back ---------------------------------------------------------------------------------
def stored_mmoe_curves(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of stored curves (``mmoe.curve``), newest first (never computes)."""
    return runner.stored(CURVE, fingerprint, store=store)


def load_mmoe_curve(key: str, store: StoreLike = None) -> MMoECurve:
    """The stored curve with this entry key (or unique prefix); NotStoredError when absent."""
    st = open_store(store)
    curve = runner.load(key, store=st, analysis=CURVE)
    return dataclasses.replace(curve, key=runner.entry(key, store=st).key)


def stored_expert_reports(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of stored expert reports (``mmoe.specialisation``), newest first (never computes)."""
    return runner.stored(SPECIALISATION, fingerprint, store=store)


def load_expert_report(key: str, store: StoreLike = None) -> ExpertReport:
    """The stored expert report with this key (``MMoECurve.keys[n]``); NotStoredError when absent."""
    return runner.load(key, store=store, analysis=SPECIALISATION)


def stored_mmoe_bias(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of stored bias-correction demos (``mmoe.bias``), newest first (never computes)."""
    return runner.stored(BIAS, fingerprint, store=store)


def load_mmoe_bias(key: str, store: StoreLike = None) -> BiasDemo:
    """The stored bias-correction demo with this key; NotStoredError when absent."""
    return runner.load(key, store=store, analysis=BIAS)


def stored_experts_routing(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of stored routing analyses (``experts.routing``), newest first (never computes)."""
    return runner.stored(ROUTING, fingerprint, store=store)


def load_experts_routing(key: str, store: StoreLike = None) -> routing.RoutingStats:
    """The stored routing statistics with this key; NotStoredError when absent."""
    return runner.load(key, store=store, analysis=ROUTING)


# -- deprecated names (old behaviour) -------------------------------------------------------------
DEPRECATED = {"mmoe_curves": "stored_mmoe_curves", "stored_bias_demos": "stored_mmoe_bias",
              "stored_routing": "stored_experts_routing"}


def _message(old: str) -> str:
    return f"{old} is deprecated; use {DEPRECATED[old]} (index rows) and its load_ function"


def mmoe_curves(store: StoreLike = None) -> list[EntryInfo]:
    """Deprecated: ``stored_mmoe_curves(store=store)``."""
    warnings.warn(_message("mmoe_curves"), DeprecationWarning, stacklevel=2)
    return stored_mmoe_curves(store=store)


def stored_bias_demos(store: StoreLike = None) -> list[BiasDemo]:
    """Deprecated: stored bias-correction demos (any code version), newest first; use
    ``stored_mmoe_bias`` and ``load_mmoe_bias``."""
    warnings.warn(_message("stored_bias_demos"), DeprecationWarning, stacklevel=2)
    st = open_store(store)
    out = []
    for e in st.list(analysis=BIAS.name):
        res = st.get_by_key(e.key)
        if res is not None:
            out.append(bias_mod.bias_from_result(res))
    return out


def stored_routing(store: StoreLike = None) -> list[tuple[EntryInfo, routing.RoutingStats]]:
    """Deprecated: (EntryInfo, RoutingStats) of every stored routing analysis, newest first; use
    ``stored_experts_routing`` and ``load_experts_routing``."""
    warnings.warn(_message("stored_routing"), DeprecationWarning, stacklevel=2)
    st = open_store(store)
    out = []
    for e in stored_experts_routing(store=st):
        res = st.get_by_key(e.key)
        if res is not None:
            out.append((e, routing.from_result(res)))
    return out


__all__ = ["BiasDemo", "DataSpec", "ExpertReport", "MMoECurve", "DEPRECATED", "data_id", "experts_routing",
           "load_experts_routing", "load_expert_report", "load_mmoe_bias", "load_mmoe_curve", "mmoe_analyze",
           "mmoe_bias", "mmoe_curves", "mmoe_features", "mmoe_probe", "mmoe_train", "stored_bias_demos",
           "stored_experts_routing", "stored_expert_reports", "stored_mmoe_bias", "stored_mmoe_curves",
           "stored_routing"]
