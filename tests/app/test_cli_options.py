"""The CLI's shared progress display when stderr is not a terminal: one line per run and per stage."""

from __future__ import annotations

from app.cli import options


def test_progress_off_a_terminal_prints_one_line_per_stage(capsys):
    assert not options.console.is_terminal  # pytest captures stderr

    def work(*, progress):
        for stage in ("harvest", "train"):
            for i in range(50):
                progress(i + 1, 50, f"{stage}: batch {i + 1}")
        progress(1, 1, "done")
        return 7

    assert options.run_with_progress("sae of minilm", work) == 7
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["sae of minilm …", "  harvest …", "  train …"]


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
