"""The SAE pages keep the user's place (issue 16): two SAEs with the same name (a re-import) are told apart
by their key prefix, a ``?sae=`` query parameter links a view, a missing metric reads "–", the feature
browser opens on the most frequent live feature (feature 0 is dead here), and the prompt page's success
message shows with its result. Two random SAELens-format SAEs imported for a tiny Llama (no training)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from _tiny_llama import make_tiny_llama

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def two_saes(tmp_path_factory):
    """Two SAEs of the same settings (so the same name) for layer 1 of a tiny Llama; the first has feature
    data, and its feature 0 never fires."""
    from app import api
    from sae.config import SAEConfig
    from sae.model import SAE
    from sae.saelens_format import save_saelens

    tmp = tmp_path_factory.mktemp("sae-place")
    llama = make_tiny_llama(tmp / "llama")
    root = tmp / "store"
    keys = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSLAB_ACTIVATIONS", str(tmp / "activations"))
        for seed in (1, 2):
            sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=4, hook_name="blocks.1.attn.hook_z",
                                layer=1, seed=seed))
            with torch.no_grad():
                sae.W_enc[:, 0] = 0.0
                sae.b_enc[0] = -100.0  # feature 0 is dead
            keys.append(api.sae_import(save_saelens(sae, tmp / f"export-{seed}"), llama, store=root).key)
        fd = api.sae_features(keys[0], store=root)  # the default corpus: the settings the page reads
    table = api.sae_list(root)
    assert table["name"].nunique() == 1 and len(set(keys)) == 2  # indistinguishable by name alone
    return SimpleNamespace(root=root, keys=keys, fd=fd, llama=llama, name=table["name"][0])


@pytest.fixture
def sae_store(two_saes, tmp_path, monkeypatch, streamlit_caches_cleared):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(two_saes.root, root)
    monkeypatch.setenv("LENSLAB_STORE", str(root))
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "activations"))
    monkeypatch.setenv("LENSLAB_ALLOWED_ROOT", str(two_saes.llama.parent))
    return root


def _open(page: str, **query: str) -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    at.query_params.update(query)
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_same_named_saes_carry_their_key_prefix_and_missing_metrics_read_dash(two_saes, sae_store):
    at = _open("sae")
    picker = at.selectbox(key="sae_pick")
    labels = list(picker.options)  # as shown
    assert len(set(labels)) == 2
    for key in two_saes.keys:
        assert f"{two_saes.name} · {key[:8]}" in labels
    table = [df for df in at.dataframe if "nmse" in df.value.columns][0]
    assert sorted(table.value["name"]) == sorted(f"{two_saes.name} · {k[:8]}" for k in two_saes.keys)
    assert table.proto.placeholder == "–"
    assert table.value["nmse"].isna().all() and table.value["n_train_tokens"].isna().all()  # not "None" strings
    assert any(two_saes.keys[0][:8] in h.value or two_saes.keys[1][:8] in h.value for h in at.subheader)


@pytest.mark.parametrize("which", [0, 1])
def test_a_query_parameter_links_an_sae_and_the_choice_follows_across_pages(two_saes, sae_store, which):
    key = two_saes.keys[which]
    at = _open("sae", sae=key[:10])
    assert at.selectbox(key="sae_pick").value == key and not at.warning
    other = two_saes.keys[1 - which]
    at.selectbox(key="sae_pick").set_value(other).run()
    assert at.query_params["sae"] == other[:12]
    at.switch_page("views/sae_prompt.py").run()
    assert at.selectbox(key="sae_prompt_pick").value == other
    at.run()
    assert at.selectbox(key="sae_prompt_pick").value == other and not at.warning
    unknown = _open("sae", sae="zzzz")
    assert any("?sae=zzzz names no SAE" in w.value for w in unknown.warning)


def test_feature_browser_opens_on_the_most_frequent_live_feature(two_saes, sae_store):
    density = np.asarray(two_saes.fd.density, dtype=float)
    assert density[0] == 0 and density.max() > 0
    at = _open("sae_features")
    assert not at.error and not at.warning, [e.value for e in at.error] + [w.value for w in at.warning]
    assert at.number_input(key="sae_feature_index").value == int(np.argmax(density)) != 0
    assert not at.info  # a live feature: no "dead" note
    at.number_input(key="sae_feature_index").set_value(0).run()
    assert any("Feature 0 is dead" in i.value for i in at.info)


def test_prompt_success_message_shows_with_its_result(two_saes, sae_store):
    at = _open("sae_prompt")
    at.text_area(key="sae_prompt_text").input("the tensor of a file returns a new json")
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.success) == 1 and at.success[0].value.startswith("Running the prompt: done in")
    assert at.get("plotly_chart")  # the result is on the same page as its message
    at.switch_page("views/sae.py").run()
    assert not at.success  # not shown again on the next page


def test_prompt_page_opens_on_the_default_prompt_without_a_click(two_saes, sae_store):
    at = _open("sae_prompt")
    assert not at.exception, [e.value for e in at.exception]
    assert at.get("plotly_chart") and not at.info  # a heatmap, not "Type a prompt and press Run"
    tokens = at.dataframe[0].value
    assert len(tokens) > 5  # one row per token of the default prompt
