"""The shared detokeniser against the tokenizers' own decode: MiniLM's WordPiece and a byte-level BPE."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.detokenise import detokenise, is_wordpiece, token_texts

TRICKY = ["It's a Gaussian, don't you think? I'm sure they're 'quoted' ... do not !? x.shape (3, 4)",
          "np.ndarray.__array_function__(self, *args, **kwargs) -> Tensor[float32]; see `torch.nn.functional`.",
          "Ünïcödé naïve café — résumé, straße; 数据 (data) ½ ✓"]


@pytest.fixture(scope="module")
def wordpiece():
    from transformers import AutoTokenizer

    from analysis.bundled import BUNDLED

    return AutoTokenizer.from_pretrained(BUNDLED["minilm"]())


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from sae.harvest import sae_corpus

    return TRICKY + [d.text for d in sae_corpus("train", per_package=15)]


def test_wordpiece_pieces_read_as_the_tokenizers_decode(wordpiece, texts):
    """Every window (from the start and from a random token, so mid-word starts are included) joins
    to exactly what the tokenizer's decode gives for those ids."""
    rng = np.random.default_rng(0)
    n = 0
    for text in texts:
        ids = wordpiece(text, truncation=True, max_length=128)["input_ids"]
        for start in (0, int(rng.integers(len(ids)))):
            window = ids[start:start + 17]
            pieces = wordpiece.convert_ids_to_tokens(window)
            assert detokenise(pieces, wordpiece=True) == wordpiece.decode(window, clean_up_tokenization_spaces=False)
            n += 1
    assert n >= 2 * len(texts)
    assert any("##" in "".join(wordpiece.convert_ids_to_tokens(wordpiece(t)["input_ids"])) for t in texts)


def test_wordpiece_example_from_the_issue(wordpiece):
    ids = wordpiece("gaussian", add_special_tokens=False)["input_ids"]
    pieces = wordpiece.convert_ids_to_tokens(ids)
    assert len(pieces) > 1 and pieces[1].startswith("##")  # split into pieces, as in `ga##uss##ian`
    assert token_texts(["x", *pieces], wordpiece=True)[1:] == [" " + pieces[0]] + [p[2:] for p in pieces[1:]]
    assert detokenise(pieces, wordpiece=True) == "gaussian"
    assert is_wordpiece(wordpiece)


def test_byte_level_pieces_are_kept_and_read_as_the_decode(tmp_path):
    """A byte-level BPE stores each id decoded alone (sae.jobs.decoder): already spaced, unchanged."""
    from transformers import AutoTokenizer

    from _tiny_llama import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "llama"))
    assert not is_wordpiece(tok)
    for text in ["the tensor of a frame returns a new array", "Returns a new NumPy array, like torch.zeros(3)."]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [tok.decode([i]) for i in ids]
        assert token_texts(pieces, wordpiece=False) == pieces
        assert detokenise(pieces, wordpiece=False) == tok.decode(ids) == text
