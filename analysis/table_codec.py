"""Result tables to and from Parquet bytes, without starting Arrow's thread pools.

``pandas.read_parquet`` decodes on Arrow's global CPU pool and pre-buffers reads on its IO
pool. Those pools' workers are C++ ``std::thread`` objects torn down by static destructors at
interpreter exit; a worker still joinable then aborts the process after its work is done
(SIGABRT, "terminate called without an active exception"; apache/arrow#34314). A store writer
printed ``done`` and then died that way under CPU load, and every ``lenslab`` command reads the
store. Tables here are small (one row per tensor), so decoding single-threaded without
pre-buffering costs nothing measurable and never creates a pool: after ``to_parquet`` and
``from_parquet`` the process has exactly the threads it had before (tested).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def to_parquet(table: pd.DataFrame) -> bytes:
    """Parquet bytes of ``table`` (its index is not stored), encoded on the calling thread."""
    arrow = pa.Table.from_pandas(table, preserve_index=False, nthreads=1)
    sink = pa.BufferOutputStream()
    pq.write_table(arrow, sink)
    return sink.getvalue().to_pybytes()


def from_parquet(data: bytes) -> pd.DataFrame:
    """The DataFrame held by Parquet ``data``, decoded on the calling thread (same dtypes as
    ``pandas.read_parquet``)."""
    arrow = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=False)
    return arrow.to_pandas(use_threads=False)
