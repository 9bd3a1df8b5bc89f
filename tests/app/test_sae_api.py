"""Attention-SAE API and CLI beyond the basics, on random tiny Llamas: checkpoint and resume
through ``api.sae_train`` and ``lenslab sae train``; settings rejected before the model boots;
SAELens export / import through the store (a round trip, a real SAELens-written SAE imported
and evaluated, an SAE whose d_in mismatches the hook); NaN in a harvested cache; a corrupt
sparsity file.

Independent truths: an uninterrupted run (the resumed one must store the same SAE, bit for
bit), SAELens's own outputs on the committed fixture (``tests/data/saelens_tiny``), the weights
and densities written and read back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _support import run_cli
from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError
from analysis.store import Store

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"
WORDS = ["tensor", "array", "frame", "model", "value", "index", "shape", "file", "path", "list", "json", "string"]
TRAIN = [f"the {a} of a {b} returns a new {c}" for a in WORDS for b in WORDS[:8] for c in WORDS[:3]][:240]
HELD = [f"a {a} with the {b} of each {a}" for a in WORDS for b in WORDS[:4]]
RELU = dict(architecture="relu", d_sae=32, n_tokens=20 * 128, batch_size=128, checkpoint_every=5)
TOPK = dict(d_sae=32, k=4, n_tokens=20 * 128, batch_size=128)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")  # 4 heads x 8: hook_z is 32 wide


@pytest.fixture(scope="module")
def llama16(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama16") / "model", d_model=16)  # 4 heads x 4, as the fixture


@pytest.fixture(autouse=True)
def _activations(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    return tmp_path / "acts"


def _interrupt_at(step: int):
    def progress(done: int, total: int, label: str) -> None:
        if label.startswith("train") and done == step:
            raise KeyboardInterrupt
    return progress


def _stored(root: Path, key: str):
    return Store(root).get_by_key(key)


def _assert_same_sae(a, b) -> None:
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a.sae, n), getattr(b.sae, n)), n


# ------------------------------------------------------------------------- checkpoint / resume
def test_interrupted_training_resumes_to_the_same_stored_sae(llama, tmp_path, _activations):
    from app import api

    ckpts = _activations / "sae-checkpoints"
    full = api.sae_train(llama, 1, texts=TRAIN, store=tmp_path / "a", **RELU)
    assert not list(ckpts.glob("*"))  # removed once the SAE is stored
    with pytest.raises(KeyboardInterrupt):
        api.sae_train(llama, 1, texts=TRAIN, store=tmp_path / "b", progress=_interrupt_at(15), **RELU)
    assert len(list(ckpts.glob("*.safetensors"))) == 1 and api.sae_list(tmp_path / "b").empty
    resumed = api.sae_train(llama, 1, texts=TRAIN, store=tmp_path / "b", **RELU)
    assert resumed.meta["training"]["resumed_from"] == 10 and resumed.meta["training"]["steps"] == 20
    assert resumed.meta["training"]["n_resampled"] == full.meta["training"]["n_resampled"]
    _assert_same_sae(resumed, full)
    np.testing.assert_array_equal(_stored(tmp_path / "b", resumed.key).arrays["log10_density"],
                                  _stored(tmp_path / "a", full.key).arrays["log10_density"])
    assert not list(ckpts.glob("*"))
    # resume=False ignores the checkpoint of an interrupted run and trains from step 0
    with pytest.raises(KeyboardInterrupt):
        api.sae_train(llama, 1, texts=TRAIN, store=tmp_path / "c", progress=_interrupt_at(15), **RELU)
    fresh = api.sae_train(llama, 1, texts=TRAIN, store=tmp_path / "c", resume=False, **RELU)
    assert fresh.meta["training"]["resumed_from"] == 0
    _assert_same_sae(fresh, full)


def test_cli_train_resumes_or_starts_over(llama, tmp_path):
    from app import api
    from app.cli import app

    store, texts = tmp_path / "store", tmp_path / "train.txt"
    texts.write_text("\n".join(TRAIN))
    args = ["sae", "train", str(llama), "--layer", "1", "--architecture", "relu", "--d-sae", "32", "--tokens",
            str(20 * 128), "--batch-size", "128", "--checkpoint-every", "5", "--texts", str(texts), "--json",
            "--store", str(store)]
    runner = CliRunner()
    for extra, resumed_from in (([], 10), (["--no-resume", "--refresh"], 0)):
        with pytest.raises(KeyboardInterrupt):  # the same request through the API, stopped after step 10's checkpoint
            api.sae_train(llama, 1, texts=TRAIN, store=store, refresh=True, progress=_interrupt_at(15), **RELU)
        res = runner.invoke(app, args + extra)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["training"]["resumed_from"] == resumed_from


# ------------------------------------------------------------------------- settings checked first
BAD_SETTINGS = [
    (dict(d_sae=0), r"d_sae=0: must be a positive integer"),
    (dict(d_sae=-4), r"d_sae=-4: must be a positive integer"),
    (dict(k=0), r"k=0: a topk SAE needs an integer 1 <= k"),
    (dict(d_sae=16, k=17), r"k=17: a topk SAE needs an integer 1 <= k <= d_sae=16"),
    (dict(architecture="vanilla"), r"architecture 'vanilla' is unknown; use 'relu' .* 'gated'"),
    (dict(expansion=0), r"expansion=0: must be an integer >= 1"),
    (dict(dtype="fp16"), r"dtype='fp16': must be one of float32, bfloat16"),
    (dict(n_tokens=0), r"n_tokens=0: must be a positive integer"),
    (dict(checkpoint_every=0), r"checkpoint_every=0 must be an integer >= 1"),
    (dict(warmup=3), r"unknown SAE setting\(s\) \['warmup'\]"),
]


@pytest.fixture
def no_boot(monkeypatch):
    """Booting a model or building the corpus fails the test: settings must be rejected first."""
    from sae import pipeline, requests

    def boom(*a, **k):
        raise AssertionError("the model was opened or the corpus built before the settings were checked")

    monkeypatch.setattr(pipeline, "open_source", boom)
    monkeypatch.setattr(requests, "booted", boom)
    monkeypatch.setattr(requests, "corpus", boom)


@pytest.mark.parametrize("kw, match", BAD_SETTINGS, ids=[str(k) for k, _ in BAD_SETTINGS])
def test_api_rejects_bad_settings_before_booting(kw, match, no_boot, tmp_path):
    from app import api

    with pytest.raises(ConfigError, match=match):
        api.sae_train("minilm", 3, store=tmp_path / "s", **kw)


@pytest.mark.parametrize("argv, match", [(["--d-sae", "0"], "d_sae=0: must be a positive integer"),
                                         (["--k", "0"], "k=0: a topk SAE needs"),
                                         (["--architecture", "vanilla"], "architecture 'vanilla' is unknown"),
                                         (["--architecture", "jumprelu", "--init-threshold", "nan"],
                                          "jumprelu_init_threshold=nan: must be a finite number >= 0"),
                                         (["--architecture", "batchtopk", "--d-sae", "64", "--k", "64"],
                                          "k=64: a batchtopk SAE needs a number 0 < k < d_sae=64"),
                                         (["--architecture", "matryoshka_batchtopk", "--widths", "8,x"],
                                          "--widths '8,x': expected comma-separated integers"),
                                         (["--checkpoint-every", "0"], "checkpoint_every=0")], ids=str)
def test_cli_rejects_bad_settings_before_booting(argv, match, no_boot, tmp_path):
    from app.cli import app

    res = CliRunner().invoke(app, ["sae", "train", "minilm", "--layer", "3", *argv, "--store", str(tmp_path / "s")])
    assert isinstance(res.exception, ConfigError) and match in str(res.exception)


def test_cli_bad_setting_is_one_line_and_exit_2(tmp_path):
    out = run_cli("sae", "train", "minilm", "--layer", "3", "--d-sae", "-1", store=tmp_path / "s", check=False)
    assert out.returncode == 2 and "d_sae=-1: must be a positive integer" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------- bad data
def test_nan_in_a_harvested_cache_is_a_typed_error(llama, tmp_path, _activations):
    from app import api
    from sae.harvest import harvest

    cache = harvest(str(llama), 1, TRAIN, max_tokens=128)  # the cache api.sae_train reuses
    acts = np.load(cache.path / "acts.npy", mmap_mode="r+")
    acts[7, 3] = np.nan
    acts.flush()
    del acts
    with pytest.raises(ShapeError, match=rf"activation cache {cache.path} holds 1 NaN/inf values; harvest again"):
        api.sae_train(llama, 1, texts=TRAIN, store=tmp_path / "s", **TOPK)
    assert api.sae_list(tmp_path / "s").empty  # nothing stored


def test_corrupt_sparsity_file_is_a_typed_error(llama16, tmp_path):
    import shutil

    from app import api
    from sae.saelens_format import load_saelens_sparsity

    d = tmp_path / "standard"
    shutil.copytree(FIXTURE / "standard", d)
    raw = (d / "sparsity.safetensors").read_bytes()
    (d / "sparsity.safetensors").write_bytes(raw[: len(raw) - 40])  # truncated: the header promises more bytes
    with pytest.raises(CorruptCheckpointError, match="sparsity.safetensors"):
        load_saelens_sparsity(d)
    with pytest.raises(CorruptCheckpointError, match="sparsity.safetensors"):
        api.sae_import(d, llama16, store=tmp_path / "s")
    (d / "sparsity.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CorruptCheckpointError):
        api.sae_import(d, llama16, store=tmp_path / "s")
    assert api.sae_list(tmp_path / "s").empty


# ------------------------------------------------------------------------- SAELens interop
def test_export_import_round_trip_through_the_store(llama, tmp_path):
    from app import api
    from app.cli import app
    from sae.saelens_format import load_saelens, load_saelens_sparsity

    a, b = tmp_path / "a", tmp_path / "b"
    trained = api.sae_train(llama, 1, texts=TRAIN, store=a, **TOPK)
    density = _stored(a, trained.key).arrays["log10_density"]
    out = api.sae_export(trained.key[:8], tmp_path / "exported", store=a)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    np.testing.assert_array_equal(load_saelens_sparsity(out).numpy(), density)
    assert torch.equal(load_saelens(out).W_dec, trained.sae.W_dec)

    back = api.sae_import(out, llama, 1, store=b)
    assert back.sae.cfg == trained.sae.cfg
    _assert_same_sae(back, trained)
    np.testing.assert_array_equal(_stored(b, back.key).arrays["log10_density"], density)
    assert api.sae_import(out, llama, store=b).key == back.key  # the same SAE again: the same entry
    assert list(api.sae_list(b)["key"]) == [back.key]
    ev = api.sae_eval(back.key, texts=HELD, store=b)
    assert ev.metrics["l0"] == pytest.approx(4.0) and np.isfinite(ev.metrics["loss_recovered"])

    # the CLI: export from the store, import into a third one; the files are the same bytes
    runner = CliRunner()
    res = runner.invoke(app, ["sae", "export", str(llama), str(tmp_path / "cli"), "--layer", "1", "--store", str(a)],
                        env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "SAELens's encode reads hook_z as [..., 4, 8]" in res.stderr and "flat [N, 32]" in res.stderr
    assert json.loads((tmp_path / "cli" / "cfg.json").read_text())["reshape_activations"] == "hook_z"
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (tmp_path / "cli" / name).read_bytes() == (out / name).read_bytes(), name
    res = runner.invoke(app, ["sae", "import", str(tmp_path / "cli"), str(llama), "--json", "--store",
                              str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["config"] == trained.sae.cfg.to_dict()
    with pytest.raises(ConfigError, match=r"reads blocks.1.attn.hook_z but layer=0 was given; import it with layer=1"):
        api.sae_import(out, llama, 0, store=b)


@pytest.mark.parametrize("name, layer", [("standard", 0), ("topk", 1), ("jumprelu", 0), ("batchtopk", 1),
                                         ("matryoshka_batchtopk", 1), ("gated", 0)])
def test_saelens_written_sae_imported_and_evaluated(name, layer, llama16, tmp_path):
    """An SAE SAELens itself wrote: stored for a model whose hook_z is 16 wide, its outputs still
    SAELens's own, then evaluated (reconstruction and next-token loss recovered)."""
    from app import api
    from sae.saelens_format import load_saelens_sparsity

    expected = json.loads((FIXTURE / "expected.json").read_text())
    imported = api.sae_import(FIXTURE / name, llama16, store=tmp_path / "s")
    cfg = imported.sae.cfg
    assert (cfg.layer, cfg.n_heads, cfg.d_head, cfg.d_sae) == (layer, 4, 4, 32)
    assert cfg.architecture == expected["saes"][name].get("trained_as", {"standard": "relu"}.get(name, name))
    with torch.no_grad():
        feats = imported.sae.encode(torch.tensor(expected["input"], dtype=torch.float32))
    np.testing.assert_allclose(feats.numpy(), np.array(expected["saes"][name]["feature_acts"]), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(_stored(tmp_path / "s", imported.key).arrays["log10_density"],
                                  load_saelens_sparsity(FIXTURE / name).numpy())
    ev = api.sae_eval(imported.key, texts=HELD, store=tmp_path / "s")
    assert ev.metrics["n_tokens"] > 0 and np.isfinite(ev.metrics["nmse"]) and np.isfinite(ev.metrics["loss_recovered"])
    table = api.sae_list(tmp_path / "s")
    assert list(table["key"]) == [imported.key] and table["nmse"][0] == pytest.approx(ev.metrics["nmse"])


def test_imported_relu_sae_label_shows_the_files_l1_coefficient(llama16, tmp_path):
    """The label of an imported ReLU SAE carries the l1_coefficient of its cfg.json (2.0 in the fixture),
    not LensLab's default 1.0; a file that records none says so."""
    from app import api

    store = tmp_path / "s"
    imported = api.sae_import(FIXTURE / "standard", llama16, store=store)
    assert imported.sae.cfg.l1_coefficient == 2.0
    assert imported.name.endswith("L0 relu 32 (l1=2.0)"), imported.name
    bare = tmp_path / "bare"
    shutil.copytree(FIXTURE / "standard", bare)
    cfg = json.loads((bare / "cfg.json").read_text())
    del cfg["metadata"]["training_architecture_details"]
    (bare / "cfg.json").write_text(json.dumps(cfg))
    with torch.no_grad():  # other weights: another store entry
        from safetensors.torch import load_file, save_file

        w = load_file(bare / "sae_weights.safetensors")
        w["b_enc"] = w["b_enc"] + 0.5
        save_file(w, bare / "sae_weights.safetensors")
    unknown = api.sae_import(bare, llama16, store=store)
    assert unknown.name.endswith("L0 relu 32 (l1 not recorded)"), unknown.name
    names = set(api.sae_list(store)["name"])
    assert imported.name in names and unknown.name in names
    res = run_cli("sae", "ls", store=store)
    assert "(l1=2.0)" in res.stdout and "(l1 not recorded)" in res.stdout and "(l1=1.0)" not in res.stdout


def test_import_rejects_an_sae_whose_d_in_mismatches_the_hook(llama, tmp_path):
    from app import api

    with pytest.raises(ShapeError, match=r"the SAE has d_in=16 but blocks.0.attn.hook_z of .* is n_heads\*d_head = "
                                         r"4\*8 = 32 wide"):
        api.sae_import(FIXTURE / "standard", llama, store=tmp_path / "s")
    assert api.sae_list(tmp_path / "s").empty
    res = run_cli("sae", "import", str(FIXTURE / "standard"), str(llama), store=tmp_path / "s", check=False)
    assert res.returncode == 2 and "d_in=16" in res.stderr and "= 32 wide" in res.stderr
