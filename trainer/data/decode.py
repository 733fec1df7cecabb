"""Decode one MDS sample into a `Document`: token ids, loss targets, image spans and image masks.

Runs on the CPU side of the pipeline (in the loader workers, `SampleReader`), so the model sees
only tensors. Everything random here (image mask rates and positions) is seeded by the sample's
global index and epoch, which makes a resumed run see exactly the masks an uninterrupted one did.

Text is rendered in two ways (`ChatRenderer`):
- with the tokenizer's chat template when it has one: the conversation is rendered prefix by
  prefix, and what the template adds for an assistant turn after its generation prompt (the
  answer and the template's end-of-turn marker) is the loss target;
- otherwise with a simple default: `<bos> <|user|> … <|assistant|> … <eos>`, loss on the assistant
  turns and their `<eos>`.
Plain text is `<bos> text <eos>` with loss on every token. Each `<image>` placeholder becomes
`<image_start> [span] [span] … <image_end>`: one image span per entry of
`ModelConfig.image_spans()` (coarse-to-fine scales, each optionally followed by its unmasked dual
copy), back to back, so the first token of a finer scale is predicted from the coarser one. With
`model.image_markers: false` the spans stand between the text tokens on their own (LLaVA); with
`end` only `<image_end>` follows them (Pixtral's `[IMG_END]`). With `model.vision.tiling` an image
is several images of the sequence, its tiles and its global view, with the design's text around
each (`TILE_TEXTS`).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from models.config import TILINGS, ModelConfig
from trainer.data.grounding import GROUNDING_TOKENS, normalize_boxes
from trainer.data.shards import IMAGE_PLACEHOLDER, unpack_blobs

# Every reason a sample can be skipped for, at shard time or at decode time. A fixed list, so
# ranks can sum their counts with one all_reduce.
SKIP_REASONS = (
    "invalid_json",  # a source record that is not JSON
    "invalid_record",  # JSON, but without the format's fields, or with wrong types or roles
    "invalid_utf8",
    "empty",  # no text and no conversation, or only blank turns
    "image_missing",  # an <image> without an image, or an image file that does not exist
    "image_unused",  # more images than <image> placeholders
    "image_corrupt",
    "image_too_large",  # more pixels than the limit (a decompression bomb guard)
    "too_long",  # more tokens than data.max_tokens (shards: --max-tokens)
    "chat_template",  # the tokenizer's chat template rejects the conversation
    "unreadable",  # any other failure while reading a source record (shard time only)
)
_PHILOX_EMPTY_BUFFER = np.zeros(4, dtype=np.uint64)  # with buffer_pos 4: nothing buffered
ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>"}


class DecodeError(ValueError):
    """A sample that cannot be used; `reason` (one of SKIP_REASONS) is what it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def prepare_tokenizer(tokenizer, model_cfg: ModelConfig | None = None) -> int:
    """Add the special tokens decoding needs and `tokenizer` lacks; returns how many were added.

    The image tokens the model config uses (`image_tokens_used`: by default `<image_start>`
    and `<image_end>`); without a chat template also the default role tokens. Call it before
    building the model: `model.vocab_size` is taken from `len(tokenizer)`, so added tokens get
    embedding rows.
    """
    needed = image_tokens_used(model_cfg or ModelConfig())
    if not tokenizer.chat_template:
        needed += ROLE_TOKENS.values()
    vocab = tokenizer.get_vocab()
    missing = [token for token in needed if token not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set one (it ends every document)")
    return len(missing)


def tokenizer_dir(data_cfg) -> Path:
    """`data.tokenizer`, or the tokenizer written next to the shards (`splitvlm shards demo`)."""
    return Path(data_cfg.tokenizer) if data_cfg.tokenizer else Path(data_cfg.path) / "tokenizer"


def image_tokens_used(cfg: ModelConfig) -> list[str]:
    """The tokenizer strings of the image markers, row break, tile and grounding tokens that
    `cfg` puts in sequences."""
    used = (
        (cfg.image_start_marker, cfg.image_start_token),
        (cfg.image_end_marker, cfg.image_end_token),
        (cfg.image_row_break, cfg.image_row_break_token),
    )
    tiling = TILE_TEXTS.get(cfg.vision.tiling)
    tile_tokens = tiling.tokens(cfg.vision.max_tiles_per_side) if tiling else []
    grounding = list(GROUNDING_TOKENS) if cfg.grounding else []
    return [token for is_used, token in used if is_used] + tile_tokens + grounding


@dataclass(frozen=True)
class TileText:
    """The text a tiling puts around an image's tiles and global view (`model.vision.tiling`).

    `pieces(rows, cols)`: rows · cols + 2 strings for a split image (before each tile, before
    the global view, after it), 2 for a single tile (before and after the global view).
    `tokens(side)`: the special tokens they use for up to side × side tiles."""

    pieces: Callable[[int, int], list[str]]
    tokens: Callable[[int], list[str]]


_IDEFICS3_AROUND, _IDEFICS3_GLOBAL = "<fake_token_around_image>", "<global-img>"


def _idefics3_pieces(rows: int, cols: int) -> list[str]:
    """Idefics3's processor's prompt for an image (`get_image_prompt_string`): each tile opened
    by the around-image token and its <row_r_col_c>, a newline after each row of tiles, a blank
    line, then the global view between two around-image tokens."""
    pieces = [
        ("\n" if col == 0 and row > 0 else "") + f"{_IDEFICS3_AROUND}<row_{row + 1}_col_{col + 1}>"
        for row in range(rows)
        for col in range(cols)
    ]
    blank_line = "\n\n" if rows else ""
    return [*pieces, f"{blank_line}{_IDEFICS3_AROUND}{_IDEFICS3_GLOBAL}", _IDEFICS3_AROUND]


def _idefics3_tokens(side: int) -> list[str]:
    tiles = [f"<row_{row}_col_{col}>" for row in range(1, side + 1) for col in range(1, side + 1)]
    return [_IDEFICS3_AROUND, _IDEFICS3_GLOBAL, *tiles]


# `model.vision.tiling` → its text ("none" has none)
TILE_TEXTS = {"idefics3": TileText(_idefics3_pieces, _idefics3_tokens)}


def load_tokenizer(path: str | Path, model_cfg: ModelConfig | None = None):
    """A transformers tokenizer from a local directory, with the special tokens decoding
    `model_cfg` needs (`prepare_tokenizer`). The one way every part of splitvlm loads a
    tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory not found: {path} (set data.tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prepare_tokenizer(tokenizer, model_cfg)
    return tokenizer


def open_image(blob: bytes, max_pixels: int) -> Image.Image:
    """Open encoded image bytes; refuses more than `max_pixels` (0: no limit) before decoding."""
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; PIL's warning would fire on every large image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
    except Image.DecompressionBombError as err:
        raise DecodeError("image_too_large", str(err)) from None
    except Image.UnidentifiedImageError:
        raise DecodeError("image_corrupt", "not an image format PIL can read") from None
    except Exception as err:  # PIL raises many types on hostile bytes
        raise DecodeError("image_corrupt", f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise DecodeError("image_too_large", f"{width}x{height} pixels > {max_pixels}")
    return image


def check_image(blob: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) as displayed (`displayed_size`: what native-resolution grids are computed
    from) of an image that decodes completely; DecodeError otherwise."""
    with open_image(blob, max_pixels) as image:
        try:
            size = displayed_size(image)
            # JPEG: decode at 1/8 scale; every byte is still read, so truncation is still found.
            image.draft("RGB", (1, 1))
            image.load()
        except Exception as err:
            raise DecodeError("image_corrupt", f"{type(err).__name__}: {err}") from None
    return size


# Transparent pixels are composited onto white, as transparent logos, icons and diagrams are drawn
# to be seen on a white page (Qwen2-VL's loader does the same); dropping alpha would show whatever
# colour the encoder left under them, often black.
ALPHA_BACKGROUND = (255, 255, 255)
# EXIF orientation → the (H, W, C) array ops that turn the stored frame into the displayed one
# (as `ImageOps.exif_transpose`); 5-8 swap width and height.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a.swapaxes(0, 1)[:, ::-1],
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: a.swapaxes(0, 1)[::-1],
}


