"""A random 2-layer Llama with a BPE tokenizer trained on the bundled contrast sets, built offline in
about a second: a bootable causal LM for steering tests that must not wait for ``bilinear-lm``.
The tokenizer's vocabulary holds the contrast sets' concept tokens (`` tensor``, `` array``, ...)."""

from __future__ import annotations

from pathlib import Path

import torch

# Docstring-like sentences over the tokenizer's concept words: a small corpus for SAE tests on the tiny Llama
TOY_WORDS = ["tensor", "array", "frame", "model", "value", "index", "shape", "file"]
TOY_TEXTS = [f"the {a} of a {b} returns a new {c}" for a in TOY_WORDS for b in TOY_WORDS for c in TOY_WORDS[:2]]
TOY_HELD = [f"a {a} with the {b} of each {a}" for a in TOY_WORDS for b in TOY_WORDS[:4]]


def make_tiny_llama(d: Path, *, d_model: int = 32, n_layers: int = 2, seed: int = 0, tie: bool = False) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from analysis.steering.contrasts import bundled_contrasts, load_contrasts

    texts = []
    for name in bundled_contrasts():
        cs = load_contrasts(name)
        texts += [t for p in cs.pairs for t in (p.positive, p.negative)]
        texts += list(cs.concept_positive + cs.concept_negative) * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                           show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                          num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # larger random weights than HF's init, so steering visibly moves the logits
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(d)
    fast.save_pretrained(d)
    return d


def hf_loss_with_hook(bridge, input_ids, mask, module, fn) -> float:
    """Next-token cross-entropy (float64, pad targets ignored) of the bridge's own HF model with the output of
    ``module`` replaced by ``fn(module_input, module_output)``: the reference that loss splicing is checked
    against (``sae.lm_loss``)."""
    import torch.nn.functional as F

    h = module.register_forward_hook(lambda mod, inp, out: fn(inp[0], out))
    try:
        with torch.no_grad():
            logits = bridge.original_model(input_ids=input_ids, attention_mask=mask).logits
    finally:
        h.remove()
    target = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return float(F.cross_entropy(logits[:, :-1].double().flatten(0, 1), target.flatten(), ignore_index=-100))
