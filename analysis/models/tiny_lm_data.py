"""What the tiny LMs read: the docstring corpus split, their byte-level BPE tokenizer, token streams.

Both tiny LMs (``analysis.models.tiny_lm``) train on the docstring corpus
(``analysis.corpus.docstring_corpus``, split by package with ``corpus.split``) with their own
byte-level BPE tokenizer (``tokenizers``), saved with ``PreTrainedTokenizerFast.save_pretrained``
next to ``model.safetensors``. transformers 5 writes ``tokenizer_class: "TokenizersBackend"``, a
class transformers 4.x does not have (``AutoTokenizer`` raises), so ``portable_tokenizer_config``
rewrites ``tokenizer_config.json`` to name ``PreTrainedTokenizerFast``, which both major versions
load (5 aliases it to ``TokenizersBackend``). Cached models saved before this get the same
rewrite when they are reused (no retraining).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from analysis.errors import ConfigError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # loads in transformers 4.x and 5.x


def corpus_texts(packages: Sequence[str] | None, per_package: int | None, seed: int,
                 val_fraction: float) -> tuple[list[str], list[str]]:
    """(training texts, validation texts) of the docstring corpus, split by package with ``seed``.

    ``packages`` None = ``analysis.corpus.DEFAULT_PACKAGES``; ``per_package`` caps items per package.
    Raises ConfigError when either side comes out empty."""
    from analysis.corpus import DEFAULT_PACKAGES, docstring_corpus, split

    items = docstring_corpus(packages or DEFAULT_PACKAGES, per_package=per_package, seed=seed)
    train, val = split(items, [1 - val_fraction, val_fraction], seed=seed, by=lambda d: d.package)
    if not train or not val:
        raise ConfigError(f"the corpus gave {len(train)} training and {len(val)} validation texts; "
                          "use more packages or a larger per_package")
    return [d.text for d in train], [d.text for d in val]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """Token ids of ``<s> text </s>`` for every text, concatenated: (n_tokens,) int64 on the CPU."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += [1, *enc.ids, 2]
    return torch.tensor(ids, dtype=torch.long)


def portable_tokenizer_config(d: Path) -> bool:
    """Make ``d/tokenizer_config.json`` name ``PORTABLE_TOKENIZER_CLASS`` (see the module docstring);
    the file is replaced atomically. Returns True when it was rewritten; a missing or unreadable
    file is left alone (loading the tokenizer reports it)."""
    path = Path(d) / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or cfg.get("tokenizer_class") == PORTABLE_TOKENIZER_CLASS:
        return False
    cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the model still loads with transformers 5
        tmp.unlink(missing_ok=True)
        return False
    return True
