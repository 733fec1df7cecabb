"""AdamW with parameter groups, freezing by name pattern, and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import fnmatch
import math

import torch
from torch import nn

from trainer.config import SCHEDULES, STAGES, OptimConfig


def apply_stage(model: nn.Module, stage: str) -> None:
    """`optim.stage`: train exactly the components STAGES[stage] names
    (`model.parameter_component`), freeze the rest; "" changes nothing. Each top-level module
    is set through its own `requires_grad_`, so a tower that keeps a part frozen by design (a
    VQ-VAE, whose codes no gradient flows through) keeps it frozen."""
    if not stage:
        return
    trained = STAGES[stage]
    for name, module in model.named_children():
        module.requires_grad_(model.parameter_component(name) in trained)
    for name, param in model.named_parameters(recurse=False):
        param.requires_grad_(model.parameter_component(name) in trained)


def apply_freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad from `optim.freeze` patterns; returns the names frozen by them.

    A pattern freezes the parameters whose names match it, "!PATTERN" unfreezes them, and the
    last matching pattern wins. A pattern that matches nothing is a ValueError (a typo would
    otherwise train what was meant to be frozen).
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern.removeprefix("!")):
            raise ValueError(f"optim.freeze pattern {pattern!r} matches no parameter")
    frozen = []
    for name, param in model.named_parameters():
        verdict = None
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern.removeprefix("!")):
                verdict = not pattern.startswith("!")
        if verdict is not None:
            param.requires_grad_(not verdict)
            if verdict:
                frozen.append(name)
    return frozen


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per (component, decay): no weight decay on norms, biases, embeddings and the mask
    embedding (1-D or lookup); `lr_scale` multiplies the scheduled learning rate."""
    lr_scales = {"llm": 1.0, "vision": cfg.vision_lr_scale, "adaptor": cfg.adaptor_lr_scale}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A ZeRO-3 parameter built partitioned is a flat placeholder; ds_shape is its own shape.
        decay = len(getattr(param, "ds_shape", param.shape)) >= 2 and id(param) not in embeddings
        groups.setdefault((model.parameter_component(name), decay), []).append(param)
    if not groups:
        raise ValueError("every parameter is frozen (model.vision.trainable, optim.freeze)")
    # Fixed order, empty groups left out: ZeRO flattens per group and rejects empty ones.
    return [
        {
            "params": groups[key],
            "name": f"{key[0]}_{'decay' if key[1] else 'no_decay'}",
            "weight_decay": cfg.weight_decay if key[1] else 0.0,
            "lr_scale": lr_scales[key[0]],
        }
        for key in sorted(groups)
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # The fused kernel updates each parameter in place: torch's default per-parameter loop on
    # the CPU allocates two temporaries the size of the parameter being updated (1 GB for a
    # 150k-token embedding in fp32), and it is several times slower (scripts/bench_engines.py).
    return torch.optim.AdamW(
        parameter_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True
    )


@contextlib.contextmanager
def hyperparameters_from_config(optimizer: torch.optim.Optimizer):
    """Around loading an optimizer's state: keep the groups' hyperparameters (weight decay,
    betas, lr scales) as the config built them, so a resumed run follows its config like the
    learning-rate schedule does; the per-parameter state comes from the checkpoint."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    yield
    for group, setting in zip(optimizer.param_groups, settings, strict=True):
        group.update(setting)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to `lr`, then decay to `lr * min_lr_ratio` at `total_steps`."""
    assert cfg.schedule in SCHEDULES, f"unvalidated optim.schedule={cfg.schedule!r}"
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)
