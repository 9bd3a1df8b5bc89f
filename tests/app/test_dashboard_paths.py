"""Every dashboard field that names a file goes through ``app.allowed_paths`` (the Bilinear page's Direction field
read ``vector:PATH`` / ``sae:DIR:i`` anywhere on the server, and answered differently for an existing and a
missing file: an existence oracle).

Three layers, so that a new unchecked path field fails a test:

1. ``FIELDS`` classifies every free-text field of every page (AST scan): a new field fails until it is listed;
2. every ``app.api`` call of the pages and their helpers passes each argument that names a file straight from an
   allow-list check (AST scan), including the sources and contrast sets reopened from stored results;
3. AppTest types a path outside the allowed root into each path field, once an existing file and once a missing
   one: the same refusal both times, and no API call that reads files was made.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from streamlit.testing.v1 import AppTest

import _page_scan as scan
from _refusal import REFUSAL, spy_open_source, write_model
from app.allowed_paths import ENV_VAR

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
CONTRASTS = Path(__file__).resolve().parents[2] / "data" / "contrasts"
TIMEOUT = 120

FIELDS = {  # (page, label) -> what the typed text is; "model", "contrasts" and "direction" name files
    ("home", "Source"): "model",
    ("spectra", "Source to analyse"): "model",
    ("selection", "Include regex"): "a regex over tensor names",
    ("selection", "Exclude regex"): "a regex over tensor names",
    ("bilinear", "Source"): "model",
    ("bilinear", "Direction"): "direction",
    ("bilinear", "Expert"): "an integer",
    ("experts", "Expert counts"): "integers",
    ("experts", "Source"): "model",
    ("steering", "Source"): "model",
    ("steering", "Contrast set"): "contrasts",
    ("steering", "Position"): "a position rule (last, mean, index:K)",
    ("steering", "Prompt"): "prompt text for the model",
    ("steering_search", "Source"): "model",
    ("steering_search", "Contrast set"): "contrasts",
    ("sae", "Source"): "model",
    ("sae_prompt", "Prompt"): "prompt text for the model",
    ("circuits", "Source"): "model",
}
PATH_KINDS = {"model", "contrasts", "direction"}
CHECKS = {"check_source", "check_stored_source", "check_contrasts", "check_direction"}  # app.allowed_paths
PATH_ARGS = {  # app.api function -> its arguments (position or keyword) that name files; keywords must be given
    "analyze": (0,), "bilinear_decompose": (0, "direction"), "experts_routing": (0,), "sae_train": (0,),
    "steer_extract": (0, 1), "steer_dose": (0, 2), "steer_layers": (0, 1), "steer_apply": (0,), "steer_search": (0, 1),
    "find_dose_response": (2,), "find_layer_sweep": (1,),
    "sae_eval": ("source",), "sae_features": ("source",), "sae_prompt": ("source",),  # else: the stored source
    "circuits": (0,),
}
NO_PATHS = {  # app.api functions the dashboard calls whose arguments name no file
    "bilinear_train": "a bundled kind (digits, lm, mixtral) from the page's own table",
    **dict.fromkeys(["bilinear_top", "bilinear_explain"], "reads a decomposition already in memory"),
    "mmoe_analyze": "data is digits or docstrings (DataSpec refuses anything else)",
    "sae_groundtruth_table": "synthetic activations drawn in memory (sae.synthetic); no file",
    **dict.fromkeys(["contrast_sets", "has_spectra", "stored_spectra", "stored_bilinear", "load_bilinear",
                     "stored_extractions", "load_extraction", "steer_vector",
                     "stored_dose_responses", "mmoe_curves", "load_mmoe_curve",
                     "load_expert_report", "stored_bias_demos", "stored_routing", "stored_kappatune_experiments",
                     "sae_list", "has_sae_eval", "has_sae_features", "find_sae_eval", "find_sae_features",
                     "load_sae", "sae_polysemantic", "stored_circuits", "load_circuits", "groundtruth_rows",
                     "probe_rows", "sae_transcoders"],
                    "reads the store by key or returns values in memory"),
    **dict.fromkeys(["stored_mmoe_curves", "stored_mmoe_bias", "load_mmoe_bias", "stored_experts_routing",
                     "load_experts_routing"], "reads the store by key or returns values in memory"),
    **dict.fromkeys(["list_spectra", "load_spectra", "spectra_params", "stored_experiments", "load_experiment"],
                    "reads the store by key or returns values in memory"),
    **dict.fromkeys(["select_from_spectra", "export_text"], "works on spectra/selections in memory, writes nothing"),
    **dict.fromkeys(["stored_searches", "load_search", "stored_audits", "load_audit"],
                    "reads the store by key or returns values in memory"),
}
OPENERS = {"open_source", "load_contrasts", "load_vector", "spec_params", "resolve_directions", "load_file",
           "safe_open", "read_bytes", "read_text", "open"}  # the pages reach files only through app.api


# ------------------------------------------------------------------------------------- static scans
def test_every_free_text_field_is_classified():
    found = {(f.page, f.label) for f in scan.fields()}
    assert found == set(FIELDS), (f"classify these new fields in FIELDS: {sorted(found - set(FIELDS))}; "
                                  f"gone: {sorted(set(FIELDS) - found)}")


def test_every_path_field_has_a_refusal_case():
    keys = {f.key for f in scan.fields() if FIELDS[(f.page, f.label)] in PATH_KINDS}
    assert None not in keys, "give every path field a key= so the refusal test can type into it"
    assert keys == {c.values[0] for c in CASES}


def test_every_path_argument_of_the_api_comes_from_an_allow_list_check():
    unchecked, unknown = [], []
    for use in scan.api_uses():
        if isinstance(use, tuple):
            where, name = use
            if name not in NO_PATHS:
                unknown.append(f"{where}: api.{name} is used in a way the scan cannot follow")
            continue
        if use.name not in PATH_ARGS:
            if use.name not in NO_PATHS:
                unknown.append(f"{use.where}: classify api.{use.name} in PATH_ARGS or NO_PATHS")
            continue
        for pos in PATH_ARGS[use.name]:
            arg = use.keywords.get(pos) if isinstance(pos, str) else use.args[pos] if pos < len(use.args) else None
            if arg is None or not scan.checked(arg, use.scope, CHECKS):
                text = "missing" if arg is None else scan.ast.unparse(arg)
                unchecked.append(f"{use.where}: api.{use.name} argument {pos!r} ({text}) is not from {sorted(CHECKS)}")
    assert not unknown and not unchecked, unknown + unchecked


def test_pages_open_no_file_themselves():
    assert not list(scan.references(OPENERS))


# ------------------------------------------------------------------------------------- refusals (AppTest)
@pytest.fixture
def roots(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(allowed root holding a model, a directory outside it holding one file of every kind)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_model(allowed / "model")
    write_model(outside / "model")
    np.save(outside / "u.npy", np.ones(12))
    (outside / "sae").mkdir()
    save_file({"W_dec": np.ones((4, 12), dtype=np.float32)}, str(outside / "sae" / "sae_weights.safetensors"))
    shutil.copy(CONTRASTS / "code-prose.jsonl", outside / "pairs.jsonl")
    monkeypatch.setenv(ENV_VAR, str(allowed))
    return allowed, outside


@pytest.fixture
def api_calls(monkeypatch) -> list[str]:
    """Names of the ``app.api`` functions that read files, each time one is called from now on."""
    from app import api

    calls: list[str] = []
    for name in PATH_ARGS:
        original = getattr(api, name)
        monkeypatch.setattr(api, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    return calls


def _spectra_without_results(store, allowed: Path) -> None:
    """The spectra page shows its source field for a model the store knows without spectra."""
    from analysis.store import Result

    store.put("f" * 64, "other", {}, "0", Result(meta={"note": "not spectra"}))
    store.register_model("f" * 64, str(allowed / "model"), "safetensors")


CASES = [  # field key, page, button, other inputs ("{allowed}" is the allowed root), typed text, outside file
    pytest.param("home_source", "home", "Analyse", {}, "{}", "model", id="home-source"),
    pytest.param("spectra_source", "spectra", "Compute spectra", {}, "{}", "model", id="spectra-source"),
    pytest.param("bl_source", "bilinear", "Decompose", {"bl_direction": "resid:0"}, "{}", "model",
                 id="bilinear-source"),
    pytest.param("bl_direction", "bilinear", "Decompose", {"bl_source": "{allowed}/model"}, "vector:{}", "u.npy",
                 id="bilinear-direction-vector"),
    pytest.param("bl_direction", "bilinear", "Decompose", {"bl_source": "{allowed}/model"}, "sae:{}:0", "sae",
                 id="bilinear-direction-sae"),
    pytest.param("routing_source", "experts", "Analyse routing", {}, "{}", "model", id="experts-routing-source"),
    pytest.param("steer_source", "steering", "Extract", {"steer_contrast": "code-prose"}, "{}", "model",
                 id="steering-source"),
    pytest.param("steer_contrast", "steering", "Extract", {"steer_source": "{allowed}/model"}, "{}", "pairs.jsonl",
                 id="steering-contrast-set"),
    pytest.param("ss_source", "steering_search", "Search", {"ss_contrast": "code-prose"}, "{}", "model",
                 id="steering-search-source"),
    pytest.param("ss_contrast", "steering_search", "Search", {"ss_source": "{allowed}/model"}, "{}", "pairs.jsonl",
                 id="steering-search-contrast-set"),
    pytest.param("sae_source", "sae", "Train", {}, "{}", "model", id="sae-source"),
    pytest.param("circuits_source", "circuits", "Compute circuits", {}, "{}", "model", id="circuits-source"),
]


def _submit(page: str, field: str, text: str, button: str, inputs: dict[str, str]) -> list[str]:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    at.switch_page(f"views/{page}.py").run()
    at.text_input(key=field).input(text)
    for key, value in inputs.items():
        at.text_input(key=key).input(value)
    next(b for b in at.button if b.label == button).click().run()
    assert not at.exception, [e.value for e in at.exception]
    return [e.value for e in at.error]


@pytest.mark.parametrize("field,page,button,inputs,typed,existing", CASES)
def test_a_path_outside_the_root_is_refused_alike_whether_it_exists_or_not(
        field, page, button, inputs, typed, existing, dashboard_store, roots, api_calls, monkeypatch):
    allowed, outside = roots
    if page == "spectra":
        _spectra_without_results(dashboard_store, allowed)
    opened = spy_open_source(monkeypatch)
    inputs = {k: v.format(allowed=allowed) for k, v in inputs.items()}
    answers = []
    for path in (outside / existing, outside / f"missing-{existing}"):
        errors = _submit(page, field, typed.format(path), button, inputs)
        assert len(errors) == 1 and REFUSAL in errors[0] and "--allowed-root" in errors[0], errors
        answers.append(errors[0].replace(str(path), "<PATH>"))
    assert answers[0] == answers[1]  # no existence oracle
    assert not api_calls and not [s for s in opened if str(outside) in s]  # refused before anything was read
    assert not [e for e in dashboard_store.list() if e.analysis != "other"]


# ------------------------------------------------------------------------------------- stored results reopened
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama outside every allowed root of these tests (results are stored from it through the API,
    which, like the CLI, is not restricted)."""
    from _tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("elsewhere") / "llama")


