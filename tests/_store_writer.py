"""A store writer for fault tests, run as a separate process:

    python tests/_store_writer.py ROOT START N SIZE [--shared K] [--fault PHASE] [--check-reads]

Writes entries START..START+N-1 (content fixed by the index, see ``expected``), then the K
shared entries 10**6..10**6+K-1 that every writer writes with the same content. Prints
``ready`` after its first committed entry. ``--check-reads``: after each put, read back a
few entries (its own and any other visible one) and exit 3 if one is not whole.
``--fault PHASE`` kills this process with SIGKILL at one point of its second ``put``:

- ``tmp-written``: a blob's temp file is written and fsynced, not yet renamed into blobs/;
- ``blob-renamed``: a blob is in blobs/, the index row not yet written;
- ``before-commit``: the index row is inserted inside the open transaction, not committed;
- ``after-commit``: right after COMMIT returns.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pandas as pd

FP = "0123456789abcdef0123456789abcdef"
SHARED_BASE = 10**6
PHASES = ("tmp-written", "blob-renamed", "before-commit", "after-commit")


def expected(i: int, size: int):
    """The Result entry ``i`` holds: its whole content is determined by ``i`` and ``size``."""
    from analysis.store import Result

    rng = np.random.default_rng(i)
    table = pd.DataFrame({"name": [f"t{i}.{j}" for j in range(5)], "value": rng.standard_normal(5)})
    return Result(table=table, arrays={"sv": rng.standard_normal(size), "idx": np.arange(i, i + 3)},
                  meta={"i": i, "note": "ünïcode"})


def is_whole(result, i: int, size: int) -> bool:
    """Whether a read result equals entry ``i`` exactly."""
    want = expected(i, size)
    return (result is not None and result.table.equals(want.table) and dict(result.meta) == dict(want.meta)
            and sorted(result.arrays) == sorted(want.arrays)
            and all(np.array_equal(result.arrays[k], v) for k, v in want.arrays.items()))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillingConnection:
    """Proxy of a sqlite3 connection that dies around COMMIT."""

    def __init__(self, con, phase: str) -> None:
        self._con, self._phase = con, phase

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and self._phase == "before-commit":
            _die()
        out = self._con.execute(sql, *args)
        if sql == "COMMIT" and self._phase == "after-commit":
            _die()
        return out

    def __getattr__(self, name: str):
        return getattr(self._con, name)


def _arm(phase: str) -> None:
    """Install the fault for ``phase`` (fires during the next put)."""
    from analysis import store as store_mod

    if phase == "tmp-written":
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith((".parquet", ".safetensors")):
                _die()
            return real_replace(src, dst)

        store_mod.os.replace = replace
    elif phase == "blob-renamed":
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            if str(dst).endswith(".safetensors"):
                _die()

        store_mod.os.replace = replace
    elif phase in ("before-commit", "after-commit"):
        real_connect = store_mod.Store._connect
        store_mod.Store._connect = lambda self: _KillingConnection(real_connect(self), phase)
    else:
        raise SystemExit(f"unknown phase {phase!r}; choose one of {PHASES}")


def main(argv: list[str]) -> int:
    from analysis.store import Store

    root, start, n, size = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    opts = argv[4:]
    shared = int(opts[opts.index("--shared") + 1]) if "--shared" in opts else 0
    fault = opts[opts.index("--fault") + 1] if "--fault" in opts else None
    check = "--check-reads" in opts
    store = Store(root)
    indices = list(range(start, start + n)) + list(range(SHARED_BASE, SHARED_BASE + shared))
    rng = np.random.default_rng(start)
    for k, i in enumerate(indices):
        if fault is not None and k == 1:
            _arm(fault)
        store.put(FP, "entry", {"i": i}, "v1", expected(i, size))
        if k == 0:
            print("ready", flush=True)
        if check:
            for e in [store.list()[int(rng.integers(0, k + 1))]] if k else []:
                j = e.params["i"]
                if not is_whole(store.get_by_key(e.key), j, size):
                    print(f"partial entry {j}", flush=True)
                    return 3
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
