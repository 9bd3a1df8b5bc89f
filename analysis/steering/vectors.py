"""Steering vectors as files: safetensors with where they came from, and a repeng/llama.cpp GGUF export.

A ``SteeringVector`` holds one (d_model,) vector per layer, or for method ``svd`` k unit rows per
layer (the top-k SVD directions of the paired differences: a subspace to ablate or orthogonalise
away), plus its provenance: the source model's fingerprint and label, the hook, the position
rule, the method and the contrast set. ``save_vector`` writes ``layer.<L>`` float32 tensors,
(d_model,) or (k, d_model), and that provenance (with ``k``) as safetensors metadata (strings);
``load_vector`` reads it back and refuses files that are not LensLab steering vectors or whose
tensors disagree with the metadata.

``export_gguf`` writes the control-vector GGUF that repeng (``ControlVector.import_gguf``) and
llama.cpp (``--control-vector``) read: architecture ``controlvector``, keys
``controlvector.model_hint`` (the HF ``model_type``) and ``controlvector.layer_count``, one 1-D
F32 tensor of n_embd values per layer named ``direction.<N>``. It needs the ``gguf`` package
(``pip install gguf``, the writer maintained with llama.cpp).

What ``N`` means, from the two readers' sources:

- llama.cpp (``common/common.cpp`` ``common_control_vector_load_one``) parses ``N`` from the
  name and rejects the whole file when ``N <= 0`` ("invalid (zero) direction tensor layer
  index"), when a tensor is not F32 or not 1-D, or when the lengths differ; the metadata keys
  are not read. ``direction.N`` goes to ``tensors[N]`` (``src/llama-adapter.cpp``), and each
  model graph adds ``tensors[il]`` right after block ``il``'s last residual add
  (``cur = build_cvec(cur, il)``, 0-based ``il``): ``direction.N`` is added to the output of
  block N. The output of block 0 cannot be steered.
- repeng keys its directions by the same 0-based block index: it reads ``hidden_states[N + 1]``
  (the output of ``model.layers[N]``) and adds ``direction.N`` to that layer's output.

So ``direction.N`` is LensLab's ``blocks.N.hook_resid_post``, which is also
``blocks.{N+1}.hook_resid_pre``: ``gguf_direction_index`` maps (hook, layer) to N and refuses,
with a ``ConfigError``, what a control vector cannot express (N = 0, the embedding, and the
hooks inside a block: resid_mid, attn_out, mlp_out).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError, SourceError

FORMAT = "lenslab-steering-vector-1"
_META_KEYS = ("hook", "position", "method", "fingerprint", "source", "contrast", "contrast_fingerprint")


SVD = "svd"  # the multi-direction method: k unit rows per layer


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """One (d_model,) vector per layer, or k rows per layer, and where it came from.

    vectors: (n_layers * k, d_model) float32, read-only; rows ``i*k .. i*k + k - 1`` belong to
    ``layers[i]`` (k = 1: row i is the vector of ``layers[i]``); fingerprint: the source model's
    32-hex fingerprint ("" when unknown). A vector with k > 1 is a subspace: ``ablation`` and
    ``orthogonalize`` remove the span of all its rows; steering needs one row (``row``).
    """

    vectors: np.ndarray
    layers: tuple[int, ...]
    hook: str = "resid_post"
    position: str = "last"
    method: str = "mean_diff"
    fingerprint: str = ""
    source: str = ""
    contrast: str = ""
    contrast_fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    k: int = 1

    def __post_init__(self) -> None:
        v = np.array(self.vectors, dtype=np.float32, ndmin=2)
        layers = tuple(int(x) for x in self.layers)
        if not layers:
            raise ConfigError("a steering vector needs at least one layer")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ConfigError(f"k={self.k!r} (rows per layer) must be an integer >= 1")
        if v.ndim != 2 or v.shape[0] != len(layers) * int(self.k) or v.shape[1] == 0:
            raise ShapeError(f"a steering vector needs {int(self.k)} (d_model,) row(s) per layer: got {v.shape} for "
                             f"layers {list(layers)}")
        if len(set(layers)) != len(layers) or any(x < 0 for x in layers):
            raise ConfigError(f"layers {list(layers)} must be distinct non-negative integers")
        if not np.isfinite(v).all():
            raise ShapeError("the steering vector holds NaN or inf; re-extract it")
        v.setflags(write=False)
        object.__setattr__(self, "vectors", v)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "k", int(self.k))

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    def _index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ConfigError(f"the vector has no row for layer {layer}; it covers layers "
                              f"{', '.join(map(str, self.layers))}")
        return self.layers.index(layer)

    def rows(self, layer: int) -> np.ndarray:
        """The (k, d_model) rows of ``layer``."""
        i = self._index(layer)
        return self.vectors[i * self.k:(i + 1) * self.k]

    def require_single(self, what: str) -> None:
        """ConfigError when the vector has k > 1 rows per layer (``what`` needs one vector)."""
        if self.k > 1:
            raise ConfigError(f"this {self.method} vector holds k={self.k} directions per layer, a subspace to "
                              f"ablate or orthogonalise away; {what} needs one vector per layer: choose a row with "
                              f"vector.row(i), i in 0..{self.k - 1} (CLI: --row I)")

    def at(self, layer: int) -> np.ndarray:
        """The (d_model,) vector of ``layer`` (ConfigError for a k-row vector: pick a ``row`` first)."""
        self.require_single("at()")
        return self.vectors[self._index(layer)]

    def row(self, i: int) -> SteeringVector:
        """Row ``i`` of every layer as a one-row vector (method ``svd[i]``): a unit direction, so
        steer it with ``scale="norm"`` or an α in activation units."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < self.k:
            raise ConfigError(f"row {i!r} does not exist: this vector has rows 0..{self.k - 1} per layer")
        rows = self.vectors.reshape(len(self.layers), self.k, self.d_model)[:, int(i)]
        return replace(self, vectors=rows, k=1, method=f"{self.method}[{int(i)}]" if self.k > 1 else self.method)

    def describe(self) -> str:
        what = f"{self.method} k={self.k}" if self.k > 1 else self.method
        return (f"{what} vector from {self.contrast or '?'} at {self.hook}, layers "
                f"{','.join(map(str, self.layers))}, position {self.position}, d_model {self.d_model}, "
                f"source {self.source or '?'} ({self.fingerprint[:8] or 'no fingerprint'})")


