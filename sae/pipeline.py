"""Attention-output SAEs through the runner (``analysis.run``): train, evaluate, explain, prompt, list.

    >>> from app import api
    >>> trained = api.sae_train("minilm", layer=3, architecture="topk", k=32)   # harvest + train, stored
    >>> ev = api.sae_eval(trained.key)              # L0, NMSE, explained variance, loss recovered
    >>> fd = api.sae_features(trained.key)          # dashboard data of every feature
    >>> fd.contexts(12)[0].tokens, fd.logit_table(12)
    >>> api.sae_polysemantic(trained.key).table     # feature families per head
    >>> api.sae_list()                              # one row per stored SAE with its metrics

Names follow the CLI: ``lenslab sae <verb>`` is ``sae_<verb>`` (train, eval, features, prompt,
export, import, list); ``DEPRECATED`` maps the old names, which still work and warn.

Stored analyses (declared once here; names, code versions and params are store keys and never
change), under the model's fingerprint:

- ``SAE`` ("sae", ``sae.store_io.CODE_VERSION``): a trained SAE (``sae.jobs.TrainJob``) or an
  imported one (``sae.saelens_io``); its request (``sae.requests``) is kept in the meta, so the
  same call is served from the store without booting the model;
- ``EVAL`` ("sae-eval", ``EVAL_VERSION``): its evaluation on held-out text; params name the SAE key;
- ``FEATURES`` ("sae-features", ``sae.features.CODE_VERSION``): its feature dashboard data.

Reading back: ``load_sae(key)`` (NotStoredError when absent), ``find_sae_eval`` /
``find_sae_features`` (the result ``sae_eval`` / ``sae_features`` with the same arguments would
serve, or None; never computes), ``has_sae_eval`` / ``has_sae_features`` (any stored, index only),
``sae_list``. Activations are harvested once per (model, layer, texts) into the on-disk cache of
``sae.harvest``. Every function that runs torch takes ``device`` ("auto": CUDA, then MPS, else
CPU); stored numbers are computed there and brought back to CPU.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from analysis import run as runner
from analysis.errors import AmbiguousKeyError, ConfigError
from analysis.progress import Progress
from analysis.run import Analysis, NotStoredError, StoreLike, open_store, register
from analysis.sources import open_source
from analysis.store import entry_key
from sae import features as feat
from sae import jobs, requests, store_io
from sae.attribution import PolysemanticHeads, PromptView, polysemantic_heads, token_sets
from sae.config import TRAIN_DEFAULTS as _D
from sae.config import TrainSettings
from sae.sites import DEFAULT_SITE, check_site_name
from sae.results import (EVAL_VERSION, LIST_COLUMNS, SAEEvaluation, TrainedSAE, eval_entries,  # noqa: F401
                         evaluation_from_result, features_entries, newest_eval, newest_features, resolve,
                         sae_entries, sae_name, sae_table, trained_from_result)

REQUEST_VERSION = requests.REQUEST_VERSION
SAE = register(Analysis(name=store_io.ANALYSIS_SAE, code_version=store_io.CODE_VERSION, compute=jobs.compute_sae,
                        from_result=trained_from_result, doc="a trained or imported attention-output SAE"))
EVAL = register(Analysis(name=store_io.ANALYSIS_EVAL, code_version=EVAL_VERSION, compute=jobs.compute_eval,
                         from_result=evaluation_from_result, register_model=False,
                         doc="an SAE's reconstruction metrics and loss recovered on held-out text"))
FEATURES = register(Analysis(name=store_io.ANALYSIS_FEATURES, code_version=feat.CODE_VERSION,
                             compute=jobs.compute_features, from_result=feat.from_result, register_model=False,
                             doc="an SAE's feature dashboard data"))


# -- trained SAEs ------------------------------------------------------------------------------------------
def load_sae(key: str, store: StoreLike = None) -> TrainedSAE:
    """The stored SAE with this entry key (or a unique prefix of 4+ characters).

    Raises NotStoredError (a KeyError and LensLabError) when no stored SAE has it."""
    st = open_store(store)
    entry = resolve(key, st)
    return replace(runner.load(entry.key, store=st, analysis=SAE), key=entry.key)


def find_sae(source: Any, layer: int, key: str | None = None, store: StoreLike = None,
             site: str | None = None) -> str:
    """Store key of the SAE ``key`` (prefix), or else of the one SAE of ``source`` at ``layer``
    (and ``site``, when given: ``sae.sites.SITES``).

    ConfigError when none is stored at that layer (naming the layers that have SAEs);
    AmbiguousKeyError when several are (listing each as ``sae ls`` shows it: key and name, newest
    first), so an evaluation never lands on an SAE the caller did not mean: pass ``key``
    (``--sae KEY``)."""
    st = open_store(store)
    if key is not None:
        return resolve(key, st).key
    src = open_source(source)
    entries = sae_entries(st, src.fingerprint)
    if site is not None:
        check_site_name(site)
        entries = [e for e in entries if e.params.get("site", DEFAULT_SITE) == site]
    mine = [e for e in entries if e.params.get("layer") == int(layer)]
    if not mine:
        layers = sorted({e.params.get("layer") for e in entries})
        at = "" if site is None else f" site {site}"
        have = (f"stored SAEs of {src.label}{at} are at layers {layers}" if layers
                else f"no SAE of {src.label}{at} is stored")
        raise ConfigError(f"no stored SAE for {src.label} layer {layer} ({have}); train one with "
                          f"`lenslab sae train {requests.spec_of(src) or 'SOURCE'} --layer {layer}"
                          f"{'' if site in (None, DEFAULT_SITE) else ' --site ' + site}`")
    if len(mine) > 1:
        listed = "; ".join(f"{e.key[:12]} {sae_name(e.meta)}" for e in mine)  # as `sae ls` prints them
        raise AmbiguousKeyError(f"{len(mine)} SAEs of {src.label} are stored at layer {layer}: {listed}; pick one "
                                f"with --sae KEY (API: key=KEY), e.g. --sae {mine[0].key[:12]} for the newest "
                                "(`lenslab sae ls` lists every SAE)")
    return mine[0].key


def sae_train(source: Any = "minilm", layer: int = _D.layer, *, site: str = _D.site,
              architecture: str = _D.architecture,
              expansion: int | None = _D.expansion, d_sae: int | None = _D.d_sae, k: int | None = _D.k,
              l1_coefficient: float | None = _D.l1_coefficient, n_tokens: int = _D.n_tokens,
              batch_size: int = _D.batch_size, lr: float = _D.lr, seed: int = _D.seed, dtype: str = _D.dtype,
              texts: Sequence[str] | None = None, per_package: int | None = _D.per_package,
              max_tokens: int = _D.max_tokens, eval_fraction: float = _D.eval_fraction, store: StoreLike = None,
              refresh: bool = False, progress: Progress | None = None, trust_pickle: bool = False,
              resume: bool = True, checkpoint_every: int = _D.checkpoint_every, device: str = "auto",
              **cfg_fields: Any) -> TrainedSAE:
    """Harvest hook_z (or ``site``) of ``layer`` on the training texts and train an SAE, cached in the store.

    ``site`` (``sae.sites``): "hook_z" (attention outputs before W_O, the default), "resid_pre",
    "resid_post" or "mlp_out"; an unknown site raises ConfigError listing the valid ones before
    the model boots, and so does a layer the model lacks (listing the valid layers) or a k or
    matryoshka width that does not fit d_sae = expansion x the hook's width (``sae.preflight``:
    from config.json; a model without one is checked once booted, before harvesting).

    Defaults: ``sae.config.TrainSettings``. ``architecture`` "topk" (``k``, default 32), "relu"
    (``l1_coefficient``, default 1.0), "jumprelu" (``l0_coefficient``, ``jumprelu_init_threshold``,
    ``jumprelu_bandwidth``), "batchtopk" (``k`` on average), "matryoshka_batchtopk" (``k``,
    ``matryoshka_widths``) or "gated" (``l1_coefficient``); width ``d_sae`` or ``expansion`` x d_in;
    ``cfg_fields``: any other ``SAEConfig`` field (``resample_steps``, ``aux_k``, ``lr_decay_fraction`` ...). Text: the
    train split of the docstring corpus (``per_package``, ``seed``, ``eval_fraction``) or ``texts``.
    The settings are checked before the model boots or the corpus is harvested.

    Training checkpoints every ``checkpoint_every`` steps to one file per (model, request):
    ``<activation cache root>/sae-checkpoints/<hash>.safetensors``. An interrupted call (KeyboardInterrupt,
    also from ``progress``) leaves it there; the same call again resumes from it (``resume=False``
    starts over) and ends with the SAE an uninterrupted run stores, bit for bit. The checkpoint
    is deleted once the SAE is stored. ``device``: where the harvest and the training run.

    Raises ConfigError for an unknown layer (listing the valid ones), a bad setting, or settings
    whose estimated memory (``sae.memory``) exceeds the limit (checked before the model boots),
    SourceError for a model without attention layers, CorruptCheckpointError for an unreadable
    checkpoint (``resume=False`` overwrites it).
    """
    settings = TrainSettings(layer=layer, site=site, architecture=architecture, expansion=expansion, d_sae=d_sae, k=k,
                             l1_coefficient=l1_coefficient, n_tokens=n_tokens, batch_size=batch_size, lr=lr,
                             seed=seed, dtype=dtype, per_package=per_package, max_tokens=max_tokens,
                             eval_fraction=eval_fraction, checkpoint_every=checkpoint_every, extra=cfg_fields)
    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    src = open_source(source, trust_pickle=trust_pickle)
    build_texts, corpus = requests.corpus("train", texts, per_package, seed, eval_fraction)
    request = requests.train_request(settings, corpus)
    if not refresh:
        for e in sae_entries(ctx.store, src.fingerprint):
            if e.meta.get("request") == request:
                return load_sae(e.key, ctx.store)
    job = jobs.prepare_training(src, settings, request, build_texts, ctx, resume=resume)
    fingerprint = job.cfg.source_fingerprint
    runner.run(SAE, runner.Subject(fingerprint, src), job, ctx=ctx)
    job.checkpoint.unlink(missing_ok=True)
    return load_sae(entry_key(fingerprint, SAE.name, job.store_params(), SAE.code_version), ctx.store)


# -- evaluation -----------------------------------------------------------------------------------------
def sae_eval(key: str, *, texts: Sequence[str] | None = None, loss: bool = True, loss_docs: int = 64,
             source: Any = None, store: StoreLike = None, refresh: bool = False, progress: Progress | None = None,
             device: str = "auto") -> SAEEvaluation:
    """Evaluate the stored SAE ``key`` on held-out text (the eval split of its training corpus, or
    ``texts``): reconstruction metrics on every token, and loss recovered (next-token loss for
    causal LMs, masked-token loss with the trained MLM head for BERT encoders) on the first
    ``loss_docs`` texts. Cached under "sae-eval". An SAE trained on the caller's texts is
    evaluated on ``texts`` (without them, its newest stored evaluation is served)."""
    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    trained = load_sae(key, ctx.store)
    if texts is None and not refresh and requests.given_texts(trained.meta) and (
            held := newest_eval(ctx.store, trained.key)):
        return held
    build_texts, corpus = requests.corpus_of(trained.key, trained.meta, "eval", texts)
    job = jobs.EvalJob(trained=trained, corpus=corpus, texts=build_texts, loss=bool(loss), loss_docs=int(loss_docs),
                       source=source)
    return runner.run(EVAL, trained.sae.cfg.source_fingerprint, job, ctx=ctx)


def find_sae_eval(key: str, *, texts: Sequence[str] | None = None, loss: bool = True, loss_docs: int = 64,
                  store: StoreLike = None) -> SAEEvaluation | None:
    """The evaluation ``sae_eval(key, texts=, loss=, loss_docs=)`` would serve, or None (never
    computes; None also when no SAE has this key)."""
    st = open_store(store)
    entry = resolve(key, st, missing_ok=True)
    if entry is None:
        return None
    if texts is None and requests.given_texts(entry.meta):
        return newest_eval(st, entry.key)
    _, corpus = requests.corpus_of(entry.key, entry.meta, "eval", texts)
    return runner.find(EVAL, entry.fingerprint, jobs.eval_params(entry.key, corpus, loss, loss_docs), store=st)


def has_sae_eval(key: str, store: StoreLike = None) -> bool:
    """Whether any evaluation of the SAE ``key`` (full key) is stored (index lookup only)."""
    return bool(eval_entries(open_store(store), key))


# -- feature data ------------------------------------------------------------------------------------------
def _feature_settings(settings: dict) -> dict:
    unknown = sorted(set(settings) - set(feat.DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown feature-data setting(s) {unknown}; valid: {', '.join(feat.DEFAULTS)}")
    return {**feat.DEFAULTS, **settings}


def sae_features(key: str, *, texts: Sequence[str] | None = None, source: Any = None, store: StoreLike = None,
                 refresh: bool = False, progress: Progress | None = None, device: str = "auto",
                 **settings: Any) -> feat.FeatureData:
    """Feature dashboard data of the stored SAE ``key`` over its training texts (or ``texts``),
    computed once and stored under "sae-features". ``settings``: ``sae.features.DEFAULTS``
    overrides (n_top, n_intervals, n_per_interval, before, after, n_bins, n_logits, seed)."""
    s = _feature_settings(settings)
    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    trained = load_sae(key, ctx.store)
    if texts is None and not refresh and requests.given_texts(trained.meta) and (
            held := newest_features(ctx.store, trained.key)):
        return held
    build_texts, corpus = requests.corpus_of(trained.key, trained.meta, "train", texts)
    job = jobs.FeaturesJob(trained=trained, corpus=corpus, texts=build_texts, settings=s, source=source)
    return runner.run(FEATURES, trained.sae.cfg.source_fingerprint, job, ctx=ctx)


def find_sae_features(key: str, *, texts: Sequence[str] | None = None, store: StoreLike = None,
                      **settings: Any) -> feat.FeatureData | None:
    """The feature data ``sae_features(key, texts=, **settings)`` would serve, or None (never
    computes; None also when no SAE has this key)."""
    s = _feature_settings(settings)
    st = open_store(store)
    entry = resolve(key, st, missing_ok=True)
    if entry is None:
        return None
    if texts is None and requests.given_texts(entry.meta):
        return newest_features(st, entry.key)
    _, corpus = requests.corpus_of(entry.key, entry.meta, "train", texts)
    return runner.find(FEATURES, entry.fingerprint, jobs.features_params(entry.key, corpus, s), store=st)


def has_sae_features(key: str, store: StoreLike = None) -> bool:
    """Whether feature data of the SAE ``key`` (full key) is stored (index lookup only)."""
    return bool(features_entries(open_store(store), key))


def sae_polysemantic(key: str, *, features: feat.FeatureData | None = None, store: StoreLike = None,
                     **settings: Any) -> PolysemanticHeads:
    """Feature families per head and the polysemantic-head count (``sae.attribution.polysemantic_heads``)
    from the SAE's newest stored feature data (or ``features``). ``settings``: the rule's parameters."""
    st = open_store(store)
    trained = load_sae(key, st)
    fd = features if features is not None else newest_features(st, trained.key)
    if fd is None:
        raise ConfigError(f"no feature data for SAE {trained.key[:12]} yet; compute it with api.sae_features(key) "
                          "or `lenslab sae features SOURCE --layer L`")
    if fd.head_attribution is None:
        site = trained.sae.cfg.site
        why = (f"reads {site!r}, which has no heads (per-head attribution applies to hook_z SAEs only)"
               if site != "hook_z" else "does not record its heads (n_heads/d_head)")
        raise ConfigError(f"SAE {trained.key[:12]} {why}; head families need hook_z heads")
    tokens = token_sets(fd.top_tokens[:, :, fd.centre])
    return polysemantic_heads(fd.head_attribution, tokens, trained.sae.W_dec, density=fd.density, decode=fd.token,
                              **settings)


# -- one prompt, the list ----------------------------------------------------------------------------------
def sae_prompt(key: str, text: str, *, source: Any = None, store: StoreLike = None,
               progress: Progress | None = None, device: str = "auto") -> PromptView:
    """Run ``text`` through the model, encode its hook_z with the SAE ``key``: per-token feature
    activations and the DFA by head (``PromptView``). Not stored."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the prompt is empty; pass some text")
    ctx = runner.context(store=store, progress=progress, device=device)
    return jobs.prompt_view(load_sae(key, ctx.store), text, source, ctx)


