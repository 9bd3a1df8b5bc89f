"""Reading safetensors files without trusting them: headers validated, tensors read one at a time.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets relative to
the data section after the header), then the data. Everything in the header is checked before
any byte of data is read, in time linear in the header's size:

- only regular files are opened, and without blocking (a FIFO or a device named
  ``*.safetensors`` would otherwise block the reader or never end);
- a shape has at most ``MAX_DIMS`` dimensions, each an integer in ``[0, 2**63)``, and the product
  of its sizes (zeros counted as 1, as torch's strides count them) stays below ``2**63``;
- ``end - start`` is exactly the tensor's byte size, and ``end`` lies inside the file;
- no two tensors' non-empty byte ranges overlap (safetensors' own reader refuses that too).

Every failure is a ``CorruptCheckpointError`` (or a ``SourceError`` for an unreadable path)
whose message names the file, the value and the fix. A tensor is read with one bounded
``readinto`` into a buffer of exactly its size: no memory map, so the pages of tensors already
analysed do not stay in the process's resident set.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from analysis.errors import CorruptCheckpointError, SourceError

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_DIMS = 32  # real checkpoints use <= 5; far below what would make shape arithmetic slow
_INT64_LIMIT = 2**63  # torch sizes are int64

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}

_SHORT = reprlib.Repr()
_SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 8, 4, 40, 40, 40


def short(value: Any) -> str:
    """A bounded repr for error messages (a header value may be a 300 000-element list)."""
    return _SHORT.repr(value)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: Path, *, buffering: int = -1) -> IO[bytes]:
    """Open ``path`` for binary reading if it is a regular file (symlinks followed).

    The open itself never blocks (``O_NONBLOCK``: a FIFO with no writer would block a plain
    open forever) and the type is checked on the opened descriptor, so a file swapped after a
    ``stat`` cannot slip through. Raises SourceError for a FIFO, device, socket or directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror}); check the path and its permissions") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SourceError(f"{path}: is a {_kind(mode)}, not a regular file; LensLab reads checkpoints only "
                              "from regular files: copy the data into a file and point the source at it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: Path) -> None:
    """SourceError unless ``path`` is a regular file (for readers that need a file name)."""
    open_regular(path, buffering=0).close()


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (an index or config, not weights)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CorruptCheckpointError(f"{path}: {size} bytes is far more than a {what} holds (limit {limit}); "
                                         f"the file is not a {what}: re-download the checkpoint")
        return f.read(limit + 1)


def _numel(path: Path, name: str, shape: Any) -> int:
    """Element count of a header shape, in time linear in its length, with int64 overflow checks."""
    if not isinstance(shape, list):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has shape {short(shape)}, not a list of sizes; "
                                     "the file is corrupt: re-export it")
    if len(shape) > MAX_DIMS:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} declares {len(shape)} dimensions (at most {MAX_DIMS} "
                                     "are accepted); the header is corrupt or hostile: re-export the checkpoint")
    numel, extent = 1, 1
    for d in shape:
        if type(d) is not int or not 0 <= d < _INT64_LIMIT:  # JSON true/false are not sizes
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has a dimension {short(d)} in shape {short(shape)}; "
                                         "each must be an integer in [0, 2**63): the file is corrupt, re-export it")
        numel *= d
        extent *= max(d, 1)  # torch's strides multiply the sizes with 0 counted as 1
        if extent >= _INT64_LIMIT:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} shape {short(shape)} has sizes whose product "
                                         "overflows 64 bits (torch cannot index it); the file is corrupt: re-export it")
    return numel


def _check_entry(path: Path, name: str, meta: Any, data_len: int) -> tuple[int, int]:
    """(start, end) of one validated header entry, relative to the data section."""
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has a malformed header entry {short(meta)} (needs "
                                     "dtype, shape and data_offsets); the file is corrupt: re-export it")
    dtype, offsets = meta["dtype"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown dtype {short(dtype)} (known: "
                                     f"{', '.join(DTYPE_BYTES)}); the file is corrupt or from a newer format")
    want = _numel(path, name, meta["shape"]) * DTYPE_BYTES[dtype]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has data_offsets {short(offsets)}, not two integers; "
                                     "the file is corrupt: re-export it")
    start, end = offsets
    if not 0 <= start <= end or end - start != want:
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} declares offsets {short(start)}..{short(end)} but {dtype}{short(meta['shape'])} "
            f"needs {want} bytes; the file is corrupt: re-export it")
    if end > data_len:
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} ends at byte {end} but the file holds {data_len} data bytes; "
            "the file is truncated: re-download or re-export it")
    return start, end


def _check_no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """CorruptCheckpointError when two tensors' non-empty byte ranges share a byte."""
    prev_end, prev_name = 0, ""
    for start, end, name in sorted(s for s in spans if s[1] > s[0]):
        if start < prev_end:
            raise CorruptCheckpointError(
                f"{path}: tensors {prev_name!r} and {name!r} overlap (the second starts at byte {start}, before the "
                f"first ends at {prev_end}); writing one would change the other: the file is corrupt or crafted, "
                "re-export it")
        prev_end, prev_name = end, name


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(validated header, byte offset of the data section) of a safetensors file."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes is too short for a safetensors file (needs an 8-byte header length); "
                "the file is truncated: re-export or re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > HEADER_LIMIT or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path}: safetensors header declares {n} bytes but the file has {size - 8} after the length; "
                "the file is truncated or not safetensors: re-export or re-download it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5000-digit number, deep nesting
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid UTF-8 JSON ({short(str(exc))}); "
                                     "the file is corrupt: re-export or re-download it") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    data_len = size - 8 - n
    spans = [(*_check_entry(path, name, meta, data_len), name) for name, meta in header.items()
             if name != "__metadata__"]
    _check_no_overlap(path, spans)
    return header, 8 + n


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    path: Path
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


def read_entry(e: Entry, name: str) -> torch.Tensor:
    """Read one tensor's bytes into a new buffer of exactly its size (bounded ``readinto``)."""
    nbytes = e.end - e.start
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
    got = 0
    with open_regular(e.path, buffering=0) as f:
        try:
            f.seek(e.start)
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        except OSError as exc:
            raise SourceError(f"{e.path}: cannot read tensor {name!r} ({exc.strerror}); check the file") from exc
    if got != nbytes:
        raise CorruptCheckpointError(f"{e.path}: tensor {name!r} needs {nbytes} bytes from offset {e.start} but the "
                                     f"file ended after {got}; it was truncated after opening: re-download it")
    return buf.view(TORCH_DTYPES[e.dtype]).reshape(e.shape)
