"""What is fingerprinted is what runs: a model directory means one weights file, for LensLab and for
transformers alike; a directory naming two is refused; nothing unpickles without the trust flag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis import source_layout as layout
from analysis.errors import AmbiguousSourceError, CorruptCheckpointError, SourceError, UnsafeCheckpointError
from analysis.sources import open_source

TINY_BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 32, "hidden_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
             "max_position_embeddings": 16, "type_vocab_size": 2}


def _bert_weights(seed: int) -> dict[str, torch.Tensor]:
    """A complete state dict of TINY_BERT (a BertModel), distinct per seed."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "architectures"}),
                      add_pooling_layer=False)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _tiny_dir(d: Path, config: dict | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config or TINY_BERT))
    return d


@pytest.fixture
def refuse_unpickling(monkeypatch) -> list[str]:
    """torch.load raises (and is recorded) for the rest of the test: nothing may unpickle."""
    calls: list[str] = []

    def spy(f, *args, **kwargs):
        calls.append(str(f))
        raise AssertionError(f"torch.load({f}) was called: a pickle would have been unpickled")

    monkeypatch.setattr(torch, "load", spy)
    return calls


# -- transformers' own choice, the reference for ours ------------------------------------------------------

def _loaded_seed(d: Path, seeds: dict[int, dict[str, torch.Tensor]]) -> int:
    """Which seed's weights transformers' from_pretrained(d) loaded (its default file order)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(d, add_pooling_layer=False)
    w = model.state_dict()["embeddings.word_embeddings.weight"]
    return next(s for s, ws in seeds.items() if torch.equal(ws["embeddings.word_embeddings.weight"], w))


@pytest.mark.parametrize("layout_name", ["single", "index", "config-names-a-file", "single-beside-index"])
def test_transformers_checkpoint_is_the_file_transformers_loads(tmp_path, layout_name):
    """``transformers_checkpoint`` agrees with transformers itself, including the directory LensLab
    refuses (single + index: transformers silently takes model.safetensors)."""
    seeds = {s: _bert_weights(s) for s in (1, 2)}
    config = dict(TINY_BERT, transformers_weights="b.safetensors") if layout_name == "config-names-a-file" else None
    d = _tiny_dir(tmp_path / layout_name, config)
    files = {1: "model.safetensors", 2: "b.safetensors"}
    if layout_name == "index":
        files = {1: "a.safetensors", 2: "b.safetensors"}
    for seed, name in files.items():
        save_file(seeds[seed], str(d / name))
    if layout_name in ("index", "single-beside-index"):
        (d / layout.SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: "b.safetensors" for k in seeds[2]}}))
    chosen = layout.transformers_checkpoint(d)
    loaded = _loaded_seed(d, seeds)
    expected = {"single": "model.safetensors", "index": layout.SAFETENSORS_INDEX,
                "config-names-a-file": "b.safetensors", "single-beside-index": "model.safetensors"}[layout_name]
    assert chosen == d / expected
    shards = {layout.SAFETENSORS_INDEX: "b.safetensors"}
    assert files[loaded] == shards.get(expected, expected)
    if layout_name == "single-beside-index":
        with pytest.raises(AmbiguousSourceError, match="both model.safetensors and model.safetensors.index.json"):
            open_source(d)
    else:
        src = open_source(d)
        assert src.fingerprint == open_source(d / files[loaded]).fingerprint  # the tensors transformers loaded
        assert src.model_dir() == d


# -- the poisoned directory of the issue, with the real model -------------------------------------------------

def _minilm_copy(minilm, d: Path) -> Path:
    """The bundled MiniLM directory, its files symlinked (nothing large is copied)."""
    d.mkdir()
    for f in Path(minilm.hf_dir).iterdir():
        if f.is_file():
            (d / f.name).symlink_to(f)
    return d


def test_minilm_with_an_index_to_other_weights_is_refused_and_each_file_boots_only_itself(tmp_path, minilm):
    """model.safetensors (weights A) beside an index naming other weights (B): transformers boots A,
    so LensLab may neither fingerprint B for it nor boot A under B's fingerprint."""
    d = _minilm_copy(minilm, tmp_path / "poisoned")
    q = "encoder.layer.0.attention.self.query.weight"
    save_file({q: minilm.tensor(q) * 2}, str(d / "b.safetensors"))
    (d / layout.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {q: "b.safetensors"}}))
    with pytest.raises(AmbiguousSourceError, match=r"both model\.safetensors and model\.safetensors\.index\.json.*"
                                                   r"delete the stale one, or point the source at"):
        open_source(d)
    via_index = open_source(d / layout.SAFETENSORS_INDEX)  # weights B: analysable, but not bootable from d
    with pytest.raises(SourceError, match="transformers would load model.safetensors .* this source's weights are "
                                          "model.safetensors.index.json"):
        via_index.boot_bridge()
    single = open_source(d / "model.safetensors")
    assert single.fingerprint == minilm.fingerprint
    bridge = single.boot_bridge()
    booted = next(v for k, v in bridge.original_model.named_parameters()
                  if "layer.0." in k and "query" in k and k.endswith("weight"))
    assert torch.equal(booted.detach(), single.tensor(q))


