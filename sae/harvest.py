"""Harvest attention outputs ``blocks.L.attn.hook_z`` (or another site of ``sae.sites``: the residual
stream before / after block L, the MLP output; ``site=``) into an on-disk, memory-mapped cache.

Public functions
- ``sae_corpus(split, ...) -> list[DocText]``: the deterministic docstring corpus cut by package
  into a train and a held-out eval part (``sae.corpus``, re-exported here).
- ``tokenize(tokenizer, texts, max_tokens) -> list[list[int]]``: the token ids every SAE path uses
  (special tokens as the tokenizer adds them; ``<bos>`` prepended when the tokenizer adds no
  special tokens itself but defines one, as the tiny LMs were trained on ``<s> text </s>``).
- ``attention_hooks(bridge) -> list[str]`` and ``check_layer(bridge, layer) -> str``: valid
  hook names; a bad layer raises ``ConfigError`` listing them.
- ``harvest(source, layer, texts, ...) -> ActivationCache``: run the model, keep hook_z of the
  real (non-padding) tokens flattened head-major to [tokens, n_heads*d_head] float32, cached.
- ``open_activation_cache(path) -> ActivationCache``.

How: texts are tokenised once, sorted by length and packed into batches of at most
``batch_tokens`` padded tokens (right padding). Each batch runs through the
``TransformerBridge`` with one forward hook on ``blocks.L.attn.hook_z`` that copies the
activations and raises a private exception, so nothing after that hook runs (no later layers,
no unembedding). ``dtype="bfloat16"`` runs the forward under bf16 autocast (several times
faster on CPUs with bf16 matmuls; activations differ from float32 by ~1% of their scale).

Cache layout (``<root>/<key>/``; root = ``$LENSLAB_ACTIVATIONS`` or ``activations/`` beside the
default store): ``acts.npy`` float32 [tokens, d_in] (``np.load(mmap_mode="r")``),
``token_ids.npy`` int32 [tokens], ``doc_ids.npy`` int32 [tokens] (index into ``texts``),
``positions.npy`` int32 [tokens] (position in the tokenised text), ``texts.json``,
``meta.json``. Rows are in text order, positions ascending. Key = sha256 of (source
fingerprint, hook name, sha256 of the texts, max_tokens, dtype, tokenizer files, version). A
harvest writes into ``<root>/.tmp-<uuid>/`` and renames it into place with ``os.replace``: a
killed harvest leaves no partial cache (stale temp dirs are removed by later harvests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.errors import ConfigError, CorruptEntryError, SourceError
from analysis.forward import forward_until
from analysis.models.encoder import collate
from analysis.progress import Progress
from sae.config import HOOK_RE, hook_name_for
from sae.corpus import sae_corpus  # noqa: F401  (re-exported: the harvest's texts)
from sae.sites import DEFAULT_SITE, check_site

HARVEST_VERSION = "harvest-1"
ENV_VAR = "LENSLAB_ACTIVATIONS"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_FILES = ("acts.npy", "token_ids.npy", "doc_ids.npy", "positions.npy", "texts.json", "meta.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "merges.txt", "vocab.json")


def _texts_of(texts: Sequence[Any]) -> list[str]:
    out = [t.text if hasattr(t, "text") else t for t in texts]
    if not all(isinstance(t, str) for t in out):
        raise ConfigError("texts must be strings or DocText items; got "
                          f"{sorted({type(t).__name__ for t in out if not isinstance(t, str)})}")
    return out


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int = 128) -> list[list[int]]:
    """Token ids per text, truncated to ``max_tokens``: what the harvest and the loss functions
    feed the model. Special tokens are added as the tokenizer does (BERT: [CLS] ... [SEP]);
    a tokenizer that adds no special tokens but has a BOS token gets it prepended."""
    if max_tokens < 2:
        raise ConfigError(f"max_tokens={max_tokens} must be >= 2")
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
    adds_specials = len(tokenizer("", add_special_tokens=True)["input_ids"]) > 0
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and not adds_specials:
        enc = [ids if ids[:1] == [bos] else [bos, *ids][:max_tokens] for ids in enc]
    return [list(map(int, ids)) for ids in enc]


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (input_ids [batch, pos] int64, attention_mask [batch, pos] int64)."""
    return collate(ids, pad_id)


