"""Weight orthogonalisation (abliteration): remove directions from everything that writes to the residual stream.

For orthonormal directions R̂ (k, d_model), every matrix whose output lands in the residual
stream becomes W ← W − R̂ᵀ R̂ W (its output never has a component along R̂), biases likewise,
and the token embedding E (vocab, d_model) becomes E ← E − E R̂ᵀ R̂. In a pre-norm
transformer (Llama, Mistral, Mixtral, Qwen, Phi-3) the residual stream is exactly the sum of
these outputs, so the new checkpoint computes what the original computes with the directions
projected out of every writer at run time (``analysis.steering.hooks.ablation``): the same
logits up to float rounding. Post-norm models (BERT/MiniLM) and models that normalise a
block's output before adding it (Gemma 2/3) are refused: there the projection does not
commute with the normalisation.

Writers (Hugging Face names): ``embed_tokens``, ``self_attn.o_proj``, ``mlp.down_proj``, a
shared expert's ``down_proj`` (Qwen2-MoE), and MoE experts' ``w2`` / ``down_proj``, per expert
(what ``save_pretrained`` writes) or fused (n_experts, d_model, d_mlp) (transformers 5's
in-memory state dict). Every model type in ``SUPPORTED`` and both expert layouts are tested
against runtime ablation on tiny random models (tests/analysis/steering/test_steering_weights.py).
A tied ``lm_head`` is untied (written out with the original embedding) so the read-out is
unchanged. The result is a new Hugging Face directory (config, tokenizer, one
``model.safetensors``, ``lenslab_orthogonalize.json``) written to a temp dir and renamed into
place: it loads as a normal model (``open_source(dir)``, ``from_pretrained``).

Device: each writer is projected in float64 on ``device`` (CPU when it is MPS, which has no
float64) one tensor at a time and written from CPU; the result does not depend on the device
beyond float64 rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.device import resolve_device
from analysis.errors import ConfigError, SourceError
from analysis.sources import Source, open_source
from analysis.steering.hooks import orthonormal_basis
from analysis.steering.vectors import SteeringVector, check_compatible
from analysis.progress import Progress

INFO_FILE = "lenslab_orthogonalize.json"
SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3")
# (regex on the tensor name, axis that indexes d_model)
WRITERS: tuple[tuple[str, int], ...] = (
    (r"(^|\.)embed_tokens\.weight$", -1),
    (r"\.self_attn\.o_proj\.(weight|bias)$", 0),
    (r"\.mlp\.down_proj\.(weight|bias)$", 0),
    (r"\.shared_expert\.down_proj\.(weight|bias)$", 0),
    (r"\.experts\.\d+\.(w2|down_proj)\.(weight|bias)$", 0),
    (r"\.experts\.down_proj$", 1),  # fused (n_experts, d_model, d_mlp): transformers 5's in-memory layout
)


def writer_axis(name: str) -> int | None:
    """The d_model axis of a residual-writing tensor, or None when ``name`` does not write."""
    for pattern, axis in WRITERS:
        if re.search(pattern, name):
            return axis
    return None


def orthogonalize_tensor(w: torch.Tensor, basis: torch.Tensor, axis: int) -> torch.Tensor:
    """``w`` with the span of ``basis`` (k, d_model), orthonormal rows, removed along ``axis``;
    computed in float64 on ``basis``'s device, returned in ``w``'s dtype on ``w``'s device."""
    x = w.to(device=basis.device, dtype=torch.float64).movedim(axis, -1)
    x = x - (x @ basis.T) @ basis
    return x.movedim(-1, axis).to(device=w.device, dtype=w.dtype).contiguous()


@dataclass(frozen=True, eq=False)
class OrthogonalizedModel:
    """A written checkpoint and what changed."""

    path: Path
    tensors: tuple[str, ...]  # names of the tensors that were projected
    n_directions: int
    source_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)


