"""Run fuzz tests in a child process under an address-space limit:

    python tests/_bounded_pytest.py LIMIT_MIB REPORT_JSON PYTEST_ARGS...

torch, the loaders and pytest are imported first; then ``RLIMIT_AS`` is set to the current
address space + LIMIT_MIB (``_bounded_loader.limit_address_space``) and ``pytest.main`` runs the
given tests with ``LENSLAB_FUZZ_CHILD=1``, which un-skips the tests marked ``bounded_batch``. A
loader that allocated from a declared (not actual) size would hit MemoryError, an untyped
exception: the hypothesis test fails with that input. Writes {"exit": pytest's exit code,
"rss_growth": peak resident growth in bytes} to REPORT_JSON.

``run_bounded`` is the parent's side (used by the fuzz test modules).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD_ENV = "LENSLAB_FUZZ_CHILD"



def bounded_batch(test):
    """Mark a hypothesis test to run only in the bounded child that ``run_bounded`` starts (the
    module's ``test_hypothesis_batch_is_bounded``); in the test process itself it is skipped."""
    skip = pytest.mark.skipif(os.environ.get(CHILD_ENV) != "1", reason="runs in a child process under an "
                              "address-space limit (test_hypothesis_batch_is_bounded in this module)")
    return pytest.mark.bounded_batch(skip(test))


def run_bounded(test_file: str, tmp_path: Path, *, limit_mib: int = 1024, timeout: float = 600) -> dict:
    """Run the ``bounded_batch`` tests of ``test_file`` in a child under ``limit_mib`` of extra
    address space; assert they all passed and resident growth stayed below the limit; returns
    the child's report."""
    report = tmp_path / "bounded-report.json"
    args = [test_file, "-q", "-x", "-m", "bounded_batch", "-p", "no:cacheprovider", "--basetemp",
            str(tmp_path / "child-tmp")]
    out = subprocess.run([sys.executable, str(Path(__file__)), str(limit_mib), str(report), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    result = json.loads(report.read_text())
    assert result["exit"] == 0 and result["rss_growth"] < limit_mib * 2**20, result
    return result


def main(argv: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(here), here]
    limit_mib, report = int(argv[0]), argv[1]
    os.environ[CHILD_ENV] = "1"
    import torch  # noqa: F401 - the large imports the tests make, before the limit

    from _bounded_loader import _status, limit_address_space
    from analysis import sources  # noqa: F401
    from analysis.steering import contrasts

    limit_address_space(limit_mib)
    base = _status("VmHWM")
    code = int(pytest.main(argv[2:]))
    Path(report).write_text(json.dumps({"exit": code, "rss_growth": _status("VmHWM") - base}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
