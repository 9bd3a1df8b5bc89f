"""Bad input to SAE training and import, through the API and the CLI, refused before any model boots.

Every case of issue 13's "Bad input" (an unknown architecture, a site or a layer the model lacks, k >= d_sae
and other bad k, NaN/inf thresholds, bandwidths and coefficients, matryoshka widths that do not increase to
d_sae, SAELens directories LensLab cannot load: another architecture, truncated weights, a cfg.json whose d_sae
disagrees with the weights, NaN weights) is a typed ``LensLabError`` whose message names the value and the fix.
"Before boot" is proved by making every way to boot a model (and to harvest) fail the test. The CLI prints one
``error:`` line and exits 2, without a traceback.

The cases that need the model's width or depth (a layer it lacks, k at or above d_sae = expansion x d_in,
matryoshka widths not ending at that d_sae) are decided from config.json (``sae.preflight``); a model without
config.json is checked after booting, before its activations are harvested.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from _tiny_llama import TOY_TEXTS as TEXTS
from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")  # 2 layers; hook_z 4 x 8 = 32; d_model 32


@pytest.fixture(autouse=True)
def _activations(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    return tmp_path / "acts"


@pytest.fixture
def no_boot(monkeypatch):
    """Every way to boot a model or harvest activations fails the test."""
    from analysis.sources import Source
    from sae import harvest, requests

    def boom(*a, **k):
        raise AssertionError("a model was booted (or activations harvested) before the bad input was refused")

    for owner, name in ((requests, "booted"), (requests, "mlm_booted"), (harvest, "boot"), (harvest, "boot_bridge"),
                        (harvest, "harvest"), (Source, "boot_bridge")):
        monkeypatch.setattr(owner, name, boom)


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS[:20]))
    return path


def _cli(argv: list[str], capsys) -> str:
    """Run ``lenslab ARGV`` in-process; assert exit 2, nothing on stdout, one ``error:`` line; return it."""
    from app.cli import app
    from app.cli.exit_codes import run

    capsys.readouterr()
    code = run(app, argv)
    out = capsys.readouterr()
    assert code == 2, (code, out.err)
    assert out.out == "" and "Traceback" not in out.err
    [line] = [ln for ln in out.err.splitlines() if ln.startswith("error:")]
    assert out.err.splitlines()[-1] == line, out.err  # the error ends the output (progress lines may come first)
    return line


# ------------------------------------------------------------------------------------ training: API
# (layer, keyword arguments of api.sae_train, pattern of the message: the value, the constraint, the fix)
TRAIN_CASES = [
    (1, dict(architecture="matching_pursuit"), r"architecture 'matching_pursuit' is unknown; use 'relu' .*'gated'"),
    (1, dict(site="attn_out"), r"site 'attn_out' is unknown; valid sites: hook_z, resid_pre, resid_post, mlp_out .*"
                               r"pass e.g. site='resid_post'"),
    (2, dict(), r"layer 2 has no attention hook_z; valid layers are \[0, 1\] .*num_hidden_layers=2\); pass --layer"),
    (5, dict(site="mlp_out"), r"layer 5 has no mlp_out hook \(blocks.5.hook_mlp_out\); valid layers are \[0, 1\]"),
    (-1, dict(), r"layer=-1: must be a block index >= 0; pass e.g. layer=0"),
    (True, dict(), r"layer=True: must be a block index >= 0"),
    # k >= d_sae: d_sae given, or expansion x the hook's width read from config.json (8 x 32 = 256)
    (1, dict(d_sae=64, k=65), r"k=65: a topk SAE needs an integer 1 <= k <= d_sae=64"),
    (1, dict(k=257), r"k=257: a topk SAE needs an integer 1 <= k <= d_sae=256; pass k .*\(d_sae = expansion 8 x "
                     r"d_in 32 \(the width of blocks.1.attn.hook_z\) = 256; adjust"),
    (1, dict(architecture="batchtopk", k=256), r"k=256: a batchtopk SAE needs a number 0 < k < d_sae=256 .*"
                                               r"expansion 8 x d_in 32"),
    (0, dict(architecture="matryoshka_batchtopk", k=64, expansion=2, matryoshka_widths=(16, 64)),
     r"k=64: a matryoshka_batchtopk SAE needs a number 0 < k < d_sae=64 .*expansion 2 x d_in 32"),
    (1, dict(site="resid_post", k=300), r"k=300: a topk SAE needs an integer 1 <= k <= d_sae=256; .*"
                                        r"the width of blocks.1.hook_resid_post"),
    (1, dict(k=0), r"k=0: a topk SAE needs an integer 1 <= k"),
    (1, dict(k=-3), r"k=-3: a topk SAE needs an integer"),
    (1, dict(k=True), r"k=True: a topk SAE needs an integer"),
    (1, dict(k=2.5), r"k=2.5: a topk SAE needs an integer"),
    (1, dict(architecture="batchtopk", k=math.nan), r"k=nan: a batchtopk SAE needs a number 0 < k"),
    (1, dict(architecture="batchtopk", k=-1.5), r"k=-1.5: a batchtopk SAE needs a number 0 < k"),
    (1, dict(architecture="batchtopk", k=math.inf), r"k=inf: a batchtopk SAE needs a number 0 < k"),
    (1, dict(architecture="relu", k=8), r"k applies to topk, batchtopk, matryoshka_batchtopk SAEs only"),
    # thresholds, bandwidths and coefficients that are not finite
    (1, dict(architecture="jumprelu", jumprelu_init_threshold=math.nan),
     r"jumprelu_init_threshold=nan: must be a finite number >= 0 \(NaN and inf are not thresholds\); pass e.g. "
     r"jumprelu_init_threshold=0.01"),
    (1, dict(architecture="jumprelu", jumprelu_init_threshold=math.inf), r"jumprelu_init_threshold=inf: must be"),
    (1, dict(architecture="jumprelu", jumprelu_bandwidth=math.nan),
     r"jumprelu_bandwidth=nan: must be a finite number in \(0, 1\]; pass e.g. jumprelu_bandwidth=0.05"),
    (1, dict(architecture="jumprelu", jumprelu_bandwidth=math.inf), r"jumprelu_bandwidth=inf: must be"),
    (1, dict(architecture="jumprelu", jumprelu_bandwidth=0.0), r"jumprelu_bandwidth=0.0: must be"),
    (1, dict(architecture="jumprelu", l0_coefficient=math.nan),
     r"l0_coefficient=nan: must be a finite number >= 0 \(NaN and inf are not coefficients\); pass e.g. "
     r"l0_coefficient=1.0"),
    (1, dict(architecture="relu", l1_coefficient=math.nan),
     r"l1_coefficient=nan: must be a finite number .*pass e.g. l1_coefficient=1.0"),
    (1, dict(architecture="gated", l1_coefficient=-math.inf), r"l1_coefficient=-inf: must be a finite number"),
    (1, dict(architecture="relu", l1_coefficient=True), r"l1_coefficient=True: must be a finite number"),
    (1, dict(architecture="relu", l1_coefficient=-0.5), r"l1_coefficient=-0.5: must be a finite number >= 0"),
    (1, dict(lr="fast"), r"lr='fast': must be a finite number .*pass e.g. lr=0.0012"),
    (1, dict(n_tokens=2.5), r"n_tokens=2.5: must be an integer; pass e.g. n_tokens=2000000"),
    # matryoshka prefixes: strictly increasing, ending at d_sae (given, or expansion x width)
    (1, dict(architecture="matryoshka_batchtopk", k=8, d_sae=256, matryoshka_widths=(64, 32, 256)),
     r"matryoshka_widths=\(64, 32, 256\): must increase strictly from >= 1 and end at d_sae=256; pass e.g."),
    (1, dict(architecture="matryoshka_batchtopk", k=8, d_sae=256, matryoshka_widths=(32, 128)),
     r"matryoshka_widths=\(32, 128\): must increase strictly from >= 1 and end at d_sae=256"),
    (1, dict(architecture="matryoshka_batchtopk", k=8, matryoshka_widths=(32, 128)),
     r"matryoshka_widths=\(32, 128\): .*end at d_sae=256; .*expansion 8 x d_in 32"),
    (1, dict(architecture="matryoshka_batchtopk", k=8, matryoshka_widths=(0, 256)),
     r"must increase strictly from >= 1"),
    (1, dict(architecture="matryoshka_batchtopk", k=8), r"matryoshka_widths=None: a matryoshka_batchtopk SAE needs"),
    (1, dict(architecture="topk", matryoshka_widths=(32, 256)), r"only a matryoshka_batchtopk SAE takes prefix widths"),
]


@pytest.mark.parametrize("layer, kw, match", TRAIN_CASES, ids=[f"{c[0]}-{c[1]}"[:60] for c in TRAIN_CASES])
def test_api_training_bad_input_is_refused_before_boot(layer, kw, match, llama, no_boot, tmp_path):
    from app import api

    with pytest.raises(ConfigError, match=match):
        api.sae_train(str(llama), layer, texts=TEXTS[:20], store=tmp_path / "s", **kw)
    assert api.sae_list(tmp_path / "s").empty


def test_valid_settings_pass_the_preflight(llama, no_boot, tmp_path):
    """The checks refuse only what is wrong: the same settings one step inside each bound get to the boot."""
    from app import api

    for layer, kw in ((1, dict(k=256)), (1, dict(architecture="batchtopk", k=255.5)), (1, dict(site="mlp_out")),
                      (1, dict(architecture="matryoshka_batchtopk", k=8, matryoshka_widths=(32, 128, 256)))):
        with pytest.raises(AssertionError, match="a model was booted"):
            api.sae_train(str(llama), layer, texts=TEXTS[:20], store=tmp_path / "s", **kw)


# ------------------------------------------------------------------------------------ training: CLI
CLI_CASES = [
    (["--architecture", "matching_pursuit"], "architecture 'matching_pursuit' is unknown"),
    (["--site", "attn_out"], "site 'attn_out' is unknown; valid sites"),
    (["--layer", "2"], "layer 2 has no attention hook_z; valid layers are [0, 1]"),
    (["--layer", "7", "--site", "resid_pre"], "layer 7 has no resid_pre hook (blocks.7.hook_resid_pre); valid layers"),
    (["--layer", "-1"], "layer=-1: must be a block index >= 0"),
    (["--k", "257"], "k=257: a topk SAE needs an integer 1 <= k <= d_sae=256"),
    (["--k", "1e9"], "k=1000000000: a topk SAE needs an integer 1 <= k <= d_sae=256"),
    (["--d-sae", "64", "--k", "64", "--architecture", "batchtopk"], "k=64: a batchtopk SAE needs a number 0 < k < "
                                                                    "d_sae=64"),
    (["--k", "0"], "k=0: a topk SAE needs an integer 1 <= k"),
    (["--k", "-2"], "k=-2: a topk SAE needs an integer"),
    (["--k", "2.5"], "k=2.5: a topk SAE needs an integer"),
    (["--k", "nan", "--architecture", "batchtopk"], "k=nan: a batchtopk SAE needs a number 0 < k"),
    (["--architecture", "jumprelu", "--init-threshold", "nan"], "jumprelu_init_threshold=nan: must be a finite number"),
    (["--architecture", "jumprelu", "--init-threshold", "inf"], "jumprelu_init_threshold=inf: must be a finite number"),
    (["--architecture", "jumprelu", "--bandwidth", "nan"], "jumprelu_bandwidth=nan: must be a finite number in (0, 1]"),
    (["--architecture", "jumprelu", "--bandwidth", "-inf"], "jumprelu_bandwidth=-inf: must be a finite number"),
    (["--architecture", "jumprelu", "--l0", "nan"], "l0_coefficient=nan: must be a finite number >= 0"),
    (["--architecture", "relu", "--l1", "nan"], "l1_coefficient=nan: must be a finite number"),
    (["--architecture", "gated", "--l1", "inf"], "l1_coefficient=inf: must be a finite number"),
    (["--architecture", "matryoshka_batchtopk", "--k", "8", "--widths", "64,32,256"],
     "matryoshka_widths=(64, 32, 256): must increase strictly from >= 1 and end at d_sae"),
    (["--architecture", "matryoshka_batchtopk", "--k", "8", "--widths", "32,128"],
     "matryoshka_widths=(32, 128): must increase strictly from >= 1 and end at d_sae=256"),
    (["--architecture", "matryoshka_batchtopk", "--k", "8", "--widths", "32,x"], "--widths '32,x': expected "
                                                                                 "comma-separated integers"),
]


@pytest.mark.parametrize("argv, match", CLI_CASES, ids=[" ".join(a)[:50] for a, _ in CLI_CASES])
def test_cli_training_bad_input_is_one_line_before_boot(argv, match, llama, no_boot, texts_file, tmp_path, capsys):
    args = ["sae", "train", str(llama), "--texts", str(texts_file), "--store", str(tmp_path / "s")]
    if "--layer" not in argv:
        args += ["--layer", "1"]
    line = _cli(args + argv, capsys)
    assert match in line, line


def test_cli_sites_of_eval_and_features_are_checked_before_boot(llama, no_boot, tmp_path, capsys):
    for verb in ("eval", "features"):
        store = ["--store", str(tmp_path / "s")]
        line = _cli(["sae", verb, str(llama), "--layer", "1", "--site", "resid", *store], capsys)
        assert "site 'resid' is unknown; valid sites: hook_z, resid_pre, resid_post, mlp_out" in line
        line = _cli(["sae", verb, str(llama), "--layer", "9", *store], capsys)
        assert "no stored SAE for" in line and "layer 9" in line and "lenslab sae train" in line


def test_without_config_json_k_is_checked_against_the_booted_width_before_harvesting(tmp_path, monkeypatch):
    """An in-memory model has no config.json: the width comes from the booted bridge, and k >= d_sae and a
    layer it lacks are refused before any activation is harvested."""
    from transformers import AutoModelForCausalLM

    from app import api
    from sae import harvest

    module = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama"))

    def boom(*a, **k):
        raise AssertionError("activations were harvested before the bad input was refused")

    monkeypatch.setattr(harvest, "harvest", boom)
    with pytest.raises(ConfigError, match=r"k=300: a topk SAE needs an integer 1 <= k <= d_sae=256; .*expansion 8 x "
                                          r"d_in 32"):
        api.sae_train(module, 0, k=300, texts=TEXTS[:4], store=tmp_path / "s")
    with pytest.raises(ConfigError, match=r"layer 3 has no attention hook_z; valid layers are \[0, 1\]"):
        api.sae_train(module, 3, texts=TEXTS[:4], store=tmp_path / "s")


# ------------------------------------------------------------------------------------ SAELens import
def _fixture_copy(tmp_path: Path, name: str = "jumprelu") -> Path:
    d = tmp_path / f"sae-{name}"
    shutil.copytree(FIXTURE / name, d)
    return d


def _edit_cfg(d: Path, **changes) -> None:
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(changes)
    (d / "cfg.json").write_text(json.dumps(cfg))


def _edit_meta(d: Path, **changes) -> None:
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["metadata"].update(changes)
    (d / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(d: Path, name: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(d / "sae_weights.safetensors")
    w[name] = edit(w[name].clone())
    save_file(w, d / "sae_weights.safetensors")


def _nan_at_0(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[0] = float("nan")
    return t


def _truncate(d: Path) -> None:
    raw = (d / "sae_weights.safetensors").read_bytes()
    (d / "sae_weights.safetensors").write_bytes(raw[: len(raw) // 2])


IMPORT_CASES = {  # name -> (fixture, damage, error type, message pattern)
    # values the cfg reader used to let through as raw TypeError / AttributeError or as another number
    "architecture_list": ("topk", lambda d: _edit_cfg(d, architecture=["topk"]), CorruptCheckpointError,
                          r"cfg.json: architecture is list \['topk'\], not a string; SAELens writes one name"),
    "architecture_dict": ("standard", lambda d: _edit_cfg(d, architecture={"name": "standard"}), CorruptCheckpointError,
                          r"cfg.json: architecture is dict .*, not a string"),
    "metadata_list": ("standard", lambda d: _edit_cfg(d, metadata=["blocks.0.attn.hook_z"]), CorruptCheckpointError,
                      r"cfg.json: metadata is list .*, not a JSON object"),
    "metadata_string": ("topk", lambda d: _edit_cfg(d, metadata="blocks.1.attn.hook_z"), CorruptCheckpointError,
                        r"cfg.json: metadata is str 'blocks.1.attn.hook_z', not a JSON object"),
    "k_true": ("topk", lambda d: _edit_cfg(d, k=True), CorruptCheckpointError,
               r"cfg.json: k=True is not an integer; SAELens writes k as a whole number"),
    "k_fraction": ("topk", lambda d: _edit_cfg(d, k=2.7), CorruptCheckpointError, r"cfg.json: k=2.7 is not an integer"),
    "d_in_fraction": ("standard", lambda d: _edit_cfg(d, d_in=16.7), CorruptCheckpointError,
                      r"cfg.json: d_in=16.7 is not an integer"),
    "d_sae_string": ("jumprelu", lambda d: _edit_cfg(d, d_sae="32"), CorruptCheckpointError,
                     r"cfg.json: d_sae='32' is not an integer"),
    "n_heads_fraction": ("standard", lambda d: _edit_meta(d, n_heads=4.5, d_head=4), CorruptCheckpointError,
                         r"cfg.json: metadata.n_heads=4.5 is not an integer"),
    "mlp_in_hook": ("standard", lambda d: _edit_meta(d, hook_name="blocks.0.mlp.hook_in"), ConfigError,
                    r"hook_name 'blocks.0.mlp.hook_in' is not a hook LensLab SAEs read .*an MLP input is a "
                    r"transcoder's"),
    # the model's config.json decides these before it boots (sae.preflight)
    "layer_model_lacks": ("standard", lambda d: _edit_meta(d, hook_name="blocks.5.attn.hook_z"), ConfigError,
                          r"layer 5 has no attention hook_z; valid layers are \[0, 1\] .*config.json "
                          r"num_hidden_layers=2\); the SAE in .* reads blocks.5.attn.hook_z: import it for the "
                          r"model it was trained on"),
    "resid_layer_model_lacks": ("topk", lambda d: _edit_meta(d, hook_name="blocks.2.hook_resid_post"), ConfigError,
                                r"layer 2 has no resid_post hook \(blocks.2.hook_resid_post\); valid layers are "
                                r"\[0, 1\]"),
    "hook_z_width": ("standard", lambda d: None, ShapeError,
                     r"the SAE has d_in=16 but blocks.0.attn.hook_z of .* is n_heads\*d_head = 4\*8 = 32 wide; "
                     r"import it for the model and layer it was trained on"),
    "resid_width": ("standard", lambda d: _edit_meta(d, hook_name="blocks.1.hook_resid_pre"), ShapeError,
                    r"the SAE has d_in=16 but blocks.1.hook_resid_pre of .* is d_model = 32 wide"),
    "matching_pursuit": ("standard", lambda d: _edit_cfg(d, architecture="matching_pursuit"), ConfigError,
                         r"SAELens architecture 'matching_pursuit' is not supported; LensLab loads standard, topk, "
                         r"jumprelu, gated SAEs .*load it in SAELens, or retrain it here"),
    "temporal": ("topk", lambda d: _edit_cfg(d, architecture="temporal"), ConfigError,
                 r"SAELens architecture 'temporal' is not supported"),
    "truncated": ("jumprelu", _truncate, CorruptCheckpointError, r"sae_weights.safetensors"),
    "d_sae_disagrees": ("gated", lambda d: _edit_cfg(d, d_sae=48), CorruptCheckpointError,
                        r"sae_weights.safetensors: W_enc has shape \(16, 32\) but cfg.json implies \(16, 48\); the "
                        r"weights and cfg.json do not belong together: re-save the SAE"),
    "nan_weights": ("standard", lambda d: _edit_weights(d, "W_dec", _nan_at_0), CorruptCheckpointError,
                    r"tensors \['W_dec'\] hold NaN or inf; the SAE diverged or the file is corrupt: retrain or "
                    r"re-save"),
    "nan_threshold": ("batchtopk", lambda d: _edit_weights(d, "threshold", _nan_at_0), CorruptCheckpointError,
                      r"tensors \['threshold'\] hold NaN or inf"),
    "inf_threshold": ("jumprelu", lambda d: _edit_weights(d, "threshold", lambda t: t.fill_(float("inf"))),
                      CorruptCheckpointError, r"tensors \['threshold'\] hold NaN or inf"),
    "negative_threshold": ("jumprelu", lambda d: _edit_weights(d, "threshold", lambda t: t - 1.0), ConfigError,
                           r"a jumprelu threshold is negative"),
    "normalised": ("topk", lambda d: _edit_cfg(d, normalize_activations="expected_average_only_in"), ConfigError,
                   r"normalize_activations='expected_average_only_in' is not supported; fold the scaling"),
    "no_weights": ("standard", lambda d: (d / "sae_weights.safetensors").unlink(), CorruptCheckpointError,
                   r"no sae_weights.safetensors; the SAE directory is incomplete"),
    "bad_matryoshka_widths": ("matryoshka_batchtopk",
                              lambda d: _edit_cfg(d, metadata={**json.loads((d / "cfg.json").read_text())["metadata"],
                                                               "training_architecture_details": {
                                                                   "k": 4, "matryoshka_widths": [16, 8]}}),
                              CorruptCheckpointError, r"matryoshka_widths=\(16, 8, 32\): must increase strictly"),
    "k_at_d_sae": ("batchtopk",
                   lambda d: _edit_cfg(d, metadata={**json.loads((d / "cfg.json").read_text())["metadata"],
                                                    "training_architecture_details": {"k": 32}}),
                   CorruptCheckpointError, r"k=32: a batchtopk SAE needs a number 0 < k < d_sae=32"),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_of_a_bad_saelens_directory_is_refused_before_boot(case, llama, no_boot, tmp_path, capsys):
    from app import api

    fixture, damage, error, match = IMPORT_CASES[case]
    d = _fixture_copy(tmp_path, fixture)
    damage(d)
    with pytest.raises(error, match=match):
        api.sae_import(d, str(llama), store=tmp_path / "s")
    assert api.sae_list(tmp_path / "s").empty
    line = _cli(["sae", "import", str(d), str(llama), "--store", str(tmp_path / "s")], capsys)
    assert str(d) in line and re.search(match, line), line


def test_import_at_a_layer_other_than_its_hook_is_refused_before_boot(llama, no_boot, tmp_path, capsys):
    from app import api

    d = _fixture_copy(tmp_path, "standard")  # reads blocks.0.attn.hook_z
    with pytest.raises(ConfigError, match=r"reads blocks.0.attn.hook_z but layer=1 was given; import it with layer=0"):
        api.sae_import(d, str(llama), 1, store=tmp_path / "s")
    line = _cli(["sae", "import", str(d), str(llama), "--layer", "1", "--store", str(tmp_path / "s")], capsys)
    assert "layer=1 was given" in line


def test_cli_features_refuses_a_feature_index_before_computing(tmp_path, monkeypatch, capsys):
    """`sae features --feature I` with I outside 0..d_sae-1 fails at once, not after the feature data is computed."""
    from app import api
    from sae import pipeline

    llama16 = make_tiny_llama(tmp_path / "llama16", d_model=16)  # hook_z 4 x 4, as the SAELens fixture
    imported = api.sae_import(FIXTURE / "topk", llama16, store=tmp_path / "s")  # layer 1, d_sae 32

    def boom(*a, **k):
        raise AssertionError("feature data was computed before the feature index was checked")

    monkeypatch.setattr(pipeline, "sae_features", boom)
    monkeypatch.setattr(api, "sae_features", boom)
    for bad in ("32", "-1"):
        line = _cli(["sae", "features", str(llama16), "--layer", "1", "--feature", bad, "--sae", imported.key[:12],
                     "--store", str(tmp_path / "s")], capsys)
        assert f"feature index {bad} is out of range: this SAE has 32 features (0..31)" in line