def decode_rgb(blob: bytes, max_pixels: int, size: tuple[int, int]) -> np.ndarray:
    """Encoded image bytes → uint8 (H, W, 3) RGB at exactly `size` = (width, height), as the
    image is displayed (EXIF orientation applied). DecodeError for what cannot be used:
    `image_too_large` before any pixel is decoded, `image_corrupt` for bytes that do not decode."""
    with open_image(blob, max_pixels) as image:
        return image_to_rgb(image, size)


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: `image.size` with EXIF orientations 5-8 swapping the two.
    For a PNG this decodes the image (its EXIF may follow the pixels); not for a JPEG."""
    width, height = image.size
    return (height, width) if _orientation(image) >= 5 else (width, height)


def image_to_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`decode_rgb` for an image `open_image` returned and nothing has loaded yet (so a JPEG can
    still decode at a reduced scale). Resized or rotated, the array is a (H, W, 3) view of
    channels-first memory."""
    try:
        orientation = _orientation(image)
        width, height = size
        stored = (height, width) if orientation >= 5 else (width, height)  # the target, unrotated
        if image.size != stored:
            # JPEG: the decoder scales by 1/2, 1/4 or 1/8 in the DCT domain, to the smallest
            # scale still at least `stored` in both directions; other formats ignore it.
            image.draft("RGB", stored)
        pixels = _rgb_or_grey(image)
        if pixels.shape[:2] != (stored[1], stored[0]):
            pixels = _resize(pixels, stored)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        if orientation in _ORIENT:
            # After resizing: rotating the small image is cheap, the full-size one is not. Copied
            # into channels-first memory (plane by plane: 4x faster than into (H, W, 3) order).
            planes = np.ascontiguousarray(_ORIENT[orientation](pixels).transpose(2, 0, 1))
            pixels = planes.transpose(1, 2, 0)
    except DecodeError:
        raise
    except Exception as err:  # truncated or malformed data surfaces only here
        raise DecodeError("image_corrupt", f"{type(err).__name__}: {err}") from None
    return pixels


