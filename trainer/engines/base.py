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
        self.image_loss_weight = cfg.model.image_loss_weight

    def forward_backward(self, micro_batches: list) -> dict[str, float]:
        """Accumulate gradients over the step's micro-batches; returns the step's global losses."""
        local_counts = [
            sum(mb.num_text_targets for mb in micro_batches),
            sum(mb.num_masked_image_tokens for mb in micro_batches),
        ]
        num_text, num_image = all_reduce_sum(local_counts)
        # Gradient reduction averages over ranks; multiplying by world size turns it into a sum.
        grad_scale = self.world.world_size
        sums = torch.zeros(2, dtype=torch.float64)
        self.model.train()
        for micro_batch in micro_batches:
            out = self.model(micro_batch.to(self.device))
            loss = out["text_loss_sum"] / max(num_text, 1.0)
            loss = loss + self.image_loss_weight * out["image_loss_sum"] / max(num_image, 1.0)
            self.backward(loss * grad_scale)
            sums += (
                torch.stack([out["text_loss_sum"], out["image_loss_sum"]]).detach().double().cpu()
            )
        text_sum, image_sum = all_reduce_sum(sums.tolist())
        metrics = {"text_loss": text_sum / max(num_text, 1.0)}
        if num_image:
            metrics["image_loss"] = image_sum / num_image
        metrics["text_targets"], metrics["image_targets"] = num_text, num_image
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
