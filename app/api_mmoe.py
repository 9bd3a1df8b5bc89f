"""Python API of the MMoE probes and expert analyses (re-exported by ``app.api``).

    >>> from app import api
    >>> curve = api.mmoe_analyze("digits", experts=(8, 16, 32, 64, 128, 256))
    >>> curve.table[["n_experts", "accuracy", "mean_effect_polysemanticity"]]
    >>> report = api.load_expert_report(curve.keys[64])      # one MMoE's experts in detail
    >>> routing = api.experts_routing("tiny-mixtral")           # a routed (sparse) MoE

Everything is cached in the results store (``store=``: a ``Store``, a directory or None):

- ``mmoe.features``: MiniLM sentence embeddings of the docstring task (fingerprint = MiniLM's;
  params = corpus settings + installed package versions, so an upgrade re-embeds);
- ``mmoe.probe``: one trained probe (weights, BatchNorm statistics, scaling, accuracies);
- ``mmoe.specialisation``: one MMoE's expert report (``analysis.experts.specialisation.specialisation``);
- ``mmoe.curve``: one row per expert count, what the specialisation figure plots;
- ``mmoe.bias``: the bias-correction demo;
- ``experts.routing``: routing statistics of a routed MoE (``analysis.experts.routing``).

MMoE entries are keyed by a dataset fingerprint: for digits a hash of the data, for the
docstring task MiniLM's fingerprint (the data id is in the params).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.experts import specialisation as ex
from analysis.errors import ConfigError, SourceError
from analysis.store import Result, Store, entry_key
from probes.training import DATASETS, DOC_PACKAGES, FeatureSet, ProbeClassifier

Progress = Callable[[int, int, str], None]
FEATURES = "mmoe.features"
PROBE = "mmoe.probe"
SPECIALISATION = "mmoe.specialisation"
CURVE = "mmoe.curve"
BIAS = "mmoe.bias"
ROUTING = "experts.routing"
CODE_VERSION = "mmoe-1"
DEFAULT_EXPERTS = (8, 16, 32, 64, 128, 256)
DIGITS_LABEL = "sklearn digits (8x8)"
# The single-layer linear probe converges slowly at the MLP's lr 2e-3; at 1e-2 it matches
# sklearn's LogisticRegression on digits (0.952 test accuracy, same split).
LINEAR_PROBE_LR = 1e-2


def _store(store: Store | str | os.PathLike | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _tick(progress: Progress | None, done: int, total: int, label: str) -> None:
    if progress is not None:
        progress(done, total, label)


def data_id(X: np.ndarray, y: np.ndarray) -> str:
    """32-hex content hash of features and labels (float32 / int64 bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Which labelled features the probes train on (validated; ConfigError on bad values)."""

    data: str = "digits"  # digits | docstrings
    packages: tuple[str, ...] = DOC_PACKAGES  # docstrings: the classes
    per_package: int = 200  # docstrings: at most this many texts per package
    max_tokens: int = 128  # docstrings: MiniLM truncation
    encoder: str = "minilm"  # docstrings: source of the sentence encoder
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ConfigError(f"unknown data {self.data!r}; choose one of {', '.join(DATASETS)}")
        object.__setattr__(self, "packages", tuple(self.packages))
        if len(self.packages) < 2:
            raise ConfigError(f"packages={self.packages}: a classification task needs at least 2 packages")
        if self.per_package < 5 or self.max_tokens < 4:
            raise ConfigError(f"per_package={self.per_package} must be >= 5 and max_tokens={self.max_tokens} >= 4")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction={self.test_fraction} must lie strictly between 0 and 1")

    def params(self) -> dict[str, Any]:
        base = {"data": self.data, "test_fraction": self.test_fraction, "seed": self.seed}
        if self.data == "docstrings":
            base |= {"packages": list(self.packages), "per_package": self.per_package,
                     "max_tokens": self.max_tokens, "encoder": self.encoder}
        return base


def _corpus_versions(packages: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"sklearn": "scikit-learn"}
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = version(dist.get(p, p))
        except PackageNotFoundError:
            out[p] = "stdlib"
    return out


def mmoe_features(spec: DataSpec | None = None, *, store: Store | str | None = None, refresh: bool = False,
                  progress: Progress | None = None) -> tuple[FeatureSet, str]:
    """(features, dataset fingerprint). Digits load instantly; docstring embeddings are
    computed once with MiniLM and cached in the store (``mmoe.features``)."""
    from probes import training as tr

    spec = spec or DataSpec()
    st = _store(store)
    if spec.data == "digits":
        fs = tr.digits_features(test_fraction=spec.test_fraction, seed=spec.seed)
        fp = data_id(fs.X, fs.y)
        st.register_model(fp, DIGITS_LABEL, "dataset", n_tensors=1, n_params=int(fs.X.size),
                          info={"classes": list(fs.classes)})
        return fs, fp
    from analysis.sources import open_source
    from app import api

    src = open_source(spec.encoder)
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: sentence features need a Hugging Face encoder directory (config.json + "
                          "tokenizer), e.g. 'minilm'")
    items = tr.docstring_items(spec.packages, per_package=spec.per_package, seed=spec.seed)
    params = {"packages": list(spec.packages), "per_package": spec.per_package, "max_tokens": spec.max_tokens,
              "seed": spec.seed, "pooling": "mean+l2", "versions": _corpus_versions(spec.packages)}

    def compute() -> Result:
        X = tr.embed_texts(src.model_dir(), [d.text for d in items], max_tokens=spec.max_tokens, progress=progress)
        table = pd.DataFrame({"text": [d.text for d in items], "package": [d.package for d in items],
                              "qualname": [d.qualname for d in items]})
        return Result(table=table, arrays={"X": X}, meta={"n": len(items), "d_model": int(X.shape[1])})

    result = st.cached(src.fingerprint, FEATURES, params, CODE_VERSION, compute, refresh=refresh)
    api.register(src, st)
    table = result.table
    if list(table["text"]) != [d.text for d in items]:  # same params, different corpus walk: recompute
        result = st.cached(src.fingerprint, FEATURES, params, CODE_VERSION, compute, refresh=True)
        table = result.table
    fs = tr.docstring_features(items, np.array(result.arrays["X"]), spec.packages, test_fraction=spec.test_fraction,
                               seed=spec.seed)
    return fs, src.fingerprint


# -- probes -------------------------------------------------------------------------------------
def _probe_params(probe: dict[str, Any]) -> dict[str, Any]:
    return ProbeClassifier(**probe).params()  # validates (ConfigError) and fills defaults


def mmoe_probe(fs: FeatureSet, fingerprint: str, probe: dict[str, Any], *, store: Store | str | None = None,
               refresh: bool = False, progress: Progress | None = None) -> tuple[ProbeClassifier, dict[str, Any]]:
    """Train (or load) one probe on ``fs``'s train split: (fitted probe, its stored meta)."""
    st = _store(store)
    params = {"probe": _probe_params(probe), "data_id": data_id(fs.X, fs.y), "data": fs.name}
    Xtr, ytr = fs.train
    Xte, yte = fs.test

    def compute() -> Result:
        clf = ProbeClassifier(**params["probe"]).fit(Xtr, ytr, progress=progress)
        meta = {"describe": clf.describe(), "test_accuracy": clf.score(Xte, yte),
                "train_accuracy": clf.score(Xtr, ytr), "n_params": int(clf.n_params_),
                "layer_params": int(clf.layer_params_), "budget": int(clf.budget_), "rank": clf.rank_,
                "n_classes": int(clf.n_classes_), "seconds": clf.fit_seconds_, "classes": list(fs.classes)}
        return Result(arrays=clf.state_arrays(), meta=meta)

    result = st.cached(fingerprint, PROBE, params, CODE_VERSION, compute, refresh=refresh)
    clf = ProbeClassifier.from_state(params["probe"], dict(result.arrays), int(result.meta["n_classes"]))
    return clf, dict(result.meta)


def mmoe_train(data: str = "digits", n_experts: int = 64, *, layer: str = "cp", gate: str = "entmax15",
               hidden: int | None = 512, epochs: int = 40, seed: int = 0, budget: int | None = None,
               store: Store | str | None = None, refresh: bool = False, progress: Progress | None = None,
               **data_settings: Any) -> pd.DataFrame:
    """Train the linear probe, the parameter-matched linear layer and the MMoE probe.

    Returns one row per probe: probe, layer_params (the replaced layer), budget, rank,
    n_params (whole probe), test_accuracy, train_accuracy, seconds. ``data_settings``:
    ``DataSpec`` fields (packages, per_package, max_tokens, encoder, test_fraction).
    """
    spec = DataSpec(data=data, seed=seed, **data_settings)
    fs, fp = mmoe_features(spec, store=store, progress=progress)
    common = {"epochs": epochs, "seed": seed}
    probes = [{"layer": "linear", "hidden": None, **common, "lr": LINEAR_PROBE_LR},
              {"layer": "linear", "hidden": hidden, **common},
              {"layer": layer, "n_experts": n_experts, "hidden": hidden, "gate": gate, "budget": budget, **common}]
    if hidden is None:
        probes = [probes[0], probes[2]]
    rows = []
    for i, p in enumerate(probes):
        _tick(progress, i, len(probes), f"training probe {i + 1}/{len(probes)}")
        _, meta = mmoe_probe(fs, fp, p, store=store, refresh=refresh)
        rows.append({"probe": meta["describe"], **{k: meta[k] for k in ("layer_params", "budget", "rank", "n_params",
                                                                         "test_accuracy", "train_accuracy",
                                                                         "seconds")}})
    return pd.DataFrame(rows)


# -- specialisation -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ExpertReport:
    """One MMoE probe's experts (``analysis.experts.specialisation.Specialisation`` as stored).

    ``experts``: one row per expert; ``expert_class`` and ``per_class_drop`` (N, C);
    ``examples``: one row per (expert, rank) top-activating sample (expert, rank, sample,
    gate, label, predicted, text); ``images`` (N, k, 8, 8) for digits else None; ``summary``
    and ``meta`` (accuracies, classes, settings).
    """

    n_experts: int
    classes: tuple[str, ...]
    experts: pd.DataFrame
    expert_class: np.ndarray
    per_class_drop: np.ndarray
    examples: pd.DataFrame
    images: np.ndarray | None
    summary: dict
    meta: dict


def _report_result(spec_: ex.Specialisation, fs: FeatureSet, sample_idx: np.ndarray, meta: dict) -> Result:
    n_experts, k = spec_.top_index.shape
    rows = []
    for e in range(n_experts):
        for r in range(k):
            i = int(sample_idx[spec_.top_index[e, r]])
            rows.append({"expert": e, "rank": r, "sample": i, "gate": float(spec_.top_value[e, r]),
                         "label": fs.classes[fs.y[i]],
                         "predicted": fs.classes[int(spec_.ablation.base_pred[spec_.top_index[e, r]])],
                         "text": fs.texts[i]})
    arrays = {"expert_class": spec_.expert_class, "per_class_drop": spec_.ablation.per_class_drop}
    if fs.images is not None:
        arrays["images"] = fs.images[sample_idx[spec_.top_index]].astype(np.float32)
    return Result(table=spec_.experts, arrays=arrays,
                  meta={**meta, "summary": spec_.summary, "examples": rows, "classes": list(fs.classes)})


def _report_from_result(result: Result) -> ExpertReport:
    meta = dict(result.meta)
    return ExpertReport(int(meta["summary"]["n_experts"]), tuple(meta["classes"]), result.table,
                        np.array(result.arrays["expert_class"]), np.array(result.arrays["per_class_drop"]),
                        pd.DataFrame(meta.pop("examples")), np.array(result.arrays["images"])
                        if "images" in result.arrays else None, dict(meta["summary"]), meta)


@dataclass(frozen=True, eq=False)
class MMoECurve:
    """Specialisation against the number of experts.

    ``table``: one row per expert count: n_experts, rank, layer_params, budget, accuracy
    (test split), the baselines' accuracies, mean_polysemanticity / mean_null_polysemanticity /
    n_experts_counted (flip-based), the effect-weighted versions, usage_entropy,
    experts_loaded, mean_active_experts, seconds. ``keys``: n_experts -> store key of the
    ``mmoe.specialisation`` entry; ``meta``: data, probe settings, baselines.
    """

    table: pd.DataFrame
    keys: dict[int, str]
    meta: dict
    key: str = ""


ANALYSIS_DEFAULTS = {"eval_on": "all", "top_k": 5, "load_threshold": 0.5, "min_flips": 3, "min_effect": 1.0,
                     "null_draws": 32}


def _eval_split(fs: FeatureSet, eval_on: str) -> np.ndarray:
    if eval_on == "all":
        return np.arange(len(fs.y))
    if eval_on == "test":
        return np.flatnonzero(fs.is_test)
    raise ConfigError(f"eval_on={eval_on!r}: choose all (train + test samples) or test")


def _parse_experts(experts: int | str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(experts, str):
        try:
            experts = [int(x) for x in experts.replace(" ", "").split(",") if x]
        except ValueError as exc:
            raise ConfigError(f"--experts {experts!r}: give comma-separated integers such as 8,16,32") from exc
    out = (int(experts),) if isinstance(experts, (int, np.integer)) else tuple(int(n) for n in experts)
    if not out or min(out) < 1:
        raise ConfigError(f"experts={out}: give at least one expert count, each >= 1")
    return tuple(sorted(set(out)))


def mmoe_analyze(data: str = "digits", experts: int | str | Sequence[int] = DEFAULT_EXPERTS, *, layer: str = "cp",
                 gate: str = "entmax15", hidden: int | None = 512, epochs: int = 40, seed: int = 0,
                 budget: int | None = None, store: Store | str | None = None, refresh: bool = False,
                 progress: Progress | None = None, analysis: dict[str, Any] | None = None,
                 **data_settings: Any) -> MMoECurve:
    """Train an MMoE probe per expert count, analyse its experts and assemble the curve.

    Every probe and report is cached separately (adding an expert count reuses the others).
    ``analysis``: overrides of ``ANALYSIS_DEFAULTS`` (eval_on all | test, top_k, load_threshold,
    min_flips, min_effect, null_draws). The rank of every MMoE is chosen so its first layer
    has at most as many parameters as the linear layer it replaces (``budget``).
    """
    counts = _parse_experts(experts)
    settings = {**ANALYSIS_DEFAULTS, **(analysis or {})}
    if unknown := sorted(set(settings) - set(ANALYSIS_DEFAULTS)):
        raise ConfigError(f"unknown analysis setting(s) {unknown}; valid: {', '.join(ANALYSIS_DEFAULTS)}")
    spec = DataSpec(data=data, seed=seed, **data_settings)
    st = _store(store)
    t_start = time.perf_counter()
    fs, fp = mmoe_features(spec, store=st, progress=progress)
    idx = _eval_split(fs, settings["eval_on"])
    total = len(counts) + 2
    common = {"epochs": epochs, "seed": seed}
    _tick(progress, 0, total, "baselines")
    _, lin = mmoe_probe(fs, fp, {"layer": "linear", "hidden": None, **common, "lr": LINEAR_PROBE_LR}, store=st)
    matched = mmoe_probe(fs, fp, {"layer": "linear", "hidden": hidden, **common}, store=st)[1] if hidden else None
    rows, keys = [], {}
    for i, n in enumerate(counts):
        _tick(progress, i + 1, total, f"{layer.upper()} MMoE with {n} experts")
        probe_cfg = {"layer": layer, "n_experts": n, "hidden": hidden, "gate": gate, "budget": budget, **common}
        t0 = time.perf_counter()
        clf, meta = mmoe_probe(fs, fp, probe_cfg, store=st, refresh=refresh)
        params = {"probe": clf.params(), "data_id": data_id(fs.X, fs.y), "data": spec.params(),
                  "analysis": settings}
        X_eval, y_eval = fs.X[idx], fs.y[idx]

        def compute(clf=clf, X_eval=X_eval, y_eval=y_eval, meta=meta) -> Result:
            s = ex.specialisation(clf.gates(X_eval), y_eval, len(fs.classes), lambda sc: clf.logits(X_eval, sc),
                                  load_threshold=settings["load_threshold"], top_k=settings["top_k"],
                                  min_flips=settings["min_flips"], min_effect=settings["min_effect"],
                                  null_draws=settings["null_draws"], seed=seed)
            return _report_result(s, fs, idx, {"probe": meta, "settings": settings, "data": spec.params()})

        res = st.cached(fp, SPECIALISATION, params, f"{CODE_VERSION}/{ex.CODE_VERSION}", compute, refresh=refresh)
        keys[n] = entry_key(fp, SPECIALISATION, params, f"{CODE_VERSION}/{ex.CODE_VERSION}")
        s = res.meta["summary"]
        rows.append({"n_experts": n, "rank": meta["rank"], "layer_params": meta["layer_params"],
                     "budget": meta["budget"], "n_params": meta["n_params"], "accuracy": meta["test_accuracy"],
                     "linear_probe_accuracy": lin["test_accuracy"],
                     "matched_linear_accuracy": matched["test_accuracy"] if matched else np.nan,
                     "eval_accuracy": s["accuracy"],
                     **{k: s[k] for k in ("mean_polysemanticity", "mean_null_polysemanticity", "n_experts_counted",
                                          "mean_effect_polysemanticity", "mean_null_effect_polysemanticity",
                                          "n_experts_counted_effect", "usage_entropy", "max_usage_entropy",
                                          "experts_loaded", "mean_active_experts", "mean_class_entropy")},
                     "seconds": time.perf_counter() - t0})
    table = pd.DataFrame(rows)
    meta = {"data": spec.params(), "classes": list(fs.classes), "layer": layer, "gate": gate, "hidden": hidden,
            "epochs": epochs, "seed": seed, "analysis": settings, "n_eval": int(len(idx)),
            "linear_probe": {k: lin[k] for k in ("test_accuracy", "n_params")},
            "matched_linear": ({k: matched[k] for k in ("test_accuracy", "n_params", "layer_params")}
                               if matched else None),
            "keys": {str(k): v for k, v in keys.items()}, "seconds": time.perf_counter() - t_start,
            "label": f"{DIGITS_LABEL if data == 'digits' else 'docstrings · ' + spec.encoder}"}
    curve_params = {"experts": list(counts), "probe": {"layer": layer, "gate": gate, "hidden": hidden,
                                                        "epochs": epochs, "budget": budget},
                    "data": spec.params(), "analysis": settings}
    info = st.put(fp, CURVE, curve_params, CODE_VERSION, Result(table=table, meta=meta))
    _tick(progress, total, total, "done")
    return MMoECurve(table, keys, meta, info.key)


def mmoe_curves(store: Store | str | None = None) -> list:
    """Index rows (``EntryInfo``) of stored curves, newest first (never computes)."""
    return [e for e in _store(store).list(analysis=CURVE) if e.code_version == CODE_VERSION]


def load_mmoe_curve(key: str, store: Store | str | None = None) -> MMoECurve | None:
    """The stored curve with this entry key, or None."""
    res = _store(store).get_by_key(key)
    if res is None:
        return None
    keys = {int(k): v for k, v in res.meta.get("keys", {}).items()}
    return MMoECurve(res.table, keys, dict(res.meta), key)


def load_expert_report(key: str, store: Store | str | None = None) -> ExpertReport | None:
    """The stored ``mmoe.specialisation`` entry with this key, or None."""
    res = _store(store).get_by_key(key)
    return None if res is None else _report_from_result(res)


# -- bias correction demo -----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BiasDemo:
    """``analysis.experts.specialisation.BiasCorrection`` plus the settings and class names of the run."""

    target: str
    experts: tuple[int, ...]
    table: pd.DataFrame  # class, n_samples, before, after, change
    accuracy_before: float
    accuracy_after: float
    n_errors: int
    meta: dict


def mmoe_bias(data: str = "docstrings", n_experts: int = 16, *, target: str | int = "scipy", keep: float = 0.15,
              n_scaled: int = 3, scale: float = 0.0, layer: str = "cp", gate: str = "entmax15",
              hidden: int | None = 512, epochs: int = 40, seed: int = 0, store: Store | str | None = None,
              refresh: bool = False, progress: Progress | None = None, **data_settings: Any) -> BiasDemo:
    """Bias-correction demo: train an MMoE probe with only ``keep`` of ``target``'s training
    samples (an under-represented class), choose on one half of the test split the
    ``n_scaled`` experts most responsible for ``target``'s errors, scale their coefficients
    by ``scale`` and report per-class accuracy on the other half (before, after, change)."""
    if not 0 < keep <= 1:
        raise ConfigError(f"keep={keep}: the share of the target's training samples must be in (0, 1]")
    spec = DataSpec(data=data, seed=seed, **data_settings)
    st = _store(store)
    fs, fp = mmoe_features(spec, store=st, progress=progress)
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in fs.classes:
            raise ConfigError(f"target class {target!r} is not one of {', '.join(fs.classes)}")
        t = fs.classes.index(target)
    else:
        t = int(target)
        if not 0 <= t < len(fs.classes):
            raise ConfigError(f"target class {t} is not in [0, {len(fs.classes)})")
    rng = np.random.default_rng(seed)
    train = ~fs.is_test & ((fs.y != t) | (rng.random(len(fs.y)) < keep))
    biased = FeatureSet(fs.name, fs.X, fs.y, ~train, fs.classes, fs.texts, fs.images)
    test = np.flatnonzero(fs.is_test)
    sel, ev = test[0::2], test[1::2]
    probe_cfg = {"layer": layer, "n_experts": n_experts, "hidden": hidden, "gate": gate, "epochs": epochs, "seed": seed}
    params = {"probe": _probe_params(probe_cfg), "data": spec.params(), "target": t, "keep": keep,
              "n_scaled": n_scaled, "scale": scale, "data_id": data_id(fs.X, fs.y)}

    def compute() -> Result:
        clf = ProbeClassifier(**params["probe"]).fit(*biased.train, progress=progress)
        b = ex.bias_correction(lambda s: clf.logits(fs.X[sel], s), fs.y[sel], lambda s: clf.logits(fs.X[ev], s),
                               fs.y[ev], n_experts, len(fs.classes), target=t, n_scaled=n_scaled, scale=scale)
        table = b.table.assign(**{"class": [fs.classes[c] for c in b.table["class"]]})
        return Result(table=table, arrays={"score": b.score, "responsibility": b.responsibility, "harm": b.harm},
                      meta={"target": fs.classes[t], "experts": list(b.experts), "n_errors": b.n_errors,
                            "accuracy_before": b.accuracy_before, "accuracy_after": b.accuracy_after,
                            "n_select": len(sel), "n_eval": len(ev), "n_experts": n_experts, "keep": keep,
                            "scale": scale, "n_scaled": n_scaled, "data": spec.params(),
                            "n_train": int(train.sum())})

    res = st.cached(fp, BIAS, params, f"{CODE_VERSION}/{ex.CODE_VERSION}", compute, refresh=refresh)
    m = dict(res.meta)
    return BiasDemo(m["target"], tuple(m["experts"]), res.table, m["accuracy_before"], m["accuracy_after"],
                    m["n_errors"], m)


def stored_bias_demos(store: Store | str | None = None) -> list[BiasDemo]:
    """Stored bias-correction demos, newest first (never computes)."""
    st = _store(store)
    out = []
    for e in st.list(analysis=BIAS):
        res = st.get_by_key(e.key)
        if res is not None:
            m = dict(res.meta)
            out.append(BiasDemo(m["target"], tuple(m["experts"]), res.table, m["accuracy_before"],
                                m["accuracy_after"], m["n_errors"], m))
    return out


# -- routed MoE ---------------------------------------------------------------------------------
def experts_routing(source: Any = "tiny-mixtral", *, packages: Sequence[str] | None = None, per_package: int = 40,
                    max_tokens: int = 64, min_count: int = 5, seed: int = 0, store: Store | str | None = None,
                    refresh: bool = False, progress: Progress | None = None, trust_pickle: bool = False):
    """Routing statistics of a routed MoE (``analysis.experts.routing``) on docstrings, cached
    (``experts.routing``). Raises ConfigError for a model without routers."""
    from analysis.experts import routing
    from analysis.sources import open_source
    from app import api

    src = open_source(source, trust_pickle=trust_pickle)
    routing.require_routers(src)  # typed error before booting anything
    pk = tuple(packages) if packages else DOC_PACKAGES
    params = {"packages": list(pk), "per_package": per_package, "max_tokens": max_tokens, "min_count": min_count,
              "seed": seed, "versions": _corpus_versions(pk)}
    st = _store(store)

    def compute() -> Result:
        from probes.training import docstring_items

        items = docstring_items(pk, per_package=per_package, seed=seed, min_per_package=1)
        log = routing.collect_routing(src, [d.text for d in items], [d.package for d in items],
                                      max_tokens=max_tokens, progress=progress)
        return routing.to_result(routing.routing_stats(log, min_count=min_count, seed=seed))

    result = st.cached(src.fingerprint, ROUTING, params, routing.CODE_VERSION, compute, refresh=refresh)
    api.register(src, st)
    return routing.from_result(result)


def stored_routing(store: Store | str | None = None) -> list:
    """(EntryInfo, RoutingStats) of every stored routing analysis, newest first (never computes)."""
    from analysis.experts import routing

    st = _store(store)
    out = []
    for e in st.list(analysis=ROUTING):
        if e.code_version != routing.CODE_VERSION:
            continue
        res = st.get_by_key(e.key)
        if res is not None:
            out.append((e, routing.from_result(res)))
    return out


__all__ = ["DataSpec", "ExpertReport", "MMoECurve", "BiasDemo", "mmoe_features", "mmoe_probe", "mmoe_train",
           "mmoe_analyze", "mmoe_curves", "load_mmoe_curve", "load_expert_report", "mmoe_bias", "stored_bias_demos",
           "experts_routing", "stored_routing", "data_id"]
