"""The understanding encoder (SigLIP, SigLIP2 or CLIP from transformers), adaptors, and image-loss
targets.

The towers are transformers' own classes (their parameter names, checkpoints and init). SigLIP,
SigLIP2 and Pixtral have one more way to run: `tower(packed=PackedImages)` encodes every image of a micro-batch, each at its
own grid of patches, as one flat sequence in which each image is its own bidirectional document
of our `PackedLayout` — no padding to the largest image, no call per image:

    packed = PackedImages.from_images([image_3HW, ...], patch_size, backend)
    features_TD = tower(packed=packed)          # (sum of rows × cols, hidden)
    features_TD = tower(packed=packed, feature_layer=-2)   # a hidden state, as LLaVA reads it

Pixtral's ViT always runs packed. CLIP (LLaVA's encoder) runs square images batched only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PixtralVisionConfig,
    PixtralVisionModel,
    PretrainedConfig,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
)
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
from transformers.models.deepseek_vl_hybrid.modeling_deepseek_vl_hybrid import (
    DeepseekVLSamVisionNeck,
    DeepseekVLSamVisionProj,
)
from transformers.models.idefics.configuration_idefics import (
    IdeficsPerceiverConfig,
    IdeficsVisionConfig,
)
from transformers.models.idefics.modeling_idefics import IdeficsPreTrainedModel
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
from transformers.models.idefics.vision import IdeficsVisionTransformer
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig
from transformers.models.janus.modeling_janus import (
    JanusVisionModel,
    JanusVQVAE,
    JanusVQVAEAlignerMLP,
    JanusVQVAEHead,
)
from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
from transformers.models.mllama.modeling_mllama import MllamaVisionModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.sam.configuration_sam import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionModel
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer

from models.attention import PackedLayout, packed_attention
from models.config import (
    ADAPTOR_NAMES,
    PIXEL_NORMALIZATION_NAMES,
    VISION_TOWER_NAMES,
    ModelConfig,
    VisionConfig,
)
from models.flops import layer_flops, trains
from models.meta import building_on_meta
from models.safetensors_dir import SafetensorsDir


@dataclass
class PackedImages:
    """Images of several sizes as one flat sequence of patches (row-major within an image)."""

    patches_TCPP: torch.Tensor  # (T, 3, p, p) patches of every image, image after image
    grids: list[tuple[int, int]]  # (rows, cols) of each image
    layout: PackedLayout  # every image one bidirectional document

    @classmethod
    def from_images(cls, images: list[torch.Tensor], patch_size: int, backend: str) -> PackedImages:
        """`images`: (3, rows·p, cols·p) each, normalized."""
        grids = [(image.shape[1] // patch_size, image.shape[2] // patch_size) for image in images]
        patches = [
            image.unfold(1, patch_size, patch_size)
            .unfold(2, patch_size, patch_size)  # (3, rows, cols, p, p)
            .permute(1, 2, 0, 3, 4)
            .reshape(-1, 3, patch_size, patch_size)
            for image in images
        ]
        layout = PackedLayout.from_docs([[("image", r * c)] for r, c in grids], backend)
        return cls(torch.cat(patches), grids, layout.to(images[0].device))

    def split(self, features_TD: torch.Tensor) -> list[torch.Tensor]:
        return list(features_TD.split([r * c for r, c in self.grids]))


def _packed_layers(layers, x_TD, feature_layer: int, run_layer) -> tuple[torch.Tensor, bool]:
    """`run_layer(layer, x_TD)` over the tower's layers up to the hidden state that
    `feature_layer` selects (0: all of them); whether the final norm applies (only for 0)."""
    if feature_layer == 0:
        count = len(layers)
    else:  # transformers' hidden_states[k]: the embeddings, then each layer's output
        count = feature_layer if feature_layer > 0 else len(layers) + 1 + feature_layer
    for layer in list(layers)[:count]:
        x_TD = run_layer(layer, x_TD)
    return x_TD, feature_layer == 0


def _packed_encoder(
    tower, embeddings_TD: torch.Tensor, packed: PackedImages, feature_layer: int = 0
) -> torch.Tensor:
    """The tower's encoder layers and final norm over packed images: transformers' SigLIP layer
    (pre-norm attention and MLP) with our packed attention in place of its padded one."""
    model = tower.vision_model

    def run_layer(layer, x_TD):
        attention = layer.self_attn
        out = _packed_self_attention(attention, layer.layer_norm1(x_TD), packed, attention.scale)
        x_TD = x_TD + attention.out_proj(out)
        return x_TD + layer.mlp(layer.layer_norm2(x_TD))

    x_TD, final = _packed_layers(model.encoder.layers, embeddings_TD, feature_layer, run_layer)
    return model.post_layernorm(x_TD) if final else x_TD


def _packed_self_attention(attention, h_TD, packed: PackedImages, scale: float, rope=None):
    """A transformers vision attention's q/k/v projections (`num_heads`, `head_dim`) over packed
    images, rotated by `rope` = (cos, sin) (T, 1, head_dim) when given: (T, heads · head_dim),
    before the output projection."""
    heads, head_dim = attention.num_heads, attention.head_dim
    q, k, v = (
        proj(h_TD).view(-1, heads, head_dim)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    if rope is not None:
        cos, sin = rope
        q, k = (t * cos + _rotate_half(t) * sin for t in (q, k))
    out = packed_attention(q, k, v, packed.layout, backend=_tower_backend(q), scale=scale)
    return out.reshape(h_TD.shape[0], -1)


def _tower_backend(q: torch.Tensor) -> str:
    # The layout is planned for sdpa on a CPU and for both kernels on a GPU ("auto").
    return "auto" if q.is_cuda else "sdpa"


def packing_backend(device: torch.device) -> str:
    return "auto" if device.type == "cuda" else "sdpa"


def meta_flops(tower_class, config, method: str, size: int) -> tuple[int, int]:
    """(dense, attention) FLOPs of one size × size image through `method` (a dotted path from
    the tower, e.g. "vqmodel.encode") of a `tower_class(config)` built on the meta device (no
    memory, no compute), by torch's flop counter: attention is its batched matmuls and SDPA
    (on meta, attention runs as matmuls), dense the rest (convolutions, linear layers, a
    codebook's distances). Windows, relative positions and strided convolutions are priced as
    they run."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad():
        run = tower_class(config)
        for name in method.split("."):
            run = getattr(run, name)
        with FlopCounterMode(display=False) as counter:
            run(torch.empty(1, 3, size, size))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if "bmm" in op or "scaled_dot" in op)
    return counter.get_total_flops() - attention, attention


class BatchedFeatures:
    """What every tower class shares: `image_features`, transformers' batched forward of equally
    sized images with the feature selection of `model.vision.feature_layer`."""

    # Square images go through transformers' batched forward (False) or packed (True).
    packs_square_images = False
    # Tokens before the patches in the tower's output (CLIP's CLS), dropped from the features.
    num_prefix_tokens = 0

    @property
    def feature_dim(self) -> int:
        """The width of the features the adaptor reads."""
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        """(N, 3, H, W) → (N, rows · cols, hidden)."""
        if feature_layer == 0:
            features = self(pixel_values=pixel_values).last_hidden_state
        else:
            outputs = self(pixel_values=pixel_values, output_hidden_states=True)
            features = outputs.hidden_states[feature_layer]
        return features[:, self.num_prefix_tokens :]


class PackedSiglipVisionModel(BatchedFeatures, SiglipVisionModel):
    """SigLIP: a convolutional patch embedding and a learned square grid of position
    embeddings, bicubically interpolated to each image's grid (transformers'
    `interpolate_pos_encoding`, whose result it equals image by image)."""

    def forward(
        self, pixel_values=None, packed: PackedImages | None = None, feature_layer=0, **kwargs
    ):
        if packed is None:
            return super().forward(pixel_values=pixel_values, **kwargs)
        embeddings = self.vision_model.embeddings
        conv = embeddings.patch_embedding
        patches = packed.patches_TCPP.to(conv.weight.dtype)
        patch_TD = F.linear(patches.flatten(1), conv.weight.flatten(1), conv.bias)
        positions = torch.cat([self._positions(embeddings, grid) for grid in packed.grids])
        return _packed_encoder(self, patch_TD + positions, packed, feature_layer)

    @staticmethod
    def _positions(embeddings, grid: tuple[int, int]) -> torch.Tensor:
        table = embeddings.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        if grid == (side, side):
            return table
        square = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)


class PackedSiglip2VisionModel(BatchedFeatures, Siglip2VisionModel):
    """SigLIP2 (NaFlex): a linear patch embedding over (p, p, 3) patches and its square grid of
    position embeddings resized bilinearly, with antialiasing, to each image's grid — what its
    own forward does for one image with `spatial_shapes`."""

    packs_square_images = True

    def forward(
        self, pixel_values=None, packed: PackedImages | None = None, feature_layer=0, **kwargs
    ):
        if packed is None:
            return super().forward(pixel_values=pixel_values, **kwargs)
        embeddings = self.vision_model.embeddings
        weight = embeddings.patch_embedding.weight
        patches = packed.patches_TCPP.permute(0, 2, 3, 1).flatten(1).to(weight.dtype)
        patch_TD = embeddings.patch_embedding(patches)
        table = embeddings.position_embedding.weight
        side = embeddings.position_embedding_size
        square = table.reshape(side, side, -1).permute(2, 0, 1)[None].float()
        positions = torch.cat(
            [
                F.interpolate(
                    square, size=grid, mode="bilinear", align_corners=False, antialias=True
                )
                .reshape(table.shape[1], -1)
                .T.to(table.dtype)
                for grid in packed.grids
            ]
        )
        return _packed_encoder(self, patch_TD + positions, packed, feature_layer)


