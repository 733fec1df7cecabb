"""Pack a rank's step batch into micro-batches of at most `max_tokens` tokens, no padding.

Every rank must run the same number of forward/backward passes per step (FSDP and ZeRO-3 hang
otherwise), so the micro-batch count M is agreed across ranks before packing: ranks that need
fewer split their bins further. No sample is dropped or split across micro-batches.

Before packing, `balance_ranks` may move whole documents between ranks so that every rank carries
about the same number of tokens (the step waits for its slowest rank). The global batch, and so
the gradient, is the same whichever rank runs a document: every loss is normalized by the global
count of its targets.

Skipped samples leave a rank with fewer documents, possibly none. Such a rank still runs M
micro-batches: when it has fewer documents than M, the rest are `filler_micro_batch()`es — one
token, no loss targets, so they add nothing to the loss or the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from models.attention import PackedLayout
from models.batch import IGNORE_INDEX, PackedBatch
from models.config import row_breaks_in_span
from models.cross_attention import packed_cross_layout
from trainer.data.decode import Document


def plan_micro_batches(lengths: list[int], max_tokens: int, min_bins: int = 1) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices, then split the fullest bins up to `min_bins`."""
    too_long = [n for n in lengths if n > max_tokens]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens exceeds data.max_tokens={max_tokens}")
    if min_bins > len(lengths):
        raise ValueError(f"cannot make {min_bins} micro-batches from {len(lengths)} samples")
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, load in enumerate(loads):
            if load + lengths[index] <= max_tokens:
                bins[b].append(index)
                loads[b] += lengths[index]
                break
        else:
            bins.append([index])
            loads.append(lengths[index])
    while len(bins) < min_bins:
        # Split the fullest bin that has more than one sample; halves keep FFD order.
        b = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: loads[b])
        members = bins.pop(b)
        loads.pop(b)
        for half in (members[0::2], members[1::2]):
            bins.append(half)
            loads.append(sum(lengths[i] for i in half))
    return [sorted(b) for b in bins]


