"""A random 2-layer BERT (hidden 32, 4 heads) with MiniLM's WordPiece tokenizer, saved as safetensors: a
bootable masked LM for tests that must not wait for MiniLM itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def make_tiny_bert(d: Path, *, max_positions: int = 64, seed: int = 0) -> Path:
    """Write the model and MiniLM's tokenizer files to ``d`` (global RNG state untouched); returns ``d``."""
    from transformers import BertConfig, BertModel

    from analysis.bundled import BUNDLED

    minilm = Path(BUNDLED["minilm"]())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=max_positions), add_pooling_layer=False
                  ).save_pretrained(d, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, d / name)
    return d
