"""The ~1B-decoder SAE benchmark's pieces (``benchmarks/sae_1b.py``) on a tiny Llama: the parameter
formula against the built model, write -> LensLab harvest -> HF peer -> SAE training -> table, and (slow)
the whole command in its child processes."""

from __future__ import annotations

import math

import pytest
from _tiny_llama import TOY_TEXTS

from benchmarks import sae_1b
from benchmarks.large_checkpoint import LlamaShape
from sae.harvest import open_activation_cache
from sae.memory import training_bytes

TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, dtype="BF16")


@pytest.mark.parametrize("sizes", [TINY, {**TINY, "kv_heads": 4, "layers": 3}, {**TINY, "heads": 8, "kv_heads": 1}],
                         ids=["gqa", "mha", "mqa"])
def test_n_params_is_the_built_models_parameter_count(sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LlamaShape(**sizes)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in shape.config().items() if k != "torch_dtype"}))
    assert sae_1b.n_params(shape) == sum(p.numel() for p in model.parameters())
    assert sae_1b.n_params(shape) == sum(math.prod(s) for _, s in shape.tensors())  # what the writer streams


def test_default_shape_is_about_one_billion_parameters():
    shape = LlamaShape(dtype="BF16")
    assert sae_1b.n_params(shape) == sum(math.prod(s) for _, s in shape.tensors())
    assert 1.0e9 <= sae_1b.n_params(shape) <= 1.2e9
    assert shape.n_bytes() == 2 * sae_1b.n_params(shape)


# float32 with HF's eager attention (the kernel the bridge forces) agrees to rounding; bf16 with HF's default
# attention to bf16's resolution (8 bits: 0.4% per rounding, over two layers)
@pytest.mark.parametrize("dtype, attn, rel_tol", [("float32", "eager", 1e-4), ("bfloat16", "default", 0.05)])
def test_pieces_end_to_end_on_a_tiny_decoder(tmp_path, dtype, attn, rel_tol):
    shape = LlamaShape(**TINY)
    d = tmp_path / "llama"
    w = sae_1b.write_model(d, tmp_path, shape, harvest_tokens=200, max_length=32, tokenizer_vocab=300,
                           texts=TOY_TEXTS)
    assert w["n_params"] == sae_1b.n_params(shape) and w["tokens"] >= 200 and w["shards"] == 1
    h = sae_1b.harvest_stage(d, tmp_path, layer=1, max_length=32, batch_tokens=96, model_dtype=dtype,
                             harvest_dtype=dtype)
    assert set(h["sites"]) == {"resid_post", "hook_z"}
    assert {s["tokens"] for s in h["sites"].values()} == {w["tokens"]}
    assert {s["d_in"] for s in h["sites"].values()} == {64}  # d_model; hook_z: 4 heads x 16
    resid = h["sites"]["resid_post"]["path"]
    assert open_activation_cache(resid).hook_name == "blocks.1.hook_resid_post"
    assert not (tmp_path / "warmup").exists()

    hf = sae_1b.hf_stage(d, tmp_path, resid, layer=1, batch_tokens=96, model_dtype=dtype, attn=attn)
    assert hf["n_params"] == sae_1b.n_params(shape) and hf["tokens"] == w["tokens"] and hf["batches"] > 1
    assert 0 < hf["to_hook_seconds"] <= hf["seconds"]
    diff, scale, n = sae_1b.agreement(tmp_path, resid)  # LensLab's resid_post vs HF's hooked layer output
    assert n > 0 and diff <= rel_tol * scale

    t = sae_1b.train_stage(resid, d_sae=128, k=8, batch=64, steps=3, dtype=dtype)
    assert t["tokens"] == 3 * 64 and t["steps"] == 3 and t["d_sae"] == 128
    assert t["predicted"] == training_bytes(d_in=64, d_sae=128, batch_size=64, architecture="topk", dtype=dtype,
                                            n_tokens=w["tokens"]).total
    assert t["growth"] >= 0 and t["l0"] <= 8

    args = sae_1b._parser().parse_args(["--k", "8", "--batch", "64", "--model-dtype", dtype])
    for r in (w, h, hf, t):  # what run_child adds
        r.update(peak_rss=r["vm_hwm"], peak_anon=0, peak_file=0)
    table = sae_1b.report(shape, 1, args, w, h, hf, t, (diff, scale, n))
    lines = table.splitlines()
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert sum(line.startswith("| harvest |") for line in lines) == 5 and "| 1.00x |" in table
    assert "measured / predicted" in table and "<= 24 GiB" in table and ": met" in table


def test_layer_outside_the_model_is_refused():
    with pytest.raises(SystemExit, match="--layer 5 must be in"):
        sae_1b.main(["--layers", "2", "--layer", "5"])


@pytest.mark.slow
def test_the_command_runs_its_children_and_deletes_the_temp_dir(tmp_path, capsys):
    args = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
            "--vocab", "512", "--harvest-tokens", "300", "--max-length", "32", "--batch-tokens", "128",
            "--tokenizer-vocab", "300", "--train-steps", "2", "--batch", "64", "--d-sae", "128", "--k", "8",
            "--threads", "1", "--tmp-dir", str(tmp_path)]
    assert sae_1b.main(args) == 0
    out = capsys.readouterr().out
    assert f"{sae_1b.n_params(LlamaShape(**TINY)):,} parameters" in out
    assert "| train |" in out and "| 1.00x |" in out and ": met" in out
    assert list(tmp_path.iterdir()) == []  # the checkpoint and caches are gone
