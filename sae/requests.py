"""What an SAE request is made of before anything runs, and the models it runs on.

- ``train_request(settings, corpus)``: the request a training run records in its store entry's
  meta (``REQUEST_VERSION``; the same call is then served from the store without booting the
  model) and hashes into its checkpoint path (``checkpoint_path``);
- ``corpus(...)`` / ``corpus_of(...)``: the texts of a request (a split of the docstring corpus of
  ``sae.corpus.sae_corpus``, or the caller's texts, identified by their hash) as a function that
  builds them (it takes seconds) and the params that identify them in store keys;
- ``check_memory``: the training estimate of ``sae.memory`` against the limit, before the model boots;
- ``reopen``: the model a stored SAE was trained on (its recorded spec, or ``source=``), checked
  against the SAE's fingerprint;
- ``booted`` / ``mlm_booted``: the model from the process's one model cache
  (``analysis.model_cache``, through the run's context: its device), and the same encoder with its
  trained masked-LM head (cache variant ``"mlm-head"``).

These dicts are parts of store keys: change nothing in them without bumping ``REQUEST_VERSION``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import ConfigError, SourceError
from analysis.sources import Source, open_source
from analysis.store import canonical_json
from sae.config import TrainSettings

if TYPE_CHECKING:
    import torch

    from analysis.run import RunContext
    from sae.config import SAEConfig

REQUEST_VERSION = "sae-api-1"
MLM_VARIANT = "mlm-head"  # model-cache variant: the encoder with its trained masked-LM head


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from the store's JSON (tuples -> lists, numpy scalars -> numbers)."""
    return json.loads(canonical_json(obj))


def spec_of(src: Source) -> str | None:
    """A spec that reopens ``src`` later: its bundled name or its path (None for in-memory modules)."""
    if src.kind.startswith("bundled:"):
        return src.kind.split(":", 1)[1]
    return None if src.kind == "module" or src.hf_dir is None else str(src.hf_dir)


def texts_id(texts: Sequence[str]) -> str:
    """The first 16 hex digits of the sha256 of the texts joined by NUL: how store keys name them."""
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def corpus(split: str, texts: Sequence[Any] | None, per_package: int | None, seed: int,
           eval_fraction: float) -> tuple[Callable[[], list[str]], dict]:
    """(a function building the texts, corpus params) for ``split`` of the docstring corpus or, given,
    the caller's ``texts`` (strings or DocText). The corpus is only built when the function is called."""
    if texts is not None:
        items = [t.text if hasattr(t, "text") else str(t) for t in texts]
        return (lambda: items), {"texts": texts_id(items), "n_texts": len(items)}

    def build() -> list[str]:
        from sae.corpus import sae_corpus

        return [d.text for d in sae_corpus(split, eval_fraction=eval_fraction, seed=seed, per_package=per_package)]

    return build, {"split": split, "per_package": per_package, "seed": seed, "eval_fraction": eval_fraction}


def given_texts(meta: Mapping[str, Any]) -> bool:
    """Whether the SAE whose entry meta is ``meta`` was trained on texts given by the caller."""
    return "split" not in meta.get("request", {}).get("corpus", {})


def corpus_of(key: str, meta: Mapping[str, Any], split: str,
              texts: Sequence[Any] | None) -> tuple[Callable[[], list[str]], dict]:
    """Texts for evaluating / explaining the stored SAE ``key`` (entry meta ``meta``): ``split`` of its
    training corpus, or ``texts``; the params carry its ``max_tokens``. ConfigError when it was
    trained on the caller's texts and none are given."""
    c = meta.get("request", {}).get("corpus", {})
    if texts is None and given_texts(meta):
        raise ConfigError(f"SAE {key[:12]} was trained on texts given by the caller; pass texts= (held-out "
                          "texts for an evaluation, any texts for feature data)")
    build, params = corpus(split, texts, c.get("per_package"), c.get("seed", 0), c.get("eval_fraction", 0.1))
    return build, {**params, "max_tokens": int(c.get("max_tokens", 128))}


