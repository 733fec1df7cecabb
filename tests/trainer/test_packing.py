import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.batch import IGNORE_INDEX
from models.config import ModelConfig
from models.split_vlm import SplitVLM
from trainer.data.decode import Document
from trainer.data.packing import (
    collate,
    pack_step,
    plan_micro_batches,
    plan_rank_balance,
)
from trainer.distributed import all_reduce_max


def make_doc(sample_id: str, segments: list[tuple[str, int]], seed: int = 0) -> Document:
    generator = torch.Generator().manual_seed(seed)
    num_tokens = sum(n for _, n in segments)
    num_image = sum(n for k, n in segments if k == "image")
    num_images = sum(1 for k, _ in segments if k == "image")
    return Document(
        sample_id=sample_id,
        input_ids=torch.randint(5, 100, (num_tokens,), generator=generator),
        target_mask=torch.rand(num_tokens, generator=generator) > 0.3,
        segments=segments,
        pixel_values=torch.randn(num_images, 3, 4, 4, generator=generator),
        image_mask=torch.rand(num_image, generator=generator) > 0.5,
        image_span_full=torch.zeros(num_image, dtype=torch.bool),
    )


def random_docs(rng: random.Random, count: int) -> list[Document]:
    docs = []
    for i in range(count):
        segments = [("text", rng.randint(1, 30))]
        for _ in range(rng.randint(0, 3)):
            segments += [("image", rng.choice((1, 4, 16))), ("text", rng.randint(1, 10))]
        docs.append(make_doc(f"s{i}", segments, seed=i))
    return docs


@pytest.mark.parametrize("seed", range(20))
def test_plan_keeps_every_sample_once_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 40))]
    max_tokens = rng.randint(max(lengths), 600)
    min_bins = rng.randint(1, len(lengths))
    bins = plan_micro_batches(lengths, max_tokens, min_bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_tokens for b in bins)
    assert len(bins) >= min_bins and all(bins)
    # First-fit-decreasing is never worse than twice the lower bound on the bin count.
    lower_bound = -(-sum(lengths) // max_tokens)
    if min_bins == 1:
        assert len(bins) <= 2 * lower_bound


def test_plan_rejects_a_sample_over_the_budget():
    with pytest.raises(ValueError, match="exceeds data.max_tokens=10"):
        plan_micro_batches([3, 11], max_tokens=10)


def test_collate_positions_labels_and_stream_indices():
    docs = [
        make_doc("a", [("text", 3), ("image", 4), ("text", 2)], seed=1),
        make_doc("b", [("text", 5)], seed=2),
        make_doc("c", [("text", 1), ("image", 2), ("image", 2), ("text", 1)], seed=3),
    ]
    batch = collate(docs)
    assert batch.sample_ids == ["a", "b", "c"]
    assert batch.num_tokens == 9 + 5 + 6
    assert batch.layout.position_ids.tolist() == [*range(9), *range(5), *range(6)]
    # Labels never cross a document boundary, and follow each document's target mask.
    offset = 0
    for doc in docs:
        labels = batch.labels[offset : offset + doc.num_tokens]
        assert labels[-1] == IGNORE_INDEX
        for t in range(doc.num_tokens - 1):
            want = doc.input_ids[t + 1] if doc.target_mask[t + 1] else IGNORE_INDEX
            assert labels[t] == want
        offset += doc.num_tokens
    assert batch.image_index.tolist() == [3, 4, 5, 6, 15, 16, 17, 18]
    assert sorted(batch.text_index.tolist() + batch.image_index.tolist()) == list(range(20))
    assert batch.text_layout.cu_seqlens.tolist() == [0, 5, 10, 12]
    assert batch.image_layout.cu_seqlens.tolist() == [0, 4, 6, 8]
    assert torch.equal(batch.image_mask, torch.cat([d.image_mask for d in docs]))
    assert batch.pixel_values.shape[0] == 3


def test_causal_image_attention_turns_image_spans_into_text():
    doc = make_doc("a", [("text", 2), ("image", 3), ("text", 2)])
    bidirectional, causal = collate([doc]), collate([doc], image_attention="causal")
    image_token = 3
    assert bidirectional.layout.vis_end[image_token] == 4  # sees the whole span
    assert causal.layout.vis_end[image_token] == image_token  # sees only itself and before


def test_prefix_attention_makes_everything_before_the_first_target_one_block():
    """PaliGemma's prefix-LM: [image, <bos> prompt \n] bidirectional, the answer causal, the
    prefix text still text tokens; a later image is causal; no targets: all of it is prefix."""
    doc = make_doc("a", [("image", 4), ("text", 4), ("text", 3), ("image", 2), ("text", 1)])
    doc.target_mask[:] = False
    doc.target_mask[8:] = True  # the answer starts at token 8
    plain = make_doc("b", [("text", 2), ("image", 2)])
    plain.target_mask[:] = False
    batch = collate([doc, plain], image_attention="prefix")
    vis_end = batch.layout.vis_end.tolist()
    assert vis_end[:8] == [7] * 8  # image and prompt see the whole prefix
    assert vis_end[8:14] == list(range(8, 14))  # the answer and the later image: causal
    assert vis_end[14:] == [17] * 4
    assert batch.image_index.tolist() == [0, 1, 2, 3, 11, 12, 16, 17]
    assert batch.text_index.tolist()[:7] == [4, 5, 6, 7, 8, 9, 10]
    assert batch.image_layout.vis_end.tolist() == [3, 3, 3, 3, 4, 5, 7, 7]


def test_pack_step_splits_to_the_agreed_count():
    docs = random_docs(random.Random(0), 12)
    packed = pack_step(docs, max_tokens=4096, agree_num_micro_batches=lambda m: max(m, 5))
    assert len(packed) == 5
    assert sorted(s for mb in packed for s in mb.sample_ids) == sorted(d.sample_id for d in docs)


def _agree_worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rng = random.Random(rank)
        # Rank 0 gets short samples (few micro-batches), rank 1 long ones (many).
        docs = (
            random_docs(rng, 16)
            if rank == 0
            else [make_doc(f"l{i}", [("text", 90)]) for i in range(16)]
        )
        packed = pack_step(docs, max_tokens=200, agree_num_micro_batches=all_reduce_max)
        results[rank] = (len(packed), sorted(s for mb in packed for s in mb.sample_ids))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_micro_batch_count_over_gloo():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_agree_worker, args=(2, port, results), nprocs=2, join=True)
    (count0, ids0), (count1, ids1) = results[0], results[1]
    assert count0 == count1 == 8  # rank 1 needs 16 × 90 / 200 → 8 micro-batches; rank 0 follows
    assert ids0 == sorted(f"s{i}" for i in range(16))
    assert ids1 == sorted(f"l{i}" for i in range(16))


