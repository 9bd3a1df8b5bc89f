"""The SAE pipeline (``sae.pipeline``, ``sae.saelens_io``) on the runner: a round trip through
``analysis.run``; entries written with the store keys LensLab always wrote (params dicts spelled out
literally here, as the code before the runner built them) served without recomputing; unknown keys
as ``NotStoredError``; one set of training defaults shared by the config, the API and the CLI; the
old names as warning aliases; the device option.

Independent truths: the literal params dicts and key recipe (sha256 of canonical JSON), the
weights and metrics planted in the store, ``dataclasses.fields`` of the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from _tiny_llama import make_tiny_llama

from analysis import run as runner
from analysis.errors import ConfigError, LensLabError
from analysis.run import NotStoredError
from analysis.store import Result, Store

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"
WORDS = ["tensor", "array", "frame", "model", "value", "index", "shape", "file", "path", "list", "json", "string"]
TRAIN = [f"the {a} of a {b} returns a new {c}" for a in WORDS for b in WORDS[:8] for c in WORDS[:3]][:240]
HELD = [f"a {a} with the {b} of each {a}" for a in WORDS for b in WORDS[:4]]
TOPK = dict(d_sae=32, k=4, n_tokens=20 * 128, batch_size=128)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")  # 4 heads x 8: hook_z is 32 wide


@pytest.fixture(autouse=True)
def _activations(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    return tmp_path / "acts"


@pytest.fixture
def boom(monkeypatch):
    """``boom(module, name)``: calling ``module.name`` fails the test (nothing may be recomputed)."""
    def install(module, name):
        def fail(*a, **k):
            raise AssertionError(f"{module.__name__}.{name} was called: the stored result was not served")
        monkeypatch.setattr(module, name, fail)
    return install


def _key(fingerprint: str, analysis: str, params: dict, code_version: str) -> str:
    """The store key as LensLab has always made it: sha256 of the canonical JSON of the four parts."""
    payload = json.dumps({"fingerprint": fingerprint, "analysis": analysis, "params": params,
                          "code_version": code_version}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _texts_id(texts: list[str]) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def _old_cfg(fp: str, label: str) -> dict:
    """``SAEConfig.to_dict()`` of ``TOPK`` on layer 1 of the tiny Llama, written out."""
    return {"d_in": 32, "d_sae": 32, "architecture": "topk", "k": 4, "l1_coefficient": 1.0, "l1_warmup_steps": None,
            "lr": 0.0012, "betas": [0.9, 0.99], "lr_warmup_steps": 0, "lr_decay_fraction": 0.0, "batch_size": 128,
            "n_tokens": 2560, "seed": 0, "dtype": "float32", "b_dec_init": "mean", "dead_window": 1000000,
            "resample_steps": None, "resample_sample": 65536, "resample_encoder_scale": 0.2, "aux_k": None,
            "aux_coefficient": 0.03125, "hook_name": "blocks.1.attn.hook_z", "layer": 1, "n_heads": 4, "d_head": 8,
            "source_fingerprint": fp, "source_label": label}


def _weights(seed: int = 3) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    w_dec = g.standard_normal((32, 32)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return {"W_enc": w_dec.T.copy(), "W_dec": w_dec, "b_enc": g.standard_normal(32).astype(np.float32) * 0.1,
            "b_dec": np.zeros(32, np.float32)}


# ------------------------------------------------------------------------- store keys
def test_entries_with_the_old_literal_keys_are_served_without_recomputing(llama, tmp_path, boom):
    """An "sae", "sae-eval" and "sae-features" entry put under the keys the old app/api_sae.py wrote
    (params spelled out here) are what sae_train / sae_eval / sae_features return: the new code
    computes the same keys and finds them (training, the evaluation harvest and the feature data
    never run)."""
    from analysis.sources import open_source
    from app import api
    from sae import features, harvest, requests, train
    from sae.features import feature_data, to_result

    st = Store(tmp_path / "store")
    src = open_source(llama)
    fp, label = src.fingerprint, src.label
    cfg = _old_cfg(fp, label)
    corpus = {"texts": _texts_id(TRAIN), "n_texts": len(TRAIN), "max_tokens": 128}
    sae_key = _key(fp, "sae", {**cfg, "corpus": corpus}, "sae-1")
    w = _weights()
    st.put(fp, "sae", {**cfg, "corpus": corpus}, "sae-1", Result(None, w, {"cfg": cfg}))

    boom(train, "train_sae")  # the entry has no request in its meta: found by its key after the harvest
    trained = api.sae_train(llama, 1, texts=TRAIN, store=st, **TOPK)
    assert trained.key == sae_key
    for n, a in w.items():
        np.testing.assert_array_equal(getattr(trained.sae, n).detach().numpy(), a)

    held = {"texts": _texts_id(HELD), "n_texts": len(HELD), "max_tokens": 128}
    eval_params = {"sae": sae_key, "corpus": held, "loss": True, "loss_docs": 64}
    st.put(fp, "sae-eval", eval_params, "sae-eval-1",
           Result(None, {"density": np.full(32, 0.125)}, {"metrics": {"l0": 4.0, "nmse": 0.25}, "sae_key": sae_key}))
    settings = {"n_top": 10, "n_intervals": 5, "n_per_interval": 5, "before": 12, "after": 4, "n_bins": 40,
                "n_logits": 10, "seed": 0}
    acts = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    planted = feature_data(trained.sae, acts, np.arange(50), np.zeros(50, int), np.arange(50))
    st.put(fp, "sae-features", {"sae": sae_key, "corpus": corpus, "settings": settings}, "sae-features-1",
           to_result(planted))
    n_entries = len(st.list())

    boom(harvest, "harvest")
    boom(requests, "booted")
    boom(features, "feature_data")
    ev = api.sae_eval(trained.key[:10], texts=HELD, store=st)
    assert (ev.key, ev.metrics["l0"], ev.metrics["nmse"]) == (sae_key, 4.0, 0.25)
    assert api.find_sae_eval(sae_key, texts=HELD, store=st).metrics["nmse"] == 0.25
    assert api.find_sae_eval(sae_key, texts=HELD, loss=False, store=st) is None  # other settings: not stored
    fd = api.sae_features(sae_key, texts=TRAIN, store=st)
    np.testing.assert_array_equal(fd.top_rows, planted.top_rows)
    np.testing.assert_array_equal(api.find_sae_features(sae_key, texts=TRAIN, store=st).density, planted.density)
    assert api.find_sae_features(sae_key, texts=TRAIN, store=st, n_top=3) is None
    assert len(st.list()) == n_entries  # nothing new was stored


def test_a_default_request_recorded_by_the_old_code_is_served_before_booting(llama, tmp_path, boom):
    """``sae_train(source, layer)`` with every default finds the entry whose meta holds the request the
    old code recorded for those defaults (written out here), without booting or harvesting."""
    from analysis.sources import open_source
    from app import api
    from sae import harvest, requests, train

    st = Store(tmp_path / "store")
    src = open_source(llama)
    request = {"version": "sae-api-1", "layer": 1, "expansion": 8, "d_sae": None,
               "fields": {"architecture": "topk", "k": 32, "n_tokens": 2000000, "batch_size": 4096, "lr": 0.0012,
                          "seed": 0, "dtype": "float32"},
               "corpus": {"split": "train", "per_package": None, "seed": 0, "eval_fraction": 0.1, "max_tokens": 128}}
    cfg = _old_cfg(src.fingerprint, src.label)
    info = st.put(src.fingerprint, "sae", {**cfg, "corpus": request["corpus"]}, "sae-1",
                  Result(None, _weights(), {"cfg": cfg, "request": request}))
    for module, name in ((requests, "booted"), (harvest, "harvest"), (train, "train_sae")):
        boom(module, name)
    assert api.sae_train(llama, 1, store=st).key == info.key
    digest = hashlib.sha256(json.dumps({"fingerprint": src.fingerprint, "request": request}, sort_keys=True,
                                       separators=(",", ":")).encode()).hexdigest()
    assert requests.checkpoint_path(src.fingerprint, request).name == f"{digest[:32]}.safetensors"  # resumable


def test_an_import_is_stored_under_the_old_key(tmp_path):
    from analysis.sources import open_source
    from app import api
    from sae.saelens_format import load_saelens

    llama16 = make_tiny_llama(tmp_path / "llama16", d_model=16)
    src = open_source(llama16)
    read = load_saelens(FIXTURE / "topk")
    tag = hashlib.sha256(b"".join(np.ascontiguousarray(getattr(read, n).detach().numpy()).tobytes()
                                  for n in ("W_enc", "W_dec", "b_enc", "b_dec"))).hexdigest()[:16]
    cfg = read.cfg.replace(n_heads=4, d_head=4, source_fingerprint=src.fingerprint, source_label=src.label).to_dict()
    params = {**cfg, "imported": tag,
              "corpus": {"split": "train", "per_package": None, "seed": 0, "eval_fraction": 0.1, "max_tokens": 128}}
    imported = api.sae_import(FIXTURE / "topk", llama16, store=tmp_path / "s")
    assert imported.key == _key(src.fingerprint, "sae", params, "sae-1")
    assert imported.meta["request"] == {"version": "sae-api-1", "layer": 1, "imported": tag,
                                        "corpus": params["corpus"]}


# ------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def prepared(llama, tmp_path_factory):
    from app import api

    root = tmp_path_factory.mktemp("pipeline") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSLAB_ACTIVATIONS", str(root.parent / "acts"))
        trained = api.sae_train(llama, 1, texts=TRAIN, store=root, **TOPK)
        ev = api.sae_eval(trained.key, texts=HELD, store=root)
    return trained, ev, root


def test_runner_round_trip(prepared, llama, boom):
    """The runner's readers (stored / load / find) see what the pipeline stored, as the same objects."""
    from app import api
    from sae import harvest, pipeline, train

    trained, ev, root = prepared
    fp = trained.sae.cfg.source_fingerprint
    assert [e.key for e in runner.stored(pipeline.SAE, fp, store=root)] == [trained.key]
    again = runner.load(trained.key, store=root)  # dispatched on the entry's analysis name
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(again.sae, n), getattr(trained.sae, n))
    assert again.meta == trained.meta
    [eval_entry] = runner.stored(pipeline.EVAL, fp, store=root)
    assert eval_entry.params["sae"] == trained.key
    loaded = runner.load(eval_entry.key, store=root, analysis="sae-eval")
    assert loaded.key == trained.key and loaded.metrics == pytest.approx(ev.metrics, nan_ok=True)
    found = runner.find(pipeline.EVAL, fp, eval_entry.params, store=root)
    np.testing.assert_array_equal(found.density, ev.density)
    with pytest.raises(NotStoredError, match="holds a 'sae-eval' result, not 'sae'"):
        runner.load(eval_entry.key, store=root, analysis=pipeline.SAE)
    boom(train, "train_sae")
    boom(harvest, "harvest")
    assert api.sae_train(llama, 1, texts=TRAIN, store=root, device="cpu", **TOPK).key == trained.key
    assert api.sae_eval(trained.key, texts=HELD, store=root).metrics == pytest.approx(ev.metrics, nan_ok=True)