def _orientation(image: Image.Image) -> int:
    # getexif() also reads an XMP orientation; malformed EXIF gives a warning and no tag.
    return image.getexif().get(0x0112, 1)  # 0x0112: Orientation


def _rgb_or_grey(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) RGB, or (H, W) for greyscale (resized as one channel, then repeated)."""
    if image.has_transparency_data:  # RGBA, LA, PA, a palette with alpha, a transparent colour
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND)
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if image.mode in ("RGB", "L"):
        return np.asarray(image)
    if image.mode.startswith("I"):
        # I;16* and I come from 16-bit files; PIL's own convert would clip them at 255 (white).
        values = np.asarray(image).clip(0, 65535).astype(np.uint32)
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    if image.mode == "F":  # float images hold 0..1 by convention (PIL would clip at 255 too)
        return (np.asarray(image).clip(0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return np.asarray(image.convert("RGB"))  # CMYK (no ICC profile applied), P, YCbCr, 1


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) uint8 → (height, width[, C]): antialiased bicubic, the filter of PIL's BICUBIC
    (outputs within 1-2 levels of it), in torch's uint8 kernel: 3-6x faster than PIL's resize
    (scripts/bench_loader.py --photos)."""
    with warnings.catch_warnings():
        # PIL's arrays are read-only; interpolate only reads its input.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(pixels)
    # (1, C, H, W) view of the (H, W, C) memory: channels-last, which the uint8 kernel wants.
    tensor = tensor[None, None] if pixels.ndim == 2 else tensor.permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(
        tensor, size=(size[1], size[0]), mode="bicubic", antialias=True
    )
    return resized[0, 0].numpy() if pixels.ndim == 2 else resized[0].permute(1, 2, 0).numpy()


@dataclass
class TokenizedText:
    ids: list[int]
    targets: list[bool]  # ids[t] is a loss target (predicted at t - 1)
    image_positions: list[int]  # an image goes right before ids[p], in order

    @property
    def num_text_tokens(self) -> int:
        """Tokens of the document without its image spans' contents (begin/end tokens count)."""
        return len(self.ids) + 2 * len(self.image_positions)


