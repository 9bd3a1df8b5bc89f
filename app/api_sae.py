"""Python API of attention-output SAEs (re-exported by ``app.api``).

    >>> from app import api
    >>> trained = api.train_sae("minilm", layer=3, architecture="topk", k=32)   # harvest + train, stored
    >>> ev = api.evaluate_sae(trained.key)          # L0, NMSE, explained variance, loss recovered
    >>> fd = api.sae_features(trained.key)          # dashboard data of every feature
    >>> fd.contexts(12)[0].tokens, fd.logit_table(12)
    >>> api.sae_polysemantic(trained.key).table     # feature families per head
    >>> api.list_saes()                             # one row per stored SAE with its metrics

Everything is cached in the results store (``store=``: a ``Store``, a directory or None), under
the model's fingerprint:

- ``sae``: a trained SAE (``sae.store_io``); the request (layer, architecture, width, corpus ...)
  is kept in its meta, so the same call is served from the store without booting the model;
- ``sae-eval``: its evaluation on the held-out docstrings (``sae.metrics``; params name the SAE key);
- ``sae-features``: its feature dashboard data (``sae.features``; params name the SAE key).

Activations are harvested once per (model, layer, texts) into the on-disk cache of
``sae.harvest``. Text: the docstring corpus of ``sae.harvest.sae_corpus`` (train split for
training and features, eval split for evaluation), or ``texts=`` given by the caller.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.errors import ConfigError, SourceError
from analysis.sources import Source, open_source
from analysis.store import EntryInfo, Store
from sae import features as feat
from sae import store_io
from sae.attribution import PolysemanticHeads, PromptView, polysemantic_heads, token_sets
from sae.model import SAE

Progress = Callable[[int, int, str], None]
SAE_ANALYSIS, EVAL, FEATURES = store_io.ANALYSIS_SAE, store_io.ANALYSIS_EVAL, store_io.ANALYSIS_FEATURES
REQUEST_VERSION = "sae-api-1"
EVAL_VERSION = "sae-eval-1"
_BRIDGES: dict[str, Any] = {}
_LOCK = threading.RLock()


def _store(store: Store | str | os.PathLike | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _tick(progress: Progress | None, done: int, total: int, label: str) -> None:
    if progress is not None:
        progress(done, total, label)


def _sub(progress: Progress | None, prefix: str) -> Progress | None:
    return None if progress is None else (lambda d, t, item: progress(d, t, f"{prefix}: {item}"))


def _bridge(src: Source) -> Any:
    """The source's TransformerBridge, booted once per process (a few models at most)."""
    from sae.harvest import boot

    with _LOCK:
        if src.fingerprint not in _BRIDGES:
            _BRIDGES[src.fingerprint] = boot(src)[1]
            while len(_BRIDGES) > 3:
                _BRIDGES.pop(next(iter(_BRIDGES)))
        return _BRIDGES[src.fingerprint]


def _spec(src: Source) -> str | None:
    """A spec that reopens ``src`` later: its bundled name or its path (None for in-memory modules)."""
    if src.kind.startswith("bundled:"):
        return src.kind.split(":", 1)[1]
    return None if src.kind == "module" or src.hf_dir is None else str(src.hf_dir)


