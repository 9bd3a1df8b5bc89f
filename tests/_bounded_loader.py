"""Open files with a LensLab loader under an address-space limit, as a separate process:

    python tests/_bounded_loader.py checkpoint|contrasts LIMIT_MIB FILE...

The loader's imports and one warm-up call run first; then ``RLIMIT_AS`` is set to the
current address space + LIMIT_MIB, so an allocation sized by a declared (not actual) size
fails with MemoryError instead of succeeding. Prints one JSON object: per file the outcome
(``ok``, ``typed:<LensLabError subclass>``, or ``untyped:<exception>: message``) and the peak
resident growth in bytes over the run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def limit_address_space(extra_mib: int) -> None:
    """Cap this process's address space (``RLIMIT_AS``) at its current size + ``extra_mib``: from
    now on an allocation past that fails with MemoryError instead of succeeding."""
    vm = _status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_mib * 2**20, resource.RLIM_INFINITY))


def main(argv: list[str]) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kind, limit_mib, files = argv[0], int(argv[1]), argv[2:]
    from analysis.errors import LensLabError

    if kind == "checkpoint":
        from analysis.sources import open_source

        def load(path: str) -> None:
            for _, t in open_source(path).iter_tensors():
                t.sum()
    else:
        from analysis.steering.contrasts import load_contrasts

        def load(path: str) -> None:
            load_contrasts(path)
    for warm in files[:1]:  # imports made lazily by a first call happen before the limit
        try:
            load(warm)
        except Exception:
            pass
    limit_address_space(limit_mib)
    base = _status("VmHWM")
    out = {}
    for path in files:
        t0 = time.perf_counter()
        try:
            load(path)
            outcome = "ok"
        except LensLabError as exc:
            outcome = f"typed:{type(exc).__name__}"
        except BaseException as exc:  # noqa: BLE001 - the point is to report anything else
            outcome = f"untyped:{type(exc).__name__}: {str(exc)[:200]}"
        out[os.path.basename(path)] = {"outcome": outcome, "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps({"files": out, "rss_growth": _status("VmHWM") - base}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
