"""SAELens files of SAEs at every site of ``sae.sites`` (not only ``blocks.L.attn.hook_z``): LensLab's own
``sae export`` of a resid_pre / resid_post / mlp_out SAE imports back into the store as the same SAE, and a
SAELens residual-stream SAE (a SAELens-written fixture whose hook_name is edited to a residual hook) loads
at that site with SAELens's own outputs. Independent truths: the trained SAE's tensors and config, and
SAELens's outputs on the fixture (``tests/data/saelens_tiny/expected.json``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_llama import TOY_HELD, TOY_TEXTS
from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"
TOPK = dict(d_sae=32, k=4, n_tokens=20 * 128, batch_size=128)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")  # d_model 32, 2 blocks


@pytest.fixture(autouse=True)
def _activations(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    return tmp_path / "acts"


@pytest.mark.parametrize("site", ["resid_post", "mlp_out", "resid_pre"])
def test_exported_site_sae_imports_back_as_the_same_sae(site, llama, tmp_path):
    from app import api
    from app.cli import app
    from sae.saelens_format import load_saelens

    a, b = tmp_path / "a", tmp_path / "b"
    trained = api.sae_train(str(llama), 1, site=site, texts=TOY_TEXTS, store=a, **TOPK)
    out = api.sae_export(trained.key, tmp_path / "out", store=a)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == f"blocks.1.hook_{site}" and cfg["reshape_activations"] == "none"
    assert load_saelens(out).cfg == trained.sae.cfg
    back = api.sae_import(out, str(llama), store=b)
    assert back.sae.cfg == trained.sae.cfg and back.sae.cfg.site == site and back.sae.cfg.n_heads is None
    for n in back.sae.weight_names:
        assert torch.equal(getattr(back.sae, n), getattr(trained.sae, n)), n
    assert api.sae_import(out, str(llama), 1, store=b).key == back.key  # the same SAE again: the same entry
    assert list(api.sae_list(b)["key"]) == [back.key]
    ev = api.sae_eval(back.key, texts=TOY_HELD, loss=False, store=b)  # evaluated at its own site
    assert ev.metrics["n_tokens"] > 0 and np.isfinite(ev.metrics["nmse"])
    res = CliRunner().invoke(app, ["sae", "export", str(llama), str(tmp_path / "cli"), "--layer", "1", "--store",
                                   str(a)], env={"COLUMNS": "300"})
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert f"it reads blocks.1.hook_{site}, [N, 32]" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["sae", "import", str(tmp_path / "cli"), str(llama), "--store", str(tmp_path / "c")],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert f"--site {site}" in res.output


@pytest.mark.parametrize("site, hook", [("resid_pre", "blocks.0.hook_resid_pre"),
                                        ("resid_post", "blocks.0.hook_resid_post"),
                                        ("mlp_out", "blocks.0.hook_mlp_out")])
def test_a_saelens_residual_sae_imports_at_its_site(site, hook, tmp_path):
    """A SAELens SAE reading the residual stream (the standard fixture, d_in 16, its hook renamed as SAELens's
    residual SAEs name it) is stored at that site for a model whose d_model is 16 and keeps SAELens's outputs."""
    from app import api
    from sae.saelens_format import load_saelens

    d = tmp_path / "sae"
    shutil.copytree(FIXTURE / "standard", d)
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = hook
    cfg["reshape_activations"] = "none"
    (d / "cfg.json").write_text(json.dumps(cfg))
    expected = json.loads((FIXTURE / "expected.json").read_text())
    assert load_saelens(d).cfg.site == site
    llama16 = make_tiny_llama(tmp_path / "llama16", d_model=16)
    imported = api.sae_import(d, str(llama16), store=tmp_path / "s")
    c = imported.sae.cfg
    assert (c.site, c.layer, c.hook_name, c.n_heads, c.d_in) == (site, 0, hook, None, 16)
    with torch.no_grad():
        feats = imported.sae.encode(torch.tensor(expected["input"], dtype=torch.float32))
    np.testing.assert_allclose(feats.numpy(), np.array(expected["saes"]["standard"]["feature_acts"]), atol=1e-5,
                               rtol=1e-5)


def test_a_lenslab_config_that_disagrees_with_the_hook_is_corrupt(llama, tmp_path):
    from analysis.errors import CorruptCheckpointError
    from app import api
    from sae.saelens_format import load_saelens

    trained = api.sae_train(str(llama), 1, site="resid_post", texts=TOY_TEXTS, store=tmp_path / "a", **TOPK)
    out = api.sae_export(trained.key, tmp_path / "out", store=tmp_path / "a")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_mlp_out"
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match=r"lenslab_config says .*blocks.1.hook_resid_post but cfg.json "
                                                     r"says .*blocks.1.hook_mlp_out"):
        load_saelens(out)
    cfg["metadata"]["hook_name"] = "blocks.1.ln2.hook_normalized"
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"hook_name 'blocks.1.ln2.hook_normalized' is not a hook LensLab SAEs "
                                          r"read \(blocks.L.attn.hook_z, blocks.L.hook_resid_pre"):
        load_saelens(out)


def test_an_integral_float_size_still_loads(tmp_path):
    """A writer that emits d_in 16.0 / k 4.0 (JSON floats of whole numbers) is read as the integers."""
    from sae.saelens_format import load_saelens

    d = tmp_path / "topk"
    shutil.copytree(FIXTURE / "topk", d)
    cfg = json.loads((d / "cfg.json").read_text())
    ref = load_saelens(FIXTURE / "topk")
    cfg.update(d_in=float(cfg["d_in"]), d_sae=float(cfg["d_sae"]), k=float(cfg["k"]))
    (d / "cfg.json").write_text(json.dumps(cfg))
    got = load_saelens(d)
    assert got.cfg == ref.cfg and isinstance(got.cfg.k, int) and isinstance(got.cfg.d_in, int)
