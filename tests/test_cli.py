"""The `lenslab` console script, run as a user runs it (a subprocess of the installed entry point)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import run_cli as run
from safetensors.torch import save_file

@pytest.fixture
def model_file(tmp_path, rng) -> tuple[Path, dict[str, np.ndarray]]:
    weights = {
        "blocks.0.mlp.weight": rng.standard_normal((24, 12)),
        "blocks.1.mlp.weight": rng.standard_normal((12, 24)) * np.linspace(1, 1e-3, 24),
        "blocks.1.mlp.bias": rng.standard_normal(12),
        "zero.weight": np.zeros((6, 6)),
        "broken.weight": np.where(np.eye(5) > 0, np.nan, 1.0),
    }
    path = tmp_path / "model.safetensors"
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, str(path))
    return path, weights


def test_analyze_json_rows_match_numpy(tmp_path, model_file):
    path, weights = model_file
    out = run("analyze", str(path), "--analysis", "conditioning", "--json", store=tmp_path / "s")
    rows = {r["tensor"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"blocks.0.mlp.weight", "blocks.1.mlp.weight", "zero.weight", "broken.weight"}
    for r in rows.values():
        assert {"tensor", "shape", "sigma_max", "sigma_min", "kappa", "stable_rank", "alpha"} <= set(r)
    for name in ("blocks.0.mlp.weight", "blocks.1.mlp.weight"):
        w = weights[name].astype(np.float32).astype(np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        assert math.isclose(rows[name]["kappa"], np.linalg.cond(w), rel_tol=1e-7)
        assert math.isclose(rows[name]["sigma_max"], s[0], rel_tol=1e-9)
        assert math.isclose(rows[name]["stable_rank"], (s**2).sum() / s[0] ** 2, rel_tol=1e-9)
        assert rows[name]["shape"] == "x".join(map(str, w.shape))
    assert rows["zero.weight"]["kappa"] == "inf"  # JSON has no infinity: spelled out
    assert rows["broken.weight"]["status"].startswith("nonfinite: 5 NaN")
    assert rows["broken.weight"]["kappa"] is None


def test_analyze_spectra_table_store_ls_and_rm(tmp_path, model_file):
    path, _ = model_file
    store = tmp_path / "s"
    out = run("analyze", str(path), "--analysis", "spectra", store=store)
    assert "blocks.0.mlp.weight" in out.stdout and "1 1-D tensors skipped" in out.stdout
    listing = json.loads(run("store", "ls", "--json", store=store).stdout)
    assert [e["analysis"] for e in listing] == ["spectra"]
    assert listing[0]["model"] == str(path.resolve())
    run("store", "rm", listing[0]["key"][:8], store=store)
    assert json.loads(run("store", "ls", "--json", store=store).stdout) == []


@pytest.mark.parametrize("args, message", [
    (("analyze", "no-such-model"), "neither a bundled model name"),
    (("analyze", "minilm", "--analysis", "bogus"), "unknown analysis 'bogus'"),
    (("store", "rm", "ab"), "too short"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    out = run(*args, store=tmp_path / "s", check=False)
    assert out.returncode == 2
    assert message in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr


def test_unwritable_store_is_reported(tmp_path, model_file):
    path, _ = model_file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = run("analyze", str(path), store=blocker / "store", check=False)
    assert out.returncode == 2 and "not writable" in out.stderr
