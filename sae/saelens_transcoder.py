"""Save and load transcoders in SAELens 6.x's on-disk format (what its ``Transcoder.save_model`` /
``SAE.load_from_disk`` write and read; SAELens has no training class for transcoders, so its
inference ``save_model`` is the writer).

A directory with

- ``cfg.json``: SAELens's ``TranscoderConfig.to_dict()``: ``d_in``, ``d_sae``, ``dtype``
  ("float32"), ``device`` ("cpu"), ``apply_b_dec_to_input`` (false: SAELens refuses true for
  transcoders), ``normalize_activations`` ("none"), ``reshape_activations`` ("none"),
  ``metadata``, ``d_out`` and ``architecture``: ``transcoder`` / ``skip_transcoder`` (ReLU
  encoder) or ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (``threshold``).
  ``metadata`` holds ``hook_name`` (the MLP input, ``blocks.L.mlp.hook_in``) and
  ``hook_name_out`` (``blocks.L.hook_mlp_out``; SAELens's loaders record the output hook there),
  ``model_name``, the SAELens versions, and our full ``TranscoderConfig`` as ``lenslab_config``.
- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out], ``b_enc``
  [d_sae], ``b_dec`` [d_out]; skip kinds add ``W_skip`` [d_out, d_in]; jumprelu kinds add
  ``threshold`` [d_sae].

SAELens computes f = act(x W_enc + b_enc) (no b_dec centring), y = f W_dec + b_dec (+ x W_skip^T),
which is ``sae.transcoder.Transcoder`` with architecture relu / jumprelu, so weights load as
stored. A TopK transcoder has no SAELens class: saving one raises ConfigError naming the fix.
Files are written to temp names and renamed into place, weights first and ``cfg.json`` last
(``sae.saelens_format``'s writer). Loading checks the cfg and the safetensors header before
reading a tensor: malformed files raise ``CorruptCheckpointError``; valid but unsupported
settings (another architecture or hook, activation normalisation) raise ``ConfigError``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from analysis.errors import ConfigError, CorruptCheckpointError
from sae.saelens_format import (CFG_FILENAME, SAELENS_FORMAT_VERSION, WEIGHTS_FILENAME, _atomic_write, _read_cfg,
                                file_int, read_checked_weights)
from sae.transcoder import SAELENS_ARCHITECTURES, Transcoder, TranscoderConfig

TRANSCODER_ARCHITECTURES = tuple(SAELENS_ARCHITECTURES.values())
_FROM_SAELENS = {name: arch_skip for arch_skip, name in SAELENS_ARCHITECTURES.items()}
# the MLP input under the names SAELens's loaders give it (ln2.hook_normalized: Gemma Scope's transcoders)
_HOOK_IN = re.compile(r"^blocks\.(\d+)\.(?:mlp\.hook_in|ln2\.hook_normalized)$")
_HOOK_OUT = re.compile(r"^blocks\.(\d+)\.hook_mlp_out$")
_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_out"), "b_enc": ("d_sae",), "b_dec": ("d_out",),
           "W_skip": ("d_out", "d_in"), "threshold": ("d_sae",)}


def is_transcoder_dir(directory: str | os.PathLike) -> bool:
    """True when ``directory``'s cfg.json names one of SAELens's transcoder architectures."""
    path = Path(directory) / CFG_FILENAME
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("architecture") in TRANSCODER_ARCHITECTURES


def saelens_transcoder_cfg_dict(tc: Transcoder) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens 6.54 writes for this transcoder (ConfigError for topk)."""
    c = tc.cfg
    arch = c.saelens_architecture
    if arch is None:
        raise ConfigError(f"a {c.architecture} transcoder has no SAELens format: SAELens 6.54 registers "
                          f"{', '.join(TRANSCODER_ARCHITECTURES)} (ReLU or JumpReLU encoders) and no TopK transcoder; "
                          "train it with architecture='relu' or 'jumprelu' (lenslab sae transcoder --architecture "
                          "relu|jumprelu) to save it for SAELens")
    return {
        "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
                     "hook_name": c.hook_in, "hook_name_out": c.hook_out,
                     "model_name": tc.source_label or None, "hook_head_index": None,
                     "hook_head_index_out": None, "prepend_bos": True, "written_by": "lenslab",
                     "lenslab_config": c.to_dict()},
        "d_out": c.d_out, "architecture": arch,
    }


def save_transcoder_saelens(tc: Transcoder, directory: str | os.PathLike) -> Path:
    """Write ``tc`` (relu or jumprelu) in SAELens format into ``directory`` (created); returns it.
    SAELens loads it with ``SAE.load_from_disk``. ConfigError for a TopK transcoder, before writing."""
    from safetensors.torch import save_file

    cfg = saelens_transcoder_cfg_dict(tc)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = {n: getattr(tc, n).detach().to(torch.float32).contiguous().cpu() for n in tc.weight_names}
    _atomic_write(d / WEIGHTS_FILENAME, lambda p: save_file(weights, str(p)))
    text = json.dumps(cfg, indent=2)
    _atomic_write(d / CFG_FILENAME, lambda p: p.write_text(text))
    return d


