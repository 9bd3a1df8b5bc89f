"""The weights a feature's logit effect goes through: per-head W_O of a layer and the unembedding.

Read from the source's stored tensors (``Source.tensor``), one tensor each, no model boot:

- ``attention_output(source, layer, n_heads)`` -> W_O [n_heads, d_head, d_model], the output
  projection split by head (head h's z_h [d_head] writes z_h @ W_O[h] into the residual stream;
  the same as TransformerBridge's ``blocks[L].attn.W_O``). Biases are ignored (a feature's
  direction has none).
- ``unembedding(source)`` -> (W_U [d_model, vocab], note):
  - causal LMs (Llama / Mistral / Mixtral / Qwen / GPT-2 naming): ``lm_head.weight``ᵀ (or the tied
    input embedding), with the final norm's scale γ folded in (W_U <- diag(γ) W_U, TransformerLens'
    ``fold_ln``); the normalisation's division is ignored (a direct-path effect);
  - BERT encoders such as MiniLM (no language-model head in the checkpoint): the tied word
    embeddings ``embeddings.word_embeddings.weight``ᵀ. The masked-LM head's transform (dense +
    GELU + LayerNorm) and every LayerNorm after the layer are ignored: the effect is "which
    tokens' embeddings the feature's output direction points at".

Unknown layouts raise SourceError naming the tensors looked for.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from analysis.errors import SourceError

# (regex with {layer}, layout): "out_in" = nn.Linear weight [d_model, n_heads*d_head]; "in_out" = GPT-2 Conv1D
_W_O_PATTERNS = (
    (r"(?:.*\.)?layers\.{layer}\.self_attn\.o_proj\.weight", "out_in"),
    (r"(?:.*\.)?layer\.{layer}\.attention\.output\.dense\.weight", "out_in"),
    (r"(?:.*\.)?h\.{layer}\.attn\.c_proj\.weight", "in_out"),
    (r"(?:.*\.)?layers\.{layer}\.attention\.dense\.weight", "out_in"),
)
# (unembedding, tied fallback, final-norm scale, note)
_W_U_LAYOUTS = (
    ("lm_head.weight", r"(?:.*\.)?embed_tokens\.weight", r"(?:.*\.)?model\.norm\.weight",
     "lm_head (final RMSNorm scale folded in)"),
    ("lm_head.weight", r"(?:.*\.)?wte\.weight", r"(?:.*\.)?ln_f\.weight", "lm_head / tied wte (ln_f scale folded in)"),
    (None, r"(?:.*\.)?embeddings\.word_embeddings\.weight", None,
     "tied word embeddings (BERT encoder: no LM head; LayerNorms and the MLM transform ignored)"),
)


def _find(names: list[str], pattern: str) -> str | None:
    rx = re.compile(pattern)
    hits = [n for n in names if rx.fullmatch(n)]
    return min(hits, key=len) if hits else None


def attention_output(source: Any, layer: int, n_heads: int) -> torch.Tensor:
    """W_O of ``layer`` split by head: [n_heads, d_head, d_model] (float32)."""
    names = [i.name for i in source.tensor_infos()]
    for pattern, layout in _W_O_PATTERNS:
        name = _find(names, pattern.format(layer=int(layer)))
        if name is None:
            continue
        w = source.tensor(name).to(torch.float32)
        w = w.T if layout == "out_in" else w  # -> [n_heads*d_head, d_model]
        if w.shape[0] % n_heads:
            raise SourceError(f"{source.label}: {name} has {w.shape[0]} input columns, not divisible by "
                              f"{n_heads} heads; check the SAE's n_heads against the model")
        return w.reshape(n_heads, w.shape[0] // n_heads, w.shape[1]).contiguous()
    looked = ", ".join(p.format(layer=layer) for p, _ in _W_O_PATTERNS)
    raise SourceError(f"{source.label}: no attention output projection for layer {layer} (looked for {looked}); "
                      "logit effects support Llama/Mistral/Mixtral/Qwen, GPT-2 and BERT naming")


def unembedding(source: Any) -> tuple[torch.Tensor, str]:
    """(W_U [d_model, vocab] float32, a note saying which tensors were used)."""
    names = [i.name for i in source.tensor_infos()]
    for head, tied, norm, note in _W_U_LAYOUTS:
        tied_name = _find(names, tied)  # the input embedding identifies the model family
        if tied_name is None:
            continue
        name = head if head in names else tied_name
        w = source.tensor(name).to(torch.float32).T.contiguous()  # [d_model, vocab]
        norm_name = _find(names, norm) if norm else None
        if norm_name is not None:
            w = source.tensor(norm_name).to(torch.float32)[:, None] * w
        return w, f"{note}: {name}" + (f" x {norm_name}" if norm_name else "")
    raise SourceError(f"{source.label}: no unembedding found (looked for lm_head.weight, a tied embed_tokens / wte, "
                      "or BERT word embeddings); logit effects need one of them")
