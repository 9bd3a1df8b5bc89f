"""Transcoders in SAELens format, against SAELens itself.

``tests/data/saelens_tiny/{transcoder,skip_transcoder,jumprelu_transcoder,jumprelu_skip_transcoder}/``
were written by sae-lens 6.54.12 (``benchmarks/saelens_peer.py tiny`` inside ``.venv-saelens``:
seeded random weights, d_in = d_out = 32, d_sae 48, ``Transcoder.save_model``), with SAELens's
``encode`` / ``forward`` outputs on fixed inputs in ``expected.json["transcoders"]``. Forward: we
load each and reproduce those outputs, and our writer produces the same cfg.json keys, metadata
and tensors. Reverse (slow, needs ``.venv-saelens``): SAELens's ``SAE.load_from_disk`` reads what
we write for each architecture and computes what we compute. ``lenslab sae import`` reads each
fixture, checks it against the tiny Llama (d_model 32) of ``tests/_tiny_llama.py`` and stores it
(``tests/sae/test_transcoder_import.py`` tests the stored entries).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _support import SAELENS_PYTHON, saelens_load
from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError
from sae.saelens_format import CFG_FILENAME, WEIGHTS_FILENAME, load_saelens
from sae.saelens_transcoder import (TRANSCODER_ARCHITECTURES, is_transcoder_dir, load_transcoder_saelens,
                                    save_transcoder_saelens)
from sae.transcoder import Transcoder, TranscoderConfig

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())["transcoders"]
NAMES = list(TRANSCODER_ARCHITECTURES)
OURS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True), "jumprelu_transcoder": ("jumprelu", False),
        "jumprelu_skip_transcoder": ("jumprelu", True)}


def _close(got: torch.Tensor, want, what: str) -> None:
    """float32 matmuls of width <= 48 in two torch builds: 1e-5 of the magnitude."""
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()),
                               err_msg=what)


def test_fixture_covers_every_saelens_transcoder():
    assert sorted(EXPECTED["saes"]) == sorted(NAMES)
    assert all(is_transcoder_dir(FIXTURE / n) for n in NAMES) and not is_transcoder_dir(FIXTURE / "topk")


@pytest.mark.parametrize("name", NAMES)
def test_load_reproduces_saelens_outputs(name):
    exp = EXPECTED["saes"][name]
    tc = load_transcoder_saelens(FIXTURE / name)
    c = tc.cfg
    assert exp["architecture"] == name == c.saelens_architecture
    assert (c.architecture, c.skip) == OURS[name]
    assert (c.d_in, c.d_out, c.d_sae) == (EXPECTED["d_in"], EXPECTED["d_out"], EXPECTED["d_sae"])
    assert (c.hook_in, c.hook_out) == (exp["hook_name"], exp["hook_name_out"])
    assert tc.source_label == "saelens-tiny-fixture"
    x = torch.tensor(EXPECTED["input"])
    with torch.no_grad():
        feats, out = tc.encode(x), tc(x)
    _close(feats, exp["feature_acts"], f"{name} encode")
    _close(out, exp["sae_out"], f"{name} forward")
    l0 = float((feats != 0).sum(-1).float().mean())
    assert l0 == pytest.approx(exp["l0"]) and 0 < l0 < c.d_sae  # some latents fire, not all


@pytest.mark.parametrize("name", NAMES)
def test_load_keeps_the_weights_exactly(name):
    tc = load_transcoder_saelens(FIXTURE / name)
    ref = EXPECTED["saes"][name]["checksums"]
    assert sorted(ref) == sorted(tc.weight_names)
    for pname, r in ref.items():
        p = getattr(tc, pname).detach().double()
        assert list(p.shape) == r["shape"]
        assert p.sum().item() == pytest.approx(r["sum"], rel=1e-6, abs=1e-6)
        assert p.abs().sum().item() == pytest.approx(r["abs_sum"], rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_our_files_are_what_saelens_writes(name, tmp_path):
    """Re-saving a fixture gives SAELens's cfg.json (same keys, values and metadata it wrote; ours
    adds lenslab_config and a few metadata keys) and the same tensors."""
    from safetensors.torch import load_file

    tc = load_transcoder_saelens(FIXTURE / name)
    save_transcoder_saelens(tc, tmp_path / name)
    theirs = json.loads((FIXTURE / name / CFG_FILENAME).read_text())
    ours = json.loads((tmp_path / name / CFG_FILENAME).read_text())
    assert list(ours) == list(theirs)  # SAELens's key order too
    for key in theirs:
        if key != "metadata":
            assert ours[key] == theirs[key], key
    for key, value in theirs["metadata"].items():
        assert ours["metadata"][key] == value, key
    w_theirs, w_ours = load_file(FIXTURE / name / WEIGHTS_FILENAME), load_file(tmp_path / name / WEIGHTS_FILENAME)
    assert sorted(w_ours) == sorted(w_theirs)
    for n, t in w_theirs.items():
        assert torch.equal(w_ours[n], t), n


def _our_tc(name: str, seed: int, *, d_in: int = 12, d_out: int = 10, d_sae: int = 24, layer: int = 2) -> Transcoder:
    """A seeded transcoder (d_in != d_out, so a transposed matrix cannot pass) with non-trivial weights."""
    arch, skip = OURS[name]
    tc = Transcoder(TranscoderConfig(d_in=d_in, d_out=d_out, d_sae=d_sae, architecture=arch, skip=skip, layer=layer,
                                     seed=seed, l0_coefficient=0.3))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5)
        tc.b_enc.copy_(0.3 * torch.randn(d_sae, generator=g) - 0.2)
        tc.W_dec.mul_(torch.rand(d_sae, 1, generator=g) + 0.5)
        tc.b_dec.copy_(torch.randn(d_out, generator=g))
        if skip:
            tc.W_skip.copy_(0.3 * torch.randn(d_out, d_in, generator=g))
        if arch == "jumprelu":
            tc.threshold.copy_(0.4 * torch.rand(d_sae, generator=g))
    tc.source_label = "lenslab-test"
    return tc


@pytest.mark.parametrize("name", NAMES)
def test_our_save_round_trips(name, tmp_path):
    tc = _our_tc(name, seed=4)
    save_transcoder_saelens(tc, tmp_path / "tc")
    assert json.loads((tmp_path / "tc" / CFG_FILENAME).read_text())["architecture"] == name
    back = load_transcoder_saelens(tmp_path / "tc")
    assert back.cfg == tc.cfg and back.source_label == "lenslab-test"
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), tc.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(back(x), tc(x), rtol=0, atol=0)


def test_a_file_without_our_config_loads_with_saelens_defaults(tmp_path):
    tc = _our_tc("jumprelu_skip_transcoder", seed=5)
    save_transcoder_saelens(tc, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / CFG_FILENAME).read_text())
    del cfg["metadata"]["lenslab_config"]
    (tmp_path / "tc" / CFG_FILENAME).write_text(json.dumps(cfg))
    back = load_transcoder_saelens(tmp_path / "tc")
    assert (back.cfg.architecture, back.cfg.skip, back.cfg.layer, back.cfg.d_out) == ("jumprelu", True, 2, 10)
    torch.testing.assert_close(back.threshold, tc.threshold, rtol=0, atol=0)


def test_a_topk_transcoder_cannot_be_saved_for_saelens(tmp_path):
    tc = Transcoder(TranscoderConfig(d_in=4, d_out=4, d_sae=8, k=2, skip=True))
    with pytest.raises(ConfigError, match=r"a topk transcoder has no SAELens format.*train it with "
                                          r"architecture='relu' or 'jumprelu'.*--architecture relu\|jumprelu"):
        save_transcoder_saelens(tc, tmp_path / "tc")
    assert not (tmp_path / "tc").exists()


def _edited(name: str, dest: Path, edit=None, weights=None) -> Path:
    shutil.copytree(FIXTURE / name, dest)
    if edit is not None:
        cfg = json.loads((dest / CFG_FILENAME).read_text())
        edit(cfg)
        (dest / CFG_FILENAME).write_text(json.dumps(cfg))
    if weights is not None:
        from safetensors.torch import load_file, save_file

        w = load_file(dest / WEIGHTS_FILENAME)
        weights(w)
        save_file(w, dest / WEIGHTS_FILENAME)
    return dest


@pytest.mark.parametrize("edit,weights,error,match", [
    (lambda c: c.update(apply_b_dec_to_input=True), None, ConfigError, r"apply_b_dec_to_input=true"),
    (lambda c: c["metadata"].update(hook_name="blocks.0.attn.hook_z"), None, ConfigError, r"is not an MLP input"),
    (lambda c: c["metadata"].update(hook_name_out="blocks.0.hook_mlp_out"), None, ConfigError,
     r"hook_name_out 'blocks.0.hook_mlp_out' is not blocks.1.hook_mlp_out"),
    (lambda c: c.update(normalize_activations="layer_norm"), None, ConfigError, r"normalize_activations='layer_norm'"),
    (lambda c: c.pop("d_out"), None, CorruptCheckpointError, r"missing key 'd_out'"),
    (None, lambda w: w.pop("W_skip"), CorruptCheckpointError, r"no tensor 'W_skip'"),
    (None, lambda w: w.update(W_skip=w["W_skip"][:, :5].contiguous()), CorruptCheckpointError,
     r"W_skip has shape \(32, 5\) but cfg.json implies \(32, 32\)"),
    (None, lambda w: w["threshold"].__setitem__(3, -0.1), ConfigError, r"jumprelu threshold is negative"),
    (None, lambda w: w["W_dec"].__setitem__((0, 0), float("nan")), CorruptCheckpointError, r"hold NaN or inf"),
    (lambda c: c.update(architecture=["jumprelu_skip_transcoder"]), None, ConfigError,
     r"SAELens architecture \['jumprelu_skip_transcoder'\] is not a transcoder"),
    (lambda c: c.update(metadata=["blocks.1.mlp.hook_in"]), None, CorruptCheckpointError,
     r"metadata is list .*, not a JSON object"),
    (lambda c: c.update(d_out=32.5), None, CorruptCheckpointError, r"d_out=32.5 is not an integer"),
    (lambda c: c.update(d_sae=True), None, CorruptCheckpointError, r"d_sae=True is not an integer"),
], ids=["b_dec_to_input", "hook_in", "hook_out", "normalize", "d_out", "no_skip", "skip_shape", "threshold", "nan",
        "architecture_list", "metadata_list", "d_out_fraction", "d_sae_bool"])
def test_bad_files_raise_typed_errors(edit, weights, error, match, tmp_path):
    d = _edited("jumprelu_skip_transcoder", tmp_path / "tc", edit, weights)
    with pytest.raises(error, match=match):
        load_transcoder_saelens(d)


def test_the_sae_loader_points_transcoders_to_their_loader():
    with pytest.raises(ConfigError, match=r"'skip_transcoder' is a transcoder, not an SAE; read it with "
                                          r"sae.saelens_transcoder.load_transcoder_saelens"):
        load_saelens(FIXTURE / "skip_transcoder")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


def test_sae_import_stores_each_saelens_transcoder_checked_against_the_model(llama, tmp_path):
    from app import api

    x = torch.tensor(EXPECTED["input"])
    store = tmp_path / "s"
    for name in NAMES:
        got = api.sae_import(FIXTURE / name, str(llama), store=store, device="cpu")
        assert isinstance(got, api.TranscoderRun) and got.key
        assert got.cfg.saelens_architecture == name and got.meta["saelens_architecture"] == name
        c = got.cfg
        assert got.name.endswith(f"L{c.layer} {c.kind} 48 ({c.architecture}, imported)")
        with torch.no_grad():
            _close(api.load_sae_transcoder(got.key, store=store).transcoder(x), EXPECTED["saes"][name]["sae_out"], name)
    with pytest.raises(ConfigError, match=r"reads blocks.1.mlp.hook_in but layer=0 was given"):
        api.sae_import(FIXTURE / "skip_transcoder", str(llama), 0, store=store, device="cpu")
    narrow = make_tiny_llama(tmp_path / "narrow", d_model=16)
    with pytest.raises(ShapeError, match=r"maps d_in=32 -> d_out=32 but .* block 0 MLP maps 16 -> 16"):
        api.sae_import(FIXTURE / "transcoder", str(narrow), store=store, device="cpu")
    assert len(api.sae_transcoders(store=store)) == len(NAMES)


def test_cli_import_says_what_it_stored(llama, tmp_path):
    from typer.testing import CliRunner

    from app.cli import app

    runner = CliRunner()
    store = str(tmp_path / "s")
    res = runner.invoke(app, ["sae", "import", str(FIXTURE / "jumprelu_skip_transcoder"), str(llama), "--device",
                              "cpu", "--store", store])
    assert res.exit_code == 0, (res.output, repr(res.exception))
    text = " ".join(res.output.split())
    assert "skip_transcoder (jumprelu_skip_transcoder) blocks.1.mlp.hook_in -> blocks.1.hook_mlp_out" in text
    assert "stored as" in text
    res = runner.invoke(app, ["sae", "import", str(FIXTURE / "transcoder"), str(llama), "--json", "--device", "cpu",
                              "--store", store])
    assert res.exit_code == 0, (res.output, repr(res.exception))
    out = json.loads(res.stdout)
    assert out["stored"] is True and out["config"] == load_transcoder_saelens(FIXTURE / "transcoder").cfg.to_dict()


@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason="no .venv-saelens: bash benchmarks/saelens_env.sh")
@pytest.mark.parametrize("name", NAMES)
def test_saelens_loads_our_save(name, tmp_path):
    """SAELens's SAE.load_from_disk reads what save_transcoder_saelens writes and computes what we compute."""
    tc = _our_tc(name, seed=3)
    save_transcoder_saelens(tc, tmp_path / "tc")
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(5))
    report, theirs = saelens_load(tmp_path / "tc", x.numpy(), tmp_path)
    assert (report["architecture"], report["d_in"], report["d_out"], report["d_sae"]) == (name, 12, 10, 24)
    assert (report["hook_name"], report["hook_name_out"]) == ("blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out")
    assert sorted(report["checksums"]) == sorted(tc.weight_names)
    for pname, ref in report["checksums"].items():
        assert getattr(tc, pname).detach().double().sum().item() == pytest.approx(ref["sum"], rel=1e-6, abs=1e-6)
    with torch.no_grad():
        _close(tc.encode(x), theirs["feature_acts"], "encode")
        _close(tc(x), theirs["sae_out"], "forward")
