"""Transcoders through the runner (``analysis.run``): train, store, find, load, list.

    >>> from app import api
    >>> run = api.sae_transcoder("minilm", 3, skip=True, k=32)    # harvest + train + evaluate, stored
    >>> run.key, run.metrics["nmse"], run.metrics["loss_recovered"]
    >>> api.load_sae_transcoder(run.key).transcoder                # the same weights, bit for bit
    >>> api.sae_transcoders()                                      # one row per stored transcoder

Stored analysis (declared once here): ``TRANSCODER`` ("sae-transcoder", ``sae.transcoder_store``),
under the model's fingerprint. Its params (``sae.transcoder_job.TranscoderJob.store_params``) are
every setting of the request: the layer, every ``TranscoderConfig`` field but the widths (kind,
architecture, k, lr, batch size, tokens, seed and any field the config gains), the width rule, the
training and held-out corpora, the masking and the loss settings. They are known before the model
boots, so a repeated call is served from the store without booting it, and a changed setting never
serves an older result. ``refresh=True`` trains again (a failed or interrupted run stores nothing
and leaves the stored entries as they were). A SAELens transcoder file is stored under the same
analysis (``lenslab sae import``: ``sae.transcoder_import``; params: the layer, the weights' hash and
the config).

Masked LMs (MiniLM): ``mask=None`` (default) trains on text masked like the masked-LM objective
(15% of the tokens replaced by [MASK], ``sae.transcoder_job``), which the masked-token loss scores;
``mask=False`` trains on plain text. Causal LMs train on plain text (``mask=True`` is refused).

Reading back: ``stored_sae_transcoders`` (index rows, newest first), ``load_sae_transcoder(key)``
(NotStoredError when absent), ``find_sae_transcoder(source, layer, **settings)`` (the result
``sae_transcoder`` with the same arguments would serve, or None; never computes),
``sae_transcoders`` (a table, index reads only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from analysis import run as runner
from analysis.errors import ConfigError
from analysis.progress import Progress
from analysis.run import Analysis, StoreLike, Subject, open_store, register
from analysis.sources import Source, open_source
from analysis.store import EntryInfo, Result, entry_key
from sae import requests
from sae import transcoder_store as tstore
from sae.transcoder import TranscoderConfig
from sae.transcoder_import import TranscoderImportJob
from sae.transcoder_job import MASK_RATE, TranscoderJob, compute_transcoder, masked_lm_source
from sae.transcoder_store import TranscoderRun


def _compute(subject: Subject, job: TranscoderJob | TranscoderImportJob, ctx: runner.RunContext) -> Result:
    """A training run (``sae.transcoder_job``) or a SAELens file checked and stored (``sae.transcoder_import``)."""
    return job.make(subject, ctx) if isinstance(job, TranscoderImportJob) else compute_transcoder(subject, job, ctx)


TRANSCODER = register(Analysis(name=tstore.ANALYSIS, code_version=tstore.CODE_VERSION, compute=_compute,
                               from_result=tstore.from_result,
                               doc="a (skip) transcoder of one block's MLP with its held-out metrics"))
_WIDTHS = ("d_in", "d_out", "d_sae")


def transcoder_job(source: Any, layer: int, *, skip: bool = False, k: int = 32, expansion: int | None = 8,
                   d_sae: int | None = None, n_tokens: int = 200_000, batch_size: int = 1024, lr: float = 1e-3,
                   seed: int = 0, mask: bool | None = None, mask_rate: float = MASK_RATE,
                   texts: Sequence[str] | None = None, eval_texts: Sequence[str] | None = None,
                   per_package: int | None = None, max_tokens: int = 128, loss: bool = True, loss_docs: int = 64,
                   trust_pickle: bool = False, **cfg_fields: Any) -> tuple[Source, TranscoderJob]:
    """(the opened source, the checked request) of ``sae_transcoder``'s arguments; every setting is
    checked here (ConfigError) before any model boots or any text is read."""
    if expansion is None and d_sae is None:
        raise ConfigError("give d_sae or expansion (d_sae = expansion x d_model)")
    if d_sae is None and (isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1):
        raise ConfigError(f"transcoder expansion={expansion!r}: must be an integer >= 1; pass e.g. expansion=8")
    if clash := sorted(set(cfg_fields) & set(_WIDTHS)):
        raise ConfigError(f"transcoder {clash[0]} is set from the model (d_in, d_out) or by d_sae= / expansion=; "
                          "leave it out of the keyword settings")
    names = {f.name for f in dataclasses.fields(TranscoderConfig)}
    if unknown := sorted(set(cfg_fields) - names):
        raise ConfigError(f"unknown transcoder setting(s) {unknown}; valid: {', '.join(sorted(names - set(_WIDTHS)))}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens={max_tokens!r}: must be an integer >= 2; pass e.g. max_tokens=128")
    if isinstance(loss_docs, bool) or not isinstance(loss_docs, int) or loss_docs < 1:
        raise ConfigError(f"loss_docs={loss_docs!r}: must be an integer >= 1; pass e.g. loss_docs=64")
    if mask not in (None, True, False):
        raise ConfigError(f"mask={mask!r}: must be True, False or None (None: on for masked LMs)")
    fields = {"k": k, "skip": skip, "layer": layer, "lr": lr, "batch_size": batch_size, "n_tokens": n_tokens,
              "seed": seed, **cfg_fields}
    # the config with a stand-in width checks every setting now; its dict without the widths goes into the key
    stand_in = k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else 1
    probe = TranscoderConfig(d_in=1, d_out=1, d_sae=d_sae if d_sae is not None else stand_in, **fields)
    settings = requests.canonical({n: v for n, v in probe.to_dict().items() if n not in _WIDTHS})
    src = open_source(source, trust_pickle=trust_pickle)
    masked_lm = masked_lm_source(src)
    if mask and not masked_lm:
        raise ConfigError(f"mask=True: {src.label} is not a masked LM (its config.json names no BERT-style model), "
                          "so [MASK] tokens mean nothing to it; leave mask unset for causal LMs")
    use_mask = masked_lm if mask is None else bool(mask)
    if use_mask and not (isinstance(mask_rate, (int, float)) and not isinstance(mask_rate, bool)
                         and math.isfinite(mask_rate) and 0 < mask_rate < 1):
        raise ConfigError(f"mask_rate={mask_rate!r}: must be a number in (0, 1); 0.15 is BERT's rate")
    train_build, corpus = requests.corpus("train", texts, per_package, seed, 0.1)
    eval_build, eval_corpus = requests.corpus("eval", eval_texts if eval_texts is not None else texts, per_package,
                                              seed, 0.1)
    job = TranscoderJob(settings=settings, fields=fields, expansion=None if d_sae is not None else int(expansion),
                        d_sae=d_sae, corpus=corpus, eval_corpus=eval_corpus, train_texts=train_build,
                        eval_texts=eval_build, max_tokens=max_tokens, mask_rate=float(mask_rate) if use_mask else 0.0,
                        masked_lm=masked_lm, loss=bool(loss), loss_docs=loss_docs, source_spec=requests.spec_of(src))
    return src, job


def _key(src: Source, job: TranscoderJob) -> str:
    return entry_key(src.fingerprint, TRANSCODER.name, job.store_params(), TRANSCODER.code_version)


def sae_transcoder(source: Any = "minilm", layer: int = 0, *, skip: bool = False, k: int = 32,
                   expansion: int | None = 8, d_sae: int | None = None, n_tokens: int = 200_000,
                   batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, mask: bool | None = None,
                   mask_rate: float = MASK_RATE, texts: Sequence[str] | None = None,
                   eval_texts: Sequence[str] | None = None, per_package: int | None = None, max_tokens: int = 128,
                   loss: bool = True, loss_docs: int = 64, store: StoreLike = None, refresh: bool = False,
                   progress: Progress | None = None, device: str = "auto", trust_pickle: bool = False,
                   **cfg_fields: Any) -> TranscoderRun:
    """Train a transcoder (``skip``: a skip transcoder) of block ``layer``'s MLP: MLP input -> MLP
    output, evaluate it and store it (served from the store when stored with the same settings).

    Width ``d_sae`` or ``expansion`` x d_model; ``k`` latents per token (TopK); ``cfg_fields``: any
    other ``TranscoderConfig`` field. Text: the docstring corpus (train split for training, eval
    split for the metrics) or ``texts`` / ``eval_texts``. ``mask`` (masked LMs): train on text with
    ``mask_rate`` of the tokens replaced by [MASK] (default: on for masked LMs, off otherwise).
    Returns the transcoder with its entry ``key``, held-out ``nmse`` and ``l0`` and, with ``loss``,
    ``loss_clean`` / ``loss_spliced`` / ``loss_zero`` / ``loss_recovered`` (MLP output replaced by
    the prediction vs zero-ablated; on the first ``loss_docs`` held-out texts)."""
    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    src, job = transcoder_job(source, layer, skip=skip, k=k, expansion=expansion, d_sae=d_sae, n_tokens=n_tokens,
                              batch_size=batch_size, lr=lr, seed=seed, mask=mask, mask_rate=mask_rate, texts=texts,
                              eval_texts=eval_texts, per_package=per_package, max_tokens=max_tokens, loss=loss,
                              loss_docs=loss_docs, trust_pickle=trust_pickle, **cfg_fields)
    out = runner.run(TRANSCODER, Subject(src.fingerprint, src), job, ctx=ctx)
    return replace(out, key=_key(src, job))


def find_sae_transcoder(source: Any, layer: int = 0, *, store: StoreLike = None, **settings: Any
                        ) -> TranscoderRun | None:
    """The transcoder ``sae_transcoder(source, layer, **settings)`` would serve, or None (never
    computes or boots; None also for a corrupt entry)."""
    src, job = transcoder_job(source, layer, **settings)
    found = runner.find(TRANSCODER, src.fingerprint, job, store=store)
    return None if found is None else replace(found, key=_key(src, job))


def stored_sae_transcoders(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of the stored transcoders (this code version), newest first; ``fingerprint``: one model."""
    return runner.stored(TRANSCODER, fingerprint, store=store)


def load_sae_transcoder(key: str, store: StoreLike = None) -> TranscoderRun:
    """The stored transcoder with this entry key (or a unique prefix of 8+ characters): the
    transcoder, its metrics and training history. NotStoredError when no stored transcoder has it."""
    st = open_store(store)
    info = runner.entry(key, store=st)
    return replace(runner.load(info.key, store=st, analysis=TRANSCODER), key=info.key)


def sae_transcoders(store: StoreLike = None) -> pd.DataFrame:
    """One row per stored transcoder (``sae.transcoder_store.LIST_COLUMNS``: key, name, model, layer,
    kind, architecture, widths, masked, metrics ...), newest first (index reads only; never computes)."""
    st = open_store(store)
    labels = {m.fingerprint: m.label for m in st.models()}
    return tstore.transcoder_rows(stored_sae_transcoders(store=st), labels)


__all__ = ["TRANSCODER", "TranscoderRun", "find_sae_transcoder", "load_sae_transcoder", "sae_transcoder",
           "sae_transcoders", "stored_sae_transcoders", "transcoder_job"]
