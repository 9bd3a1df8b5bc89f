"""What a steering search sweeps, validated before any model boots: direction sources, layers, strengths, budget.

A search (``analysis.steering.search``) scores settings (source, layer, strength) of one site
(hook). Every direction is used as a unit vector v̂ and added as h ← h + α·n_L·v̂, where n_L is
the mean token norm ‖h‖ at that layer and site (from the extraction, ``rel_norm``): α is a
strength in units of a typical token's norm, comparable across sources whatever their raw norm,
and the update is a constant vector (``scale="absolute"``), so the chosen setting exports as a
vector file, a GGUF control vector and a weight edit, and ``steer apply --alpha α`` reproduces it.

Direction sources (``parse_source``):

- ``mean_diff`` | ``pca`` | ``logistic``: the contrast set's directions at each layer
  (``analysis.steering.extract``);
- ``file:PATH``: a vector file (``save_steering_vector``); a one-layer file is used at every
  searched layer, a multi-layer file only at its own layers;
- ``sae:KEY:INDEX``: decoder row INDEX of the stored SAE with entry KEY. The SAEs read
  ``blocks.L.attn.hook_z``; adding α·d to z adds α·W_O d to the attention output, which in a
  pre-norm model joins the stream right after block L's attention. So the SAE source needs the
  site ``attn_out``, layer L among the searched layers, and a pre-norm model; its direction is
  W_O d (d_model), used at layer L only;
- ``bilinear:KEY:DIRECTION:EIGEN``: eigenvector EIGEN of direction DIRECTION of the stored
  bilinear decomposition KEY (the MLP's input space of its layer L, d_model entries; the bias
  entry dropped), used at layer L only (any residual site).

Eigenvectors and SAE rows have no sign toward the concept: include negative strengths.

Pure validation: reads config.json, vector files and store entries, never boots a model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import ConfigError, ShapeError
from analysis.steering.collect import HOOKS
from analysis.steering.contrasts import ContrastSet
from analysis.steering.extract import METHODS

MIN_PAIRS = 4
SITES = ("resid_pre", "attn_out", "resid_post")
# Not resid_mid: on TransformerLens 4 Llama bridges a hook on blocks.L.hook_resid_mid changes only the MLP's input,
# not the stream carried on (adding v there differs from adding it at attn_out by ~2 in the logits of the tiny
# test Llama); attn_out of L is the exact place "after block L's attention".
DEFAULT_STRENGTHS = (-1.0, 1.0)  # α range in units of the mean token norm
DEFAULT_BUDGET = 240  # forward passes
DEFAULT_COARSE = 5  # strengths per source × layer in the coarse grid (0 excluded: it is the baseline)
KINDS = ("method", "file", "sae", "bilinear")


@dataclass(frozen=True, slots=True)
class DirectionSource:
    """One source of directions: ``kind`` in KINDS, ``spec`` as given (the label in tables)."""

    kind: str
    spec: str
    method: str = ""  # kind "method"
    path: str = ""  # kind "file"
    key: str = ""  # kind "sae" / "bilinear": the store entry
    index: int = 0  # sae: decoder row; bilinear: direction
    eigen: int = 0  # bilinear: eigenvector


def _int(text: str, what: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"source {spec!r}: {what} {text!r} is not an integer") from None
    if value < 0:
        raise ConfigError(f"source {spec!r}: {what} {value} must be >= 0")
    return value


def parse_source(spec: str) -> DirectionSource:
    """A ``DirectionSource`` from its spec (module docstring); ConfigError naming the forms otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"source {spec!r} must be a non-empty string")
    spec = spec.strip()
    if spec in METHODS:
        return DirectionSource("method", spec, method=spec)
    kind, _, rest = spec.partition(":")
    if kind == "file" and rest:
        return DirectionSource("file", spec, path=rest)
    if kind == "sae":
        parts = rest.split(":")
        if len(parts) == 2 and parts[0]:
            return DirectionSource("sae", spec, key=parts[0], index=_int(parts[1], "decoder row", spec))
    if kind == "bilinear":
        parts = rest.split(":")
        if len(parts) == 3 and parts[0]:
            return DirectionSource("bilinear", spec, key=parts[0], index=_int(parts[1], "direction", spec),
                                   eigen=_int(parts[2], "eigenvector", spec))
    raise ConfigError(f"unknown direction source {spec!r}; use one of {', '.join(METHODS)}, file:PATH, "
                      "sae:KEY:INDEX or bilinear:KEY:DIRECTION:EIGEN")


