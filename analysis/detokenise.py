"""Token pieces -> readable text, joined the way the tokenizer's own ``decode`` joins them.

One detokeniser for every surface that shows stored tokens (the ``lenslab sae features`` contexts,
the dashboard's SAE feature page): pure, on the token strings a result stores, no tokenizer needed.

- WordPiece (BERT, MiniLM): the rule of the ``tokenizers`` WordPiece decoder. A piece after the
  first starting with ``##`` continues the word (``ga ##uss ##ian`` -> ``gaussian``); any other
  gets a leading space; then each piece gets the decoder's cleanup (`` ,`` -> ``,``, `` .`` ->
  ``.`` ...). So ``"".join(token_texts(pieces, wordpiece=True)) == tokenizer.decode(ids)`` with
  ``clean_up_tokenization_spaces=False`` (the default of transformers 5's BERT tokenizer; 4.x
  also applies a whole-string cleanup on top, e.g. ``it ' s`` -> ``it's``).
- Byte-level BPE and the like: each id was decoded alone (``" the"``), so the pieces already carry
  their spaces and are returned unchanged.

    >>> token_texts(["it", "'", "s", "a", "ga", "##uss", "##ian", ","], wordpiece=True)
    ['it', " '", ' s', ' a', ' ga', 'uss', 'ian', ',']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WORDPIECE_PREFIX = "##"
# tokenizers' WordPiece decoder cleanup (decoders/wordpiece.rs `cleanup`), applied to each piece in order
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def token_texts(tokens: Sequence[str], *, wordpiece: bool) -> list[str]:
    """One display text per token, whose concatenation reads as the decoded text (module docstring)."""
    if not wordpiece:
        return [str(t) for t in tokens]
    out = []
    for i, tok in enumerate(map(str, tokens)):
        if i:
            tok = tok[len(WORDPIECE_PREFIX):] if tok.startswith(WORDPIECE_PREFIX) else f" {tok}"
        for dirty, clean in _CLEANUP:
            tok = tok.replace(dirty, clean)
        out.append(tok)
    return out


def detokenise(tokens: Sequence[str], *, wordpiece: bool) -> str:
    """The text of ``tokens``: ``"".join(token_texts(tokens, wordpiece=wordpiece))``."""
    return "".join(token_texts(tokens, wordpiece=wordpiece))


def is_wordpiece(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` writes word continuations as ``##`` pieces (BERT's WordPiece)."""
    vocab = getattr(tokenizer, "vocab", None) or {}
    return type(tokenizer).__name__.startswith("Bert") or any(
        t.startswith(WORDPIECE_PREFIX) for t in list(vocab)[:5000])
