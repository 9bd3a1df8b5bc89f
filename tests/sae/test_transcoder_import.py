"""SAELens transcoders stored by ``lenslab sae import`` (``sae.transcoder_import``) and written back by
``lenslab sae export`` (``api.sae_export``).

Independent truths: the tensors of the SAELens-written fixtures (``tests/data/saelens_tiny/*transcoder*``,
sae-lens 6.54.12) read with safetensors itself, and SAELens's outputs on fixed inputs
(``expected.json["transcoders"]``). "Served from the store" is proved by making every way to boot the
model fail the test; "before boot" likewise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from _support import SAELENS_PYTHON, saelens_load
from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError, ShapeError
from sae.saelens_format import CFG_FILENAME, WEIGHTS_FILENAME
from sae.saelens_transcoder import TRANSCODER_ARCHITECTURES

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())["transcoders"]
NAMES = list(TRANSCODER_ARCHITECTURES)
DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")  # 2 blocks, d_model 32 as the fixtures


@pytest.fixture
def no_boot(monkeypatch):
    """Every way to boot a model fails the test."""
    from analysis.sources import Source
    from sae import harvest, requests

    def boom(*a, **k):
        raise AssertionError("a model was booted")

    for owner, name in ((requests, "booted"), (requests, "mlm_booted"), (harvest, "boot"), (harvest, "boot_bridge"),
                        (Source, "boot_bridge")):
        monkeypatch.setattr(owner, name, boom)


def _copy(name: str, dest: Path, weights=None, edit=None) -> Path:
    shutil.copytree(FIXTURE / name, dest)
    if weights is not None:
        w = load_file(dest / WEIGHTS_FILENAME)
        weights(w)
        save_file(w, dest / WEIGHTS_FILENAME)
    if edit is not None:
        cfg = json.loads((dest / CFG_FILENAME).read_text())
        edit(cfg)
        (dest / CFG_FILENAME).write_text(json.dumps(cfg))
    return dest


def test_import_stores_each_saelens_transcoder_bit_for_bit(llama, tmp_path):
    from app import api

    store = tmp_path / "s"
    x = torch.tensor(EXPECTED["input"])
    keys = {}
    for name in NAMES:
        run = api.sae_import(FIXTURE / name, str(llama), store=store, device="cpu")
        assert isinstance(run, api.TranscoderRun) and run.cfg.saelens_architecture == name
        assert run.meta["imported_from"] == str((FIXTURE / name).resolve()) and run.metrics == {}
        keys[name] = run.key
        back = api.load_sae_transcoder(run.key, store=store)
        file = load_file(FIXTURE / name / WEIGHTS_FILENAME)
        assert sorted(file) == sorted(back.transcoder.weight_names)
        for n, t in file.items():  # the file's tensors, read by safetensors: bit for bit
            got = getattr(back.transcoder, n).detach()
            assert got.dtype == t.dtype and torch.equal(got, t), (name, n)
        with torch.no_grad():
            out = back.transcoder(x).double().numpy()
        want = np.asarray(EXPECTED["saes"][name]["sae_out"])
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert back.cfg == run.cfg and back.source_label == run.source_label
    assert len(set(keys.values())) == len(NAMES)
    listed = {e.key for e in api.stored_sae_transcoders(store=store)}
    assert listed == set(keys.values())
    table = api.sae_transcoders(store=store)
    assert set(table["key"]) == listed and table["nmse"].isna().all()  # not evaluated on import, as an SAE
    for name, key in keys.items():
        row = table.set_index("key").loc[key]
        assert row["name"].endswith("(relu, imported)" if "jumprelu" not in name else "(jumprelu, imported)")
        assert row["kind"] == ("skip_transcoder" if "skip" in name else "transcoder")
        assert row["layer"] == int(EXPECTED["saes"][name]["hook_name"].split(".")[1])


def test_the_same_files_are_served_from_the_store_and_other_weights_get_another_key(llama, tmp_path, monkeypatch):
    from app import api
    from analysis.sources import Source
    from sae import harvest, requests

    store = tmp_path / "s"
    first = api.sae_import(FIXTURE / "jumprelu_skip_transcoder", str(llama), store=store, device="cpu")

    def boom(*a, **k):
        raise AssertionError("a model was booted for files already stored")

    with monkeypatch.context() as m:
        for owner, name in ((requests, "booted"), (harvest, "boot_bridge"), (Source, "boot_bridge")):
            m.setattr(owner, name, boom)
        again = api.sae_import(FIXTURE / "jumprelu_skip_transcoder", str(llama), store=store, device="cpu")
        moved = api.sae_import(_copy("jumprelu_skip_transcoder", tmp_path / "copy"), str(llama), store=store)
    assert again.key == first.key == moved.key  # the same weights and config, wherever they lie
    other = _copy("jumprelu_skip_transcoder", tmp_path / "other",
                  weights=lambda w: w.update(b_dec=w["b_dec"] + 1e-3))
    changed = api.sae_import(other, str(llama), store=store, device="cpu")
    assert changed.key != first.key
    np.testing.assert_array_equal(changed.transcoder.b_dec.detach().numpy(),
                                  load_file(other / WEIGHTS_FILENAME)["b_dec"].numpy())
    assert [e.key for e in api.stored_sae_transcoders(store=store)] == [changed.key, first.key]


def test_bad_imports_are_refused_before_boot_and_store_nothing(llama, no_boot, tmp_path):
    from app import api

    store = tmp_path / "s"
    with pytest.raises(ConfigError, match=r"reads blocks.1.mlp.hook_in but layer=0 was given; import it with layer=1"):
        api.sae_import(FIXTURE / "skip_transcoder", str(llama), 0, store=store)
    deep = _copy("transcoder", tmp_path / "deep", edit=lambda c: c["metadata"].update(
        hook_name="blocks.5.mlp.hook_in", hook_name_out="blocks.5.hook_mlp_out"))
    with pytest.raises(ConfigError, match=r"layer 5 has no mlp_in hook \(blocks.5.mlp.hook_in\); valid layers "
                                          r"are \[0, 1\] .*; the transcoder in .*deep reads blocks.5.mlp.hook_in: "
                                          r"import it for the model it was trained on"):
        api.sae_import(deep, str(llama), store=store)
    narrow = make_tiny_llama(tmp_path / "narrow", d_model=16)
    with pytest.raises(ShapeError, match=r"maps d_in=32 -> d_out=32 but .* block 0 MLP maps 16 -> 16"):
        api.sae_import(FIXTURE / "transcoder", str(narrow), store=store)
    assert api.sae_transcoders(store=store).empty


def test_the_width_is_checked_again_on_the_booted_model(llama, tmp_path, monkeypatch):
    """Where config.json does not say d_model (here: its check switched off), the booted model's MLP is
    checked before anything is stored."""
    from app import api
    from sae import transcoder_import

    narrow = make_tiny_llama(tmp_path / "narrow", d_model=16)
    monkeypatch.setattr(transcoder_import, "check_before_boot", lambda *a, **k: None)
    with pytest.raises(ShapeError, match=r"maps d_in=32 -> d_out=32 but .* block 0 MLP maps 16 -> 16"):
        api.sae_import(FIXTURE / "transcoder", str(narrow), store=tmp_path / "s", device="cpu")
    assert api.sae_transcoders(store=tmp_path / "s").empty


def test_cli_import_says_it_stored_the_transcoder_with_its_key(llama, tmp_path):
    from app import api
    from app.cli import app

    store = tmp_path / "s"
    runner = CliRunner()
    res = runner.invoke(app, ["sae", "import", str(FIXTURE / "jumprelu_skip_transcoder"), str(llama), "--store",
                              str(store), "--device", "cpu"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, (res.output, repr(res.exception))
    (entry,) = api.stored_sae_transcoders(store=store)
    text = " ".join(res.output.split())
    assert "skip_transcoder (jumprelu_skip_transcoder) blocks.1.mlp.hook_in -> blocks.1.hook_mlp_out" in text
    assert f"stored as {entry.key}" in text and "not evaluated on import" in text
    res = runner.invoke(app, ["sae", "import", str(FIXTURE / "jumprelu_skip_transcoder"), str(llama), "--json",
                              "--store", str(store)])
    assert res.exit_code == 0, (res.output, repr(res.exception))
    out = json.loads(res.stdout)
    assert out["stored"] is True and out["key"] == entry.key and out["analysis"] == "sae-transcoder"
    assert out["config"] == api.load_sae_transcoder(entry.key, store=store).cfg.to_dict()
    listed = runner.invoke(app, ["sae", "transcoders", "--store", str(store), "--json"])
    assert listed.exit_code == 0 and [r["key"] for r in json.loads(listed.stdout)] == [entry.key]


def test_compare_page_lists_an_imported_transcoder(llama, tmp_path, monkeypatch, streamlit_caches_cleared):
    from app import api

    store = tmp_path / "store"
    run = api.sae_import(FIXTURE / "skip_transcoder", str(llama), store=store, device="cpu")
    monkeypatch.setenv("LENSLAB_STORE", str(store))
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page("views/sae_compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="cmp_layer").options == ["layer 1 mlp_out"]
    assert any("1 transcoder(s) of block 1" in c.value for c in at.caption)
    (table,) = [df.value for df in at.dataframe if "nmse_mask" in df.value.columns]
    assert list(table["name"]) == [run.name] and run.name.endswith("skip_transcoder 48 (relu, imported)")


# ------------------------------------------------------------------------- export
SMALL = {"k": 4, "expansion": 2, "n_tokens": 10 * 128, "batch_size": 128, "loss": False, "device": "cpu"}


def _x(d_in: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(11, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_export_of_an_imported_transcoder_round_trips(name, llama, tmp_path):
    from app import api
    from sae.saelens_transcoder import load_transcoder_saelens

    store = tmp_path / "s"
    run = api.sae_import(FIXTURE / name, str(llama), store=store, device="cpu")
    out = api.sae_export(run.key[:10], tmp_path / "out", store=store)
    assert sorted(p.name for p in out.iterdir()) == [CFG_FILENAME, WEIGHTS_FILENAME]
    theirs, ours = load_file(FIXTURE / name / WEIGHTS_FILENAME), load_file(out / WEIGHTS_FILENAME)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[n], t) for n, t in theirs.items())
    cfg = json.loads((out / CFG_FILENAME).read_text())
    assert cfg["architecture"] == name and cfg["metadata"]["model_name"] == run.source_label
    back = load_transcoder_saelens(out)
    assert back.cfg == run.cfg
    x = _x(run.cfg.d_in)
    with torch.no_grad():
        assert torch.equal(back.encode(x), run.transcoder.encode(x)) and torch.equal(back(x), run.transcoder(x))
    assert api.sae_import(out, str(llama), store=store).key == run.key  # the same transcoder: the same entry


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_export_of_a_trained_transcoder_round_trips(architecture, llama, tmp_path):
    from _tiny_llama import TOY_TEXTS

    from app import api
    from app.cli import app
    from sae.saelens_transcoder import load_transcoder_saelens

    store = tmp_path / "s"
    run = api.sae_transcoder(str(llama), 1, skip=True, architecture=architecture, texts=TOY_TEXTS, store=store,
                             **SMALL)
    out = api.sae_export(run.key, tmp_path / "out", store=store)
    back = load_transcoder_saelens(out)
    assert back.cfg == run.cfg and back.source_label == run.source_label
    x = _x(run.cfg.d_in)
    with torch.no_grad():
        assert torch.equal(back(x), run.transcoder(x)) and torch.equal(back.encode(x), run.transcoder.encode(x))
    res = CliRunner().invoke(app, ["sae", "export", str(llama), str(tmp_path / "cli"), "--sae", run.key[:12],
                                   "--store", str(store)], env={"COLUMNS": "300"})
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert f"transcoder {run.key[:12]} written to" in " ".join(res.output.split())
    for f in (CFG_FILENAME, WEIGHTS_FILENAME):
        assert (tmp_path / "cli" / f).read_bytes() == (out / f).read_bytes(), f


def test_a_topk_transcoder_is_refused_with_the_fix(llama, tmp_path, capsys):
    from _tiny_llama import TOY_TEXTS

    from app import api
    from app.cli import app
    from app.cli.exit_codes import run as run_cli

    store = tmp_path / "s"
    run = api.sae_transcoder(str(llama), 0, texts=TOY_TEXTS, store=store, **SMALL)
    with pytest.raises(ConfigError, match=rf"transcoder {run.key[:12]} \(.*\) is a topk transcoder, which has no "
                                          r"SAELens format.*train it with --architecture relu\|jumprelu"):
        api.sae_export(run.key, tmp_path / "out", store=store)
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    code = run_cli(app, ["sae", "export", str(llama), str(tmp_path / "cli"), "--sae", run.key[:12], "--store",
                         str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--architecture relu|jumprelu" in " ".join(err.split())
    assert not (tmp_path / "cli").exists()


@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason="no .venv-saelens: bash benchmarks/saelens_env.sh")
def test_saelens_loads_an_exported_stored_transcoder(llama, tmp_path):
    """SAELens's SAE.load_from_disk reads `sae export` of a stored (trained) jumprelu skip transcoder and
    computes what the stored one computes."""
    from _tiny_llama import TOY_TEXTS

    from app import api

    store = tmp_path / "s"
    run = api.sae_transcoder(str(llama), 1, skip=True, architecture="jumprelu", l0_coefficient=0.01,
                             texts=TOY_TEXTS, store=store, **SMALL)
    out = api.sae_export(run.key, tmp_path / "tc", store=store)
    x = _x(run.cfg.d_in, seed=5)
    report, theirs = saelens_load(out, x.numpy(), tmp_path)
    assert (report["architecture"], report["d_in"], report["d_out"]) == ("jumprelu_skip_transcoder", 32, 32)
    assert (report["hook_name"], report["hook_name_out"]) == ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
    with torch.no_grad():
        feats, pred = run.transcoder.encode(x).double().numpy(), run.transcoder(x).double().numpy()
    assert (feats != 0).any()  # some latents fire: the thresholds are exercised
    for got, want in ((feats, theirs["feature_acts"]), (pred, theirs["sae_out"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))