def test_unknown_keys_are_not_stored_errors(prepared, tmp_path):
    from app import api

    _, _, root = prepared
    with pytest.raises(NotStoredError, match="no stored SAE with key 'ffffffff'") as info:
        api.load_sae("ffffffff", store=root)
    assert isinstance(info.value, KeyError) and isinstance(info.value, LensLabError)
    for call in (lambda: api.sae_eval("ffffffff", store=root), lambda: api.sae_features("ffffffff", store=root),
                 lambda: api.sae_prompt("ffffffff", "some text", store=root),
                 lambda: api.sae_export("ffffffff", tmp_path / "out", store=root)):
        with pytest.raises(NotStoredError, match="no stored SAE with key 'ffffffff'"):
            call()
    assert api.find_sae_eval("ffffffff", store=root) is None and api.find_sae_features("ffffffff", store=root) is None
    with pytest.raises(ConfigError, match="too short"):
        api.load_sae("ff", store=root)


def test_device_is_checked_before_any_work(tmp_path, monkeypatch, boom):
    from app import api
    from sae import pipeline, requests

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    boom(pipeline, "open_source")
    boom(requests, "booted")
    with pytest.raises(ConfigError, match="device 'cuda' was requested .* pass --device cpu"):
        api.sae_train("minilm", 3, store=tmp_path / "s", device="cuda")