def train_request(settings: TrainSettings, corpus_params: Mapping[str, Any]) -> dict:
    """The request a training run records (canonical JSON form): version, layer, width rule, the
    SAEConfig fields it fixes and its corpus."""
    return canonical({"version": REQUEST_VERSION, "layer": int(settings.layer),
                      "expansion": settings.width_expansion, "d_sae": settings.d_sae,
                      "fields": settings.sae_fields(),
                      "corpus": {**corpus_params, "max_tokens": int(settings.max_tokens)}})


def import_request(layer: int, tag: str) -> dict:
    """The request an imported SAE records: its layer, a hash of its weights (``tag``) and the corpus
    its evaluation and feature data default to (the docstring corpus, as training defaults to)."""
    d = TrainSettings()
    _, params = corpus("train", None, d.per_package, d.seed, d.eval_fraction)
    return canonical({"version": REQUEST_VERSION, "layer": int(layer), "imported": tag,
                      "corpus": {**params, "max_tokens": d.max_tokens}})


def checkpoint_path(fingerprint: str, request: Mapping[str, Any]) -> Path:
    """The checkpoint file of a training request on the model ``fingerprint``:
    ``<activation cache root>/sae-checkpoints/<hash>.safetensors``."""
    from sae.harvest import default_cache_root

    digest = hashlib.sha256(canonical_json({"fingerprint": fingerprint, "request": dict(request)}).encode())
    return default_cache_root() / "sae-checkpoints" / f"{digest.hexdigest()[:32]}.safetensors"


def check_memory(settings: TrainSettings, d_in: int | None) -> None:
    """ConfigError when training ``settings`` on a hook ``d_in`` wide would exceed the memory limit
    (``sae.memory``); nothing to check while ``d_in`` is unknown."""
    from sae.memory import check_training_memory

    if d_in is not None:
        d_sae = settings.d_sae if settings.d_sae is not None else settings.expansion * d_in
        check_training_memory(d_in=d_in, d_sae=d_sae, batch_size=int(settings.batch_size),
                              architecture=settings.architecture, dtype=settings.dtype)


def reopen(key: str, cfg: SAEConfig, meta: Mapping[str, Any], source: Any = None) -> Source:
    """The model the stored SAE ``key`` was trained on: ``source`` or the spec its entry records.
    SourceError for an SAE of an in-memory model without ``source``, or a source with another
    fingerprint."""
    spec = source if source is not None else meta.get("source_spec")
    if spec is None:
        raise SourceError(f"SAE {key[:12]} was trained on an in-memory model; pass source= (the same "
                          "model) to evaluate it or compute its features")
    src = open_source(spec)
    if cfg.source_fingerprint and src.fingerprint != cfg.source_fingerprint:
        raise SourceError(f"{src.label} (fingerprint {src.fingerprint[:8]}) is not the model SAE {key[:12]} "
                          f"was trained on ({cfg.source_fingerprint[:8]}); pass that model as source=")
    return src


def _boot(src: Source, device: torch.device, dtype: torch.dtype) -> Any:
    from sae.harvest import boot_bridge

    return boot_bridge(src, dtype)  # the model cache moves it to the device


def booted(src: Source, ctx: RunContext) -> Any:
    """The TransformerBridge of ``src`` from the one model cache, on the run's device, in eval mode
    (booted here, or by any analysis before). SourceError when it cannot boot or has no attention
    layers (``blocks.L.attn.hook_z``)."""
    from sae.harvest import check_attention

    return check_attention(ctx.bridge(src, boot=_boot))


def _boot_mlm(src: Source, device: torch.device, dtype: torch.dtype) -> Any:
    from analysis.models.mlm_head import mlm_bridge

    return mlm_bridge(src).eval()


def mlm_booted(src: Source, ctx: RunContext) -> Any:
    """The bridge of a BERT-style ``src`` with its trained masked-LM head attached (trained on first
    use), from the one model cache on the run's device."""
    return ctx.bridge(src, variant=MLM_VARIANT, boot=_boot_mlm)


__all__ = ["REQUEST_VERSION", "booted", "canonical", "check_memory", "checkpoint_path", "corpus", "corpus_of",
           "given_texts", "import_request", "mlm_booted", "reopen", "spec_of", "texts_id", "train_request"]
