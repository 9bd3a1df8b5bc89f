"""Which weights file a model directory means, for LensLab and for transformers alike.

LensLab fingerprints the tensors it reads; activations come from a model that transformers'
``from_pretrained(dir)`` builds. Results are stored under the fingerprint, so both must read the
same file. transformers 5 picks, in a local directory, the first of

1. the file ``config.json`` names as ``transformers_weights``;
2. ``model.safetensors``;
3. ``model.safetensors.index.json`` (a sharded checkpoint);
4. ``pytorch_model.bin``, then ``pytorch_model.bin.index.json`` (pickle, unless ``use_safetensors``).

``weights_in_dir`` resolves a directory the same way and refuses a directory that gives two
answers (``AmbiguousSourceError`` naming the files and the fix):

- ``model.safetensors`` beside ``model.safetensors.index.json`` (one would be silently ignored);
- safetensors weights under another name than ``model.safetensors`` (or its index) beside pickle
  weights (``pytorch_model*.bin`` or its index): transformers would load the pickle;
- several pickle files and no ``pytorch_model.bin`` (which one holds the weights?).

``model.safetensors`` (or its index) beside ``pytorch_model.bin``, as a git clone of a Hub repo
holds them, is not ambiguous: transformers takes the safetensors first, which is what LensLab
fingerprints, and the pickle is never read.

Files that are not weights (``training_args.bin``, ``optimizer.pt``, ...) beside safetensors
weights are ignored, as transformers ignores them. ``transformers_checkpoint`` tells which file
transformers would open now; ``Source.model_dir`` compares it with the source's before anything
boots. ``from_pretrained_kwargs`` adds ``use_safetensors=True`` unless the directory's pickle was
opened with the trust flag in this process, so no loader unpickles without the flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from analysis.errors import AmbiguousSourceError, SourceError, UnsafeCheckpointError
from analysis.safetensors_io import read_small_file, short

CONFIG = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONFIG_LIMIT = 16 * 1024 * 1024

Kind = Literal["index", "safetensors", "pickle"]

# Resolved directories whose pickle checkpoint was opened with trust_pickle=True in this process.
_TRUSTED_PICKLE_DIRS: set[Path] = set()


def file_names(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:4])
    return shown + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def configured_weights(d: Path) -> Path | None:
    """The weights file ``config.json`` names as ``transformers_weights`` (transformers then loads
    it instead of the default names), or None. A name outside ``d`` is a SourceError, a pickle
    an UnsafeCheckpointError: transformers would unpickle it whatever LensLab read."""
    cfg = d / CONFIG
    if not cfg.is_file():
        return None
    try:
        data = json.loads(read_small_file(cfg, _CONFIG_LIMIT, "config.json"))
    except (SourceError, ValueError, RecursionError):
        return None  # transformers cannot parse it either: nothing boots from this directory
    name = data.get("transformers_weights") if isinstance(data, dict) else None
    if name is None:
        return None
    try:
        path = d / name if isinstance(name, str) and name else None
        inside = path is not None and path.resolve().is_relative_to(d.resolve())
    except (OSError, ValueError, RuntimeError):  # embedded NUL, name too long, symlink loop
        inside = False
    if path is None or not inside:
        raise SourceError(f"{cfg}: transformers_weights {short(name)} is not a file name inside {d}; "
                          "fix or remove that key of config.json")
    if not is_safetensors(path):
        raise UnsafeCheckpointError(f"{cfg}: transformers_weights names {path.name}, not a safetensors file; "
                                    "transformers would unpickle it: convert it to safetensors and name that file")
    return path


def transformers_checkpoint(d: Path) -> Path | None:
    """The weights file transformers' ``from_pretrained(d)`` opens (its order: see the module
    docstring), or None when it would find none."""
    if (explicit := configured_weights(d)) is not None:
        return explicit
    for name in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, PICKLE_SINGLE, PICKLE_INDEX):
        if (d / name).is_file():
            return d / name
    return None


def weights_in_dir(d: Path) -> tuple[Kind, list[Path]]:
    """What a model directory's weights are: ``("index", [index])``, ``("safetensors", files)``
    or ``("pickle", candidates)`` (the caller checks trust; more than one candidate is ambiguous).

    Raises AmbiguousSourceError for the directories listed in the module docstring and SourceError
    when there are no weights at all.
    """
    explicit = configured_weights(d)
    if explicit is not None:
        return ("index" if explicit.name.endswith(".index.json") else "safetensors"), [explicit]
    single, index = d / SAFETENSORS_SINGLE, d / SAFETENSORS_INDEX
    if single.is_file() and index.is_file():
        raise AmbiguousSourceError(
            f"{d}: holds both {SAFETENSORS_SINGLE} and {SAFETENSORS_INDEX}, two answers to which weights are the "
            f"model's (transformers loads {SAFETENSORS_SINGLE} and ignores the index); delete the stale one, or "
            f"point the source at the file you mean ({single} or {index})")
    safetensors = ([single] if single.is_file() else [index] if index.is_file()
                   else sorted(d.glob("*.safetensors")))
    pickle_weights = sorted(d.glob("pytorch_model*.bin")) + ([d / PICKLE_INDEX] if (d / PICKLE_INDEX).is_file()
                                                              else [])
    if safetensors and pickle_weights and not (single.is_file() or index.is_file()):
        raise AmbiguousSourceError(
            f"{d}: holds safetensors weights ({file_names(safetensors)}) and pickle weights "
            f"({file_names(pickle_weights)}); a loader may take either: delete or move the pickle weights (keep the "
            f"safetensors), or point the source at {safetensors[0]}")
    if safetensors:
        return ("index" if safetensors == [index] else "safetensors"), safetensors
    if (d / PICKLE_INDEX).is_file():
        raise SourceError(f"{d}: a sharded pickle checkpoint ({PICKLE_INDEX}) is not supported; convert it to "
                          "safetensors (transformers' save_pretrained(dir, safe_serialization=True) does)")
    if (d / PICKLE_SINGLE).is_file():
        return "pickle", [d / PICKLE_SINGLE]
    pickles = [p for s in PICKLE_SUFFIXES for p in sorted(d.glob(f"*{s}"))]
    if pickles:
        return "pickle", pickles
    raise SourceError(f"{d}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or *.safetensors in this directory; "
                      "point the source at a Hugging Face model directory or a .safetensors file")


def refuse_several_pickles(d: Path, pickles: list[Path]) -> None:
    """AmbiguousSourceError when a directory offers several pickle files and none is the weights' name."""
    if len(pickles) > 1:
        raise AmbiguousSourceError(f"{d}: holds several pickle files ({file_names(pickles)}) and no {PICKLE_SINGLE}; "
                                   "point the source at the one that holds the weights")