class PackedPixtralVisionModel(BatchedFeatures, PixtralVisionModel):
    """Pixtral's ViT (Pixtral-12B, Mistral 3): a bias-free convolutional patch embedding, an
    RMSNorm, then RMSNorm pre-norm layers with a SiLU-gated MLP and 2-D RoPE: each patch's
    frequencies are those of its row for half the pairs and of its column for the other half,
    over a grid of up to image_size / patch_size a side. transformers runs several images as
    one sequence with a block-diagonal mask; packed, each image is one bidirectional document
    of our layout, which is the same attention."""

    packs_square_images = True

    def forward(
        self, pixel_values=None, packed: PackedImages | None = None, feature_layer=0, **kwargs
    ):
        if packed is None:
            return super().forward(pixel_values=pixel_values, **kwargs)
        side = self.config.image_size // self.config.patch_size
        too_large = [grid for grid in packed.grids if max(grid) > side]
        if too_large:
            raise ValueError(
                f"a {too_large[0][0]}x{too_large[0][1]}-patch image is larger than the Pixtral "
                f"tower's {side}x{side} position grid (model.vision.image_size)"
            )
        conv = self.patch_conv
        patches = packed.patches_TCPP.to(conv.weight.dtype)
        x_TD = self.ln_pre(F.linear(patches.flatten(1), conv.weight.flatten(1)))
        position_ids = torch.cat(
            [
                (torch.arange(rows)[:, None] * side + torch.arange(cols)).flatten()
                for rows, cols in packed.grids
            ]
        ).to(x_TD.device)
        cos, sin = (t[:, None] for t in self.patch_positional_embedding(x_TD, position_ids))

        def run_layer(layer, x_TD):
            attention = layer.attention
            h_TD = layer.attention_norm(x_TD)
            out = _packed_self_attention(attention, h_TD, packed, attention.scaling, (cos, sin))
            x_TD = x_TD + attention.o_proj(out)
            return x_TD + layer.feed_forward(layer.ffn_norm(x_TD))

        x_TD, _ = _packed_layers(self.transformer.layers, x_TD, feature_layer, run_layer)
        return x_TD  # no final norm: last_hidden_state is the last layer's output


class PackedQwen2VisionModel(BatchedFeatures, Qwen2VisionTransformerPretrainedModel):
    """Qwen2-VL's ViT without its merger (our `qwen2_merger` adaptor holds it): a bias-free
    Conv3d patch embedding over two identical frames of a still image (the processor repeats
    it; here the two temporal kernel slices are summed), pre-LayerNorm blocks with a fused qkv
    and a QuickGELU MLP, and 2-D RoPE: a quarter of each head's frequencies by the patch's row,
    a quarter by its column, each used twice (half-split rotation). transformers orders the
    patches of every 2 × 2 token together; the attention is the same in row-major order, which
    is ours (`merge_patches` groups them after)."""

    packs_square_images = True

    def __init__(self, config):
        super().__init__(config)
        del self.merger  # our adaptor

    @property
    def feature_dim(self) -> int:
        return self.config.embed_dim  # its hidden_size is the language model's width

    @property
    def num_layers(self) -> int:
        return self.config.depth

    def forward(self, pixel_values=None, packed: PackedImages | None = None, feature_layer=0):
        if packed is None:
            raise ValueError("the Qwen2-VL tower runs packed images only (PackedImages)")
        conv = self.patch_embed.proj.weight  # (D, 3, frames, p, p)
        patches = packed.patches_TCPP.to(conv.dtype)
        x_TD = F.linear(patches.flatten(1), conv.sum(2).flatten(1))
        inv_freq = self.rotary_pos_emb.inv_freq
        angles = []
        for rows, cols in packed.grids:
            row = torch.arange(rows, device=x_TD.device).repeat_interleave(cols)
            col = torch.arange(cols, device=x_TD.device).repeat(rows)
            by_row, by_col = (torch.outer(t.float(), inv_freq) for t in (row, col))
            angles.append(torch.cat((by_row, by_col), dim=-1))
        angles_TF = torch.cat(angles)
        emb = torch.cat((angles_TF, angles_TF), dim=-1)[:, None]  # (T, 1, head_dim)
        cos, sin = emb.cos(), emb.sin()

        def run_layer(block, x_TD):
            attention = block.attn
            h_TD = block.norm1(x_TD)
            q, k, v = attention.qkv(h_TD).view(len(h_TD), 3, attention.num_heads, -1).unbind(1)
            q, k = ((t.float() * cos + _rotate_half(t.float()) * sin).to(t.dtype) for t in (q, k))
            out = packed_attention(
                q, k, v, packed.layout, backend=_tower_backend(q), scale=attention.scaling
            )
            x_TD = x_TD + attention.proj(out.reshape(len(x_TD), -1))
            return x_TD + block.mlp(block.norm2(x_TD))

        x_TD, _ = _packed_layers(self.blocks, x_TD, feature_layer, run_layer)
        return x_TD  # no final norm: the merger normalizes


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RawPatchesConfig(PretrainedConfig):
    """The "config" of `RawPatches`: the patch size its features are made of."""

    model_type = "raw_patches"

    def __init__(self, image_size: int = 32, patch_size: int = 8, num_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.hidden_size = num_channels * patch_size**2
        self.num_hidden_layers = 0


class RawPatches(nn.Module):
    """No encoder (Fuyu, `model.vision.tower: none`): each patch's normalized pixels are its
    features, (p, p, 3) flattened channel-last (Fuyu's image processor's `patchify_image`
    order), for the adaptor to embed. No parameters, so nothing to train or shard."""

    packs_square_images = False
    num_prefix_tokens = 0

    def __init__(self, config: RawPatchesConfig):
        super().__init__()
        self.config = config

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return 0

    def _init_weights(self, module: nn.Module) -> None:
        pass  # nothing to initialize

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        """(N, 3, H, W) → (N, rows · cols, p · p · 3)."""
        p = self.config.patch_size
        patches = pixel_values.unfold(2, p, p).unfold(3, p, p)  # (N, 3, rows, cols, p, p)
        return patches.permute(0, 2, 3, 4, 5, 1).flatten(3).flatten(1, 2)

    def forward(self, packed: PackedImages, feature_layer: int = 0) -> torch.Tensor:
        return packed.patches_TCPP.permute(0, 2, 3, 1).flatten(1)


class Blip2TowerConfig(PretrainedConfig):
    """The config of `Blip2QueryTower`: BLIP-2's vision and Q-Former configs and its query count
    (the parts of a transformers Blip2Config that are not the language model)."""

    model_type = "blip_2_tower"

    def __init__(
        self,
        vision_config: dict | None = None,
        qformer_config: dict | None = None,
        num_query_tokens: int = 32,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vision_config = Blip2VisionConfig(**(vision_config or {}))
        self.qformer_config = Blip2QFormerConfig(**(qformer_config or {}))
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        # No dropout (the Q-Former's default is 0.1), as in the rest of our model: a sharded run
        # then draws what a single-process one does and gives its losses.
        self.vision_config.attention_dropout = 0.0
        self.qformer_config.hidden_dropout_prob = 0.0
        self.qformer_config.attention_probs_dropout_prob = 0.0
        self.num_query_tokens = num_query_tokens
        self.initializer_range = initializer_range

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["qformer_config"] = self.qformer_config.to_dict()
        return out


class Blip2QueryTower(nn.Module):
    """BLIP-2's ViT and Q-Former, transformers' own modules under Blip2ForConditionalGeneration's
    names (`vision_model`, `query_tokens`, `qformer`): `num_query_tokens` learned queries
    cross-attend to the ViT's last_hidden_state (its CLS token included), and their outputs are
    the image's tokens, as many whatever the image (`model.vision.num_queries`); the adaptor
    (`linear`) is BLIP-2's language projection. Square images, batched."""

    packs_square_images = False
    num_prefix_tokens = 0
    modules_at_model_level = True  # models/hf_designs.py: its checkpoint names

    def __init__(self, config: Blip2TowerConfig):
        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
        )
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self._init_weights(self)

    @property
    def feature_dim(self) -> int:
        return self.config.qformer_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.vision_config.num_hidden_layers

    @property
    def attention_width(self) -> int:
        return self.config.vision_config.hidden_size

    @property
    def num_patches(self) -> int:
        """Tokens the ViT attends over per image: its patches and the CLS token."""
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    def dense_flops_per_image(self, input_needs_grad: bool = False) -> int:
        """Forward + backward FLOPs of the tower's linear and convolution layers per image
        (models/flops.py `layer_flops`): the ViT's over its patches, the Q-Former's over the
        queries but its cross-attention keys and values over the ViT's output; a layer's input
        needs a gradient when a parameter before it (in module order) is trained, so a frozen
        ViT runs forward only."""
        vision = self.config.vision_config
        grid = (vision.image_size // vision.patch_size) ** 2
        flops, upstream = 0, input_needs_grad
        for module in self.vision_model.modules():
            if isinstance(module, nn.Conv2d):
                flops += layer_flops(module, grid, upstream)  # the patch embedding
            elif isinstance(module, nn.Linear):
                flops += layer_flops(module, self.num_patches, upstream)
            upstream |= trains(module)
        # A layer's MLP for text tokens (an InstructBLIP-style Q-Former's) sees none.
        text_only = {
            id(part)
            for layer in self.qformer.encoder.layer
            for name in ("intermediate", "output")
            for part in getattr(layer, name, nn.Module()).modules()
        }
        vit_trained, upstream = upstream, self.query_tokens.requires_grad
        for name, module in self.qformer.named_modules():
            if isinstance(module, nn.Linear) and id(module) not in text_only:
                if ".crossattention." in name and name.endswith((".key", ".value")):
                    flops += layer_flops(module, self.num_patches, vit_trained)
                else:
                    flops += layer_flops(module, self.config.num_query_tokens, upstream)
            upstream |= trains(module)
        return flops

    def attention_flops_per_image(self, input_needs_grad: bool = False) -> int:
        """The Q-Former's attention FLOPs per image (models/flops.py): 4 · width per (query,
        key) pair forward, three times that with a backward; the queries attend to each other
        in every layer and to the ViT's output (its CLS token included) in the cross-attention
        layers. (The ViT's own attention is the tower's pairs.)"""
        qformer, queries = self.config.qformer_config, self.config.num_query_tokens
        cross = sum(layer.has_cross_attention for layer in self.qformer.encoder.layer)
        pairs = qformer.num_hidden_layers * queries * queries + cross * queries * self.num_patches
        backward = input_needs_grad or any(p.requires_grad for p in self.parameters())
        return (3 if backward else 1) * 4 * qformer.hidden_size * pairs

    def _init_weights(self, module: nn.Module) -> None:
        # The queries start as LAVIS's BLIP-2 draws them (transformers' init zeroes them: every
        # query alike); the rest as transformers' Blip2PreTrainedModel initializes it.
        if module is self:
            nn.init.normal_(self.query_tokens, std=self.config.initializer_range)
        else:
            Blip2PreTrainedModel._init_weights(self, module)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) → (N, num_query_tokens, Q-Former width). A forward of its own, so that
        a sharded engine's hooks on the tower (FSDP2's gather) run."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds)[0]

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        return self(pixel_values)