def test_image_rope_positions_by_mode():
    doc = make_doc("a", [("text", 2), ("image", 4), ("text", 1)])
    sequential = collate([doc]).rope_positions
    assert sequential.tolist() == [[t, t] for t in range(7)]
    shared = collate([doc], image_positions="shared").rope_positions
    assert shared[:, 0].tolist() == [0, 1, 2, 2, 2, 2, 6] and torch.equal(
        shared[:, 0], shared[:, 1]
    )
    grid = collate([doc], image_positions="2d").rope_positions
    # A 2×2 span starting at position 2: (row, column) offsets from the span's first position.
    assert grid[2:6].tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    assert grid[6].tolist() == [6, 6]  # text continues at its own position


# Skipped samples can leave a rank with few or no documents; it must still run M micro-batches.


def doc(num_tokens: int, name: str) -> Document:
    return Document(
        sample_id=name,
        input_ids=torch.arange(num_tokens) % 7,
        target_mask=torch.ones(num_tokens, dtype=torch.bool),
        segments=[("text", num_tokens)],
        pixel_values=torch.zeros(0, 3, 32, 32),
        image_mask=torch.zeros(0, dtype=torch.bool),
        image_span_full=torch.zeros(0, dtype=torch.bool),
    )


def test_a_rank_without_documents_runs_the_agreed_number_of_empty_micro_batches():
    agreed = []

    def agree(m: int) -> int:
        agreed.append(m)
        return 3  # another rank needs three

    micro_batches = pack_step([], max_tokens=64, agree_num_micro_batches=agree)
    assert agreed == [1]  # a rank with nothing still asks for one: M is never 0
    assert len(micro_batches) == 3
    assert all(mb.num_text_targets == 0 and mb.num_tokens == 1 for mb in micro_batches)
    # Fewer documents than micro-batches: every document in its own, fillers for the rest.
    micro_batches = pack_step([doc(5, "a")], 64, agree_num_micro_batches=lambda m: 3)
    assert [mb.sample_ids for mb in micro_batches] == [["a"], ["<filler>"], ["<filler>"]]
    micro_batches = pack_step([doc(5, "a"), doc(6, "b")], 64, agree_num_micro_batches=lambda m: 2)
    assert sorted(mb.sample_ids for mb in micro_batches) == [["a"], ["b"]]


def test_a_filler_micro_batch_adds_zero_loss_and_zero_gradient():
    torch.manual_seed(0)
    model = SplitVLM(ModelConfig(vocab_size=11))
    (filler,) = pack_step([], 64)
    out = model(filler)
    loss = out["text_loss_sum"] + out["image_loss_sum"]
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_rank_balance_plan_assigns_every_document_once_and_evens_the_loads():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [
            [
                rng.choice([rng.randint(20, 200), rng.randint(200, 3000)])
                for _ in range(rng.randint(0, 12))
            ]
            for _ in range(rng.randint(1, 8))
        ]
        plan = plan_rank_balance(lengths)
        assert plan == plan_rank_balance(lengths)  # every rank computes the same plan
        everything = sorted(key for keys in plan for key in keys)
        assert everything == [(r, i) for r, ls in enumerate(lengths) for i in range(len(ls))]
        before = [sum(ls) for ls in lengths]
        after = [sum(lengths[r][i] for r, i in keys) for keys in plan]
        assert max(after) <= max(before)
        # Greedy stops only when no document could narrow the widest gap.
        heavy = max(range(len(after)), key=lambda r: (after[r], -r))
        gap = max(after) - min(after)
        assert all(lengths[r][i] >= gap for r, i in plan[heavy] if lengths[r][i] > 0)
    # By hand: 400 vs 20 tokens; two long samples move, then one short one comes back.
    assert plan_rank_balance([[100, 100, 100, 100], [10, 10]]) == [
        [(0, 2), (0, 3), (1, 0)],
        [(0, 0), (0, 1), (1, 1)],
    ]
