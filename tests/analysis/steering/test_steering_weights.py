"""Weight orthogonalisation against runtime ablation, and steering vectors as files (safetensors, GGUF)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _support import assert_close_f32
from _tiny_llama import make_tiny_llama
from _tiny_mixtral import make_tiny_mixtral

from analysis.steering import extract as S
from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError, SourceError
from analysis.steering.orthogonalize import INFO_FILE, SUPPORTED, orthogonalize, residual_component, writer_axis
from analysis.sources import open_source
from analysis.steering.hooks import ablation, attached_hook_count, orthonormal_basis, steering
from analysis.steering.vectors import SteeringVector, export_gguf, from_extraction, load_vector, save_vector

TEXTS = ["Return a new tensor of zeros.", ">>> np.zeros((3, 4))", "The answer is correct."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("orth")
    return {"llama": make_tiny_llama(root / "llama"), "llama-tied": make_tiny_llama(root / "tied", tie=True),
            "mixtral": make_tiny_mixtral(root / "mixtral")}


def logits(bridge, texts=TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = S.tokenize(bridge, texts, padding_side="left")
    with torch.no_grad():
        return bridge(ids, attention_mask=mask), mask.bool()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "mixtral"])
def test_orthogonalised_weights_match_runtime_ablation(models, kind, k, tmp_path):
    src = open_source(models[kind])
    bridge = src.boot_bridge()
    r = np.random.default_rng(k).standard_normal((k, bridge.cfg.d_model))
    res = orthogonalize(src, r, tmp_path / "out")
    with ablation(bridge, r):
        want, mask = logits(bridge)
    assert attached_hook_count(bridge) == 0
    got, _ = logits(open_source(res.path).boot_bridge())
    plain, _ = logits(bridge)
    assert float((got - want)[mask].abs().max()) < 1e-4
    assert float((got - plain)[mask].abs().max()) > 1e-2  # the ablation did change the model
    assert residual_component(res.path, r) < 1e-6
    n_layers = bridge.cfg.n_layers
    n_expert = 4 if kind == "mixtral" else 1
    assert len(res.tensors) == 1 + n_layers * (1 + n_expert)  # embedding + o_proj + down_proj per expert
    info = json.loads((res.path / INFO_FILE).read_text())
    assert info["source_fingerprint"] == src.fingerprint and info["untied_lm_head"] is (kind == "llama-tied")


def test_svd_subspace_round_trips_and_orthogonalises_like_runtime_ablation(models, tmp_path):
    """A k-row svd vector removes its whole subspace: W ← W − R̂ᵀR̂W with R̂ orthonormal, the same
    logits as projecting R̂ out at run time, after a save/load round trip."""
    from analysis.steering.contrasts import load_contrasts

    src = open_source(models["llama"])
    bridge = src.boot_bridge()
    ext = S.extract(bridge, load_contrasts("numpy-torch"), layers=[1], k=3)
    vec = from_extraction(ext, 1, "svd", fingerprint=src.fingerprint, source=src.label)
    assert vec.k == 3 and vec.vectors.shape == (3, 32) and "svd k=3" in vec.describe()
    np.testing.assert_allclose(vec.vectors @ vec.vectors.T, np.eye(3), atol=1e-6)  # SVD directions: orthonormal
    back = load_vector(save_vector(vec, tmp_path / "svd.safetensors"))
    assert back.k == 3 and back.method == "svd" and back.layers == (1,)
    np.testing.assert_array_equal(back.vectors, vec.vectors)
    np.testing.assert_array_equal(back.rows(1), vec.vectors)

    res = orthogonalize(src, back, tmp_path / "out")
    assert res.n_directions == 3 and residual_component(res.path, back.vectors) < 1e-6
    with ablation(bridge, back):
        want, mask = logits(bridge)
    got, _ = logits(open_source(res.path).boot_bridge())
    assert float((got - want)[mask].abs().max()) < 1e-4
    one = orthogonalize(src, back.row(0), tmp_path / "one")  # a single row removes less
    assert one.n_directions == 1
    first, _ = logits(open_source(one.path).boot_bridge())
    assert float((first - got)[mask].abs().max()) > 1e-3


def test_a_k_row_vector_must_pick_a_row_to_steer(models, rng, tmp_path):
    bridge = open_source(models["llama"]).boot_bridge()
    vec = SteeringVector(rng.standard_normal((4, 32)), (0, 1), method="svd", k=2)
    with pytest.raises(ConfigError, match=r"holds k=2 directions per layer.* choose a row with vector.row\(i\), i in "
                                          r"0\.\.1"):
        with steering(bridge, vec, alpha=1.0):
            pass  # pragma: no cover
    assert attached_hook_count(bridge) == 0
    row = vec.row(1)
    assert row.k == 1 and row.method == "svd[1]" and row.layers == (0, 1)
    np.testing.assert_array_equal(row.vectors, vec.vectors[[1, 3]])
    with steering(bridge, row, alpha=1.0):
        assert attached_hook_count(bridge) == 2
    with pytest.raises(ConfigError, match="row 2 does not exist"):
        vec.row(2)
    with pytest.raises(ConfigError, match="holds k=2 directions"):
        export_gguf(SteeringVector(vec.vectors, (1, 2), method="svd", k=2), tmp_path / "x.gguf", model_hint="llama")
    with pytest.raises(ShapeError, match=r"needs 2 \(d_model,\) row\(s\) per layer"):
        SteeringVector(np.ones((3, 32)), (0, 1), k=2)


def test_svd_vectors_need_the_rank_and_the_extracted_k(models):
    from analysis.steering.contrasts import parse_contrasts

    bridge = open_source(models["llama"]).boot_bridge()
    cs = parse_contrasts("\n".join(f'{{"positive": "a tensor {i}", "negative": "an array {i}"}}' for i in range(5)))
    ext = S.extract(bridge, cs, layers=[0], k=6, methods=["mean_diff"])  # 4 training pairs: rank <= 4
    with pytest.raises(ConfigError, match=r"layer 0 has only 4 SVD direction\(s\).* ask for k <= 4"):
        from_extraction(ext, 0, "svd")
    with pytest.raises(ConfigError, match=r"k=7 must be an integer in 1\.\.6"):
        from_extraction(ext, 0, "svd", k=7)
    assert from_extraction(ext, 0, "svd", k=4).k == 4


def make_tiny_causal_lm(d, model_type: str, tokenizer_dir, *, fused: bool = False):
    """A random 2-layer model of ``model_type`` (d_model 32, GQA, 4 experts top-2 for MoEs) with the
    tiny Llama's tokenizer, built offline. ``fused=True`` writes the model's in-memory state dict
    as is: transformers 5 keeps MoE experts fused, ``experts.down_proj`` (n_experts, d_model,
    d_mlp), while ``save_pretrained`` splits them into per-expert tensors."""
    import shutil

    import transformers
    from safetensors.torch import save_file

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    moe = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    configs = {"mistral": lambda: transformers.MistralConfig(**common),
               "qwen2": lambda: transformers.Qwen2Config(**common),
               "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **common),
               "phi3": lambda: transformers.Phi3Config(**common),
               "qwen2_moe": lambda: transformers.Qwen2MoeConfig(shared_expert_intermediate_size=24, **moe, **common),
               "qwen3_moe": lambda: transformers.Qwen3MoeConfig(head_dim=8, **moe, **common),
               "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(configs[model_type]())
        with torch.no_grad():  # larger than HF's init, so an ablation visibly changes the logits
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.2)
    model.save_pretrained(d)
    if fused:
        for f in d.glob("*.safetensors"):
            f.unlink()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    return d


LAYOUTS = [("mistral", False), ("qwen2", False), ("qwen3", False), ("phi3", False), ("qwen2_moe", False),
           ("qwen3_moe", False), ("qwen2_moe", True), ("qwen3_moe", True), ("mixtral", True)]


def test_every_supported_model_type_is_tested():
    assert set(SUPPORTED) <= {"llama", "mixtral"} | {t for t, _ in LAYOUTS}  # llama, mixtral: test above


@pytest.mark.parametrize(("model_type", "fused"), LAYOUTS, ids=[f"{t}{'-fused' if f else ''}" for t, f in LAYOUTS])
def test_orthogonalised_layouts_match_runtime_ablation(models, tmp_path, model_type, fused):
    src = open_source(make_tiny_causal_lm(tmp_path / "m", model_type, models["llama"], fused=fused))
    names = [i.name for i in src.tensor_infos()]
    assert any(n.endswith(".experts.down_proj") for n in names) is fused  # the layout under test
    bridge = src.boot_bridge()
    r = np.random.default_rng(1).standard_normal((2, 32))
    res = orthogonalize(src, r, tmp_path / "out")
    with ablation(bridge, r):
        want, mask = logits(bridge)
    got, _ = logits(open_source(res.path).boot_bridge())
    plain, _ = logits(bridge)
    assert float((got - want)[mask].abs().max()) < 1e-4
    assert float((got - plain)[mask].abs().max()) > 1e-2
    assert residual_component(res.path, r) < 1e-6
    experts = [n for n in res.tensors if ".experts." in n]
    assert len(experts) == (0 if "moe" not in model_type and model_type != "mixtral" else 2 if fused else 8)
    assert sum(".shared_expert." in n for n in res.tensors) == (2 if model_type == "qwen2_moe" else 0)


def test_orthogonalised_checkpoint_loads_as_a_normal_hf_model(models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = open_source(models["llama"])
    r = np.random.default_rng(0).standard_normal(32)
    res = orthogonalize(src, r, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(res.path)
    u = torch.tensor(r / np.linalg.norm(r), dtype=torch.float32)
    with torch.no_grad():
        assert float((model.model.embed_tokens.weight @ u).abs().max()) < 1e-5
        assert float((u @ model.model.layers[0].self_attn.o_proj.weight).abs().max()) < 1e-5
    assert (res.path / "tokenizer.json").is_file()
    assert open_source(res.path).fingerprint != src.fingerprint


def test_writer_axes():
    assert writer_axis("model.embed_tokens.weight") == -1
    assert writer_axis("model.layers.3.self_attn.o_proj.weight") == 0
    assert writer_axis("model.layers.3.block_sparse_moe.experts.2.w2.weight") == 0
    assert writer_axis("model.layers.0.mlp.experts.down_proj") == 1
    assert writer_axis("model.layers.3.self_attn.q_proj.weight") is None
    assert writer_axis("lm_head.weight") is None


def test_orthogonalisation_refuses_post_norm_models_and_occupied_dirs(models, minilm, tmp_path):
    with pytest.raises(ConfigError, match="model_type 'bert' is not a pre-norm architecture"):
        orthogonalize(minilm, np.ones(384), tmp_path / "bert")
    assert not (tmp_path / "bert").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        orthogonalize(models["llama"], np.ones(32), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ShapeError, match="d_model = 32"):
        orthogonalize(models["llama"], np.ones(384), tmp_path / "wide")
    with pytest.raises(ConfigError, match="linearly dependent"):
        orthogonalize(models["llama"], np.stack([np.ones(32), 2 * np.ones(32)]), tmp_path / "dep")
    foreign = SteeringVector(np.ones((1, 32)), (0,), fingerprint="0" * 32)
    with pytest.raises(ConfigError, match="not from this model"):
        orthogonalize(models["llama"], foreign, tmp_path / "foreign")
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_orthonormal_basis_spans_the_directions(rng):
    r = rng.standard_normal((3, 10))
    q = orthonormal_basis(r, 10).numpy()
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(r @ q.T @ q, r, atol=1e-12)  # same span


# ----------------------------------------------------------------------------- files
def vector(rng, layers=(0, 1)) -> SteeringVector:
    return SteeringVector(rng.standard_normal((len(layers), 32)), layers, hook="resid_post", position="mean",
                          method="pca", fingerprint="a" * 32, source="bilinear-lm", contrast="numpy-torch",
                          contrast_fingerprint="b" * 32, meta={"note": 1})


def test_vector_round_trips_with_its_provenance(rng, tmp_path):
    vec = vector(rng)
    back = load_vector(save_vector(vec, tmp_path / "v.safetensors"))
    np.testing.assert_array_equal(back.vectors, vec.vectors)
    for field in ("layers", "hook", "position", "method", "fingerprint", "source", "contrast", "contrast_fingerprint",
                  "meta"):
        assert getattr(back, field) == getattr(vec, field), field
    assert not list(tmp_path.glob(".*.tmp"))


def test_loading_something_else_is_a_typed_error(rng, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(SourceError, match="no such file"):
        load_vector(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SourceError, match="not a LensLab steering vector"):
        load_vector(tmp_path / "plain.safetensors")
    path = save_vector(vector(rng), tmp_path / "v.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(CorruptCheckpointError):
        load_vector(tmp_path / "cut.safetensors")
    meta = {"format": "lenslab-steering-vector-1", "layers": "[0, 1]", "d_model": "3"}
    save_file({"layer.0": torch.zeros(3)}, str(tmp_path / "odd.safetensors"), metadata=meta)
    with pytest.raises(CorruptCheckpointError, match="do not match the layers"):
        load_vector(tmp_path / "odd.safetensors")


def llama_cpp_control_vector(path) -> dict[int, np.ndarray]:
    """Read a control-vector GGUF by the rules of llama.cpp's loader (common/common.cpp,
    common_control_vector_load_one): every tensor is named direction.<N> with an integer N > 0,
    F32, 1-D, all of one length; anything else rejects the whole file. Returns {N: row}."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out, widths = {}, set()
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        assert prefix == "direction" and index.lstrip("-").isdigit(), f"unparsable layer index: {t.name}"
        assert int(index) > 0, f"invalid (zero) direction tensor layer index: {t.name}"
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, f"non-F32 direction tensor: {t.name}"
        assert len(t.shape) == 1, f"non-1D direction tensor: {t.name} {t.shape}"
        widths.add(int(t.n_elements))
        out[int(index)] = np.array(t.data)
    assert len(widths) == 1, f"direction tensors of different lengths {widths}"
    return out


