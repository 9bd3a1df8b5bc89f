"""Coverage-guided fuzzing of LensLab's loaders with atheris (libFuzzer), run as a separate process:

    LENSLAB_FUZZ_TARGET=checkpoint|index|contrasts python tests/atheris_loaders.py [CORPUS_DIR] \
        -max_total_time=30 -rss_limit_mb=2048 -timeout=10

(an empty CORPUS_DIR is first filled with valid seed inputs).

Each input is written to a file and opened the way a user's file would be: a safetensors file
(``checkpoint``), a shard index next to a valid shard (``index``), or a JSONL contrast set
(``contrasts``). Any exception other than a ``LensLabError`` is a finding: libFuzzer stops, prints
the traceback and saves the input (``-artifact_prefix``); so do a hang (``-timeout`` seconds per
input) and memory growth past ``-rss_limit_mb``. ``tests/analysis/test_fuzz_checkpoints.py`` and
``tests/analysis/steering/test_fuzz_contrasts.py`` run each target for a few seconds. The temp directory the inputs
are written to is removed when fuzzing ends.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atheris  # noqa: E402
import torch  # noqa: E402,F401  (imported before instrumentation: only LensLab's modules are instrumented)

with atheris.instrument_imports(include=["analysis"]):
    from analysis import sources
    from analysis.steering import contrasts
    from analysis.errors import LensLabError

TARGETS = ("checkpoint", "index", "contrasts")
WORK = Path(tempfile.mkdtemp(prefix="lenslab-atheris-"))  # the files each input is written to; removed at the end


def _valid_shard() -> bytes:
    from safetensors.torch import save

    return save({"a.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
                 "b.bias": torch.arange(5, dtype=torch.float16)})


def make_target(name: str):
    """The one-input test function of ``name``."""
    if name == "checkpoint":
        path = WORK / "fuzz.safetensors"

        def run(data: bytes) -> None:
            path.write_bytes(data)
            for _, t in sources.open_source(path).iter_tensors():
                t.sum()
    elif name == "index":
        d = WORK / "ckpt"
        d.mkdir(exist_ok=True)
        (d / "model-00001-of-00001.safetensors").write_bytes(_valid_shard())
        index = d / sources.SAFETENSORS_INDEX

        def run(data: bytes) -> None:
            index.write_bytes(data)
            for _, t in sources.open_source(d).iter_tensors():
                t.sum()
    elif name == "contrasts":
        path = WORK / "fuzz.jsonl"

        def run(data: bytes) -> None:
            path.write_bytes(data)
            contrasts.load_contrasts(path)
    else:
        raise SystemExit(f"LENSLAB_FUZZ_TARGET must be one of {', '.join(TARGETS)}, got {name!r}")

    def one_input(data: bytes) -> None:
        try:
            run(data)
        except LensLabError:
            pass

    return one_input


def seeds(name: str) -> list[bytes]:
    """A few valid inputs to start from (the test writes them to the corpus directory)."""
    if name == "checkpoint":
        return [_valid_shard()]
    if name == "index":
        return [b'{"weight_map": {"a.weight": "model-00001-of-00001.safetensors", '
                b'"b.bias": "model-00001-of-00001.safetensors"}}']
    return [p.read_bytes() for p in sorted(contrasts.CONTRAST_DIR.glob("*.jsonl"))]


if __name__ == "__main__":
    target = os.environ.get("LENSLAB_FUZZ_TARGET", "checkpoint")
    one_input = make_target(target)
    for arg in sys.argv[1:]:  # an empty corpus directory starts from the seeds
        if not arg.startswith("-") and Path(arg).is_dir() and not any(Path(arg).iterdir()):
            for i, data in enumerate(seeds(target)):
                (Path(arg) / f"seed{i}").write_bytes(data)
    # libFuzzer ends the process with C exit(), which skips Python's cleanup: fuzz in a forked child
    # and remove WORK here when it is done, whatever its outcome.
    child = os.fork()
    if child == 0:
        atheris.Setup(sys.argv, one_input)
        atheris.Fuzz()
    try:
        _, status = os.waitpid(child, 0)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    sys.exit(os.waitstatus_to_exitcode(status))
