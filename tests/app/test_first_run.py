"""The first-run job (app/first_run.py, ``lenslab quickstart``): its steps cover every dashboard page and call
the public API; a second run computes nothing; a failed or interrupted step leaves the store intact.

These run the job's cheap MiniLM steps (spectra, circuits) for real and stand in a few steps built the same way
for failures. The whole job and what each page shows of it: tests/app/test_first_run_pages.py (slow).
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.errors import ConfigError
from analysis.store import Store
from app import api, first_run
from app.first_run import Step

DASHBOARD = Path(__file__).resolve().parents[2] / "app" / "dashboard.py"


def dashboard_pages() -> list[str]:
    """Stems of the pages registered in app/dashboard.py's ``PAGES`` (read from the source: importing it runs
    Streamlit)."""
    tree = ast.parse(DASHBOARD.read_text())
    return [Path(node.args[0].value).stem for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Page"]


def snapshot(store: Store) -> set[tuple[str, str, float]]:
    """Every entry as (key, analysis, created): a recomputed result gets a new ``created``."""
    return {(e.key, e.analysis, e.created) for e in store.list()}


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``lenslab ARGS`` in this process, as the console script runs it (exit codes of app/cli/exit_codes.py)."""
    from app import cli

    monkeypatch.setattr(sys, "argv", ["lenslab", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, " ".join(out.err.split())


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file({"a.weight": torch.randn(6, 4, generator=g), "b.weight": torch.randn(5, 5, generator=g)}, str(path))
    return path


def test_every_dashboard_page_is_filled_by_a_step():
    pages = dashboard_pages()
    assert len(pages) >= 11 and "sae_prompt" in pages
    filled = {p for s in first_run.STEPS for p in s.pages}
    assert set(pages) <= filled, f"pages no quickstart step fills: {sorted(set(pages) - filled)}"
    views = {p.stem for p in (DASHBOARD.parent / "views").glob("*.py")}
    assert filled <= views, f"steps name pages that do not exist: {sorted(filled - views)}"
    assert len(set(first_run.step_names())) == len(first_run.STEPS)  # one entry per analysis


def test_steps_call_the_functions_app_api_exports():
    """first_run imports the pipelines' functions (so that app.api can re-export it); each must be the very
    function ``app.api`` exports, i.e. the steps go through the normal API."""
    used = {name: obj for name, obj in vars(first_run).items() if inspect.isfunction(obj)
            and "pipeline" in obj.__module__.split(".")[-1]}  # the analyses' API modules
    assert {"analyze", "select", "circuits", "sae_train", "steer_dose", "experiment_kappatune"} <= set(used)
    for name, fn in used.items():
        assert getattr(api, name, None) is fn, f"first_run calls {name}, which app.api does not export"
    assert api.quickstart is first_run.quickstart and api.QUICKSTART_STEPS is first_run.STEPS


def test_steps_by_name_and_unknown_names():
    assert [s.name for s in first_run.pick(["circuits", "spectra"])] == ["spectra", "circuits"]  # STEPS order
    assert first_run.pick(None) == list(first_run.STEPS)
    with pytest.raises(ConfigError, match=r"unknown quickstart step\(s\) \['bogus'\]; choose from bilinear, mmoe"):
        first_run.pick(["spectra", "bogus"])


def test_second_run_computes_nothing(tmp_path):
    store = Store(tmp_path / "store")
    first = api.quickstart(store, steps=["spectra", "circuits"])
    assert [o.name for o in first] == ["spectra", "circuits"]
    assert all(o.new_entries >= 1 for o in first)
    before, models = snapshot(store), [(m.fingerprint, m.label) for m in store.models()]
    assert {a for _, a, _ in before} == {"spectra", "circuits"}
    seen: list[str] = []
    again = api.quickstart(store, steps=["spectra", "circuits"], progress=lambda d, t, label: seen.append(label))
    assert [o.new_entries for o in again] == [0, 0]
    assert snapshot(store) == before  # same keys, same creation times: served, not recomputed
    assert [(m.fingerprint, m.label) for m in store.models()] == models
    fp = api.open_source("minilm").fingerprint
    assert api.find_spectra(fp, store=store) is not None and api.find_circuits(fp, store=store) is not None


def _failing_circuits(exc: BaseException):
    """A step that starts MiniLM's real circuit spectra and fails at its second progress tick."""
    def run(store, *, progress=None):
        ticks = []

        def boom(done, total, label):
            ticks.append(label)
            if len(ticks) == 2:
                raise exc
        return api.circuits("minilm", store=store, progress=boom)
    return run


def _tiny_spectra(path: Path):
    def run(store, *, progress=None):
        return api.analyze(str(path), store=store, progress=progress)
    return run


def test_a_failing_step_is_reported_the_others_run_and_the_store_stays_intact(tmp_path, tiny_file, monkeypatch,
                                                                               capsys):
    spectra = first_run.pick(["spectra"])[0]
    monkeypatch.setattr(first_run, "STEPS", (
        spectra, Step("broken", "circuits that fail half way", ("circuits",), _failing_circuits(RuntimeError("disk"))),
        Step("tiny", "spectra of a tiny file", ("spectra",), _tiny_spectra(tiny_file))))
    store = tmp_path / "store"
    code, _, err = _main(monkeypatch, capsys, "quickstart", "--store", str(store))
    assert code == 1
    assert "error: step broken failed (RuntimeError: disk); the other steps go on" in err
    assert "quickstart: 1 of 3 steps failed (broken)" in err and "tiny: 1 new results stored" in err
    st = Store(store)
    assert sorted(e.analysis for e in st.list()) == ["spectra", "spectra"]  # nothing of the failed step
    assert st.check().ok
    for e in st.list():
        assert api.load(e.key, store=st).table["kappa"].notna().all()
    # run again with the step fixed: only it computes
    before = snapshot(st)
    monkeypatch.setattr(first_run, "STEPS", (spectra, Step("broken", "fixed", ("circuits",),
                                                                 first_run._circuits)))
    code, _, err = _main(monkeypatch, capsys, "quickstart", "--store", str(store))
    assert code == 0 and "spectra: found in the store" in err and "broken: 1 new results stored" in err
    assert before < snapshot(st)


def test_ctrl_c_stops_at_once_and_keeps_the_finished(tmp_path, tiny_file, monkeypatch, capsys):
    spectra = first_run.pick(["spectra"])[0]
    monkeypatch.setattr(first_run, "STEPS", (
        spectra, Step("stopped", "circuits interrupted half way", ("circuits",), _failing_circuits(KeyboardInterrupt())),
        Step("tiny", "spectra of a tiny file", ("spectra",), _tiny_spectra(tiny_file))))
    store = tmp_path / "store"
    code, _, err = _main(monkeypatch, capsys, "quickstart", "--store", str(store))
    assert code == 130
    assert "interrupted: nothing partial was stored; results finished before Ctrl-C are kept" in err
    assert "[2/3] stopped" in err and "[3/3]" not in err  # the step after the interrupted one never started
    st = Store(store)
    assert [e.analysis for e in st.list()] == ["spectra"] and st.check().ok
    fp = api.open_source("minilm").fingerprint
    assert api.find_spectra(fp, store=st) is not None and api.find_circuits(fp, store=st) is None


def test_list_names_every_step(monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "quickstart", "--list")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == first_run.step_names()
    assert all(s.what in line and ", ".join(s.pages) in line for s, line in zip(first_run.STEPS, lines))


def test_unknown_step_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, "quickstart", "--step", "nope", "--store", str(tmp_path / "s"))
    assert code == 2 and "error: unknown quickstart step(s) ['nope']" in err
    assert Store(tmp_path / "s").list() == []


def test_piped_output_is_plain_lines(tmp_path, tiny_file, monkeypatch, capsys):
    """Not a terminal (pytest captures stderr): a line per step, one per stage, one with the outcome."""
    def staged(store, *, progress=None):
        progress(0, 1, "first: a")
        progress(1, 2, "first: b")
        progress(2, 2, "second: c")
        return api.analyze(str(tiny_file), store=store)

    monkeypatch.setattr(first_run, "STEPS", (Step("tiny", "spectra of a tiny file", ("spectra",), staged),))
    code, _, err = _main(monkeypatch, capsys, "quickstart", "--store", str(tmp_path / "s"))
    assert code == 0
    # a line per stage with its counts (whitespace is joined by _main)
    assert re.search(r"\[1/1\] tiny: spectra of a tiny file … first: 1/2, .*? second: 2/2, .*? "
                     r"tiny: 1 new results stored", err), err
    assert "quickstart: 1 steps in" in err and "1 new results in" in err


def test_sae_page_shows_an_evaluation_without_loss_recovered(tmp_path, monkeypatch, streamlit_caches_cleared):
    """The quickstart evaluates its SAE without loss recovered (MiniLM would need its masked-LM head trained
    first): the SAE page shows that evaluation, and says the loss was not measured, instead of "Not evaluated"."""
    from _tiny_llama import make_tiny_llama
    from streamlit.testing.v1 import AppTest

    llama = make_tiny_llama(tmp_path / "llama")
    store = tmp_path / "store"
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "activations"))
    trained = api.sae_train(llama, 1, per_package=5, max_tokens=32, d_sae=64, k=4, n_tokens=4096, batch_size=256,
                            store=store)
    ev = api.sae_eval(trained.key, loss=False, store=store)
    assert api.find_sae_eval(trained.key, store=store) is None  # not the settings the page runs by default
    monkeypatch.setenv("LENSLAB_STORE", str(store))
    at = AppTest.from_file(str(DASHBOARD), default_timeout=120).run()
    at.switch_page("views/sae.py").run()
    assert not at.exception and not at.error
    assert not [i.value for i in at.info if "Not evaluated" in i.value]
    assert {m.label: m.value for m in at.metric}["NMSE"] == f"{ev.metrics['nmse']:.3f}"
    assert any("loss recovered not measured" in c.value for c in at.caption)