def from_extraction(extraction: Any, layers: int | Sequence[int], method: str = "mean_diff", *,
                    fingerprint: str = "", source: str = "", k: int | None = None) -> SteeringVector:
    """The ``method`` vectors of ``layers`` from a ``steering.SteeringExtraction``.

    ``method="svd"`` takes the top ``k`` SVD directions of each layer (default: all the
    extraction computed, ``meta["k"]``) as unit rows; ConfigError when a layer has fewer
    (the paired differences have lower rank) or k exceeds what was extracted.
    """
    layers = (layers,) if isinstance(layers, (int, np.integer)) else tuple(layers)
    layers = tuple(int(x) for x in layers)
    meta = extraction.meta
    if method == SVD:
        have = int(extraction.svd_directions.shape[1])
        k = have if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= have:
            raise ConfigError(f"k={k!r} must be an integer in 1..{have}: the extraction computed the top {have} SVD "
                              f"directions; re-extract with k >= {k} (--k)")
        blocks = []
        for layer in layers:
            if layer not in extraction.layers:
                raise ConfigError(f"layer {layer!r} was not extracted; available: "
                                  f"{', '.join(map(str, extraction.layers))}")
            li = extraction.layers.index(layer)
            rank = int(np.isfinite(extraction.svd_values[li]).sum())
            if rank < k:
                raise ConfigError(f"layer {layer} has only {rank} SVD direction(s) (the rank of its paired "
                                  f"differences); ask for k <= {rank}")
            blocks.append(extraction.svd_directions[li, :k])
        rows = np.concatenate(blocks)
    else:
        k = 1
        rows = np.stack([extraction.vector(layer, method) for layer in layers])
    return SteeringVector(rows, layers, hook=meta.get("hook", "resid_post"),
                          position=meta.get("position", "last"), method=method, fingerprint=fingerprint,
                          source=source, contrast=meta.get("contrast", ""),
                          contrast_fingerprint=meta.get("contrast_fingerprint", ""), k=int(k))


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_vector(vector: SteeringVector, path: str | os.PathLike) -> Path:
    """Write ``vector`` as safetensors (``layer.<L>`` tensors, (d_model,) or (k, d_model), + provenance
    metadata), atomically."""
    import torch
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    tensors = {f"layer.{layer}": torch.from_numpy(np.array(vector.rows(layer) if vector.k > 1 else vector.at(layer)))
               for layer in vector.layers}
    metadata = {"format": FORMAT, "layers": json.dumps(list(vector.layers)), "d_model": str(vector.d_model),
                "k": str(vector.k),
                "extra": json.dumps(vector.meta, sort_keys=True, default=str),
                **{k: str(getattr(vector, k)) for k in _META_KEYS}}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_vector(path: str | os.PathLike) -> SteeringVector:
    """Read a vector written by ``save_vector``; SourceError / CorruptCheckpointError when it is not one."""
    from safetensors import SafetensorError, safe_open

    from analysis.sources import read_safetensors_header

    try:
        path = Path(path).expanduser()
        exists = path.is_file()
    except (OSError, ValueError, RuntimeError) as exc:  # embedded NUL, ~user unknown, ...
        raise SourceError(f"{path!r} is not a usable path ({exc}); give the .safetensors file of a vector") from exc
    if not exists:
        raise SourceError(f"{path}: no such file; give the .safetensors file `lenslab steer extract --out` wrote")
    header = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SourceError(f"{path}: not a LensLab steering vector (metadata format {meta.get('format')!r} "
                          f"instead of {FORMAT!r}); extract one with `lenslab steer extract`")
    try:
        layers = [int(x) for x in json.loads(meta["layers"])]
        d_model = int(meta["d_model"])
        k = int(meta.get("k", "1"))  # files written before k-row vectors hold one row per layer
        extra = json.loads(meta.get("extra", "{}"))
        with safe_open(str(path), framework="numpy") as f:
            names = set(f.keys())
            want = {f"layer.{layer}" for layer in layers}
            if names != want:
                raise CorruptCheckpointError(f"{path}: tensors {sorted(names)} do not match the layers "
                                             f"{layers} in the metadata; the file is corrupt: re-extract it")
            rows = [f.get_tensor(f"layer.{layer}") for layer in layers]
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise CorruptCheckpointError(f"{path}: unreadable steering-vector metadata or tensors ({exc}); re-extract "
                                     "it") from exc
    want_shape = (d_model,) if k == 1 else (k, d_model)
    if k < 1 or any(r.shape != want_shape for r in rows):
        raise CorruptCheckpointError(f"{path}: tensor shapes {[r.shape for r in rows]} disagree with d_model "
                                     f"{d_model} and k {k}; re-extract it")
    flat = np.concatenate([r.reshape(k, d_model) for r in rows]) if rows else np.zeros((0, d_model))
    return SteeringVector(flat, tuple(layers), meta=extra if isinstance(extra, dict) else {}, k=k,
                          **{key: str(meta.get(key, "")) for key in _META_KEYS})


