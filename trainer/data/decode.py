"""Decode one MDS sample into a `Document`: token ids, loss targets, image spans and image masks.

Runs on the CPU side of the pipeline (inside the streaming dataset), so the model sees only
tensors. Everything random here (image mask rates and positions) is seeded by the sample's
global index and epoch, which makes a resumed run see exactly the masks an uninterrupted one did.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.config import ModelConfig
from trainer.data.shards import IMAGE_PLACEHOLDER, unpack_blobs

ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>"}
REQUIRED_SPECIAL_TOKENS = ("<|user|>", "<|assistant|>", "<image_start>", "<image_end>")


class DecodeError(ValueError):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Document:
    sample_id: str
    input_ids: torch.Tensor  # int64 (n,); image positions hold the pad id
    target_mask: torch.Tensor  # bool (n,): token t is a text-loss target (predicted at t - 1)
    segments: list[tuple[str, int]]  # ("text" | "image", length), in order
    pixel_values: torch.Tensor  # float32 (num_images, 3, H, W)
    image_mask: torch.Tensor  # bool (num_image_tokens,): replaced by the mask embedding
    image_span_full: torch.Tensor  # bool (num_image_tokens,): the token's span is masked entirely

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


class Decoder:
    def __init__(self, tokenizer, model_cfg: ModelConfig, max_tokens: int, seed: int = 0):
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; add them before training")
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.max_tokens = max_tokens
        self.seed = seed
        ids = tokenizer.convert_tokens_to_ids
        self.role_ids = {role: ids(token) for role, token in ROLE_TOKENS.items()}
        self.image_start_id = ids("<image_start>")
        self.image_end_id = ids("<image_end>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(
        self, sample: dict, sample_index: int, epoch: int = 0, prompt_only: bool = False
    ) -> Document:
        """Decode for training; with `prompt_only` (inference), stop after the last assistant
        marker, drop the final assistant turn's content and mask nothing."""
        rng = np.random.default_rng([self.seed, epoch, sample_index])
        images = [self._load_image(blob) for blob in unpack_blobs(sample.get("images") or b"")]
        ids: list[int] = [self.tokenizer.bos_token_id]
        targets: list[bool] = [False]
        segments: list[tuple[str, int]] = []
        text_run = 1
        images_used = 0
        if sample.get("text"):
            turns = [("text", sample["text"])]
        elif sample.get("messages"):
            turns = [(m["role"], m["content"]) for m in sample["messages"]]
        else:
            raise DecodeError("empty", "no text and no messages")
        spans = self.model_cfg.image_spans()
        if prompt_only:
            if turns[-1][0] != "assistant":
                raise DecodeError("empty", "a prompt needs a final assistant turn to complete")
            turns = [*turns[:-1], ("assistant", "")]
        for role, content in turns:
            is_target = role in ("text", "assistant")
            if role in self.role_ids:
                ids.append(self.role_ids[role])
                targets.append(False)
                text_run += 1
            pieces = content.split(IMAGE_PLACEHOLDER)
            for i, piece in enumerate(pieces):
                if i > 0:  # an image goes between two pieces
                    if images_used == len(images):
                        raise DecodeError("image_missing", "more <image> than images")
                    images_used += 1
                    ids.append(self.image_start_id)
                    targets.append(False)
                    segments.append(("text", text_run + 1))
                    for side, _ in spans:
                        ids.extend([self.pad_id] * side * side)
                        targets.extend([False] * side * side)
                        segments.append(("image", side * side))
                    ids.append(self.image_end_id)
                    targets.append(False)
                    text_run = 1
                piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                targets.extend([is_target] * len(piece_ids))
                text_run += len(piece_ids)
            if is_target and not (prompt_only and role == "assistant" and not content):
                ids.append(self.tokenizer.eos_token_id)
                targets.append(True)
                text_run += 1
        if images_used != len(images):
            raise DecodeError("image_unused", f"{len(images)} images but {images_used} <image>")
        segments.append(("text", text_run))
        if len(ids) > self.max_tokens:
            raise DecodeError("too_long", f"{len(ids)} tokens > data.max_tokens={self.max_tokens}")
        image_mask = [
            self._sample_mask(side * side, rng, is_copy or prompt_only)
            for _ in images
            for side, is_copy in spans
        ]
        span_full = [mask.all().expand_as(mask) for mask in image_mask]
        size = self.model_cfg.vision.image_size
        return Document(
            sample_id=sample.get("id", str(sample_index)),
            input_ids=torch.tensor(ids, dtype=torch.long),
            target_mask=torch.tensor(targets, dtype=torch.bool),
            segments=segments,
            pixel_values=torch.stack(images) if images else torch.zeros(0, 3, size, size),
            image_mask=torch.cat(image_mask) if image_mask else torch.zeros(0, dtype=torch.bool),
            image_span_full=torch.cat(span_full) if span_full else torch.zeros(0, dtype=torch.bool),
        )

    def _sample_mask(
        self, num_tokens: int, rng: np.random.Generator, is_copy: bool
    ) -> torch.Tensor:
        # Draw every random number whether or not it is used, so the stream does not depend on
        # which spans are copies.
        rate = rng.uniform(self.model_cfg.mask_rate_min, self.model_cfg.mask_rate_max)
        if rng.uniform() < self.model_cfg.full_mask_prob:
            rate = 1.0
        if is_copy:
            rate = 0.0
        num_masked = int(round(rate * num_tokens))
        mask = np.zeros(num_tokens, dtype=bool)
        mask[rng.permutation(num_tokens)[:num_masked]] = True
        return torch.from_numpy(mask)

    def _load_image(self, blob: bytes) -> torch.Tensor:
        size = self.model_cfg.vision.image_size
        try:
            with Image.open(io.BytesIO(blob)) as image:
                image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DecodeError("image_corrupt", str(err)) from None
        # SigLIP normalization: mean 0.5, std 0.5 per channel.
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        return (pixels.permute(2, 0, 1) - 0.5) / 0.5