def sae_list(store: StoreLike = None) -> pd.DataFrame:
    """One row per stored SAE (``LIST_COLUMNS``), newest first, with its newest evaluation's metrics
    (NaN when not evaluated) and whether feature data is stored (index reads only; never computes)."""
    return sae_table(open_store(store))


# -- old names -------------------------------------------------------------------------------------------
def deprecated_alias(old: str, new: Any) -> Any:
    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"{old} is deprecated; use {new.__name__}", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated: use ``{new.__name__}`` (same arguments, same result)."
    return alias


train_sae = deprecated_alias("train_sae", sae_train)
evaluate_sae = deprecated_alias("evaluate_sae", sae_eval)
list_saes = deprecated_alias("list_saes", sae_list)


def stored_sae_eval(key: str, store: StoreLike = None) -> SAEEvaluation | None:
    """Deprecated (use ``find_sae_eval``): the newest stored evaluation of the SAE ``key`` (full key)
    whatever its settings, or None (never computes)."""
    warnings.warn("stored_sae_eval is deprecated; use find_sae_eval", DeprecationWarning, stacklevel=2)
    return newest_eval(open_store(store), key)


def stored_sae_features(key: str, store: StoreLike = None) -> feat.FeatureData | None:
    """Deprecated (use ``find_sae_features``): the newest stored feature data of the SAE ``key`` (full
    key) whatever its settings, or None (never computes)."""
    warnings.warn("stored_sae_features is deprecated; use find_sae_features", DeprecationWarning, stacklevel=2)
    return newest_features(open_store(store), key)


DEPRECATED = {"train_sae": "sae_train", "evaluate_sae": "sae_eval", "list_saes": "sae_list",
              "stored_sae_eval": "find_sae_eval", "stored_sae_features": "find_sae_features",
              "export_saelens": "sae_export", "import_saelens": "sae_import"}  # the last two: sae.saelens_io

__all__ = ["DEPRECATED", "EVAL", "EVAL_VERSION", "FEATURES", "LIST_COLUMNS", "REQUEST_VERSION", "SAE",
           "NotStoredError", "SAEEvaluation", "TrainedSAE", "evaluate_sae", "find_sae", "find_sae_eval",
           "find_sae_features", "has_sae_eval", "has_sae_features", "list_saes", "load_sae", "sae_eval",
           "sae_features", "sae_list", "sae_name", "sae_polysemantic", "sae_prompt", "sae_train",
           "stored_sae_eval", "stored_sae_features", "train_sae"]
