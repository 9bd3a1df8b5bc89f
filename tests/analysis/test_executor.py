"""Executors and batch runs: results independent of workers, Ray == local == in-process, driver-only writes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from _support import run_cli
from analysis.weights import singular_values as sv_mod
from analysis.weights import spectra
from analysis.weights.batch import expand_sources, merge_spectra, split_tensors
from analysis.errors import ConfigError, SourceError
from analysis.executor import ExecutorConfig, make_executor
from analysis.sources import open_source
from analysis.weights.spectra import weight_spectra
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


def test_ray_cause_digs_out_the_innermost_error():
    from analysis.executor import ray_cause

    inner = RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                         '  File "node.py", line 996, in _init_gcs_client\n'
                         "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: token is missing\n")
    try:
        try:
            raise inner
        except RuntimeError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc
    except ConnectionError as outer:
        assert ray_cause(outer) == "AuthenticationError: RPC error: InvalidAuthToken: token is missing"
    assert ray_cause(ValueError("bad address 'x'")) == "ValueError: bad address 'x'"


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
# The first two tests need no Ray running in this process (each starts or reaches its own); the
# module's shared local Ray (``local_ray``) is started after them, by the tests below them.

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_ports(proc: subprocess.Popen, ports: list[int], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"`ray start --head` did not come up: {log.read_text()[-3000:]}")
                time.sleep(0.1)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head started as a user would (``ray start --head --block``) in its own process group,
    with token authentication on and a token of its own (passed by environment, so nothing under
    ~/.ray is read or written). Yields (address, token, head pid); stopped by its process group
    (not ``ray stop``, which would stop every Ray on the machine)."""
    pytest.importorskip("ray")
    token = secrets.token_hex(32)
    gcs, raylet, *other = _free_ports(7)
    home = tmp_path / "head-home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="lenslab-ray-")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", "2",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--node-manager-port", str(raylet),
           "--object-manager-port", str(other[0]), "--dashboard-agent-listen-port", str(other[1]),
           "--dashboard-agent-grpc-port", str(other[2]), "--runtime-env-agent-port", str(other[3]),
           "--metrics-export-port", str(other[4]), "--include-dashboard", "false", "--disable-usage-stats",
           "--object-store-memory", str(100 * 2**20), "--temp-dir", temp_dir]
    log = tmp_path / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_ports(head, [gcs, raylet], 90, log)
        yield f"127.0.0.1:{gcs}", token, head.pid
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
                head.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


# Run as a separate driver process, as `lenslab analyze --ray-address` would be: fresh Ray state,
# only the environment given. The task reports its process ancestry (pid up to 1).
_DRIVER = """
import json, os, sys
from analysis.errors import ConfigError
from analysis.executor import ExecutorConfig, make_executor

def ancestry(_):
    chain, pid = [], os.getpid()
    while pid > 1:
        chain.append(pid)
        with open(f"/proc/{pid}/status") as f:
            pid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
    return chain

address, checkpoint, store = sys.argv[1:4]
try:
    with make_executor(ExecutorConfig(kind="ray", address=address)) as ex:
        chains = ex.map(ancestry, [0, 1, 2])
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
from app import api
items = api.analyze_many([checkpoint], executor="ray", ray_address=address, store=store)
print(json.dumps({"driver": os.getpid(), "chains": chains, "items": [[i.status, i.fingerprint] for i in items]}))
"""


def _drive(address: str, checkpoint: Path, store: Path, env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", _DRIVER, address, str(checkpoint), str(store)], capture_output=True,
                         text=True, env={**clean, **env}, cwd=Path(__file__).resolve().parents[2], timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(240)
def test_connecting_by_address_to_a_ray_head_with_token_auth(ray_head, checkpoints, tmp_path):
    """Without the cluster's token LensLab's error carries Ray's cause (InvalidAuthToken) and the fix;
    with RAY_AUTH_MODE=token and the token, tasks run in worker processes of that head (their
    ancestry leads to the `ray start` process) and the batch stores what the local executor stores."""
    import ray

    assert not ray.is_initialized(), "this test needs no Ray connected in the test process"
    address, token, head_pid = ray_head
    home = tmp_path / "driver-home"  # no ~/.ray/auth_token to fall back on
    home.mkdir()
    refused = _drive(address, checkpoints[0], tmp_path / "s0",
                     {"HOME": str(home), "RAY_gcs_server_port_wait_time_s": "2"})
    assert "InvalidAuthToken" in refused["error"] and f"cannot start or reach '{address}'" in refused["error"]
    assert "set RAY_AUTH_MODE=token here" in refused["error"]
    ok = _drive(address, checkpoints[0], tmp_path / "s1",
                {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    assert all(head_pid in chain and ok["driver"] not in chain for chain in ok["chains"]), ok
    (status, fingerprint), = ok["items"]
    assert status == "computed"
    local = Store(tmp_path / "local")
    api.analyze(checkpoints[0], store=local)
    _assert_same_entry(Store(tmp_path / "s1"), local, fingerprint)


@pytest.mark.timeout(180)
def test_lenslab_starts_and_stops_its_own_local_ray(checkpoints, tmp_path, ray_task_pids):
    """``executor="ray"`` with no address and no Ray running: LensLab starts a local Ray with
    ``workers`` CPUs, runs every task in Ray worker processes and shuts it down after."""
    import ray

    assert not ray.is_initialized(), "this test needs no Ray connected in the test process"
    on_ray, local = Store(tmp_path / "ray"), Store(tmp_path / "local")
    items = api.analyze_many([str(c) for c in checkpoints[:2]], executor="ray", workers=2, store=on_ray)
    assert [i.status for i in items] == ["computed"] * 2
    assert not ray.is_initialized()  # the Ray LensLab started is shut down
    assert len(ray_task_pids) == 4 and os.getpid() not in ray_task_pids  # 2 fingerprints + 2 spectra, on workers
    for item in items:
        api.analyze(item.source, store=local)
        _assert_same_entry(on_ray, local, item.fingerprint)


@pytest.fixture
def ray_task_pids(monkeypatch) -> list[int]:
    """Pids of the processes that ran each task submitted through ``RayExecutor`` (filled as
    results arrive): a task that ran in the driver would show the driver's pid."""
    from analysis.executor import RayExecutor

    pids: list[int] = []
    original = RayExecutor.imap_unordered

    def traced(self, fn, items):
        def on_worker(item):  # nested: Ray pickles it by value, so workers need not import this module
            import os as _os

            return _os.getpid(), fn(item)

        for i, result, error in original(self, on_worker, items):
            if error is None:
                pid, result = result
                pids.append(pid)
            yield i, result, error

    monkeypatch.setattr(RayExecutor, "imap_unordered", traced)
    return pids


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(180)
def test_ray_and_local_store_identical_results(checkpoints, tmp_path, local_ray, ray_task_pids):
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
    # every task that succeeded ran in a Ray worker: 3 fingerprints + 3 spectra, 1 + the split's parts
    assert len(ray_task_pids) >= 3 + 3 + 1 + 1 and os.getpid() not in ray_task_pids


def test_ray_executor_maps_in_order(local_ray):
    # Ray workers import a task function by module: use one every worker has (not this test module)
    with make_executor(ExecutorConfig(kind="ray")) as ex:
        assert ex.map(json.loads, ["1", "[2]", '{"a": 3}']) == [1, [2], {"a": 3}]
        (_, _, error), = list(ex.imap_unordered(json.loads, ["{"]))
        assert isinstance(error, json.JSONDecodeError)
