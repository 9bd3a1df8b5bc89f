"""Security defaults: the dashboard binds to 127.0.0.1 and opens typed paths only inside allowed roots;
pickle loads only behind the trust flag and warns; code shipped with a model is never run."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from _support import run_cli
from analysis.errors import SourceError
from app.allowed_paths import ENV_VAR, allowed_roots, check_typed_path

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
REPO = Path(__file__).resolve().parents[2]


def _model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    save_file({"layers.0.mlp.up.weight": torch.from_numpy(rng.standard_normal((12, 8)).astype(np.float32))},
              str(path))
    return path


@pytest.fixture
def roots(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(allowed root, a directory outside it), the dashboard restricted to the first."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    monkeypatch.setenv(ENV_VAR, str(allowed))
    return allowed, outside


# -- the allow-list ----------------------------------------------------------------------------------

def test_paths_inside_roots_pass_others_are_refused(roots):
    allowed, outside = roots
    inside = _model(allowed / "m" / "model.safetensors")
    assert check_typed_path(str(inside)) == str(inside)
    assert check_typed_path("minilm", names=["minilm"]) == "minilm"
    (allowed / "link").symlink_to(outside)  # a symlink inside the root that leads out of it
    for spec in [str(outside / "model.safetensors"), str(allowed / ".." / "outside"), str(allowed / "link"),
                 "/etc/passwd", "minilm", "relative/path"]:
        with pytest.raises(SourceError, match=f"outside the directories this dashboard may read .*{ENV_VAR}"):
            check_typed_path(spec)
    with pytest.raises(SourceError, match="not a usable path"):
        check_typed_path("a\x00b")


def test_links_out_of_a_typed_directory_are_refused(roots):
    """A directory inside the root whose weights (or shard, or config) link outside it is refused,
    naming the link but not its target; links that stay inside the root (as in the Hugging Face
    cache: snapshots/REV/model.safetensors -> ../../blobs/HASH) are fine."""
    allowed, outside = roots
    secret = _model(outside / "secret.safetensors")
    single = allowed / "single"
    single.mkdir()
    (single / "model.safetensors").symlink_to(secret)
    sharded = allowed / "sharded"
    _model(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model-00002-of-00002.safetensors").symlink_to(secret)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    for d, link in ((single, "model.safetensors"), (sharded, "model-00002-of-00002.safetensors")):
        with pytest.raises(SourceError, match=f"{link} links to a file outside the directories") as err:
            check_typed_path(str(d))
        assert str(outside) not in str(err.value) and "--allowed-root" in str(err.value)
    blob = _model(allowed / "hub" / "blobs" / "abc123")
    snapshot = allowed / "hub" / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "abc123")
    assert check_typed_path(str(snapshot)) == str(snapshot) and blob.is_file()


@pytest.mark.usefixtures("streamlit_caches_cleared")
def test_home_form_refuses_a_directory_linking_out_of_the_root(dashboard_store, roots, monkeypatch):
    from _refusal import spy_open_source

    allowed, outside = roots
    secret = _model(outside / "secret.safetensors")
    linked = allowed / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(secret)
    opened = spy_open_source(monkeypatch)
    at = AppTest.from_file(DASHBOARD, default_timeout=90).run()
    at.text_input[0].input(str(linked))
    at.button[0].click().run()
    assert not at.exception
    assert len(at.error) == 1 and "model.safetensors links to a file outside" in at.error[0].value
    assert not dashboard_store.models() and not opened  # refused before the source was opened


def test_default_roots_are_cwd_models_dir_and_hf_cache(monkeypatch, tmp_path):
    from analysis.models import tiny_lm as tiny_models

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv(tiny_models.MODELS_ENV, str(tmp_path / "models"))
    assert allowed_roots() == (tmp_path.resolve(), (tmp_path / "models").resolve(), (tmp_path / "hf").resolve())
    with pytest.raises(SourceError, match="outside"):
        check_typed_path(str(Path.home() / ".ssh" / "id_rsa"))


@pytest.mark.usefixtures("streamlit_caches_cleared")
def test_home_form_refuses_a_path_outside_the_allowed_root(dashboard_store, roots):
    allowed, outside = roots
    refused = _model(outside / "model.safetensors")
    at = AppTest.from_file(DASHBOARD, default_timeout=90).run()
    at.text_input[0].input(str(refused))
    at.button[0].click().run()
    assert not at.exception
    assert len(at.error) == 1 and "outside the directories this dashboard may read" in at.error[0].value
    assert str(allowed) in at.error[0].value and "--allowed-root" in at.error[0].value
    assert not dashboard_store.models()  # nothing was read or stored
    missing = outside / "no-such-dir"  # refused before it is looked at: the message says nothing about it
    at.text_input[0].input(str(missing))
    at.button[0].click().run()
    assert "outside the directories" in at.error[0].value and "neither a bundled" not in at.error[0].value
    inside = _model(allowed / "model.safetensors")
    at.text_input[0].input(str(inside))
    at.button[0].click().run()
    assert not at.error and any("Analysed" in s.value for s in at.success)
    assert [m.label for m in dashboard_store.models()] == [str(inside.resolve())]


@pytest.mark.usefixtures("streamlit_caches_cleared")
def test_dashboard_never_loads_pickle(dashboard_store, roots):
    allowed, _ = roots
    path = allowed / "pytorch_model.bin"
    torch.save({"w": torch.zeros(3, 3)}, path)
    at = AppTest.from_file(DASHBOARD, default_timeout=90).run()
    at.text_input[0].input(str(path))
    at.button[0].click().run()
    assert len(at.error) == 1 and "pickle checkpoints can run arbitrary code" in at.error[0].value
    assert not dashboard_store.models()


@pytest.mark.usefixtures("streamlit_caches_cleared")
def test_dashboard_refuses_a_fifo_instead_of_hanging(dashboard_store, roots):
    """A FIFO named model.safetensors used to block the dashboard session forever."""
    allowed, _ = roots
    os.mkfifo(fifo := allowed / "model.safetensors")
    at = AppTest.from_file(DASHBOARD, default_timeout=60).run()
    at.text_input[0].input(str(fifo))
    at.button[0].click().run()
    assert not at.exception
    assert len(at.error) == 1 and "is a named pipe (FIFO), not a regular file" in at.error[0].value
    assert not dashboard_store.models()


def test_cli_refuses_fifos_and_ambiguous_directories(tmp_path):
    import subprocess

    from _support import LENSLAB

    os.mkfifo(fifo := tmp_path / "model.safetensors")
    env = {**os.environ, "LENSLAB_STORE": str(tmp_path / "s")}
    out = subprocess.run([LENSLAB, "analyze", str(fifo)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "not a regular file" in out.stderr
    mixed = tmp_path / "mixed"
    _model(mixed / "weights.safetensors")  # not model.safetensors: transformers would load the pickle instead
    torch.save({"layers.0.mlp.up.weight": torch.zeros(12, 8)}, mixed / "pytorch_model.bin")
    from app import cli

    from analysis.errors import AmbiguousSourceError

    result = CliRunner().invoke(cli.app, ["analyze", str(mixed), "--store", str(tmp_path / "s")])
    assert isinstance(result.exception, AmbiguousSourceError)  # the console script prints it, exit code 2
    assert "safetensors weights (weights.safetensors) and pickle weights (pytorch_model.bin)" in str(result.exception)


# -- binding and launch --------------------------------------------------------------------------------

def test_dashboard_command_binds_loopback_and_passes_allowed_roots(monkeypatch, tmp_path):
    from app import cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.setattr(cli, "_check_port", lambda host, port: None)  # 8501 may be busy here (tests/app/test_cli.py)
    runner = CliRunner()
    assert runner.invoke(cli.app, ["dashboard", "--store", str(tmp_path / "s")]).exit_code == 0
    assert runner.invoke(cli.app, ["dashboard", "--allowed-root", str(tmp_path / "a"), "--allowed-root",
                                   str(tmp_path / "b")]).exit_code == 0
    (cmd, env), (_, env2) = calls
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--client.toolbarMode") + 1] == "viewer"  # no Deploy button
    assert cmd[cmd.index("--client.showErrorDetails") + 1] == "none"  # no traceback or server path in the browser
    assert ENV_VAR not in env or env[ENV_VAR] == os.environ.get(ENV_VAR)
    assert env2[ENV_VAR] == os.pathsep.join([str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())])


def test_streamlit_config_binds_loopback():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["browser"]["gatherUsageStats"] is False
    assert config["client"]["toolbarMode"] == "viewer"
    assert config["client"]["showErrorDetails"] == "none"


def test_show_error_details_none_is_an_option_of_the_installed_streamlit():
    from streamlit import config

    assert "none" in {o.value for o in config.ShowErrorDetailsConfigOptions}


# -- pickle and remote code ------------------------------------------------------------------------------

def test_pickle_needs_the_flag_and_warns_through_the_cli(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"layers.0.mlp.up.weight": torch.randn(6, 4)}, path)
    refused = run_cli("analyze", str(path), store=tmp_path / "s", check=False)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr
    trusted = run_cli("analyze", str(path), "--trust-pickle", store=tmp_path / "s")
    assert "loading a pickle checkpoint (trust_pickle=True)" in trusted.stderr
    assert "weights_only=True" in trusted.stderr


def test_model_code_in_a_checkpoint_directory_is_never_run(tmp_path):
    from analysis.sources import boot_bridge_from_dir

    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "evil", "architectures": ["EvilModel"], "auto_map": '
                                   '{"AutoConfig": "configuration_evil.EvilConfig", '
                                   '"AutoModelForCausalLM": "modeling_evil.EvilModel"}}')
    payload = 'import pathlib; pathlib.(Path(__file__).resolve().parents[1] / "PWNED").write_text("ran")\n'
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (d / name).write_text(payload)
    with pytest.raises(SourceError, match="could not boot"):
        boot_bridge_from_dir(d)
    assert not (d / "PWNED").exists()
