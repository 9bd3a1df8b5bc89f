"""Executors and batch runs: results independent of workers, Ray == local == in-process, driver-only writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from _support import run_cli
from analysis import singular_values as sv_mod
from analysis import spectra
from analysis.batch import expand_sources, merge_spectra, split_tensors
from analysis.errors import ConfigError, SourceError
from analysis.executor import ExecutorConfig, make_executor
from analysis.sources import open_source
from analysis.spectra import weight_spectra
from analysis.store import Store
from app import api


def _checkpoint(directory: Path, seed: int) -> Path:
    """A small safetensors model: attention-like and MLP-like matrices, a 3-D stack, a bias."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True)
    save_file({"layers.0.attn.q.weight": torch.randn(48, 48, generator=g),
               "layers.0.mlp.up.weight": torch.randn(96, 48, generator=g).to(torch.bfloat16),
               "layers.0.mlp.down.weight": torch.randn(48, 96, generator=g),
               "layers.1.experts.weight": torch.randn(3, 32, 24, generator=g),
               "layers.1.mlp.up.bias": torch.randn(96, generator=g),
               "embed.weight": torch.randn(300, 48, generator=g)}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("run")
    return [_checkpoint(root / f"ckpt-{step:03d}", seed) for seed, step in enumerate((100, 200, 300))]


def _assert_same_entry(a: Store, b: Store, fingerprint: str) -> None:
    ra = a.get(fingerprint, api.SPECTRA, api.spectra_params(), spectra.CODE_VERSION)
    rb = b.get(fingerprint, api.SPECTRA, api.spectra_params(), spectra.CODE_VERSION)
    assert ra is not None and rb is not None
    pd.testing.assert_frame_equal(ra.table, rb.table, check_exact=True)
    assert sorted(ra.arrays) == sorted(rb.arrays)
    for k in ra.arrays:
        np.testing.assert_array_equal(ra.arrays[k], rb.arrays[k])  # bitwise, not approximately
    assert dict(ra.meta) == dict(rb.meta)


# -- reproducibility: what makes Ray == local possible ---------------------------------------------

def test_weight_spectra_is_bitwise_the_same_for_any_worker_count(rng, monkeypatch):
    monkeypatch.setattr(spectra, "SPLIT_ELEMENTS", 4000)  # the split-Gram path big embeddings take
    monkeypatch.setattr(sv_mod, "GRAM_BLOCK_ELEMENTS", 900)
    tensors = [("emb.weight", torch.from_numpy(rng.standard_normal((700, 40)))),
               ("a.weight", torch.from_numpy(rng.standard_normal((30, 20)).astype(np.float32))),
               ("b.weight", torch.from_numpy(rng.standard_normal((20, 500)).astype(np.float32)).to(torch.bfloat16))]
    runs = [weight_spectra(tensors, n_workers=n) for n in (1, 2, 3)]
    for other in runs[1:]:
        pd.testing.assert_frame_equal(runs[0].table, other.table, check_exact=True)
        for k, v in runs[0].singular_values.items():
            np.testing.assert_array_equal(v, other.singular_values[k])
    np.testing.assert_allclose(runs[0].singular_values["emb.weight"],  # and still right
                               np.linalg.svd(tensors[0][1].numpy(), compute_uv=False), rtol=1e-10)


def test_split_by_tensor_then_merge_equals_one_run(checkpoints):
    src = open_source(checkpoints[0])
    whole = weight_spectra(src.iter_tensors())
    tensors = tuple((i.name, i.n_params) for i in src.tensor_infos())
    for parts in (1, 2, 3, 10):
        chunks = split_tensors(tensors, parts)
        assert [n for c in chunks for n in c] == [n for n, _ in tensors]  # every tensor once, in order
        assert len(chunks) <= parts
        merged = merge_spectra([weight_spectra(src.iter_tensors(list(c))) for c in chunks])
        pd.testing.assert_frame_equal(whole.table, merged.table, check_exact=True)
        assert whole.skipped == merged.skipped
        for k, v in whole.singular_values.items():
            np.testing.assert_array_equal(v, merged.singular_values[k])


# -- configuration and inputs -------------------------------------------------------------------------

def test_executor_config_errors():
    with pytest.raises(ConfigError, match="unknown executor 'dask'; choose one of local, ray"):
        ExecutorConfig(kind="dask")
    with pytest.raises(ConfigError, match="workers must be a positive integer, got 0"):
        ExecutorConfig(workers=0)
    with pytest.raises(ConfigError, match="needs --executor ray"):
        ExecutorConfig(kind="local", address="auto")
    with pytest.raises(ConfigError, match="unknown local mode 'fiber'"):
        ExecutorConfig(mode="fiber")


def test_ray_executor_without_ray_installed_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"needs Ray; install it with `pip install 'lenslab\[ray\]'`"):
        make_executor(ExecutorConfig(kind="ray"))


def test_unreachable_ray_address_fails_fast():
    pytest.importorskip("ray")
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"no Ray head answers at '{address}'"):
            make_executor(ExecutorConfig(kind="ray", address=address))
    assert time.perf_counter() - t0 < 20