# ------------------------------------------------------------------------- one set of defaults
def test_cli_api_and_config_defaults_agree():
    from app.cli.sae import sae_app
    from sae.config import TOPK_K, TRAIN_DEFAULTS, SAEConfig, TrainSettings
    from sae.pipeline import sae_train

    settings = {f.name: f.default for f in dataclasses.fields(TrainSettings) if f.name != "extra"}
    config = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
    for name in ("batch_size", "lr", "seed", "dtype"):  # the config's own defaults, not restated
        assert settings[name] == config[name], name
    assert TrainSettings(architecture="relu").sae_fields()["l1_coefficient"] == config["l1_coefficient"]
    assert TRAIN_DEFAULTS.sae_fields()["k"] == TOPK_K

    api = {n: p.default for n, p in inspect.signature(sae_train).parameters.items()
           if p.default is not inspect.Parameter.empty}
    train = typer.main.get_command(sae_app).commands["train"]
    cli = {p.name: p.default for p in train.params}
    cli_as_settings = {{"l1": "l1_coefficient"}.get(n, n): v for n, v in cli.items()}
    cli_as_settings["dtype"] = "bfloat16" if cli_as_settings.pop("bf16") else "float32"
    for name, default in settings.items():
        assert api[name] == default, f"sae_train({name}=...) defaults to {api[name]!r}, TrainSettings to {default!r}"
        assert cli_as_settings[name] == default, f"sae train option {name}: {cli_as_settings[name]!r} vs {default!r}"
    for name in ("resume", "device"):
        assert api[name] == cli[name], name


