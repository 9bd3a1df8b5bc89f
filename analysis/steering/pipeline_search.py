"""The steering search on the runner, and its API (re-exported by ``app.api``).

    >>> res = api.steer_search("bilinear-lm", "numpy-torch", sources=("mean_diff", "pca", "logistic"),
    ...                        strengths=(-1, 1), budget=240)
    >>> res.front                     # the Pareto front: effect vs KL (LM) or embedding drift (encoder)
    >>> res.comparison                # per source: best effect at equal side effect, and who wins
    >>> res.chosen                    # {"source", "layer", "alpha", "site", ...}
    >>> api.steer_search_export(res, "chosen.safetensors", gguf="chosen.gguf")

Two stored analyses, code version ``steering-search-1``:

- ``steering.point``: one setting (a float32 vector added at a site of one layer with strength α)
  scored against the unsteered model (``analysis.steering.search_measure``). Keyed by the
  vector's bytes, layer, site, α and the measurement (contrast set, concept tokens, neutral
  texts, max_tokens, masked loss), so every search that meets the same setting reuses it: a
  re-run with a larger budget, another range or another source list computes only new points.
- ``steering.search``: the whole search (``analysis.steering.search_opt``): every evaluated
  setting, the front, the chosen setting and the per-source comparison.

Forward-pass budget: ``budget`` batched forward passes = the unsteered baseline + settings ×
``passes_per_setting`` (the extraction that gives the method directions is stored apart and not
counted). The budget must cover the baseline and one setting per (source, layer) line, else a
``ConfigError`` before anything boots; so must every other bad input (``search_space``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.corpus import docstring_corpus
from analysis.errors import ConfigError
from analysis.progress import Progress
from analysis.run import Analysis, RunContext, StoreLike, Subject, has, load, open_store, register, run, stored
from analysis.sources import open_source
from analysis.steering import search_measure as sm
from analysis.steering import search_opt as so
from analysis.steering import search_space as ss
from analysis.steering.contrasts import load_contrasts
from analysis.steering.pipeline import EXTRACT, extract_params
from analysis.steering.pipeline_vectors import MLM_HEAD, ContrastLike, SourceLike, boot_mlm_head
from analysis.steering.search_directions import POST_NORM_TYPES, Fixed, fixed_digest, fixed_direction
from analysis.store import EntryInfo, Result

CODE_VERSION = "steering-search-1"
NEUTRAL = ("collections", "logging")  # standard-library docstrings: text about neither side of a contrast set
DEFAULT_MAX_SIDE = {"lm": 0.1, "encoder": 0.02}  # nats of KL per token / 1 − cos of neutral embeddings
LEVEL_FACTORS = (0.25, 0.5, 1.0, 2.0)


# -- one setting --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class PointParams:
    vector: np.ndarray  # (d_model,) float32: the exported vector exactly
    layer: int
    site: str
    alpha: float
    measure: dict[str, Any]
    baseline: Callable[[Any], sm.Baseline] | None = None  # not in the key: the search's unsteered numbers
    use_head: bool = False

    def store_params(self) -> dict[str, Any]:
        digest = hashlib.blake2b(np.ascontiguousarray(self.vector, np.float32).tobytes(), digest_size=16).hexdigest()
        return {"vector": digest, "layer": self.layer, "site": self.site, "alpha": self.alpha, **self.measure}


def _point_compute(subject: Subject, p: PointParams, ctx: RunContext) -> Result:
    with ctx.lock:
        bridge = ctx.bridge(subject.source, variant=MLM_HEAD, boot=boot_mlm_head) if p.use_head \
            else ctx.bridge(subject.source)
        row = sm.score(bridge, p.baseline(bridge), p.vector, p.alpha, p.layer, p.site)
    return Result(table=pd.DataFrame([row]))


POINT = register(Analysis(name="steering.point", code_version=CODE_VERSION, compute=_point_compute,
                          from_result=lambda r: {k: float(v) for k, v in r.table.iloc[0].items()},
                          doc="one steering setting's effect and side effects"))


# -- the search -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SearchResult:
    """Every evaluated setting (``table``, in evaluation order, ``on_front`` / ``chosen`` marked), the
    per-source ``comparison``, the ``chosen`` setting and the run's ``meta`` (budget, passes, norms)."""

    table: pd.DataFrame
    comparison: pd.DataFrame
    chosen: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def side(self) -> str:
        return str(self.meta["side"])

    @property
    def front(self) -> pd.DataFrame:
        return self.table[self.table["on_front"]].sort_values(self.side).reset_index(drop=True)


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchParams:
    contrasts: Any
    sources: tuple[ss.DirectionSource, ...]
    fixed: dict[str, Fixed | None]  # the non-extraction directions (their digests are in the key)
    layers: tuple[int, ...]
    site: str
    strengths: tuple[float, float]
    budget: int
    n_coarse: int
    max_side: float
    kind: str
    neutral: tuple[str, ...]
    n_neutral: int
    max_tokens: int
    masked: bool
    passes_per_setting: int
    baseline_passes: int
    n_settings: int
    neutral_texts: tuple[str, ...] = ()

    def measure_key(self) -> dict[str, Any]:
        cs = self.contrasts
        return {"contrast_fingerprint": cs.fingerprint, "concept": [list(cs.concept_positive),
                                                                    list(cs.concept_negative)],
                "neutral": [list(self.neutral), self.n_neutral], "max_tokens": self.max_tokens,
                "masked": self.masked, "kind": self.kind}

    def store_params(self) -> dict[str, Any]:
        return {**self.measure_key(), "sources": [s.spec for s in self.sources],
                "directions": [fixed_digest(self.fixed[s.spec]) for s in self.sources], "layers": list(self.layers),
                "site": self.site, "strengths": list(self.strengths), "budget": self.budget,
                "n_coarse": self.n_coarse, "max_side": self.max_side}


