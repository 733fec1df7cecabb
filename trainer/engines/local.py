"""One process, no sharding: the reference every distributed engine is compared with."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.config import Config
from trainer.distributed import WorldInfo
from trainer.engines.base import Engine, clip_and_step
from trainer.engines.wrap import parallelize
from trainer.optim import build_optimizer, hyperparameters_from_config, set_learning_rate


class LocalEngine(Engine):
    def __init__(self, cfg: Config, world: WorldInfo, model: nn.Module, device: torch.device):
        super().__init__(cfg, world)
        if world.world_size != 1:
            raise ValueError(
                f"engine.name=local runs one worker, got {world.world_size}; "
                "use engine.name=fsdp or deepspeed with cluster.num_workers > 1"
            )
        self.device = device
        parallelize(model, cfg.engine)
        self.model = model.to(device)
        self.optimizer = build_optimizer(self.model, cfg.optim)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        set_learning_rate(self.optimizer, lr)
        return clip_and_step(self.model, self.optimizer, self.cfg.optim.grad_clip)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.full_state_dict(), str(path / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        self.model.load_state_dict(
            load_file(str(path / "model.safetensors"), device=str(self.device))
        )
        optimizer_state = torch.load(
            path / "optimizer.pt", map_location=self.device, weights_only=True
        )
        with hyperparameters_from_config(self.optimizer):
            self.optimizer.load_state_dict(optimizer_state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state, storages = {}, set()
        for name, value in self.model.state_dict().items():
            value = value.detach().cpu().contiguous()
            # Tied embeddings are one tensor under two names, which safetensors refuses to
            # save as views of one storage: the second name gets a copy (nothing else does).
            if value.untyped_storage().data_ptr() in storages:
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
            state[name] = value
        return state
