"""The CLI's shared progress display when stderr is not a terminal: plain lines with counts and rates."""

from __future__ import annotations

import pytest

from app.cli import options


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_prints_one_line_per_stage_with_counts_and_rate(capsys, monkeypatch):
    assert not options.console.is_terminal  # pytest captures stderr
    clock = _Clock()
    monkeypatch.setattr(options.time, "monotonic", clock)

    def work(*, progress):
        for i in range(50):  # 50 batches of 800 tokens, 0.1 s each
            clock.now += 0.1
            progress((i + 1) * 800, 40_000, f"harvest: blocks.3.attn.hook_z ({i + 1} texts)")
        for i in range(10):
            clock.now += 0.5
            progress(i + 1, 10, f"train: step {i + 1}/10 L0 3.0")
        return 7

    assert options.run_with_progress("SAE on minilm layer 3", work) == 7
    lines = capsys.readouterr().err.splitlines()
    # a stage is timed from its first to its last report: 800 tokens per 0.1 s, 1 step per 0.5 s
    assert lines == ["SAE on minilm layer 3 …",
                     "  harvest: 40,000/40,000 tokens, 8,000 tokens/s, 4.9 s",
                     "  train: 10/10 steps, 2.0 steps/s, 4.5 s",
                     "  done in 10.0 s"]


def test_progress_off_a_terminal_beats_during_a_long_stage(capsys, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(options.time, "monotonic", clock)

    def work(*, progress):
        for i in range(100):  # 100 steps of 1 s: a line every HEARTBEAT_S seconds, then the stage's line
            clock.now += 1.0
            progress(i + 1, 100, f"train: step {i + 1}/100")

    options.run_with_progress("SAE", work)
    lines = capsys.readouterr().err.splitlines()
    beats = [ln for ln in lines if "so far" in ln]
    assert len(beats) == int(100 // options.HEARTBEAT_S)
    assert beats[0] == "  train: 30/100 steps, 1.0 steps/s, 29.0 s so far (train: step 30/100)"
    assert lines[-2] == "  train: 100/100 steps, 1.0 steps/s, 99.0 s"


def test_progress_off_a_terminal_without_stages_counts_the_whole_run(capsys, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(options.time, "monotonic", clock)

    def work(*, progress):
        for i in range(4):
            clock.now += 0.25
            progress(i + 1, 4, f"encoder.layer.{i}.attention.self.query.weight")

    options.run_with_progress("conditioning of minilm", work)
    assert capsys.readouterr().err.splitlines() == ["conditioning of minilm …", "  done: 4/4, 4.0/s, 1.0 s"]


def test_progress_off_a_terminal_beats_while_nothing_is_reported(capsys, monkeypatch):
    """A phase that calls no progress (a model booting) still gets a line every HEARTBEAT_S seconds."""
    import threading

    clock = _Clock()
    monkeypatch.setattr(options.time, "monotonic", clock)
    monkeypatch.setattr(options, "BEAT_EVERY_S", 0.001)
    printed = threading.Event()

    def work(*, progress):
        progress(0, 2, "booting minilm")
        clock.now = 95.0  # 95 s without a report: the timer thread prints a line
        assert printed.wait(timeout=60)
        clock.now = 100.0
        progress(2, 2, "running the prompt")

    real_print = options.console.print

    def spy(*args, **kwargs):
        real_print(*args, **kwargs)
        if "working" in str(args[0]):
            printed.set()

    monkeypatch.setattr(options.console, "print", spy)
    options.run_with_progress("prompt through SAE abc", work)
    lines = capsys.readouterr().err.splitlines()
    assert lines[1] == "  working, 95 s in, 95 s since the last report (last report: booting minilm)"
    assert lines[-1] == "  done: 2/2, 0.02/s, 100.0 s" and len(lines) == 3


@pytest.mark.parametrize("words", [40, 200])
def test_console_never_wraps_off_a_terminal(capsys, words):
    name = ".".join(f"block{i}" for i in range(words)) + ".weight"  # one unbreakable name, longer than 80
    options.console.print(f"failed: {name}", highlight=False)
    assert capsys.readouterr().err == f"failed: {name}\n"


def test_json_safe_maps_non_finite_floats():
    import numpy as np

    assert [options.json_safe(v) for v in (float("nan"), float("inf"), -float("inf"), np.float32(1.5), 2)] == \
        [None, "inf", "-inf", 1.5, 2]


def test_json_rows_is_json_safe_per_cell():
    import json

    import pandas as pd

    table = pd.DataFrame({"name": ["a", "b"], "kappa": [float("inf"), 2.0], "alpha": [float("nan"), 1.5]})
    rows = options.json_rows(table)
    assert rows == [{"name": "a", "kappa": "inf", "alpha": None}, {"name": "b", "kappa": 2.0, "alpha": 1.5}]
    assert json.loads(json.dumps(rows)) == rows
