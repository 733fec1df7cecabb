"""The seam between the loop and a backend: forward/backward over a step, step, save, load, state.

The loop never calls `loss.backward()` or `optimizer.step()`; engines do. Loss normalization
lives here, once for every engine: each micro-batch's summed losses are divided by the *global*
number of targets of the step (all ranks, all micro-batches), so a step's gradient does not
depend on world size or on how the packer split the samples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from trainer.config import Config
from trainer.distributed import WorldInfo, all_reduce_sum


class IncompatibleCheckpointError(ValueError):
    """A sound checkpoint this run cannot load as it is (e.g. another world size); the message
    says what to do instead."""


class Engine(ABC):
    model: nn.Module  # the unwrapped model (sharded in place by fsdp and deepspeed)
    device: torch.device
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: Config, world: WorldInfo):
        self.cfg = cfg
        self.world = world

    def forward_backward(self, micro_batches: list) -> dict[str, float]:
        """Accumulate gradients over the step's micro-batches; returns the step's global losses."""
        return self._run(micro_batches, backward=True)

    @torch.no_grad()
    def evaluate(self, micro_batches: list) -> dict[str, float]:
        """The same global losses as `forward_backward`, without gradients."""
        return self._run(micro_batches, backward=False)

    def _run(self, micro_batches: list, backward: bool) -> dict[str, float]:
        # Each loss is divided by the global count of its own targets.
        counts = all_reduce_sum(
            [
                sum(mb.num_text_targets for mb in micro_batches),
                sum(mb.num_image_targets(self.cfg.model.image_loss_tokens) for mb in micro_batches),
                sum(mb.num_diffusion_targets for mb in micro_batches),
            ]
        )
        weights = {
            "text": 1.0,
            "image": self.cfg.model.image_loss_weight,
            "diffusion": self.cfg.model.diffusion_loss_weight,
        }
        # Gradient reduction averages over ranks; multiplying by world size turns it into a sum.
        grad_scale = self.world.world_size
        sums = dict.fromkeys(weights, torch.zeros((), dtype=torch.float64))
        produced = set()
        self.model.train(backward)
        for micro_batch in micro_batches:
            out = self.forward(micro_batch.to(self.device))
            loss = 0.0
            for (name, weight), count in zip(weights.items(), counts, strict=True):
                if f"{name}_loss_sum" in out:
                    loss = loss + weight * out[f"{name}_loss_sum"] / max(count, 1.0)
                    sums[name] = sums[name] + out[f"{name}_loss_sum"].detach().double()
                    produced.add(name)
            if backward:
                self.backward(loss * grad_scale)
        totals = all_reduce_sum([float(v) for v in sums.values()])
        metrics = {}
        for name, total, count in zip(weights, totals, counts, strict=True):
            if count and name in produced:
                metrics[f"{name}_loss"] = total / count
        metrics["text_targets"], metrics["image_targets"] = counts[0], counts[1]
        return metrics

    def forward(self, micro_batch) -> dict[str, torch.Tensor]:
        return self.model(micro_batch)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, lr: float) -> float:
        """Clip, apply the update at learning rate `lr` (times each group's `lr_scale`), zero
        gradients; returns the gradient norm before clipping."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write this rank's part of model and optimizer state under the directory `path`."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what `save` wrote, on this or (where the engine can) another world size."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU, on rank 0 (other ranks: empty); collective."""

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of parameters and optimizer state held by this rank."""
        return {
            "param_bytes": sum(_tensor_bytes(p) for p in self.model.parameters()),
            "optimizer_bytes": sum(
                _tensor_bytes(value)
                for state in self.optimizer.state.values()
                for value in state.values()
                if isinstance(value, torch.Tensor)
            ),
        }

    def state(self) -> dict:
        named = dict(self.model.named_parameters())
        return {
            "engine": self.cfg.engine.name,
            "world_size": self.world.world_size,
            "num_params": sum(_global_numel(p) for p in named.values()),
            "num_trainable_params": sum(
                _global_numel(p) for p in named.values() if p.requires_grad
            ),
            **self.memory_bytes(),
        }


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the global gradient norm, step, zero gradients; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    # With DTensor gradients (FSDP2) the norm is computed over the shards and all-reduced.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor shard
    return local.numel() * local.element_size()


def _global_numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 empties the module's tensors
