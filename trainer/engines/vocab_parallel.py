"""Vocabulary-parallel embedding and LM head over the data-parallel ranks (the `fsdp` engine's).

Under FSDP every unit is gathered whole for its forward and its whole gradient is made before it
is reduce-scattered. At a 150k-token vocabulary the embedding and the LM head are each as large
as several transformer blocks, so their gathered weight, whole gradient and reduce-scatter buffer
are most of a rank's transient memory. Here they are instead split by rows over the ranks and
never gathered: each rank keeps its own rows (a DTensor sharded on dim 0, outside FSDP) and does
the work of its rows for every rank's tokens.

- Embedding: the ranks' token ids are gathered; each rank looks up the ids in its rows (zeros
  for the others) and the sum over ranks, reduce-scattered, is each rank's embeddings. Backward:
  the embeddings' gradients are gathered and each rank adds those of its ids into its rows.
- LM head loss: the ranks' hidden states and labels are gathered; each rank makes the logits of
  its rows, chunk by chunk, and the softmax's max, sum and the targets' logits are all-reduced
  per chunk, so each rank has every token's cross-entropy; a rank's loss is the sum over its own
  tokens. The gradients are made in the forward, as `ChunkedCrossEntropy` makes them: the
  weight's for its rows, the hidden states' partial sums reduce-scattered to their ranks.

A rank's row gradients sum over every rank's tokens; they are divided by the world size to be
the average FSDP's reduce-scatter gives every other parameter. Ranks must call these in the
same order and number (one embedding and one loss per micro-batch, which every rank runs).
Tokens per rank may differ: gathers pad to the largest count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from models.batch import IGNORE_INDEX
from models.blocks import TokenEmbedding
from models.lm_head import LMHead, block_logits

LOGITS_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of a rank's rows: 64 MiB in fp32


def row_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows [start, stop) of a `num_rows` matrix that `rank` holds (torch.chunk's split,
    which DTensor's Shard(0) uses)."""
    chunk = -(-num_rows // world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def _counts(n: int, device, group) -> list[int]:
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    every = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    dist.all_gather_single(every, mine, group=group)
    return every.tolist()


def gather_rows(x: Tensor, counts: list[int], group) -> Tensor:
    """Every rank's `x` (counts[r] rows each) stacked in rank order."""
    most = max(counts)
    padded = x.new_zeros(most, *x.shape[1:])
    padded[: x.shape[0]] = x
    every = x.new_empty(len(counts) * most, *x.shape[1:])
    dist.all_gather_single(every, padded.contiguous(), group=group)
    return torch.cat([every[r * most : r * most + n] for r, n in enumerate(counts)])


def reduce_scatter_rows(x: Tensor, counts: list[int], rank: int, group) -> Tensor:
    """Sum over ranks of `x` (every rank's rows, in rank order); this rank's rows of it."""
    most = max(counts)
    padded = x.new_zeros(len(counts) * most, *x.shape[1:])
    offset = 0
    for r, n in enumerate(counts):
        padded[r * most : r * most + n] = x[offset : offset + n]
        offset += n
    out = x.new_empty(most, *x.shape[1:])
    dist.reduce_scatter_single(out, padded, group=group)
    return out[: counts[rank]]


def shard_vocabulary(model, mesh, compute_dtype: torch.dtype | None = None) -> set:
    """Give the model's embedding and LM head (on meta or not) this rank's rows of their
    weights, DTensors sharded on dim 0 over `mesh` (one, when tied), and the row-sharded
    forwards; embeddings come in `compute_dtype` (what FSDP computes the blocks in; None: the
    weight's). → the sharded parameters (for FSDP to leave alone)."""
    model.embed.weight = _row_shard(model.embed.weight, mesh)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    else:
        model.lm_head.weight = _row_shard(model.lm_head.weight, mesh)
    model.embed.compute_dtype = compute_dtype
    model.embed.__class__ = RowShardedEmbedding
    model.lm_head.__class__ = RowShardedLMHead
    return {model.embed.weight, model.lm_head.weight}


def _row_shard(weight: Tensor, mesh) -> torch.nn.Parameter:
    from torch.distributed.tensor import DTensor, Shard

    start, stop = row_range(weight.shape[0], mesh.size(), mesh.get_local_rank())
    local = weight.detach()[start:stop].clone()
    sharded = DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=weight.shape, stride=weight.stride()
    )
    return torch.nn.Parameter(sharded, requires_grad=weight.requires_grad)


def local_rows(weight) -> tuple[Tensor, int, object]:
    """(this rank's rows, the first one's index, the process group) of a row-sharded matrix."""
    mesh = weight.device_mesh
    start, _ = row_range(weight.shape[0], mesh.size(), mesh.get_local_rank())
    return weight.to_local(), start, mesh.get_group()


class RowShardedEmbedding(TokenEmbedding):
    """A `TokenEmbedding` whose weight is this rank's rows (`shard_vocabulary`)."""

    def lookup(self, ids: Tensor) -> Tensor:
        rows, start, group = local_rows(self.weight)
        embeddings = VocabParallelEmbedding.apply(ids.reshape(-1), rows, start, group)
        return embeddings.view(*ids.shape, -1).to(self.compute_dtype or rows.dtype)


