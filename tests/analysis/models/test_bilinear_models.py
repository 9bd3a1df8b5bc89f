"""The trained bilinear models and the loader: the digits model and tiny LMs train offline,
cache, boot TransformerBridge, and their decompositions reproduce the modules' actual forward
outputs (float64) for every direction kind, with and without biases."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.bilinear import decompose as bl
from analysis.bilinear import evaluate as ev
from analysis.bilinear import inputs as bilinear_inputs
from analysis.bilinear import loader
from analysis.models import tiny_lm as tiny_models
from analysis.bilinear.report import build_report
from analysis.errors import ConfigError, ShapeError, SourceError
from analysis.sources import BUNDLED, open_source

RTOL = 1e-5
TINY_LM = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_mlp=48, ctx=32, batch_size=8, warmup=2,
               per_package=25, packages=("numpy", "json", "pathlib", "os"))


@pytest.fixture(scope="module")
def digits(models_root):
    return tiny_models.train_digits(steps=400)


@pytest.fixture(scope="module")
def tiny_lm(models_root):
    return tiny_models.train_tiny_lm("bilinear-llama", steps=12, **TINY_LM)


def _assert_rel(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


# ------------------------------------------------------------------------------------ digits
def test_digits_trains_caches_and_reports_accuracy(digits, models_root):
    assert digits.path.parent == models_root and digits.path.name.startswith("bilinear-digits-")
    assert digits.metrics["test_accuracy"] > 0.8  # 400 steps; the default 3000 reach ~0.98
    info = json.loads((digits.path / tiny_models.INFO_FILE).read_text())
    assert info["config"]["noise"] == 0.4 and info["config"]["steps"] == 400
    again = tiny_models.train_digits(steps=400)
    assert again.reused and again.path == digits.path and again.metrics == digits.metrics
    assert not list(models_root.glob(".tmp-*"))  # nothing half-written left behind


def test_digits_training_is_deterministic(tmp_path, digits):
    other = tiny_models.train_digits(tmp_path / "again", steps=400)
    assert not other.reused
    a, b = load_file(str(digits.path / "model.safetensors")), load_file(str(other.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bias", [False, True])
def test_digits_decomposition_reproduces_model_logits(tmp_path, digits, bias, rng):
    from analysis.models.bilinear_digits import BilinearDigits, DigitsConfig

    trained = digits if not bias else tiny_models.train_digits(tmp_path / "biased", steps=100, bias=True)
    model = BilinearDigits(DigitsConfig(**trained.config))
    model.load_state_dict(load_file(str(trained.path / "model.safetensors")))
    model.double().eval()
    src = open_source(trained.path)
    rep = build_report(src, layer=0, direction="class:all")
    x = rng.uniform(0, 1, (64, 64))
    with torch.no_grad():
        logits = model(torch.tensor(x)).numpy()
        e = model.embed(torch.tensor(x)).numpy()
    _assert_rel(ev.contributions(rep.decomposition, e).sum(-1) + rep.offsets, logits)
    assert rep.decomposition.biased is bias and rep.decomposition.exact
    # truncation keeping everything = the model's own test accuracy
    np.testing.assert_allclose(rep.truncation.accuracy[-1], trained.metrics["test_accuracy"])
    # images are the eigenvectors through the embedding: v·e = (Eᵀv)·x + v·b
    emb = model.embed.weight.detach().numpy()
    v = rep.decomposition.eigenvectors[3, 0, :emb.shape[0]]
    np.testing.assert_allclose(rep.images[3, 0].reshape(-1), emb.T @ v, atol=1e-12)
    assert rep.images.shape == (10, rep.decomposition.eigenvalues.shape[1], 8, 8)


def test_digits_other_direction_kinds(digits, rng, tmp_path):
    src = open_source(digits.path)
    ref, layer = loader.load_layer(src, 0)
    x = rng.standard_normal((20, layer.d_in))
    np.save(tmp_path / "u.npy", rng.standard_normal((2, layer.d_out)))
    for spec in ("class:2,7", "resid:0,5", f"vector:{tmp_path / 'u.npy'}", "hosvd:3", None):
        dirs = loader.resolve_directions(src, ref, layer, spec)
        dec = bl.decompose(layer, dirs.vectors, dirs.labels)
        _assert_rel(ev.contributions(dec, x).sum(-1), layer.forward(x).numpy() @ dirs.vectors.T)
    assert loader.resolve_directions(src, ref, layer, None).spec == "hosvd:8"


# ------------------------------------------------------------------------------------ tiny LM
def test_tiny_lm_trains_and_boots_transformer_bridge(tiny_lm):
    for name in ("config.json", "model.safetensors", "tokenizer.json", tiny_models.INFO_FILE):
        assert (tiny_lm.path / name).is_file()
    assert json.loads((tiny_lm.path / "config.json").read_text())["hidden_act"] == "linear"
    m = tiny_lm.metrics
    assert np.isfinite(m["val_loss"]) and m["val_loss"] < m["uniform_loss"]
    bridge = open_source(tiny_lm.path).boot_bridge()
    _, cache = bridge.run_with_cache("def f(x): return x")
    assert {"blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out", "blocks.1.ln2.hook_normalized"} <= set(cache.keys())


def test_tiny_lm_tokenizer_config_names_a_class_both_transformers_majors_load(tiny_lm):
    """transformers 5 saves tokenizer_class "TokenizersBackend", which 4.x cannot load; we save
    "PreTrainedTokenizerFast" (checked by hand: 4.57.6 and 5.25 load it with AutoTokenizer). A
    model cached with the old name is rewritten when reused, without retraining."""
    from transformers import AutoTokenizer

    path = tiny_lm.path / "tokenizer_config.json"
    assert json.loads(path.read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(tiny_lm.path)
    assert tok.pad_token == "<pad>" and tok("def f(x)")["input_ids"]
    old = json.loads(path.read_text())
    old["tokenizer_class"] = "TokenizersBackend"  # what a model cached before the fix holds
    path.write_text(json.dumps(old))
    again = tiny_models.train_tiny_lm("bilinear-llama", steps=12, **TINY_LM)
    assert again.reused and again.path == tiny_lm.path
    assert json.loads(path.read_text()) == {**old, "tokenizer_class": "PreTrainedTokenizerFast"}
    assert not tiny_models.portable_tokenizer_config(tiny_lm.path)  # already portable: left alone


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sae")
    w_dec = torch.tensor(np.random.default_rng(5).standard_normal((6, TINY_LM["d_model"])))
    save_file({"W_dec": w_dec, "W_enc": w_dec.T.contiguous()}, str(d / "sae_weights.safetensors"))
    return d


def _lm_exactness(src, layer, specs, n_tokens=48):
    model = bilinear_inputs.load_hf_model(src).double()
    ref, weights = loader.load_layer(src, layer)
    inputs, outputs = bilinear_inputs.lm_inputs(src, ref, n_tokens=n_tokens, model=model, with_outputs=True)
    assert inputs.x.shape == (n_tokens, weights.d_in) and len(inputs.tokens) == n_tokens
    for spec in specs:
        dirs = loader.resolve_directions(src, ref, weights, spec)
        dec = bl.decompose(weights, dirs.vectors, dirs.labels)
        _assert_rel(ev.contributions(dec, inputs.x).sum(-1), outputs @ dirs.vectors.T)


@pytest.mark.parametrize("layer", [0, 1])
def test_lm_decomposition_matches_hf_mlp_forward(tiny_lm, sae_dir, layer, tmp_path, rng):
    src = open_source(tiny_lm.path)
    np.save(tmp_path / "u.npy", rng.standard_normal(TINY_LM["d_model"]))
    _lm_exactness(src, layer, ["token:#5,#77", "resid:1,30", f"vector:{tmp_path / 'u.npy'}",
                               f"sae:{sae_dir}:0,4", "hosvd:4"])


def test_lm_with_mlp_biases_matches_hf_forward(tiny_lm, sae_dir, tmp_path):
    """An untrained Llama with mlp_bias=True (biases folded into the constant input)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((tiny_lm.path / "config.json").read_text())
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    config.mlp_bias = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    out = tmp_path / "biased"
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_lm.path / f, out / f)
    src = open_source(out)
    ref, weights = loader.load_layer(src, 1)
    assert weights.biased and ref.p_bias is not None
    _lm_exactness(src, 1, ["token:#9", "resid:3", f"sae:{sae_dir}:2", "hosvd:2"])