def _config(src: Source) -> dict[str, Any]:
    if src.hf_dir is None:
        raise SourceError(f"{src.label}: orthogonalisation writes a loadable model, so it needs a Hugging Face "
                          "directory (config.json + tokenizer), not a bare weights file")
    try:
        return json.loads((src.hf_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{src.hf_dir}/config.json is unreadable ({exc}); re-download the model") from exc


def _directions(directions: Any, src: Source, width: int, allow_foreign: bool) -> torch.Tensor:
    if isinstance(directions, SteeringVector):
        check_compatible(directions, d_model=width, fingerprint=src.fingerprint, allow_foreign=allow_foreign)
        directions = directions.vectors
    return orthonormal_basis(directions, width)


def orthogonalize(source: Any, directions: Any, out_dir: str | os.PathLike, *, overwrite: bool = False,
                  allow_foreign: bool = False, progress: Progress | None = None,
                  device: str | torch.device | None = "cpu") -> OrthogonalizedModel:
    """Write ``source`` with ``directions`` ((d_model,), (k, d_model) or a SteeringVector, whose
    rows are the directions) projected out of every residual writer into ``out_dir``; the
    projections run on ``device`` (``auto | cpu | cuda | mps``, see the module docstring)."""
    run_on = resolve_device(device)
    run_on = torch.device("cpu") if run_on.type == "mps" else run_on
    src = open_source(source)
    config = _config(src)
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED:
        raise ConfigError(f"{src.label}: model_type {model_type!r} is not a pre-norm architecture whose residual "
                          f"stream is the plain sum of its writers; orthogonalisation supports {', '.join(SUPPORTED)}. "
                          "For other models ablate at run time (analysis.steering.hooks.ablation)")
    width = int(config.get("hidden_size", 0))
    basis = _directions(directions, src, width, allow_foreign)  # (k, d_model) float64 on CPU
    basis_on = basis.to(run_on)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose a new directory or pass overwrite=True "
                          "(--overwrite)")
    if src.hf_dir is not None and out.resolve() == src.hf_dir.resolve():
        raise ConfigError(f"{out} is the source model's own directory; write the orthogonalised model elsewhere")
    infos = src.weight_infos()
    names = {i.name for i in infos}
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in names
    tensors: dict[str, torch.Tensor] = {}
    changed: list[str] = []
    for i, (name, t) in enumerate(src.iter_tensors()):
        if progress:
            progress(i, len(src.tensor_infos()), name)
        axis = writer_axis(name)
        if axis is not None and t.is_floating_point():
            if t.shape[axis] != width:
                raise ConfigError(f"{src.label}: {name} has shape {tuple(t.shape)}, whose axis {axis} is not "
                                  f"d_model = {width}; this layout is not supported")
            if tied and name.endswith("embed_tokens.weight"):
                tensors["lm_head.weight"] = t.clone()
            t = orthogonalize_tensor(t, basis_on, axis)
            changed.append(name)
        tensors[name] = t.contiguous()
    n_layers = int(config.get("num_hidden_layers", 0))
    for layer in range(n_layers):
        if not any(re.search(rf"\.layers\.{layer}\.", c) for c in changed):
            raise ConfigError(f"{src.label}: found no residual writers in layer {layer}; the tensor names do not "
                              "follow the Hugging Face layout this supports")
    if not any(c.endswith("embed_tokens.weight") for c in changed):
        raise ConfigError(f"{src.label}: no embed_tokens.weight found; the tensor names do not follow the Hugging "
                          "Face layout this supports")
    digest = hashlib.blake2b(basis.numpy().tobytes(), digest_size=8).hexdigest()
    info = {"source": src.label, "source_fingerprint": src.fingerprint, "model_type": model_type,
            "n_directions": int(basis.shape[0]), "directions_digest": digest, "tensors": changed,
            "untied_lm_head": tied, "directions": basis.numpy().tolist()}
    _write(src, out, tensors, {**config, "tie_word_embeddings": False} if tied else config, info, overwrite)
    if progress:
        progress(len(src.tensor_infos()), len(src.tensor_infos()), "written")
    return OrthogonalizedModel(out, tuple(changed), int(basis.shape[0]), src.fingerprint,
                               {k: v for k, v in info.items() if k != "directions"})


def _write(src: Source, out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], info: dict[str, Any],
           overwrite: bool) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        skip = {"config.json", "lenslab_training.json", INFO_FILE, "model.safetensors.index.json"}
        for f in sorted(src.hf_dir.iterdir()):
            if f.is_file() and f.name not in skip and f.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "lenslab": "orthogonalized", "source_fingerprint": src.fingerprint,
                            "directions_digest": info["directions_digest"]})
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise ConfigError(f"{out} appeared while writing; choose a new directory")
            trash = out.with_name(f".trash-{out.name}-{uuid.uuid4().hex[:8]}")
            os.replace(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def residual_component(path: str | os.PathLike, directions: np.ndarray) -> float:
    """Largest |R̂ W| over the writers of a written checkpoint (≈ 0 after orthogonalisation)."""
    src = open_source(Path(path))
    width = int(json.loads((src.hf_dir / "config.json").read_text())["hidden_size"])
    basis = orthonormal_basis(directions, width)
    worst = 0.0
    for name, t in src.iter_tensors():
        if (axis := writer_axis(name)) is not None:
            proj = t.to(torch.float64).movedim(axis, -1) @ basis.T
            worst = max(worst, float(proj.abs().max()))
    return worst