def plan_rank_balance(lengths: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Who runs which document: per rank, the (source rank, index) of its documents after
    moving whole documents from the most to the least loaded rank while that lowers the larger
    of the two loads (each move takes the document that best evens them). Deterministic: every
    rank computes the same plan from the same gathered lengths."""
    owned = [[(rank, i) for i in range(len(ls))] for rank, ls in enumerate(lengths)]
    loads = [sum(ls) for ls in lengths]

    def length(key: tuple[int, int]) -> int:
        return lengths[key[0]][key[1]]

    # Each move lowers the sum of squared loads, so this ends; the cap is a guard.
    for _ in range(sum(map(len, lengths))):
        heavy = max(range(len(loads)), key=lambda r: (loads[r], -r))
        light = min(range(len(loads)), key=lambda r: (loads[r], r))
        gap = loads[heavy] - loads[light]
        movable = [key for key in owned[heavy] if 0 < length(key) < gap]
        if not movable:
            break
        key = min(movable, key=lambda k: (abs(gap - 2 * length(k)), k))
        owned[heavy].remove(key)
        owned[light].append(key)
        loads[heavy] -= length(key)
        loads[light] += length(key)
    return [sorted(keys) for keys in owned]


def balance_ranks(
    docs: list[Document], rank: int, all_gather_object: Callable[[object], list]
) -> list[Document]:
    """This rank's documents after evening out tokens over ranks (`plan_rank_balance`): one
    gather of lengths, and one of the documents that move when any do."""
    lengths = all_gather_object([doc.num_tokens for doc in docs])
    if len(lengths) == 1:
        return docs
    plan = plan_rank_balance(lengths)
    moving = {key for r, keys in enumerate(plan) for key in keys if key[0] != r}
    if not moving:
        return docs
    outgoing = [(i, doc) for i, doc in enumerate(docs) if (rank, i) in moving]
    arrived = {
        (source, i): doc
        for source, sent in enumerate(all_gather_object(outgoing))
        for i, doc in sent
    }
    return [docs[i] if source == rank else arrived[(source, i)] for source, i in plan[rank]]


def layout_options(model_cfg, device: torch.device | str | None = None) -> dict:
    """The model settings packing depends on, as keyword arguments for `pack_step`/`collate`.
    With the `device` the micro-batches go to, `auto` attention plans only what it will run
    there (on a CPU: sdpa; a GPU keeps both plans, the kernel is chosen per call)."""
    backend = model_cfg.attention_backend
    if backend == "auto" and device is not None and torch.device(device).type != "cuda":
        backend = "sdpa"
    cross_keys = None
    if model_cfg.cross_attention_layers:
        cross_keys = (model_cfg.cross_attention_style, *model_cfg.cross_keys_per_image)
    return {
        "image_attention": model_cfg.image_attention,
        "image_positions": model_cfg.image_positions,
        "attention_backend": backend,
        "cross_attention_keys": cross_keys,
    }


def pack_step(
    docs: list[Document],
    max_tokens: int,
    agree_num_micro_batches: Callable[[int], int] = lambda m: m,
    image_attention: str = "bidirectional",
    image_positions: str = "sequential",
    attention_backend: str | None = None,
    cross_attention_keys: tuple[str, int, int] | None = None,
) -> list[PackedBatch]:
    """Micro-batches for one rank's step. `agree_num_micro_batches` is the cross-rank max.

    Always at least one micro-batch per rank, even when every sample of the step was skipped."""
    lengths = [d.num_tokens for d in docs]
    bins = plan_micro_batches(lengths, max_tokens) if docs else []
    num_micro_batches = agree_num_micro_batches(max(len(bins), 1))
    num_fillers = max(num_micro_batches - len(docs), 0)
    if num_micro_batches != len(bins) and docs:
        bins = plan_micro_batches(lengths, max_tokens, min(num_micro_batches, len(docs)))
    options = (image_attention, image_positions, attention_backend, cross_attention_keys)
    micro_batches = [collate([docs[i] for i in b], *options) for b in bins]
    micro_batches += [filler_micro_batch(docs, *options) for _ in range(num_fillers)]
    assert len(micro_batches) == num_micro_batches
    return micro_batches


def filler_micro_batch(docs: list[Document], *layout_args) -> PackedBatch:
    """One pad token, no targets: a forward/backward pass that contributes zero loss."""
    like = docs[0].pixel_values if docs else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    filler = Document(
        sample_id="<filler>",
        input_ids=torch.zeros(1, dtype=torch.long),
        target_mask=torch.zeros(1, dtype=torch.bool),
        segments=[("text", 1)],
        pixel_values=like[:0],
        image_mask=torch.zeros(0, dtype=torch.bool),
        image_span_full=torch.zeros(0, dtype=torch.bool),
    )
    return collate([filler], *layout_args)


def collate(
    docs: list[Document],
    image_attention: str = "bidirectional",
    image_positions: str = "sequential",
    attention_backend: str | None = None,
    cross_attention_keys: tuple[str, int, int] | None = None,
) -> PackedBatch:
    """One micro-batch of `docs`. `cross_attention_keys` (the layout's style, keys a tile
    slot, tile slots an image): the images are cross-attended (`layout_options`), each at its
    start marker."""
    if len({doc.pixel_values.dtype for doc in docs}) > 1:
        raise ValueError("documents mix uint8 and normalized float pixels; decode them alike")
    merged_docs, text_docs, image_docs = [], [], []
    # (start in packed coordinates, grid, row breaks in it) of every image span
    image_spans: list[tuple[int, tuple[int, int], int]] = []
    segment_is_image, segment_lengths, row_break_positions = [], [], []
    offset = 0
    for doc in docs:
        assert sum(n for _, n in doc.segments) == doc.num_tokens
        merged_docs.append(attention_segments(doc, image_attention))
        prefix_end = _prefix_length(doc) if image_attention == "prefix" else 0
        num_text, start = 0, 0
        span_grids = iter(doc.span_grids)
        for kind, length in doc.segments:
            bidirectional = image_attention == "bidirectional" or start < prefix_end
            image_kind = "image" if bidirectional else "text"
            start += length
            if kind == "image":
                rows, cols = next(span_grids)
                # Row breaks sit inside the span's bidirectional block but are text tokens.
                num_breaks = row_breaks_in_span(rows, doc.row_breaks)
                image_spans.append((offset, (rows, cols), num_breaks))
                row_break_positions += [
                    offset + (r + 1) * (cols + 1) - 1 for r in range(num_breaks)
                ]
                image_docs.append([(image_kind, length - num_breaks)])
                num_text += num_breaks
            else:
                num_text += length
            segment_is_image.append(kind == "image")
            segment_lengths.append(length)
            offset += length
        if num_text:
            text_docs.append([("text", num_text)])
    # Whole-batch ops from here on: per-document tensor calls were most of packing's time.
    layout = PackedLayout.from_docs(merged_docs, attention_backend)
    input_ids = torch.cat([d.input_ids for d in docs])
    target_mask = torch.cat([d.target_mask for d in docs])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = torch.where(target_mask[1:], input_ids[1:], IGNORE_INDEX)
    # Labels never cross a document boundary: the last token of a document predicts nothing.
    labels[layout.cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    # In numpy: packing may run beside the model's compute (the step prefetcher), where torch ops
    # that fan out to the intra-op thread pool would compete with it for the same threads.
    is_image = np.repeat(np.array(segment_is_image, dtype=bool), segment_lengths)
    is_image[row_break_positions] = False
    cross_layout = cross_key_index = None
    if cross_attention_keys is not None and any(doc.image_anchors for doc in docs):
        style, keys_per_slot, slots = cross_attention_keys
        own_tiles = [max(rows * cols, 1) for doc in docs for rows, cols in doc.image_tiles]
        cross_layout, cross_key_index = packed_cross_layout(
            style,
            [(doc.num_tokens, doc.image_anchors or []) for doc in docs],
            keys_per_slot,
            slots,
            own_tiles,
        )
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        layout=layout,
        rope_positions=rope_positions(layout.position_ids, image_spans, image_positions),
        text_index=torch.from_numpy(np.flatnonzero(~is_image)),
        text_layout=PackedLayout.from_docs(text_docs, attention_backend) if text_docs else None,
        image_index=torch.from_numpy(np.flatnonzero(is_image)),
        image_layout=PackedLayout.from_docs(image_docs, attention_backend) if image_docs else None,
        pixel_values=torch.cat([d.pixel_values for d in docs]),
        image_grids=[grid for d in docs for grid in d.image_grids],
        image_tiles=[tiles for d in docs for tiles in d.image_tiles],
        image_mask=torch.cat([d.image_mask for d in docs]),
        image_span_full=torch.cat([d.image_span_full for d in docs]),
        sample_ids=[d.sample_id for d in docs],
        cross_layout=cross_layout,
        cross_key_index=cross_key_index,
    )


def _prefix_length(doc: Document) -> int:
    """The document's prefix under prefix-LM attention: every token before its first loss
    target (the images and the user turn before the first answer; all of it without targets)."""
    targets = doc.target_mask.nonzero()
    return int(targets[0]) if len(targets) else doc.num_tokens


def attention_segments(doc: Document, image_attention: str) -> list[tuple[str, int]]:
    """The document's `PackedLayout` segments: "bidirectional" makes every image span an
    "image" (bidirectional) block, "causal" none; "prefix" (PaliGemma's prefix-LM) makes the
    prefix (`_prefix_length`: images and text tokens alike, which stay text tokens of the text
    stream) one bidirectional block and everything after it causal, later images too."""
    if image_attention != "prefix":
        image_kind = "image" if image_attention == "bidirectional" else "text"
        return [(image_kind if kind == "image" else "text", n) for kind, n in doc.segments]
    prefix = _prefix_length(doc)
    segments = [("image", prefix)] if prefix else []
    if prefix < doc.num_tokens:
        segments.append(("text", doc.num_tokens - prefix))
    return segments


def rope_positions(
    position_ids: torch.Tensor, image_spans: list[tuple[int, tuple[int, int], int]], mode: str
) -> torch.Tensor:
    """RoPE positions: (T, 2), or (T, 3) for "mrope". Text uses its 1-D position on every axis
    (so a pretrained LLM sees exactly its own RoPE); image spans, given as (start, (rows, cols),
    number of row breaks), follow `mode` ("shared" and "collapsed": every token at the span's
    first position; "2d": the span's first position plus each token's row on one axis and column
    on the other, a row break one column past its row's end). Text after an image continues at
    its own sequential position, but for "collapsed" (CogVLM), where the rest of the document
    continues one past the span, and for "mrope" (Qwen2-VL), whose axes are (time, row, column):
    the image's tokens are at (first, first + row, first + column) and the rest of its document
    continues one past the largest of them."""
    positions = position_ids[:, None].repeat(1, 3 if mode == "mrope" else 2)
    if mode == "sequential":
        return positions
    if mode in ("mrope", "collapsed"):
        doc_starts = (position_ids == 0).nonzero().squeeze(1).tolist() + [len(position_ids)]
    for start, (rows, cols), num_breaks in image_spans:
        stride = cols + (num_breaks > 0)  # tokens per row, its break included
        first, length = int(positions[start, 0]), rows * cols + num_breaks
        if mode in ("shared", "collapsed"):
            positions[start : start + length] = first
            if mode == "collapsed":
                end = next(s for s in doc_starts if s > start)
                positions[start + length : end] -= length - 1
            continue
        offsets = torch.arange(length)
        positions[start : start + length, -2] = first + offsets // stride
        positions[start : start + length, -1] = first + offsets % stride
        if mode == "mrope":
            positions[start : start + length, 0] = first
            end = next(s for s in doc_starts if s > start)
            positions[start + length : end] -= length - max(rows, stride)
    return positions