def _texts_id(texts: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def _corpus(split: str, texts: Sequence[str] | None, per_package: int | None, seed: int,
            eval_fraction: float) -> tuple[Callable[[], list[str]], dict]:
    """(a function building the texts, corpus params) for a split of the docstring corpus or the
    caller's texts. The corpus is only built when the function is called (it takes seconds)."""
    if texts is not None:
        items = [t.text if hasattr(t, "text") else str(t) for t in texts]
        return (lambda: items), {"texts": _texts_id(items), "n_texts": len(items)}

    def build() -> list[str]:
        from sae.harvest import sae_corpus

        return [d.text for d in sae_corpus(split, eval_fraction=eval_fraction, seed=seed, per_package=per_package)]

    return build, {"split": split, "per_package": per_package, "seed": seed, "eval_fraction": eval_fraction}


def _given_texts(trained: TrainedSAE) -> bool:
    return "split" not in trained.meta.get("request", {}).get("corpus", {})


def _corpus_of(trained: TrainedSAE, split: str, texts: Sequence[str] | None) -> tuple[Callable[[], list[str]], dict]:
    """Texts for evaluating / explaining ``trained``: ``split`` of its training corpus, or ``texts``."""
    c = trained.meta.get("request", {}).get("corpus", {})
    if texts is None and _given_texts(trained):
        raise ConfigError(f"SAE {trained.key[:12]} was trained on texts given by the caller; pass texts= (held-out "
                          "texts for an evaluation, any texts for feature data)")
    build, params = _corpus(split, texts, c.get("per_package"), c.get("seed", 0), c.get("eval_fraction", 0.1))
    return build, {**params, "max_tokens": int(c.get("max_tokens", 128))}


def _canonical(obj: Any) -> Any:
    """``obj`` as it reads back from the store's JSON (tuples -> lists, numpy scalars -> numbers)."""
    import json

    from analysis.store import canonical_json

    return json.loads(canonical_json(obj))


# -- trained SAEs ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TrainedSAE:
    """A stored SAE: ``key`` (store entry), ``sae``, training summary, the entry's meta."""

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
    """Short label: "minilm L3 topk 3072 (k=32)", "minilm L3 relu 3072 (l1=2.0)"; an imported ReLU
    SAE whose file records no L1 coefficient says "(l1 not recorded)"."""
    c = meta.get("cfg", {})
    if c.get("architecture") == "topk":
        extra = f"k={c.get('k')}"
    elif meta.get("l1_coefficient_recorded", True):
        extra = f"l1={c.get('l1_coefficient')}"
    else:
        extra = "l1 not recorded"
    label = meta.get("source_spec") or c.get("source_label") or c.get("source_fingerprint", "")[:8]
    short = os.path.basename(str(label)) or label
    return f"{short} L{c.get('layer')} {c.get('architecture')} {c.get('d_sae')} ({extra})"


def _sae_entries(st: Store, fingerprint: str | None = None) -> list[EntryInfo]:
    return [e for e in st.list(fingerprint=fingerprint, analysis=SAE_ANALYSIS)
            if e.code_version == store_io.CODE_VERSION]


def _resolve(key: str, st: Store) -> EntryInfo:
    if not isinstance(key, str) or len(key) < 4:
        raise ConfigError(f"SAE key {key!r} is too short; give at least 4 characters (see `lenslab sae ls`)")
    hits = [e for e in _sae_entries(st) if e.key.startswith(key)]
    if not hits:
        raise ConfigError(f"no stored SAE with key {key[:12]!r} in {st.root}; `lenslab sae ls` lists the stored SAEs "
                          "and `lenslab sae train SOURCE --layer L` trains one")
    if len({e.key for e in hits}) > 1:
        raise ConfigError(f"SAE key prefix {key!r} matches {len(hits)} SAEs; give more characters")
    return hits[0]


def load_sae(key: str, store: Store | str | None = None) -> TrainedSAE:
    """The stored SAE with this entry key (or unique prefix); ConfigError when there is none."""
    st = _store(store)
    entry = _resolve(key, st)
    result = st.get_by_key(entry.key)
    if result is None:
        raise ConfigError(f"the SAE {entry.key[:12]} was deleted meanwhile; train it again")
    return TrainedSAE(entry.key, store_io.sae_from_result(result), dict(result.meta), result.table)


def train_sae(source: Any = "minilm", layer: int = 0, *, architecture: str = "topk", expansion: int | None = 8,
              d_sae: int | None = None, k: int | None = None, l1_coefficient: float | None = None,
              n_tokens: int = 2_000_000, batch_size: int = 4096, lr: float = 1.2e-3, seed: int = 0,
              dtype: str = "float32", texts: Sequence[str] | None = None, per_package: int | None = None,
              max_tokens: int = 128, eval_fraction: float = 0.1, store: Store | str | None = None,
              refresh: bool = False, progress: Progress | None = None, trust_pickle: bool = False,
              resume: bool = True, checkpoint_every: int = 500, **cfg_fields: Any) -> TrainedSAE:
    """Harvest hook_z of ``layer`` on the training texts and train an SAE, cached in the store.

    ``architecture`` "topk" (``k``, default 32) or "relu" (``l1_coefficient``, default 1.0);
    width ``d_sae`` or ``expansion`` x d_in; ``cfg_fields``: any other ``SAEConfig`` field
    (``resample_steps``, ``aux_k``, ``lr_decay_fraction`` ...). The settings are checked before
    the model boots or the corpus is harvested.

    Training checkpoints every ``checkpoint_every`` steps to one file per (model, request):
    ``<activation cache root>/sae-checkpoints/<hash>.safetensors``. An interrupted call (KeyboardInterrupt,
    also from ``progress``) leaves it there; the same call again resumes from it (``resume=False``
    starts over) and ends with the SAE an uninterrupted run stores, bit for bit. The checkpoint
    is deleted once the SAE is stored.

    Raises ConfigError for an unknown layer (listing the valid ones), a bad setting, or settings
    whose estimated memory (``sae.memory``) exceeds the limit (checked before the model boots),
    SourceError for a model without attention layers, CorruptCheckpointError for an unreadable
    checkpoint (``resume=False`` overwrites it).
    """
    from sae.harvest import check_layer, harvest, head_shape
    from sae.memory import hook_width
    from sae.train import config_from_cache, train_sae as fit

    if architecture == "topk":
        k = 32 if k is None else k
        if l1_coefficient is not None:
            raise ConfigError("l1_coefficient applies to relu SAEs only; drop it or use architecture='relu'")
    elif architecture == "relu":
        l1_coefficient = 1.0 if l1_coefficient is None else l1_coefficient
        if k is not None:
            raise ConfigError("k applies to topk SAEs only; drop it or use architecture='topk'")
    else:
        raise ConfigError(f"SAE architecture {architecture!r} is unknown; use 'relu' (L1 penalty) or 'topk' "
                          "(fixed L0)")
    if d_sae is not None:
        expansion = None
    arch = {"k": k} if architecture == "topk" else {"l1_coefficient": float(l1_coefficient)}
    fields = {"architecture": architecture, **arch, "n_tokens": int(n_tokens), "batch_size": int(batch_size),
              "lr": float(lr), "seed": int(seed), "dtype": dtype, **cfg_fields}
    _check_settings(fields, d_sae=d_sae, expansion=expansion, checkpoint_every=checkpoint_every)
    src = open_source(source, trust_pickle=trust_pickle)
    st = _store(store)
    build_texts, corpus = _corpus("train", texts, per_package, seed, eval_fraction)
    request = {"version": REQUEST_VERSION, "layer": int(layer), "expansion": expansion, "d_sae": d_sae,
               "fields": fields, "corpus": {**corpus, "max_tokens": int(max_tokens)}}
    request = _canonical(request)
    if not refresh:
        for e in _sae_entries(st, src.fingerprint):
            if e.meta.get("request") == request:
                return load_sae(e.key, st)
    width = hook_width(src.hf_dir)  # n_heads * d_head from config.json, without booting
    _check_memory(fields, d_sae, expansion, width)  # before the model boots
    bridge = _bridge(src)
    check_layer(bridge, int(layer))  # an unknown layer fails before the corpus is built
    if width is None:  # no config.json to read the width from: the booted hook's width, before harvesting
        _check_memory(fields, d_sae, expansion, int(np.prod(head_shape(bridge))))
    cache = harvest(src, int(layer), build_texts(), max_tokens=max_tokens, dtype=dtype, bridge=bridge,
                    progress=_sub(progress, "harvest"))
    cfg = config_from_cache(cache, d_sae=d_sae, expansion=expansion, **fields)
    ckpt = _checkpoint_path(src.fingerprint, request)
    result = fit(cache, cfg, progress=_sub(progress, "train"), checkpoint=ckpt, checkpoint_every=checkpoint_every,
                 resume=resume, log_every=max(1, min(25, checkpoint_every)))
    meta = {"request": request, "source_spec": _spec(src), "source_label": src.label, "harvest": cache.meta}
    key = store_io.put_sae(st, result.sae, result, params=store_io.sae_params(cfg, corpus=request["corpus"]),
                           meta=meta, label=src.label)
    ckpt.unlink(missing_ok=True)
    from app.api import register

    register(src, st)  # the model's row keeps its real kind and size
    return load_sae(key, st)


def _check_settings(fields: dict, *, d_sae: int | None, expansion: int | None, checkpoint_every: int) -> None:
    """Fail on a bad setting before anything slow (booting the model, building the corpus,
    harvesting): the ``SAEConfig`` these fields make, with a stand-in d_in (the real one comes
    from the hook) that cannot fail the checks which depend on it."""
    from sae.config import SAEConfig

    unknown = sorted(set(fields) - set(SAEConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown SAE setting(s) {unknown}; valid: {', '.join(SAEConfig.__dataclass_fields__)}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every={checkpoint_every!r} must be an integer >= 1 (steps between checkpoints)")
    if d_sae is None:
        if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1:
            raise ConfigError(f"SAE config expansion={expansion!r}: must be an integer >= 1 (d_sae = expansion x "
                              "d_in); pass expansion >= 1 or d_sae")
    width = d_sae if d_sae is not None else 1_000_000  # wide enough for any k when only the expansion is known
    probe = {n: v for n, v in fields.items() if n not in ("hook_name", "layer", "n_heads", "d_head", "d_in")}
    SAEConfig(d_in=1, d_sae=width, **probe)  # raises ConfigError naming the field, the constraint and the fix


def _check_memory(fields: dict, d_sae: int | None, expansion: int | None, d_in: int | None) -> None:
    """ConfigError when training these settings on a hook ``d_in`` wide would exceed the memory
    limit (``sae.memory``); nothing to check while ``d_in`` is unknown."""
    from sae.memory import check_training_memory

    if d_in is not None:
        check_training_memory(d_in=d_in, d_sae=d_sae if d_sae is not None else expansion * d_in,
                              batch_size=fields["batch_size"], architecture=fields["architecture"],
                              dtype=fields["dtype"])


def _checkpoint_path(fingerprint: str, request: dict) -> Path:
    """The checkpoint file of a training request on the model ``fingerprint``."""
    from analysis.store import canonical_json
    from sae.harvest import default_cache_root

    digest = hashlib.sha256(canonical_json({"fingerprint": fingerprint, "request": request}).encode()).hexdigest()
    return default_cache_root() / "sae-checkpoints" / f"{digest[:32]}.safetensors"


def _reopen(trained: TrainedSAE, source: Any = None) -> Source:
    cfg = trained.sae.cfg
    spec = source if source is not None else trained.meta.get("source_spec")
    if spec is None:
        raise SourceError(f"SAE {trained.key[:12]} was trained on an in-memory model; pass source= (the same "
                          "model) to evaluate it or compute its features")
    src = open_source(spec)
    if cfg.source_fingerprint and src.fingerprint != cfg.source_fingerprint:
        raise SourceError(f"{src.label} (fingerprint {src.fingerprint[:8]}) is not the model SAE {trained.key[:12]} "
                          f"was trained on ({cfg.source_fingerprint[:8]}); pass that model as source=")
    return src


def find_sae(source: Any, layer: int, key: str | None = None, store: Store | str | None = None) -> str:
    """Store key of the SAE ``key`` (prefix) or else of the newest SAE of ``source`` at ``layer``.

    ConfigError when none matches (naming the layers that do have SAEs)."""
    st = _store(store)
    if key is not None:
        return _resolve(key, st).key
    src = open_source(source)
    entries = _sae_entries(st, src.fingerprint)
    mine = [e for e in entries if e.params.get("layer") == int(layer)]
    if not mine:
        layers = sorted({e.params.get("layer") for e in entries})
        have = f"stored SAEs of {src.label} are at layers {layers}" if layers else f"no SAE of {src.label} is stored"
        raise ConfigError(f"no stored SAE for {src.label} layer {layer} ({have}); train one with "
                          f"`lenslab sae train {_spec(src) or 'SOURCE'} --layer {layer}`")
    return mine[0].key


# -- evaluation -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SAEEvaluation:
    """Stored evaluation: ``metrics`` (l0, mse, nmse, explained_variance_saelens (= 1 - nmse),
    explained_variance_sklearn (variance-weighted), cosine, dead_fraction, dense_fraction,
    loss_clean/sae/zero, loss_recovered ...; ``sae.metrics`` defines them), ``density`` [d_sae]
    on the eval tokens."""

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


def _eval_entries(st: Store, sae_key: str) -> list[EntryInfo]:
    return [e for e in st.list(analysis=EVAL) if e.params.get("sae") == sae_key and e.code_version == EVAL_VERSION]


def evaluate_sae(key: str, *, texts: Sequence[str] | None = None, loss: bool = True, loss_docs: int = 64,
                 source: Any = None, store: Store | str | None = None, refresh: bool = False,
                 progress: Progress | None = None) -> SAEEvaluation:
    """Evaluate the stored SAE ``key`` on held-out text (the eval split of its training corpus, or
    ``texts``): reconstruction metrics on every token, and loss recovered (next-token loss for
    causal LMs, masked-token loss with the trained MLM head for BERT encoders) on the first
    ``loss_docs`` texts. Cached under "sae-eval"."""
    from sae.harvest import harvest
    from sae.metrics import evaluate

    st = _store(store)
    trained = load_sae(key, st)
    cfg = trained.sae.cfg
    if texts is None and not refresh and _given_texts(trained) and (held := stored_sae_eval(trained.key, st)):
        return held  # trained on the caller's texts: serve the evaluation made with them
    build_texts, corpus = _corpus_of(trained, "eval", texts)
    params = {"sae": trained.key, "corpus": corpus, "loss": bool(loss), "loss_docs": int(loss_docs)}

    def compute():
        from analysis.store import Result

        src = _reopen(trained, source)
        bridge = _bridge(src)
        _tick(progress, 0, 3, "harvesting held-out activations")
        text_list, max_tokens = build_texts(), corpus["max_tokens"]
        cache = harvest(src, cfg.layer, text_list, max_tokens=max_tokens, bridge=bridge,
                        progress=_sub(progress, "harvest"))
        loss_fn, loss_name = None, ""
        if loss:
            from sae.lm_loss import loss_fn_for, model_kind

            _tick(progress, 1, 3, "loss with the SAE spliced in")
            kind = model_kind(bridge)
            loss_fn = loss_fn_for(src, cfg.layer, text_list[:loss_docs], bridge=bridge if kind == "causal" else None,
                                  max_tokens=max_tokens)
            loss_name = ("next-token cross-entropy" if kind == "causal"
                         else "masked-token cross-entropy (trained MLM head)")
            loss_name += f" on {min(loss_docs, len(text_list))} texts"
        ev = evaluate(trained.sae, cache, loss_fn)
        _tick(progress, 3, 3, "done")
        res = store_io.eval_to_result(ev, meta={"sae_key": trained.key, "corpus": params["corpus"], "loss": loss_name})
        return Result(res.table, res.arrays, _canonical(dict(res.meta)))

    result = st.cached(cfg.source_fingerprint, EVAL, params, EVAL_VERSION, compute, refresh=refresh)
    return _evaluation(trained.key, result)


def _evaluation(key: str, result) -> SAEEvaluation:
    from sae.metrics import upgrade_scalars

    meta = dict(result.meta)
    return SAEEvaluation(key, upgrade_scalars(meta.get("metrics", {})), np.asarray(result.arrays["density"]), meta)


def has_sae_eval(key: str, store: Store | str | None = None) -> bool:
    """Whether any evaluation of the SAE ``key`` (full key) is stored (index lookup only)."""
    return bool(_eval_entries(_store(store), key))


def stored_sae_eval(key: str, store: Store | str | None = None) -> SAEEvaluation | None:
    """The newest stored evaluation of the SAE ``key`` (full key), or None (never computes)."""
    st = _store(store)
    for e in _eval_entries(st, key):
        result = st.get_by_key(e.key)
        if result is not None:
            return _evaluation(key, result)
    return None


# -- feature data ----------------------------------------------------------------------------------
def _decoder(tokenizer: Any) -> tuple[Callable[[Sequence[int]], list[str]], bool]:
    """(token ids -> texts, is WordPiece). WordPiece keeps its tokens (``##ing``); byte-level BPE
    decodes each id alone (``" the"``)."""
    vocab = getattr(tokenizer, "vocab", None) or {}
    wordpiece = type(tokenizer).__name__.startswith("Bert") or any(t.startswith("##") for t in list(vocab)[:5000])
    if wordpiece:
        return (lambda ids: list(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))), True
    return (lambda ids: [tokenizer.decode([int(i)]) for i in ids]), False


def _features_entries(st: Store, sae_key: str) -> list[EntryInfo]:
    return [e for e in st.list(analysis=FEATURES)
            if e.params.get("sae") == sae_key and e.code_version == feat.CODE_VERSION]


def sae_features(key: str, *, texts: Sequence[str] | None = None, source: Any = None,
                 store: Store | str | None = None, refresh: bool = False, progress: Progress | None = None,
                 **settings: Any) -> feat.FeatureData:
    """Feature dashboard data of the stored SAE ``key`` over its training texts (or ``texts``),
    computed once and stored under "sae-features". ``settings``: ``sae.features.DEFAULTS``
    overrides (n_top, n_intervals, n_per_interval, before, after, n_bins, n_logits, seed)."""
    from sae.harvest import harvest
    from sae.readout import attention_output, unembedding

    st = _store(store)
    trained = load_sae(key, st)
    cfg = trained.sae.cfg
    unknown = sorted(set(settings) - set(feat.DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown feature-data setting(s) {unknown}; valid: {', '.join(feat.DEFAULTS)}")
    s = {**feat.DEFAULTS, **settings}
    if texts is None and not refresh and _given_texts(trained) and (held := stored_sae_features(trained.key, st)):
        return held
    build_texts, corpus = _corpus_of(trained, "train", texts)
    params = {"sae": trained.key, "corpus": corpus, "settings": s}

    def compute():
        from sae.memory import check_feature_data_memory

        check_feature_data_memory(cfg.d_sae, s)  # before the model boots
        src = _reopen(trained, source)
        bridge = _bridge(src)
        cache = harvest(src, cfg.layer, build_texts(), max_tokens=corpus["max_tokens"], bridge=bridge,
                        progress=_sub(progress, "harvest"))
        try:
            W_O, (W_U, note) = attention_output(src, cfg.layer, cfg.n_heads), unembedding(src)
        except SourceError as exc:
            W_O, W_U, note = None, None, f"no logit effects: {exc}"
        decode, wordpiece = _decoder(bridge.tokenizer)
        fd = feat.feature_data(trained.sae, cache.acts, cache.token_ids, cache.doc_ids, cache.positions, W_O=W_O,
                               W_U=W_U, decode=decode, progress=_sub(progress, "features"),
                               meta={"sae_key": trained.key, "layer": cfg.layer, "unembedding": note,
                                     "wordpiece": wordpiece, "source_label": src.label}, **s)
        return feat.to_result(fd)

    return feat.from_result(st.cached(cfg.source_fingerprint, FEATURES, params, feat.CODE_VERSION, compute,
                                      refresh=refresh))


def has_sae_features(key: str, store: Store | str | None = None) -> bool:
    """Whether feature data of the SAE ``key`` (full key) is stored (index lookup only)."""
    return bool(_features_entries(_store(store), key))


def stored_sae_features(key: str, store: Store | str | None = None) -> feat.FeatureData | None:
    """The newest stored feature data of the SAE ``key`` (full key), or None (never computes)."""
    st = _store(store)
    for e in _features_entries(st, key):
        result = st.get_by_key(e.key)
        if result is not None:
            return feat.from_result(result)
    return None


def sae_polysemantic(key: str, *, features: feat.FeatureData | None = None, store: Store | str | None = None,
                     **settings: Any) -> PolysemanticHeads:
    """Feature families per head and the polysemantic-head count (``sae.attribution.polysemantic_heads``)
    from the SAE's stored feature data (or ``features``). ``settings``: the rule's parameters."""
    st = _store(store)
    trained = load_sae(key, st)
    fd = features if features is not None else stored_sae_features(trained.key, st)
    if fd is None:
        raise ConfigError(f"no feature data for SAE {trained.key[:12]} yet; compute it with api.sae_features(key) "
                          "or `lenslab sae features SOURCE --layer L`")
    if fd.head_attribution is None:
        raise ConfigError(f"SAE {trained.key[:12]} does not record its heads (n_heads/d_head); head families need them")
    tokens = token_sets(fd.top_tokens[:, :, fd.centre])
    return polysemantic_heads(fd.head_attribution, tokens, trained.sae.W_dec, density=fd.density, decode=fd.token,
                              **settings)


# -- one prompt ------------------------------------------------------------------------------------
def sae_prompt(key: str, text: str, *, source: Any = None, store: Store | str | None = None,
               progress: Progress | None = None) -> PromptView:
    """Run ``text`` through the model, encode its hook_z with the SAE ``key``: per-token feature
    activations and the DFA by head (``PromptView``). Not stored."""
    from sae.harvest import hook_z_batches, tokenize

    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the prompt is empty; pass some text")
    st = _store(store)
    trained = load_sae(key, st)
    cfg = trained.sae.cfg
    src = _reopen(trained, source)
    _tick(progress, 0, 2, f"booting {src.label}")
    bridge = _bridge(src)
    max_tokens = int(trained.meta.get("request", {}).get("corpus", {}).get("max_tokens", 128))
    ids = tokenize(bridge.tokenizer, [text], max_tokens)
    _tick(progress, 1, 2, "running the prompt")
    (_, z), = list(hook_z_batches(bridge, cfg.layer, ids))
    z = z[0, :len(ids[0])]
    with torch.no_grad():
        acts = trained.sae.encode(z).numpy()
    decode, _ = _decoder(bridge.tokenizer)
    _tick(progress, 2, 2, "done")
    return PromptView(trained.sae, decode(ids[0]), acts, z.numpy().reshape(len(ids[0]), cfg.n_heads, cfg.d_head))


# -- listing ---------------------------------------------------------------------------------------
LIST_COLUMNS = ["key", "name", "source", "model", "layer", "architecture", "d_in", "d_sae", "k", "l1_coefficient",
                "n_train_tokens", "l0", "nmse", "explained_variance_saelens", "explained_variance_sklearn", "cosine",
                "loss_recovered", "dead_fraction", "dense_fraction", "features", "created"]


def list_saes(store: Store | str | None = None) -> pd.DataFrame:
    """One row per stored SAE, newest first, with its newest evaluation's metrics (NaN when not
    evaluated) and whether feature data is stored (index reads only; never computes)."""
    from sae.metrics import upgrade_scalars

    st = _store(store)
    labels = {m.fingerprint: m.label for m in st.models()}
    evals: dict[str, dict] = {}
    for e in st.list(analysis=EVAL):
        if e.code_version == EVAL_VERSION:
            evals.setdefault(e.params.get("sae"), upgrade_scalars(e.meta.get("metrics", {})))
    with_features = {e.params.get("sae") for e in st.list(analysis=FEATURES) if e.code_version == feat.CODE_VERSION}
    rows = []
    for e in _sae_entries(st):
        c, m = e.meta.get("cfg", {}), evals.get(e.key, {})
        rows.append({"key": e.key, "name": sae_name(e.meta), "source": e.meta.get("source_spec") or "",
                     "model": labels.get(e.fingerprint, e.fingerprint[:8]), "layer": c.get("layer"),
                     "architecture": c.get("architecture"), "d_in": c.get("d_in"), "d_sae": c.get("d_sae"),
                     "k": c.get("k"), "l1_coefficient": c.get("l1_coefficient") if c.get("architecture") == "relu"
                     else None, "n_train_tokens": e.meta.get("training", {}).get("n_tokens"),
                     **{name: m.get(name, np.nan) for name in ("l0", "nmse", "explained_variance_saelens",
                                                               "explained_variance_sklearn", "cosine", "loss_recovered",
                                                               "dead_fraction", "dense_fraction")},
                     "features": e.key in with_features, "created": pd.Timestamp(e.created, unit="s")})
    return pd.DataFrame(rows, columns=LIST_COLUMNS)


__all__ = ["TrainedSAE", "SAEEvaluation", "train_sae", "evaluate_sae", "sae_features", "sae_polysemantic",
           "sae_prompt", "list_saes", "load_sae", "find_sae", "stored_sae_eval", "stored_sae_features",
           "has_sae_eval", "has_sae_features"]
