"""Export the chosen setting of a steering search: a vector file, a GGUF control vector, a weight edit.

The chosen setting adds c = α·v at ``site`` of layer L, v = n_L·v̂ (``search_space``):

- vector file: ``save_vector`` of v (one layer, hook = site, method = the source spec) with α,
  scale ``absolute`` and the search's key in its metadata; ``steer apply --alpha α`` with it
  attaches exactly the search's hook (same float32 vector, same α), so it reproduces the numbers;
- GGUF control vector (repeng / llama.cpp): ``export_gguf`` of v scaled by α (resid_post of
  layer N ≥ 1, or resid_pre of N ≥ 2, as that writer allows);
- weight edit (Llama checkpoints): a constant added to the stream is a bias. ``resid_post`` of L
  is the output of block L's MLP add, so c becomes the ``down_proj`` bias of layer L
  (``mlp_bias`` on, every other MLP bias zero); ``attn_out`` of L: the ``o_proj`` bias of L
  (``attention_bias`` on, the others zero); ``resid_pre`` of L ≥ 1 is ``resid_post`` of L − 1;
  ``resid_pre`` of 0: c added to every row of the input embedding (the ``lm_head`` untied). The
  edited model computes what the hooked model computes, up to float32 rounding (tested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.errors import ConfigError
from analysis.sources import open_source
from analysis.steering.vectors import SteeringVector, export_gguf, save_vector


def chosen_vector(result: Any, key: str = "") -> SteeringVector:
    """The chosen setting of a ``SearchResult`` as a one-layer SteeringVector (α in ``meta``)."""
    c, m = result.chosen, result.meta
    return SteeringVector(np.asarray(c["vector"], dtype=np.float32)[None], (int(c["layer"]),), hook=c["site"],
                          position="last", method=str(c["source"]), fingerprint=str(m.get("fingerprint", "")),
                          source=str(m.get("source", "")), contrast=str(m.get("contrast", "")),
                          meta={"alpha": float(c["alpha"]), "scale": "absolute", "search": key,
                                "mean_norm": float(c["mean_norm"]), "effect": float(c["effect"]),
                                m["side"]: float(c[m["side"]])})


def _bias_target(site: str, layer: int) -> tuple[str, int]:
    """(what carries the constant, layer): "mlp" (down_proj bias), "attn" (o_proj bias) or "embed"."""
    if site == "resid_post":
        return "mlp", layer
    if site == "attn_out":
        return "attn", layer
    if site == "resid_pre":
        return ("mlp", layer - 1) if layer > 0 else ("embed", 0)
    raise ConfigError(f"site {site!r} has no weight edit; use resid_pre, attn_out or resid_post")


def edit_weights(source: Any, vector: np.ndarray, alpha: float, *, site: str, layer: int,
                 out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``source`` (a Llama checkpoint) with α·vector added at ``site`` of ``layer`` as weights
    (module docstring); returns the new directory."""
    from analysis.steering.orthogonalize import _write

    src = open_source(source)
    if src.hf_dir is None:
        raise ConfigError(f"{src.label}: a weight edit writes a loadable model, so it needs a Hugging Face directory")
    config = json.loads((src.hf_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ConfigError(f"{src.label}: model_type {config.get('model_type')!r}: the bias edit is written for Llama "
                          "checkpoints (mlp_bias / attention_bias); export the vector file or GGUF instead")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose a new directory or pass overwrite=True")
    c = torch.from_numpy(np.array(vector, dtype=np.float32)) * float(alpha)
    target, at = _bias_target(site, layer)
    tensors = {name: t.contiguous() for name, t in src.iter_tensors()}
    n_layers = int(config["num_hidden_layers"])
    d, d_mlp = int(config["hidden_size"]), int(config["intermediate_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    d_head = int(config.get("head_dim") or d // n_heads)
    dtype = tensors["model.embed_tokens.weight"].dtype
    if target == "embed":
        if config.get("tie_word_embeddings", False) or "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
            config["tie_word_embeddings"] = False
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + c.to(dtype)
    elif target == "mlp":
        config["mlp_bias"] = True
        for i in range(n_layers):
            p = f"model.layers.{i}.mlp."
            for name, size in (("gate_proj", d_mlp), ("up_proj", d_mlp), ("down_proj", d)):
                tensors.setdefault(p + name + ".bias", torch.zeros(size, dtype=dtype))
        name = f"model.layers.{at}.mlp.down_proj.bias"
        tensors[name] = tensors[name] + c.to(dtype)
    else:
        config["attention_bias"] = True
        for i in range(n_layers):
            p = f"model.layers.{i}.self_attn."
            for name, size in (("q_proj", n_heads * d_head), ("k_proj", n_kv * d_head), ("v_proj", n_kv * d_head),
                               ("o_proj", d)):
                tensors.setdefault(p + name + ".bias", torch.zeros(size, dtype=dtype))
        tensors[f"model.layers.{at}.self_attn.o_proj.bias"] = tensors[f"model.layers.{at}.self_attn.o_proj.bias"] \
            + c.to(dtype)
    info = {"source": src.label, "source_fingerprint": src.fingerprint, "edit": "steering-bias", "site": site,
            "layer": layer, "alpha": float(alpha), "carried_by": f"{target}:{at}",
            "directions_digest": "steering-bias"}
    _write(src, out, tensors, config, info, overwrite)
    return out


def export_chosen(result: Any, out: str | os.PathLike | None = None, *, gguf: str | os.PathLike | None = None,
                  weights: str | os.PathLike | None = None, key: str = "", model_hint: str | None = None,
                  source: Any = None, overwrite: bool = False) -> dict[str, str]:
    """Write the chosen setting as a vector file (``out``), a GGUF (``gguf``) and/or a weight edit
    (``weights``, a new model directory); returns what was written. ``source``: the model (default: the
    search's source label), needed for the GGUF's model type and the weight edit."""
    if out is None and gguf is None and weights is None:
        raise ConfigError("nothing to export: give out= (vector file), gguf= and/or weights= (model directory)")
    vec = chosen_vector(result, key)
    alpha = float(result.chosen["alpha"])
    written: dict[str, str] = {}
    if out is not None:
        written["vector"] = str(save_vector(vec, out))
    src = None
    if gguf is not None or weights is not None:
        src = open_source(source if source is not None else result.meta.get("source") or "")
        if src.fingerprint != vec.fingerprint:
            raise ConfigError(f"{src.label} no longer has the fingerprint the search ran on; re-run the search")
    if gguf is not None:
        if model_hint is None:
            if src.hf_dir is None:
                raise ConfigError("pass model_hint= (the model's config.json model_type)")
            model_hint = str(json.loads((src.hf_dir / "config.json").read_text()).get("model_type", ""))
        written["gguf"] = str(export_gguf(vec, gguf, model_hint=model_hint, scale=alpha))
    if weights is not None:
        written["weights"] = str(edit_weights(src, vec.vectors[0], alpha, site=vec.hook, layer=vec.layers[0],
                                              out_dir=weights, overwrite=overwrite))
    return written
