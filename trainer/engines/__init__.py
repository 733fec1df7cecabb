"""Engines by name: `engine.name` in the config picks one."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import ENGINE_NAMES, Config
from trainer.distributed import WorldInfo
from trainer.engines.base import Engine


def _local(cfg, world, model, device, initial_weights):
    from trainer.engines.local import LocalEngine

    assert initial_weights is None, "local builds its model initialized"
    return LocalEngine(cfg, world, model, device)


def _fsdp(cfg, world, model, device, initial_weights):
    from trainer.engines.fsdp import FSDPEngine

    return FSDPEngine(cfg, world, model, device, initial_weights)


def _deepspeed(cfg, world, model, device, initial_weights):
    from trainer.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg, world, model, device, initial_weights)


ENGINES = {"local": _local, "fsdp": _fsdp, "deepspeed": _deepspeed}
assert tuple(ENGINES) == ENGINE_NAMES, "update trainer.config.ENGINE_NAMES as well"


def build_engine(
    cfg: Config, world: WorldInfo, model: nn.Module, device: torch.device, initial_weights=None
) -> Engine:
    """`initial_weights` (trainer/engines/materialize.py): for a model built empty (meta, or
    ZeRO-3 partitions), what the engine fills its shards with."""
    assert cfg.engine.name in ENGINES, f"unvalidated engine.name={cfg.engine.name!r}"
    return ENGINES[cfg.engine.name](cfg, world, model, device, initial_weights)