def pack_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of texts grouped into batches of at most ``batch_tokens`` padded tokens
    (longest first, so each batch pads little). A text longer than the budget rides alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * width > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad_id_of(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        if (v := getattr(tokenizer, name, None)) is not None:
            return int(v)
    return 0


# -- hooks ------------------------------------------------------------------------------------
def attention_hooks(bridge: Any) -> list[str]:
    """Every ``blocks.L.attn.hook_z`` the bridge exposes, by layer."""
    names = [n for n in bridge.hook_dict if HOOK_RE.match(n)]
    return sorted(names, key=lambda n: int(HOOK_RE.match(n).group(1)))


def check_layer(bridge: Any, layer: int, site: str = DEFAULT_SITE) -> str:
    """The hook of ``site`` (default ``blocks.{layer}.attn.hook_z``) if the bridge has it; otherwise
    ConfigError listing the valid layers (``sae.sites.check_site``)."""
    if site != DEFAULT_SITE:
        return check_site(bridge, site, layer)
    valid = attention_hooks(bridge)
    if not valid:
        raise SourceError("this model exposes no blocks.L.attn.hook_z: attention-output SAEs need a transformer "
                          "with attention layers (e.g. minilm, bilinear-lm, tiny-mixtral)")
    name = hook_name_for(layer) if isinstance(layer, int) and not isinstance(layer, bool) else str(layer)
    if name not in valid:
        raise ConfigError(f"layer {layer!r} has no attention hook_z; valid layers are "
                          f"{[int(HOOK_RE.match(n).group(1)) for n in valid]} ({valid[0]} ... {valid[-1]})")
    return name


def model_device(model: Any) -> torch.device:
    """The device of a model's parameters (CPU for one without any): where its inputs go."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def head_shape(bridge: Any) -> tuple[int, int]:
    """(n_heads, d_head) of the bridge's attention layers."""
    return int(bridge.cfg.n_heads), int(bridge.cfg.d_head)


def check_attention(bridge: Any) -> Any:
    """``bridge`` when it exposes attention hooks (``blocks.L.attn.hook_z``); SourceError otherwise."""
    if not attention_hooks(bridge):
        check_layer(bridge, 0)  # raises SourceError: no attention layers
    return bridge


def boot_bridge(src: Any, dtype: torch.dtype = torch.float32) -> Any:
    """A new TransformerBridge of the ``Source`` ``src``, in eval mode, on CPU; SourceError when it
    cannot boot or has no attention layers."""
    try:
        bridge = src.boot_bridge(dtype=dtype)
    except SourceError as exc:
        raise SourceError(f"{src.label}: cannot run it as a transformer ({exc}); attention-output SAEs need a "
                          "model with attention layers and a tokenizer (e.g. minilm, bilinear-lm, "
                          "tiny-mixtral)") from exc
    return check_attention(bridge.eval())


def boot(source: Any) -> tuple[Any, Any]:
    """(Source, TransformerBridge) for a source spec, booted for this call alone (the pipeline takes
    its models from the one model cache: ``sae.requests.booted``)."""
    from analysis.sources import open_source

    src = open_source(source)
    return src, boot_bridge(src)


# -- cache ------------------------------------------------------------------------------------
def default_cache_root() -> Path:
    """``$LENSLAB_ACTIVATIONS``, else ``activations/`` next to the default store directory."""
    if env := os.environ.get(ENV_VAR):
        return Path(env).expanduser()
    from analysis.store import default_store_root

    return default_store_root().parent / "activations"


@dataclass(frozen=True, eq=False)
class ActivationCache:
    """Harvested hook_z activations of real tokens (arrays read-only, ``acts`` memory-mapped)."""

    path: Path
    acts: np.ndarray  # [tokens, d_in] float32, memmap
    token_ids: np.ndarray  # [tokens] int32
    doc_ids: np.ndarray  # [tokens] int32, index into texts
    positions: np.ndarray  # [tokens] int32, position within the tokenised text
    texts: list[str] = field(repr=False)
    meta: dict[str, Any] = field(repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.acts.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[1])

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def hook_name(self) -> str:
        return str(self.meta["hook_name"])

    @property
    def site(self) -> str:
        return str(self.meta.get("site", DEFAULT_SITE))

    @property
    def n_heads(self) -> int | None:
        """Heads of a hook_z cache; None at any other site."""
        return None if self.meta.get("n_heads") is None else int(self.meta["n_heads"])

    @property
    def d_head(self) -> int | None:
        return None if self.meta.get("d_head") is None else int(self.meta["d_head"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def tensor(self) -> torch.Tensor:
        """All activations as a float32 tensor in memory (a copy of the memmap)."""
        return torch.from_numpy(np.array(self.acts, dtype=np.float32))


def open_activation_cache(path: str | os.PathLike) -> ActivationCache:
    """Open a harvested cache directory; CorruptEntryError if files are missing or inconsistent."""
    d = Path(path)
    try:
        meta = json.loads((d / "meta.json").read_text())
        texts = json.loads((d / "texts.json").read_text())
        acts = np.load(d / "acts.npy", mmap_mode="r")
        cols = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in ("token_ids", "doc_ids", "positions")}
    except (OSError, ValueError) as exc:
        raise CorruptEntryError(f"activation cache {d} is unreadable ({exc}); delete the directory and harvest "
                                "again") from exc
    n = meta.get("n_tokens")
    if acts.ndim != 2 or acts.shape[0] != n or any(c.shape != (n,) for c in cols.values()):
        raise CorruptEntryError(f"activation cache {d}: array shapes disagree with meta.json (n_tokens={n}); "
                                "delete the directory and harvest again")
    return ActivationCache(d, acts, cols["token_ids"], cols["doc_ids"], cols["positions"], texts, meta)


def _tokenizer_hash(hf_dir: Path | None) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if hf_dir is not None and (p := Path(hf_dir) / name).is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def cache_key(fingerprint: str, hook_name: str, texts: Sequence[str], *, max_tokens: int, dtype: str,
              tokenizer_hash: str = "") -> str:
    """The cache directory name for these inputs (sha256 hex, 32 characters)."""
    th = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    payload = json.dumps({"fingerprint": fingerprint, "hook": hook_name, "texts": th, "n_texts": len(texts),
                          "max_tokens": max_tokens, "dtype": dtype, "tokenizer": tokenizer_hash,
                          "version": HARVEST_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _clean_stale(root: Path, older_than_s: float = 3600.0) -> None:
    now = time.time()
    for p in root.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# -- harvest ----------------------------------------------------------------------------------
def hook_z_batches(bridge: Any, layer: int, ids: Sequence[Sequence[int]], *, batch_tokens: int = 8192,
                   dtype: str = "float32", pad_id: int | None = None, site: str = DEFAULT_SITE):
    """Yield ``(indices, z)`` per packed batch: ``indices`` into ``ids``, ``z`` [batch, pos, d_in]
    float32 activations of ``site`` (default hook_z, flattened head-major) of layer ``layer`` on CPU
    (rows right-padded; real tokens are ``z[j, :len(ids[i])]``). The forward pass runs on the
    bridge's device and stops at the hook."""
    name = check_layer(bridge, layer, site)
    if dtype not in DTYPES:
        raise ConfigError(f"harvest dtype {dtype!r} is unknown; choose float32 or bfloat16")
    pad = pad_id if pad_id is not None else pad_id_of(bridge.tokenizer)
    dev = model_device(bridge)
    for batch in pack_batches([len(x) for x in ids], batch_tokens):
        input_ids, mask = pad_batch([ids[i] for i in batch], pad)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            got = forward_until(bridge, input_ids.to(dev), mask.to(dev), [name])
        if name not in got:
            raise SourceError(f"{name} did not fire during the forward pass; the bridge does not route this model "
                              f"through that hook (site {site!r})")
        z = got[name]
        yield batch, z.reshape(z.shape[0], z.shape[1], -1).float().cpu()  # hook_z: heads flattened


def harvest(source: Any, layer: int, texts: Sequence[Any], *, max_tokens: int = 128, batch_tokens: int = 8192,
            dtype: str = "float32", cache_dir: str | os.PathLike | None = None, refresh: bool = False,
            bridge: Any = None, progress: Progress | None = None, site: str = DEFAULT_SITE) -> ActivationCache:
    """hook_z (or ``site``, ``sae.sites``) of ``layer`` for every real token of ``texts`` (strings or
    DocText), cached on disk.

    ``source``: a source spec or ``Source``; ``bridge``: an already booted bridge of it (saves
    the boot). Returns the cache (reused when one with the same key exists, unless ``refresh``).
    Raises ConfigError (empty corpus, unknown layer: the message lists the valid ones),
    SourceError (no attention layers), ShapeError (the model produced NaN/inf at the hook).
    """
    from analysis.errors import ShapeError
    from analysis.sources import open_source

    text_list = [t for t in _texts_of(texts) if t.strip()]
    if not text_list:
        raise ConfigError("the corpus is empty (no non-blank texts); pass texts, e.g. sae_corpus('train')")
    src = open_source(source)
    if bridge is None:
        src, bridge = boot(src)
    hook = check_layer(bridge, layer, site)
    n_heads, d_head = head_shape(bridge) if site == DEFAULT_SITE else (None, None)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    key = cache_key(src.fingerprint, hook, text_list, max_tokens=max_tokens, dtype=dtype,
                    tokenizer_hash=_tokenizer_hash(src.hf_dir))
    final = root / key
    if final.is_dir() and not refresh:
        try:
            return open_activation_cache(final)
        except CorruptEntryError:
            shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)

    ids = tokenize(bridge.tokenizer, text_list, max_tokens)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_tokens, d_in = int(offsets[-1]), n_heads * d_head if n_heads is not None else int(bridge.cfg.d_model)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        acts = np.lib.format.open_memmap(tmp / "acts.npy", mode="w+", dtype=np.float32, shape=(n_tokens, d_in))
        token_ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
        doc_ids = np.repeat(np.arange(len(ids), dtype=np.int32), lengths)
        positions = (np.arange(n_tokens, dtype=np.int64) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
        t0 = time.perf_counter()
        done = 0
        for batch, z in hook_z_batches(bridge, layer, ids, batch_tokens=batch_tokens, dtype=dtype, site=site):
            if z.shape[-1] != d_in:
                raise ShapeError(f"{hook} has width {z.shape[-1]}, expected {d_in} (n_heads*d_head or d_model)")
            zn = z.numpy()
            for j, i in enumerate(batch):
                acts[offsets[i]:offsets[i + 1]] = zn[j, :lengths[i]]
            done += int(lengths[list(batch)].sum())
            if progress is not None:  # counted in tokens, so a piped log shows tokens/s
                progress(done, n_tokens, f"{hook} ({len(ids)} texts)")
        seconds = time.perf_counter() - t0
        bad = sum(int((~np.isfinite(acts[s:s + 65536])).sum()) for s in range(0, n_tokens, 65536))
        if bad:
            raise ShapeError(f"{src.label}: {hook} produced {bad} NaN/inf values; the model is broken or overflowed "
                             "in bfloat16: harvest with dtype='float32' or check the checkpoint")
        acts.flush()
        del acts
        np.save(tmp / "token_ids.npy", token_ids)
        np.save(tmp / "doc_ids.npy", doc_ids)
        np.save(tmp / "positions.npy", positions)
        (tmp / "texts.json").write_text(json.dumps(text_list))
        meta = {"fingerprint": src.fingerprint, "source_label": src.label, "hook_name": hook, "layer": int(layer),
                **({} if site == DEFAULT_SITE else {"site": site}),
                "n_heads": n_heads, "d_head": d_head, "n_tokens": n_tokens, "n_texts": len(text_list),
                "max_tokens": max_tokens, "dtype": dtype, "batch_tokens": batch_tokens, "seconds": seconds,
                "tokens_per_s": n_tokens / seconds if seconds > 0 else None, "version": HARVEST_VERSION,
                "threads": torch.get_num_threads(), "created": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # a concurrent harvest of the same key won: use its copy
                raise
            if refresh:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_activation_cache(final)
