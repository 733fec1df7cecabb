"""Model configuration: every depth, the encoder, adaptor and image attention mode are config.

The classic designs are presets of these fields (see yaml/): LLaVA is
`num_text_in_blocks=0, num_image_in_blocks=0, num_text_head_blocks=0, num_image_head_blocks=0,
image_attention="causal"`; the split VLM uses non-zero depths on both sides.
"""

from __future__ import annotations

import dataclasses
import math
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
ADAPTOR_NAMES = (
    "linear",
    "mlp",
    "patch_merger",
    "qwen2_merger",
    "pixel_shuffle",
    "resampler",
    "hybrid_aligner",
    "vocabulary",
    "identity",
)
NORM_STYLES = ("default", "gemma", "layernorm")
MLP_ACTIVATIONS = ("silu", "gelu_tanh", "relu2", "relu")
LAYER_TYPES = ("full", "sliding")
RESIZE_MODES = ("square", "native", "longest_side", "smart")
TILINGS = ("none", "idefics3", "llava_next", "mllama")
IMAGE_ATTENTIONS = ("bidirectional", "causal", "prefix")
IMAGE_POSITIONS = ("sequential", "shared", "collapsed", "2d", "mrope")
IMAGE_TARGETS = ("encoder", "pixels", "tokens", "none")
# `model.image_loss_tokens`: the image tokens with a loss, the masked ones or every one (an
# autoregressive image loss: Chameleon's).
IMAGE_LOSS_TOKENS = ("masked", "all")
# `model.qk_norm`: none, one norm of a head's width shared by every head (Qwen3, Gemma 3), or
# a LayerNorm over each head's width with weights and biases of each head's own (Chameleon's).
QK_NORMS = (False, True, "per_head_layernorm")
# The block stacks over the merged sequence: the ones a visual expert (`model.visual_expert`) is in.
MERGED_BLOCK_GROUPS = ("core", "text_head_blocks", "image_head_blocks")
# Random towers by `model.vision.tower` and pixel normalizations by `model.vision.normalization`
# (models.vision.RANDOM_TOWERS and PIXEL_NORMALIZATIONS, which assert they match).
# The towers whose images are codes of a VQ tokenizer (image_target: tokens).
VQ_TOWERS = ("chameleon_vq", "janus")
VISION_TOWER_NAMES = (
    "siglip",
    "clip",
    "pixtral",
    "qwen2_vl",
    "idefics3",
    "none",
    "blip2",
    "deepseek_hybrid",
    "chameleon_vq",
    "janus",
    "mllama",
    "idefics",
)
# The towers whose images are a stream of keys that cross-attention blocks read
# (model.cross_attention_layers), not tokens of the sequence.
CROSS_ATTENTION_TOWERS = ("mllama", "idefics")
# `model.cross_attention_style`: which images a text token cross-attends to, and what a token
# that sees none gets (models/cross_attention.py `mllama_layout`, `flamingo_layout`).
CROSS_ATTENTION_STYLES = ("mllama", "flamingo")
# `model.cross_attention_gate`: one tanh gate a sublayer, or one per channel (Flamingo's
# alpha_type: vector).
CROSS_ATTENTION_GATES = ("scalar", "vector")
# `model.image_markers`: <image_start> and <image_end> around each image, none, the end only,
# or the start only (LLaMA-3.2-Vision's <|image|>, the one token that stands for its image).
IMAGE_MARKERS = (True, False, "end", "start")
# `model.image_row_break`: none, after every row but the last (Pixtral), after every row (Fuyu).
IMAGE_ROW_BREAKS = (False, True, "all")
PIXEL_NORMALIZATION_NAMES = ("siglip", "clip", "chameleon")
_MAX_TILED_SIDE = 4096  # Idefics3's MAX_IMAGE_SIZE: no side of a tiled image beyond it


@dataclass
class ExtraTowerConfig:
    """One more encoder over the same images (`model.vision.extra_towers`), whose features are
    concatenated after the tower's, token by token."""

    # A local transformers SigLIP, SigLIP2 or CLIP checkpoint, as model.vision.pretrained (one
    # is set exactly when that is); empty builds a random `tower` of model.vision's size fields.
    pretrained: str = ""
    tower: str = "clip"  # of a random build: EXTRA_TOWERS
    feature_layer: int = 0  # as model.vision.feature_layer (CLIP's, in LLaVA: -2)
    normalization: str = "clip"  # how this tower reads the image (siglip or clip)


# The towers an extra tower can be (square images through transformers' batched forward).
EXTRA_TOWERS = ("siglip", "clip")


