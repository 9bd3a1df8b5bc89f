"""Model sources: resolution, tensor-by-tensor reading, fingerprints, and bad checkpoints."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.errors import CorruptCheckpointError, SourceError, UnsafeCheckpointError
from analysis.sources import SAFETENSORS_INDEX, Source, open_source


@pytest.fixture
def small_weights(rng) -> dict[str, torch.Tensor]:
    return {
        "layers.0.proj.weight": torch.from_numpy(rng.standard_normal((16, 8)).astype(np.float32)),
        "layers.0.proj.bias": torch.from_numpy(rng.standard_normal(16).astype(np.float32)),
        "layers.1.proj.weight": torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32)),
        "head.weight": torch.from_numpy(rng.standard_normal((4, 8))).to(torch.bfloat16),
        "position_ids": torch.arange(10),
    }


@pytest.fixture
def st_file(tmp_path, small_weights):
    path = tmp_path / "model.safetensors"
    save_file(small_weights, str(path))
    return path


def test_minilm_bundled_source_reads_every_tensor(minilm):
    infos = minilm.tensor_infos()
    names = [i.name for i in infos]
    assert names == sorted(names)
    assert "encoder.layer.0.attention.self.query.weight" in names
    weights = minilm.weight_infos()
    assert all(i.dtype == "F32" for i in weights)
    assert "embeddings.position_ids" not in {i.name for i in weights}  # int buffer, not a weight
    assert 22_000_000 < minilm.n_params < 23_000_000
    t = minilm.tensor("encoder.layer.0.attention.self.query.weight")
    assert tuple(t.shape) == (384, 384)


def test_safetensors_file_reads_lazily_and_matches(st_file, small_weights):
    src = open_source(st_file)
    assert src.kind == "safetensors"
    assert {i.name for i in src.tensor_infos()} == set(small_weights)
    for name, t in src.iter_tensors():
        assert torch.equal(t, small_weights[name])
        assert t.dtype == small_weights[name].dtype


def test_fingerprint_stable_across_copies_and_sensitive_to_one_weight(tmp_path, st_file, small_weights):
    fp = open_source(st_file).fingerprint
    assert len(fp) == 32
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy(st_file, copy)
    assert open_source(copy).fingerprint == fp
    changed = dict(small_weights)
    w = changed["layers.1.proj.weight"].clone()
    w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(np.inf))  # one ulp in one weight
    changed["layers.1.proj.weight"] = w
    other = tmp_path / "changed.safetensors"
    save_file(changed, str(other))
    assert open_source(other).fingerprint != fp


def test_fingerprint_stable_across_processes(st_file):
    code = ("from analysis.sources import open_source; import sys; "
            f"print(open_source(sys.argv[1]).fingerprint)")
    out = subprocess.run([sys.executable, "-c", code, str(st_file)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == open_source(st_file).fingerprint


def test_sharded_checkpoint_equals_single_file(tmp_path, st_file, small_weights):
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = sorted(small_weights)
    weight_map = {}
    for k, chunk in enumerate((names[:2], names[2:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: small_weights[n] for n in chunk}, str(shard_dir / fname))
        weight_map.update({n: fname for n in chunk})
    (shard_dir / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = open_source(shard_dir)
    single = open_source(st_file)
    assert [i.name for i in sharded.tensor_infos()] == [i.name for i in single.tensor_infos()]
    assert sharded.fingerprint == single.fingerprint
    # the index file itself is a valid spec too
    assert open_source(shard_dir / SAFETENSORS_INDEX).fingerprint == single.fingerprint


def test_sharded_checkpoint_with_missing_shard(tmp_path, small_weights):
    d = tmp_path / "broken"
    d.mkdir()
    save_file({"a.weight": small_weights["layers.0.proj.weight"]}, str(d / "s1.safetensors"))
    (d / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a.weight": "s1.safetensors",
                                                                  "b.weight": "s2.safetensors"}}))
    with pytest.raises(CorruptCheckpointError, match="shard 's2.safetensors'.*missing"):
        open_source(d)


def test_module_source_fingerprint_matches_saved_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = tmp_path / "m.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    src = open_source(model)
    assert src.kind == "module"
    assert src.fingerprint == open_source(path).fingerprint
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    assert open_source(model).fingerprint != open_source(path).fingerprint  # in-place edits are seen


@pytest.mark.parametrize("cut", [4, 20, -7], ids=["in-length", "in-header", "in-data"])
def test_truncated_safetensors_is_a_typed_error(tmp_path, st_file, cut):
    data = st_file.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        open_source(bad)


def test_corrupt_header_json_and_offsets(tmp_path, st_file):
    data = bytearray(st_file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(bytes(data[:8]) + b"\xff" * n + bytes(data[8 + n:]))
    with pytest.raises(CorruptCheckpointError, match="not valid UTF-8 JSON"):
        open_source(garbled)
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 4]
    raw = json.dumps(header).encode()
    shifted = tmp_path / "shifted.safetensors"
    shifted.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n:]))
    with pytest.raises(CorruptCheckpointError, match="declares offsets"):
        open_source(shifted)


def test_pickle_refused_without_trust_flag_and_loaded_safely_with_it(tmp_path, small_weights):
    path = tmp_path / "pytorch_model.bin"
    torch.save(small_weights, path)
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        open_source(path)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        open_source(tmp_path)  # a directory holding only the pickle
    with pytest.warns(UserWarning, match="weights_only=True"):
        src = open_source(path, trust_pickle=True)
    assert torch.equal(src.tensor("layers.0.proj.weight"), small_weights["layers.0.proj.weight"])


def test_pickle_with_code_is_refused_even_with_trust_flag(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError, match="weights_only=True"):
        open_source(path, trust_pickle=True)


def test_unknown_name_and_missing_path():
    with pytest.raises(SourceError, match="neither a bundled model name .*minilm"):
        open_source("no-such-model")
    with pytest.raises(SourceError, match="existing path"):
        open_source("/nonexistent/dir/model.safetensors")


def test_unsupported_file_and_empty_dir(tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    with pytest.raises(SourceError, match="unsupported file type"):
        open_source(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no model.safetensors"):
        open_source(empty)


def test_empty_model_is_refused_by_analyze(tmp_path):
    from app import api

    path = tmp_path / "empty.safetensors"
    save_file({"position_ids": torch.arange(3)}, str(path))
    with pytest.raises(SourceError, match="no floating-point tensors"):
        api.analyze(path, store=tmp_path / "s")


def test_bare_weights_file_cannot_boot_a_bridge(st_file):
    with pytest.raises(SourceError, match="Hugging Face directory"):
        open_source(st_file).boot_bridge()


def test_minilm_boots_a_transformer_bridge_offline(minilm):
    bridge = minilm.boot_bridge()
    assert bridge.cfg.n_layers == 6 and bridge.cfg.d_model == 384
    _, cache = bridge.run_with_cache("weights tell a story", names_filter=lambda n: n == "blocks.0.attn.hook_z")
    z = cache["blocks.0.attn.hook_z"]
    assert z.shape[-2:] == (12, 32)
    # the bridge's weights are the checkpoint's weights
    hf = dict(bridge.original_model.named_parameters())
    q = next(v for k, v in hf.items() if "layer.0." in k and "query" in k and k.endswith("weight"))
    assert torch.equal(q.detach(), minilm.tensor("encoder.layer.0.attention.self.query.weight"))


def test_safetensors_roundtrip_of_source_tensors(tmp_path, minilm):
    """Tensors read one by one can be re-saved and give the same fingerprint (content, not container)."""
    out = tmp_path / "resaved.safetensors"
    save_file({n: t.contiguous() for n, t in minilm.iter_tensors()}, str(out))
    assert open_source(out).fingerprint == minilm.fingerprint
    assert set(load_file(str(out))) == {i.name for i in minilm.tensor_infos()}


def test_trained_bundled_names_resolve_to_tiny_models():
    from analysis import sources
    from analysis.models import tiny_lm as tiny_models

    assert set(sources.TRAINED_NAMES) == set(tiny_models.BUNDLED_TRAINED)
    assert set(sources.TRAINED_NAMES) <= set(sources.BUNDLED)


def _reference_fingerprint(path, *, version: int) -> str:
    """The documented definition, from safetensors' own reader with a byte copy per tensor. Version
    2 (current): a version line, then name|dtype|shape and bytes of every non-integer tensor in name
    order. Version 1 (before): every tensor, integer buffers included, no version line."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    if version == 2:
        h.update(b"lenslab-fingerprint-2\n")
    tensors = load_file(str(path))
    for name in sorted(tensors):
        t = tensors[name]
        if version == 2 and not (t.is_floating_point() or t.is_complex()):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_fingerprint_is_blake2b_of_names_dtypes_shapes_and_bytes_of_weights(minilm, st_file):
    """Both sources hold an integer buffer (position_ids): it is not hashed, and no fingerprint equals
    the version-1 value, so results stored under version 1 are never served for version 2."""
    for src, path in ((minilm, minilm.files[0]), (open_source(st_file), st_file)):
        want = _reference_fingerprint(path, version=2)
        assert Source._compute_fingerprint(src) == want  # the hashing itself, not the per-file memo
        assert src.fingerprint == want
        assert src.fingerprint != _reference_fingerprint(path, version=1)