class RowShardedLMHead(LMHead):
    """An `LMHead` whose weight is this rank's rows (`shard_vocabulary`): its loss
    vocabulary-parallel;
    its logits (evaluation, generation) from the whole matrix, gathered."""

    def forward(self, hidden_NC: Tensor, labels_N: Tensor | None = None, blocked=None):
        if labels_N is None:
            weight = self.weight.full_tensor().to(hidden_NC.dtype)
            return block_logits(F.linear(hidden_NC, weight), blocked)
        rows, start, group = local_rows(self.weight)
        return VocabParallelCrossEntropy.apply(hidden_NC, rows, labels_N, blocked, start, group)


class VocabParallelEmbedding(torch.autograd.Function):
    """ids (T,) of this rank, its rows [start, start + rows) of the matrix → (T, C)."""

    @staticmethod
    def forward(ctx, ids_T, weight_shard, start: int, group):
        rank = dist.get_rank(group)
        counts = _counts(ids_T.numel(), ids_T.device, group)
        ids = gather_rows(ids_T, counts, group) - start
        inside = (ids >= 0) & (ids < weight_shard.shape[0])
        local = torch.where(inside, ids, 0)
        partial = F.embedding(local, weight_shard) * inside[:, None].to(weight_shard.dtype)
        ctx.save_for_backward(local[inside])
        ctx.inside, ctx.counts, ctx.group = inside, counts, group
        ctx.shape = weight_shard.shape
        return reduce_scatter_rows(partial, counts, rank, group)

    @staticmethod
    def backward(ctx, grad_TC):
        (rows,) = ctx.saved_tensors
        every = gather_rows(grad_TC.contiguous(), ctx.counts, ctx.group)
        grad = every.new_zeros(ctx.shape)
        grad.index_add_(0, rows, every[ctx.inside])
        # In place: a second rows-sized tensor would be the backward's peak.
        return None, grad.div_(dist.get_world_size(ctx.group)), None, None


class VocabParallelCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of this rank's targets (hidden (N, C), labels (N,)) under the
    whole matrix, from its rows [start, start + rows) and the other ranks'. `blocked`: ids
    whose logits are the lowest value (models/lm_head.py `block_logits`)."""

    @staticmethod
    def forward(ctx, hidden_NC, weight_shard, labels_N, blocked, start: int, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        counts = _counts(hidden_NC.shape[0], hidden_NC.device, group)
        hidden = gather_rows(hidden_NC, counts, group)
        labels = gather_rows(labels_N, counts, group)
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
        weight = weight_shard.to(hidden.dtype)
        num_rows = weight.shape[0]
        local_blocked = None
        if blocked is not None and len(blocked):
            low, high = max(blocked.start - start, 0), min(blocked.stop - start, num_rows)
            local_blocked = range(low, max(high, low))
        losses = torch.zeros(hidden.shape[0], dtype=loss_dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight_shard.shape, dtype=loss_dtype, device=hidden.device)
        step = max(1, LOGITS_CHUNK_ELEMENTS // max(num_rows, 1))
        for first in range(0, hidden.shape[0], step):
            rows = slice(first, first + step)
            logits = F.linear(hidden[rows], weight).to(loss_dtype)
            if local_blocked is not None and len(local_blocked):
                logits[:, local_blocked.start : local_blocked.stop] = torch.finfo(loss_dtype).min
            chunk_labels = labels[rows]
            kept = chunk_labels != IGNORE_INDEX
            target = chunk_labels - start
            mine = kept & (target >= 0) & (target < num_rows)
            # The softmax over every rank's rows: its max, then its sum, then the target's logit.
            peak = logits.max(dim=-1).values if num_rows else logits.new_full((len(kept),), -1e30)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            exp = (logits - peak[:, None]).exp()
            total = exp.sum(dim=-1)
            picked = torch.zeros_like(total)
            picked[mine] = logits[mine.nonzero().squeeze(1), target[mine]]
            sums = torch.stack([total, picked])
            dist.all_reduce(sums, group=group)
            log_norm = peak + sums[0].log()
            losses[rows] = torch.where(kept, log_norm - sums[1], 0.0)
            if not (need_hidden or need_weight):
                continue
            grad_logits = exp / sums[0][:, None]  # softmax − one-hot, zero on ignored rows
            grad_logits[mine.nonzero().squeeze(1), target[mine]] -= 1.0
            grad_logits[~kept] = 0.0
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.T @ hidden[rows]).to(loss_dtype)
        own = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        if need_hidden:
            grad_hidden = reduce_scatter_rows(grad_hidden, counts, rank, group)
        if need_weight:
            grad_weight = grad_weight.div_(world).to(weight_shard.dtype)  # in place
        ctx.save_for_backward(grad_hidden, grad_weight if need_weight else None)
        return losses[own].sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [
            None if grad is None else grad.mul_(grad_loss.to(grad.dtype))
            for grad in ctx.saved_tensors
        ]
        return grads[0], grads[1], None, None, None, None
