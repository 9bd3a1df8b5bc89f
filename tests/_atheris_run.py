"""Run one atheris target of ``tests/atheris_loaders.py`` for a bounded time (used by the fuzz tests)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("atheris_loaders.py")


def run_atheris(target: str, work: Path, seconds: int = 5) -> int:
    """Fuzz ``target`` for ``seconds`` from its seed inputs; returns the number of inputs tried.

    Fails the test (with libFuzzer's report) on an exception other than a LensLabError, an input
    taking > 10 s, resident memory > 2 GiB, or a temp file left behind. Skips when atheris is
    not installed."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (it is the optional extra `fuzz`: pip install -e '.[fuzz]'; "
                    "`make test` installs it where it builds cleanly)")
    corpus = work / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    scratch = work / "tmp"  # the harness's temp dir goes here: it must be removed when fuzzing ends
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "LENSLAB_FUZZ_TARGET": target, "TMPDIR": str(scratch)}
    out = subprocess.run([sys.executable, str(HARNESS), str(corpus), f"-max_total_time={seconds}", "-timeout=10",
                          "-rss_limit_mb=2048", f"-artifact_prefix={work}/"], capture_output=True, text=True,
                         env=env, timeout=seconds + 120)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    done = re.search(r"Done (\d+) runs", log)
    assert done, log[-2000:]
    assert not any(scratch.iterdir()), f"the harness left {list(scratch.iterdir())} behind"
    return int(done.group(1))
