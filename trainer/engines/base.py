"""The seam between the loop and a backend: forward/backward over a step, step, save, load.

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


class Engine(ABC):
    model: nn.Module
    device: torch.device

    def __init__(self, cfg: Config, world: WorldInfo):
        self.cfg = cfg
        self.world = world

    def forward_backward(self, micro_batches: list) -> dict[str, float]:
        """Accumulate gradients over the step's micro-batches; returns the step's global losses."""
        # Each loss is divided by the global count of its own targets.
        counts = all_reduce_sum(
            [
                sum(mb.num_text_targets for mb in micro_batches),
                sum(mb.num_masked_image_tokens for mb in micro_batches),
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
        self.model.train()
        for micro_batch in micro_batches:
            out = self.model(micro_batch.to(self.device))
            loss = 0.0
            for (name, weight), count in zip(weights.items(), counts, strict=True):
                if f"{name}_loss_sum" in out:
                    loss = loss + weight * out[f"{name}_loss_sum"] / max(count, 1.0)
                    sums[name] = sums[name] + out[f"{name}_loss_sum"].detach().double()
                    produced.add(name)
            self.backward(loss * grad_scale)
        totals = all_reduce_sum([float(v) for v in sums.values()])
        metrics = {}
        for name, total, count in zip(weights, totals, counts, strict=True):
            if count and name in produced:
                metrics[f"{name}_loss"] = total / count
        metrics["text_targets"], metrics["image_targets"] = counts[0], counts[1]
        return metrics

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, lr: float) -> float:
        """Clip, apply the update at learning rate `lr`, zero gradients; returns the grad norm."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write this rank's part of model and optimizer state under the directory `path`."""

    @abstractmethod
    def load(self, path: Path) -> None: ...

    def state(self) -> dict:
        params = list(self.model.parameters())
        return {
            "engine": self.cfg.engine.name,
            "num_params": sum(p.numel() for p in params),
            "num_trainable_params": sum(p.numel() for p in params if p.requires_grad),
        }
