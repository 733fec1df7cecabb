"""The LM head, whose training loss never materializes the whole micro-batch's logits.

With a 150k-token vocabulary the logits of N text targets are N × 150k fp32 values (10 GB for
16k targets), and a plain `F.cross_entropy(lm_head(h), labels)` keeps them, their softmax and
their gradient alive at once. `LMHead(h, labels)` instead walks the targets in chunks of
`LOGITS_CHUNK_ELEMENTS` logits: each chunk's logits, loss and gradients are computed in the
forward and dropped, and only the gradients of `h` (N × d_model) and of the weight are kept for
the backward. The weight's gradient is the size of the weight, which the backward would hold
anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.batch import IGNORE_INDEX

LOGITS_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32


class LMHead(nn.Linear):
    """`nn.Linear(d_model, vocab_size, bias=False)`; called with `labels`, the summed
    cross-entropy of its logits (computed in fp32) instead of the logits. `blocked`: a range of
    ids whose logits are set to the dtype's lowest value (never predicted: Chameleon's image
    tokens at text positions)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def forward(
        self,
        hidden_NC: torch.Tensor,
        labels_N: torch.Tensor | None = None,
        blocked: range | None = None,
    ):
        if labels_N is None:
            return block_logits(super().forward(hidden_NC), blocked)
        return ChunkedCrossEntropy.apply(hidden_NC, self.weight, labels_N, blocked)


def block_logits(logits: torch.Tensor, blocked: range | None) -> torch.Tensor:
    """`logits` with the ids of `blocked` at the dtype's lowest value (in place)."""
    if blocked is not None and len(blocked):
        logits[..., blocked.start : blocked.stop] = torch.finfo(logits.dtype).min
    return logits


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_n cross_entropy(hidden[n] @ weight.T, labels[n]), gradients computed chunk by chunk
    in the forward (the loss is a scalar, so the backward only scales them)."""

    @staticmethod
    def forward(ctx, hidden_NC, weight_VC, labels_N, blocked=None):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_targets, vocab_size = hidden_NC.shape[0], weight_VC.shape[0]
        rows = max(1, LOGITS_CHUNK_ELEMENTS // vocab_size)
        loss_dtype = torch.promote_types(hidden_NC.dtype, torch.float32)  # fp32, or fp64 in tests
        loss = torch.zeros((), dtype=loss_dtype, device=hidden_NC.device)
        grad_hidden = torch.zeros_like(hidden_NC) if need_hidden else None
        grad_weight = torch.zeros(weight_VC.shape, dtype=loss_dtype, device=weight_VC.device)
        for start in range(0, num_targets, rows):
            hidden = hidden_NC[start : start + rows]
            labels = labels_N[start : start + rows]
            logits = block_logits(F.linear(hidden, weight_VC).to(loss_dtype), blocked)
            loss += F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
            if not (need_hidden or need_weight):
                continue
            # d loss / d logits = softmax - one_hot(label), zero on ignored rows
            grad_logits = logits.softmax(dim=-1)
            kept = labels != IGNORE_INDEX
            grad_logits[kept, labels[kept]] -= 1.0
            grad_logits[~kept] = 0.0
            grad_logits = grad_logits.to(weight_VC.dtype)
            if need_hidden:
                grad_hidden[start : start + rows] = grad_logits @ weight_VC
            if need_weight and weight_VC.dtype == loss_dtype:
                # out= rather than addmm_: no temporary, and FLOP counters see it
                torch.addmm(grad_weight, grad_logits.T, hidden, out=grad_weight)
            elif need_weight:  # a bf16 matmul (fast on GPU), summed over the chunks in fp32
                grad_weight += grad_logits.T @ hidden
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight_VC.dtype) if need_weight else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: the saved gradients are used once, and a copy of the weight's
        # gradient would be another weight-sized tensor at the backward's peak.
        grads = [
            None if grad is None else grad.mul_(grad_loss.to(grad.dtype))
            for grad in ctx.saved_tensors
        ]
        return grads[0], grads[1], None, None
