"""Attention-SAE surfaces: the API's store caching (checked against direct computations on the
model), the `lenslab sae` commands (subprocess) and the three dashboard pages (AppTest), on a
random tiny Llama and an SAE trained on a few hundred short texts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from _support import figure_array, run_cli
from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError
from analysis.run import NotStoredError

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
WORDS = ["tensor", "array", "frame", "model", "value", "index", "shape", "file", "path", "list", "json", "string"]
TRAIN = [f"the {a} of a {b} returns a new {c}" for a in WORDS for b in WORDS[:8] for c in WORDS[:3]][:240]
HELD = [f"a {a} with the {b} of each {a}" for a in WORDS for b in WORDS[:4]]
SAE_SETTINGS = {"d_sae": 64, "k": 4, "n_tokens": 24_000, "batch_size": 256}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def prepared(llama, tmp_path_factory):
    """A store holding one trained, evaluated and explained SAE (layer 1 of the tiny Llama)."""
    from app import api

    root = tmp_path_factory.mktemp("sae") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSLAB_ACTIVATIONS", str(root.parent / "activations"))
        trained = api.sae_train(llama, 1, texts=TRAIN, store=root, **SAE_SETTINGS)
        ev = api.sae_eval(trained.key, texts=HELD, store=root)
        fd = api.sae_features(trained.key, texts=TRAIN, store=root)
    return SimpleNamespace(root=root, key=trained.key, trained=trained, ev=ev, fd=fd)


# ------------------------------------------------------------------------------------ API
def test_api_serves_stored_results_without_recomputing(prepared, llama, monkeypatch):
    from app import api
    from sae import features, train

    def boom(*a, **k):
        raise AssertionError("recomputed instead of served from the store")

    monkeypatch.setattr(train, "train_sae", boom)
    monkeypatch.setattr(features, "feature_data", boom)
    again = api.sae_train(llama, 1, texts=TRAIN, store=prepared.root, **SAE_SETTINGS)
    assert again.key == prepared.key
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(again.sae, name), getattr(prepared.trained.sae, name), rtol=0, atol=0)
    fd = api.sae_features(prepared.key, texts=TRAIN, store=prepared.root)
    np.testing.assert_array_equal(fd.top_rows, prepared.fd.top_rows)
    table = api.sae_list(prepared.root)
    assert list(table["key"]) == [prepared.key] and bool(table["features"][0])
    for m in ("l0", "nmse", "explained_variance_saelens", "explained_variance_sklearn", "loss_recovered",
              "dead_fraction", "dense_fraction"):
        assert table[m][0] == pytest.approx(prepared.ev.metrics[m], nan_ok=True)
    assert prepared.ev.metrics["l0"] == pytest.approx(4.0)  # topk: exactly k latents per token


def test_api_features_and_prompt_match_direct_computations(prepared, llama, tmp_path, monkeypatch):
    from analysis.sources import open_source
    from sae.features import feature_data, logit_effects
    from sae.harvest import harvest
    from sae.readout import attention_output, unembedding

    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    sae, fd = prepared.trained.sae, prepared.fd
    src = open_source(llama)
    cache = harvest(src, 1, TRAIN, max_tokens=128)
    direct = feature_data(sae, cache.acts, cache.token_ids, cache.doc_ids, cache.positions)
    np.testing.assert_array_equal(fd.top_rows, direct.top_rows)
    np.testing.assert_array_equal(fd.density, direct.density)
    W_U, _ = unembedding(src)
    ids = logit_effects(sae.W_dec.detach(), attention_output(src, 1, 4), W_U, fd.logit_pos_ids.shape[1])[0]
    np.testing.assert_array_equal(fd.logit_pos_ids, ids)
    # top-context texts come from the tokenizer
    tok = src.boot_bridge().tokenizer
    i = int(np.argmax(fd.density))
    ctx = fd.contexts(i)[0]
    assert ctx.tokens[ctx.centre] == tok.decode([int(cache.token_ids[ctx.row])])

    # prompt view: activations of hook_z read by the bridge's own cache, then the DFA identity
    from app import api

    text = "the tensor of a frame returns a new array"
    pv = api.sae_prompt(prepared.key, text, store=prepared.root)
    bridge = src.boot_bridge()
    raw = tok(text)["input_ids"]
    ids_ = raw if raw[:1] == [tok.bos_token_id] else [tok.bos_token_id, *raw]
    _, cache_ = bridge.run_with_cache(torch.tensor([ids_]), names_filter="blocks.1.attn.hook_z")
    z = cache_["blocks.1.attn.hook_z"][0]
    assert pv.tokens == [tok.decode([t]) for t in ids_]
    torch.testing.assert_close(torch.from_numpy(pv.acts), sae.encode(z.reshape(len(ids_), -1)).detach(),
                               rtol=1e-4, atol=1e-5)
    f = pv.top_features(1)[0]
    pre = sae.pre_acts(z.reshape(len(ids_), -1)).detach().double().numpy()[:, f]
    bias = float(sae.b_enc.detach()[f]) - float(sae.b_dec.detach().double() @ sae.W_enc.detach().double()[:, f])
    np.testing.assert_allclose(pv.dfa(f).sum(axis=1), pre - bias, rtol=1e-4, atol=1e-4)


def test_api_bad_input_is_a_typed_error(prepared, llama):
    from app import api

    with pytest.raises(ConfigError, match=r"no stored SAE for .* layer 0 \(stored SAEs of .* are at layers \[1\]\)"):
        api.find_sae(llama, 0, store=prepared.root)
    with pytest.raises(NotStoredError, match="no stored SAE with key 'ffffffff'"):
        api.load_sae("ffffffff", store=prepared.root)
    with pytest.raises(ConfigError, match=r"layer 5 has no attention hook_z; valid layers are \[0, 1\]"):
        api.sae_train(llama, 5, texts=TRAIN, store=prepared.root, **SAE_SETTINGS)
    with pytest.raises(ConfigError, match=r"k applies to topk, batchtopk, matryoshka_batchtopk SAEs only"):
        api.sae_train(llama, 1, architecture="relu", k=3, store=prepared.root)
    with pytest.raises(ConfigError, match="feature index 64 is out of range: this SAE has 64 features"):
        prepared.fd.contexts(64)
    with pytest.raises(ConfigError, match="was trained on texts given by the caller; pass texts="):
        api.sae_eval(prepared.key, store=prepared.root, refresh=True)
    with pytest.raises(ConfigError, match="the prompt is empty"):
        api.sae_prompt(prepared.key, "  ", store=prepared.root)


def test_context_html_escapes_every_token():
    from app.charts_sae import _entities as _entities_of
    from app.charts_sae import context_html

    import html

    tokens = ["<script>", "a&b", '"q"', "\\", "*x*", "$y$", ":math:"]
    out = context_html(tokens, np.array([2.0, 1.0, 0.0, 0, 0, 0, 0]), 2.0, centre=0)
    assert "<script>" not in out and "&#60;script&#62;" in out
    for tok in tokens:  # markdown / LaTeX / emoji characters survive only as entities
        assert html.unescape(_entities_of(tok)) == tok and _entities_of(tok) in out
    assert not any(ch in out.split(">", 1)[1] for ch in "\\*$`")
    assert "rgba(255, 140, 0, 1.000)" in out and "rgba(255, 140, 0, 0.500)" in out and "underline" in out


# ------------------------------------------------------------------------------------ CLI
def test_cli_train_eval_features(llama, tmp_path):
    from app import api

    store = tmp_path / "store"
    train_file, held_file = tmp_path / "train.txt", tmp_path / "held.txt"
    train_file.write_text("\n".join(TRAIN))
    held_file.write_text("\n".join(HELD))
    common = ["--layer", "1"]
    out = json.loads(run_cli("sae", "train", str(llama), *common, "--d-sae", "48", "--k", "3", "--tokens", "8000",
                             "--batch-size", "256", "--texts", str(train_file), "--json", store=store).stdout)
    assert out["config"]["d_sae"] == 48 and out["config"]["k"] == 3 and out["config"]["n_heads"] == 4
    ev = json.loads(run_cli("sae", "eval", str(llama), *common, "--texts", str(held_file), "--json",
                            store=store).stdout)
    assert ev["key"] == out["key"] and ev["metrics"]["l0"] == pytest.approx(3.0)
    assert ev["metrics"] == pytest.approx(api.find_sae_eval(out["key"], store=store).metrics, nan_ok=True)
    feats = json.loads(run_cli("sae", "features", str(llama), *common, "--texts", str(train_file), "-f", "5",
                               "--top", "2", "--json", store=store).stdout)
    fd = api.find_sae_features(out["key"], store=store)
    want = fd.contexts(5)[:2]
    assert [c["tokens"] for c in feats["feature"]["contexts"]] == [c.tokens for c in want]
    assert feats["feature"]["head_attribution"] == pytest.approx(fd.head_attribution[5].tolist())
    assert feats["feature"]["boosted"] == list(fd.logit_table(5)["boosted"])
    bad = run_cli("sae", "eval", str(llama), "--layer", "0", store=store, check=False)
    assert bad.returncode == 2 and "are at layers [1]" in bad.stderr and "Traceback" not in bad.stderr
    # the text output and a bad feature index, in process (no subprocess start-up)
    from typer.testing import CliRunner

    from app.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["sae", "features", str(llama), *common, "-f", "2", "--store", str(store)],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "heads: top features and their families" in res.output and "feature 2: density" in res.output
    assert "boosts:" in res.output
    res = runner.invoke(app, ["sae", "features", str(llama), *common, "-f", "999", "--store", str(store)])
    assert isinstance(res.exception, ConfigError)
    assert "feature index 999 is out of range: this SAE has 48 features" in str(res.exception)
    res = runner.invoke(app, ["sae", "ls", "--store", str(store)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and out["key"][:12] in res.output


def test_evaluations_stored_before_the_explained_variance_split_still_load(prepared, tmp_path):
    """An "sae-eval" entry written before the split holds the sklearn value as ``explained_variance``:
    the API, `sae ls` and `sae eval` read it under today's names, with the SAELens value = 1 - NMSE."""
    from typer.testing import CliRunner

    from analysis.store import Result, Store
    from app import api
    from sae.pipeline import EVAL
    from app.cli import app

    root = tmp_path / "store"
    shutil.copytree(prepared.root, root)
    st = Store(root)
    metrics = {k: v for k, v in prepared.ev.metrics.items() if not k.startswith("explained_variance_s")}
    metrics["explained_variance"] = 0.75
    result = Result(None, {"density": prepared.ev.density}, {"metrics": metrics, "sae_key": prepared.key})
    st.put(prepared.trained.sae.cfg.source_fingerprint, EVAL.name, {"sae": prepared.key, "old": True},
           EVAL.code_version, result)
    held = api.find_sae_eval(prepared.key, store=st)
    assert "explained_variance" not in held.metrics and held.metrics["explained_variance_sklearn"] == 0.75
    assert held.metrics["explained_variance_saelens"] == pytest.approx(1 - metrics["nmse"], rel=1e-12)
    row = api.sae_list(st).iloc[0]
    assert row["explained_variance_sklearn"] == 0.75
    assert row["explained_variance_saelens"] == pytest.approx(1 - metrics["nmse"], rel=1e-12)
    res = CliRunner().invoke(app, ["sae", "ls", "--store", str(root)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "EV SAELens" in res.output and "EV sklearn" in res.output and "0.75" in res.output
    assert "EV SAELens = 1 - NMSE" in res.output


def test_cli_eval_no_loss_skips_loss_recovered(prepared, llama, tmp_path, monkeypatch):
    """`lenslab sae eval --no-loss` never builds a loss function (for MiniLM: never trains its MLM head)."""
    from typer.testing import CliRunner

    from app.cli import app
    from sae import lm_loss

    def boom(*a, **k):
        raise AssertionError("loss recovered was computed despite --no-loss")

    monkeypatch.setattr(lm_loss, "loss_fn_for", boom)
    root = tmp_path / "store"
    shutil.copytree(prepared.root, root)
    held = tmp_path / "held.txt"
    held.write_text("\n".join(HELD[:20]))
    args = ["sae", "eval", str(llama), "--layer", "1", "--texts", str(held), "--no-loss", "--store", str(root)]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["metrics"]
    assert "loss_recovered" not in m and m["explained_variance_saelens"] == pytest.approx(1 - m["nmse"], rel=1e-12)
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "explained variance (SAELens: 1 - NMSE)" in res.output
    assert "explained variance (sklearn: variance-weighted)" in res.output
    assert "loss recovered not measured" in res.output


# ------------------------------------------------------------------------------------ dashboard
def open_page(name: str) -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page(f"views/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def figures(at: AppTest) -> dict[str, dict]:
    out = {}
    for el in at.get("plotly_chart"):
        fig = json.loads(el.proto.spec)
        out[fig["layout"].get("title", {}).get("text", "")] = fig
    return out


@pytest.fixture
def filled_store(prepared, tmp_path, monkeypatch, streamlit_caches_cleared):
    """A copy of the prepared store, read by the dashboard under test."""
    from analysis.store import Store

    root = tmp_path / "filled-store"
    shutil.copytree(prepared.root, root)
    monkeypatch.setenv("LENSLAB_STORE", str(root))
    return Store(root)


@pytest.mark.parametrize("page,command", [("sae", "lenslab sae train minilm --layer 3"),
                                          ("sae_features", "lenslab sae features minilm --layer 3"),
                                          ("sae_prompt", "lenslab sae train minilm --layer 3")])
def test_pages_empty_store_say_how_to_start(dashboard_store, page, command):
    at = open_page(page)
    assert any(command in i.value for i in at.info) and not at.get("plotly_chart")


def test_sae_list_page_shows_metrics_density_and_head_families(filled_store, prepared):
    from app import api

    at = open_page("sae")
    assert not at.error, [e.value for e in at.error]
    table = [df.value for df in at.dataframe if "nmse" in df.value.columns][0]
    assert table["nmse"][0] == pytest.approx(prepared.ev.metrics["nmse"])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["L0"] == f"{prepared.ev.metrics['l0']:.1f}"
    assert metrics["NMSE"] == f"{prepared.ev.metrics['nmse']:.3f}"
    hist = [f for t, f in figures(at).items() if t.startswith("Feature density")][0]
    density = prepared.ev.density
    np.testing.assert_allclose(np.sort(figure_array(hist["data"][0]["x"])), np.sort(np.log10(density[density > 0])))
    assert f"({int((density == 0).sum())} dead of 64)" in hist["layout"]["title"]["text"]
    poly = [df.value for df in at.dataframe if "n_families" in df.value.columns][0]
    want = api.sae_polysemantic(prepared.key, store=prepared.root).table
    assert list(poly["n_families"]) == list(want["n_families"]) and len(poly) == 4


def test_feature_browser_shows_contexts_histogram_heads_and_logits(filled_store, prepared):
    fd, sae = prepared.fd, prepared.trained.sae
    i = int(np.argmax(fd.max_act))
    at = open_page("sae_features")
    at.number_input(key="sae_feature_index").set_value(i).run()
    assert not at.exception and not at.error
    figs = figures(at)
    np.testing.assert_array_equal(figure_array(figs[f"Activations of feature {i}"]["data"][0]["y"]), fd.hist_counts[i])
    heads = figure_array(figs[f"Head attribution of feature {i}"]["data"][0]["y"])
    norms = np.linalg.norm(sae.W_dec.detach().double().numpy()[i].reshape(4, 8), axis=1)
    np.testing.assert_allclose(heads, norms / norms.sum(), rtol=1e-6)
    bars = figs[f"Logit effects of feature {i}"]["data"][0]
    np.testing.assert_allclose(sorted(figure_array(bars["x"])), sorted(np.r_[fd.logit_pos_values[i],
                                                                             fd.logit_neg_values[i]]), rtol=1e-6)
    html = [m.value for m in at.markdown if "rgba(255, 140, 0" in m.value]
    assert len(html) >= len(fd.contexts(i)) and "rgba(255, 140, 0, 1.000)" in html[0]  # the top token: full intensity
    at.number_input(key="sae_feature_index").set_value(640).run()
    assert not at.exception and any("feature index 640 is out of range" in e.value for e in at.error)


def test_feature_browser_density_search_lists_the_features_in_range(filled_store, prepared):
    fd = prepared.fd
    density = np.asarray(fd.density, dtype=float)
    log10 = np.log10(np.where(density > 0, density, np.nan))
    at = open_page("sae_features")
    lo, hi = at.slider(key="sae_density_range").value
    assert lo <= np.nanmin(log10) and np.nanmax(log10) <= hi  # the full range of live features
    mid = float(np.round(np.nanmedian(log10), 1))
    at.slider(key="sae_density_range").set_range(lo, mid).run()
    at.radio(key="sae_sort").set_value("density").run()
    assert not at.exception and not at.error
    hits = [df.value for df in at.dataframe if "log10_density" in df.value.columns][0]
    want = np.flatnonzero((density > 0) & (log10 <= mid + 1e-9))
    want = want[np.argsort(-density[want], kind="stable")][:200]
    assert 0 < len(want) < int((density > 0).sum())  # the range leaves some live features out
    assert sorted(hits["feature"]) == sorted(want.tolist())
    assert np.all(np.diff(hits["density"].to_numpy()) <= 0)  # densest first
    dead = int((density == 0).sum())
    assert any(f"{len(want)} live features in range ({dead} dead)" in c.value for c in at.caption)
    at.radio(key="sae_sort").set_value("feature").run()
    hits = [df.value for df in at.dataframe if "log10_density" in df.value.columns][0]
    assert list(hits["feature"]) == sorted(want.tolist())


def test_prompt_page_shows_features_per_token_and_dfa(filled_store, prepared):
    from app import api

    at = open_page("sae_prompt")
    text = "a frame of the model returns a new value"
    at.text_area(key="sae_prompt_text").input(text)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    pv = api.sae_prompt(prepared.key, text, store=prepared.root)
    fired = pv.top_features(20)
    heat = figures(at)["Features firing on the prompt"]["data"][0]
    np.testing.assert_allclose(figure_array(heat["z"]), pv.acts[:, fired], rtol=1e-6)
    f = at.selectbox(key="sae_prompt_feature").value
    dfa = figures(at)[f"Direct feature attribution by head, feature {f}"]["data"][0]
    np.testing.assert_allclose(figure_array(dfa["z"]), pv.dfa(f), rtol=1e-6, atol=1e-9)


def test_sae_page_form_reports_bad_input(filled_store, llama, tmp_path, monkeypatch):
    at = open_page("sae")
    at.text_input(key="sae_source").input(str(llama))
    at.number_input(key="sae_layer").set_value(7)
    [b for b in at.button if b.label == "Train"][0].click().run()
    assert not at.exception and any("valid layers are [0, 1]" in e.value for e in at.error)
    monkeypatch.setenv("LENSLAB_ALLOWED_ROOT", str(tmp_path / "elsewhere"))  # the model is outside it now
    at.number_input(key="sae_layer").set_value(1)
    [b for b in at.button if b.label == "Train"][0].click().run()
    assert not at.exception and any("--allowed-root" in e.value for e in at.error)
    assert len(filled_store.list(analysis="sae")) == 1  # nothing trained
