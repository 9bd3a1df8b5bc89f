"""Parquet codec of the store: same frames as pandas, and no native thread pool left at exit."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.table_codec import from_parquet, to_parquet

ROOT = Path(__file__).resolve().parents[2]

FRAMES = {
    "mixed": pd.DataFrame({"name": ["a.weight", "b.bias", "ünï"], "v": [1.5, np.nan, -np.inf],
                           "n": np.array([1, 2, 3], dtype=np.int64), "ok": [True, False, True]}),
    "empty": pd.DataFrame({"name": pd.Series([], dtype=object), "v": pd.Series([], dtype=float)}),
    "float32": pd.DataFrame({"x": np.arange(5, dtype=np.float32)}),
    "none_strings": pd.DataFrame({"s": ["x", None, "z"], "k": [0.0, 1.0, 2.0]}),
    "lists": pd.DataFrame({"shape": [[2, 3], [4], []]}),
}


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_round_trip_equals_pandas_reading_the_same_bytes(name):
    frame = FRAMES[name]
    data = to_parquet(frame)
    got = from_parquet(data)
    pd.testing.assert_frame_equal(got, pd.read_parquet(io.BytesIO(data)))  # what the store served before
    reference = io.BytesIO()
    frame.to_parquet(reference, index=False)
    pd.testing.assert_frame_equal(got, pd.read_parquet(reference))


def test_index_is_not_stored():
    frame = pd.DataFrame({"v": [1.0, 2.0]}, index=[10, 20])
    assert list(from_parquet(to_parquet(frame)).index) == [0, 1]


_CHILD = """
import json, os, sys
import numpy as np, pandas as pd
from analysis.store import Result, Store

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

before = threads()
store = Store(sys.argv[1])
for i in range(5):
    table = pd.DataFrame({"name": [f"t{j}" for j in range(50)], "value": np.random.default_rng(i).random(50)})
    info = store.put("0" * 32, "x", {"i": i}, "v1", Result(table=table, arrays={"a": np.arange(4.0)}))
    assert store.get_by_key(info.key).table.equals(table)
print(json.dumps({"before": before, "after": threads()}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list threads")
def test_store_round_trips_start_no_native_thread_pool(tmp_path):
    """A process that wrote and read the store must be able to exit cleanly: Arrow's CPU and IO pools
    (std::thread workers, torn down by static destructors) aborted a writer at exit with SIGABRT.
    The store must not start them: the threads after 5 puts and gets are the threads before."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "store")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["after"] == seen["before"]