def test_lm_report_top_tokens_and_truncation(tiny_lm):
    rep = build_report(open_source(tiny_lm.path), layer=0, direction="token:#20,#40,#60", n_eval=40)
    assert rep.model_kind == "lm" and rep.truncation is not None
    np.testing.assert_allclose(rep.truncation.agreement[-1], 1.0)
    assert rep.explorer_contrib.shape == (40, 3, TINY_LM["d_model"]) and len(rep.explorer_tokens) == 40
    tt = rep.top_tokens
    assert set(tt["direction"]) == {"token #20", "token #40", "token #60"}
    # scores are the projections of the RMSNorm'd embeddings on the eigenvector (independent numpy)
    src = open_source(tiny_lm.path)
    emb = src.tensor("model.embed_tokens.weight").double().numpy()
    gamma = src.tensor("model.layers.0.post_attention_layernorm.weight").double().numpy()
    row = tt.iloc[0]
    x = emb[row["token_id"]] / np.sqrt((emb[row["token_id"]] ** 2).mean() + 1e-6) * gamma
    v = rep.decomposition.eigenvectors[0, row["eigen"]]
    np.testing.assert_allclose(row["score"], v @ x, rtol=1e-9)
    first = tt[(tt["direction"] == "token #20") & (tt["eigen"] == row["eigen"])]
    scores = np.abs(emb / np.sqrt((emb**2).mean(1, keepdims=True) + 1e-6) * gamma @ v)
    assert list(first["token_id"]) == list(np.argsort(-scores, kind="stable")[:len(first)])


