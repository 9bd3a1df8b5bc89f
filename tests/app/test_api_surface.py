"""app/api.py is a surface: it re-exports, defines nothing, and reads every analysis the same way."""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app import api

API_FILE = Path(api.__file__)
ANALYSIS_NAMES = {"spectra", "experiment.kappatune_forgetting", "experiment.kappatune_matched", "bilinear.decompose",
                  "mmoe.features", "mmoe.probe", "mmoe.specialisation", "mmoe.curve", "mmoe.bias", "experts.routing",
                  "steering.extract", "steering.dose", "steering.sweep", "steering.point", "steering.search",
                  "steering.audit", "sae", "sae-eval", "sae-features", "circuits", "sae-groundtruth", "sae-probe",
                  "sae-transcoder"}


def test_api_module_defines_no_function_or_class():
    tree = ast.parse(API_FILE.read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert defined == []
    public = [getattr(api, n) for n in dir(api) if not n.startswith("_")]
    assert not [f for f in public if inspect.isfunction(f) and f.__module__ == "app.api"]


def test_every_stored_analysis_is_registered():
    assert set(api.ANALYSES) == ANALYSIS_NAMES
    for a in api.ANALYSES.values():
        assert a.code_version and callable(a.compute) and callable(a.from_result)


def test_deprecated_names_and_their_replacements_exist():
    assert len(api.DEPRECATED) >= 18
    for old, new in api.DEPRECATED.items():
        assert callable(getattr(api, old)), old
        assert callable(getattr(api, new)), new
        assert old != new


def test_deprecated_alias_warns_and_returns_the_new_result(tmp_path):
    with pytest.warns(DeprecationWarning, match="find_spectra"):
        assert api.stored_spectra("0" * 64, store=tmp_path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert api.find_spectra("0" * 64, store=tmp_path) is None


@pytest.fixture
def tiny_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file({"a.weight": torch.randn(6, 4, generator=g), "b.weight": torch.randn(5, 5, generator=g)}, str(path))
    return path


def test_generic_readers_agree_with_the_analysis_readers(tmp_path, tiny_checkpoint):
    store = tmp_path / "store"
    ws = api.analyze(tiny_checkpoint, store=store, device="cpu")
    from safetensors.numpy import load_file

    weights = load_file(str(tiny_checkpoint))
    want = {name: np.linalg.cond(w.astype(np.float64)) for name, w in weights.items()}
    got = dict(zip(ws.table["tensor"], ws.table["kappa"]))
    assert got.keys() == want.keys() and all(np.isclose(got[k], want[k], rtol=1e-10) for k in want)
    rows = api.stored("spectra", store=store)
    assert len(rows) == 1 and rows == api.list_spectra(store=store)
    key = rows[0].key
    for got in (api.load(key, store=store), api.load_spectra(key, store=store),
                api.find_spectra(rows[0].fingerprint, store=store)):
        assert got.table["kappa"].tolist() == ws.table["kappa"].tolist()
    with pytest.raises(api.NotStoredError, match="no stored result has key"):
        api.load("f" * 64, store=store)
    with pytest.raises(api.NotStoredError, match="holds a 'spectra' result, not 'circuits'"):
        api.load_circuits(key, store=store)
    with pytest.raises(KeyError):  # NotStoredError is a KeyError, as a missing key is
        api.load_bilinear("e" * 64, store=store)
