"""Packed cross-attention layouts (models/cross_attention.py): every backend equals the dense
reference on random layouts, outputs and gradients; LLaMA-3.2-Vision's visibility rule is
transformers' own; no query sees another document's image."""

import random

import pytest
import torch
from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

from models.cross_attention import (
    CrossLayout,
    cross_attention,
    dense_reference_cross_attention,
    mllama_query_ranges,
)


def random_documents(seed: int):
    """Packed documents of text with `<|image|>` tokens: (the layout, per document its token
    count and image token positions), images of 1 to 6 tokens, some adjacent, some documents
    without any, one ending in an image."""
    rng = random.Random(seed)
    images, query_offset, key_offset, docs = [], 0, 0, []
    for _ in range(rng.randint(2, 5)):
        length = rng.randint(3, 14)
        positions = sorted(rng.sample(range(length), rng.randint(0, min(4, length))))
        if rng.random() < 0.3 and positions and positions[-1] + 1 < length:
            positions.append(positions[-1] + 1)  # adjacent image tokens: one group
        positions = sorted(set(positions))
        for start, end in mllama_query_ranges(positions, length):
            tokens = rng.randint(1, 6)
            images.append(
                (key_offset, key_offset + tokens, query_offset + start, query_offset + end)
            )
            key_offset += tokens
        docs.append((length, positions))
        query_offset += length
    return CrossLayout.from_ranges(query_offset, key_offset, images), docs


@pytest.mark.parametrize("seed", range(6))
def test_mllama_rule_is_transformers_cross_attention_token_mask(seed):
    rng = random.Random(seed)
    length = rng.randint(4, 20)
    positions = sorted(rng.sample(range(length), rng.randint(1, 5)))
    image_token = 99
    ids = [image_token if i in positions else 1 for i in range(length)]
    want = [
        (start, length if end == -1 else end)
        for start, end in get_cross_attention_token_mask(ids, image_token)
    ]
    assert mllama_query_ranges(positions, length) == want


@pytest.mark.parametrize("backend", ["sdpa", "flash_emulated", "varlen_emulated"])
@pytest.mark.parametrize("seed", range(5))
def test_every_backend_equals_the_dense_reference(backend, seed):
    layout, _ = random_documents(seed)
    if not layout.num_keys:
        pytest.skip("no image drawn")
    torch.manual_seed(seed)
    q = torch.randn(layout.num_queries, 4, 8, dtype=torch.float32, requires_grad=True)
    k = torch.randn(layout.num_keys, 2, 8, dtype=torch.float32, requires_grad=True)
    v = torch.randn(layout.num_keys, 2, 8, dtype=torch.float32, requires_grad=True)
    grad_out = torch.randn(layout.num_queries, 4, 8, dtype=torch.float32)
    outputs = []
    for run in (
        lambda: cross_attention(q, k, v, layout, backend),
        lambda: dense_reference_cross_attention(q, k, v, layout),
    ):
        out = run()
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        outputs.append((out, *grads))
    for got, want in zip(*outputs, strict=True):
        assert (got - want).abs().max() <= 1e-5  # the emulators compute in fp32, as flash does
    # A query that sees no image has a zero row, and so has its gradient.
    blind = layout.key_end == layout.key_start
    assert outputs[0][0][blind].abs().max() == 0 if blind.any() else True


def test_queries_see_only_their_own_documents_images():
    layout, docs = random_documents(seed=3)
    starts = torch.tensor([0, *torch.cumsum(torch.tensor([n for n, _ in docs]), 0).tolist()])
    key_doc = torch.full((layout.num_keys,), -1)
    for q0, q1, k0, k1 in layout.segments:
        doc = int(torch.searchsorted(starts, torch.tensor(q1 - 1), right=True)) - 1
        assert int(torch.searchsorted(starts, torch.tensor(q0), right=True)) - 1 == doc
        marked = key_doc[k0:k1]
        assert (marked[marked != -1] == doc).all()  # a key is seen by one document only
        key_doc[k0:k1] = doc
    # The tokens before a document's first image token see nothing.
    for (length, positions), start in zip(docs, starts.tolist(), strict=False):
        before = positions[0] if positions else length
        assert (
            layout.key_end[start : start + before] == layout.key_start[start : start + before]
        ).all()


def test_adjacent_images_are_seen_first_alone_then_together():
    # Tokens: 0 text, 1 <|image|>, 2 <|image|>, 3-5 text: image A seen from 1, B from 2.
    ranges = mllama_query_ranges([1, 2], 6)
    assert ranges == [(1, 6), (2, 6)]
    layout = CrossLayout.from_ranges(6, 7, [(0, 3, *ranges[0]), (3, 7, *ranges[1])])
    assert layout.segments == ((1, 2, 0, 3), (2, 6, 0, 7))
    assert len(layout.varlen_calls) == 2  # overlapping key intervals: two calls


def test_images_a_query_sees_must_be_contiguous_in_the_stream():
    with pytest.raises(ValueError, match="query 2 sees images that are not contiguous"):
        CrossLayout.from_ranges(4, 6, [(0, 2, 0, 4), (4, 6, 2, 4)])