def _hooks(cfg: dict[str, Any], path: Path) -> int:
    """The block the transcoder reads and writes (its hooks checked)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_in = meta.get("hook_name") or cfg.get("hook_name")
    hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
    if not isinstance(hook_in, str):
        raise CorruptCheckpointError(f"{path}: no hook_name (neither metadata.hook_name nor hook_name); a "
                                     "transcoder reads blocks.L.mlp.hook_in: add it to cfg.json")
    m = _HOOK_IN.match(hook_in)
    if m is None:
        raise ConfigError(f"{path}: transcoder hook_name {hook_in!r} is not an MLP input; LensLab transcoders read "
                          "blocks.L.mlp.hook_in and predict blocks.L.hook_mlp_out: load transcoders of that pair")
    layer = int(m.group(1))
    if hook_out is not None and (not isinstance(hook_out, str) or (mo := _HOOK_OUT.match(hook_out)) is None
                                 or int(mo.group(1)) != layer):
        raise ConfigError(f"{path}: transcoder hook_name_out {hook_out!r} is not blocks.{layer}.hook_mlp_out; "
                          "LensLab transcoders predict the MLP output of the block whose input they read")
    return layer


def _config(cfg: dict[str, Any], path: Path) -> TranscoderConfig:
    arch_name = cfg.get("architecture")
    if not isinstance(arch_name, str) or arch_name not in _FROM_SAELENS:
        raise ConfigError(f"{path}: SAELens architecture {arch_name!r} is not a transcoder; LensLab loads "
                          f"{', '.join(TRANSCODER_ARCHITECTURES)} (SAEs: sae.saelens_format.load_saelens)")
    if cfg.get("normalize_activations", "none") not in (None, "none", False):
        raise ConfigError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold "
                          "the scaling into the weights in SAELens and save with 'none'")
    if cfg.get("apply_b_dec_to_input", False):
        raise ConfigError(f"{path}: apply_b_dec_to_input=true, which SAELens refuses for transcoders (b_dec lives "
                          "in the output space); re-save the transcoder with it false")
    layer = _hooks(cfg, path)
    arch, skip = _FROM_SAELENS[arch_name]
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    try:
        d_in, d_out, d_sae = (file_int(cfg[n], n, path) for n in ("d_in", "d_out", "d_sae"))
        ours = meta.get("lenslab_config")
        if isinstance(ours, dict):
            tc_cfg = TranscoderConfig.from_dict(ours)
            file_says = (d_in, d_out, d_sae, arch, skip, layer)
            if (tc_cfg.d_in, tc_cfg.d_out, tc_cfg.d_sae, tc_cfg.architecture, tc_cfg.skip, tc_cfg.layer) != file_says:
                raise ConfigError(f"metadata.lenslab_config disagrees with cfg.json {file_says}")
            return tc_cfg
        return TranscoderConfig(d_in=d_in, d_out=d_out, d_sae=d_sae, architecture=arch, skip=skip, layer=layer)
    except CorruptCheckpointError:
        raise
    except KeyError as exc:
        raise CorruptCheckpointError(f"{path}: missing key {exc}; a transcoder's cfg.json carries d_in, d_out, d_sae "
                                     "and architecture: re-save it") from exc
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: inconsistent or malformed config ({exc}); re-save the transcoder") \
            from exc


def load_transcoder_saelens(directory: str | os.PathLike) -> Transcoder:
    """Read a transcoder in SAELens format (ours or one SAELens wrote); weights become float32.
    ``.source_label`` is the file's ``metadata.model_name`` ("" when absent)."""
    d = Path(directory)
    cfg = _read_cfg(d)
    tc_cfg = _config(cfg, d / CFG_FILENAME)
    tc = Transcoder(tc_cfg)
    wpath, tensors = read_checked_weights(d, {n: n for n in tc.weight_names}, _SHAPES,
                                          {"d_in": tc_cfg.d_in, "d_out": tc_cfg.d_out, "d_sae": tc_cfg.d_sae},
                                          cfg["architecture"], "transcoder")
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise CorruptCheckpointError(f"{wpath}: tensors {bad} hold NaN or inf; the transcoder diverged or the file is "
                                     "corrupt: retrain or re-save it")
    if "threshold" in tensors and bool((tensors["threshold"] < 0).any()):
        raise ConfigError(f"{wpath}: a jumprelu threshold is negative ({float(tensors['threshold'].min()):g}); "
                          "SAELens keeps thresholds >= 0: clamp them to 0 and re-save")
    with torch.no_grad():
        for n, t in tensors.items():
            getattr(tc, n).copy_(t)
    tc.eval()
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    tc.source_label = str(meta.get("model_name") or "")
    return tc


__all__ = ["TRANSCODER_ARCHITECTURES", "is_transcoder_dir", "load_transcoder_saelens", "save_transcoder_saelens",
           "saelens_transcoder_cfg_dict"]