class ChatRenderer:
    """Sample → token ids and loss targets, with image positions; no images are touched."""

    def __init__(self, tokenizer):
        ids = tokenizer.convert_tokens_to_ids
        vocab = tokenizer.get_vocab()
        self.use_chat_template = bool(tokenizer.chat_template)
        # Image tokens are the decoder's (SampleDecoder checks the ones its model config uses).
        needed = [] if self.use_chat_template else list(ROLE_TOKENS.values())
        missing = [token for token in needed if token not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks special tokens {missing}; call prepare_tokenizer() first"
            )
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers only
        self.role_ids = {role: ids(token) for role, token in ROLE_TOKENS.items() if token in vocab}
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, sample: dict, prompt_only: bool = False) -> TokenizedText:
        """With `prompt_only`, the final assistant turn is dropped and the assistant's generation
        prompt appended: the input for generating that turn."""
        # Chunks are strings to tokenize or ids to insert as they are; strings are split at each
        # placeholder (None marks an image) and tokenized in one batched call.
        pieces: list[tuple[str | int | None, bool]] = []
        for content, is_target in self._chunks(sample, prompt_only):
            if isinstance(content, int):
                pieces.append((content, is_target))
                continue
            for index, part in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if index:
                    pieces.append((None, False))
                if part:
                    pieces.append((part, is_target))
        texts = [content for content, _ in pieces if isinstance(content, str)]
        encoded = iter(self._encode(texts))
        ids: list[int] = []
        targets: list[bool] = []
        positions: list[int] = []
        for content, is_target in pieces:
            if content is None:
                positions.append(len(ids))
            elif isinstance(content, int):
                ids.append(content)
                targets.append(is_target)
            else:
                piece_ids = next(encoded)
                ids.extend(piece_ids)
                targets.extend([is_target] * len(piece_ids))
        return TokenizedText(ids, targets, positions)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            # The Rust tokenizer directly: 5x less overhead than the Python wrapper for the few
            # short pieces of one sample (batch encoding hands them to a thread pool).
            return [self.backend.encode(text, add_special_tokens=False).ids for text in texts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _chunks(self, sample: dict, prompt_only: bool) -> list[tuple[str | int, bool]]:
        bos = [(self.bos_id, False)] if self.bos_id is not None else []
        text = sample.get("text") or ""
        if text.strip() and not prompt_only:
            return [*bos, (text, True), (self.eos_id, True)]
        messages = sample.get("messages") or []
        if not isinstance(messages, list):
            raise DecodeError("invalid_record", "messages is not a list")
        roles = ("system", "user", "assistant") if self.use_chat_template else tuple(ROLE_TOKENS)
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DecodeError("invalid_record", "a message without string content")
            if message.get("role") not in roles:
                raise DecodeError(
                    "invalid_record",
                    f"role {message.get('role')!r} (valid with this tokenizer: {', '.join(roles)})",
                )
        if not any(message["content"].strip() for message in messages):
            raise DecodeError("empty", "no text and no non-blank message")
        if prompt_only:
            if messages[-1]["role"] != "assistant":
                raise DecodeError("invalid_record", "a prompt needs a final assistant turn")
            messages = messages[:-1]
        if self.use_chat_template:
            return self._template_chunks(messages, prompt_only)
        chunks = list(bos)
        for message in messages:
            is_target = message["role"] == "assistant"
            chunks.append((self.role_ids[message["role"]], False))
            chunks.append((message["content"], is_target))
            if is_target:
                chunks.append((self.eos_id, True))
        if prompt_only:
            chunks.append((self.role_ids["assistant"], False))
        return chunks

    def _template_chunks(self, messages: list[dict], prompt_only: bool) -> list[tuple[str, bool]]:
        import jinja2

        def render(prefix: list[dict], generation_prompt: bool = False) -> str:
            return self.tokenizer.apply_chat_template(
                prefix, tokenize=False, add_generation_prompt=generation_prompt
            )

        chunks: list[tuple[str, bool]] = []
        rendered = ""

        def extend(longer: str, is_target: bool) -> str:
            if not longer.startswith(rendered):
                raise DecodeError(
                    "chat_template", "the template does not render the conversation prefix-wise"
                )
            chunks.append((longer[len(rendered) :], is_target))
            return longer

        try:
            for index, message in enumerate(messages):
                is_target = message["role"] == "assistant"
                if is_target:  # the assistant header is the generation prompt: no loss on it
                    rendered = extend(render(messages[:index], generation_prompt=True), False)
                rendered = extend(render(messages[: index + 1]), is_target)
            if prompt_only:
                rendered = extend(render(messages, generation_prompt=True), False)
        except DecodeError:
            raise
        except (jinja2.TemplateError, ValueError, TypeError, IndexError, KeyError) as err:
            raise DecodeError("chat_template", f"{type(err).__name__}: {err}") from None
        return chunks


@dataclass
class Document:
    sample_id: str
    input_ids: torch.Tensor  # int64 (n,); image positions hold the pad id
    target_mask: torch.Tensor  # bool (n,): token t is a text-loss target (predicted at t - 1)
    segments: list[tuple[str, int]]  # ("text" | "image", length), in order
    # uint8, float if already normalized: (num_images, 3, H, W) for square images; at native
    # resolution each image's (3, H, W) flattened, image after image
    pixel_values: torch.Tensor
    image_mask: torch.Tensor  # bool (num_image_tokens,): replaced by the mask embedding
    image_span_full: torch.Tensor  # bool (num_image_tokens,): the token's span is masked entirely
    # (rows, cols) of each image's full grid and of each image segment; None: square images,
    # read off the segments (each span a square, else one row; the largest the full grid)
    image_grids: list[tuple[int, int]] | None = None
    span_grids: list[tuple[int, int]] | None = None
    # Image segments hold a row-break token after every row but the last (true: rows · cols +
    # rows - 1 tokens) or after every row ("all": rows · cols + rows), `model.image_row_break`;
    # the breaks are text tokens inside the span's bidirectional block.
    row_breaks: bool | str = False
    # (rows, cols) of image_size tiles of each LLaVA-NeXT tiled image, (0, 0) for the others;
    # None: none is tiled (`PackedBatch.image_tiles`)
    image_tiles: list[tuple[int, int]] | None = None
    # The position of each image's start marker (with image_markers true or "start"): where a
    # cross-attention design's image stands in the sequence, its <|image|> token.
    image_anchors: list[int] | None = None

    def __post_init__(self):
        if self.span_grids is None:
            lengths = [n for kind, n in self.segments if kind == "image"]
            self.span_grids = [
                (math.isqrt(n), math.isqrt(n)) if math.isqrt(n) ** 2 == n else (1, n)
                for n in lengths
            ]
        if self.image_grids is None:
            full = max(self.span_grids, default=(0, 0))
            num_images = self.pixel_values.shape[0] if self.pixel_values.dim() == 4 else 0
            self.image_grids = [full] * num_images
        if self.image_tiles is None:
            self.image_tiles = [(0, 0)] * len(self.image_grids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


class Shown(NamedTuple):
    """One image of the sequence: before text token `position`, after the text ids `before` and
    followed by `after`; `load()` gives its uint8 (3, H, W) pixels; `tiles`: the tile rows and
    cols of a LLaVA-NeXT or LLaMA-3.2-Vision tiled image, (0, 0) for any other."""

    position: int
    before: list[int]
    after: list[int]
    load: Callable[[], np.ndarray]
    grid: tuple[int, int]
    tiles: tuple[int, int] = (0, 0)


class SampleDecoder:
    def __init__(
        self,
        tokenizer,
        model_cfg: ModelConfig,
        max_tokens: int,
        seed: int = 0,
        max_image_pixels: int = 0,
    ):
        self.renderer = ChatRenderer(tokenizer)
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.max_tokens = max_tokens
        self.max_image_pixels = max_image_pixels
        # Counter-based: each sample's draws come from its own counter range (`_sample_rng`).
        self._key = np.array([seed % (1 << 64), 0], dtype=np.uint64)
        self._bit_generator = np.random.Philox(key=self._key)
        self._rng = np.random.Generator(self._bit_generator)
        ids = tokenizer.convert_tokens_to_ids
        vocab = tokenizer.get_vocab()
        missing = [token for token in image_tokens_used(model_cfg) if token not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no {missing[0]!r} token (load_tokenizer(path, model_cfg) "
                "adds the image tokens the model config names)"
            )
        self.image_start_id = ids(model_cfg.image_start_token)  # used only with its marker
        self.image_end_id = ids(model_cfg.image_end_token)
        self.row_break_id = None
        if model_cfg.image_row_break:
            self.row_break_id = ids(model_cfg.image_row_break_token)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._tile_ids: dict[str, list[int]] = {}  # the tokens of each piece of tile text

    def __call__(
        self, sample: dict, sample_index: int, epoch: int = 0, prompt_only: bool = False
    ) -> Document:
        """Decode for training; with `prompt_only` (inference), end at the assistant's generation
        prompt instead of its final turn, and mask nothing."""
        rng = self._sample_rng(epoch, sample_index)
        if self.model_cfg.grounding:
            sample = self.with_box_bins(sample)
        text = self.renderer(sample, prompt_only)
        try:
            blobs = unpack_blobs(sample.get("images") or b"")
        except ValueError as err:
            raise DecodeError("image_corrupt", str(err)) from None
        if len(text.image_positions) > len(blobs):
            raise DecodeError(
                "image_missing", f"{len(text.image_positions)} <image>, {len(blobs)} images"
            )
        if len(text.image_positions) < len(blobs):
            raise DecodeError(
                "image_unused", f"{len(blobs)} images, {len(text.image_positions)} <image>"
            )
        cfg = self.model_cfg
        opened = [open_image(blob, self.max_image_pixels) for blob in blobs]
        try:
            # Every image of the sequence (`Shown`); a tiled image is several.
            shown: list[Shown] = []
            for position, image in zip(text.image_positions, opened, strict=True):
                shown += self._show(image, position)
            grids = [view.grid for view in shown]
            spans = [cfg.image_spans(grid) for grid in grids]
            num_markers = cfg.num_image_markers
            num_tokens = len(text.ids) + sum(
                len(view.before) + cfg.num_image_tokens(view.grid) + num_markers + len(view.after)
                for view in shown
            )
            num_tokens += sum(
                cfg.num_row_breaks(rows) for image_spans in spans for (rows, _), _ in image_spans
            )
            if num_tokens > self.max_tokens:
                raise DecodeError(
                    "too_long", f"{num_tokens} tokens > data.max_tokens={self.max_tokens}"
                )
            images = [view.load() for view in shown]
        finally:
            for image in opened:
                image.close()

        ids: list[int] = []
        targets: list[bool] = []
        segments: list[tuple[str, int]] = []
        run_start = cursor = 0
        opens_document = False  # the first image's first token is the document's first
        anchors = []
        for view, image_spans in zip(shown, spans, strict=True):
            ids.extend(text.ids[cursor : view.position])
            targets.extend(text.targets[cursor : view.position])
            cursor = view.position
            ids.extend(view.before)
            if cfg.image_start_marker:
                anchors.append(len(ids))
                ids.append(self.image_start_id)
            opens_document = opens_document or not ids
            if len(ids) > run_start:  # without markers an image can open the document
                segments.append(("text", len(ids) - run_start))
            for (rows, cols), _ in image_spans:
                if self.row_break_id is None:
                    span = [self.pad_id] * rows * cols
                else:  # a break after every row (but the last, unless "all"), inside the span
                    span = ([self.pad_id] * cols + [self.row_break_id]) * rows
                    del span[len(span) - (rows - cfg.num_row_breaks(rows)) :]
                ids.extend(span)
                segments.append(("image", len(span)))
            run_start = len(ids)  # <image_end> and the text after the image open the next segment
            if cfg.image_end_marker:
                ids.append(self.image_end_id)
            ids.extend(view.after)
            targets.extend([False] * (len(ids) - len(targets)))
        ids.extend(text.ids[cursor:])
        targets.extend(text.targets[cursor:])
        if len(ids) > run_start:
            segments.append(("text", len(ids) - run_start))
        masks = [
            self._sample_mask(rows * cols, rng, is_copy or prompt_only)
            for image_spans in spans
            for (rows, cols), is_copy in image_spans
        ]
        if opens_document:
            # The first image token is predicted at the position before it, outside the document.
            masks[0][0] = False
        # Built in numpy, made tensors once at the end: a handful of torch calls per sample
        # instead of a few per span (each costs microseconds; this runs for every sample).
        if cfg.vision.flat_pixels:
            pixels = np.concatenate([image.ravel() for image in images] or [np.zeros(0, np.uint8)])
        else:
            shape = (0, 3, *cfg.pixel_shape(cfg.square_grid))  # a document without images
            if cfg.vision.tiling == "mllama":  # a row of tile slots an image
                shape = (0, 3, shape[2], shape[3] * cfg.vision.max_num_tiles)
            pixels = np.stack(images) if images else np.zeros(shape, dtype=np.uint8)
        image_mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
        span_full = (
            np.concatenate([np.full(mask.size, mask.all()) for mask in masks])
            if masks
            else np.zeros(0, dtype=bool)
        )
        return Document(
            sample_id=sample.get("id") or str(sample_index),
            input_ids=torch.from_numpy(np.array(ids, dtype=np.int64)),
            target_mask=torch.from_numpy(np.array(targets, dtype=bool)),
            segments=segments,
            pixel_values=torch.from_numpy(pixels),
            image_mask=torch.from_numpy(image_mask),
            image_span_full=torch.from_numpy(span_full),
            image_grids=grids,
            span_grids=[grid for image_spans in spans for grid, _ in image_spans],
            row_breaks=cfg.image_row_break,
            image_tiles=[view.tiles for view in shown],
            image_anchors=anchors,
        )

    def with_box_bins(self, sample: dict) -> dict:
        """The sample with its boxes' pixel corners as bins of their images' sizes
        (`normalize_boxes`); the stored `image_sizes`, else the images' own."""
        text, messages = sample.get("text") or "", sample.get("messages") or []
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            return sample  # the renderer names what is wrong
        sizes = sample.get("image_sizes")
        if not sizes:
            try:
                blobs = unpack_blobs(sample.get("images") or b"")
            except ValueError as err:
                raise DecodeError("image_corrupt", str(err)) from None
            sizes = [list(check_image(blob, self.max_image_pixels)) for blob in blobs]
        try:
            new_text, *contents = normalize_boxes(
                [text, *(m["content"] for m in messages)], sizes, IMAGE_PLACEHOLDER
            )
        except ValueError as err:
            raise DecodeError("invalid_record", str(err)) from None
        new_messages = [{**m, "content": c} for m, c in zip(messages, contents, strict=True)]
        return {**sample, "text": new_text, "messages": new_messages}

    def _show(self, image: Image.Image, position: int) -> list[Shown]:
        """The images of the sequence that `image`, placed before text token `position`, is
        (`SHOW_BY_TILING` by `model.vision.tiling`)."""
        return SHOW_BY_TILING[self.model_cfg.vision.tiling](self, image, position)

    def _show_whole(self, image: Image.Image, position: int) -> list[Shown]:
        """Untiled: the image itself, on its grid."""
        grid = self._grid(image)
        return [Shown(position, [], [], lambda: self._load_image(image, grid), grid)]

    def _show_idefics3(self, image: Image.Image, position: int) -> list[Shown]:
        """Idefics3's splitting (`VisionConfig.tile_grid`): each tile, row-major, then the global
        view, with the design's text around them (`TILE_TEXTS`)."""
        cfg = self.model_cfg
        tiling = TILE_TEXTS[cfg.vision.tiling]
        size = cfg.vision.image_size
        rows, cols = cfg.vision.tile_grid(*self._displayed(image))
        pieces = [self._tile_text_ids(piece) for piece in tiling.pieces(rows, cols)]
        tiled: list[np.ndarray] = []  # (3, rows · size, cols · size), loaded by the first tile

        def tile(row: int, col: int) -> np.ndarray:
            if not tiled:
                tiled.append(image_to_rgb(image, (cols * size, rows * size)).transpose(2, 0, 1))
            return tiled[0][:, row * size : (row + 1) * size, col * size : (col + 1) * size]

        def global_view() -> np.ndarray:
            if not tiled:  # a single tile: the image itself at the tile size
                return image_to_rgb(image, (size, size)).transpose(2, 0, 1)
            # Resized from the tiled image, as Idefics3's processor does.
            return _resize(tiled[0].transpose(1, 2, 0), (size, size)).transpose(2, 0, 1)

        grid = cfg.square_grid
        shown = [
            Shown(position, pieces[row * cols + col], [], lambda r=row, c=col: tile(r, c), grid)
            for row in range(rows)
            for col in range(cols)
        ]
        return [*shown, Shown(position, pieces[-2], pieces[-1], global_view, grid)]

    def _show_llava_next(self, image: Image.Image, position: int) -> list[Shown]:
        """LLaVA-NeXT's any-res (`VisionConfig.llava_next_layout`): the whole image at image_size
        (the base), then the image resized into its best pinpoint, padded with black around the
        centre, as one tiled image whose grid is the kept tokens plus the newline column."""
        cfg = self.model_cfg
        size, displayed = cfg.vision.image_size, self._displayed(image)
        tiles, resized, (left, top), (rows, cols) = cfg.vision.llava_next_layout(*displayed)
        full: list[np.ndarray] = []  # decoded once at full size: both views resize from it

        def decoded() -> np.ndarray:
            if not full:
                full.append(image_to_rgb(image, displayed))
            return full[0]

        def padded() -> np.ndarray:
            canvas = np.zeros((3, tiles[0] * size, tiles[1] * size), dtype=np.uint8)
            width, height = resized
            pixels = decoded()
            if pixels.shape[:2] != (height, width):
                pixels = _resize(pixels, resized)
            canvas[:, top : top + height, left : left + width] = pixels.transpose(2, 0, 1)
            return canvas

        def base() -> np.ndarray:
            return _resize(decoded(), (size, size)).transpose(2, 0, 1)

        return [
            Shown(position, [], [], base, cfg.square_grid),
            Shown(position, [], [], padded, (rows, cols + 1), tiles),
        ]

    def _show_mllama(self, image: Image.Image, position: int) -> list[Shown]:
        """LLaMA-3.2-Vision's tiling (`VisionConfig.mllama_canvas`): the image resized into its
        canvas of tiles, black below and right of it, the tiles (row-major) side by side in
        one row of max_num_tiles tile slots, the slots past its tiles black (the tower zeroes
        them after normalization, as its processor pads)."""
        vision = self.model_cfg.vision
        size, slots = vision.image_size, vision.max_num_tiles
        (rows, cols), (width, height) = vision.mllama_canvas(*self._displayed(image))

        def tiles() -> np.ndarray:
            canvas = np.zeros((3, rows * size, cols * size), dtype=np.uint8)
            canvas[:, :height, :width] = image_to_rgb(image, (width, height)).transpose(2, 0, 1)
            strip = np.zeros((3, size, slots * size), dtype=np.uint8)
            split = canvas.reshape(3, rows, size, cols, size).transpose(0, 2, 1, 3, 4)
            strip[:, :, : rows * cols * size] = split.reshape(3, size, rows * cols * size)
            return strip

        return [Shown(position, [], [], tiles, self.model_cfg.square_grid, (rows, cols))]

    def _tile_text_ids(self, piece: str) -> list[int]:
        if piece not in self._tile_ids:
            self._tile_ids[piece] = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return self._tile_ids[piece]

    def _displayed(self, image: Image.Image) -> tuple[int, int]:
        try:
            return displayed_size(image)
        except Exception as err:  # a PNG's EXIF may sit behind truncated pixel data
            raise DecodeError("image_corrupt", f"{type(err).__name__}: {err}") from None

    def _grid(self, image: Image.Image) -> tuple[int, int]:
        """The image's full token grid (`ModelConfig.image_grid` of its displayed size)."""
        size = self._displayed(image)
        try:
            return self.model_cfg.image_grid(*size)
        except ValueError as err:  # an aspect ratio a grid rule refuses
            raise DecodeError("image_corrupt", str(err)) from None

    def _sample_rng(self, epoch: int, sample_index: int) -> np.random.Generator:
        """The random stream of one sample in one epoch, whichever process decodes it.

        Philox is counter-based: the key is the seed, and (epoch, sample) fill the two high
        words of the 256-bit counter, so every sample starts a range of 2^128 blocks no other
        sample reaches. Setting the state is much cheaper than seeding a generator per sample
        (`default_rng([seed, epoch, index])`), which runs for every sample decoded."""
        self._bit_generator.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.array([0, 0, epoch, sample_index], dtype=np.uint64),
                "key": self._key,  # the setter copies what it is given
            },
            "buffer": _PHILOX_EMPTY_BUFFER,
            "buffer_pos": 4,  # the buffer is empty: the next draw computes a fresh block
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._rng

    def _sample_mask(self, num_tokens: int, rng: np.random.Generator, unmasked: bool) -> np.ndarray:
        # Every random number is drawn whether or not it is used, so the stream of draws does
        # not depend on which spans are dual copies.
        rate = rng.uniform(self.model_cfg.mask_rate_min, self.model_cfg.mask_rate_max)
        if rng.uniform() < self.model_cfg.full_mask_prob:
            rate = 1.0
        if unmasked:
            rate = 0.0
        num_masked = int(round(rate * num_tokens))
        mask = np.zeros(num_tokens, dtype=bool)
        mask[rng.permutation(num_tokens)[:num_masked]] = True
        return mask

    def _load_image(self, image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
        """uint8 (3, rows · t, cols · t) for image tokens of t pixels a side (`pixel_shape`),
        channels first (a view); the model normalizes (a quarter of the bytes of float32 on the
        way out of a loader worker and to the device)."""
        height, width = self.model_cfg.pixel_shape(grid)
        return image_to_rgb(image, (width, height)).transpose(2, 0, 1)


# `model.vision.tiling` → how the decoder shows an image (`SampleDecoder._show`).
SHOW_BY_TILING = {
    "none": SampleDecoder._show_whole,
    "idefics3": SampleDecoder._show_idefics3,
    "llava_next": SampleDecoder._show_llava_next,
    "mllama": SampleDecoder._show_mllama,
}
assert tuple(SHOW_BY_TILING) == TILINGS, "update models.config as well"
