"""What the SAE pipeline returns and reads from the store's index: ``TrainedSAE``,
``SAEEvaluation``, their ``from_result`` readers, entry lookups by SAE key, and ``sae_table`` (one
row per stored SAE with its newest evaluation's metrics).

Store entries (``sae.store_io``): "sae" (a trained or imported SAE; its request in the meta),
"sae-eval" and "sae-features" (params name the SAE's entry key under "sae"). Index reads only,
except where a function says it reads a blob.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from analysis.errors import ConfigError
from analysis.run import NotStoredError
from analysis.store import EntryInfo, Result, Store
from sae import features as feat
from sae import store_io
from sae.config import config_default
from sae.metrics import upgrade_scalars
from sae.model import SAE

EVAL_VERSION = "sae-eval-1"
LIST_COLUMNS = ["key", "name", "source", "model", "layer", "site", "architecture", "d_in", "d_sae", "k", "l1_coefficient",
                "n_train_tokens", "l0", "nmse", "explained_variance_saelens", "explained_variance_sklearn", "cosine",
                "loss_recovered", "kl_recovered", "dead_fraction", "dense_fraction", "features", "created"]
_METRICS = ("l0", "nmse", "explained_variance_saelens", "explained_variance_sklearn", "cosine", "loss_recovered",
            "kl_recovered", "dead_fraction", "dense_fraction")


@dataclass(frozen=True, eq=False)
class TrainedSAE:
    """A stored SAE: ``key`` (its store entry), ``sae`` (on CPU), training summary, the entry's meta."""

    key: str
    sae: SAE
    meta: dict
    history: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        return sae_name(self.meta)

    @property
    def training(self) -> dict:
        """Last logged training step (loss, mse, nmse, l0, dead_fraction ...) plus steps, tokens, seconds."""
        last = {} if self.history is None or self.history.empty else self.history.iloc[-1].to_dict()
        return {**last, **self.meta.get("training", {})}


def sae_name(meta: dict) -> str:
    """Short label: "minilm L3 topk 3072 (k=32)", "minilm L3 relu 3072 (l1=2.0)", "minilm L3 resid_post topk
    1536 (k=32)" (a site other than hook_z is named); an imported ReLU
    SAE whose file records no L1 coefficient says "(l1 not recorded)"."""
    c = meta.get("cfg", {})
    if c.get("architecture") in ("topk", "batchtopk", "matryoshka_batchtopk"):
        extra = f"k={c.get('k')}"
    elif c.get("architecture") == "jumprelu":  # l0_coefficient is left out of the dict at its default
        extra = f"l0={c.get('l0_coefficient', config_default('l0_coefficient'))}"
    elif meta.get("l1_coefficient_recorded", True):
        extra = f"l1={c.get('l1_coefficient')}"
    else:
        extra = "l1 not recorded"
    label = meta.get("source_spec") or c.get("source_label") or c.get("source_fingerprint", "")[:8]
    short = os.path.basename(str(label)) or label
    site = "" if c.get("site", "hook_z") == "hook_z" else f" {c['site']}"  # hook_z names stay as they were
    return f"{short} L{c.get('layer')}{site} {c.get('architecture')} {c.get('d_sae')} ({extra})"


def trained_from_result(result: Result) -> TrainedSAE:
    """The SAE of an "sae" entry, its meta and history; ``key`` is left empty (a Result does not
    know its key: ``sae.pipeline.load_sae`` fills it)."""
    return TrainedSAE("", store_io.sae_from_result(result), dict(result.meta), result.table)


@dataclass(frozen=True, eq=False)
class SAEEvaluation:
    """Stored evaluation of the SAE ``key``: ``metrics`` (l0, mse, nmse, explained_variance_saelens
    (= 1 - nmse), explained_variance_sklearn (variance-weighted), cosine, dead_fraction,
    dense_fraction, loss_clean/sae/zero, loss_recovered ...; ``sae.metrics`` defines them),
    ``density`` [d_sae] on the eval tokens."""

    key: str
    metrics: dict
    density: np.ndarray
    meta: dict

    @property
    def caption(self) -> str:
        m, c = self.metrics, self.meta.get("corpus", {})
        loss = self.meta.get("loss", "")
        return (f"{m.get('n_tokens', '?')} held-out tokens ({c.get('split', 'given texts')}); loss recovered "
                f"{'from ' + loss if loss else 'not measured'}; explained variance: SAELens's = 1 - NMSE; "
                "sklearn's = variance-weighted, around the residual's mean.")


