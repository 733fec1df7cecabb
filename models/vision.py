"""The understanding encoder (SigLIP from transformers), adaptors, and image-loss targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from models.config import ADAPTOR_NAMES, ModelConfig, VisionConfig
from models.meta import building_on_meta


def build_vision_tower(cfg: VisionConfig, config: dict | None = None) -> SiglipVisionModel:
    """From `cfg`, or from `config` (a SiglipVisionConfig dict) with random weights."""
    if config is not None:
        tower = SiglipVisionModel(SiglipVisionConfig.from_dict(config))
    elif cfg.pretrained:
        if building_on_meta():  # the architecture only; the weights are read into the shards
            tower = SiglipVisionModel(SiglipVisionConfig.from_pretrained(cfg.pretrained))
        else:
            tower = SiglipVisionModel.from_pretrained(cfg.pretrained)
        if tower.config.image_size != cfg.image_size or tower.config.patch_size != cfg.patch_size:
            raise ValueError(
                f"model.vision.image_size/patch_size must match the checkpoint at "
                f"{cfg.pretrained} ({tower.config.image_size}/{tower.config.patch_size})"
            )
    else:
        tower = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.hidden_size * 4,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                vision_use_head=False,
            )
        )
    tower.requires_grad_(cfg.trainable)
    return tower


def pretrained_tower_weights(path: str) -> dict[str, torch.Tensor]:
    """The pretrained tower's parameters by name, on the CPU. The tower is one unit (sharded
    engines gather it whole for its forward), so it is read whole, once per rank, while the
    other units are filled."""
    tower = SiglipVisionModel.from_pretrained(path, device_map="cpu")
    return {name: value.detach() for name, value in tower.named_parameters()}


def _linear_adaptor(vision_dim: int, d_model: int) -> nn.Module:
    return nn.Linear(vision_dim, d_model)


def _mlp_adaptor(vision_dim: int, d_model: int) -> nn.Module:
    return nn.Sequential(nn.Linear(vision_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))


ADAPTORS = {"linear": _linear_adaptor, "mlp": _mlp_adaptor}
assert tuple(ADAPTORS) == ADAPTOR_NAMES, "update models.config as well"


def build_adaptor(name: str, vision_dim: int, d_model: int) -> nn.Module:
    if name not in ADAPTORS:
        raise ValueError(f"unknown adaptor {name!r}; valid: {', '.join(sorted(ADAPTORS))}")
    return ADAPTORS[name](vision_dim, d_model)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (as the loader ships them) → SigLIP's normalization, mean 0.5 and std 0.5 per
    channel, in [-1, 1]. Floating-point input is taken as normalized already and passed through."""
    if pixels.is_floating_point():
        return pixels
    return pixels.float() / 127.5 - 1.0


def patchify(pixels_NCHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, 3, H, W) → (N, num_patches, 3 * p * p), patches in row-major order like the encoder."""
    n, c, _, _ = pixels_NCHW.shape
    patches = F.unfold(pixels_NCHW, kernel_size=patch_size, stride=patch_size)
    return patches.transpose(1, 2).reshape(n, -1, c * patch_size * patch_size)


def image_target_dim(cfg: ModelConfig, vision_dim: int) -> int:
    return vision_dim if cfg.image_target == "encoder" else 3 * cfg.vision.patch_size**2


def normalize_targets(targets: torch.Tensor) -> torch.Tensor:
    # Per-token normalization (as MAE does for pixels) keeps the loss scale independent of the
    # encoder's feature scale; predicting zero scores exactly 1.0 under MSE.
    return F.layer_norm(targets, (targets.shape[-1],), eps=1e-6)
