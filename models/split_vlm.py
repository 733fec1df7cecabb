"""The split VLM: late merge, shared core, early split (DESIGN.md §4).

    text ids → embed → text-in blocks (text only, causal) ─┐
                                                          ├→ scatter → core → text-head blocks → LM head
    image → SigLIP → adaptor → [mask] → image-in blocks ─┘              └→ image-head blocks → image head
                                                                                             └→ diffusion head

With every depth but the core at 0 and `image_attention="causal"` this is a LLaVA-style decoder.
`forward` takes one packed micro-batch and returns summed losses; the engine divides by global
target counts so the gradient does not depend on how samples were split or sharded.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import yaml
from models.attention import PackedLayout
from models.batch import IGNORE_INDEX
from models.blocks import (
    Block,
    CrossAttentionBlock,
    ExpertRoute,
    PerHeadLayerNorm,
    RMSNorm,
    RopeTables,
    TokenEmbedding,
    make_norm,
    rope_tables,
    run_blocks,
)
from models.config import ModelConfig, model_config_from_dict
from models.cross_attention import CrossContext, CrossLayout
from models.diffusion import DiffusionHead
from models.lm_head import LMHead
from models.vision import (
    JanusGeneration,
    JanusTower,
    PackedImages,
    QueryResampler,
    VocabularyAdaptor,
    build_adaptor,
    build_vision_tower,
    image_target_dim,
    merge_patches,
    normalize_pixels,
    normalize_targets,
    packing_backend,
    patchify,
    pretrained_vision_weights,
)

# The block stacks, in the order they run (and are sharded and checkpointed).
BLOCK_GROUPS = ("text_in", "image_in", "core", "text_head_blocks", "image_head_blocks")


@dataclass
class Trunk:
    """What the shared part of the network produces for one micro-batch."""

    hidden_TC: torch.Tensor  # core output, merged sequence
    rope: RopeTables
    image_targets: torch.Tensor | None  # (T_image, target_dim)


class SplitVLM(nn.Module):
    # Which tokens pass each top-level module, for the FLOPs count (models/flops.py, which
    # refuses a module missing here): "patches" the tower's input patches, "image"/"text" the
    # image or text tokens, "all" every token, "text_targets" positions with a text target,
    # "masked" masked image tokens, "all_if_image_loss" every token when the micro-batch has a
    # masked image token, "diffusion_targets" masked tokens of fully masked spans; None: a lookup.
    TOKENS_THROUGH = {
        "embed": None,
        "positions": None,
        "vision": "patches",
        "adaptor": "image",
        "text_in": "text",
        "image_in": "image",
        "core": "all",
        "text_head_blocks": "all",
        "text_norm": "text_targets",
        "lm_head": "text_targets",
        "image_head_blocks": "all_if_image_loss",
        "image_norm": "masked",
        "image_head": "masked",
        "generation": "masked",  # Janus's: a generated image's tokens, in and out
        "diffusion": "diffusion_targets",
    }
    # Block stacks and the `PackedBatch` layout their attention runs on.
    ATTENTION_LAYOUT = {
        "text_in": "text_layout",
        "image_in": "image_layout",
        "core": "layout",
        "text_head_blocks": "layout",
        "image_head_blocks": "layout",
    }
    # The component a top-level module's (or parameter's) weights belong to, for per-component
    # learning rates; everything else is the language model ("llm").
    COMPONENTS = {
        "vision": "vision",
        "adaptor": "adaptor",
        "mask_embedding": "adaptor",
        "image_newline": "adaptor",
        "generation": "adaptor",
    }

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
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.d_model, scaled=cfg.scale_embeddings)
        self.positions = None  # OPT's learned absolute positions
        if cfg.learned_positions:
            rows = cfg.learned_positions + cfg.position_offset
            self.positions = nn.Embedding(rows, cfg.d_model)
        self.vision = build_vision_tower(cfg.vision, vision_config)
        if self.packs_images and self.vision.num_prefix_tokens:
            raise ValueError(
                f"model.vision: a {type(self.vision).__name__} takes square images only "
                f"(resize: square, not {cfg.vision.resize})"
            )
        vision_dim = self.vision.feature_dim
        self.adaptor = build_adaptor(self.vision, cfg)
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.d_model))
        # Janus's generation path: its codes' embedding, aligner and head.
        self.generation = None
        if isinstance(self.vision, JanusTower):
            self.generation = JanusGeneration(self.vision.config.vq_config, cfg.d_model)
        # A tower may say which tokens its adaptor sees (models/flops.py): Janus's only the
        # images it reads, LLaMA-3.2-Vision's every key of the images' stream.
        adapted = getattr(self.vision, "adapted_tokens", "image")
        if adapted != "image":
            self.TOKENS_THROUGH = {**self.TOKENS_THROUGH, "adaptor": adapted}
        # LLaVA-NeXT's learned embedding after every row of a tiled image's grid.
        self.image_newline = None
        if cfg.vision.tiling == "llava_next":
            self.image_newline = nn.Parameter(torch.zeros(cfg.d_model))

        def block(group: str, i: int) -> nn.Module:
            if cfg.is_cross_attention(group, i):
                return CrossAttentionBlock(cfg)
            return Block(cfg, cfg.is_sliding(group, i), cfg.has_expert(group))

        def blocks(group: str, n: int) -> nn.ModuleList:
            return nn.ModuleList(block(group, i) for i in range(n))

        self.text_in = blocks("text_in", cfg.num_text_in_blocks)
        self.image_in = blocks("image_in", cfg.num_image_in_blocks)
        self.core = blocks("core", cfg.num_core_blocks)
        self.text_head_blocks = blocks("text_head_blocks", cfg.num_text_head_blocks)
        self.image_head_blocks = blocks("image_head_blocks", cfg.num_image_head_blocks)
        self.text_norm = make_norm(cfg, cfg.d_model)
        self.lm_head = LMHead(cfg.d_model, cfg.lm_head_size)
        # Image tokens that are vocabulary ids (image_target: tokens) are predicted by the text
        # branch and LM head; there is no image head then, nor without an image loss ("none").
        self.image_norm, self.image_head, self.target_dim = None, None, 0
        if cfg.image_target not in ("tokens", "none"):
            self.image_norm = make_norm(cfg, cfg.d_model)
            self.target_dim = image_target_dim(cfg, vision_dim)
            self.image_head = nn.Linear(cfg.d_model, self.target_dim)
        self.diffusion = (
            DiffusionHead(self.target_dim, cfg.d_model, cfg.diffusion_hidden, cfg.diffusion_steps)
            if cfg.diffusion_head
            else None
        )
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if name.startswith("vision"):
                continue  # the encoder keeps its own (pretrained or transformers) init
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_embedding, std=self.cfg.init_std)
        if self.image_newline is not None:
            nn.init.normal_(self.image_newline, std=self.cfg.init_std)
        for block in self.transformer_blocks():
            if block.expert is not None:
                block.copy_text_weights_into_expert()

    # -- initialization unit by unit (the same values on one device and sharded) ----------------

    def init_units(self) -> list[str]:
        """The model's parameters as units that are initialized one at a time: every transformer
        block, the vision tower, each other top-level module, and "" for the root's own
        parameters (the mask embedding, LLaVA-NeXT's newline). Every parameter is in exactly one
        unit."""
        blocks = [
            f"{group}.{i}" for group in BLOCK_GROUPS for i in range(len(getattr(self, group)))
        ]
        others = [name for name, _ in self.named_children() if name not in BLOCK_GROUPS]
        return [*blocks, *others, ""]

    def unit_initial_values(self, unit: str, seed: int) -> dict[str, torch.Tensor]:
        """The initial values of one unit's parameters (fp32, on the CPU) by parameter name,
        drawn from a generator of the unit's own (`seed`, unit name): the same whatever device,
        dtype or sharding the model is on, and whichever order the units are filled in. Works on
        a model whose parameters are on the meta device (only this unit is materialized)."""
        unit_seed = (seed * 1_000_003 + zlib.crc32(unit.encode())) % 2**63
        generator = torch.Generator().manual_seed(unit_seed)
        std = self.cfg.init_std
        if unit == "":
            values = {"mask_embedding": torch.randn(self.cfg.d_model, generator=generator) * std}
            if self.image_newline is not None:
                values["image_newline"] = torch.randn(self.cfg.d_model, generator=generator) * std
            return values
        if unit == "vision" and self.cfg.vision.pretrained:
            return {
                f"vision.{k}": v
                for k, v in pretrained_vision_weights(self.cfg.vision, self.vision).items()
            }
        module = copy.deepcopy(self.get_submodule(unit)).to_empty(device="cpu")
        if unit == "vision":
            # transformers' own init of the tower, from the unit's seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(unit_seed)
                module.apply(module._init_weights)
        else:
            with torch.no_grad():
                initialized = set()
                for part in module.modules():
                    if isinstance(part, nn.Linear | nn.Embedding):
                        part.weight.normal_(0.0, std, generator=generator)
                        if getattr(part, "bias", None) is not None:
                            part.bias.zero_()
                    elif isinstance(part, RMSNorm | PerHeadLayerNorm):
                        part.reset_parameters()  # 1 (and bias 0), or 0 for (1 + w) norms
                    elif isinstance(part, nn.RMSNorm):  # an adaptor's (Mistral 3's)
                        part.weight.fill_(1.0)
                    elif isinstance(part, QueryResampler):  # its learned queries
                        part.query.normal_(0.0, std, generator=generator)
                    elif isinstance(part, CrossAttentionBlock):  # its gates, at 0
                        part.reset_gates()
                    elif isinstance(part, nn.LayerNorm):
                        part.weight.fill_(1.0)
                        if getattr(part, "bias", None) is not None:
                            part.bias.zero_()
                    else:
                        continue
                    initialized.update(id(p) for p in part.parameters(recurse=False))
                # to_empty left the rest as whatever memory held: refuse rather than train it.
                left = [n for n, p in module.named_parameters() if id(p) not in initialized]
                if left:
                    raise TypeError(
                        f"{unit}.{left[0]}: no initialization for this kind of module "
                        "(SplitVLM.unit_initial_values)"
                    )
                if getattr(module, "expert", None) is not None:
                    module.copy_text_weights_into_expert()
        return {f"{unit}.{name}": value.detach() for name, value in module.named_parameters()}

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Every parameter to its `unit_initial_values` (single device; sharded engines fill
        their shards from the same values)."""
        params = dict(self.named_parameters())  # a tied weight appears once, under its owner
        for unit in self.init_units():
            for name, value in self.unit_initial_values(unit, seed).items():
                if name in params:
                    params[name].copy_(value)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> SplitVLM:
        """A model written by `splitvlm export`: config.yaml, vision_config.json, safetensors."""
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise ValueError(f"{path}: no model.safetensors (write one with `splitvlm export`)")
        cfg = model_config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
        vision_file = path / "vision_config.json"
        vision_config = json.loads(vision_file.read_text()) if vision_file.is_file() else None
        cfg.vision.pretrained = ""  # the exported weights replace the original encoders'
        for extra in cfg.vision.extra_towers:
            extra.pretrained = ""
        cfg.pretrained_llm = ""
        model = cls(cfg, vision_config)
        state = load_file(str(path / "model.safetensors"), device=device)
        if cfg.tie_embeddings:  # written once (models/hf_designs.py `write_export`)
            state.setdefault("lm_head.weight", state["embed.weight"])
        model.load_state_dict(state)
        return model.to(device)

    @classmethod
    def parameter_component(cls, name: str) -> str:
        """ "vision", "adaptor" or "llm": the component the parameter `name` belongs to."""
        return cls.COMPONENTS.get(name.split(".", 1)[0], "llm")

    def transformer_blocks(self) -> list[nn.Module]:
        """Every block, in order: the unit engines shard and checkpoint."""
        return [block for group in BLOCK_GROUPS for block in getattr(self, group)]

    # -- image tokens ---------------------------------------------------------------------------

    @property
    def packs_images(self) -> bool:
        """Whether images go through the tower packed (`PackedImages`): always at native
        resolution and for SigLIP2; square SigLIP and CLIP keep transformers' batched forward, and
        so does every tower under a tiling (each tile is one square image)."""
        vision = self.cfg.vision
        return vision.tiling == "none" and (vision.native or self.vision.packs_square_images)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, rows · cols, vision_dim) encoder features."""
        return self.encode_batches([pixel_values])[0]

    def encode_batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder features (n, rows · cols, vision_dim) of each batch (n, 3, H, W) of equally
        sized images: one tower call for all of them, packed, or (square SigLIP, CLIP, tiles)
        batched, image_size tile by tile. Sharded engines need the same tower calls on every
        rank, which one call whatever the micro-batch holds gives. No graph when the tower is
        frozen (none of its parameters trains: model.vision.trainable, optim.stage, freeze)."""
        trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            if not self.packs_images:
                tiles = [self._tiles(batch) for batch in batches]
                features = self.vision.image_features(
                    torch.cat(tiles), self.cfg.vision.feature_layer
                ).split([len(batch_tiles) for batch_tiles in tiles])
                return [
                    self._stitched(batch_features, batch.shape)
                    for batch_features, batch in zip(features, batches, strict=True)
                ]
            images = [image for batch in batches for image in batch]
            packed = PackedImages.from_images(
                images, self.cfg.vision.patch_size, packing_backend(images[0].device)
            )
            features = self.vision(packed=packed, feature_layer=self.cfg.vision.feature_layer)
            per_image = iter(packed.split(features))
            return [torch.stack([next(per_image) for _ in batch]) for batch in batches]

    @property
    def tile_pixels(self) -> int:
        """The side of a batched tower's input: image_size (a hybrid tower's: its high res)."""
        return self.cfg.pixel_shape(self.cfg.square_grid)[0]

    def _tiles(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) images of whole image_size tiles (one for a square image; LLaVA-NeXT's
        padded pinpoints: several) → (n · tiles, 3, image_size, image_size), row-major."""
        size = self.tile_pixels
        n, channels, height, width = batch.shape
        if (height, width) == (size, size):
            return batch
        tiles = batch.view(n, channels, height // size, size, width // size, size)
        return tiles.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, size, size)

    def _stitched(self, features: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The tiles' features (n · tiles, patches a tile, C) of images of `shape` → (n, patches,
        C), row-major over each image's whole grid of patches."""
        size = self.tile_pixels
        n, _, height, width = shape
        rows, cols = height // size, width // size
        if (rows, cols) == (1, 1):
            return features
        side = size // self.cfg.vision.patch_size
        features = features.view(n, rows, cols, side, side, -1).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(n, rows * side * cols * side, -1)

    def canvas(self, grid: tuple[int, int], tiles: tuple[int, int]) -> tuple[int, int]:
        """The token grid an image's pixels cover: its own, or for a tiled LLaVA-NeXT image
        (`tiles` rows × cols of image_size, not (0, 0)) the whole padded pinpoint."""
        if tiles == (0, 0):
            return grid
        side = self.cfg.image_tokens_per_side
        return tiles[0] * side, tiles[1] * side

    def _tiled_tokens(self, features, canvas, grid) -> torch.Tensor:
        """LLaVA-NeXT's tokens of tiled images: the features of the whole padded `canvas`
        adapted, the padding's rows or columns dropped (the kept grid centred in it), the
        newline embedding after every row: `grid` is (kept rows, kept cols + 1)."""
        cfg = self.cfg
        tokens = self.adaptor(merge_patches(features, canvas, cfg.vision.spatial_merge))
        n, rows, cols = tokens.shape[0], grid[0], grid[1] - 1
        top, left = (canvas[0] - rows) // 2, (canvas[1] - cols) // 2
        kept = tokens.view(n, *canvas, -1)[:, top : top + rows, left : left + cols]
        newline = self.image_newline.to(kept.dtype).expand(n, rows, 1, kept.shape[-1])
        return torch.cat([kept, newline], dim=2).reshape(n, rows * (cols + 1), -1)

    def image_inputs_and_targets(self, pixel_values, image_mask, grids, tiles=None):
        """Adapted tokens (T_image, C) and targets (T_image, target_dim) of every span of every
        image, image after image, each in the order `cfg.image_spans(grid)` lays them out;
        `tiles` (default none) says which images are LLaVA-NeXT's tiled ones (`canvas`), whose
        targets are zeros (their tokens are never masked).

        No target leaks into the inputs: the encoder attends across the whole image, so the
        inputs of a span are encoded from the image with that span's masked regions blanked,
        while targets (and the unmasked dual copies) come from the clean image. Images of equal
        grids are processed together; every tower pass of the micro-batch is one call when the
        tower packs images.
        """
        cfg = self.cfg
        if self.generation is not None:
            return self.generation_inputs_and_targets(pixel_values, image_mask)
        if cfg.image_target == "tokens":
            return self.vocabulary_inputs_and_targets(pixel_values)
        tiles = tiles or [(0, 0)] * len(grids)
        canvases = [self.canvas(grid, tile) for grid, tile in zip(grids, tiles, strict=True)]
        images = [
            normalize_pixels(image, cfg.vision.normalization)
            for image in split_images(pixel_values, canvases, cfg.vision.token_size)
        ]
        starts = np.cumsum([0] + [cfg.num_image_tokens(grid) for grid in grids])
        by_grid: dict[tuple, list[int]] = {}
        for index, key in enumerate(zip(grids, tiles, strict=True)):
            by_grid.setdefault(key, []).append(index)
        # Every encoder pass first (one packed call), then pooling, adaptor and targets.
        passes: list[torch.Tensor] = []
        groups = []
        for (grid, tile), indices in by_grid.items():
            pixels = torch.stack([images[i] for i in indices])
            mask = torch.stack(
                [image_mask[starts[i] : starts[i] + cfg.num_image_tokens(grid)] for i in indices]
            )
            clean, span_passes, offset = len(passes), [], 0
            passes.append(pixels)
            for (rows, cols), is_copy in cfg.image_spans(grid):
                span_mask = mask[:, offset : offset + rows * cols]
                offset += rows * cols
                if is_copy or not bool(span_mask.any()):
                    span_passes.append(clean)
                else:
                    span_passes.append(len(passes))
                    passes.append(blank_regions(pixels, span_mask, (rows, cols)))
            groups.append((grid, tile, indices, pixels, clean, span_passes))
        features = self.encode_batches(passes)
        merge = cfg.vision.spatial_merge
        inputs, targets = [None] * len(grids), [None] * len(grids)
        for grid, tile, indices, pixels, clean, span_passes in groups:
            if tile != (0, 0):
                tokens = self._tiled_tokens(features[clean], self.canvas(grid, tile), grid)
                for row, index in enumerate(indices):
                    inputs[index] = tokens[row]
                    targets[index] = tokens.new_zeros(tokens.shape[1], self.target_dim)
                continue
            group_inputs, group_targets = [], []
            for ((rows, cols), _), encoded in zip(cfg.image_spans(grid), span_passes, strict=True):
                span_grid = (rows, cols)
                # A token's merge × merge patches side by side, then pooled to the span's grid.
                tokens = merge_patches(features[encoded], grid, merge)
                group_inputs.append(self.adaptor(pool_grid(tokens, grid, span_grid)))
                if cfg.vision.num_queries:  # queries stand for no region: nothing to predict
                    group_targets.append(
                        tokens.new_zeros(len(indices), rows * cols, self.target_dim)
                    )
                elif cfg.image_target == "encoder":
                    clean_features = features[clean].detach()
                    patch_grid = (grid[0] * merge, grid[1] * merge)
                    group_targets.append(
                        normalize_targets(pool_grid(clean_features, patch_grid, span_grid))
                    )
                else:
                    group_targets.append(pixel_targets(pixels, span_grid, cfg.vision.token_size))
            group_inputs, group_targets = torch.cat(group_inputs, 1), torch.cat(group_targets, 1)
            for row, index in enumerate(indices):
                inputs[index], targets[index] = group_inputs[row], group_targets[row]
        return torch.cat(inputs), torch.cat(targets)

    def vocabulary_inputs_and_targets(self, pixel_values: torch.Tensor):
        """A VQ tokenizer's image tokens (image_target: tokens, Chameleon's): each square image's
        codes as vocabulary ids, row-major, embedded by the token embedding (T_image, C), and
        the ids themselves (T_image,) as the targets. The codes come from the clean image: a
        masked token's region still shapes its neighbours' codes (the VQ encoder's middle block
        attends across the image), as in MaskGIT."""
        pixels = normalize_pixels(pixel_values, self.cfg.vision.normalization)
        ids = self.adaptor(self.vision.codes(pixels.to(self.embed.weight.dtype))).flatten()
        return self.embed(ids), ids

    def generation_inputs_and_targets(self, pixel_values: torch.Tensor, image_mask: torch.Tensor):
        """Janus's two kinds of images, square, in one tower call: an image whose tokens are
        masked is generated, its inputs (T, C) its codes' embeddings through the generation
        aligner (teacher forcing) and its targets the codes; every other image is read, its
        inputs the ViT's tokens through the adaptor (its aligner), its targets IGNORE_INDEX."""
        pixels = normalize_pixels(pixel_values, self.cfg.vision.normalization)
        per_image = self.cfg.num_image_tokens()
        generated = image_mask.view(-1, per_image)[:, 0]
        features, codes = self.vision(pixels.to(self.embed.weight.dtype), generated)
        read = self.adaptor(features)
        made = self.generation.embed(codes).to(read.dtype)
        inputs = read.new_empty(len(generated), per_image, read.shape[-1])
        inputs[~generated], inputs[generated] = read, made
        targets = torch.full_like(generated, IGNORE_INDEX, dtype=torch.long)[:, None]
        targets = targets.expand(-1, per_image).clone()
        targets[generated] = codes
        return inputs.flatten(0, 1), targets.flatten()

    @property
    def image_vocabulary(self) -> range | None:
        """The vocabulary ids of image tokens (image_target: tokens with the vocabulary adaptor),
        which text never predicts."""
        return self.adaptor.ids if isinstance(self.adaptor, VocabularyAdaptor) else None

    # -- forward ----------------------------------------------------------------------------------

    def trunk(self, batch, image_tokens: torch.Tensor | None = None) -> Trunk:
        """Embed, run the modality input blocks, merge, run the core.

        `image_tokens` (T_image, C) replaces the adapted image tokens (generation feeds its own;
        there are no targets then); masked positions still get the mask embedding (not Janus's:
        a generated image's inputs are its codes').
        """
        cfg = self.cfg
        rope = rope_tables(batch.rope_positions, cfg)
        x_TC = self.embed(batch.input_ids)
        positions_TC = None
        if self.positions is not None:  # each token's, added where it enters the model
            positions_TC = self.positions(batch.layout.position_ids.long() + cfg.position_offset)
            x_TC = x_TC + positions_TC.to(x_TC.dtype)
        if batch.text_layout is not None:
            text_TC = run_blocks(
                self.text_in,
                x_TC[batch.text_index],
                batch.text_layout,
                rope.select(batch.text_index),
            )
            x_TC = x_TC.index_copy(0, batch.text_index, text_TC)

        targets = None
        if batch.image_layout is not None:
            adapted = image_tokens
            if image_tokens is None:
                adapted, targets = self.image_inputs_and_targets(
                    batch.pixel_values, batch.image_mask, batch.image_grids, batch.image_tiles
                )
            # A Janus image the model generates takes its codes' embeddings, not mask tokens.
            input_mask = batch.image_mask if self.generation is None else None
            image_TC = self.image_in_blocks(
                adapted,
                input_mask,
                batch.image_layout,
                rope.select(batch.image_index),
                None if positions_TC is None else positions_TC[batch.image_index],
            )
            x_TC = x_TC.index_copy(0, batch.image_index, image_TC)
        elif self.run_every_branch and not cfg.cross_attention_layers:
            # A blank image through the same modules, joining the sequence where images do but
            # with none of its tokens: the autograd graph has the shape it has with images (so
            # ranks reach their backward collectives in the same order) and every parameter on
            # the path gets an exact zero gradient.
            x_TC = x_TC.index_copy(0, batch.image_index, self._blank_image_tokens(x_TC)[:0])
        route, cross = self.expert_route(batch), self.cross_context(batch)
        hidden = run_blocks(self.core, x_TC, batch.layout, rope, route, cross)
        return Trunk(hidden, rope, targets)

    def cross_context(self, batch) -> CrossContext | None:
        """The images' key stream of a cross-attention design (model.cross_attention_layers):
        each image's tiles through the tower and the adaptor, in the order of the batch's
        `cross_layout`. None for every other design, and without images (the blocks are then
        skipped), but under a sharded engine: a blank image then runs that no query sees."""
        if not self.cfg.cross_attention_layers:
            return None
        pixels, layout, order = batch.pixel_values, batch.cross_layout, batch.cross_key_index
        if layout is None:
            if not self.run_every_branch:
                return None
            size = self.cfg.vision.image_size
            pixels = batch.input_ids.new_zeros(1, 3, size, size, dtype=torch.float32)
            keys = self.vision.tile_slots * self.vision.tokens_per_tile
            layout = CrossLayout.from_ranges(batch.num_tokens, keys, []).to(pixels.device)
            order = torch.arange(keys, device=pixels.device)
        pixels = normalize_pixels(pixels, self.cfg.vision.normalization)
        trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            tiles = batch.image_tiles if batch.cross_layout is not None else None
            features = self.vision(pixels.to(self.embed.weight.dtype), tiles)
        return CrossContext(self.adaptor(features).flatten(0, 1)[order], layout)

    def expert_route(self, batch) -> ExpertRoute | None:
        """Which tokens of the merged sequence take the visual expert (its image tokens)."""
        if not self.cfg.visual_expert:
            return None
        return ExpertRoute(batch.text_index, batch.image_index)

    def _blank_image_tokens(self, x_TC: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        kind = "image" if cfg.image_attention == "bidirectional" else "text"
        size = cfg.vision.image_size
        grid, tiles = cfg.image_grid(size, size), (0, 0)
        if self.image_newline is not None:  # a tiled image of one tile: the newline runs too
            grid, tiles = (grid[0], grid[1] + 1), (1, 1)
        spans = [[(kind, rows * cols)] for (rows, cols), _ in cfg.image_spans(grid)]
        layout = PackedLayout.from_docs(spans, cfg.attention_backend).to(x_TC.device)
        positions = layout.position_ids[:, None].repeat(1, 2)
        rope = rope_tables(positions, cfg)
        no_mask = torch.zeros(layout.num_tokens, dtype=torch.bool, device=x_TC.device)
        pixels = x_TC.new_zeros(1, 3, *cfg.pixel_shape(self.canvas(grid, tiles)))
        if cfg.vision.flat_pixels:
            pixels = pixels.flatten()
        adapted, _ = self.image_inputs_and_targets(pixels, no_mask, [grid], [tiles])
        return self.image_in_blocks(adapted, no_mask, layout, rope)

    def image_in_blocks(self, adapted_TC, image_mask, layout, rope, positions_TC=None):
        """Masked tokens become the mask embedding, the tokens' learned positions are added
        (`positions_TC`, OPT's); then the image-in blocks, one span each."""
        image_TC = adapted_TC
        if image_mask is not None:
            mask_embedding = self.mask_embedding.to(adapted_TC.dtype)
            image_TC = torch.where(image_mask[:, None], mask_embedding, adapted_TC)
        if positions_TC is not None:
            image_TC = image_TC + positions_TC.to(image_TC.dtype)
        return run_blocks(self.image_in, image_TC, layout, rope)

    def text_hidden(self, batch, trunk: Trunk) -> torch.Tensor:
        """The text branch's hidden states of the whole sequence (after the text-head blocks)."""
        route = self.expert_route(batch)
        return run_blocks(self.text_head_blocks, trunk.hidden_TC, batch.layout, trunk.rope, route)

    def text_logits(self, batch, trunk: Trunk, positions: torch.Tensor, labels=None, hidden=None):
        """Logits at `positions`; with `labels` (one per position), their summed cross-entropy
        instead, without materializing all the logits at once (models/lm_head.py). Image
        tokens' ids (`image_vocabulary`) get the lowest logit, as Chameleon's do. `hidden`: the
        `text_hidden` of this trunk, when the caller has it."""
        hidden = self.text_hidden(batch, trunk) if hidden is None else hidden
        return self.lm_head(self.text_norm(hidden[positions]), labels, self.image_vocabulary)

    def image_condition(self, batch, trunk: Trunk, image_tokens: torch.Tensor) -> torch.Tensor:
        """Normalized image-head hidden states that predict the given image tokens (indices into
        the image stream). Shift by one: token j is predicted at position j - 1 — the previous
        image token, or the token before the first span (<image_start>, or without image markers
        the text token before the image; the decoder never masks an image's first token when it
        opens its document, so nothing is read from outside the document)."""
        read_at = batch.image_index[image_tokens] - 1
        route = self.expert_route(batch)
        hidden = run_blocks(
            self.image_head_blocks, trunk.hidden_TC, batch.layout, trunk.rope, route
        )
        return self.image_norm(hidden[read_at])

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """Summed losses of one `PackedBatch`: text over text targets, image (and diffusion)
        over masked image tokens (of fully masked spans, for diffusion)."""
        trunk = self.trunk(batch)
        text_positions = (batch.labels != IGNORE_INDEX).nonzero().squeeze(1)
        labels = batch.labels[text_positions]
        hidden = self.text_hidden(batch, trunk)
        text_loss = self.text_logits(batch, trunk, text_positions, labels, hidden)
        losses = {"text_loss_sum": text_loss}
        zero = trunk.hidden_TC.new_zeros(())
        losses["image_loss_sum"] = zero
        if self.cfg.image_target == "none":
            return losses
        if self.cfg.image_target == "tokens":
            losses["image_loss_sum"] = self.image_token_loss(batch, trunk, hidden)
            return losses
        if self.diffusion is not None:
            losses["diffusion_loss_sum"] = zero
        has_masked = trunk.image_targets is not None and bool(batch.image_mask.any())
        if not (has_masked or self.run_every_branch):
            return losses
        # With run_every_branch the image heads also run with nothing masked: their losses are
        # then sums over no positions, zero, with zero gradients.
        masked, condition, prediction, targets = self.masked_image_predictions(batch, trunk)
        losses["image_loss_sum"] = image_loss(prediction, targets, self.cfg.image_loss)
        if self.diffusion is not None:
            full = batch.image_span_full[masked]
            losses["diffusion_loss_sum"] = self.diffusion.loss(condition[full], targets[full])
        return losses

    def image_token_loss(self, batch, trunk: Trunk, hidden: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of the image tokens with a loss (`batch.image_targets`),
        each predicted at the position before it from the text branch after the final norm: as
        vocabulary ids by the LM head over the whole vocabulary, as a text token is
        (Chameleon), or as codes by the generation head (Janus)."""
        if trunk.image_targets is None:  # no image in the micro-batch
            if self.generation is None or not self.run_every_branch:
                return hidden.new_zeros(())
            # The generation head on no position: zero, with zero gradients on every rank.
            empty = torch.zeros(0, dtype=torch.long, device=hidden.device)
            return self.generation(self.text_norm(hidden[:0]), empty)
        chosen = batch.image_targets(self.cfg.image_loss_tokens)
        read_at = batch.image_index[chosen] - 1
        if self.generation is not None:
            return self.generation(self.text_norm(hidden[read_at]), trunk.image_targets[chosen])
        return self.lm_head(self.text_norm(hidden[read_at]), trunk.image_targets[chosen])

    def masked_image_predictions(self, batch, trunk: Trunk):
        """For every masked image token: its index in the image stream, the image-head condition,
        the regression prediction and the target (both fp32)."""
        masked = batch.image_mask.nonzero().squeeze(1)
        condition = self.image_condition(batch, trunk, masked)
        prediction = self.image_head(condition).float()
        if trunk.image_targets is None:  # run_every_branch on a micro-batch without images
            return masked, condition, prediction, prediction.new_zeros(0, self.target_dim)
        return masked, condition, prediction, trunk.image_targets[masked].float()


def split_images(pixel_values: torch.Tensor, grids, patch_size: int) -> list[torch.Tensor]:
    """The micro-batch's images as (3, rows · p, cols · p) views: `pixel_values` is one
    (N, 3, H, W) tensor in "square" mode, and in "native" mode every image's (3, H, W) pixels
    flattened and concatenated."""
    if pixel_values.dim() == 4:
        return list(pixel_values)
    shapes = [(3, rows * patch_size, cols * patch_size) for rows, cols in grids]
    parts = pixel_values.split([math.prod(shape) for shape in shapes])
    return [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]


def blank_regions(pixel_values: torch.Tensor, mask: torch.Tensor, grid) -> torch.Tensor:
    """Set the image regions of masked tokens of a `grid` (rows, cols) to 0 (mid-grey after
    normalization). `pixel_values` is (N, 3, H, W), `mask` (N, rows · cols)."""
    keep = (~mask).to(pixel_values.dtype).view(-1, 1, *grid)
    return pixel_values * F.interpolate(keep, size=pixel_values.shape[-2:], mode="nearest")


def pool_grid(features: torch.Tensor, grid, new_grid) -> torch.Tensor:
    """(N, rows · cols, C) on a row-major `grid` → (N, new_rows · new_cols, C), area averaging."""
    if tuple(new_grid) == tuple(grid):
        return features
    n, _, c = features.shape
    pooled = F.adaptive_avg_pool2d(features.transpose(1, 2).reshape(n, c, *grid), new_grid)
    return pooled.reshape(n, c, -1).transpose(1, 2)


def pixel_targets(pixel_values: torch.Tensor, grid, patch_size: int) -> torch.Tensor:
    """Patches of the images shown at `grid` (rows, cols) patches: (N, rows · cols, 3·p²), raw
    pixels in [-1, 1], so a prediction can be turned back into an image."""
    size = (grid[0] * patch_size, grid[1] * patch_size)
    if tuple(pixel_values.shape[-2:]) != size:
        pixel_values = F.interpolate(pixel_values, size=size, mode="area")
    return patchify(pixel_values, patch_size)


def image_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over positions; MSE is averaged over the feature dimension."""
    if kind == "mse":
        return (prediction - target).pow(2).mean(dim=-1).sum()
    return (1.0 - F.cosine_similarity(prediction, target, dim=-1)).sum()