# ------------------------------------------------------------------------- old names
def test_deprecated_aliases_warn_and_behave_as_before(prepared, tmp_path):
    from app import api
    from sae.pipeline import DEPRECATED

    trained, ev, root = prepared
    assert set(DEPRECATED) == {"train_sae", "evaluate_sae", "list_saes", "stored_sae_eval", "stored_sae_features",
                               "export_saelens", "import_saelens"}
    for old, new in DEPRECATED.items():
        assert callable(getattr(api, old)) and callable(getattr(api, new)), (old, new)
    with pytest.warns(DeprecationWarning, match="list_saes is deprecated; use sae_list"):
        table = api.list_saes(root)
    assert list(table["key"]) == list(api.sae_list(root)["key"]) == [trained.key]
    with pytest.warns(DeprecationWarning, match="use find_sae_eval"):
        assert api.stored_sae_eval(trained.key, root).metrics == pytest.approx(ev.metrics, nan_ok=True)
    with pytest.warns(DeprecationWarning, match="use find_sae_features"):
        assert api.stored_sae_features(trained.key, root) is None  # none computed: the old answer
    with pytest.warns(DeprecationWarning, match="evaluate_sae is deprecated; use sae_eval"):
        assert api.evaluate_sae(trained.key, texts=HELD, store=root).metrics == pytest.approx(ev.metrics,
                                                                                             nan_ok=True)
    with pytest.warns(DeprecationWarning, match="train_sae is deprecated; use sae_train"):
        with pytest.raises(ConfigError, match="d_sae=0"):
            api.train_sae("minilm", 3, d_sae=0, store=root)
    with pytest.warns(DeprecationWarning, match="export_saelens is deprecated; use sae_export"):
        out = api.export_saelens(trained.key, tmp_path / "out", store=root)
    with pytest.warns(DeprecationWarning, match="import_saelens is deprecated; use sae_import"):
        with pytest.raises(ConfigError, match="layer=0 was given"):
            api.import_saelens(out, "minilm", 0, store=root)


def test_cli_list_and_ls_print_the_same_table(prepared):
    from app.cli import app

    _, _, root = prepared
    runner_ = CliRunner()
    outs = [runner_.invoke(app, ["sae", verb, "--json", "--store", str(root)]) for verb in ("list", "ls")]
    assert all(o.exit_code == 0 for o in outs), [(o.output, repr(o.exception)) for o in outs]
    rows = json.loads(outs[0].stdout)
    assert json.loads(outs[1].stdout) == rows and [r["key"] for r in rows] == [prepared[0].key]
    from app import api

    assert pd.Timestamp(rows[0]["created"]) == api.sae_list(root)["created"][0]  # ISO time (was unserialisable)


def test_cli_prompt_is_api_sae_prompt(prepared, llama):
    from app import api
    from app.cli import app

    trained, _, root = prepared
    text = "the tensor of a frame returns a new array"
    res = CliRunner().invoke(app, ["sae", "prompt", str(llama), text, "--layer", "1", "--top", "3", "--json",
                                   "--device", "cpu", "--store", str(root)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    view = api.sae_prompt(trained.key, text, store=root)
    assert out["key"] == trained.key and out["tokens"] == view.tokens and out["top_features"] == view.top_features(3)
    assert [r["top"] for r in out["rows"]] == list(view.token_table(3)["top"])
