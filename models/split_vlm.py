"""The split VLM: late merge, shared core, early split (DESIGN.md §4).

    text ids → embed → text-in blocks (text only, causal) ─┐
                                                          ├→ scatter → core → text-head blocks → LM head
    image → SigLIP → adaptor → [mask] → image-in blocks ─┘              └→ image-head blocks → image head

With every depth but the core at 0 and `image_attention="causal"` this is a LLaVA-style decoder.
The forward pass takes one packed micro-batch and returns summed losses; the engine divides by
global target counts so the gradient does not depend on how samples were split or sharded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import Block, RMSNorm, rope_tables, run_blocks
from models.config import ModelConfig
from models.vision import (
    build_adaptor,
    build_vision_tower,
    image_target_dim,
    normalize_targets,
    patchify,
)


class SplitVLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.vision = build_vision_tower(cfg.vision)
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
            features = self.encode_images(batch.pixel_values)
            adapted = self.adaptor(features).reshape(-1, cfg.d_model)
            mask = batch.image_mask[:, None]
            image_TC = torch.where(mask, self.mask_embedding.to(adapted.dtype), adapted)
            image_TC = run_blocks(
                self.image_in,
                image_TC,
                batch.image_layout,
                gather_rope(batch.image_index),
            )
            x_TC = x_TC.index_copy(0, batch.image_index, image_TC)
            if cfg.image_target == "encoder":
                raw_targets = features.detach()
            else:
                raw_targets = patchify(batch.pixel_values, cfg.vision.patch_size)
            image_targets = normalize_targets(raw_targets.reshape(-1, raw_targets.shape[-1]))

        x_TC = run_blocks(self.core, x_TC, batch.layout, rope)

        text_positions = (batch.labels != -100).nonzero().squeeze(1)
        text_TC = run_blocks(self.text_head_blocks, x_TC, batch.layout, rope)
        logits = self.lm_head(self.text_norm(text_TC[text_positions]))
        text_loss_sum = F.cross_entropy(
            logits.float(), batch.labels[text_positions], reduction="sum"
        )

        image_loss_sum = x_TC.new_zeros(())
        if image_targets is not None and bool(batch.image_mask.any()):
            masked = batch.image_mask.nonzero().squeeze(1)
            # Shift by one: the prediction for image token j is read at position j - 1, which is
            # the previous image token or the <image_start> token before the span.
            read_at = batch.image_index[masked] - 1
            image_TC = run_blocks(self.image_head_blocks, x_TC, batch.layout, rope)
            prediction = self.image_head(self.image_norm(image_TC[read_at])).float()
            image_loss_sum = image_loss(prediction, image_targets[masked].float(), cfg.image_loss)
        return {"text_loss_sum": text_loss_sum, "image_loss_sum": image_loss_sum}


def image_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over positions; MSE is averaged over the feature dimension."""
    if kind == "mse":
        return (prediction - target).pow(2).mean(dim=-1).sum()
    return (1.0 - F.cosine_similarity(prediction, target, dim=-1)).sum()
