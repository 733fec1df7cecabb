"""The split VLM: late merge, shared core, early split (DESIGN.md §4).

    text ids → embed → text-in blocks (text only, causal) ─┐
                                                          ├→ scatter → core → text-head blocks → LM head
    image → SigLIP → adaptor → [mask] → image-in blocks ─┘              └→ image-head blocks → image head

With every depth but the core at 0 and `image_attention="causal"` this is a LLaVA-style decoder.
The forward pass takes one packed micro-batch and returns summed losses; the engine divides by
global target counts so the gradient does not depend on how samples were split or sharded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import yaml
from models.attention import PackedLayout
from models.blocks import Block, RMSNorm, rope_tables, run_blocks
from models.config import ModelConfig, model_config_from_dict
from models.vision import (
    build_adaptor,
    build_vision_tower,
    image_target_dim,
    normalize_targets,
    patchify,
)


class SplitVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vision_config: dict | None = None):
        """`vision_config`: a transformers SiglipVisionConfig as a dict, to rebuild an exported
        tower's architecture without its original checkpoint directory."""
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer)")
        self.cfg = cfg
        # Sharded engines set this. Every submodule then runs in every forward, on a blank image
        # where the micro-batch has none and on no positions where nothing is masked: FSDP and
        # ZeRO-3 gather parameters per module and reduce gradients per parameter, so every rank
        # must call the same modules in the same order and give every parameter a gradient.
        self.run_every_branch = False
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.vision = build_vision_tower(cfg.vision, vision_config)
        vision_dim = self.vision.config.hidden_size
        self.adaptor = build_adaptor(cfg.adaptor, vision_dim, cfg.d_model)
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.d_model))

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(Block(cfg) for _ in range(n))

        self.text_in = blocks(cfg.num_text_in_blocks)
        self.image_in = blocks(cfg.num_image_in_blocks)
        self.core = blocks(cfg.num_core_blocks)
        self.text_head_blocks = blocks(cfg.num_text_head_blocks)
        self.image_head_blocks = blocks(cfg.num_image_head_blocks)
        self.text_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.image_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.image_head = nn.Linear(cfg.d_model, image_target_dim(cfg, vision_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if name.startswith("vision"):
                continue  # the encoder keeps its own (pretrained or transformers) init
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_embedding, std=self.cfg.init_std)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> SplitVLM:
        """A model written by `splitvlm export`: config.yaml, vision_config.json, safetensors."""
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise ValueError(f"{path}: no model.safetensors (write one with `splitvlm export`)")
        cfg = model_config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
        vision_file = path / "vision_config.json"
        vision_config = json.loads(vision_file.read_text()) if vision_file.is_file() else None
        cfg.vision.pretrained = ""  # the exported weights replace the original encoder's
        model = cls(cfg, vision_config)
        model.load_state_dict(load_file(str(path / "model.safetensors"), device=device))
        return model.to(device)

    def transformer_blocks(self) -> list[nn.Module]:
        """Every block, in order: the unit engines shard and checkpoint."""
        groups = (self.text_in, self.image_in, self.core, self.text_head_blocks)
        return [b for group in (*groups, self.image_head_blocks) for b in group]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, P, vision_dim) encoder features; no graph when the tower is frozen."""
        with torch.set_grad_enabled(self.cfg.vision.trainable and torch.is_grad_enabled()):
            return self.vision(pixel_values=pixel_values).last_hidden_state

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """Summed losses of one `PackedBatch`: text_loss_sum over text targets, image_loss_sum
        over masked image tokens."""
        cfg = self.cfg
        rope = rope_tables(batch.layout.position_ids, cfg.head_dim, cfg.rope_theta)

        def gather_rope(index):
            return rope[0][index], rope[1][index]

        x_TC = self.embed(batch.input_ids)
        if batch.text_layout is not None:
            text_TC = run_blocks(
                self.text_in,
                x_TC[batch.text_index],
                batch.text_layout,
                gather_rope(batch.text_index),
            )
            x_TC = x_TC.index_copy(0, batch.text_index, text_TC)

        image_targets = None
        if batch.image_layout is not None:
            features, image_TC = self._image_tokens(
                batch.pixel_values,
                batch.image_mask,
                batch.image_layout,
                gather_rope(batch.image_index),
            )
            x_TC = x_TC.index_copy(0, batch.image_index, image_TC)
            if cfg.image_target == "encoder":
                raw_targets = features.detach()
            else:
                raw_targets = patchify(batch.pixel_values, cfg.vision.patch_size)
            image_targets = normalize_targets(raw_targets.reshape(-1, raw_targets.shape[-1]))
        elif self.run_every_branch:
            # A blank image through the same modules, joining the sequence where images do but
            # with none of its tokens: the autograd graph has the shape it has with images (so
            # ranks reach their backward collectives in the same order) and every parameter on
            # the path gets an exact zero gradient.
            layout, blank_rope = self._blank_image_layout(x_TC.device)
            size = cfg.vision.image_size
            _, image_TC = self._image_tokens(
                x_TC.new_zeros(1, 3, size, size),
                torch.zeros(layout.num_tokens, dtype=torch.bool, device=x_TC.device),
                layout,
                blank_rope,
            )
            x_TC = x_TC.index_copy(0, batch.image_index, image_TC[:0])

        x_TC = run_blocks(self.core, x_TC, batch.layout, rope)

        text_positions = (batch.labels != -100).nonzero().squeeze(1)
        text_TC = run_blocks(self.text_head_blocks, x_TC, batch.layout, rope)
        logits = self.lm_head(self.text_norm(text_TC[text_positions]))
        text_loss_sum = F.cross_entropy(
            logits.float(), batch.labels[text_positions], reduction="sum"
        )

        image_loss_sum = x_TC.new_zeros(())
        has_masked = image_targets is not None and bool(batch.image_mask.any())
        # With run_every_branch the image head also runs with nothing masked: its loss is then a
        # sum over no positions, zero, with zero gradients.
        if has_masked or self.run_every_branch:
            masked = batch.image_mask.nonzero().squeeze(1)
            # Shift by one: the prediction for image token j is read at position j - 1, which is
            # the previous image token or the <image_start> token before the span.
            read_at = batch.image_index[masked] - 1
            image_TC = run_blocks(self.image_head_blocks, x_TC, batch.layout, rope)
            prediction = self.image_head(self.image_norm(image_TC[read_at])).float()
            if has_masked:
                targets = image_targets[masked].float()
            else:
                targets = prediction.new_zeros(0, prediction.shape[-1])
            image_loss_sum = image_loss(prediction, targets, cfg.image_loss)
        return {"text_loss_sum": text_loss_sum, "image_loss_sum": image_loss_sum}

    def _image_tokens(self, pixels, image_mask, layout: PackedLayout, rope):
        """Encoder features and image-in block outputs of the images in `pixels`."""
        features = self.encode_images(pixels)
        adapted = self.adaptor(features).reshape(-1, self.cfg.d_model)
        image_TC = torch.where(image_mask[:, None], self.mask_embedding.to(adapted.dtype), adapted)
        return features, run_blocks(self.image_in, image_TC, layout, rope)

    def _blank_image_layout(self, device: torch.device) -> tuple[PackedLayout, tuple]:
        kind = "image" if self.cfg.image_attention == "bidirectional" else "text"
        layout = PackedLayout.from_docs([[(kind, self.cfg.num_image_tokens)]]).to(device)
        return layout, rope_tables(layout.position_ids, self.cfg.head_dim, self.cfg.rope_theta)


def image_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over positions; MSE is averaged over the feature dimension."""
    if kind == "mse":
        return (prediction - target).pow(2).mean(dim=-1).sum()
    return (1.0 - F.cosine_similarity(prediction, target, dim=-1)).sum()