def test_token_directions_by_text(tiny_lm):
    src = open_source(tiny_lm.path)
    ref, weights = loader.load_layer(src, 0)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_lm.path / "tokenizer.json"))
    piece = next(t for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if i > 280 and t.isalpha())
    dirs = loader.resolve_directions(src, ref, weights, f"token:{piece}")
    tid = tok.token_to_id(piece)
    want = src.tensor("lm_head.weight")[tid].double() * src.tensor("model.norm.weight").double()
    np.testing.assert_allclose(dirs.vectors[0], want.numpy())
    with pytest.raises(ConfigError, match="encodes to .* tokens"):
        loader.resolve_directions(src, ref, weights, "token:numpy.linalg.eigh returns")


# ------------------------------------------------------------------------------------ mixtral
def test_tiny_mixtral_boots_with_router_hooks_and_swiglu_experts(models_root):
    trained = tiny_models.train_tiny_lm("mixtral", steps=4, **{**TINY_LM, "d_mlp": 16, "n_layers": 1})
    cfg = json.loads((trained.path / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    src = open_source(trained.path)
    bridge = src.boot_bridge()
    _, cache = bridge.run_with_cache("import os")
    idx, wts = cache["blocks.0.mlp.hook_expert_indices"], cache["blocks.0.mlp.hook_expert_weights"]
    assert idx.shape[-1] == 2 and int(idx.max()) < 4 and wts.shape[-1] in (2, 4)
    with pytest.raises(ConfigError, match="mixture of 4 experts; pick one with expert=E"):
        loader.load_layer(src, 0)
    ref, weights = loader.load_layer(src, 0, expert=2)
    assert ref.module.endswith("experts.2") and weights.gate_act == "silu" and not weights.exact
    with pytest.warns(bl.BilinearPartWarning, match="only its bilinear part"):
        rep = build_report(src, layer=0, expert=2, direction="resid:0,1", n_eval=16)
    assert not rep.decomposition.exact and rep.meta["notes"]


# ------------------------------------------------------------------------------------ errors
def test_layer_that_is_not_a_glu(minilm):
    with pytest.raises(ConfigError, match="its MLPs are not gated linear units .*intermediate.dense"):
        loader.load_layer(minilm, 0)


def test_model_without_mlps(tmp_path):
    path = tmp_path / "attn_only.safetensors"
    save_file({"layers.0.attn.q.weight": torch.ones(4, 4)}, str(path))
    with pytest.raises(SourceError, match="no MLP layers found"):
        loader.load_layer(open_source(path), 0)


def test_bad_layer_direction_and_width(digits, tiny_lm, tmp_path):
    src = open_source(digits.path)
    with pytest.raises(ConfigError, match="no GLU/bilinear layer 3; this model has layers 0"):
        loader.load_layer(src, 3)
    with pytest.raises(ConfigError, match="not a mixture of experts; drop expert=1"):
        loader.load_layer(src, 0, expert=1)
    ref, weights = loader.load_layer(src, 0)
    np.save(tmp_path / "wide.npy", np.ones(weights.d_out + 1))
    with pytest.raises(ShapeError, match=f"which writes d_out={weights.d_out} outputs"):
        loader.resolve_directions(src, ref, weights, f"vector:{tmp_path / 'wide.npy'}")
    np.save(tmp_path / "zero.npy", np.zeros(weights.d_out))
    with pytest.raises(ConfigError, match=r"direction 0 \(vector\[0\]\) is the zero vector"):
        loader.resolve_directions(src, ref, weights, f"vector:{tmp_path / 'zero.npy'}")
    with pytest.raises(ConfigError, match="unknown direction kind 'pixel'"):
        loader.resolve_directions(src, ref, weights, "pixel:3")
    with pytest.raises(ConfigError, match="class: indices '12' must lie in 0..9"):
        loader.resolve_directions(src, ref, weights, "class:12")
    with pytest.raises(ConfigError, match="token directions need an unembedding"):
        loader.resolve_directions(src, ref, weights, "token:#1")
    lm = open_source(tiny_lm.path)
    lref, lweights = loader.load_layer(lm, 0)
    with pytest.raises(ConfigError, match="class directions need a class head"):
        loader.resolve_directions(lm, lref, lweights, "class:all")


def test_bad_training_configs(tmp_path):
    with pytest.raises(ConfigError, match="unknown tiny LM kind 'gpt'"):
        tiny_models.train_tiny_lm("gpt", tmp_path)
    with pytest.raises(ConfigError, match="d_model=30 must be divisible by n_heads=4"):
        tiny_models.TinyLMConfig(d_model=30)
    with pytest.raises(ConfigError, match="need noise >= 0"):
        tiny_models.train_digits(tmp_path, noise=-1.0)


def test_bundled_names_are_registered():
    assert {"bilinear-digits", "bilinear-lm", "tiny-mixtral"} <= set(BUNDLED)


def test_bundled_digits_trains_on_first_use(models_root, capsys):
    src = open_source("bilinear-digits")  # default config: 3000 steps, trained once into the temp cache
    assert src.kind == "bundled:bilinear-digits"
    info = json.loads((src.files[0].parent / tiny_models.INFO_FILE).read_text())
    assert info["metrics"]["test_accuracy"] > 0.95
    assert "training bilinear-digits" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bilinear-lm", "tiny-mixtral"])
def test_bundled_lms_train_with_default_config(models_root, name):
    src = open_source(name)
    info = json.loads((src.hf_dir / tiny_models.INFO_FILE).read_text())
    m = info["metrics"]
    assert m["val_loss"] < 0.5 * m["uniform_loss"], m  # well below ln(vocab)
    assert m["seconds"] < 600, m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = build_report(src, layer=1, expert=0 if name == "tiny-mixtral" else None, direction="hosvd:4")
    assert rep.decomposition.exact is (name == "bilinear-lm")


def test_out_dir_with_another_config_is_replaced(tmp_path):
    first = tiny_models.train_digits(tmp_path / "d", steps=30)
    second = tiny_models.train_digits(tmp_path / "d", steps=40)
    assert not second.reused and second.path == first.path
    assert tiny_models.read_training_info(second.path)["config"]["steps"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or trash dirs left


def test_weights_only_model_is_decomposed_without_inputs(tmp_path, rng):
    """A bare safetensors file with a LensLab bilinear layer (no embedding, no head)."""
    path = tmp_path / "layer.safetensors"
    w = {"blk.w.weight": rng.standard_normal((8, 5)), "blk.v.weight": rng.standard_normal((8, 5)),
         "blk.p.weight": rng.standard_normal((3, 8)), "blk.p.bias": rng.standard_normal(3)}
    save_file({k: torch.tensor(v) for k, v in w.items()}, str(path))
    rep = build_report(open_source(path), layer=0, direction="resid:0,2")
    assert rep.model_kind == "weights" and rep.truncation is None and rep.images is None
    assert rep.decomposition.biased and "no held-out inputs" in rep.meta["notes"][-1]
    x = rng.standard_normal((10, 5))
    want = (((x @ w["blk.w.weight"].T) * (x @ w["blk.v.weight"].T)) @ w["blk.p.weight"].T + w["blk.p.bias"])[:, [0, 2]]
    _assert_rel(ev.contributions(rep.decomposition, x).sum(-1), want)