def model_layers(src: Any) -> tuple[int, int, str]:
    """(n_layers, d_model, model_type) from the source's config.json, without booting it."""
    if getattr(src, "hf_dir", None) is None:
        raise ConfigError(f"{src.label}: a steering search boots the model, so it needs a Hugging Face directory "
                          "(config.json + tokenizer)")
    cfg = json.loads((Path(src.hf_dir) / "config.json").read_text())
    n = cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers")))
    d = cfg.get("hidden_size", cfg.get("n_embd", cfg.get("d_model")))
    if not isinstance(n, int) or not isinstance(d, int):
        raise ConfigError(f"{src.label}: config.json names no layer count or width (num_hidden_layers, hidden_size)")
    return n, d, str(cfg.get("model_type", ""))


def check_contrasts(cs: ContrastSet) -> ContrastSet:
    if len(cs.pairs) < MIN_PAIRS:
        raise ConfigError(f"contrast set {cs.name!r} has {len(cs.pairs)} pairs; a search needs at least {MIN_PAIRS} "
                          "(train and held-out); add pairs to the JSONL file")
    if not cs.test or not cs.train:
        raise ConfigError(f"contrast set {cs.name!r} needs both train and held-out (split 'test') pairs")
    return cs


def check_site(site: str) -> str:
    if site not in SITES:
        more = {"resid_mid": " (a hook there changes only the MLP's input on Llama bridges; attn_out adds to the "
                             "stream after the attention)"}.get(site, f" ({site} is not a stream writer)"
                                                             if site in HOOKS else "")
        raise ConfigError(f"site={site!r}{more} must be a site that adds to the residual stream: one of "
                          f"{', '.join(SITES)}")
    return site


def check_layers(layers: Sequence[int] | None, n_layers: int, label: str) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ConfigError(f"layers={layers!r} must be a non-empty list of layer indices 0..{n_layers - 1}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n_layers:
            raise ConfigError(f"layer {layer!r} is outside {label}, which has layers 0..{n_layers - 1}; "
                              "pick layers in that range (or omit --layers for all)")
        out.append(int(layer))
    return tuple(sorted(set(out)))


def check_strengths(strengths: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) with lo <= 0 <= hi, finite, lo < hi: the unsteered model must lie inside the range."""
    if isinstance(strengths, (str, bytes)) or not isinstance(strengths, Sequence) or len(strengths) != 2:
        raise ConfigError(f"strengths={strengths!r} must be a range (lo, hi), e.g. -1,1 (units of the mean token norm)")
    try:
        lo, hi = (float(s) for s in strengths)
    except (TypeError, ValueError):
        raise ConfigError(f"strengths={strengths!r} must be two numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ConfigError(f"strengths=({lo}, {hi}) must be finite with lo < hi")
    if not lo <= 0.0 <= hi:
        raise ConfigError(f"strength range ({lo:g}, {hi:g}) does not contain 0; the unsteered model (α = 0) is "
                          "the reference every score is measured from: use e.g. (0, {hi:g}) or (-{hi:g}, {hi:g})"
                          .replace("{hi:g}", f"{abs(hi):g}"))
    return lo, hi


def check_budget(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or int(budget) < 1:
        raise ConfigError(f"budget={budget!r} forward passes must be an integer >= 1; e.g. 240")
    return int(budget)


def check_positive_int(value: Any, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1; {hint}")
    return int(value)


def check_sources(specs: Sequence[str]) -> tuple[DirectionSource, ...]:
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not specs:
        raise ConfigError("no direction sources; give at least one, e.g. mean_diff,pca,logistic")
    out = tuple(parse_source(s) for s in specs)
    seen = [s.spec for s in out]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"sources {seen} repeat one; list each source once")
    return out


def unit(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    n = float(np.linalg.norm(v))
    if not np.isfinite(v).all() or n == 0:
        raise ShapeError(f"{what} is zero or not finite: it has no direction to steer along")
    return v / n


def file_vector(source: DirectionSource, d_model: int) -> Any:
    """The SteeringVector of a ``file:`` source, checked for width and k = 1."""
    from analysis.steering.vectors import load_vector

    vec = load_vector(os.fspath(source.path))
    if vec.d_model != d_model:
        raise ShapeError(f"source {source.spec!r}: the vector has d_model {vec.d_model}, the model {d_model}; "
                         "it comes from another model")
    vec.require_single(f"source {source.spec!r}")
    return vec
