"""Model configuration: every depth, the encoder, adaptor and image attention mode are config.

The classic designs are presets of these fields (see yaml/): LLaVA is
`num_text_in_blocks=0, num_image_in_blocks=0, num_text_head_blocks=0, num_image_head_blocks=0,
image_attention="causal"`; the split VLM uses non-zero depths on both sides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The names of the registries in models.attention and models.vision, which assert they match.
# Here so that checking a config imports neither torch nor transformers (seconds per CLI call).
ATTENTION_BACKEND_NAMES = (
    "sdpa",
    "flash",
    "flash_emulated",
    "flex",
    "varlen",
    "varlen_emulated",
    "auto",
)
ADAPTOR_NAMES = ("linear", "mlp")


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
    # A transformers causal-LM checkpoint (Llama, Mistral, Qwen2, Qwen3: a local directory or a
    # model id). When set, width, heads, vocabulary, norms and RoPE come from it, and its layers
    # become the text-in, core and text-head blocks in order (num_core_blocks is derived).
    pretrained_llm: str = ""
    vocab_size: int = 0  # 0: taken from the tokenizer at build time
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_ratio: float = 2.75
    # Width of one attention head; 0: d_model // num_heads. Qwen3 checkpoints set their own, so
    # num_heads × head width may differ from d_model.
    attention_head_dim: int = 0
    mlp_hidden: int = 0  # 0: mlp_ratio × d_model, rounded up to a multiple of 8
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    # Llama-3 RoPE scaling (transformers `rope_scaling: {rope_type: llama3}`), 0: off. Wavelengths
    # above original_max_positions / low_freq_factor are slowed by the factor, those below
    # original_max_positions / high_freq_factor kept, the ones between interpolated.
    rope_llama3_factor: float = 0.0
    rope_llama3_low_freq_factor: float = 1.0
    rope_llama3_high_freq_factor: float = 4.0
    rope_llama3_original_max_positions: int = 8192
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
    # RoPE positions inside image spans: "sequential" (1-D, like text), "shared" (every token of
    # a span at the span's first position), "2d" (half the frequencies by row, half by column).
    image_positions: str = "sequential"
    # New image-in / image-head blocks: "fresh" init, or "copy" the neighbouring text blocks.
    image_blocks_init: str = "fresh"
    attention_backend: str = "auto"  # varlen on CUDA (fp16/bf16), sdpa otherwise; per call
    vision: VisionConfig = field(default_factory=VisionConfig)
    adaptor: str = "mlp"
    # Masked image understanding: each image's mask rate r ~ U(min, max); the image head predicts
    # the un-masked target of token j at position j - 1, loss on masked tokens only.
    mask_rate_min: float = 0.0
    mask_rate_max: float = 1.0
    full_mask_prob: float = 0.0  # chance a span is masked entirely (generation training)
    # Multi-resolution: each image is also shown as these coarser grids (sides, coarse to fine),
    # each its own span before the full grid. Dual input: every masked span is followed by its
    # unmasked copy.
    image_scales: list[int] = field(default_factory=list)
    dual_input: bool = False
    image_target: str = "encoder"  # frozen-encoder features, or "pixels"
    image_loss: str = "mse"  # or "cosine"
    image_loss_weight: float = 1.0
    # Optional diffusion head: an MLP denoiser on image-head hidden states (DDPM, noise
    # prediction), trained on the targets of fully masked spans.
    diffusion_head: bool = False
    diffusion_steps: int = 100
    diffusion_hidden: int = 256
    diffusion_loss_weight: float = 1.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.num_heads

    @property
    def image_tokens_per_side(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    def image_spans(self) -> list[tuple[int, bool]]:
        """The spans one image becomes, in order: (grid side, is the unmasked dual copy)."""
        spans = []
        for side in [*self.image_scales, self.image_tokens_per_side]:
            spans.append((side, False))
            if self.dual_input:
                spans.append((side, True))
        return spans

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image, over all of its spans."""
        return sum(side * side for side, _ in self.image_spans())

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot work."""
        if self.attention_head_dim < 0:
            raise ValueError("model.attention_head_dim must be >= 0")
        if not self.attention_head_dim and self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads")
        if self.rope_llama3_factor and not (
            self.rope_llama3_factor > 0
            and self.rope_llama3_high_freq_factor > self.rope_llama3_low_freq_factor > 0
        ):
            raise ValueError(
                "model.rope_llama3_*: need factor > 0 and high_freq_factor > low_freq_factor > 0"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("model.num_heads must be a multiple of model.num_kv_heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                "model.vision.image_size must be a multiple of model.vision.patch_size"
            )
        if self.attention_backend not in ATTENTION_BACKEND_NAMES:
            raise ValueError(
                f"model.attention_backend={self.attention_backend!r}; "
                f"valid: {', '.join(ATTENTION_BACKEND_NAMES)}"
            )
        if self.adaptor not in ADAPTOR_NAMES:
            raise ValueError(f"model.adaptor={self.adaptor!r}; valid: {', '.join(ADAPTOR_NAMES)}")
        if self.image_attention not in ("bidirectional", "causal"):
            raise ValueError(
                f"model.image_attention={self.image_attention!r}; valid: bidirectional, causal"
            )
        if self.image_positions not in ("sequential", "shared", "2d"):
            raise ValueError(
                f"model.image_positions={self.image_positions!r}; valid: sequential, shared, 2d"
            )
        if self.image_blocks_init not in ("fresh", "copy"):
            raise ValueError(
                f"model.image_blocks_init={self.image_blocks_init!r}; valid: fresh, copy"
            )
        full = self.image_tokens_per_side
        if any(not 0 < side < full for side in self.image_scales) or self.image_scales != sorted(
            set(self.image_scales)
        ):
            raise ValueError(
                f"model.image_scales must be increasing grid sides below the full grid ({full})"
            )
        if self.image_positions == "2d" and self.head_dim % 4:
            raise ValueError("model.image_positions=2d needs a head dim divisible by 4")
        if not 0.0 <= self.full_mask_prob <= 1.0:
            raise ValueError("model.full_mask_prob must be in [0, 1]")
        if self.diffusion_head and self.diffusion_steps < 2:
            raise ValueError("model.diffusion_steps must be >= 2")
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