def is_safetensors(path: Path) -> bool:
    """A safetensors weights file or shard index (by name, as transformers decides)."""
    return path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json")


def refuse_untrusted_pickle(d: Path) -> None:
    """UnsafeCheckpointError when transformers' ``from_pretrained(d)`` (which cannot be given
    ``use_safetensors`` through TransformerLens) would unpickle a file not opened with the flag."""
    loads = transformers_checkpoint(d)
    if loads is not None and not is_safetensors(loads) and d.resolve() not in _TRUSTED_PICKLE_DIRS:
        raise UnsafeCheckpointError(f"{d}: transformers would load the pickle {loads.name}, which can run arbitrary "
                                    "code; convert it to safetensors, or open the directory with --trust-pickle "
                                    "(trust_pickle=True) if you trust the file")


def trust_pickle_dir(d: Path) -> None:
    """Record that ``d``'s pickle checkpoint was opened with the trust flag (see ``from_pretrained_kwargs``)."""
    _TRUSTED_PICKLE_DIRS.add(d.resolve())


def from_pretrained_kwargs(model_dir: Path) -> dict[str, bool]:
    """Keyword arguments for transformers' ``from_pretrained(model_dir)``: safetensors only, unless
    this process opened the directory's pickle checkpoint with ``trust_pickle=True``."""
    return {"use_safetensors": Path(model_dir).resolve() not in _TRUSTED_PICKLE_DIRS}