@dataclass
class VisionConfig:
    # A local directory holding a transformers SigLIP, SigLIP2 or CLIP checkpoint (its
    # config.json names the tower); empty builds a random `tower` from the size fields below (the
    # tiny preset, so nothing is downloaded).
    pretrained: str = ""
    # Of a random build: "siglip", "clip" (its CLS token is dropped), "pixtral" (Pixtral's ViT:
    # 2-D RoPE, one bidirectional block per image, any grid up to image_size / patch_size a side),
    # "qwen2_vl" (Qwen2-VL's ViT, with adaptor: qwen2_merger and spatial_merge: 2), "idefics3"
    # (Idefics3's SigLIP: its own position ids; square tiles) or "none" (Fuyu's: no encoder, the
    # features are each patch's normalized pixels, 3 · patch_size² values, for the adaptor to
    # embed) or "blip2" (BLIP-2's ViT and Q-Former: `num_queries` learned queries read the image,
    # its Q-Former as wide and deep as the ViT) or "deepseek_hybrid" (DeepSeek-VL 7B's: SAM-B on
    # the image at `high_res_size`, SigLIP on it resized to `image_size`, with adaptor:
    # hybrid_aligner) or "chameleon_vq" (Chameleon's VQ-VAE image tokenizer: each patch_size ×
    # patch_size region becomes one of `codebook_size` codes, a vocabulary id of the LLM, with
    # image_target: tokens; `hidden_size` its base channels, `num_layers` resnet blocks a level)
    # or "janus" (Janus's two image paths: its SigLIP-like ViT of the size fields for the images
    # the model reads, with the `mlp` adaptor as its aligner, and a VQ-VAE that turns the images
    # it generates into codes of its own codebook, `codebook_size` codes of patch_size pixels a
    # side; a random one's VQ-VAE is 32 channels wide, one resnet block a level) or "mllama"
    # (LLaMA-3.2-Vision's tiled ViT, for model.cross_attention_layers: gated tile position
    # embeddings, its local layers then gated global layers, the features of its last layer
    # and of intermediate ones side by side; a random one has one global layer and reads the
    # middle layer) or "idefics" (Flamingo's as transformers' Idefics has it, for
    # model.cross_attention_layers: a CLIP-like ViT and, with num_queries > 0, a perceiver
    # resampler of that many learned latents, two layers deep, whose output is each image's keys;
    # with num_queries 0 the ViT's patches and class token are).
    tower: str = "siglip"
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 48
    num_layers: int = 2
    num_heads: int = 2
    trainable: bool = False
    # "square": every image resized to image_size × image_size. "native": each image keeps its
    # aspect ratio on a grid of whole patches whose area lies in [min_pixels, max_pixels]
    # (`native_grid`); 0 for max_pixels means image_size², the square mode's area.
    # "longest_side": Pixtral's rule, the aspect ratio kept, scaled down (never up) until the
    # longer side is at most image_size, each side then rounded up to whole patches.
    # "smart": Qwen2-VL's `smart_resize`, each side rounded to whole image tokens, then scaled
    # into [min_pixels, max_pixels] if the rounding left that budget.
    resize: str = "square"
    min_pixels: int = 0
    max_pixels: int = 0
    # The features the adaptor reads: 0 the tower's last_hidden_state (SigLIP's after its final
    # norm, CLIP's before); otherwise the hidden state of that index as transformers'
    # `vision_feature_layer` counts it (k > 0 layer k's output, -1 the last layer's; LLaVA: -2).
    feature_layer: int = 0
    # uint8 pixels → the tower's input: "siglip" (mean and std 0.5) or "clip" (OpenAI CLIP's
    # per-channel mean and std).
    normalization: str = "siglip"
    # Each image token stands for spatial_merge × spatial_merge patches (Mistral 3 and Qwen2-VL:
    # 2): the adaptor reads their features side by side. Grids are counted in tokens of
    # `token_size` = patch_size × spatial_merge pixels.
    spatial_merge: int = 1
    # "idefics3": Idefics3's (and SmolVLM's) image splitting, with square images. The image is
    # scaled, up or down, until its longer side is tile_longest_edge pixels (0: 4 × image_size),
    # then each side rounded up to whole image_size tiles (`tile_grid`). An image of several
    # tiles becomes each tile (row-major), every one its own image of the sequence, then the
    # whole image at image_size (the global view); an image of one tile is the global view
    # alone. The text between them is the design's (trainer/data/decode.py `TILE_TEXTS`).
    # "llava_next": LLaVA-NeXT's any-res. The image is resized into the `grid_pinpoints`
    # resolution that keeps most of it (aspect ratio kept, padded around the centre), encoded
    # tile by tile, and shown after the whole image at image_size (the base): the tiles'
    # features on one grid, the padding's rows or columns dropped, a learned newline embedding
    # after every row (`llava_next_layout`).
    # "mllama": LLaMA-3.2-Vision's, with tower: mllama. The image is resized, aspect ratio kept,
    # to fit the canvas of at most max_num_tiles image_size tiles that scales it least
    # (`mllama_canvas`), padded with black at the bottom and right, and split into its tiles
    # (row-major), all of them one image of the sequence (its one <|image|>), cross-attended.
    tiling: str = "none"
    tile_longest_edge: int = 0
    # (height, width) pixel resolutions, multiples of image_size, for "llava_next"
    # (LLaVA-NeXT's image_grid_pinpoints).
    grid_pinpoints: list[list[int]] = field(default_factory=list)
    # Image tokens per image made by learned queries, whatever the image: a (1, num_queries)
    # grid; with tower: blip2 (its Q-Former's: 32) or adaptor: resampler (Qwen-VL's: 256, a
    # square), or the keys of an image with tower: idefics (its perceiver's latents: 64); 0
    # otherwise (the patch grid).
    num_queries: int = 0
    # Pixels a side of a two-resolution tower's high-resolution path (deepseek_hybrid's SAM:
    # 1024): images are loaded at this size, and its low-resolution path sees them resized to
    # `image_size`; 0 for every other tower.
    high_res_size: int = 0
    # Codes of a VQ tokenizer's codebook (tower: chameleon_vq, Chameleon's: 8192; tower: janus,
    # Janus's: 16384), 0 otherwise.
    codebook_size: int = 0
    # More encoders over the same square images, each on the tower's grid of tokens: a token's
    # features are the tower's, then each extra tower's, side by side (SigLIP and CLIP together,
    # as Cambrian-1 and Eagle concatenate them), for the adaptor to read.
    extra_towers: list[ExtraTowerConfig] = field(default_factory=list)
    # The tile slots of a tiled tower (tower: mllama; LLaMA-3.2-Vision's: 4): every image is one
    # image_size tile, followed by zero tiles up to this many, as transformers' processor pads
    # them; 0 for every other tower.
    max_num_tiles: int = 0

    @property
    def token_size(self) -> int:
        """The side, in pixels, of the image region one image token stands for."""
        return self.patch_size * self.spatial_merge

    @property
    def native(self) -> bool:
        """Whether images keep their aspect ratio (each its own grid), not resized square."""
        return self.resize != "square"

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of image tokens of a `width` × `height` image in a native mode."""
        if self.resize == "longest_side":
            return self.longest_side_grid(width, height)
        if self.resize == "smart":
            return self.smart_grid(width, height)
        return self.native_grid(width, height)

    def smart_grid(self, width: int, height: int) -> tuple[int, int]:
        """Qwen2-VL's grid (its image processor's `smart_resize`, in image tokens): each side
        rounded to whole tokens; over the budget, the sides scaled down into it and floored;
        under it, scaled up and ceiled. An aspect ratio over 200 is refused, as there."""
        if max(width, height) > 200 * min(width, height):
            raise ValueError(f"a {width}x{height} image: aspect ratio over 200")
        unit = self.token_size
        min_pixels, max_pixels = self.pixel_budget
        rows, cols = max(1, round(height / unit)), max(1, round(width / unit))
        if rows * cols * unit**2 > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            rows = max(1, math.floor(height / beta / unit))
            cols = max(1, math.floor(width / beta / unit))
        elif rows * cols * unit**2 < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            rows, cols = math.ceil(height * beta / unit), math.ceil(width * beta / unit)
        return rows, cols

    def longest_side_grid(self, width: int, height: int) -> tuple[int, int]:
        """Pixtral's grid: scaled down by the ratio of the longer side to image_size when that
        is above 1 (sides floored to whole pixels), then each side rounded up to patches."""
        ratio = max(width, height) / self.image_size
        if ratio > 1:
            width, height = max(1, int(width / ratio)), max(1, int(height / ratio))
        unit = self.token_size
        return -(-height // unit), -(-width // unit)

    def mllama_canvas(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """LLaMA-3.2-Vision's tiling of a `width` × `height` image: ((tile rows, tile columns),
        (width, height) it is resized to) — of the arrangements of at most max_num_tiles tiles,
        the one whose canvas scales the image up least, else down least (the smallest canvas
        of those), the image fit into it aspect ratio kept, no side below a tile (its image
        processor's get_optimal_tiled_canvas and get_image_size_fit_to_canvas)."""
        tile, slots = self.image_size, self.max_num_tiles
        arrangements = [(r, c) for r in range(1, slots + 1) for c in range(1, slots + 1)]
        arrangements = [(r, c) for r, c in arrangements if r * c <= slots]
        scales = [min(r * tile / height, c * tile / width) for r, c in arrangements]
        up = [scale for scale in scales if scale >= 1]
        chosen = min(up) if up else max(scales)
        rows, cols = min(
            (a for a, scale in zip(arrangements, scales, strict=True) if scale == chosen),
            key=lambda a: a[0] * a[1],
        )
        target_w = min(max(width, tile), cols * tile)
        target_h = min(max(height, tile), rows * tile)
        scale_h, scale_w = target_h / height, target_w / width
        if scale_w < scale_h:
            new_w, new_h = target_w, min(math.floor(height * scale_w) or 1, target_h)
        else:
            new_w, new_h = min(math.floor(width * scale_h) or 1, target_w), target_h
        return (rows, cols), (new_w, new_h)

    def tile_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of image_size tiles of a `width` × `height` image, (0, 0) for a single
        tile: Idefics3's image processor's sizes (its `resize` to the longest edge, even sides,
        at most 4096 pixels, then `resize_for_vision_encoder`)."""
        tile, longest = self.image_size, self.tile_longest_edge or 4 * self.image_size
        aspect = width / height
        if width >= height:
            width, height = longest, int(longest / aspect)
            height += height % 2
        else:
            width, height = int(longest * aspect), longest
            width += width % 2
        width, height = max(width, 1), max(height, 1)
        aspect = width / height
        if width >= height and width > _MAX_TILED_SIDE:
            width, height = _MAX_TILED_SIDE, max(int(_MAX_TILED_SIDE / aspect), 1)
        elif height > width and height > _MAX_TILED_SIDE:
            width, height = max(int(_MAX_TILED_SIDE * aspect), 1), _MAX_TILED_SIDE
        aspect = width / height
        if width >= height:
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect) / tile) * tile
        if height > tile or width > tile:
            return height // tile, width // tile
        return 0, 0

    def llava_next_layout(self, width: int, height: int) -> tuple:
        """LLaVA-NeXT's any-res layout of a `width` × `height` image: ((tile rows, tile cols) of
        its best pinpoint, (width, height) it is resized to inside it, (left, top) of that in the
        padded pinpoint, (rows, cols) of tokens its unpadding keeps). transformers'
        `select_best_resolution`, its processor's resize and centred padding, and its model's
        `unpad_image` on the feature grid, which works from the original size."""
        best = None
        for pin_height, pin_width in self.grid_pinpoints:
            scale = min(pin_width / width, pin_height / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            wasted = pin_width * pin_height - effective
            if best is None or (effective, -wasted) > best[0]:
                best = ((effective, -wasted), pin_height, pin_width)
        _, pin_height, pin_width = best
        scale_w, scale_h = pin_width / width, pin_height / height
        if scale_w < scale_h:
            new_width, new_height = pin_width, min(math.ceil(height * scale_w), pin_height)
        else:
            new_width, new_height = min(math.ceil(width * scale_h), pin_width), pin_height
        offset = ((pin_width - new_width) // 2, (pin_height - new_height) // 2)
        rows, cols = pin_height // self.token_size, pin_width // self.token_size
        if width / height > cols / rows:
            kept = int(round(height * (cols / width), 7))
            kept_rows, kept_cols = rows - 2 * ((rows - kept) // 2), cols
        else:
            kept = int(round(width * (rows / height), 7))
            kept_rows, kept_cols = rows, cols - 2 * ((cols - kept) // 2)
        tiles = (pin_height // self.image_size, pin_width // self.image_size)
        return tiles, (new_width, new_height), offset, (kept_rows, kept_cols)

    @property
    def flat_pixels(self) -> bool:
        """Whether a batch's images differ in size, so that each one's pixels travel flattened
        (native resolution, and LLaVA-NeXT's padded tiles beside its base images)."""
        return self.native or self.tiling == "llava_next"

    @property
    def max_tiles_per_side(self) -> int:
        longest = min(self.tile_longest_edge or 4 * self.image_size, _MAX_TILED_SIDE)
        return math.ceil(longest / self.image_size)

    @property
    def pixel_budget(self) -> tuple[int, int]:
        return self.min_pixels, self.max_pixels or self.image_size**2

    def native_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of patches for a `width` × `height` image in "native" mode.

        The image is scaled by s (1 if its area is within the budget, else the s that puts the
        area on the nearer bound), and each side rounded to whole patches; if rounding left the
        budget, both sides are floored (over the maximum) or ceiled (under the minimum) instead.
        Each side is at least one patch, and the maximum always wins. The decoder resizes the
        image to exactly rows × cols patches; token counts come from the same rule."""
        unit = self.token_size
        min_pixels, max_pixels = self.pixel_budget
        max_patches = max_pixels // unit**2
        area = width * height
        scale = 1.0
        if area > max_pixels:
            scale = math.sqrt(max_pixels / area)
        elif area < min_pixels:
            scale = math.sqrt(min_pixels / area)
        exact_rows, exact_cols = height * scale / unit, width * scale / unit
        rows, cols = max(1, round(exact_rows)), max(1, round(exact_cols))
        if rows * cols > max_patches:
            rows, cols = max(1, math.floor(exact_rows)), max(1, math.floor(exact_cols))
        elif rows * cols * unit**2 < min_pixels:
            rows, cols = math.ceil(exact_rows), math.ceil(exact_cols)
            if rows * cols > max_patches:
                rows, cols = max(1, math.floor(exact_rows)), max(1, math.floor(exact_cols))
        # A side clamped up to one patch (an extreme aspect ratio) can leave the area over the
        # budget: shorten the long side.
        if rows * cols > max_patches:
            if rows < cols:
                cols = max_patches // rows
            else:
                rows = max_patches // cols
        return rows, cols

    def validate(self) -> None:
        if self.spatial_merge < 1:
            raise ValueError("model.vision.spatial_merge must be >= 1")
        if self.image_size % self.token_size:
            raise ValueError(
                "model.vision.image_size must be a multiple of model.vision.patch_size × "
                "spatial_merge"
            )
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"model.vision.resize={self.resize!r}; valid: {', '.join(RESIZE_MODES)}"
            )
        if self.tower not in VISION_TOWER_NAMES:
            raise ValueError(
                f"model.vision.tower={self.tower!r}; valid: {', '.join(VISION_TOWER_NAMES)}"
            )
        if self.normalization not in PIXEL_NORMALIZATION_NAMES:
            raise ValueError(
                f"model.vision.normalization={self.normalization!r}; "
                f"valid: {', '.join(PIXEL_NORMALIZATION_NAMES)}"
            )
        if self.tiling not in TILINGS:
            raise ValueError(f"model.vision.tiling={self.tiling!r}; valid: {', '.join(TILINGS)}")
        if self.tiling != "none" and self.native:
            raise ValueError("model.vision.tiling splits images into square tiles (resize: square)")
        if (self.tiling == "llava_next") != bool(self.grid_pinpoints) or any(
            len(pin) != 2 or min(pin) <= 0 or pin[0] % self.image_size or pin[1] % self.image_size
            for pin in self.grid_pinpoints
        ):
            raise ValueError(
                "model.vision.grid_pinpoints: (height, width) pairs, multiples of image_size, "
                "with tiling: llava_next (and only with it)"
            )
        hybrid = self.tower == "deepseek_hybrid" and not self.pretrained
        if (self.high_res_size > 0) != hybrid or self.high_res_size % 16:
            raise ValueError(
                "model.vision.high_res_size: a multiple of 16 (SAM's patches) with tower: "
                "deepseek_hybrid, and 0 otherwise"
            )
        if self.high_res_size and (
            self.native or self.tiling != "none" or self.normalization != "clip"
        ):
            raise ValueError(
                "model.vision.tower: deepseek_hybrid takes square images (resize: square, no "
                "tiling) normalized as its SAM path is (normalization: clip)"
            )
        if self.num_queries < 0 or (self.tower == "blip2" and not self.num_queries):
            raise ValueError("model.vision.num_queries: > 0 with tower: blip2, else >= 0")
        if self.num_queries and (
            self.native or self.tiling != "none" or self.spatial_merge != 1 or self.feature_layer
        ):
            raise ValueError(
                "model.vision.num_queries: square images (resize: square), no tiling, "
                "spatial_merge 1, feature_layer 0 (the Q-Former's output)"
            )
        vq = self.tower in VQ_TOWERS and not self.pretrained
        if (self.codebook_size > 0) != vq or (
            vq
            and (
                self.patch_size & (self.patch_size - 1)
                or (self.tower == "chameleon_vq" and self.hidden_size % 32)
                or self.native
                or self.tiling != "none"
                or (self.tower == "chameleon_vq" and self.trainable)
            )
        ):
            raise ValueError(
                "model.vision.codebook_size: > 0 with a VQ tokenizer (tower: chameleon_vq or "
                "janus, and only there), whose patch_size is a power of 2 (its downsampling), "
                "images square (resize: square, no tiling); chameleon_vq's hidden_size a "
                "multiple of 32 (its group norms), and it frozen"
            )
        mllama = self.tower == "mllama"
        if (
            (self.max_num_tiles >= 1) != mllama
            or (self.max_num_tiles < 0)
            or (
                mllama
                and (
                    self.native
                    or self.tiling not in ("none", "mllama")
                    or self.spatial_merge != 1
                    or self.feature_layer
                )
            )
        ):
            raise ValueError(
                "model.vision.max_num_tiles: >= 1 with tower: mllama, and only there, whose "
                "images are square (resize: square) or tiled as its processor tiles them "
                "(tiling: mllama), spatial_merge 1, feature_layer 0"
            )
        if self.tiling == "mllama" and not mllama:
            raise ValueError("model.vision.tiling=mllama goes with tower: mllama")
        if self.tower == "idefics" and (
            self.native or self.tiling != "none" or self.spatial_merge != 1 or self.feature_layer
        ):
            raise ValueError(
                "model.vision.tower=idefics takes square images (resize: square, no tiling), "
                "spatial_merge 1, feature_layer 0 (its resampler's output)"
            )
        if self.tile_longest_edge < 0:
            raise ValueError("model.vision.tile_longest_edge must be >= 0 (0: 4 × image_size)")
        if self.tower in ("clip", "idefics3") and self.native and not self.pretrained:
            raise ValueError(
                f"model.vision.tower={self.tower} takes square images only (resize: square)"
            )
        if not -self.num_layers <= self.feature_layer <= self.num_layers and not self.pretrained:
            raise ValueError(
                f"model.vision.feature_layer={self.feature_layer} is outside the tower's "
                f"{self.num_layers} layers"
            )
        for index, extra in enumerate(self.extra_towers):
            where = f"model.vision.extra_towers[{index}]"
            if extra.tower not in EXTRA_TOWERS or extra.normalization not in ("siglip", "clip"):
                raise ValueError(
                    f"{where}: tower one of {', '.join(EXTRA_TOWERS)}, normalization siglip or "
                    f"clip (not {extra.tower!r}, {extra.normalization!r})"
                )
            if bool(extra.pretrained) != bool(self.pretrained):
                raise ValueError(
                    f"{where}.pretrained: set exactly when model.vision.pretrained is (the "
                    "towers are all pretrained or all random)"
                )
            if (
                not -self.num_layers <= extra.feature_layer <= self.num_layers
                and not extra.pretrained
            ):
                raise ValueError(
                    f"{where}.feature_layer={extra.feature_layer} is outside the tower's "
                    f"{self.num_layers} layers"
                )
        if self.extra_towers and (
            (self.tower not in EXTRA_TOWERS and not self.pretrained)
            or self.native
            or self.spatial_merge != 1
            or self.num_queries
        ):
            raise ValueError(
                "model.vision.extra_towers: with a SigLIP or CLIP tower on square images "
                "(resize: square), spatial_merge 1"
            )
        min_pixels, max_pixels = self.pixel_budget
        if min_pixels < 0 or max_pixels < self.token_size**2 or min_pixels > max_pixels:
            raise ValueError(
                "model.vision.min_pixels/max_pixels: need 0 <= min_pixels <= max_pixels and "
                f"max_pixels >= one image token ({self.token_size**2} pixels)"
            )


@dataclass
class ModelConfig:
    # A transformers causal-LM checkpoint (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 3: a local
    # directory or a model id). When set, width, heads, vocabulary, norms and RoPE come from it,
    # and its layers become the text-in, core and text-head blocks in order (num_core_blocks is
    # derived).
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
    attention_output_bias: bool = False  # the attention output projection's bias (Persimmon)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    # The share of each head's dimensions RoPE rotates (transformers' partial_rotary_factor;
    # Persimmon: 0.5): the first `rotary_dim` dimensions, the rest pass unrotated.
    rope_fraction: float = 1.0
    # Learned absolute positions (OPT's): a table of this many positions, its rows offset by
    # `position_offset` (OPT: 2), added to every token's embedding where the token enters the
    # model (text at the embedding, image tokens at the merge); 0: none. OPT has no RoPE
    # (rope_fraction 0).
    learned_positions: int = 0
    position_offset: int = 0
    # Llama-3 RoPE scaling (transformers `rope_scaling: {rope_type: llama3}`), 0: off. Wavelengths
    # above original_max_positions / low_freq_factor are slowed by the factor, those below
    # original_max_positions / high_freq_factor kept, the ones between interpolated.
    rope_llama3_factor: float = 0.0
    rope_llama3_low_freq_factor: float = 1.0
    rope_llama3_high_freq_factor: float = 4.0
    rope_llama3_original_max_positions: int = 8192
    # Linear RoPE scaling (`rope_scaling: {rope_type: linear}`): every frequency divided by the
    # factor; 0: off.
    rope_linear_factor: float = 0.0
    qk_norm: bool | str = False  # QK_NORMS
    norm_eps: float = 1e-5
    # "default": RMSNorm scales by its weight; "gemma": by (1 + weight), computed in fp32, so the
    # weights are offsets from 1 and start at 0; "layernorm": LayerNorm with a bias (Persimmon).
    norm_style: str = "default"
    # A second norm on each sublayer's output, before the residual add (Gemma's sandwich norms).
    post_norms: bool = False
    # Each sublayer's output normed before its residual add and its input not (Chameleon-30B's
    # swin_norm): x + norm(attn(x)), then h + norm(mlp(h)).
    swin_norm: bool = False
    scale_embeddings: bool = False  # token embeddings × sqrt(d_model) (Gemma)
    # The MLP: gated, down(act(gate(x)) * up(x)), or not (Persimmon), down(act(up(x))); its
    # activation "silu" (SwiGLU), "gelu_tanh" (Gemma) or "relu2" (squared ReLU, Persimmon); with
    # mlp_bias its linears have biases.
    mlp_gated: bool = True
    mlp_activation: str = "silu"
    mlp_bias: bool = False
    # Softmax scale of the attention scores; 0: 1 / sqrt(head width). (Gemma: its
    # query_pre_attn_scalar ** -0.5.)
    attention_scale: float = 0.0
    # Sliding-window attention. `layer_types`: "full" or "sliding" for each text layer in the
    # order text-in, core, text-head; empty: all full. Image-in and image-head blocks take the
    # type of the text layer they copy (see `text_layer_of`). In a sliding layer query t sees
    # only keys after t - sliding_window of what it would see otherwise, with RoPE base
    # sliding_rope_theta and no RoPE scaling (0: the full layers' RoPE).
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int = 0
    sliding_rope_theta: float = 0.0
    # Depths. Text-in blocks see text only, image-in blocks one image at a time; the merge happens
    # after them. Head blocks branch off the shared core, one branch per output modality.
    num_text_in_blocks: int = 1
    num_image_in_blocks: int = 1
    num_core_blocks: int = 2
    num_text_head_blocks: int = 1
    num_image_head_blocks: int = 1
    # "bidirectional": each image span one bidirectional block; "causal": none (LLaVA);
    # "prefix": prefix-LM (PaliGemma), every token of a document before its first loss target
    # (its images and the user turn before the first answer) one bidirectional block, the rest
    # causal (trainer/data/packing.py `attention_segments`).
    image_attention: str = "bidirectional"
    # A <image_row_break> token after every row of an image span but the last (true: Pixtral's
    # [IMG_BREAK]) or after every row ("all": Fuyu's |NEWLINE|): a text token inside the span's
    # block, so the LLM sees where rows end.
    image_row_break: bool | str = False
    # <image_start> and <image_end> around every image; false: the image's spans sit directly
    # between the text tokens (LLaVA: the processor expands <image> into its image tokens only);
    # "end": only <image_end> after the image (Pixtral's [IMG_END]).
    image_markers: bool | str = True
    # The tokenizer's strings for the image start and end markers and the row break (added to
    # the tokenizer when it lacks them); an imported Pixtral or Mistral 3 uses its own
    # "[IMG_END]" and "[IMG_BREAK]", whose embeddings it was trained with.
    image_start_token: str = "<image_start>"
    image_end_token: str = "<image_end>"
    image_row_break_token: str = "<image_row_break>"
    # Qwen-VL's grounding: <ref>phrase</ref><box>(x1,y1),(x2,y2)</box> in the text, the boxes'
    # pixel corners read as integers in [0, 1000) of their image's width and height, the four
    # tags special tokens (trainer/data/grounding.py).
    grounding: bool = False
    # RoPE positions inside image spans: "sequential" (1-D, like text), "shared" (every token of
    # a span at the span's first position), "collapsed" (as "shared", and the rest of the
    # document continues one past it: a span takes one position, CogVLM's), "2d" (half the
    # frequencies by row, half by column),
    # "mrope" (Qwen2-VL's M-RoPE: three axes, time, row and column, over `mrope_section`
    # frequencies each; the text after an image continues one past its largest position).
    image_positions: str = "sequential"
    # M-RoPE's frequencies per axis (time, row, column), summing to head_dim / 2 (Qwen2-VL-7B:
    # [16, 24, 24]).
    mrope_section: list[int] = field(default_factory=list)
    # New image-in / image-head blocks: "fresh" init, or "copy" the neighbouring text blocks.
    image_blocks_init: str = "fresh"
    # CogVLM's visual expert: every block over the merged sequence (core, text-head, image-head)
    # carries q/k/v, output and MLP weights of its own that its image tokens take (text tokens
    # and row breaks keep the text weights; the norms are shared). They start as copies of the
    # block's text weights, a pretrained LLM's layer included.
    visual_expert: bool = False
    # LLaMA-3.2-Vision's and Flamingo's fusion: images are not in the sequence but a separate
    # stream of keys (the tower's tokens through the adaptor), which these blocks of the core
    # (indices into it; LLaMA-3.2-Vision's numbering of its language model's layers, for
    # Flamingo one before every N-th decoder layer) cross-attend to, gated by tanh of learned
    # gates that start at 0, its attention and its MLP each. Each image stands in the sequence
    # as one token, its start marker (image_markers: start, the tokenizer's `image_start_token`,
    # <|image|> or <image>), and `cross_attention_style` says which images a text token sees.
    # Empty: images in the sequence, as every other design has them.
    cross_attention_layers: list[int] = field(default_factory=list)
    # "mllama": a text token sees the images before it in its document (consecutive ones
    # together); a token before the first attends to all of them but has its MLP output dropped
    # (LLaMA-3.2-Vision). "flamingo": a text token sees only the latest image at or before it;
    # a token before the first gets a zero attention output, its MLP output kept (Flamingo, as
    # transformers' Idefics). Gates: "scalar" or "vector" (one a channel); cross_attention_qk_norm:
    # an RMSNorm over each head's width on queries and keys.
    cross_attention_style: str = "mllama"
    cross_attention_gate: str = "scalar"
    cross_attention_qk_norm: bool = True
    # Rows of the LM head, 0: vocab_size. Fewer when the embedding has rows no text predicts
    # (LLaMA-3.2-Vision's: 8 more than its LM head, <|image|> among them).
    lm_head_rows: int = 0
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
    # What the image head predicts of an image token: frozen-encoder features ("encoder"), its
    # pixels ("pixels"), or, for a VQ tokenizer's codes ("tokens", Chameleon's), the code as a
    # vocabulary id: image tokens are then embedded by the token embedding, predicted by the
    # text branch and LM head with a cross-entropy loss, as text is, and text positions never
    # predict them (their logits are masked, as Chameleon's are). With tower: janus the codes are
    # of its own codebook instead: the images it generates (spans masked whole) are embedded by
    # its generation embedding and aligner and predicted by its generation head after the final
    # norm, the images it reads are its ViT's tokens through the adaptor.
    image_target: str = "encoder"
    # The vocabulary id of code 0 (codes are ids image_vocab_start … + codebook_size - 1); -1:
    # the rows after the tokenizer's vocabulary, set when the model is built.
    image_vocab_start: int = -1
    image_loss_tokens: str = "masked"  # IMAGE_LOSS_TOKENS
    image_loss: str = "mse"  # or "cosine"; a cross-entropy with image_target: tokens
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
    def rotary_dim(self) -> int:
        """The dimensions of a head RoPE rotates (the first ones)."""
        return int(self.head_dim * self.rope_fraction)

    def num_row_breaks(self, rows: int) -> int:
        """Row-break tokens inside an image span of `rows` rows."""
        return row_breaks_in_span(rows, self.image_row_break)

    @property
    def num_text_layers(self) -> int:
        """The language model's layers: text-in, core and text-head blocks."""
        return self.num_text_in_blocks + self.num_core_blocks + self.num_text_head_blocks

    def text_layer_of(self, group: str, index: int) -> int:
        """The text layer (text-in, core, text-head order) that block `index` of the block stack
        `group` is; for image blocks the one they copy: image-in blocks the first layers,
        image-head blocks the last ones."""
        num_layers = self.num_text_layers
        if group == "image_in":
            return min(index, num_layers - 1)
        if group == "image_head_blocks":
            return max(num_layers - self.num_image_head_blocks + index, 0)
        first = {
            "text_in": 0,
            "core": self.num_text_in_blocks,
            "text_head_blocks": num_layers - self.num_text_head_blocks,
        }
        return first[group] + index

    def has_expert(self, group: str) -> bool:
        """Whether the blocks of `group` carry a visual expert."""
        return self.visual_expert and group in MERGED_BLOCK_GROUPS

    def is_cross_attention(self, group: str, index: int) -> bool:
        """Whether block `index` of `group` is a gated cross-attention block."""
        return group == "core" and index in self.cross_attention_layers

    @property
    def lm_head_size(self) -> int:
        return self.lm_head_rows or self.vocab_size

    @property
    def cross_key_width(self) -> int:
        """The width of the key stream cross-attention projects: the LLM's after an adaptor,
        the tower's own with adaptor: identity (Flamingo's keys and values read it)."""
        return self.vision.hidden_size if self.adaptor == "identity" else self.d_model

    @property
    def cross_keys_per_image(self) -> tuple[int, int]:
        """(keys a tile slot, tile slots) of each image in the key stream: LLaMA-3.2-Vision's
        tower gives max_num_tiles slots of a tile's patches and class token; Flamingo's one of
        its resampler's `num_queries` latents (without one, the ViT's patches and class token)."""
        vision = self.vision
        patches = (vision.image_size // vision.patch_size) ** 2 + 1
        if vision.tower == "mllama":
            return patches, vision.max_num_tiles
        return vision.num_queries or patches, 1

    def is_sliding(self, group: str, index: int) -> bool:
        """Whether block `index` of `group` attends through the sliding window."""
        return bool(self.layer_types) and (
            self.layer_types[self.text_layer_of(group, index)] == "sliding"
        )

    @property
    def image_tokens_per_side(self) -> int:
        return self.vision.image_size // self.vision.token_size

    @property
    def square_grid(self) -> tuple[int, int]:
        """The token grid of an image in square mode; 1 × num_queries for a query tower."""
        if self.vision.num_queries:
            return 1, self.vision.num_queries
        side = self.image_tokens_per_side
        return side, side

    def pixel_shape(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in pixels of an image whose token grid is `grid`."""
        if self.vision.high_res_size:
            return self.vision.high_res_size, self.vision.high_res_size
        if self.vision.num_queries:
            return self.vision.image_size, self.vision.image_size
        token = self.vision.token_size
        return grid[0] * token, grid[1] * token

    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of the full token grid of a `width` × `height` image."""
        if self.vision.native:
            return self.vision.grid(width, height)
        return self.square_grid

    def image_spans(
        self, grid: tuple[int, int] | None = None
    ) -> list[tuple[tuple[int, int], bool]]:
        """The spans an image whose full grid is `grid` (rows, cols; default the square grid)
        becomes, in order: (the span's grid, is it the unmasked dual copy). A coarser scale s is
        the image's grid shrunk so that its longer side is s; a scale at or above the image's
        own longer side is left out. None when images are cross-attended, not in the sequence."""
        if self.cross_attention_layers:
            return []
        rows, cols = grid or self.square_grid
        longest = max(rows, cols)
        grids = [
            (max(1, round(rows * scale / longest)), max(1, round(cols * scale / longest)))
            for scale in self.image_scales
            if scale < longest
        ]
        spans = []
        for span_grid in [*grids, (rows, cols)]:
            spans.append((span_grid, False))
            if self.dual_input:
                spans.append((span_grid, True))
        return spans

    @property
    def image_start_marker(self) -> bool:
        return self.image_markers is True or self.image_markers == "start"

    @property
    def image_end_marker(self) -> bool:
        return self.image_markers in (True, "end")

    @property
    def num_image_markers(self) -> int:
        """Marker tokens around each image (not counted by `num_image_tokens`)."""
        return self.image_start_marker + self.image_end_marker

    def num_image_tokens(self, grid: tuple[int, int] | None = None) -> int:
        """Tokens of one image over all of its spans (image start and end tokens excluded)."""
        return sum(rows * cols for (rows, cols), _ in self.image_spans(grid))

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
        if self.rope_linear_factor < 0 or (self.rope_linear_factor and self.rope_llama3_factor):
            raise ValueError(
                "model.rope_linear_factor must be >= 0, and not set with model.rope_llama3_factor"
            )
        if self.norm_style not in NORM_STYLES:
            raise ValueError(
                f"model.norm_style={self.norm_style!r}; valid: {', '.join(NORM_STYLES)}"
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"model.mlp_activation={self.mlp_activation!r}; valid: {', '.join(MLP_ACTIVATIONS)}"
            )
        no_rope = self.rope_fraction == 0 and self.learned_positions > 0
        if not (0 < self.rope_fraction <= 1 or no_rope) or self.rotary_dim % 2:
            raise ValueError(
                "model.rope_fraction must be in (0, 1] (0 with learned_positions) and rotate an "
                f"even number of a head's dimensions (head_dim {self.head_dim} × "
                f"{self.rope_fraction} = {self.rotary_dim})"
            )
        if self.learned_positions < 0 or self.position_offset < 0:
            raise ValueError("model.learned_positions and position_offset must be >= 0")
        if self.learned_positions and self.image_positions != "sequential":
            raise ValueError(
                "model.learned_positions: one position per token (image_positions: sequential)"
            )
        if self.attention_scale < 0:
            raise ValueError("model.attention_scale must be >= 0 (0: 1 / sqrt(head width))")
        if self.sliding_window < 0 or self.sliding_rope_theta < 0:
            raise ValueError("model.sliding_window and model.sliding_rope_theta must be >= 0")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(
                f"model.layer_types has {unknown[0]!r}; valid: {', '.join(LAYER_TYPES)}"
            )
        if self.layer_types and len(self.layer_types) != self.num_text_layers:
            raise ValueError(
                f"model.layer_types has {len(self.layer_types)} entries, one per text layer "
                f"needs {self.num_text_layers} (text-in + core + text-head blocks)"
            )
        if ("sliding" in self.layer_types) != (self.sliding_window > 0):
            raise ValueError(
                "model.sliding_window needs a 'sliding' entry in model.layer_types, and "
                "sliding layers need model.sliding_window >= 1"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("model.num_heads must be a multiple of model.num_kv_heads")
        self.vision.validate()
        if self.attention_backend not in ATTENTION_BACKEND_NAMES:
            raise ValueError(
                f"model.attention_backend={self.attention_backend!r}; "
                f"valid: {', '.join(ATTENTION_BACKEND_NAMES)}"
            )
        if self.adaptor not in ADAPTOR_NAMES:
            raise ValueError(f"model.adaptor={self.adaptor!r}; valid: {', '.join(ADAPTOR_NAMES)}")
        if self.image_attention not in IMAGE_ATTENTIONS:
            raise ValueError(
                f"model.image_attention={self.image_attention!r}; "
                f"valid: {', '.join(IMAGE_ATTENTIONS)}"
            )
        if not any(self.image_markers is m or self.image_markers == m for m in IMAGE_MARKERS):
            raise ValueError(
                f"model.image_markers={self.image_markers!r}; valid: true, false, end, start"
            )
        if not any(
            self.image_row_break is m or self.image_row_break == m for m in IMAGE_ROW_BREAKS
        ):
            raise ValueError(
                f"model.image_row_break={self.image_row_break!r}; valid: false, true, all"
            )
        names = (self.image_start_token, self.image_end_token, self.image_row_break_token)
        if not all(names) or len(set(names)) < 3:
            raise ValueError(
                "model.image_start_token, image_end_token and image_row_break_token must be "
                f"three different non-empty strings, not {list(names)}"
            )
        if self.image_positions not in IMAGE_POSITIONS:
            raise ValueError(
                f"model.image_positions={self.image_positions!r}; "
                f"valid: {', '.join(IMAGE_POSITIONS)}"
            )
        if (self.image_positions == "mrope") != bool(self.mrope_section) or (
            self.mrope_section
            and (len(self.mrope_section) != 3 or sum(self.mrope_section) != self.rotary_dim // 2)
        ):
            raise ValueError(
                "model.image_positions=mrope needs model.mrope_section: three frequency counts "
                f"(time, row, column) summing to rotary_dim / 2 = {self.rotary_dim // 2}, and "
                f"mrope_section needs mrope; got {self.mrope_section}"
            )
        if self.image_blocks_init not in ("fresh", "copy"):
            raise ValueError(
                f"model.image_blocks_init={self.image_blocks_init!r}; valid: fresh, copy"
            )
        queries_from = self.adaptor == "resampler" or (
            self.vision.tower == "blip2" and not self.vision.pretrained
        )
        if (self.vision.tower != "idefics" and bool(self.vision.num_queries) != queries_from) or (
            self.adaptor == "resampler" and self.vision.tower in ("blip2", "idefics")
        ):
            raise ValueError(
                "model.vision.num_queries (> 0) goes with tower: blip2 (its Q-Former's queries) "
                "or adaptor: resampler (Qwen-VL's), one of them, and only there, or with tower: "
                "idefics (its perceiver's latents; 0: none)"
            )
        side = math.isqrt(self.vision.num_queries)
        if self.adaptor == "resampler" and (
            side * side != self.vision.num_queries or self.d_model % 4
        ):
            raise ValueError(
                f"adaptor: resampler: a square grid of queries (model.vision.num_queries "
                f"{self.vision.num_queries}) and d_model divisible by 4 (its 2-D positions)"
            )
        if (self.adaptor == "hybrid_aligner") != (self.vision.tower == "deepseek_hybrid"):
            raise ValueError(
                "model.adaptor: hybrid_aligner goes with model.vision.tower: deepseek_hybrid"
            )
        if (self.vision.num_queries or self.vision.high_res_size) and (
            self.mask_rate_max
            or self.full_mask_prob
            or self.image_scales
            or self.dual_input
            or self.image_target == "pixels"
        ):
            raise ValueError(
                "model.vision.num_queries, high_res_size: nothing is masked (query tokens stand "
                "for no region; a hybrid tower sees two resolutions): mask_rate_max and "
                "full_mask_prob 0, no image_scales, no dual_input, image_target: encoder"
            )
        if self.vision.tiling == "llava_next" and (
            self.mask_rate_max or self.full_mask_prob or self.image_scales or self.dual_input
        ):
            raise ValueError(
                "model.vision.tiling=llava_next: its images are shown whole, once (mask_rate_max "
                "and full_mask_prob 0, no image_scales, no dual_input)"
            )
        full = self.image_tokens_per_side
        if any(not 0 < side < full for side in self.image_scales) or self.image_scales != sorted(
            set(self.image_scales)
        ):
            raise ValueError(
                f"model.image_scales must be increasing grid sides below the full grid ({full})"
            )
        if self.image_positions == "2d" and self.rotary_dim % 4:
            raise ValueError("model.image_positions=2d needs a rotary dim divisible by 4")
        if not 0.0 <= self.full_mask_prob <= 1.0:
            raise ValueError("model.full_mask_prob must be in [0, 1]")
        if self.diffusion_head and self.diffusion_steps < 2:
            raise ValueError("model.diffusion_steps must be >= 2")
        if self.image_target not in IMAGE_TARGETS:
            raise ValueError(
                f"model.image_target={self.image_target!r}; valid: {', '.join(IMAGE_TARGETS)}"
            )
        if self.image_loss_tokens not in IMAGE_LOSS_TOKENS:
            raise ValueError(
                f"model.image_loss_tokens={self.image_loss_tokens!r}; "
                f"valid: {', '.join(IMAGE_LOSS_TOKENS)}"
            )
        if self.image_loss_tokens == "all" and self.image_attention != "causal":
            raise ValueError(
                "model.image_loss_tokens=all predicts token j at j - 1, which sees token j "
                "unless image attention is causal (model.image_attention: causal)"
            )
        if self.swin_norm and self.post_norms:
            raise ValueError(
                "model.swin_norm and model.post_norms: one of them (both norm outputs)"
            )
        if not any(self.qk_norm is m or self.qk_norm == m for m in QK_NORMS):
            raise ValueError(
                f"model.qk_norm={self.qk_norm!r}; valid: false, true, per_head_layernorm"
            )
        if (self.image_target == "tokens") != (self.vision.tower in VQ_TOWERS):
            raise ValueError(
                "model.image_target: tokens goes with a VQ tokenizer (model.vision.tower: "
                "chameleon_vq or janus), and such a tower with tokens"
            )
        if self.image_target == "tokens" and (
            self.num_image_head_blocks
            or self.diffusion_head
            or self.image_scales
            or self.dual_input
        ):
            raise ValueError(
                "model.image_target=tokens: image tokens are codes of the image itself, "
                "predicted by the text branch: num_image_head_blocks 0, no diffusion_head, no "
                "image_scales, no dual_input"
            )
        if (self.adaptor == "vocabulary") != (self.vision.tower == "chameleon_vq"):
            raise ValueError(
                "model.adaptor: vocabulary goes with model.vision.tower: chameleon_vq (its codes "
                "as vocabulary ids), and that tower with it"
            )
        if self.vision.tower == "janus" and (
            self.mask_rate_max
            or self.image_attention != "causal"
            or self.image_loss_tokens != "masked"
            or self.adaptor != "mlp"
        ):
            raise ValueError(
                "model.vision.tower=janus: an image is read (its ViT's tokens) or generated "
                "whole (its codes, each predicted at the position before it), as "
                "model.full_mask_prob draws: mask_rate_max 0, image_attention causal, "
                "image_loss_tokens masked, adaptor mlp (its aligner)"
            )
        layers = self.cross_attention_layers
        if layers and (
            layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < self.num_core_blocks
        ):
            raise ValueError(
                f"model.cross_attention_layers={layers}: increasing indices of core blocks "
                f"(0 … num_core_blocks - 1 = {self.num_core_blocks - 1})"
            )
        if layers and (
            self.vision.tower not in CROSS_ATTENTION_TOWERS
            or self.image_target != "none"
            or self.image_markers != "start"
            or self.num_text_in_blocks
            or self.num_image_in_blocks
            or self.num_text_head_blocks
            or self.num_image_head_blocks
            or self.mask_rate_max
            or self.full_mask_prob
            or self.diffusion_head
            or self.visual_expert
            or self.attention_backend == "flex"
            or self.layer_types
        ):
            raise ValueError(
                "model.cross_attention_layers: images are a stream of keys, not in the sequence "
                "(LLaMA-3.2-Vision's, Flamingo's): vision.tower mllama or idefics, image_target "
                "none, image_markers "
                "start (each image's one token), every depth but the core 0, nothing masked "
                "(mask_rate_max, full_mask_prob 0), no diffusion head or visual expert, "
                "no layer_types, attention_backend not flex"
            )
        if self.vision.tower in CROSS_ATTENTION_TOWERS and not layers:
            raise ValueError(
                f"model.vision.tower={self.vision.tower} is read by cross-attention "
                "(model.cross_attention_layers)"
            )
        if self.cross_attention_style not in CROSS_ATTENTION_STYLES:
            raise ValueError(
                f"model.cross_attention_style={self.cross_attention_style!r}; "
                f"valid: {', '.join(CROSS_ATTENTION_STYLES)}"
            )
        if self.cross_attention_gate not in CROSS_ATTENTION_GATES:
            raise ValueError(
                f"model.cross_attention_gate={self.cross_attention_gate!r}; "
                f"valid: {', '.join(CROSS_ATTENTION_GATES)}"
            )
        if (self.adaptor == "identity") != (self.vision.tower == "idefics"):
            raise ValueError(
                "model.adaptor=identity goes with vision.tower: idefics (Flamingo's "
                "cross-attention reads the tower's own width), and only there"
            )
        if self.lm_head_rows < 0 or (self.lm_head_rows and self.tie_embeddings):
            raise ValueError(
                "model.lm_head_rows must be >= 0, and 0 with tie_embeddings (one matrix)"
            )
        if self.image_target == "none" and (
            self.num_image_head_blocks
            or self.mask_rate_max
            or self.full_mask_prob
            or self.diffusion_head
        ):
            raise ValueError(
                "model.image_target=none: no image loss, so nothing masked (mask_rate_max, "
                "full_mask_prob 0), no image-head blocks, no diffusion head"
            )
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


def row_breaks_in_span(rows: int, row_break: bool | str) -> int:
    """Row-break tokens in an image span of `rows` rows under `model.image_row_break`."""
    if row_break == "all":
        return rows
    return rows - 1 if row_break else 0


def model_config_from_dict(raw: dict) -> ModelConfig:
    """The inverse of `dataclasses.asdict(ModelConfig)`; unknown keys are a ValueError."""
    raw = dict(raw)
    vision = dict(raw.pop("vision", {}))
    extras = vision.pop("extra_towers", [])
    for cls, values in (
        (ModelConfig, raw),
        (VisionConfig, vision),
        *((ExtraTowerConfig, extra) for extra in extras),
    ):
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    extra_towers = [ExtraTowerConfig(**extra) for extra in extras]
    return ModelConfig(**raw, vision=VisionConfig(**vision, extra_towers=extra_towers))