def neutral_texts(packages: Sequence[str], n: int) -> tuple[str, ...]:
    per = max(1, math.ceil(n / len(packages)))
    return tuple(d.text for d in docstring_corpus(tuple(packages), per_package=per, seed=0))[:n]


def search_params(source: Any, contrasts: ContrastLike, *, sources: Sequence[str] = ("mean_diff", "pca", "logistic"),
                  layers: Sequence[int] | None = None, site: str = "resid_post",
                  strengths: Sequence[float] = ss.DEFAULT_STRENGTHS, budget: int = ss.DEFAULT_BUDGET,
                  n_coarse: int = ss.DEFAULT_COARSE, max_side: float | None = None,
                  neutral: Sequence[str] = NEUTRAL, n_neutral: int = 32, max_tokens: int = 64, masked: bool = False,
                  store: StoreLike = None) -> SearchParams:
    """Validate a search (every bad input a typed error before any model boots; see the module docstring)."""
    src = open_source(source)
    budget = ss.check_budget(budget)
    cs = ss.check_contrasts(load_contrasts(contrasts))
    site = ss.check_site(site)
    lo, hi = ss.check_strengths(strengths)
    specs = ss.check_sources(sources)
    n_coarse = ss.check_positive_int(n_coarse, "n_coarse", "strengths per line in the coarse grid, e.g. 5")
    n_neutral = ss.check_positive_int(n_neutral, "n_neutral", "neutral texts for the side effects, e.g. 32")
    max_tokens = ss.check_positive_int(max_tokens, "max_tokens", "tokens per text, e.g. 64")
    n_layers, d_model, model_type = ss.model_layers(src)
    layers_t = ss.check_layers(layers, n_layers, src.label)
    kind = "encoder" if model_type in POST_NORM_TYPES else "lm"
    if masked and kind == "lm":
        raise ConfigError("masked=True (masked-token loss) is for encoders; a causal LM reports KL and perplexity")
    if max_side is None:
        max_side = DEFAULT_MAX_SIDE[kind]
    if isinstance(max_side, bool) or not isinstance(max_side, (int, float)) or not 0 < float(max_side) < math.inf:
        raise ConfigError(f"max_side={max_side!r} must be a positive number (the side-effect limit of the chosen "
                          "setting: KL nats per token for an LM, 1 − cos for an encoder)")
    st = open_store(store)
    fixed = {s.spec: fixed_direction(s, src, st, site=site, layers=layers_t, model_type=model_type, d_model=d_model)
             for s in specs}
    n_lines = sum(len(layers_t if f is None or f.layers is None else f.layers) for f in fixed.values())
    test_pos, test_neg = cs.texts("test")
    n_held = len(test_pos) + len(test_neg) if kind == "lm" else len(test_neg)
    per = sm.passes_per_setting(kind, n_held, n_neutral, masked)
    train_pos, train_neg = cs.texts("train")
    base = per + (sm.n_batches(len(train_pos)) + sm.n_batches(len(train_neg)) if kind == "encoder" else 0)
    n_settings = (budget - base) // per
    if n_settings < n_lines:
        raise ConfigError(f"budget={budget} forward passes covers {max(n_settings, 0)} settings after the baseline "
                          f"({base} passes; {per} per setting), fewer than the {n_lines} (source, layer) lines; "
                          f"raise it to at least {base + per * n_lines} or search fewer layers/sources")
    return SearchParams(contrasts=cs, sources=specs, fixed=fixed, layers=layers_t, site=site, strengths=(lo, hi),
                        budget=budget, n_coarse=n_coarse, max_side=float(max_side), kind=kind,
                        neutral=tuple(neutral), n_neutral=n_neutral, max_tokens=max_tokens, masked=bool(masked),
                        passes_per_setting=per, baseline_passes=base, n_settings=n_settings,
                        neutral_texts=neutral_texts(neutral, n_neutral))


