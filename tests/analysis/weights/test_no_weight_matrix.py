"""A source holding no weight matrix (a folder of steering vectors, biases) is an error, never a stored model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.errors import SourceError
from analysis.store import Store


def _vectors(d, rng) -> None:
    """Two steering-vector files as `lenslab steer extract --out` writes them: 1-D `layer.N` tensors."""
    from analysis.steering.vectors import SteeringVector, save_vector

    for name, layers in (("torch.safetensors", (0, 1)), ("code.safetensors", (3,))):
        vec = SteeringVector(vectors=rng.standard_normal((len(layers), 8)).astype(np.float32), layers=layers,
                             fingerprint="f" * 32, source="tiny", contrast="numpy-torch")
        save_vector(vec, d / name)


@pytest.fixture
def vector_dir(tmp_path, rng):
    d = tmp_path / "vectors"
    d.mkdir()
    _vectors(d, rng)
    return d


def _assert_nothing_stored(root) -> None:
    st = Store(root)
    assert st.list() == [] and st.models() == []


def test_analyze_refuses_a_folder_of_steering_vectors(vector_dir, tmp_path):
    from app import api

    with pytest.raises(SourceError, match=r"vectors: nothing to analyse: found 3 tensor\(s\), none a weight matrix "
                                          r"\(layer\.0 \(8,\) F32, layer\.1 \(8,\) F32, layer\.3 \(8,\) F32\) in "
                                          r"code\.safetensors, torch\.safetensors; .* Give the model's directory"):
        api.analyze(vector_dir, store=tmp_path / "store")
    _assert_nothing_stored(tmp_path / "store")


@pytest.mark.parametrize("shapes", [{"b": (4,)}, {"empty": (0, 4), "b": (4,)}, {"ids": (3, 3)}], ids=str)
def test_only_float_matrices_with_no_empty_axis_count(tmp_path, shapes):
    from app import api

    path = tmp_path / "w.safetensors"
    save_file({k: torch.zeros(v, dtype=torch.int64 if k == "ids" else torch.float32) for k, v in shapes.items()},
              str(path))
    with pytest.raises(SourceError, match="nothing to analyse|holds no floating-point tensors"):
        api.analyze(path, store=tmp_path / "store")
    _assert_nothing_stored(tmp_path / "store")


def test_one_matrix_is_enough(tmp_path):
    from app import api

    path = tmp_path / "w.safetensors"
    save_file({"b": torch.ones(4), "w": torch.eye(4)}, str(path))
    assert list(api.analyze(path, store=tmp_path / "store").table["tensor"]) == ["w"]


def test_batch_reports_the_folder_and_stores_the_others(vector_dir, tmp_path):
    from analysis.weights.batch_pipeline import analyze_many

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.eye(4) * torch.arange(1, 5)}, str(good))
    items = analyze_many([str(vector_dir), str(good)], executor="local", workers=1, mode="thread",
                         store=tmp_path / "store")
    assert [i.status for i in items] == ["error", "computed"]
    assert "nothing to analyse" in items[0].error and "torch.safetensors" in items[0].error
    assert [e.fingerprint for e in Store(tmp_path / "store").list()] == [items[1].fingerprint]


def test_cli_says_it_in_one_line_exit_2(vector_dir, tmp_path):
    from _support import run_cli

    out = run_cli("analyze", str(vector_dir), store=tmp_path / "store", check=False, env={"COLUMNS": ""})
    assert out.returncode == 2 and out.stdout == ""
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert "nothing to analyse" in line and line.endswith("are not a model)")
    _assert_nothing_stored(tmp_path / "store")