def evaluation_from_result(result: Result) -> SAEEvaluation:
    """The evaluation of a "sae-eval" entry (metrics stored before the explained-variance split are
    read under today's names)."""
    meta = dict(result.meta)
    return SAEEvaluation(str(meta.get("sae_key", "")), upgrade_scalars(meta.get("metrics", {})),
                         np.asarray(result.arrays["density"]), meta)


# -- index lookups ----------------------------------------------------------------------------------
def sae_entries(st: Store, fingerprint: str | None = None) -> list[EntryInfo]:
    """Index rows of the stored SAEs (this code version), newest first."""
    return [e for e in st.list(fingerprint=fingerprint, analysis=store_io.ANALYSIS_SAE)
            if e.code_version == store_io.CODE_VERSION]


def resolve(key: str, st: Store, *, missing_ok: bool = False) -> EntryInfo | None:
    """The index row of the stored SAE whose key is or starts with ``key`` (4+ characters).

    ConfigError for a shorter key; NotStoredError when none matches (None with ``missing_ok``) or
    the prefix matches several."""
    if not isinstance(key, str) or len(key) < 4:
        raise ConfigError(f"SAE key {key!r} is too short; give at least 4 characters (see `lenslab sae ls`)")
    hits = [e for e in sae_entries(st) if e.key.startswith(key)]
    if not hits:
        if missing_ok:
            return None
        raise NotStoredError(f"no stored SAE with key {key[:12]!r} in {st.root}; `lenslab sae ls` lists the stored "
                             "SAEs and `lenslab sae train SOURCE --layer L` trains one")
    if len({e.key for e in hits}) > 1:
        raise NotStoredError(f"SAE key prefix {key!r} matches {len(hits)} SAEs; give more characters")
    return hits[0]


def eval_entries(st: Store, sae_key: str) -> list[EntryInfo]:
    """Index rows of the evaluations of the SAE ``sae_key`` (full key), newest first."""
    return [e for e in st.list(analysis=store_io.ANALYSIS_EVAL)
            if e.params.get("sae") == sae_key and e.code_version == EVAL_VERSION]


def features_entries(st: Store, sae_key: str) -> list[EntryInfo]:
    """Index rows of the feature data of the SAE ``sae_key`` (full key), newest first."""
    return [e for e in st.list(analysis=store_io.ANALYSIS_FEATURES)
            if e.params.get("sae") == sae_key and e.code_version == feat.CODE_VERSION]


def newest_eval(st: Store, sae_key: str) -> SAEEvaluation | None:
    """The newest stored evaluation of the SAE ``sae_key`` whatever its settings, or None (reads a blob)."""
    for e in eval_entries(st, sae_key):
        result = st.get_by_key(e.key)
        if result is not None:
            ev = evaluation_from_result(result)
            return ev if ev.key else replace(ev, key=sae_key)
    return None


def newest_features(st: Store, sae_key: str) -> feat.FeatureData | None:
    """The newest stored feature data of the SAE ``sae_key`` whatever its settings, or None (reads a blob)."""
    for e in features_entries(st, sae_key):
        result = st.get_by_key(e.key)
        if result is not None:
            return feat.from_result(result)
    return None


def sae_table(st: Store) -> pd.DataFrame:
    """One row per stored SAE (``LIST_COLUMNS``), newest first, with its newest evaluation's metrics
    (NaN when not evaluated) and whether feature data is stored (index reads only)."""
    labels = {m.fingerprint: m.label for m in st.models()}
    evals: dict[str, dict] = {}
    for e in st.list(analysis=store_io.ANALYSIS_EVAL):
        if e.code_version == EVAL_VERSION:
            evals.setdefault(e.params.get("sae"), upgrade_scalars(e.meta.get("metrics", {})))
    with_features = {e.params.get("sae") for e in st.list(analysis=store_io.ANALYSIS_FEATURES)
                     if e.code_version == feat.CODE_VERSION}
    rows = []
    for e in sae_entries(st):
        c, m = e.meta.get("cfg", {}), evals.get(e.key, {})
        rows.append({"key": e.key, "name": sae_name(e.meta), "source": e.meta.get("source_spec") or "",
                     "model": labels.get(e.fingerprint, e.fingerprint[:8]), "layer": c.get("layer"),
                     "site": c.get("site", "hook_z"),
                     "architecture": c.get("architecture"), "d_in": c.get("d_in"), "d_sae": c.get("d_sae"),
                     "k": c.get("k"), "l1_coefficient": c.get("l1_coefficient")
                     if c.get("architecture") in ("relu", "gated") else None, "n_train_tokens": e.meta.get("training", {}).get("n_tokens"),
                     **{name: m.get(name, np.nan) for name in _METRICS},
                     "features": e.key in with_features, "created": pd.Timestamp(e.created, unit="s")})
    return pd.DataFrame(rows, columns=LIST_COLUMNS)