def _mean_norms(ext: Any) -> dict[int, float]:
    """Mean token norm ‖h‖ per layer at the extraction's site (its ``act_norm`` column)."""
    t = ext.table[ext.table["method"] == "mean_diff"].set_index("layer")
    return {int(layer): float(t.loc[layer, "act_norm"]) for layer in ext.layers}


def _directions(p: SearchParams, ext: Any) -> dict[tuple[str, int], np.ndarray]:
    """(source spec, layer) -> the float32 vector n_L·v̂ added at α = 1."""
    norms = _mean_norms(ext)
    out: dict[tuple[str, int], np.ndarray] = {}
    for s in p.sources:
        f = p.fixed[s.spec]
        for layer in (p.layers if f is None or f.layers is None else f.layers):
            if f is None:
                raw = ext.vector(layer, s.method)
                if not np.isfinite(raw).all() or not np.any(raw):
                    warnings.warn(f"{s.spec} has no direction at layer {layer} (failed fit); that line is skipped",
                                  RuntimeWarning, stacklevel=2)
                    continue
                u = ss.unit(raw, f"{s.spec} at layer {layer}")
            else:
                u = f.per_layer[layer] if f.per_layer else f.unit
            out[(s.spec, layer)] = (norms[layer] * u).astype(np.float32)
    return out


def _baseline_factory(p: SearchParams) -> Callable[[Any], sm.Baseline]:
    cache: dict[str, sm.Baseline] = {}
    cs = p.contrasts

    def get(bridge: Any) -> sm.Baseline:
        if "b" not in cache:
            test_pos, test_neg = cs.texts("test")
            if p.kind == "lm":
                cache["b"] = sm.lm_baseline(bridge, test_pos + test_neg, p.neutral_texts,
                                            concept_pos=cs.concept_positive, concept_neg=cs.concept_negative,
                                            max_tokens=p.max_tokens)
            else:
                from analysis.models.masked_lm import mask_tokens

                train_pos, train_neg = cs.texts("train")
                mb = mask_tokens(bridge.tokenizer, list(p.neutral_texts), seed=0) if p.masked else None
                cache["b"] = sm.encoder_baseline(bridge, train_pos, train_neg, test_neg, p.neutral_texts,
                                                 masked_batch=mb, max_tokens=p.max_tokens)
        return cache["b"]

    return get


def _search_compute(subject: Subject, p: SearchParams, ctx: RunContext) -> Result:
    if p.kind == "lm" and not p.contrasts.concept_positive:
        raise ConfigError(f"contrast set {p.contrasts.name!r} names no concept tokens (meta.concept_tokens); a causal "
                          "LM's effect is the log-probability shift of those tokens")
    ext = run(EXTRACT, subject, extract_params(p.contrasts, hook=p.site, position="last"),
              ctx=ctx.child(ctx.sub("extract")))
    vectors = _directions(p, ext)
    lines = list(vectors)
    side = sm.SIDE[p.kind]
    baseline = _baseline_factory(p)
    measure = p.measure_key()
    computed = [0]

    def evaluate(spec: str, layer: int, alpha: float, stage: str) -> dict:
        pp = PointParams(vector=vectors[(spec, layer)], layer=layer, site=p.site, alpha=float(alpha),
                         measure=measure, baseline=baseline, use_head=p.masked)
        new = not has(POINT, subject.fingerprint, pp, store=ctx.store)
        row = run(POINT, subject, pp, ctx=ctx.child())
        computed[0] += int(new)
        ctx.tick(computed[0], p.n_settings, f"{stage} {spec} L{layer} α={alpha:+.3g}")
        return {"source": spec, "layer": layer, "alpha": float(alpha), "stage": stage, **row}

    levels = tuple(f * p.max_side for f in LEVEL_FACTORS)
    rows = so.optimise(lines, *p.strengths, p.n_settings, p.n_coarse, evaluate, side, p.max_side, levels=levels)
    table = pd.DataFrame(rows)
    table["on_front"] = so.pareto_mask(table["effect"].to_numpy(), table[side].to_numpy())
    pick = so.choose(table, side, p.max_side)
    table["chosen"] = table.index == pick
    comparison = so.compare_sources(table, side, levels)
    c = table.loc[pick]
    norms = _mean_norms(ext)
    chosen = {"source": str(c["source"]), "layer": int(c["layer"]), "alpha": float(c["alpha"]), "site": p.site,
              "effect": float(c["effect"]), side: float(c[side]), "mean_norm": norms[int(c["layer"])],
              "vector": vectors[(str(c["source"]), int(c["layer"]))].astype(float).tolist()}
    meta = {"kind": p.kind, "side": side, "max_side": p.max_side, "levels": list(levels), "budget": p.budget,
            "passes_per_setting": p.passes_per_setting, "baseline_passes": p.baseline_passes,
            "n_settings_budget": p.n_settings, "n_settings": len(table), "settings_computed": computed[0],
            "passes_used": p.baseline_passes + len(table) * p.passes_per_setting,
            "passes_computed": (p.baseline_passes if computed[0] else 0) + computed[0] * p.passes_per_setting,
            "contrast": p.contrasts.name, "site": p.site, "strengths": list(p.strengths),
            "fingerprint": subject.fingerprint, "source": subject.source.label if subject.source else "",
            "mean_norms": {str(k): v for k, v in norms.items()}, "chosen": chosen,
            "comparison": json.loads(comparison.to_json(orient="records"))}
    return Result(table=table, meta=meta)


