"""Model configuration: every depth, the encoder, adaptor and image attention mode are config.

The classic designs are presets of these fields (see yaml/): LLaVA is
`num_text_in_blocks=0, num_image_in_blocks=0, num_text_head_blocks=0, num_image_head_blocks=0,
image_attention="causal"`; the split VLM uses non-zero depths on both sides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    # A local directory holding a transformers SigLIP checkpoint; empty builds a random tower from
    # the size fields below (the tiny preset, so nothing is downloaded).
    pretrained: str = ""
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 48
    num_layers: int = 2
    num_heads: int = 2
    trainable: bool = False


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer at build time
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_ratio: float = 2.75
    rope_theta: float = 10000.0
    qk_norm: bool = False
    norm_eps: float = 1e-5
    # Depths. Text-in blocks see text only, image-in blocks one image at a time; the merge happens
    # after them. Head blocks branch off the shared core, one branch per output modality.
    num_text_in_blocks: int = 1
    num_image_in_blocks: int = 1
    num_core_blocks: int = 2
    num_text_head_blocks: int = 1
    num_image_head_blocks: int = 1
    image_attention: str = "bidirectional"  # or "causal" (LLaVA-style)
    attention_backend: str = "sdpa"
    vision: VisionConfig = field(default_factory=VisionConfig)
    adaptor: str = "mlp"
    # Masked image understanding: each image's mask rate r ~ U(min, max); the image head predicts
    # the un-masked target of token j at position j - 1, loss on masked tokens only.
    mask_rate_min: float = 0.0
    mask_rate_max: float = 1.0
    image_target: str = "encoder"  # frozen-encoder features, or "pixels"
    image_loss: str = "mse"  # or "cosine"
    image_loss_weight: float = 1.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def image_tokens_per_side(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.image_tokens_per_side**2

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot work."""
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("model.num_heads must be a multiple of model.num_kv_heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                "model.vision.image_size must be a multiple of model.vision.patch_size"
            )
        if self.image_attention not in ("bidirectional", "causal"):
            raise ValueError(
                f"model.image_attention={self.image_attention!r}; valid: bidirectional, causal"
            )
        if self.image_target not in ("encoder", "pixels"):
            raise ValueError(f"model.image_target={self.image_target!r}; valid: encoder, pixels")
        if self.image_loss not in ("mse", "cosine"):
            raise ValueError(f"model.image_loss={self.image_loss!r}; valid: mse, cosine")
        if not 0.0 <= self.mask_rate_min <= self.mask_rate_max <= 1.0:
            raise ValueError("need 0 <= model.mask_rate_min <= model.mask_rate_max <= 1")
        for name in (
            "num_text_in_blocks",
            "num_image_in_blocks",
            "num_core_blocks",
            "num_text_head_blocks",
            "num_image_head_blocks",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0")


def model_config_from_dict(raw: dict) -> ModelConfig:
    """The inverse of `dataclasses.asdict(ModelConfig)`; unknown keys are a ValueError."""
    raw = dict(raw)
    vision = raw.pop("vision", {})
    for cls, values in ((ModelConfig, raw), (VisionConfig, vision)):
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    return ModelConfig(**raw, vision=VisionConfig(**vision))
