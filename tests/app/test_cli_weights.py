"""``lenslab analyze | select | experiment kappatune`` (app/cli/weights.py): the --device option, and the
commands reaching the weights pipeline through app.api."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from analysis.device import resolve_device
from analysis.store import Store
from app.cli import app


@pytest.fixture
def model_file(tmp_path, rng) -> tuple[Path, dict[str, np.ndarray]]:
    weights = {"blocks.0.mlp.weight": rng.standard_normal((24, 12)),
               "blocks.1.mlp.weight": rng.standard_normal((12, 24)) * np.linspace(1, 1e-3, 24)}
    path = tmp_path / "model.safetensors"
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, str(path))
    return path, weights


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``lenslab ARGS`` in this process, as the console script runs it (exit codes of app/cli/exit_codes.py)."""
    from app import cli

    monkeypatch.setattr(sys, "argv", ["lenslab", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("command", [("analyze",), ("select",), ("experiment", "kappatune")], ids=str)
def test_weights_commands_take_device(command):
    out = _invoke(*command, "--help")
    assert out.exit_code == 0 and "--device" in out.stdout


def test_analyze_on_cpu_matches_numpy_and_auto_is_served_from_the_store(tmp_path, model_file):
    path, weights = model_file
    store = str(tmp_path / "s")
    cpu = _invoke("analyze", str(path), "--json", "--device", "cpu", "--store", store)
    assert cpu.exit_code == 0, cpu.output
    rows = {r["tensor"]: r for r in json.loads(cpu.stdout)}
    for name, w in weights.items():
        assert rows[name]["kappa"] == pytest.approx(np.linalg.cond(w.astype(np.float32).astype(np.float64)),
                                                     rel=1e-7)
    auto = _invoke("analyze", str(path), "--json", "--device", "auto", "--store", store)
    assert auto.exit_code == 0 and json.loads(auto.stdout) == json.loads(cpu.stdout)
    assert len(Store(store).list(analysis="spectra")) == 1


@pytest.mark.parametrize("args, fragment", [
    (("analyze", "{path}", "--device", "tpu"), "unknown device 'tpu'"),
    (("analyze", "{path}", "{path}", "--device", "cuda"), "batch workers compute on their CPUs"),
    (("select", "{path}", "--device", "tpu"), "unknown device 'tpu'"),
    (("experiment", "kappatune", "--device", "tpu"), "unknown device 'tpu'"),
], ids=["analyze", "analyze-batch", "select", "experiment"])
def test_a_bad_device_is_one_line_exit_2_and_stores_nothing(tmp_path, model_file, monkeypatch, capsys, args,
                                                            fragment):
    store = tmp_path / "s"
    code, _, err = _main(monkeypatch, capsys, *[a.format(path=model_file[0]) for a in args], "--store", str(store))
    assert code == 2 and err.startswith("error: ") and fragment in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not store.exists()  # refused before the store was opened


@pytest.mark.skipif(resolve_device("auto").type != "cpu", reason="needs a machine where auto is the CPU")
def test_select_with_device_auto_exports_the_lowest_kappa_tensor(tmp_path, model_file):
    path, weights = model_file
    out = _invoke("select", str(path), "--budget", "1", "--device", "auto", "--store", str(tmp_path / "s"))
    assert out.exit_code == 0, out.output
    kappa = {n: np.linalg.cond(w.astype(np.float32).astype(np.float64)) for n, w in weights.items()}
    assert out.stdout.splitlines()[-1] == min(kappa, key=kappa.get)