def _open(page: str) -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _refusals(at: AppTest) -> list[str]:
    errors = [e.value for e in at.error]
    assert errors and all(REFUSAL in e for e in errors), errors
    return errors


def test_steering_page_refuses_a_stored_source_and_contrast_set_outside_the_root(dashboard_store, roots, llama,
                                                                               api_calls, monkeypatch):
    from analysis.steering import pipeline
    from app import api

    _, outside = roots
    api.steer_extract(llama, outside / "pairs.jsonl", store=dashboard_store)
    api_calls.clear()
    read = []
    load_contrasts = pipeline.load_contrasts
    monkeypatch.setattr(pipeline, "load_contrasts", lambda x: read.append(str(x)) or load_contrasts(x))
    opened = spy_open_source(monkeypatch)
    at = _open("steering")
    assert any("pairs.jsonl" in e for e in _refusals(at))  # the stored contrast set is not read
    for key in ("steer_dose", "steer_layers", "steer_apply"):
        at.button(key=key).click().run()
        assert not at.exception and any(str(llama) in e for e in _refusals(at))  # nor the stored source
    assert not api_calls and not opened and not [r for r in read if str(outside) in r]


def test_sae_pages_refuse_a_stored_source_outside_the_root(dashboard_store, roots, llama, api_calls, tmp_path,
                                                         monkeypatch):
    from app import api

    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "activations"))
    api.sae_train(llama, 1, per_package=5, store=dashboard_store, d_sae=16, k=2, n_tokens=1000, batch_size=64)
    api_calls.clear()
    stored = sorted(e.key for e in dashboard_store.list())
    opened = spy_open_source(monkeypatch)
    at = _open("sae")
    for key in ("sae_eval_button", "sae_features_button"):
        at.button(key=key).click().run()
        assert not at.exception and any(str(llama) in e for e in _refusals(at))
    at = _open("sae_prompt")
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception and any(str(llama) in e for e in _refusals(at))
    assert not api_calls and not opened
    assert sorted(e.key for e in dashboard_store.list()) == stored  # nothing evaluated or explained


def test_the_scan_tells_checked_arguments_from_unchecked_ones():
    tree = scan.ast.parse("def f(spec, other):\n    a = check_source(spec)\n    b = check_source(spec)\n"
                          "    b = spec.strip()\n    api.analyze(a)\n    api.analyze(b)\n    api.analyze(spec)\n"
                          "    api.analyze(check_source(other))\n")
    f = tree.body[0]
    calls = [n for n in scan.ast.walk(f) if isinstance(n, scan.ast.Call) and scan.ast.unparse(n.func) == "api.analyze"]
    assert [scan.checked(c.args[0], f, CHECKS) for c in calls] == [True, False, False, True]
