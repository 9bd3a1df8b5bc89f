"""Commands run with stdout and stderr piped and COLUMNS unset, as in a CI log or `| tee`: no tensor name
split over lines (rich would fold at 80 columns), and progress as plain lines with counts and rates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _support import run_cli
from _tiny_llama import make_tiny_llama

LONG = "model.layers.{i}.block_sparse_moe.shared_expert_projection.with_a_very_long_module_name_past_80_columns.weight"
NO_COLUMNS = {"COLUMNS": ""}  # rich then takes 80 columns for a pipe: the width the issue saw


@pytest.fixture
def piped(capsys, monkeypatch):
    """Run `lenslab ARGS` in this process with stdout and stderr captured (not terminals), COLUMNS unset;
    returns (exit code, stdout, stderr)."""
    from app.cli import app
    from app.cli.exit_codes import run

    monkeypatch.delenv("COLUMNS", raising=False)

    def call(*args: str, store: Path, expect: int = 0):
        code = run(app, [*args, "--store", str(store)])
        out = capsys.readouterr()
        assert code == expect, out.err
        return out

    return call


def stage_lines(err: str) -> list[str]:
    """stderr without the heartbeat lines, which a stage slower than HEARTBEAT_S (a loaded machine) adds."""
    beat = re.compile(r"  (working, [\d,]+ s in, .*|.* so far \(.*\))")
    return [ln for ln in err.splitlines() if not beat.fullmatch(ln)]


@pytest.fixture(scope="module")
def long_names(tmp_path_factory) -> tuple[Path, list[str]]:
    """3 matrices whose names are longer than 80 characters, 3 short ones and 3 biases."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(3):
        tensors[LONG.format(i=i)] = torch.randn(16, 8, generator=g)
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=g)
    path = tmp_path_factory.mktemp("long") / "model.safetensors"
    save_file(tensors, str(path))
    return path, [n for n, t in tensors.items() if t.ndim == 2]


def test_analyze_keeps_every_tensor_name_whole_and_reports_counts(long_names, tmp_path, piped):
    path, matrices = long_names
    out = piped("analyze", str(path), store=tmp_path / "s")
    assert all(len(n) > 80 for n in matrices[::2])
    for name in matrices:
        [line] = [ln for ln in out.out.splitlines() if name in ln]  # whole, on one line
        assert line.split("│")[1].strip() == name
    lines = stage_lines(out.err)
    assert lines[0] == f"conditioning of {path} …"
    # every stored tensor (9: 6 matrices and 3 norms) counted, with a rate
    assert re.fullmatch(r"  done: 9/9, [\d,.]+/s, \d[\d,]*\.\d s", lines[1]), lines
    assert len(lines) == 2


def test_select_summary_on_stderr_keeps_names_whole(long_names, tmp_path, piped):
    path, matrices = long_names
    out = piped("select", str(path), "-b", "6", store=tmp_path / "s")
    assert sorted(out.out.split()) == sorted(matrices)
    for name in matrices:
        assert any(name in ln for ln in out.err.splitlines())


@pytest.mark.slow  # ~20 s: the batch spawns worker processes
def test_batch_failure_lines_stay_whole(long_names, tmp_path):
    path, _ = long_names
    vectors = tmp_path / ("a_folder_with_a_long_name_" * 3)
    vectors.mkdir()
    save_file({"layer.0": torch.ones(8)}, str(vectors / "v.safetensors"))
    out = run_cli("analyze", str(path), str(vectors), store=tmp_path / "s", env=NO_COLUMNS, check=False)
    assert out.returncode == 2
    [failed] = [ln for ln in out.stderr.splitlines() if ln.startswith("failed:")]
    assert str(vectors) in failed and failed.endswith("are not a model)")
    assert str(path) in out.stdout  # the batch table: the path whole on one line


def test_sae_train_prints_harvest_and_training_lines_with_counts_and_rates(tmp_path, piped, monkeypatch):
    from app import api

    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    llama = make_tiny_llama(tmp_path / "llama")
    texts = tmp_path / "texts.txt"
    words = ["tensor", "array", "frame", "model", "value", "index", "shape", "file"]
    texts.write_text("\n".join(f"the {a} of a {b} returns a new {c}" for a in words for b in words for c in words[:2]))
    out = piped("sae", "train", str(llama), "--layer", "1", "--d-sae", "16", "--k", "2", "--tokens", "3000",
                "--batch-size", "256", "--texts", str(texts), "--json", store=tmp_path / "s")
    trained = json.loads(out.out)
    meta = api.load_sae(trained["key"], store=tmp_path / "s").meta
    n_tokens, steps = meta["harvest"]["n_tokens"], trained["training"]["steps"]
    lines = stage_lines(out.err)
    assert lines[0] == f"SAE on {llama} layer 1 …"
    assert re.fullmatch(rf"  harvest: {n_tokens:,}/{n_tokens:,} tokens, [\d,.]+ tokens/s, [\d,.]+ s", lines[1])
    assert re.fullmatch(rf"  train: {steps}/{steps} steps, [\d,.]+ steps/s, [\d,.]+ s", lines[2])
    assert re.fullmatch(r"  done in [\d,.]+ s", lines[3]) and len(lines) == 4


def test_table_cells_are_text_not_markup(tmp_path, piped):
    """Expert slices are labelled `name[expert=k]`: rich markup would swallow the bracket as a style tag."""
    path = tmp_path / "moe.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.block_sparse_moe.experts.w1": torch.randn(3, 8, 4, generator=g),
               "odd[bold]name.weight": torch.randn(4, 4, generator=g)}, str(path))
    out = piped("analyze", str(path), store=tmp_path / "s")
    for label in [f"model.layers.0.block_sparse_moe.experts.w1[expert={k}]" for k in range(3)] + ["odd[bold]name.weight"]:
        assert sum(f"│ {label} " in ln for ln in out.out.splitlines()) == 1, (label, out.out)