def _from_result(result: Result) -> SearchResult:
    meta = dict(result.meta)
    table = result.table.copy()
    for col in ("on_front", "chosen"):
        table[col] = table[col].astype(bool)
    comparison = pd.DataFrame(meta["comparison"])
    order = ["source", *[c for c in comparison.columns if c.startswith("effect@")], "layer", "alpha", "wins_at"]
    comparison = comparison[[c for c in order if c in comparison.columns]]
    for col in comparison.columns:
        if col.startswith("effect@"):
            comparison[col] = comparison[col].astype(float)
    return SearchResult(table, comparison, dict(meta["chosen"]), meta)


SEARCH = register(Analysis(name="steering.search", code_version=CODE_VERSION, compute=_search_compute,
                           from_result=_from_result, doc="steering search: layers x strengths x sources, Pareto front"))


def steer_search(source: SourceLike = "bilinear-lm", contrasts: ContrastLike = "numpy-torch", *,
                 sources: Sequence[str] = ("mean_diff", "pca", "logistic"), layers: Sequence[int] | None = None,
                 site: str = "resid_post", strengths: Sequence[float] = ss.DEFAULT_STRENGTHS,
                 budget: int = ss.DEFAULT_BUDGET, n_coarse: int = ss.DEFAULT_COARSE, max_side: float | None = None,
                 neutral: Sequence[str] = NEUTRAL, n_neutral: int = 32, max_tokens: int = 64, masked: bool = False,
                 store: StoreLike = None, refresh: bool = False, progress: Progress | None = None,
                 device: str = "auto") -> SearchResult:
    """Search layers × strengths × direction sources for the best steering setting (module docstring), stored.

    ``strengths``: the α range (lo, hi) containing 0, in units of the layer's mean token norm;
    ``budget``: forward passes; ``max_side``: the side-effect limit of the chosen setting
    (default 0.1 nats KL per token for an LM, 0.02 embedding drift for an encoder);
    ``masked``: an encoder's masked-token loss too (trains MiniLM's MLM head on first use)."""
    params = search_params(source, contrasts, sources=sources, layers=layers, site=site, strengths=strengths,
                           budget=budget, n_coarse=n_coarse, max_side=max_side, neutral=neutral, n_neutral=n_neutral,
                           max_tokens=max_tokens, masked=masked, store=store)
    return run(SEARCH, open_source(source), params, store=store, refresh=refresh, progress=progress, device=device)


def stored_searches(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of stored steering searches, newest first (never computes)."""
    return stored(SEARCH, fingerprint, store=store)


def load_search(key: str, store: StoreLike = None) -> SearchResult:
    """The stored search with entry ``key`` (or a unique prefix); ``NotStoredError`` if absent."""
    return load(key, store=store, analysis=SEARCH)


def steer_search_export(search: SearchResult | str, out: str | os.PathLike | None = None, *,
                        gguf: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                        source: SourceLike | None = None, overwrite: bool = False,
                        store: StoreLike = None) -> dict[str, str]:
    """Export a search's chosen setting (a ``SearchResult`` or a stored search's key): vector file ``out``,
    GGUF control vector ``gguf``, Llama weight edit ``weights`` (``analysis.steering.search_export``)."""
    from analysis.steering.search_export import export_chosen

    key = ""
    if isinstance(search, str):
        key, search = search, load_search(search, store=store)
    return export_chosen(search, out, gguf=gguf, weights=weights, key=key, source=source, overwrite=overwrite)
