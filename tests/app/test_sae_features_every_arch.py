"""The feature browser for every SAE architecture: the API behind it (``api.sae_features``) and the SAE
features page (AppTest), on SAEs SAELens itself wrote (``tests/data/saelens_tiny``: standard, topk,
jumprelu, batchtopk, matryoshka_batchtopk, gated; imported at hook_z) and on SAEs of every architecture
trained here at ``resid_post``, all on one random tiny Llama (hook_z 4 heads x 4, d_model 16).

Independent truths: each SAE's own ``encode`` of the harvested activations (density and max activation of
every feature), the decoder's per-head slice norms (head attribution, hook_z only), and the stored feature
data itself for what the page draws. Per-head attribution exists for hook_z SAEs only: at resid_post there is
no head chart, no top-head column and no top-head metric.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from _support import figure_array
from _tiny_llama import make_tiny_llama

from sae.config import ARCHITECTURES, K_ARCHITECTURES

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"
IMPORTED = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk", "gated")  # SAELens's names
WORDS = ["tensor", "array", "frame", "model", "value", "index", "shape", "file", "path", "list", "json", "string"]
TRAIN = [f"the {a} of a {b} returns a new {c}" for a in WORDS for b in WORDS[:8] for c in WORDS[:3]][:200]


def _train_kwargs(arch: str) -> dict:
    kw = dict(architecture=arch, d_sae=32, n_tokens=12 * 128, batch_size=128)
    if arch in K_ARCHITECTURES:
        kw["k"] = 4
    if arch == "matryoshka_batchtopk":
        kw["matryoshka_widths"] = (8, 32)
    return kw


@pytest.fixture(scope="module")
def browsable(tmp_path_factory):
    """A store with the six SAELens-written SAEs imported (hook_z) and one SAE of every architecture trained at
    resid_post, each with its feature data."""
    from app import api
    from sae import corpus

    base = tmp_path_factory.mktemp("every-arch")
    llama = make_tiny_llama(base / "llama16", d_model=16)
    root = base / "store"
    saes = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSLAB_ACTIVATIONS", str(base / "activations"))
        # An imported SAE's feature data defaults to the docstring corpus, which is what the page looks up; the
        # tiny model reads a short stand-in for it here (the page finds the entry under the same corpus params).
        mp.setattr(corpus, "sae_corpus", lambda split="train", **kw: [SimpleNamespace(text=t) for t in TRAIN])
        for name in IMPORTED:
            imported = api.sae_import(FIXTURE / name, llama, store=root)
            saes[f"imported-{name}"] = (imported.key, api.sae_features(imported.key, store=root))
        for arch in ARCHITECTURES:
            trained = api.sae_train(llama, 1, site="resid_post", texts=TRAIN, store=root, **_train_kwargs(arch))
            saes[f"resid_post-{arch}"] = (trained.key, api.sae_features(trained.key, texts=TRAIN, store=root))
    return SimpleNamespace(llama=llama, root=root, saes=saes, activations=base / "activations")


CASES = [f"imported-{n}" for n in IMPORTED] + [f"resid_post-{a}" for a in ARCHITECTURES]


@pytest.mark.parametrize("case", CASES)
def test_feature_data_of_every_architecture_matches_its_encoder(case, browsable, monkeypatch):
    from app import api
    from sae.harvest import harvest

    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(browsable.activations))
    key, fd = browsable.saes[case]
    sae = api.load_sae(key, store=browsable.root).sae
    cfg = sae.cfg
    assert cfg.site == ("hook_z" if case.startswith("imported") else "resid_post")
    if case.startswith("imported"):
        expected = json.loads((FIXTURE / "expected.json").read_text())["saes"][case.split("-", 1)[1]]
        assert cfg.architecture == expected.get("trained_as", {"standard": "relu"}.get(case[9:], case[9:]))
    else:
        assert cfg.architecture == case.split("-", 1)[1]
    cache = harvest(str(browsable.llama), cfg.layer, TRAIN, max_tokens=128, site=cfg.site)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(np.asarray(cache.acts, dtype=np.float32))).double().numpy()
    assert (f > 0).any(), "no feature fires: nothing to browse"
    np.testing.assert_allclose(fd.density, (f > 0).mean(0), rtol=1e-12)
    np.testing.assert_allclose(fd.max_act, f.max(0).clip(min=0), rtol=1e-5, atol=1e-7)
    i = int(np.argmax(fd.max_act))
    top = fd.contexts(i)
    assert top and top[0].activation == pytest.approx(float(f[:, i].max()), rel=1e-5)
    assert fd.logit_table(i) is not None  # the Llama has an unembedding at both sites
    if cfg.site == "hook_z":
        norms = np.linalg.norm(sae.W_dec.detach().double().numpy().reshape(cfg.d_sae, cfg.n_heads, cfg.d_head), axis=2)
        np.testing.assert_allclose(fd.head_attribution, norms / norms.sum(1, keepdims=True), rtol=1e-6)
        assert "top_head" in fd.table.columns
        assert api.sae_polysemantic(key, store=browsable.root).n_counted >= 0
    else:
        assert fd.head_attribution is None and "top_head" not in fd.table.columns


def _figures(at: AppTest) -> dict[str, dict]:
    out = {}
    for el in at.get("plotly_chart"):
        fig = json.loads(el.proto.spec)
        out[fig["layout"].get("title", {}).get("text", "")] = fig
    return out


def test_feature_page_browses_every_architecture(browsable, tmp_path, monkeypatch, streamlit_caches_cleared):
    root = tmp_path / "store"
    shutil.copytree(browsable.root, root)
    monkeypatch.setenv("LENSLAB_STORE", str(root))
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page("views/sae_features.py").run()
    assert not at.exception, [e.value for e in at.exception]
    labels = at.selectbox(key="sae_feat_pick").options  # "<name> · <key prefix>"
    assert sorted(label[-8:] for label in labels) == sorted(key[:8] for key, _ in browsable.saes.values())
    for case, (key, fd) in browsable.saes.items():
        at.selectbox(key="sae_feat_pick").set_value(key).run()
        i = int(np.argmax(fd.max_act))
        at.number_input(key="sae_feature_index").set_value(i).run()
        assert not at.exception and not at.error, (case, [e.value for e in at.exception], [e.value for e in at.error])
        figs = _figures(at)
        np.testing.assert_array_equal(figure_array(figs[f"Activations of feature {i}"]["data"][0]["y"]),
                                      fd.hist_counts[i], err_msg=case)
        heads = figs.get(f"Head attribution of feature {i}")
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["max activation"] == f"{fd.max_act[i]:.3g}", case
        if case.startswith("imported"):  # hook_z: heads
            np.testing.assert_allclose(figure_array(heads["data"][0]["y"]), fd.head_attribution[i], rtol=1e-6)
            assert "top head" in metrics, case
        else:
            assert heads is None and "top head" not in metrics, case
        assert f"Logit effects of feature {i}" in figs, case
        html = [m.value for m in at.markdown if "rgba(255, 140, 0" in m.value]
        assert len(html) >= len(fd.contexts(i)) > 0, case
