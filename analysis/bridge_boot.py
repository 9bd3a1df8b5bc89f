"""Booting a TransformerLens 4 ``TransformerBridge`` from a local directory: offline, on CPU, no remote code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from analysis import source_layout as layout
from analysis.errors import SourceError

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens.model_bridge import TransformerBridge


def boot_bridge_from_dir(hf_dir: Path, *, dtype: torch.dtype = torch.float32,
                         hf_model: torch.nn.Module | None = None) -> TransformerBridge:
    """Boot a ``TransformerBridge`` from a local directory, offline and without remote code; a
    directory whose weights transformers would unpickle is refused unless this process opened
    that pickle with ``trust_pickle=True`` (prefer ``open_source(dir).boot_bridge()``, which
    also checks the weights are the fingerprinted ones)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformer_lens.model_bridge import TransformerBridge

    if not (hf_dir / "config.json").is_file():
        raise SourceError(f"{hf_dir}: no config.json; a TransformerBridge needs a Hugging Face model directory")
    if hf_model is None:
        layout.refuse_untrusted_pickle(hf_dir)
    try:
        return TransformerBridge.boot_transformers(str(hf_dir), device="cpu", dtype=dtype,
                                                   trust_remote_code=False, hf_model=hf_model)
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{hf_dir}: TransformerBridge could not boot this model ({exc}); "
                          "check that config.json names a supported architecture and a tokenizer is saved") from exc
