"""The dashboard says what happened when it happened (issue 16): a success message shows with the action
that earned it, steered text wraps, an out-of-range budget is explained, a dose-response stored with
another α grid (the CLI's) is shown with its grid; and the allowed Hugging Face root is found the way
huggingface_hub finds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from _support import figure_array
from _tiny_llama import make_tiny_llama

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 120

pytestmark = pytest.mark.usefixtures("streamlit_caches_cleared")


def _open(page: str) -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# ------------------------------------------------------------------------------------ selection
@pytest.fixture
def spectra_store(dashboard_store, tmp_path):
    from app import api

    rng = np.random.default_rng(4)
    weights = {f"model.layers.{i}.mlp.up_proj.weight": torch.from_numpy(rng.standard_normal((12, 8)).astype(np.float32))
               for i in range(5)}
    save_file(weights, str(tmp_path / "m.safetensors"))
    api.analyze(str(tmp_path / "m.safetensors"), store=dashboard_store)
    return dashboard_store


@pytest.mark.parametrize("kind,value,words", [
    ("% of tensors", 150.0, "A budget of 150% of tensors is outside 0–100%"),
    ("% of params", 0.0, "A budget of 0% of params is outside 0–100%"),
    ("count", 0, "A budget of 0 tensors selects nothing"),
])
def test_selection_budget_out_of_range_is_explained(spectra_store, kind, value, words):
    at = _open("selection")
    at.radio(key="budget_kind").set_value(kind).run()
    key = {"% of tensors": "budget_fraction", "% of params": "budget_param_fraction", "count": "budget_count"}[kind]
    widget = at.number_input(key=key)
    assert not widget.proto.has_max and not widget.proto.has_min  # no silent red outline in the browser
    widget.set_value(value).run()
    assert not at.exception
    assert len(at.error) == 1 and words in at.error[0].value
    assert not at.get("download_button") and not at.metric  # no stale 20% selection under the error
    if value == 150.0:
        assert "pick **count**" in at.error[0].value
        at.number_input(key=key).set_value(40.0).run()
        assert not at.error and any(m.value == "2 of 5" for m in at.metric)


# ---------------------------------------------------------------------------------- HF cache root
def _hub_paths(env: dict[str, str]) -> tuple[Path, Path]:
    """huggingface_hub's own HF_HOME and HF_HUB_CACHE under ``env`` (resolved at its import, so a subprocess)."""
    code = "import json, huggingface_hub.constants as c; print(json.dumps([c.HF_HOME, c.HF_HUB_CACHE]))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    home, hub = json.loads(out.strip().splitlines()[-1])
    return Path(home).resolve(), Path(hub).resolve()


@pytest.mark.parametrize("setting", ["none", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE", "HF_HOME=~"])
def test_allowed_hf_root_is_where_huggingface_hub_looks(setting, tmp_path, monkeypatch):
    from app.allowed_paths import ENV_VAR, allowed_roots

    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", ENV_VAR}}
    env["HOME"] = str(tmp_path / "home")
    if setting == "HF_HOME=~":
        env["HF_HOME"] = "~/hf-elsewhere"
    elif setting != "none":
        env[setting] = str(tmp_path / setting.lower())
    for k in ("HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", ENV_VAR):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    home, hub = _hub_paths(env)
    roots = allowed_roots()
    assert home in roots and hub.is_relative_to(home) or hub in roots, (setting, home, hub, roots)
    assert any(hub.is_relative_to(r) for r in roots)
    if setting == "none":
        assert home == (tmp_path / "home" / ".cache" / "huggingface").resolve()


# ------------------------------------------------------------------------------------ steering
@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("feedback") / "llama")


@pytest.fixture
def extracted(dashboard_store, lm_dir, monkeypatch):
    from app import api

    monkeypatch.setenv("LENSLAB_ALLOWED_ROOT", str(lm_dir.parent))
    return api.steer_extract(lm_dir, "numpy-torch", store=dashboard_store)


def test_steering_success_messages_show_with_their_action_and_text_wraps(extracted, dashboard_store):
    at = _open("steering")
    at.selectbox(key="steer_scale").set_value("norm").run()
    at.button(key="steer_layers").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [s.value for s in at.success] and at.success[0].value.startswith("Sweeping layers: done in")
    assert any(f.startswith("Layer sweep") for f in _titles(at))  # the stored sweep, read back after the rerun
    at.text_input(key="steer_prompt").input("Return a new").run()
    assert not at.success  # shown once, not again one action later
    at.button(key="steer_apply").click().run()
    assert not at.exception and not at.success
    blocks = at.code
    assert len(blocks) == 2 and all(c.proto.wrap_lines for c in blocks)
    at.button(key="steer_dose").click().run()
    assert not at.exception and at.success and at.success[0].value.startswith("Steering: done in")


def _titles(at: AppTest) -> list[str]:
    return [json.loads(el.proto.spec)["layout"]["title"]["text"] for el in at.get("plotly_chart")]


def test_dose_response_from_the_cli_grid_is_shown_with_its_grid(extracted, dashboard_store, lm_dir):
    from app import api

    cli_grid = (-0.6, -0.3, 0.0, 0.3, 0.6)  # `lenslab steer dose ... --scale norm --alphas=-0.6,-0.3,0,0.3,0.6`
    vec = api.steer_vector(extracted, 1, "mean_diff")
    dr = api.steer_dose(lm_dir, vec, "numpy-torch", alphas=cli_grid, scale="norm", store=dashboard_store)
    at = _open("steering")
    at.selectbox(key="steer_layer").set_value(1).run()
    at.selectbox(key="steer_scale").set_value("norm").run()
    assert not at.exception and not at.error
    assert not any("Not measured yet" in c.value for c in at.caption)
    assert any("Stored with another α grid (-0.6, -0.3, +0, +0.3, +0.6)" in c.value for c in at.caption)
    dose = [json.loads(el.proto.spec) for el in at.get("plotly_chart")
            if json.loads(el.proto.spec)["layout"]["title"]["text"].startswith("Dose-response")][0]
    logp = [t for t in dose["data"] if t["name"] == "log p(positive concept)"][0]
    np.testing.assert_allclose(figure_array(logp["x"]), cli_grid)
    np.testing.assert_allclose(figure_array(logp["y"]), dr.table.sort_values("alpha")["logp_pos"])
    assert at.button(key="steer_dose")  # the page's own grid can still be measured
    at.selectbox(key="steer_layer").set_value(0).run()  # another vector: nothing stored for it
    assert any("Not measured yet" in c.value for c in at.caption)
