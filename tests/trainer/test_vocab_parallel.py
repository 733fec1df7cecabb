"""The vocabulary-parallel embedding and LM head (trainer/engines/vocab_parallel.py) on 2 gloo ranks
against the same matrix whole on one process: outputs, losses and gradients, with ranks of
different token counts, a vocabulary the ranks split unevenly, ignored labels and blocked ids.
The whole-model property (fsdp on 2 ranks = local, step for step) is tests/trainer/
test_engines.py's."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.batch import IGNORE_INDEX
from models.lm_head import block_logits
from trainer.engines.vocab_parallel import (
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
    row_range,
)

VOCAB, WIDTH = 37, 8  # 19 rows on rank 0, 18 on rank 1
TOKENS = (5, 3)  # each rank's tokens
BLOCKED = range(17, 21)  # across the ranks' boundary


def data():
    """Every rank's inputs, drawn alike on every process: the matrix, then per rank its ids,
    hidden states, labels (one ignored) and the upstream gradient of its embeddings."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, WIDTH, generator=generator, dtype=torch.float64)
    ranks = []
    for count in TOKENS:
        ids = torch.randint(0, VOCAB, (count,), generator=generator)
        hidden = torch.randn(count, WIDTH, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 17, (count,), generator=generator)
        labels[0] = IGNORE_INDEX
        upstream = torch.randn(count, WIDTH, generator=generator, dtype=torch.float64)
        ranks.append((ids, hidden, labels, upstream))
    return weight, ranks


def reference(weight, ranks, rank: int):
    """Rank `rank`'s embeddings, loss and gradients with the whole matrix, the matrix's
    gradients averaged over the ranks (what FSDP's reduce-scatter gives)."""
    embed_grad = torch.zeros_like(weight)
    head_grad = torch.zeros_like(weight)
    for r, (ids, hidden, labels, upstream) in enumerate(ranks):
        w = weight.clone().requires_grad_()
        (F.embedding(ids, w) * upstream).sum().backward()
        embed_grad += w.grad
        w = weight.clone().requires_grad_()
        h = hidden.clone().requires_grad_()
        logits = block_logits(F.linear(h, w), BLOCKED)
        loss = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
        loss.backward()
        head_grad += w.grad
        if r == rank:
            mine = (F.embedding(ids, weight), loss.detach(), h.grad)
    return (*mine, embed_grad / len(ranks), head_grad / len(ranks))


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        weight, ranks = data()
        ids, hidden, labels, upstream = ranks[rank]
        start, stop = row_range(VOCAB, 2, rank)
        group = dist.group.WORLD
        rows = weight[start:stop].clone().requires_grad_()
        out = VocabParallelEmbedding.apply(ids, rows, start, group)
        (out * upstream).sum().backward()
        embed_grad = rows.grad
        rows = weight[start:stop].clone().requires_grad_()
        h = hidden.clone().requires_grad_()
        loss = VocabParallelCrossEntropy.apply(h, rows, labels, BLOCKED, start, group)
        loss.backward()
        want = reference(weight, ranks, rank)
        assert torch.allclose(out, want[0], atol=1e-12)
        assert torch.allclose(loss, want[1], atol=1e-12), (loss, want[1])
        assert torch.allclose(h.grad, want[2], atol=1e-12)
        assert torch.allclose(embed_grad, want[3][start:stop], atol=1e-12)
        assert torch.allclose(rows.grad, want[4][start:stop], atol=1e-12)
        with torch.no_grad():  # evaluation: the loss alone, the same collectives
            again = VocabParallelCrossEntropy.apply(hidden, rows, labels, BLOCKED, start, group)
        assert torch.allclose(again, want[1], atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_embedding_and_loss_equal_the_whole_matrix_on_2_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(str(tmp_path / "init"),), nprocs=2, start_method="spawn")


def test_row_ranges_are_torch_chunks():
    for rows in (1, 2, 37, 151936):
        for world in (1, 2, 3, 8):
            chunks = torch.arange(rows).chunk(world)
            got = [row_range(rows, world, r) for r in range(world)]
            want = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
            assert [g for g in got if g[0] < g[1]] == want
