"""How much memory a heavy call may allocate: ``memory_limit()``.

The limit is, in order:

1. ``$LENSLAB_MEMORY_LIMIT`` when set: a byte count with an optional unit (``12G``, ``512MiB``,
   ``1.5GB``, ``800000000``), taken as is (no safety fraction: the user said how much to use);
2. otherwise ``SAFETY_FRACTION`` x the memory available now: psutil's ``available`` when psutil
   is installed, else ``MemAvailable`` of ``/proc/meminfo``, lowered to the headroom of the
   process's cgroup (its limit minus its usage, the reclaimable inactive file cache counted as
   free) when a cgroup limit is set, since a container's OOM killer fires there and
   ``MemAvailable`` shows the host's memory;
3. None (no check) when none of these can be read (a platform without ``/proc``).

Callers compare their own estimate to it before allocating (``sae.memory``), so an oversized
setting ends in a ``ConfigError`` naming the estimate and the limit, not in the allocator.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import ConfigError

ENV_VAR = "LENSLAB_MEMORY_LIMIT"
SAFETY_FRACTION = 0.8  # of the available memory: leave room for the OS, the model and the allocator's slack
GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


@dataclass(frozen=True)
class MemoryLimit:
    """A byte budget and how it was found (for error messages)."""

    bytes: int
    source: str  # e.g. "80% of the 22.8 GiB available now, MemAvailable; ..." or "LENSLAB_MEMORY_LIMIT=8G"

    def describe(self) -> str:
        return f"{gib(self.bytes)} ({self.source})"


def gib(n: float) -> str:
    """``n`` bytes as GiB with 1 decimal (3 significant digits below 1 GiB): "14.0 GiB", "0.0123 GiB"."""
    g = n / GiB
    return f"{g:,.1f} GiB" if g >= 1 else f"{g:.3g} GiB"


def parse_size(text: str) -> int:
    """Bytes in ``text`` ("12G", "512MiB", "1.5GB", "800000000"); ConfigError when unreadable or <= 0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ConfigError(f"{ENV_VAR}={text!r} is not a memory size > 0; write e.g. 8G, 512MiB or 2000000000 "
                          "(bytes), or unset it to use the available memory")
    return int(float(m.group(1)) * _UNITS[unit])


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_field(path: Path, *names: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in names:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(v2: Path = _CGROUP_V2, v1: Path = _CGROUP_V1) -> int | None:
    """Bytes this process's cgroup may still take (limit - usage + inactive file cache), or None
    when no cgroup memory limit is set or readable."""
    for limit_file, usage_file, stat_names, root in (
            ("memory.max", "memory.current", ("inactive_file",), v2),
            ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"), v1)):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # "max" / the v1 "unlimited" sentinel
            continue
        return max(0, limit - usage + _stat_field(root / "memory.stat", *stat_names))
    return None


def available_memory() -> tuple[int, str] | None:
    """(bytes available now, where the number came from), or None when unknown."""
    try:
        import psutil

        avail, how = int(psutil.virtual_memory().available), "psutil"
    except (ImportError, OSError, AttributeError):
        got = _meminfo_available()
        if got is None:
            return None
        avail, how = got, "MemAvailable"
    head = cgroup_headroom()
    if head is not None and head < avail:
        return head, "cgroup limit - usage"
    return avail, how


def memory_limit() -> MemoryLimit | None:
    """The budget a heavy call may allocate (see the module docstring); None when unknown."""
    if (text := os.environ.get(ENV_VAR, "").strip()):
        return MemoryLimit(parse_size(text), f"{ENV_VAR}={text}")
    got = available_memory()
    if got is None:
        return None
    avail, how = got
    return MemoryLimit(int(avail * SAFETY_FRACTION),
                       f"{SAFETY_FRACTION:.0%} of the {gib(avail)} available now, {how}; set {ENV_VAR} to override")


def require_fits(need_bytes: float, refusal: Callable[[MemoryLimit], str]) -> None:
    """ConfigError(``refusal(limit)``) when ``need_bytes`` exceeds ``memory_limit()``; nothing when
    it fits or the limit is unknown. Every heavy call checks its estimate through this."""
    limit = memory_limit()
    if limit is not None and need_bytes > limit.bytes:
        raise ConfigError(refusal(limit))
