"""SAEs and their evaluations <-> ``analysis.store.Result``.

Analysis names: ``"sae"`` (a trained SAE), ``"sae-eval"`` (its evaluation), ``"sae-features"``
(feature dashboards, written by ``sae.features``). Store params of an SAE = its config dict
(``SAEConfig.to_dict()``) plus any corpus parameters the caller adds; the fingerprint is the
model's (``cfg.source_fingerprint``).

- "sae": arrays ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec``
  [d_in] (plus the architecture's own: ``threshold``, or ``r_mag`` and ``b_mag``, ``SAE.weight_names``),
  ``log10_density`` [d_sae] (training, or an imported SAELens ``sparsity``); table =
  training history; meta = {"cfg": ...,
  "training": {steps, n_tokens, seconds, tokens_per_s, n_resampled, resumed_from}, ...extra}.
- "sae-eval": arrays ``density`` [d_sae], ``density_hist`` [50], ``density_edges`` [51];
  meta = {"metrics": scalars (``SAEEval.scalars()``), "sae_key": ...}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from analysis.errors import CorruptEntryError, LensLabError
from analysis.store import Result, Store
from sae.config import SAEConfig
from sae.metrics import DENSITY_EDGES, SAEEval
from sae.model import SAE

CODE_VERSION = "sae-1"
ANALYSIS_SAE = "sae"
ANALYSIS_EVAL = "sae-eval"
ANALYSIS_FEATURES = "sae-features"


def sae_params(cfg: SAEConfig, **extra: Any) -> dict[str, Any]:
    """Store params of an SAE: its config plus ``extra`` (e.g. corpus split, max_tokens)."""
    return {**cfg.to_dict(), **extra}


def sae_to_result(sae: SAE, train: Any = None, *, meta: Mapping[str, Any] | None = None,
                  log10_density: np.ndarray | None = None) -> Result:
    """A Result holding the SAE's weights (and, given a ``TrainResult``, its history and density;
    ``log10_density`` [d_sae] stores a density without one, e.g. an imported SAELens sparsity)."""
    arrays = {n: getattr(sae, n).detach().to(torch.float32).cpu().numpy() for n in sae.weight_names}
    out_meta: dict[str, Any] = {"cfg": sae.cfg.to_dict(), **dict(meta or {})}
    table = None
    if log10_density is not None:
        arrays["log10_density"] = np.asarray(log10_density, dtype=np.float32).reshape(-1)
    if train is not None:
        arrays["log10_density"] = np.asarray(train.log10_density, dtype=np.float32)
        table = train.history
        out_meta["training"] = {"steps": train.steps, "n_tokens": train.n_tokens, "seconds": train.seconds,
                                "tokens_per_s": train.tokens_per_s, "n_resampled": train.n_resampled,
                                "resumed_from": train.resumed_from}
    return Result(table=table, arrays=arrays, meta=out_meta)


def sae_from_result(result: Result) -> SAE:
    """Rebuild the SAE; CorruptEntryError when the entry lacks weights or they do not fit its config."""
    try:
        cfg = SAEConfig.from_dict(dict(result.meta["cfg"]))
    except (KeyError, TypeError, LensLabError) as exc:
        raise CorruptEntryError(f"stored SAE has no valid config ({exc}); retrain it (lenslab sae train)") from exc
    sae = SAE(cfg)
    want = {n: tuple(getattr(sae, n).shape) for n in sae.weight_names}
    for n, shape in want.items():
        a = result.arrays.get(n)
        if a is None or tuple(a.shape) != shape:
            raise CorruptEntryError(f"stored SAE weight {n} is {None if a is None else tuple(a.shape)}, expected "
                                    f"{shape}; retrain it (lenslab sae train)")
    with torch.no_grad():
        for n in sae.weight_names:
            getattr(sae, n).copy_(torch.from_numpy(np.array(result.arrays[n], dtype=np.float32)))
    return sae


def put_sae(store: Store, sae: SAE, train: Any = None, *, params: Mapping[str, Any] | None = None,
            meta: Mapping[str, Any] | None = None, label: str | None = None,
            log10_density: np.ndarray | None = None) -> str:
    """Store a trained SAE under "sae" (registering its model); returns the entry key."""
    fp = sae.cfg.source_fingerprint
    if not fp:
        raise CorruptEntryError("the SAE's config has no source_fingerprint; build it with "
                                "sae.train.config_from_cache so the store knows which model it belongs to")
    # keep the model's own record (kind, sizes) when the store already knows it
    store.register_model(fp, label or sae.cfg.source_label or fp[:12], "sae-source", replace=False)
    info = store.put(fp, ANALYSIS_SAE, dict(params) if params is not None else sae_params(sae.cfg), CODE_VERSION,
                     sae_to_result(sae, train, meta=meta, log10_density=log10_density))
    return info.key


def stored_log10_density(result: Result) -> np.ndarray | None:
    """The entry's ``log10_density`` [d_sae] (None when it has none); CorruptEntryError when its
    length is not d_sae."""
    a = result.arrays.get("log10_density")
    if a is None:
        return None
    d_sae = int(dict(result.meta).get("cfg", {}).get("d_sae", -1))
    if a.shape != (d_sae,):
        raise CorruptEntryError(f"stored log10_density has shape {tuple(a.shape)}, expected ({d_sae},); retrain or "
                                "re-import the SAE")
    return np.array(a, dtype=np.float32)  # a writable copy


def get_sae(store: Store, key: str) -> SAE:
    """The SAE stored under entry ``key`` (a full key from ``Store.list``)."""
    result = store.get_by_key(key)
    if result is None:
        raise CorruptEntryError(f"no stored SAE with key {key[:12]}; list them with `lenslab store ls`")
    return sae_from_result(result)


def eval_to_result(ev: SAEEval, *, meta: Mapping[str, Any] | None = None) -> Result:
    r = ev.reconstruction
    arrays = {"density": np.asarray(r.density, dtype=np.float64), "density_hist": np.asarray(r.density_hist),
              "density_edges": DENSITY_EDGES}
    return Result(table=None, arrays=arrays, meta={"metrics": ev.scalars(), **dict(meta or {})})
