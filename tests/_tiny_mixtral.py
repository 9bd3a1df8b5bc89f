"""A random 2-layer Mixtral (4 experts, top-2) with a small BPE tokenizer, built offline in a
second: a routed MoE for tests that must not wait for ``tiny-mixtral`` to train."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_mixtral(d: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["numpy arrays and pandas frames", "torch tensors", "json dumps"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = MixtralConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=64)
        MixtralForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d