def check_fingerprint(vector: SteeringVector, fingerprint: str | None, *, allow_foreign: bool = False) -> None:
    """ConfigError when the vector was extracted from another model (both fingerprints known and
    different) unless ``allow_foreign``."""
    if fingerprint and vector.fingerprint and fingerprint != vector.fingerprint and not allow_foreign:
        raise ConfigError(f"the steering vector was extracted from model {vector.fingerprint[:12]} "
                          f"({vector.source or '?'}), not from this model ({fingerprint[:12]}); extract it from this "
                          "model, or pass allow_foreign=True (--allow-foreign) if the models share a residual basis")


def check_compatible(vector: SteeringVector, *, d_model: int, fingerprint: str | None = None,
                     allow_foreign: bool = False) -> None:
    """ShapeError when the width differs; ConfigError when the vector was extracted from another
    model (fingerprints differ) unless ``allow_foreign``."""
    if vector.d_model != d_model:
        raise ShapeError(f"the steering vector has d_model {vector.d_model} but the model's d_model is {d_model}: "
                         f"it comes from another model ({vector.source or 'unknown source'}); extract one from this "
                         "model with `lenslab steer extract`")
    check_fingerprint(vector, fingerprint, allow_foreign=allow_foreign)


def gguf_direction_index(hook: str, layer: int) -> int:
    """The ``direction.N`` index llama.cpp and repeng give a vector extracted at ``hook`` of block
    ``layer`` (see the module docstring): resid_post L -> L, resid_pre L -> L - 1.

    Raises ConfigError for N = 0 (llama.cpp refuses it: block 0's output is never steered), for
    resid_pre of block 0 (the embedding) and for hooks inside a block.
    """
    if hook == "resid_post":
        index = int(layer)
    elif hook == "resid_pre":
        index = int(layer) - 1
    else:
        raise ConfigError(f"control-vector GGUF files add to a block's output (hook resid_post of block N, the same "
                          f"tensor as resid_pre of block N+1), but this vector was extracted at {hook}, inside a "
                          "block; re-extract with --hook resid_post")
    if index <= 0:
        raise ConfigError(f"{hook} of layer {layer} is the output of "
                          f"{'the embedding' if index < 0 else 'block 0'}, which llama.cpp never steers (it refuses "
                          "a file holding direction.0: 'invalid (zero) direction tensor layer index'); export a "
                          "vector from resid_post of layer >= 1 (resid_pre of layer >= 2)")
    return index


def export_gguf(vector: SteeringVector, path: str | os.PathLike, *, model_hint: str, scale: float = 1.0) -> Path:
    """Write the repeng / llama.cpp control-vector GGUF (vectors × ``scale``), atomically.

    Each layer's row becomes ``direction.<gguf_direction_index(hook, layer)>``, 1-D F32 of
    d_model values. Raises ConfigError (and writes nothing) for what a control vector cannot
    express: see ``gguf_direction_index``.
    """
    try:
        import gguf
    except ImportError as exc:
        raise ConfigError("GGUF export needs the gguf package; install it with `pip install gguf`") from exc
    vector.require_single("a control-vector GGUF")
    indices = [gguf_direction_index(vector.hook, layer) for layer in vector.layers]
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ConfigError(f"scale={scale!r} must be a finite number")
    if not model_hint:
        raise ConfigError("model_hint is empty; pass the model's config.json model_type, e.g. llama")
    path = Path(path).expanduser()

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", len(vector.layers))
        for i, index in enumerate(indices):
            row = np.ascontiguousarray(vector.vectors[i] * np.float32(scale), dtype=np.float32)
            writer.add_tensor(f"direction.{index}", row)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _atomic_write(path, write)
    return path