def test_gguf_export_follows_the_llama_cpp_loader_rules(rng, tmp_path):
    gguf = pytest.importorskip("gguf")
    vec = vector(rng, layers=(1, 3))
    export_gguf(vec, tmp_path / "v.gguf", model_hint="llama", scale=2.0)
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    rows = llama_cpp_control_vector(tmp_path / "v.gguf")
    assert sorted(rows) == [1, 3] and all(r.shape == (32,) for r in rows.values())  # direction.N = output of block N
    np.testing.assert_allclose(rows[3], 2.0 * vec.vectors[1], rtol=1e-6)
    # resid_pre of block L is the output of block L - 1
    pre = SteeringVector(vec.vectors, (2, 4), hook="resid_pre")
    export_gguf(pre, tmp_path / "pre.gguf", model_hint="llama")
    assert sorted(llama_cpp_control_vector(tmp_path / "pre.gguf")) == [1, 3]


@pytest.mark.parametrize(("hook", "layers", "match"), [
    ("resid_post", (0,), r"resid_post of layer 0 is the output of block 0, which llama.cpp never steers"),
    ("resid_post", (0, 1), r"resid_post of layer 0 is the output of block 0"),
    ("resid_pre", (1,), r"resid_pre of layer 1 is the output of block 0"),
    ("resid_pre", (0,), r"resid_pre of layer 0 is the output of the embedding"),
    ("mlp_out", (2,), r"extracted at mlp_out, inside a block; re-extract with --hook resid_post"),
    ("resid_mid", (2,), r"extracted at resid_mid"),
])
def test_gguf_export_refuses_what_a_control_vector_cannot_express(tmp_path, hook, layers, match):
    pytest.importorskip("gguf")
    vec = SteeringVector(np.ones((len(layers), 4)), layers, hook=hook)
    with pytest.raises(ConfigError, match=match):
        export_gguf(vec, tmp_path / "x.gguf", model_hint="llama")
    assert not list(tmp_path.iterdir())  # nothing written, no temp file left


def test_resid_pre_of_a_block_is_the_output_of_the_one_before(tmp_path):
    """The identity behind direction.N = resid_pre of block N + 1: steering either gives the same logits."""
    bridge = open_source(make_tiny_llama(tmp_path / "llama3", n_layers=3)).boot_bridge()
    v = np.random.default_rng(5).standard_normal(bridge.cfg.d_model)
    with steering(bridge, v, alpha=1.5, layers=[2], hook="resid_pre"):
        pre, mask = logits(bridge)
    with steering(bridge, v, alpha=1.5, layers=[1], hook="resid_post"):
        post, _ = logits(bridge)
    plain, _ = logits(bridge)
    assert_close_f32(pre, post)
    assert float((pre - plain)[mask].abs().max()) > 1e-2


def test_steering_vector_validates_itself():
    with pytest.raises(ShapeError, match=r"needs 1 \(d_model,\) row\(s\) per layer"):
        SteeringVector(np.ones((2, 4)), (0,))
    with pytest.raises(ConfigError, match="at least one layer"):
        SteeringVector(np.ones((0, 4)), ())
    with pytest.raises(ShapeError, match="NaN or inf"):
        SteeringVector(np.full((1, 4), np.inf), (0,))