def test_safetensors_beside_a_pickle_is_refused_and_never_unpickled(tmp_path, minilm, refuse_unpickling):
    """weights.safetensors + pytorch_model.bin: transformers (which ignores weights.safetensors) would
    unpickle the .bin without --trust-pickle while LensLab fingerprints the safetensors."""
    d = _minilm_copy(minilm, tmp_path / "mixed")
    (d / "model.safetensors").rename(d / "weights.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
    with pytest.raises(AmbiguousSourceError, match=r"safetensors weights \(weights.safetensors\) and pickle weights "
                                                   r"\(pytorch_model.bin\).*point the source at"):
        open_source(d)
    src = open_source(d / "weights.safetensors")  # the fix the message gives: weights analysable ...
    assert src.fingerprint == minilm.fingerprint
    with pytest.raises(SourceError, match="transformers would load pytorch_model.bin"):  # ... but nothing boots
        src.boot_bridge()
    assert refuse_unpickling == []


def test_a_hub_clone_with_model_safetensors_and_pytorch_model_bin_boots_the_safetensors(tmp_path, minilm,
                                                                                       refuse_unpickling):
    """A git clone of a Hugging Face repo often holds both formats. transformers takes model.safetensors
    before pytorch_model.bin (with or without use_safetensors), which is the file LensLab fingerprints:
    no ambiguity, so it opens and boots, and the .bin is never read."""
    d = _minilm_copy(minilm, tmp_path / "hub-clone")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
    src = open_source(d)
    assert src.files == [d / "model.safetensors"] and src.fingerprint == minilm.fingerprint
    assert layout.transformers_checkpoint(d) == d / "model.safetensors"
    bridge = src.boot_bridge()
    q = "encoder.layer.0.attention.self.query.weight"
    booted = next(v for k, v in bridge.original_model.named_parameters()
                  if "layer.0." in k and "query" in k and k.endswith("weight"))
    assert torch.equal(booted.detach(), src.tensor(q))
    assert refuse_unpickling == []


def test_training_files_beside_safetensors_are_not_weights(tmp_path):
    """A Trainer checkpoint (model.safetensors + training_args.bin + optimizer.pt) is not ambiguous."""
    d = _tiny_dir(tmp_path / "checkpoint-10")
    save_file(_bert_weights(0), str(d / "model.safetensors"))
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth"):
        (d / name).write_bytes(b"pickle")
    src = open_source(d)
    assert src.files == [d / "model.safetensors"] and src.model_dir() == d


@pytest.mark.parametrize("config_value, error, match", [
    ("adapter_model.bin", UnsafeCheckpointError, "transformers would unpickle it"),
    ("../outside.safetensors", SourceError, "not a file name inside"),
    (7, SourceError, "not a file name inside"),
], ids=["pickle", "outside", "not-a-string"])
def test_config_naming_an_unsafe_weights_file_is_refused(tmp_path, config_value, error, match):
    d = _tiny_dir(tmp_path / "m", dict(TINY_BERT, transformers_weights=config_value))
    save_file(_bert_weights(0), str(d / "model.safetensors"))
    with pytest.raises(error, match=match):
        open_source(d)


def test_a_tensor_in_two_files_is_refused_naming_both(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    save_file({"w": torch.zeros(2, 2), "a": torch.zeros(1)}, str(d / "first.safetensors"))
    save_file({"w": torch.ones(2, 2)}, str(d / "second.safetensors"))
    with pytest.raises(AmbiguousSourceError, match=r"'w' is defined in both .*first\.safetensors and "
                                                   r".*second\.safetensors"):
        open_source(d)


def test_a_shard_index_cannot_hide_a_second_copy_of_a_tensor(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(d / "s1.safetensors"))
    save_file({"w": torch.ones(2, 2), "v": torch.ones(3)}, str(d / "s2.safetensors"))
    index = d / layout.SAFETENSORS_INDEX
    index.write_text(json.dumps({"weight_map": {"w": "s2.safetensors", "v": "s1.safetensors"}}))
    with pytest.raises(AmbiguousSourceError, match="'w' is defined in both"):
        open_source(d)
    (d / "s1.safetensors").unlink()
    save_file({"u": torch.zeros(1)}, str(d / "s1.safetensors"))
    index.write_text(json.dumps({"weight_map": {"w": "s2.safetensors", "u": "s1.safetensors",
                                                "v": "s1.safetensors"}}))
    with pytest.raises(CorruptCheckpointError, match="puts 'v' in s1.safetensors but s2.safetensors holds it"):
        open_source(d)


def test_pickle_directories_name_one_checkpoint(tmp_path):
    d = tmp_path / "pickles"
    d.mkdir()
    for name in ("optimizer.pt", "weights.pt"):
        torch.save({"w": torch.zeros(2)}, d / name)
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        open_source(d)
    with pytest.raises(AmbiguousSourceError, match="several pickle files .*point the source at the one"):
        open_source(d, trust_pickle=True)
    (d / layout.PICKLE_INDEX).write_text("{}")
    with pytest.raises(SourceError, match="sharded pickle checkpoint .* convert it to safetensors"):
        open_source(d, trust_pickle=True)


def test_transformers_loaders_never_unpickle_without_the_flag(tmp_path, minilm, refuse_unpickling):
    """Every direct from_pretrained call (not only the bridge) reads safetensors only, unless the
    directory's pickle was opened with trust_pickle=True."""
    from analysis.models.encoder import load_encoder

    d = _minilm_copy(minilm, tmp_path / "pickle-only")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
    assert layout.from_pretrained_kwargs(d) == {"use_safetensors": True}
    with pytest.raises(SourceError, match="cannot load an encoder"):
        load_encoder(d)
    assert refuse_unpickling == []


def test_booting_a_pickle_directory_directly_needs_the_flag(tmp_path, refuse_unpickling):
    from analysis.sources import boot_bridge_from_dir

    d = _tiny_dir(tmp_path / "pickled")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
    with pytest.raises(UnsafeCheckpointError, match="transformers would load the pickle pytorch_model.bin"):
        boot_bridge_from_dir(d)
    assert refuse_unpickling == []
    (d / "pytorch_model.bin").unlink()
    for name in ("model.safetensors", layout.SAFETENSORS_INDEX):  # safetensors pass the check
        (d / name).write_text("{}")
        layout.refuse_untrusted_pickle(d)
        (d / name).unlink()


def test_a_trusted_pickle_directory_may_be_loaded_by_transformers(tmp_path):
    d = _tiny_dir(tmp_path / "trusted")
    torch.save(_bert_weights(0), d / "pytorch_model.bin")
    assert layout.from_pretrained_kwargs(d) == {"use_safetensors": True}
    with pytest.warns(UserWarning, match="trust_pickle=True"):
        src = open_source(d, trust_pickle=True)
    assert layout.from_pretrained_kwargs(d) == {"use_safetensors": False}
    assert src.model_dir() == d  # transformers would load the very file that was trusted and fingerprinted


def test_a_weights_file_with_another_name_does_not_boot(tmp_path):
    d = _tiny_dir(tmp_path / "renamed")
    save_file(_bert_weights(0), str(d / "weights.safetensors"))
    src = open_source(d)
    assert src.fingerprint == open_source(d / "weights.safetensors").fingerprint
    with pytest.raises(SourceError, match=r"transformers would load no weights file .*\(one file named "
                                          r"model\.safetensors"):
        src.model_dir()
    shutil.move(d / "weights.safetensors", d / "model.safetensors")
    assert open_source(d).model_dir() == d