class DeepseekHybridTowerConfig(PretrainedConfig):
    """The config of `DeepseekHybridTower`: DeepSeek-VL 7B's SigLIP and SAM configs and the
    pixel normalization of each path (the parts of a transformers DeepseekVLHybridConfig that
    are not the language model)."""

    model_type = "deepseek_hybrid_tower"

    def __init__(
        self,
        vision_config: dict | None = None,
        high_res_vision_config: dict | None = None,
        low_res_normalization: str = "siglip",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vision_config = SiglipVisionConfig(**(vision_config or {}))
        self.high_res_vision_config = SamVisionConfig(**(high_res_vision_config or {}))
        self.low_res_normalization = low_res_normalization

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["high_res_vision_config"] = self.high_res_vision_config.to_dict()
        return out


class DeepseekHybridTower(nn.Module):
    """DeepSeek-VL 7B's two towers, transformers' own modules under
    DeepseekVLHybridForConditionalGeneration's names: SAM-B reads the image at its size (the
    high-resolution path, normalized as `model.vision.normalization`: CLIP's), its neck and
    strided convolutions bring its features onto SigLIP's grid, and SigLIP reads the image
    resized to its own `image_size` (the low-resolution path, renormalized to its own
    normalization). Each token's features are the two side by side, SAM's first; the
    `hybrid_aligner` adaptor projects each half. Square images, batched."""

    packs_square_images = False
    num_prefix_tokens = 0
    modules_at_model_level = True  # models/hf_designs.py: its checkpoint names

    def __init__(self, config: DeepseekHybridTowerConfig):
        super().__init__()
        self.config = config
        sam, siglip = config.high_res_vision_config, config.vision_config
        self.high_res_vision_model = SamVisionModel(sam)
        self.high_res_vision_neck = DeepseekVLSamVisionNeck(sam)
        self.high_res_vision_proj = DeepseekVLSamVisionProj(
            sam, output_size=siglip.image_size // siglip.patch_size
        )
        self.high_res_vision_alpha = nn.Parameter(torch.zeros(1))
        self.vision_model = SiglipVisionModel(siglip)
        self._flops: tuple[int, int] | None = None  # `_forward_flops`
        head = getattr(self.vision_model.vision_model, "head", None)
        if head is not None:  # SigLIP's pooling head: in the checkpoint, never run (`_low_res`)
            head.requires_grad_(False)

    @property
    def high_res_dim(self) -> int:
        """The width of the SAM path's features (the first part of each token's)."""
        return 4 * self.config.high_res_vision_config.output_channels

    @property
    def feature_dim(self) -> int:
        return self.high_res_dim + self.config.vision_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.vision_config.num_hidden_layers

    def _init_weights(self, module: nn.Module) -> None:
        # Each tower by its own transformers init; the neck and projection as
        # DeepseekVLHybridModel initializes them, SAM's early features switched off (alpha 0).
        if module is self:
            self.high_res_vision_alpha.data.zero_()
            return
        for tower in (self.vision_model, self.high_res_vision_model):
            if any(module is part for part in tower.modules()):
                tower._init_weights(module)
                return
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def low_res_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The low-resolution path's input: the images resized (antialiased bicubic) to SigLIP's
        `image_size` and renormalized from CLIP's normalization to its own."""
        size = self.config.vision_config.image_size
        unit = to_unit(pixel_values, "clip")
        resized = F.interpolate(unit, size=(size, size), mode="bicubic", antialias=True)
        normalization = self.config.low_res_normalization
        return from_unit(resized.clamp(0, 1), normalization).to(pixel_values.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) at SAM's size → (N, grid², high_res_dim + SigLIP width), row-major over
        SigLIP's grid. A forward of its own, so that a sharded engine's hooks run."""
        low = self._low_res(self.low_res_pixels(pixel_values))
        sam = self.high_res_vision_model(pixel_values=pixel_values, output_hidden_states=True)
        last = self.high_res_vision_proj(sam.last_hidden_state)
        index = self.config.high_res_vision_config.global_attn_indexes[0] + 1  # after embeddings
        early = self.high_res_vision_proj(self.high_res_vision_neck(sam.hidden_states[index]))
        high = (last + early * self.high_res_vision_alpha).flatten(2).transpose(1, 2)
        return torch.cat([high, low], dim=-1)

    def _low_res(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP's last_hidden_state, without its pooling head (transformers runs the head and
        drops its output)."""
        siglip = self.vision_model.vision_model
        hidden = siglip.encoder(inputs_embeds=siglip.embeddings(pixel_values)).last_hidden_state
        return siglip.post_layernorm(hidden)

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        return self(pixel_values)

    def _forward_flops(self) -> tuple[int, int]:
        """(weights, attention) FLOPs of one image's forward, counted by torch's flop counter on
        a copy of the tower built on the meta device (no memory, no compute): SAM's windows,
        relative positions and strided convolutions are priced as they run."""
        if self._flops is None:  # counted once: dense and attention both read it
            side = self.config.high_res_vision_config.image_size
            self._flops = meta_flops(DeepseekHybridTower, self.config, "__call__", side)
        return self._flops

    def dense_flops_per_image(self, input_needs_grad: bool = False) -> int:
        """Its linear and convolution layers' FLOPs per image (models/flops.py): the forward,
        and a trained tower's backward priced at twice it."""
        trained = input_needs_grad or any(p.requires_grad for p in self.parameters())
        return (3 if trained else 1) * self._forward_flops()[0]

    def attention_flops_per_image(self, input_needs_grad: bool = False) -> int:
        """Both towers' attention FLOPs per image, forward (and a backward at twice it)."""
        trained = input_needs_grad or any(p.requires_grad for p in self.parameters())
        return (3 if trained else 1) * self._forward_flops()[1]


class ChameleonVQTower(ChameleonVQVAE):
    """Chameleon's image tokenizer: transformers' own VQ-VAE (its encoder, quant_conv and
    codebook; post_quant_conv, the decoder's entry, is kept to be written back). Each
    patch_size × patch_size region of an image becomes the index of its nearest codebook
    vector, which `model.adaptor: vocabulary` turns into a vocabulary id. Always frozen: it
    makes integer codes, through which no gradient flows."""

    packs_square_images = False
    num_prefix_tokens = 0
    discrete = True  # its output is codes, not features (models/split_vlm.py)

    @property
    def feature_dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_layers(self) -> int:
        return 0  # no transformer layers (models/flops.py prices it per image)

    @property
    def codebook_size(self) -> int:
        return self.config.num_embeddings

    @property
    def downsampling(self) -> int:
        """Pixels a side of the region one code stands for."""
        return 2 ** (len(self.config.channel_multiplier) - 1)

    def requires_grad_(self, requires_grad: bool = True):
        return super().requires_grad_(False)  # codes: no gradient flows through them

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalized pixels → (N, rows · cols) int64 codes, row-major."""
        with torch.no_grad():
            _, _, indices = self.encode(pixel_values)
        return indices.view(pixel_values.shape[0], -1)

    def codes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self(pixel_values)  # through the module's call: hooks (the flop counter's) see it

    def _forward_flops(self) -> tuple[int, int]:
        """(dense, attention) FLOPs of one image's encoding, by torch's flop counter over a
        meta-device copy of the tower: its convolutions and codebook distances, and the batched
        matmuls of its middle block's attention."""
        if not hasattr(self, "_flops"):
            self._flops = meta_flops(ChameleonVQTower, self.config, "codes", self.config.resolution)
        return self._flops

    def dense_flops_per_image(self, input_needs_grad: bool = False) -> int:
        return self._forward_flops()[0]  # frozen, and no gradient flows through codes

    def attention_flops_per_image(self, input_needs_grad: bool = False) -> int:
        return self._forward_flops()[1]


class ConcatenatedTowersConfig(PretrainedConfig):
    """The config of `ConcatenatedTowers`: each tower's transformers config, in order, with the
    feature layer and normalization each reads the image at, and the normalization the images
    come in (`model.vision.normalization`)."""

    model_type = "concatenated_towers"

    def __init__(
        self,
        towers: list[dict] | None = None,
        feature_layers: list[int] | None = None,
        normalizations: list[str] | None = None,
        input_normalization: str = "siglip",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.towers = [dict(tower) for tower in towers or []]
        self.feature_layers = list(feature_layers or [])
        self.normalizations = list(normalizations or [])
        self.input_normalization = input_normalization


class ConcatenatedTowers(nn.Module):
    """Several encoders over the same square images (`model.vision.extra_towers`): each reads
    the image in its own normalization at its own feature layer, and a token's features are
    theirs side by side, in order (the tower's, then each extra one's). Every tower must give the
    same grid of tokens. Batched, transformers' own forward for each."""

    packs_square_images = False
    num_prefix_tokens = 0  # each tower drops its own (CLIP's CLS)

    def __init__(self, config: ConcatenatedTowersConfig, towers: list[nn.Module] | None = None):
        super().__init__()
        self.config = config
        if towers is None:
            towers = [model_class(hf) for hf, model_class in map(tower_class, config.towers)]
        self.towers = nn.ModuleList(towers)
        for tower in towers:
            if tower.packs_square_images or not isinstance(tower, BatchedFeatures):
                raise ValueError(
                    f"model.vision.extra_towers: a {type(tower).__name__} is not one of the "
                    "square, batched towers (SigLIP, SigLIP2, CLIP) concatenation takes"
                )

    @classmethod
    def of(cls, cfg: VisionConfig, towers: list[nn.Module]) -> ConcatenatedTowers:
        """The tower of `cfg` and its extra towers, built already, as one."""
        config = ConcatenatedTowersConfig(
            towers=[tower.config.to_dict() for tower in towers],
            feature_layers=[cfg.feature_layer, *(e.feature_layer for e in cfg.extra_towers)],
            normalizations=[cfg.normalization, *(e.normalization for e in cfg.extra_towers)],
            input_normalization=cfg.normalization,
        )
        return cls(config, towers)

    @property
    def feature_dim(self) -> int:
        return sum(tower.feature_dim for tower in self.towers)

    @property
    def num_layers(self) -> int:
        return max(tower.num_layers for tower in self.towers)

    @property
    def input_layers(self) -> list[nn.Module]:
        """Each tower's patch embedding: the layers that read pixels (models/flops.py)."""
        return [tower.vision_model.embeddings.patch_embedding for tower in self.towers]

    @property
    def attention_width_layers(self) -> int:
        """Σ width × layers over the towers: what one attended pair costs (models/flops.py)."""
        return sum(tower.feature_dim * tower.num_layers for tower in self.towers)

    def _init_weights(self, module: nn.Module) -> None:
        for tower in self.towers:
            if any(module is part for part in tower.modules()):
                tower._init_weights(module)
                return

    def forward(self, pixel_values: torch.Tensor, feature_layer: int | None = None):
        """(N, 3, S, S) images in `input_normalization` → (N, grid², Σ widths). A forward of its
        own, so that a sharded engine's hooks run. `feature_layer` (default the config's)
        replaces the first tower's."""
        layers = list(self.config.feature_layers)
        if feature_layer is not None:
            layers[0] = feature_layer
        features = []
        for tower, layer, normalization in zip(
            self.towers, layers, self.config.normalizations, strict=True
        ):
            pixels = renormalize(pixel_values, self.config.input_normalization, normalization)
            features.append(tower.image_features(pixels, layer))
        if len({f.shape[1] for f in features}) != 1:
            raise ValueError(
                f"model.vision.extra_towers: the towers give {[f.shape[1] for f in features]} "
                "tokens per image; they must share one grid"
            )
        return torch.cat(features, dim=-1)

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        return self(pixel_values, feature_layer)


def renormalize(pixels: torch.Tensor, source: str, target: str) -> torch.Tensor:
    """Images normalized as `source` (PIXEL_NORMALIZATIONS) → the same images as `target`."""
    if source == target:
        return pixels
    return from_unit(to_unit(pixels, source), target).to(pixels.dtype)


def _mean_std(normalization: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = PIXEL_NORMALIZATIONS[normalization]
    return (torch.tensor(v, device=device).view(3, 1, 1) for v in (mean, std))


def to_unit(pixels: torch.Tensor, normalization: str) -> torch.Tensor:
    """Images normalized as `normalization` → their [0, 1] values."""
    mean, std = _mean_std(normalization, pixels.device)
    return pixels * std + mean


def from_unit(unit: torch.Tensor, normalization: str) -> torch.Tensor:
    """[0, 1] images → normalized as `normalization`."""
    mean, std = _mean_std(normalization, unit.device)
    return (unit - mean) / std


class JanusTowerConfig(PretrainedConfig):
    """The config of `JanusTower`: Janus's ViT and VQ-VAE configs (the parts of a transformers
    JanusConfig that are neither the language model nor the generation path's)."""

    model_type = "janus_tower"

    def __init__(self, vision_config: dict | None = None, vq_config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = JanusVisionConfig(**(vision_config or {}))
        self.vq_config = JanusVQVAEConfig(**(vq_config or {}))

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["vq_config"] = self.vq_config.to_dict()
        return out


class JanusTower(nn.Module):
    """Janus's two image paths, transformers' own modules under JanusForConditionalGeneration's
    names: its SigLIP-like ViT (`vision_model`, read at its last_hidden_state) for the images the
    model reads, and its VQ-VAE (`vqmodel`, always frozen) that turns the images the model
    generates into codes of its own codebook, one per patch_size × patch_size region, on the
    ViT's grid. One call encodes a micro-batch's images of both kinds (`forward`): under a
    sharded engine every rank then gathers the tower once per micro-batch, whatever its images
    are. Square images, batched."""

    packs_square_images = False
    num_prefix_tokens = 0
    modules_at_model_level = True  # models/hf_designs.py: its checkpoint names
    adapted_tokens = "read_image"  # its adaptor sees the images it reads (models/flops.py)

    def __init__(self, config: JanusTowerConfig):
        super().__init__()
        self.config = config
        self.vision_model = JanusVisionModel(config.vision_config)
        self.vqmodel = JanusVQVAE(config.vq_config)
        self.vqmodel.requires_grad_(False)
        vision = config.vision_config
        if self.downsampling != vision.patch_size:
            raise ValueError(
                f"Janus's VQ-VAE makes a code of {self.downsampling} pixels a side, its ViT a "
                f"token of {vision.patch_size}: they must be equal (one image token each)"
            )

    @property
    def feature_dim(self) -> int:
        return self.config.vision_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.vision_config.num_hidden_layers

    @property
    def codebook_size(self) -> int:
        return self.config.vq_config.num_embeddings

    @property
    def downsampling(self) -> int:
        """Pixels a side of the region one code stands for."""
        return 2 ** (len(self.config.vq_config.channel_multiplier) - 1)

    def requires_grad_(self, requires_grad: bool = True):
        super().requires_grad_(requires_grad)
        self.vqmodel.requires_grad_(False)  # codes: no gradient flows through them
        return self

    def _init_weights(self, module: nn.Module) -> None:
        for part in (self.vision_model, self.vqmodel):
            if any(module is m for m in part.modules()):
                part._init_weights(module)
                return

    def forward(self, pixel_values: torch.Tensor, generated: torch.Tensor | None = None):
        """(N, 3, S, S) normalized images and which of them the model generates (bool (N,),
        default none) → (features (N_read, grid², width) of the others, codes (N_generated,
        grid²) int64), each row-major. With no image to read, the ViT still runs, on the first
        image, and gives no features: every parameter gets a (zero) gradient on every rank."""
        if generated is None:
            generated = torch.zeros(len(pixel_values), dtype=torch.bool, device=pixel_values.device)
        read = ~generated
        any_read = bool(read.any())
        pixels = pixel_values[read] if any_read else pixel_values[:1]
        features = self.vision_model(pixel_values=pixels).last_hidden_state
        features = features if any_read else features[:0]
        codes = torch.zeros(0, features.shape[1], dtype=torch.long, device=pixel_values.device)
        if bool(generated.any()):
            with torch.no_grad():
                _, _, indices = self.vqmodel.encode(pixel_values[generated])
            codes = indices.view(int(generated.sum()), -1)
        return features, codes

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        return self(pixel_values)[0]

    def _forward_flops(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((dense, attention) FLOPs of reading one image, the same of encoding one into
        codes), by torch's flop counter over a meta-device copy of the tower."""
        if not hasattr(self, "_flops"):
            size = self.config.vision_config.image_size
            self._flops = [
                meta_flops(JanusTower, self.config, path, size)
                for path in ("vision_model.__call__", "vqmodel.encode")
            ]
        return self._flops[0], self._flops[1]

    def batch_flops(self, batch, cfg, input_needs_grad: bool = False) -> tuple[int, int]:
        """(dense, attention) FLOPs of the micro-batch's images: each read one through the ViT
        (forward, and a trained ViT's backward at twice it), each generated one through the
        VQ-VAE's encoder (forward only); the ViT runs on one image when none is read."""
        (read_dense, read_attention), (code_dense, code_attention) = self._forward_flops()
        num_images = len(batch.image_grids)
        if not num_images:
            return 0, 0
        generated = int(batch.image_mask.sum()) // cfg.num_image_tokens()
        read = max(num_images - generated, 1)
        trained = any(p.requires_grad for p in self.parameters())
        factor = 3 if trained or input_needs_grad else 1
        dense = factor * read * read_dense + generated * code_dense
        if trained and not input_needs_grad:  # the patch embedding's input is pixels: no gradient
            patches = self.config.vision_config.image_size // self.downsampling
            conv = self.vision_model.embeddings.patch_embedding.weight
            dense -= read * 2 * conv.numel() * patches**2
        return dense, factor * read * read_attention + generated * code_attention


class JanusGeneration(nn.Module):
    """Janus's generation path beside its language model, transformers' own modules under its
    names: each code's embedding (`generation_embeddings`) and the aligner that brings it to the
    LLM's width (`generation_aligner`) make a generated image's input tokens; the head
    (`generation_head`) predicts a code from the final norm's output, over the codebook."""

    def __init__(self, vq_config: JanusVQVAEConfig, d_model: int):
        super().__init__()
        vq = JanusVQVAEConfig(**{**vq_config.to_dict(), "projection_dim": d_model})
        vq.image_token_embed_dim = d_model
        self.generation_embeddings = nn.Embedding(vq.num_embeddings, vq.embed_dim)
        self.generation_aligner = JanusVQVAEAlignerMLP(vq)
        self.generation_head = JanusVQVAEHead(vq)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., T) → input tokens (..., T, d_model)."""
        return self.generation_aligner(self.generation_embeddings(codes))

    def forward(self, hidden_TC: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of `codes` (T,) predicted from normed hidden states (T, C)."""
        logits = self.generation_head(hidden_TC).float()
        return F.cross_entropy(logits, codes, reduction="sum")


class WholeImageFlops:
    """`batch_flops` of a cross-attention tower whose every image is one pass of the same
    size (`image_size`): its forward FLOPs by torch's flop counter over a meta-device copy,
    times three with a backward; a trained tower's patch embedding (`patch_convolution`) has
    no input gradient to compute."""

    def batch_flops(self, batch, cfg, input_needs_grad: bool = False) -> tuple[int, int]:
        if not hasattr(self, "_flops"):
            self._flops = meta_flops(type(self), self.config, "__call__", self.image_size)
        dense, attention = self._flops
        num_images = len(batch.image_grids)
        trained = any(p.requires_grad for p in self.parameters())
        factor = 3 if trained or input_needs_grad else 1
        dense_total = factor * num_images * dense
        if trained and not input_needs_grad:  # the patch embedding's input is pixels
            conv, positions = self.patch_convolution()
            dense_total -= num_images * 2 * conv.weight.numel() * positions
        return dense_total, factor * num_images * attention


class MllamaTower(WholeImageFlops, MllamaVisionModel):
    """LLaMA-3.2-Vision's tiled ViT (transformers' MllamaVisionModel, its names and init), for
    cross-attention: each square image is one tile, followed by zero tiles up to the
    checkpoint's `max_num_tiles`, as transformers' processor pads an image of one tile (aspect
    ratio 1 × 1), and every tile slot's features come out, padding's included (a text token
    before a document's first image attends to them: models/cross_attention.py
    `mllama_layout`). A feature is the last layer's output, then the intermediate layers', side
    by side (`vision_output_dim` wide)."""

    packs_square_images = False
    num_prefix_tokens = 0
    adapted_tokens = "cross_keys"  # its adaptor sees every key of the stream (models/flops.py)

    @property
    def feature_dim(self) -> int:
        return self.config.vision_output_dim

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers + self.config.num_global_layers

    @property
    def tokens_per_tile(self) -> int:
        """A tile's tokens: its patches and the class token."""
        return self.num_patches

    @property
    def tile_slots(self) -> int:
        return self.config.max_num_tiles

    def forward(self, pixel_values: torch.Tensor, tiles=None) -> torch.Tensor:
        """Normalized images → (N, tile_slots · tokens_per_tile, feature_dim): (N, 3, S, S)
        square images of one tile each, or (N, 3, S, tile_slots · S) rows of tile slots
        (`tiling: mllama`) whose first rows × cols (`tiles`, one (rows, cols) an image) are
        the image's own; the other slots are zeroed, as its processor pads them."""
        count, slots, size = len(pixel_values), self.tile_slots, self.image_size
        arrangements = [(1, 1) if tuple(t) == (0, 0) else tuple(t) for t in (tiles or [])]
        arrangements = arrangements or [(1, 1)] * count
        slotted = pixel_values.new_zeros(1, count, slots, 3, size, size)
        if pixel_values.shape[-1] == size:
            slotted[0, :, 0] = pixel_values
        else:
            slotted[0] = pixel_values.view(count, 3, size, slots, size).permute(0, 3, 1, 2, 4)
        own = torch.tensor([rows * cols for rows, cols in arrangements], device=slotted.device)
        mask = (torch.arange(slots, device=slotted.device)[None] < own[:, None]).long()[None]
        slotted = slotted * mask[..., None, None, None].to(slotted.dtype)
        ratios = [list(r) for r in self.config.supported_aspect_ratios]
        ids = [ratios.index([rows, cols]) + 1 for rows, cols in arrangements]
        ids = torch.tensor([ids], dtype=torch.long, device=slotted.device)
        features = super().forward(
            pixel_values=slotted, aspect_ratio_ids=ids, aspect_ratio_mask=mask
        )
        return features.last_hidden_state.reshape(count, slots * self.num_patches, -1)

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        return self(pixel_values)

    def patch_convolution(self) -> tuple[nn.Conv2d, int]:
        """The patch embedding and the positions it runs at an image (every tile slot's)."""
        return self.patch_embedding, self.tile_slots * (self.num_patches - 1)


class IdeficsTowerConfig(PretrainedConfig):
    """The config of `IdeficsTower`: Idefics' vision and perceiver configs and whether the
    resampler runs (the parts of a transformers IdeficsConfig that are not the language
    model)."""

    model_type = "idefics_tower"

    def __init__(
        self,
        vision_config: dict | None = None,
        perceiver_config: dict | None = None,
        use_resampler: bool = False,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vision_config = IdeficsVisionConfig(**(vision_config or {}))
        # What IdeficsModel sets on its ViT's config (which it builds as a plain module).
        self.vision_config._attn_implementation = "sdpa"
        self.perceiver_config = IdeficsPerceiverConfig(**(perceiver_config or {}))
        self.use_resampler = use_resampler
        self.initializer_range = initializer_range

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["perceiver_config"] = self.perceiver_config.to_dict()
        return out


class IdeficsTower(WholeImageFlops, nn.Module):
    """Flamingo's image path as transformers' Idefics has it, its own modules under its names
    (`vision_model`, `perceiver_resampler`), for cross-attention: a CLIP-like ViT over the
    square image, whose last_hidden_state (class token included, no final norm) the perceiver
    resampler's learned latents read; the latents' outputs (or, without a resampler, the ViT's
    tokens) are the image's keys, at the ViT's width (the `identity` adaptor: the
    cross-attention's k/v projections read them). Square images, batched."""

    packs_square_images = False
    num_prefix_tokens = 0
    modules_at_model_level = True  # models/hf_designs.py: its checkpoint names
    adapted_tokens = "cross_keys"  # models/flops.py

    def __init__(self, config: IdeficsTowerConfig):
        super().__init__()
        self.config = config
        self.vision_model = IdeficsVisionTransformer(config.vision_config)
        self.perceiver_resampler = None
        if config.use_resampler:
            perceiver = config.perceiver_config
            self.perceiver_resampler = IdeficsPerceiverResampler(
                config,
                config.vision_config.embed_dim,
                perceiver.resampler_depth,
                perceiver.resampler_n_heads,
                perceiver.resampler_head_dim,
                perceiver.resampler_n_latents,
            )
        self.apply(self._init_weights)

    @property
    def feature_dim(self) -> int:
        return self.config.vision_config.embed_dim

    @property
    def num_layers(self) -> int:
        return self.config.vision_config.num_hidden_layers

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def tokens_per_tile(self) -> int:
        """An image's keys: the resampler's latents, or the ViT's patches and class token."""
        if self.perceiver_resampler is not None:
            return self.perceiver_resampler.n_latents
        return self.vision_model.embeddings.num_positions

    tile_slots = 1

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' IdeficsPreTrainedModel init (normal linear, convolution and embedding
        # weights, unit norms, normal class embedding and latents).
        IdeficsPreTrainedModel._init_weights(self, module)

    def forward(self, pixel_values: torch.Tensor, tiles=None) -> torch.Tensor:
        """(N, 3, S, S) normalized images → (N, tokens_per_tile, feature_dim); `tiles` unused
        (every image one pass)."""
        features = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if self.perceiver_resampler is not None:
            features = self.perceiver_resampler(features)
        return features

    def image_features(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        return self(pixel_values)

    def patch_convolution(self) -> tuple[nn.Conv2d, int]:
        embeddings = self.vision_model.embeddings
        return embeddings.patch_embedding, embeddings.num_patches


class CLIPTower(BatchedFeatures, CLIPVisionModel):
    """CLIP (LLaVA's encoder): transformers' own model, square images only (its position
    embeddings are a fixed grid plus the CLS token's), batched; the CLS token is dropped from
    the features (LLaVA's `vision_feature_select_strategy: default`)."""

    num_prefix_tokens = 1


class Idefics3Tower(BatchedFeatures, Idefics3VisionTransformer):
    """Idefics3's (and SmolVLM's) SigLIP: transformers' own model, square tiles batched. Its
    position ids are its own (bucketed fractions of the grid, which repeat the first row and
    column's), so it is not SigLIP's class with other names."""


class SmolVLMTower(BatchedFeatures, SmolVLMVisionTransformer):
    """SmolVLM's SigLIP: Idefics3's under SmolVLM's names (`Idefics3Tower`)."""


# model_type in a checkpoint's config.json → (config class, tower class)
VISION_TOWERS = {
    "siglip_vision_model": (SiglipVisionConfig, PackedSiglipVisionModel),
    "siglip2_vision_model": (Siglip2VisionConfig, PackedSiglip2VisionModel),
    "clip_vision_model": (CLIPVisionConfig, CLIPTower),
    "pixtral": (PixtralVisionConfig, PackedPixtralVisionModel),
    "qwen2_vl": (Qwen2VLVisionConfig, PackedQwen2VisionModel),
    "idefics3_vision": (Idefics3VisionConfig, Idefics3Tower),
    "smolvlm_vision": (SmolVLMVisionConfig, SmolVLMTower),
    "raw_patches": (RawPatchesConfig, RawPatches),
    "blip_2_tower": (Blip2TowerConfig, Blip2QueryTower),
    "deepseek_hybrid_tower": (DeepseekHybridTowerConfig, DeepseekHybridTower),
    "chameleon_vqgan": (ChameleonVQVAEConfig, ChameleonVQTower),
    "janus_tower": (JanusTowerConfig, JanusTower),
    "mllama_vision_model": (MllamaVisionConfig, MllamaTower),
    "idefics_tower": (IdeficsTowerConfig, IdeficsTower),
    "concatenated_towers": (ConcatenatedTowersConfig, ConcatenatedTowers),
}
# Full two-tower checkpoints whose vision half we take.
_TWO_TOWER_TYPES = {
    "siglip": "siglip_vision_model",
    "siglip2": "siglip2_vision_model",
    "clip": "clip_vision_model",
}


def _random_size(cfg: VisionConfig) -> dict:
    """A random tower's size in transformers' vision config fields."""
    return dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )


def _random_siglip(cfg: VisionConfig):
    return SiglipVisionConfig(**_random_size(cfg), vision_use_head=False), PackedSiglipVisionModel


def _random_clip(cfg: VisionConfig):
    return CLIPVisionConfig(**_random_size(cfg)), CLIPTower


def _random_pixtral(cfg: VisionConfig):
    size = _random_size(cfg)
    head_dim = size["hidden_size"] // size["num_attention_heads"]
    return PixtralVisionConfig(**size, head_dim=head_dim), PackedPixtralVisionModel


def _random_qwen2_vl(cfg: VisionConfig):
    config = Qwen2VLVisionConfig(
        depth=cfg.num_layers,
        embed_dim=cfg.hidden_size,
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        spatial_merge_size=cfg.spatial_merge,
    )
    return config, PackedQwen2VisionModel


def _random_idefics3(cfg: VisionConfig):
    return Idefics3VisionConfig(**_random_size(cfg)), Idefics3Tower


def _random_blip2(cfg: VisionConfig):
    size = _random_size(cfg)
    qformer = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
    )
    config = Blip2TowerConfig(
        vision_config=size, qformer_config=qformer, num_query_tokens=cfg.num_queries
    )
    return config, Blip2QueryTower


def _random_deepseek_hybrid(cfg: VisionConfig):
    """SigLIP of the size in `cfg`; SAM as wide and deep, on `high_res_size` pixels in 16-pixel
    patches, windows of half its grid, the last layer global (the neck's input)."""
    grid = cfg.high_res_size // 16
    sam = dict(
        hidden_size=cfg.hidden_size,
        output_channels=cfg.hidden_size // 2,
        mlp_dim=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.high_res_size,
        patch_size=16,
        window_size=max(1, grid // 2),
        global_attn_indexes=[cfg.num_layers - 1],
    )
    config = DeepseekHybridTowerConfig(vision_config=_random_size(cfg), high_res_vision_config=sam)
    return config, DeepseekHybridTower


def _random_chameleon_vq(cfg: VisionConfig):
    """Chameleon's VQ-VAE at `patch_size` downsampling (log2 of it halvings, constant width
    `hidden_size`, `num_layers` resnet blocks a level, attention in its middle block only),
    `codebook_size` codes of hidden_size values."""
    levels = int(math.log2(cfg.patch_size)) + 1
    config = ChameleonVQVAEConfig(
        embed_dim=cfg.hidden_size,
        num_embeddings=cfg.codebook_size,
        latent_channels=cfg.hidden_size,
        resolution=cfg.image_size,
        base_channels=cfg.hidden_size,
        channel_multiplier=[1] * levels,
        num_res_blocks=cfg.num_layers,
        attn_resolutions=[],
    )
    return config, ChameleonVQTower


def _random_janus(cfg: VisionConfig):
    """Janus's ViT of the size in `cfg` (its aligner: our `mlp` adaptor) and a VQ-VAE of
    `codebook_size` codes at `patch_size` downsampling, 32 channels wide, one resnet block a
    level (Janus's: 128 base channels, 16 × downsampling, 16384 codes of 8 values)."""
    levels = int(math.log2(cfg.patch_size)) + 1
    vision = {**_random_size(cfg), "mlp_ratio": 4.0}
    vision.pop("intermediate_size")
    vq = dict(
        embed_dim=8,
        num_embeddings=cfg.codebook_size,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1] * levels,
        num_res_blocks=1,
        num_patches=cfg.image_size // cfg.patch_size,
    )
    return JanusTowerConfig(vision_config=vision, vq_config=vq), JanusTower


def _random_mllama(cfg: VisionConfig):
    """LLaMA-3.2-Vision's tiled ViT of the size fields: `num_layers` local layers, one gated
    global layer, the middle local layer's output read beside the last one's; `max_num_tiles`
    tile slots and every aspect ratio of at most that many tiles (its processor's list)."""
    size = _random_size(cfg)
    slots = cfg.max_num_tiles
    ratios = [[w, h] for w in range(1, slots + 1) for h in range(1, slots + 1) if w * h <= slots]
    config = MllamaVisionConfig(
        **size,
        num_global_layers=1,
        vision_output_dim=2 * cfg.hidden_size,
        intermediate_layers_indices=[cfg.num_layers // 2],
        max_num_tiles=slots,
        supported_aspect_ratios=ratios,
    )
    return config, MllamaTower


def _random_idefics(cfg: VisionConfig):
    """Idefics' ViT of the size fields and, with `num_queries` > 0, a perceiver resampler of
    that many latents, two layers deep, with the ViT's heads (Idefics 9B's: 64 latents, six
    layers, 16 heads of 96)."""
    size = _random_size(cfg)
    vision = {**size, "embed_dim": size.pop("hidden_size")}
    perceiver = dict(
        use_resampler=cfg.num_queries > 0,
        resampler_n_latents=cfg.num_queries or 64,
        resampler_depth=2,
        resampler_n_heads=cfg.num_heads,
        resampler_head_dim=cfg.hidden_size // cfg.num_heads,
    )
    config = IdeficsTowerConfig(
        vision_config=vision, perceiver_config=perceiver, use_resampler=cfg.num_queries > 0
    )
    return config, IdeficsTower


def _no_tower(cfg: VisionConfig):
    return RawPatchesConfig(image_size=cfg.image_size, patch_size=cfg.patch_size), RawPatches


# `model.vision.tower` → the (transformers config, tower class) of a random build from VisionConfig
RANDOM_TOWERS = {
    "siglip": _random_siglip,
    "clip": _random_clip,
    "pixtral": _random_pixtral,
    "qwen2_vl": _random_qwen2_vl,
    "idefics3": _random_idefics3,
    "none": _no_tower,
    "blip2": _random_blip2,
    "deepseek_hybrid": _random_deepseek_hybrid,
    "chameleon_vq": _random_chameleon_vq,
    "janus": _random_janus,
    "mllama": _random_mllama,
    "idefics": _random_idefics,
}
assert tuple(RANDOM_TOWERS) == VISION_TOWER_NAMES, "update models.config as well"


def tower_type(path: str | Path) -> str:
    """The vision tower type of a checkpoint directory, from its config.json."""
    config_file = Path(path) / "config.json"
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model.vision.pretrained: cannot read {config_file} ({err})") from None
    model_type = _TWO_TOWER_TYPES.get(model_type, model_type)
    if model_type not in VISION_TOWERS:
        supported = ", ".join([*_TWO_TOWER_TYPES, *VISION_TOWERS])
        raise ValueError(
            f"{config_file}: a {model_type!r} model is not a supported vision tower "
            f"(supported: {supported})"
        )
    return model_type


def tower_class(config: dict):
    """The tower class for a transformers vision config dict (an exported model's)."""
    config_class, model_class = VISION_TOWERS[config.get("model_type", "siglip_vision_model")]
    return config_class.from_dict(config), model_class


def build_vision_tower(cfg: VisionConfig, config: dict | None = None) -> nn.Module:
    """From `cfg` (random, or the architecture of `cfg.pretrained`, whose weights the model
    reads tensor by tensor: `pretrained_vision_weights`), or from `config` (a transformers vision
    config dict) with random weights. With `cfg.extra_towers`, all of them as one
    `ConcatenatedTowers`."""
    if config is not None:
        hf_config, model_class = tower_class(config)
        tower = model_class(hf_config)
    else:
        tower = _one_tower(cfg, cfg.pretrained, cfg.tower)
        if cfg.extra_towers:
            extras = [_one_tower(cfg, extra.pretrained, extra.tower) for extra in cfg.extra_towers]
            tower = ConcatenatedTowers.of(cfg, [tower, *extras])
    if cfg.pretrained and config is None and not building_on_meta():  # on meta: the engine's
        weights = pretrained_vision_weights(cfg, tower)
        with torch.no_grad():
            for name, parameter in tower.named_parameters():
                parameter.copy_(weights[name])
    tower.requires_grad_(cfg.trainable)
    return tower


def _one_tower(cfg: VisionConfig, pretrained: str, random_tower: str) -> nn.Module:
    """A tower of `pretrained`'s architecture (its weights not read), or a random
    `random_tower` of `cfg`'s size fields."""
    if not pretrained:
        hf_config, model_class = RANDOM_TOWERS[random_tower](cfg)
        return model_class(hf_config)
    config_class, model_class = VISION_TOWERS[tower_type(pretrained)]
    hf_config = config_class.from_pretrained(pretrained)
    # SigLIP2 has no image size: its position grid is resized to every image.
    image_size = getattr(hf_config, "image_size", cfg.image_size)
    if image_size != cfg.image_size or hf_config.patch_size != cfg.patch_size:
        raise ValueError(
            f"model.vision.image_size/patch_size must match the checkpoint at {pretrained} "
            f"({image_size}/{hf_config.patch_size})"
        )
    return model_class(hf_config)


def pretrained_vision_weights(cfg: VisionConfig, tower: nn.Module) -> dict[str, torch.Tensor]:
    """The pretrained tower's parameters by name (fp32, on the CPU): `cfg.pretrained`'s, and
    with extra towers each one's under its `towers.{i}.` names."""
    if not isinstance(tower, ConcatenatedTowers):
        return pretrained_tower_weights(cfg.pretrained, tower)
    paths = [cfg.pretrained, *(extra.pretrained for extra in cfg.extra_towers)]
    weights = {}
    for index, (path, part) in enumerate(zip(paths, tower.towers, strict=True)):
        weights |= {
            f"towers.{index}.{k}": v for k, v in pretrained_tower_weights(path, part).items()
        }
    return weights


def pretrained_tower_weights(path: str, tower: nn.Module) -> dict[str, torch.Tensor]:
    """The pretrained tower's parameters by name (fp32, on the CPU), read tensor by tensor from
    its safetensors. A two-tower checkpoint (SiglipModel) gives its `vision_model.*` tensors."""
    checkpoint = SafetensorsDir(path, what="model.vision.pretrained")
    names = [name for name, _ in tower.named_parameters()]
    missing = [name for name in names if name not in checkpoint.tensor_files]
    if missing:
        raise ValueError(
            f"{checkpoint.listed_in}: no tensor {missing[0]!r} (and {len(missing) - 1} more) of "
            f"the {type(tower).__name__} its config.json describes"
        )
    expected = dict(tower.named_parameters())
    weights = {}
    for name in names:
        weights[name] = checkpoint.read(name, shape=tuple(expected[name].shape))
    return weights


# Adaptors take (..., merge² · vision_dim) features, the merge² patches of a token side by side
# (`merge_patches`), to (..., d_model); a resampler takes an image's (N, patches, vision_dim)
# features to its (N, num_queries, d_model) tokens.


def _linear_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    vision_dim = tower.feature_dim
    return nn.Linear(vision_dim * cfg.vision.spatial_merge**2, cfg.d_model)


def _mlp_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    vision_dim = tower.feature_dim
    width, d_model = vision_dim * cfg.vision.spatial_merge**2, cfg.d_model
    return nn.Sequential(nn.Linear(width, d_model), nn.GELU(), nn.Linear(d_model, d_model))


class _Merger(nn.Module):
    """The merging layer of `PatchMergerAdaptor` (its transformers name)."""

    def __init__(self, vision_dim: int, merge: int):
        super().__init__()
        self.merging_layer = nn.Linear(vision_dim * merge**2, vision_dim, bias=False)


class PatchMergerAdaptor(nn.Module):
    """Mistral 3's projector: an RMSNorm over each patch's features, the merge × merge patches
    of a token concatenated channel by channel (torch's `unfold` order: channel-major) into a
    bias-free linear back to the tower's width, then Linear-GELU-Linear to the LLM's width.
    Parameter names are transformers' `Mistral3MultiModalProjector`'s."""

    def __init__(self, vision_dim: int, d_model: int, merge: int, eps: float, bias: bool = False):
        super().__init__()
        self.merge = merge
        self.norm = nn.RMSNorm(vision_dim, eps=eps)
        self.patch_merger = _Merger(vision_dim, merge)
        self.linear_1 = nn.Linear(vision_dim, d_model, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        patches = features.unflatten(-1, (self.merge**2, -1))  # (..., merge², vision_dim)
        normed = self.norm(patches.float()).to(patches.dtype)
        merged = self.patch_merger.merging_layer(normed.transpose(-1, -2).flatten(-2))
        return self.linear_2(self.act(self.linear_1(merged)))


def _patch_merger_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    vision_dim = tower.feature_dim
    # Mistral 3's projector norm takes the LLM's epsilon.
    return PatchMergerAdaptor(vision_dim, cfg.d_model, cfg.vision.spatial_merge, cfg.norm_eps)


class Qwen2MergerAdaptor(nn.Module):
    """Qwen2-VL's merger: a LayerNorm over each patch's features, the merge × merge patches of a
    token side by side (patch-major: `merge_patches`' order), Linear-GELU-Linear to the LLM's
    width. Parameter names are transformers' `PatchMerger`'s (`visual.merger.*`)."""

    def __init__(self, vision_dim: int, d_model: int, merge: int, eps: float):
        super().__init__()
        self.merge = merge
        self.ln_q = nn.LayerNorm(vision_dim, eps=1e-6)
        width = vision_dim * merge**2
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, d_model))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        patches = features.unflatten(-1, (self.merge**2, -1))
        return self.mlp(self.ln_q(patches).flatten(-2))


def _qwen2_merger_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    vision_dim = tower.feature_dim
    return Qwen2MergerAdaptor(vision_dim, cfg.d_model, cfg.vision.spatial_merge, cfg.norm_eps)


def _pixel_shuffle_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Idefics3's connector: its pixel shuffle puts each token's merge × merge patches side by
    side in `merge_patches`' order, then one bias-free linear."""
    return nn.Linear(tower.feature_dim * cfg.vision.spatial_merge**2, cfg.d_model, bias=False)


def sincos_2d(width: int, rows: int, cols: int) -> torch.Tensor:
    """(rows · cols, width) fixed 2-D sine-cosine position embeddings, row-major (MAE's, as
    Qwen-VL's resampler uses them): the first half of the channels encodes the column, the
    second half the row, each as sines then cosines of 1 / 10000^(2i / (width / 2))."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.double()[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([encode(col.flatten()), encode(row.flatten())], dim=1).float()


class QueryResampler(nn.Module):
    """Qwen-VL's connector: `num_queries` learned queries (a square grid, with fixed 2-D
    sine-cosine positions) read an image's patch features in one cross-attention layer, so every
    image gives `num_queries` tokens whatever its size: the features projected to the LLM's
    width (bias-free) and layer-normed are the values; plus the queries' positions, bicubically
    resized to the image's patch grid, the keys; then a LayerNorm and a bias-free projection.
    Square patch grids; the attention is bidirectional (every query sees every patch)."""

    def __init__(
        self, vision_dim: int, d_model: int, num_queries: int, num_heads: int, num_patches: int
    ):
        super().__init__()
        self.num_patches = num_patches  # per image (the FLOPs count)
        self.side, self.num_heads = math.isqrt(num_queries), num_heads  # ModelConfig checks
        self.query = nn.Parameter(torch.zeros(num_queries, d_model))
        self.register_buffer(
            "query_positions", sincos_2d(d_model, self.side, self.side), persistent=False
        )
        self.kv_proj = nn.Linear(vision_dim, d_model, bias=False)
        self.ln_q = nn.LayerNorm(d_model, eps=1e-6)
        self.ln_kv = nn.LayerNorm(d_model, eps=1e-6)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.ln_post = nn.LayerNorm(d_model, eps=1e-6)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def key_positions(self, side: int) -> torch.Tensor:
        """The queries' positions resized to a `side` × `side` patch grid (Qwen-VL's
        get_abs_pos: bicubic, align_corners false; as they are when the grids agree)."""
        table = self.query_positions
        if side == self.side:
            return table
        grid = table.reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(side * side, -1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, patches, vision_dim) of square patch grids → (N, num_queries, d_model)."""
        n, patches, _ = features.shape
        side = math.isqrt(patches)
        assert side * side == patches, f"a square patch grid, not {patches} patches"
        values = self.ln_kv(self.kv_proj(features))
        keys = values + self.key_positions(side).to(values.dtype)
        queries = (self.ln_q(self.query) + self.query_positions.to(values.dtype)).expand(n, -1, -1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(queries)), heads(self.k_proj(keys)), heads(self.v_proj(values))
        )
        out = self.out_proj(attended.transpose(1, 2).flatten(2))
        return self.proj(self.ln_post(out))

    def attention_flops_per_image(self, input_needs_grad: bool) -> int:
        """Its attention FLOPs per image: every query with every patch, 4 · d_model a pair
        forward, three times that with a backward (models/flops.py)."""
        backward = input_needs_grad or any(p.requires_grad for p in self.parameters())
        pairs = self.query.shape[0] * self.num_patches
        return (3 if backward else 1) * 4 * self.query.shape[1] * pairs

    def dense_flops_per_image(self, input_needs_grad: bool) -> int:
        """Forward + backward FLOPs of its linear layers per image (models/flops.py): the
        feature projection, keys and values over the patches, the rest over the queries."""
        patches, queries = self.num_patches, self.query.shape[0]
        kv_grad = input_needs_grad or trains(self.kv_proj) or trains(self.ln_kv)
        query_grad = self.query.requires_grad or trains(self.ln_q)
        flops = layer_flops(self.kv_proj, patches, input_needs_grad)
        flops += layer_flops(self.k_proj, patches, kv_grad) + layer_flops(
            self.v_proj, patches, kv_grad
        )
        flops += layer_flops(self.q_proj, queries, query_grad)
        upstream = (
            kv_grad or query_grad or any(trains(m) for m in (self.q_proj, self.k_proj, self.v_proj))
        )
        flops += layer_flops(self.out_proj, queries, upstream)
        upstream |= trains(self.out_proj) or trains(self.ln_post)
        return flops + layer_flops(self.proj, queries, upstream)


class HybridAligner(nn.Module):
    """DeepSeek-VL 7B's aligner: each half of a hybrid tower's features (SAM's, then SigLIP's)
    projected to half the LLM's width, side by side (SAM's first), GELU, one more linear.
    Parameter names are transformers' `DeepseekVLHybridAligner`'s."""

    def __init__(self, high_res_dim: int, low_res_dim: int, d_model: int):
        super().__init__()
        self.high_res_dim = high_res_dim
        self.vision_proj = nn.Linear(low_res_dim, d_model // 2)
        self.high_res_vision_proj = nn.Linear(high_res_dim, d_model // 2)
        self.act = nn.GELU()
        self.proj = nn.Linear(d_model, d_model)

    @property
    def input_layers(self) -> list[nn.Module]:
        """The layers that read the tower's features (models/flops.py)."""
        return [self.vision_proj, self.high_res_vision_proj]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        high, low = features.split([self.high_res_dim, features.shape[-1] - self.high_res_dim], -1)
        both = torch.cat([self.high_res_vision_proj(high), self.vision_proj(low)], dim=-1)
        return self.proj(self.act(both))


def _hybrid_aligner(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    high_res_dim = tower.high_res_dim
    return HybridAligner(high_res_dim, tower.feature_dim - high_res_dim, cfg.d_model)


def _resampler_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    vision_dim = tower.feature_dim
    side = cfg.vision.image_size // cfg.vision.patch_size  # square images only
    return QueryResampler(
        vision_dim, cfg.d_model, cfg.vision.num_queries, cfg.num_heads, num_patches=side * side
    )


class VocabularyAdaptor(nn.Module):
    """A VQ tokenizer's codes → vocabulary ids: code c is id `start` + c (`model.adaptor:
    vocabulary`, Chameleon's). No parameters: the ids are embedded by the token embedding."""

    def __init__(self, start: int, codebook_size: int):
        super().__init__()
        self.start, self.codebook_size = start, codebook_size

    @property
    def ids(self) -> range:
        """The image tokens' vocabulary ids."""
        return range(self.start, self.start + self.codebook_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.start


def _vocabulary_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    start = cfg.image_vocab_start
    if start < 0 or start + tower.codebook_size > cfg.vocab_size:
        raise ValueError(
            f"model.image_vocab_start={start}: the {tower.codebook_size} image token ids must "
            f"lie in the vocabulary ({cfg.vocab_size} ids)"
        )
    return VocabularyAdaptor(start, tower.codebook_size)


def _identity_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    """The tower's features as they are (Flamingo's: cross-attention reads the tower's width,
    `ModelConfig.cross_key_width`)."""
    return nn.Identity()


ADAPTORS = {
    "linear": _linear_adaptor,
    "mlp": _mlp_adaptor,
    "patch_merger": _patch_merger_adaptor,
    "qwen2_merger": _qwen2_merger_adaptor,
    "pixel_shuffle": _pixel_shuffle_adaptor,
    "resampler": _resampler_adaptor,
    "hybrid_aligner": _hybrid_aligner,
    "vocabulary": _vocabulary_adaptor,
    "identity": _identity_adaptor,
}
assert tuple(ADAPTORS) == ADAPTOR_NAMES, "update models.config as well"


def build_adaptor(tower: nn.Module, cfg: ModelConfig) -> nn.Module:
    """`cfg.adaptor` from the tower's features (`tower.feature_dim` wide) to the LLM's width."""
    if cfg.adaptor not in ADAPTORS:
        raise ValueError(f"unknown adaptor {cfg.adaptor!r}; valid: {', '.join(sorted(ADAPTORS))}")
    return ADAPTORS[cfg.adaptor](tower, cfg)


def merge_patches(features: torch.Tensor, grid: tuple[int, int], merge: int) -> torch.Tensor:
    """(N, rows·m · cols·m, C) patch features on a row-major grid of `grid` (rows, cols) tokens
    of m × m patches → (N, rows · cols, m² · C): each token's patches side by side, row-major
    within the token (the order of torch's `unfold` kernel)."""
    if merge == 1:
        return features
    n, _, c = features.shape
    rows, cols = grid
    blocks = features.view(n, rows, merge, cols, merge, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, rows * cols, merge * merge * c)


# `model.vision.normalization` → per-channel (mean, std) of pixels in [0, 1] (the image
# processors' image_mean and image_std).
PIXEL_NORMALIZATIONS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "chameleon": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
}
# The factor uint8 pixels are rescaled by before the mean and std: 1 / 255, but Chameleon's
# image processor's 0.0078 (pixels in [-1, 0.99]).
PIXEL_RESCALE = {"chameleon": 0.0078}
assert tuple(PIXEL_NORMALIZATIONS) == PIXEL_NORMALIZATION_NAMES, "update models.config as well"


def normalize_pixels(pixels: torch.Tensor, normalization: str = "siglip") -> torch.Tensor:
    """uint8 pixels (..., 3, H, W), as the loader ships them → the tower's normalization
    (SigLIP's: mean 0.5 and std 0.5 per channel, in [-1, 1]). Floating-point input is taken as
    normalized already and passed through."""
    if pixels.is_floating_point():
        return pixels
    if normalization == "siglip":  # kept as it was, bit for bit
        return pixels.float() / 127.5 - 1.0
    mean, std = (
        torch.tensor(v, device=pixels.device).view(3, 1, 1)
        for v in PIXEL_NORMALIZATIONS[normalization]
    )
    if normalization in PIXEL_RESCALE:
        return (pixels.float() * PIXEL_RESCALE[normalization] - mean) / std
    return (pixels.float() / 255.0 - mean) / std


def patchify(pixels_NCHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, 3, H, W) → (N, num_patches, 3 * p * p), patches in row-major order like the encoder."""
    n, c, _, _ = pixels_NCHW.shape
    patches = F.unfold(pixels_NCHW, kernel_size=patch_size, stride=patch_size)
    return patches.transpose(1, 2).reshape(n, -1, c * patch_size * patch_size)


def image_target_dim(cfg: ModelConfig, vision_dim: int) -> int:
    return vision_dim if cfg.image_target == "encoder" else 3 * cfg.vision.token_size**2


def normalize_targets(targets: torch.Tensor) -> torch.Tensor:
    # Per-token normalization (as MAE does for pixels) keeps the loss scale independent of the
    # encoder's feature scale; predicting zero scores exactly 1.0 under MSE.
    return F.layer_norm(targets, (targets.shape[-1],), eps=1e-6)
