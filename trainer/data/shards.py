"""The MDS sample schema every shard writer produces and every reader expects.

One sample is either plain text (`text`, loss on every token) or a conversation (`messages`, a list
of {"role": "user" | "assistant", "content": str}; loss on assistant turns; "system" turns need a
tokenizer with a chat template). An `<image>` in the text marks where the next image goes. Images
are stored as their encoded file bytes, unchanged; `image_sizes` holds [width, height] per image.
`num_text_tokens` counts the document's tokens except the contents of its image spans (whose
length depends on the model): exact when the shards were written with the training tokenizer,
else `estimate_text_tokens`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"

MDS_COLUMNS = {
    "id": "str",
    "text": "str",
    "messages": "json",
    # Several encoded images in one column: MDS has no list-of-bytes type, and pickle is not an
    # option for data read by training jobs.
    "images": "bytes",
    "image_sizes": "json",
    "num_text_tokens": "int",
}

# Bytes of samples per shard before compression (mosaicml-streaming's own default).
SHARD_SIZE_LIMIT = 1 << 26
SHARD_HASHES = ["xxh64"]  # checked by readers with validate_hash
# Images with more pixels are skipped at shard and decode time (a decompression-bomb guard).
MAX_IMAGE_PIXELS = 1 << 26

_LENGTH = struct.Struct("<I")


def pack_blobs(blobs: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(blob)) + blob for blob in blobs)


def unpack_blobs(data: bytes) -> list[bytes]:
    blobs, offset = [], 0
    while offset < len(data):
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + size > len(data):
            raise ValueError("truncated image blob")
        blobs.append(data[offset : offset + size])
        offset += size
    return blobs


def write_shards(
    out: Path,
    samples: Iterable[dict],
    compression: str | None = "zstd",
    size_limit: int = SHARD_SIZE_LIMIT,
) -> int:
    """Write `samples` (dicts with MDS_COLUMNS keys, `images` as a list of bytes) to MDS at `out`;
    returns how many. The one writer of shards: the demo and every format converter use it."""
    from streaming import MDSWriter

    count = 0
    with MDSWriter(
        out=str(out),
        columns=MDS_COLUMNS,
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=size_limit,
    ) as writer:
        for sample in samples:
            writer.write({**sample, "images": pack_blobs(sample["images"])})
            count += 1
    return count


def estimate_text_tokens(sample: dict) -> int:
    """Whitespace-separated words plus the markers the default rendering adds: bos, eos (plain
    text) or one role token per turn and an eos per assistant turn, and begin/end per image.

    Exact for a word-level tokenizer such as the demo's; a subword tokenizer typically gives
    1.3-2x more tokens for English text. Used when shards are written without `--tokenizer`.
    """
    num_images = len(sample.get("images") or [])
    if sample.get("text"):
        words = len(sample["text"].replace(IMAGE_PLACEHOLDER, " ").split())
        return words + 2 + 2 * num_images
    messages = sample.get("messages") or []
    words = sum(len(m["content"].replace(IMAGE_PLACEHOLDER, " ").split()) for m in messages)
    num_assistant = sum(m["role"] == "assistant" for m in messages)
    return 1 + words + len(messages) + num_assistant + 2 * num_images


def check_split_dir(path: Path) -> None:
    """Raise ValueError (one line) unless `path` holds an MDS index with at least one sample."""
    index = path / "index.json"
    if not path.exists():
        raise ValueError(f"data directory not found: {path}")
    if not index.is_file():
        raise ValueError(f"no MDS shards in {path} (index.json is missing)")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (json.JSONDecodeError, KeyError):
        raise ValueError(f"{index} is not a valid MDS index") from None
    if sum(shard.get("samples", 0) for shard in shards) == 0:
        raise ValueError(f"no samples in {path}")