def test_fingerprint_ignores_integer_buffers(tmp_path, small_weights):
    """Documented: integer buffers are not weights. Dropping or changing one keeps the fingerprint."""
    base = tmp_path / "base.safetensors"
    save_file(small_weights, str(base))
    variants = {"dropped": {k: v for k, v in small_weights.items() if k != "position_ids"},
                "changed": {**small_weights, "position_ids": torch.arange(10) * 3},
                "added": {**small_weights, "token_type_ids": torch.zeros(1, 10, dtype=torch.int64),
                          "attn.mask": torch.ones(4, dtype=torch.bool)}}
    for name, tensors in variants.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        assert open_source(tmp_path / f"{name}.safetensors").fingerprint == open_source(base).fingerprint, name


def test_minilm_resaved_with_save_pretrained_has_the_bundled_fingerprint(tmp_path, minilm):
    """save_pretrained drops the position_ids buffer; all 103 weight tensors are byte-identical, so the
    fingerprint (and every cached result) is the bundled model's."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm.hf_dir, use_safetensors=True)
    model.save_pretrained(tmp_path / "resaved")
    resaved = open_source(tmp_path / "resaved")
    names = {i.name for i in resaved.tensor_infos()}
    assert "embeddings.position_ids" in {i.name for i in minilm.tensor_infos()} - names
    assert len(resaved.weight_infos()) == len(minilm.weight_infos()) == 103
    assert resaved.fingerprint == minilm.fingerprint


def test_overlapping_tensors_are_refused_like_safetensors_does(tmp_path):
    from safetensors import safe_open

    def write(name, header, n_data):
        raw = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * n_data)
        return path

    overlap = write("overlap.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12)
    with pytest.raises(Exception, match="invalid offset"):
        safe_open(str(overlap), "pt")  # the reference refuses it too
    with pytest.raises(CorruptCheckpointError, match="tensors 'a' and 'b' overlap"):
        open_source(overlap)
    aliased = write("aliased.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, 8)
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        open_source(aliased)
    empty = tmp_path / "empty-tensors.safetensors"  # zero-size tensors share an offset legitimately
    save_file({"a": torch.zeros(0, 3), "b": torch.ones(2), "c": torch.zeros(0)}, str(empty))
    assert {n: tuple(t.shape) for n, t in open_source(empty).iter_tensors()} == {"a": (0, 3), "b": (2,), "c": (0,)}


@pytest.mark.timeout(30)  # before the fix, opening the FIFO blocked forever
@pytest.mark.parametrize("layout", ["file", "in-directory", "shard-index", "shard"])
def test_fifos_and_other_special_files_are_refused_without_blocking(tmp_path, layout):
    import os

    d = tmp_path / "m"
    d.mkdir()
    if layout == "file":
        os.mkfifo(spec := d / "model.safetensors")
    elif layout == "in-directory":
        os.mkfifo(d / "weights.safetensors")
        spec = d
    elif layout == "shard-index":
        os.mkfifo(spec := d / SAFETENSORS_INDEX)
    else:
        os.mkfifo(d / "s1.safetensors")
        (d / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"w": "s1.safetensors"}}))
        spec = d
    with pytest.raises(SourceError, match=r"is a named pipe \(FIFO\), not a regular file"):
        open_source(spec)
    other = tmp_path / "other"
    (other / "w.safetensors").mkdir(parents=True)  # a directory that looks like a weights file
    with pytest.raises(SourceError, match="is a directory, not a regular file"):
        open_source(other)
