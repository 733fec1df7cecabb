"""The model's input: one packed micro-batch (`PackedBatch`), built by the data pipeline
(trainer/data/packing.py) and read by every stage of the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention import PackedLayout, map_tensors
from models.cross_attention import CrossLayout

# Label of a position with no next-token target (torch's cross-entropy ignore index).
IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One micro-batch: a flat token sequence with the layouts the model's stages need."""

    input_ids: torch.Tensor  # int64 (T,)
    labels: torch.Tensor  # int64 (T,): next-token target at each position, IGNORE_INDEX if none
    layout: PackedLayout  # the merged sequence
    rope_positions: torch.Tensor  # int64 (T, 2): RoPE position of each token, two axes (2-D RoPE)
    text_index: torch.Tensor  # int64 (T_text,): positions of text tokens in the merged sequence
    text_layout: PackedLayout | None  # text tokens only, image spans removed (text-in blocks)
    image_index: torch.Tensor  # int64 (T_image,): positions of image tokens, image after image
    image_layout: PackedLayout | None  # every image its own document (image-in blocks)
    # uint8, float if already normalized: (num_images, 3, H, W) for square images; at native
    # resolution every image's (3, H, W) flattened and concatenated (models.split_vlm.split_images)
    pixel_values: torch.Tensor
    image_grids: list[tuple[int, int]]  # (rows, cols) of patches of each image's full grid
    # (rows, cols) of image_size tiles of each LLaVA-NeXT tiled image (its grid: the kept rows ×
    # kept cols + 1, the newline a column); (0, 0) for every other image
    image_tiles: list[tuple[int, int]]
    image_mask: torch.Tensor  # bool (T_image,)
    image_span_full: torch.Tensor  # bool (T_image,): the token's span is masked entirely
    sample_ids: list[str]
    # Cross-attention designs (model.cross_attention_layers), whose images are a stream of keys:
    # which of them each token sees, and the tower-output row of each key of the stream
    # (models/cross_attention.py `mllama_layout`). None for other designs and without images.
    cross_layout: CrossLayout | None = None
    cross_key_index: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_text_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_masked_image_tokens(self) -> int:
        return int(self.image_mask.sum())

    def image_targets(self, which: str = "masked") -> torch.Tensor:
        """Indices into the image stream of the image tokens with a loss under
        `model.image_loss_tokens` (`which`): the masked ones, or "all"."""
        if which == "all":
            return torch.arange(self.image_index.numel(), device=self.image_index.device)
        return self.image_mask.nonzero().squeeze(1)

    def num_image_targets(self, which: str = "masked") -> int:
        return int(self.image_index.numel()) if which == "all" else self.num_masked_image_tokens

    @property
    def num_diffusion_targets(self) -> int:
        return int((self.image_mask & self.image_span_full).sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy on `device` (non_blocking: from pinned memory the copy overlaps compute)."""
        return map_tensors(self, lambda tensor: tensor.to(device, non_blocking=True))

    def pin_memory(self) -> PackedBatch:
        return map_tensors(self, torch.Tensor.pin_memory)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the batch holds, its layouts' included."""
        found: list[torch.Tensor] = []
        map_tensors(self, lambda tensor: found.append(tensor) or tensor)
        return found
