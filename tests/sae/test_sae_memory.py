"""SAE training memory: the estimate (``sae.memory.training_bytes``), the limit
(``analysis.memory.memory_limit``: LENSLAB_MEMORY_LIMIT, psutil or /proc/meminfo, cgroups),
oversized settings refused with a ConfigError before the model boots (API and CLI) and before
``sae.train.train_sae`` allocates, and the estimate against the peak RSS growth a real run
measures in a child process (``tests/_peak_rss.py sae``).

Independent truths: the estimate's parts recomputed by hand from the documented coefficients;
/proc/meminfo read by the test; the measured peak resident size of training runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _support import run_cli

from analysis import memory
from analysis.errors import ConfigError
from app import api
from sae import memory as sae_memory
from sae.memory import hook_width, training_bytes

PROBE = (Path(__file__).resolve().parents[1] / "_peak_rss.py")
GiB = 1 << 30


# ------------------------------------------------------------------------- the estimate
def test_training_bytes_by_hand():
    est = training_bytes(d_in=384, d_sae=3072, batch_size=4096, architecture="topk", dtype="float32",
                         n_tokens=10_000)
    assert est.parts == {"weights": 46 * 3072 * 384 + 40 * 3072, "step": int(8.5 * 4096 * 3072),
                         "batch": 40 * 4096 * 384, "activations": 10_000 * (4 * 384 + 24)}
    assert est.total == sum(est.parts.values()) and est.dominant == "step"
    relu = training_bytes(d_in=384, d_sae=3072, batch_size=4096, architecture="relu", dtype="float32")
    assert relu.parts["weights"] == 54 * 3072 * 384 + 40 * 3072
    assert relu.parts["step"] == int((4 + 1 + 80 * 0.14) * 4096 * 3072)  # the sparse path's bound wins in float32
    bf16 = training_bytes(d_in=384, d_sae=3072, batch_size=4096, architecture="relu", dtype="bfloat16")
    assert bf16.parts["step"] == int((2 + 1 + 80 * 0.035) * 4096 * 3072)
    assert training_bytes(d_in=384, d_sae=3072, batch_size=4096, dtype="bfloat16").parts["step"] == \
        int(4.5 * 4096 * 3072)


def test_the_estimate_uses_the_trainers_dense_threshold():
    from sae.train import DENSE_ABOVE_DENSITY

    assert sae_memory._DENSE_ABOVE_DENSITY == DENSE_ABOVE_DENSITY


@pytest.mark.parametrize("kw, match", [(dict(d_sae=-1), "d_sae=-1 must be an integer >= 0"),
                                       (dict(batch_size=2.5), "batch_size=2.5 must be an integer"),
                                       (dict(dtype="fp16"), "dtype='fp16'")], ids=str)
def test_training_bytes_checks_its_arguments(kw, match):
    with pytest.raises(ConfigError, match=match):
        training_bytes(**{"d_in": 8, "d_sae": 16, "batch_size": 4, **kw})


# ------------------------------------------------------------------------- the limit
@pytest.mark.parametrize("text, n", [("8G", 8 * GiB), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                     ("800000000", 800_000_000), (" 2 gib ", 2 * GiB), ("1e9", 10 ** 9)], ids=str)
def test_parse_size(text, n):
    assert memory.parse_size(text) == n


@pytest.mark.parametrize("text", ["lots", "0", "-1G", "12X", "0.1"], ids=str)
def test_an_unreadable_limit_is_a_config_error(text, monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, text)
    with pytest.raises(ConfigError, match=rf"LENSLAB_MEMORY_LIMIT='{text}' is not a memory size > 0; write e\.g\. 8G"):
        memory.memory_limit()


def test_the_env_limit_is_taken_as_is(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "3G")
    lim = memory.memory_limit()
    assert lim.bytes == 3 * GiB and lim.describe() == "3.0 GiB (LENSLAB_MEMORY_LIMIT=3G)"


def _meminfo() -> int:
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="needs /proc/meminfo")
def test_without_psutil_the_limit_is_a_fraction_of_memavailable(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: None)
    before = _meminfo()
    lim = memory.memory_limit()
    after = _meminfo()
    assert lim.source.startswith("80% of the") and "MemAvailable" in lim.source
    lo, hi = sorted((before, after))
    assert 0.8 * lo * 0.9 <= lim.bytes <= 0.8 * hi * 1.1  # other processes move MemAvailable a little


def test_a_cgroup_limit_below_the_available_memory_lowers_the_limit(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: 100 << 20)
    lim = memory.memory_limit()
    assert lim.bytes == int(0.8 * (100 << 20)) and "cgroup limit - usage" in lim.source


def test_cgroup_headroom_reads_v2_and_v1_files(tmp_path):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("400000\n")
    (v2 / "memory.stat").write_text("anon 300000\ninactive_file 50000\nactive_file 1\n")
    assert memory.cgroup_headroom(v2, v1) == 1_000_000 - 400_000 + 50_000
    (v2 / "memory.max").write_text("max\n")  # no v2 limit: fall through to v1
    (v1 / "memory.limit_in_bytes").write_text("2000000\n")
    (v1 / "memory.usage_in_bytes").write_text("1500000\n")
    (v1 / "memory.stat").write_text("cache 9\ntotal_inactive_file 100000\n")
    assert memory.cgroup_headroom(v2, v1) == 600_000
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert memory.cgroup_headroom(v2, v1) is None


# ------------------------------------------------------------------------- hook width before booting
def test_hook_width_from_config_json(tmp_path, minilm):
    assert hook_width(minilm.hf_dir) == 384  # 12 heads x 32
    d = tmp_path / "m"
    d.mkdir()
    for cfg, want in [({"num_attention_heads": 4, "hidden_size": 32}, 32),
                      ({"num_attention_heads": 4, "hidden_size": 32, "head_dim": 16}, 64),
                      ({"n_head": 12, "n_embd": 768}, 768), ({"hidden_size": 32}, None), ([1, 2], None)]:
        (d / "config.json").write_text(json.dumps(cfg))
        assert hook_width(d) == want, cfg
    (d / "config.json").write_text("{not json")
    assert hook_width(d) is None and hook_width(tmp_path / "none") is None and hook_width(None) is None


# ------------------------------------------------------------------------- refused before the model boots
@pytest.fixture
def no_boot(monkeypatch):
    """Booting any model fails the test: the memory check must come first."""
    from analysis.sources import Source
    from sae import harvest, requests

    def boom(*a, **k):
        raise AssertionError("the model was booted before the memory estimate was checked")

    monkeypatch.setattr(requests, "booted", boom)
    monkeypatch.setattr(harvest, "boot", boom)
    monkeypatch.setattr(Source, "boot_bridge", boom)
    monkeypatch.setenv(memory.ENV_VAR, "16G")


OVERSIZED = [
    (dict(d_sae=10 ** 9), r"would need about 48,913\.1 GiB \(d_in=384, d_sae=1000000000, batch_size=4096, topk, "
                          r"float32\) but the memory limit is 16\.0 GiB \(LENSLAB_MEMORY_LIMIT=16G\)\. Largest part: "
                          r"the training step's \[batch_size, d_sae\] buffers, 32,424\.9 GiB \(then weights and Adam "
                          r"state 16,488\.1 GiB, batch copies 0\.0586 GiB\)\. To fit, lower batch_size "
                          r"\(--batch-size\) or d_sae / expansion"),
    (dict(expansion=100_000), r"d_sae=38400000, .* Largest part: the training step's \[batch_size, d_sae\] buffers"),
    (dict(batch_size=10 ** 8), r"batch_size=100000000, .* To fit, lower batch_size"),
    (dict(d_sae=10 ** 8, batch_size=16, architecture="relu"),
     r"relu, float32\) .* Largest part: the weights, their gradients and Adam state \(\[d_sae, d_in\]\), [\d,.]+ GiB "
     r".* To fit, lower d_sae or expansion \(--d-sae / --expansion\)\."),
]


@pytest.mark.parametrize("kw, match", OVERSIZED, ids=[str(k) for k, _ in OVERSIZED])
def test_api_refuses_oversized_settings_before_booting(kw, match, no_boot, tmp_path):
    with pytest.raises(ConfigError, match=match):
        api.sae_train("minilm", 3, store=tmp_path / "s", **kw)


@pytest.mark.parametrize("argv", [["--d-sae", "1000000000"], ["--expansion", "100000"],
                                  ["--batch-size", "100000000"]], ids=str)
def test_cli_refuses_oversized_settings_before_booting(argv, no_boot, tmp_path):
    from app.cli import app

    res = CliRunner().invoke(app, ["sae", "train", "minilm", "--layer", "3", *argv, "--store", str(tmp_path / "s")])
    assert isinstance(res.exception, ConfigError) and "but the memory limit is 16.0 GiB" in str(res.exception)


def test_cli_refusal_is_a_typed_error_with_exit_2(tmp_path):
    out = run_cli("sae", "train", "minilm", "--layer", "3", "--d-sae", "1000000000", store=tmp_path / "s",
                  env={memory.ENV_VAR: "16G", "LENSLAB_ACTIVATIONS": str(tmp_path / "acts")}, check=False)
    assert out.returncode == 2 and "SAE training would need about 48,913.1 GiB" in out.stderr
    assert "Traceback" not in out.stderr and "RuntimeError" not in out.stderr
    assert not (tmp_path / "acts").exists()  # nothing was harvested


# ------------------------------------------------------------------------- refused before train_sae allocates
def test_train_sae_refuses_before_allocating(monkeypatch):
    from sae import train
    from sae.config import SAEConfig

    def boom(*a, **k):
        raise AssertionError("TrainState was built before the memory check")

    monkeypatch.setattr(train, "TrainState", boom)
    monkeypatch.setenv(memory.ENV_VAR, "64M")
    cfg = SAEConfig(d_in=32, d_sae=100_000, k=8, architecture="topk", batch_size=256, n_tokens=512)
    with pytest.raises(ConfigError, match=r"would need about 0\.\d+ GiB \(d_in=32, d_sae=100000, batch_size=256, "
                                          r"topk, float32, 1,000 tokens of activations\) but the memory limit is "
                                          r"0\.0625 GiB"):
        train.train_sae(np.zeros((1000, 32), dtype=np.float32), cfg)


def test_train_sae_counts_only_activations_it_copies():
    from sae.train import _copied_tokens

    assert _copied_tokens(torch.zeros(100, 8)) == 0  # float32, contiguous: used as is
    assert _copied_tokens(torch.zeros(8, 100).T) == 100
    assert _copied_tokens(torch.zeros(100, 8, dtype=torch.bfloat16)) == 100
    assert _copied_tokens(np.zeros((100, 8), dtype=np.float32)) == 100

    class Cache:
        acts = np.zeros((70, 8), dtype=np.float32)
        meta: dict = {}

    assert _copied_tokens(Cache()) == 70


def test_a_run_within_the_limit_trains(monkeypatch):
    from sae.config import SAEConfig
    from sae.train import train_sae

    monkeypatch.setenv(memory.ENV_VAR, "1G")
    cfg = SAEConfig(d_in=8, d_sae=32, k=4, architecture="topk", batch_size=64, n_tokens=128)
    assert train_sae(torch.randn(256, 8), cfg).steps == 2


# ------------------------------------------------------------------------- the estimate is honest
# Tensors above glibc's 32 MiB mmap threshold (so freed memory leaves the process at once): one run
# dominated by the weights (the dense ReLU path in bfloat16), and (slow) one by the step buffers,
# with the activations copied in (float32; the sparse path after the first step).
RUNS = [pytest.param(("relu", "bfloat16", 128, 70_000, 64, 4_000, 2), id="relu-bf16-weights"),
        pytest.param(("relu", "float32", 32, 16_000, 2_048, 200_000, 3), id="relu-f32-step-and-activations",
                     marks=pytest.mark.slow)]


@pytest.mark.parametrize("run", RUNS)
def test_measured_peak_rss_growth_is_below_the_estimate(run):
    out = subprocess.run([sys.executable, str(PROBE), "sae", *map(str, run)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["estimate"] / 2 <= rep["growth"] <= rep["estimate"], rep


# ------------------------------------------------------------------------- feature data
def test_feature_data_bytes_by_hand():
    from sae.features import DEFAULTS
    from sae.memory import feature_data_bytes

    s = {**DEFAULTS, "n_top": 10, "n_intervals": 5, "n_per_interval": 5, "before": 12, "after": 4, "n_bins": 40,
         "n_logits": 10}
    assert feature_data_bytes(3072, s) == 3072 * ((10 + 25) * (80 * 17 + 24) + 16 * 40 + 8 * 6 + 24 * 10)
    with pytest.raises(ConfigError, match=r"feature-data setting n_top='many' must be an integer"):
        feature_data_bytes(8, {**s, "n_top": "many"})


def test_oversized_feature_settings_are_refused_before_booting(tmp_path, monkeypatch):
    """An SAE imported from the SAELens fixture (d_sae 32); huge per-feature samples refused
    before its model (a tiny Llama) boots again."""
    from _tiny_llama import make_tiny_llama

    from analysis.sources import Source
    from sae import requests

    llama16 = make_tiny_llama(tmp_path / "llama16", d_model=16)
    imported = api.sae_import(Path(__file__).resolve().parents[1] / "data" / "saelens_tiny" / "topk", llama16,
                                  store=tmp_path / "s")

    def boom(*a, **k):
        raise AssertionError("the model was booted before the feature settings were checked")

    monkeypatch.setattr(requests, "booted", boom)
    monkeypatch.setattr(Source, "boot_bridge", boom)
    monkeypatch.setenv(memory.ENV_VAR, "1G")
    with pytest.raises(ConfigError, match=r"feature data of 32 features would need about 206\.2 GiB \(n_top=10, "
                                          r"n_intervals=5, n_per_interval=1000000, .*\) but the memory limit is 1\.0 "
                                          r"GiB \(LENSLAB_MEMORY_LIMIT=1G\); lower n_per_interval"):
        api.sae_features(imported.key, texts=TEXTS, store=tmp_path / "s", n_per_interval=1_000_000)


TEXTS = ["the tensor of a frame returns a new array", "a value with the index of each shape"]


def test_without_config_json_the_booted_width_is_checked_before_harvesting(tmp_path, monkeypatch):
    """An in-memory HF model (a ModuleSource has no hf_dir): the hook width comes from the booted
    bridge, and the refusal still comes before the corpus is harvested."""
    from transformers import AutoModelForCausalLM

    from _tiny_llama import make_tiny_llama
    from sae import harvest

    module = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama"))  # hook_z: 4 heads x 8

    def boom(*a, **k):
        raise AssertionError("the corpus was harvested before the memory estimate was checked")

    monkeypatch.setattr(harvest, "harvest", boom)
    monkeypatch.setenv(memory.ENV_VAR, "1G")
    with pytest.raises(ConfigError, match=r"\(d_in=32, d_sae=10000000, batch_size=4096, topk, float32\) but the "
                                          r"memory limit is 1\.0 GiB"):
        api.sae_train(module, 0, d_sae=10_000_000, texts=TEXTS, store=tmp_path / "s")
