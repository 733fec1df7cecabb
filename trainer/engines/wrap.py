"""What engines apply to the model from the outside, in one order (torchtitan's):
activation checkpointing → compile → shard. The model itself stays single-device code.

Both wrappers change a block in place instead of wrapping it in another module, so parameter
names — and with them checkpoints and exports — do not depend on these options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.config import PRECISIONS


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Keep only each block's input; recompute its activations in backward."""
    for block in blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_compile(blocks: list[nn.Module]) -> None:
    # Per block rather than the whole model: the packed layouts make shapes differ per
    # micro-batch, and small graphs recompile cheaply (dynamic=None marks sizes dynamic on the
    # first recompile).
    for block in blocks:
        block.compile()


def parallelize(model: nn.Module, engine_cfg, shard: Callable[[nn.Module], None] | None = None):
    """The one place the order is set: activation checkpointing → compile → shard (`shard`, the
    engine's own: FSDP2's fully_shard per unit; none for local, whose model stays whole, and for
    ZeRO, which partitions inside deepspeed.initialize right after this)."""
    blocks = model.transformer_blocks()
    if engine_cfg.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if engine_cfg.compile:
        apply_compile(blocks)
    if shard is not None:
        shard(model)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """engine.mixed_precision → the compute dtype: `auto` is bf16 on GPU and fp32 on CPU."""
    assert name in PRECISIONS, f"unvalidated engine.mixed_precision={name!r}"
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32