def test_expand_sources_globs_absolute_paths_and_duplicates(checkpoints, monkeypatch):
    root = checkpoints[0].parent
    monkeypatch.chdir(root)
    got = expand_sources(["minilm", "ckpt-*", "ckpt-100"])
    assert got == ["minilm", *[str(p.resolve()) for p in checkpoints]]
    with pytest.raises(SourceError, match="matches no file or directory"):
        expand_sources([str(root / "nothing-*")])


def test_local_thread_executor_keeps_errors_per_item():
    with make_executor(ExecutorConfig(kind="local", workers=2, mode="thread")) as ex:
        out = sorted(ex.imap_unordered(_inverse, [1, 0, 4]), key=lambda o: o[0])
        assert [o[1] for o in out] == [1.0, None, 0.25]
        assert isinstance(out[1][2], ZeroDivisionError)
        assert ex.map(_inverse, [2, 4]) == [0.5, 0.25]
        with pytest.raises(ZeroDivisionError):
            ex.map(_inverse, [0])


def _inverse(x: int) -> float:
    return 1 / x


# -- batch runs on local processes ---------------------------------------------------------------------

def test_local_batch_stores_what_analyze_stores_and_reports_each_source(checkpoints, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x09\x00\x00\x00\x00\x00\x00\x00{not json")
    batch, single = Store(tmp_path / "batch"), Store(tmp_path / "single")
    api.analyze(checkpoints[0], store=batch)  # already stored: reported as cached, not recomputed
    seen = []
    items = api.analyze_many([str(c) for c in checkpoints] + [str(broken)], executor="local", workers=2,
                             store=batch, progress=lambda d, t, label: seen.append((d, t)))
    assert [i.status for i in items] == ["cached", "computed", "computed", "error"]
    assert "not valid UTF-8 JSON" in items[3].error and items[3].fingerprint is None
    assert seen and seen[-1][0] == seen[-1][1]  # progress reaches its total
    for c, item in zip(checkpoints, items):
        ws = api.analyze(c, store=single)  # the in-process path
        assert item.fingerprint == open_source(c).fingerprint
        assert item.n_matrices == len(ws.table) and len(ws.skipped) == 1  # the bias is not a matrix
        _assert_same_entry(batch, single, item.fingerprint)
    assert {m.fingerprint for m in batch.models()} == {i.fingerprint for i in items[:3]}
    # one result per source: nothing duplicated by the two phases
    assert len(batch.list(analysis=api.SPECTRA)) == 3


def test_cli_batch_json_rows_and_failure_exit_code(checkpoints, tmp_path):
    store = tmp_path / "cli-store"
    missing = str(tmp_path / "missing-dir")
    out = run_cli("analyze", str(checkpoints[0]), str(checkpoints[1]), missing, "--workers", "2", "--json",
                  store=store, check=False)
    assert out.returncode == 2, out.stderr
    assert "1 of 3 sources failed" in out.stderr and f"{missing}: {missing!r} is neither a bundled" in out.stderr
    rows = json.loads(out.stdout)  # the sources that worked are printed and stored
    assert [r["source"] for r in rows[:1]] == [str(checkpoints[0])]
    assert {r["source"] for r in rows} == {str(checkpoints[0]), str(checkpoints[1])}
    single = json.loads(run_cli("analyze", str(checkpoints[0]), "--json", store=store).stdout)  # a cache hit
    assert [r for r in rows if r["source"] == str(checkpoints[0])] == [{"source": str(checkpoints[0]), **r}
                                                                      for r in single]
    assert len(rows) == 2 * len(single) and {"kappa", "matrix", "status"} <= set(single[0])
    assert len(Store(store).list(analysis=api.SPECTRA)) == 2


# -- Ray ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def test_ray_and_local_store_identical_results(checkpoints, tmp_path, local_ray):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 4)
    specs = [str(c) for c in checkpoints] + [str(broken)]
    on_ray, on_ray_split, local = Store(tmp_path / "ray"), Store(tmp_path / "ray-split"), Store(tmp_path / "local")
    ray_items = api.analyze_many(specs, executor="ray", store=on_ray)
    split_items = api.analyze_many(specs[:1], executor="ray", by_tensor=True, store=on_ray_split)
    local_items = api.analyze_many(specs, executor="local", workers=2, store=local)
    assert [i.status for i in ray_items] == [i.status for i in local_items] == ["computed"] * 3 + ["error"]
    assert ray_items[3].error == local_items[3].error  # the typed error crosses Ray unwrapped
    assert "too short for a safetensors file" in ray_items[3].error
    for r, loc in zip(ray_items[:3], local_items[:3]):
        assert r.fingerprint == loc.fingerprint
        _assert_same_entry(on_ray, local, r.fingerprint)
    _assert_same_entry(on_ray_split, local, split_items[0].fingerprint)
    assert local_ray.is_initialized()  # a Ray the caller started is left running


def test_ray_executor_maps_in_order(local_ray):
    # Ray workers import a task function by module: use one every worker has (not this test module)
    with make_executor(ExecutorConfig(kind="ray")) as ex:
        assert ex.map(json.loads, ["1", "[2]", '{"a": 3}']) == [1, [2], {"a": 3}]
        (_, _, error), = list(ex.imap_unordered(json.loads, ["{"]))
        assert isinstance(error, json.JSONDecodeError)
