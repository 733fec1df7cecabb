"""Packed cross-attention: the queries of a packed sequence attend to a separate stream of image
tokens, as the gated cross-attention layers of LLaMA-3.2-Vision and Flamingo do.

The queries are a micro-batch's flat sequence (T_q tokens); the keys and values are the flat
stream of its images' tokens (T_k), image after image. Each image is seen by a range of
queries (`CrossLayout.from_ranges`): LLaMA-3.2-Vision's rule (`mllama_query_ranges`) is that
an image is seen from its `<|image|>` token up to the next image's, and consecutive images
together up to the text after them; Flamingo's is the latest preceding image. The images a
query sees must be contiguous in the stream, so its visible keys are one interval
[key_start, key_end), empty for a query that sees no image (its output row is zero).
transformers' LLaMA-3.2-Vision lets a query that sees no image attend to every image of its
row instead, and zeroes only its MLP output (`full_text_row_masked_out_mask`): `blind` ranges
give such queries keys to attend to, and `sees_image` marks the queries that see an image of
their own. Runs of queries that see the same interval are the layout's segments:

    layout = CrossLayout.from_ranges(num_queries=12, num_keys=20, images=[(0, 16, 3, 12)])
    out_QHD = cross_attention(q_QHD, k_KHD, v_KHD, layout, backend="sdpa")

The layout is planned once, on the host, for every backend, so layers never sync with it and
no T_q × T_k mask exists anywhere. Backends, equal up to fp32 rounding (outputs and
gradients):
- "sdpa": one SDPA call per group of segments of equal (queries, keys) lengths, no mask.
- "flash", "varlen" and their "_emulated" stand-ins (models/attention.py): varlen calls in
  which batch i is a segment's queries over its keys, non-causal; key rows no segment of a call
  sees are zero-query batches, so each call's cu_seqlens_k runs over the whole stream. Segments
  whose key intervals overlap (consecutive images seen first alone, then together) go to
  different calls.
- "auto": "varlen" where its kernel runs (CUDA, fp16/bf16), "sdpa" elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention import (
    _torch_varlen_attn,
    _varlen_runs,
    flash_attn_varlen_func_emulated,
    map_tensors,
    varlen_attn_emulated,
)

CROSS_ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flash_emulated", "varlen", "varlen_emulated")


@dataclass(frozen=True)
class CrossSdpaBlock:
    """Segments of equal query and key lengths, run as one batched SDPA call."""

    query_index: Tensor  # int64 (num_segments · query_len,): their queries, segment-major
    key_index: Tensor  # int64 (num_segments · key_len,): their keys
    num_segments: int
    query_len: int
    key_len: int


@dataclass(frozen=True)
class CrossVarlenCall:
    """One non-causal varlen call: each batch one segment's queries over its keys, or zero
    queries over key rows the call's segments do not see."""

    query_index: Tensor  # int64: rows of q gathered for this call, batch-major
    cu_seqlens_q: Tensor  # int32 (num_batches + 1,)
    cu_seqlens_k: Tensor  # int32 (num_batches + 1,), last entry == T_k
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass(frozen=True)
class CrossLayout:
    """Which image tokens each query sees: [key_start[t], key_end[t]) of the stream."""

    num_queries: int
    num_keys: int
    key_start: Tensor  # int32 (T_q,)
    key_end: Tensor  # int32 (T_q,); == key_start: the query attends to nothing
    sees_image: Tensor  # bool (T_q,): the query sees an image (of `images`, not a blind range)
    segments: tuple[tuple[int, int, int, int], ...]  # (query_start, query_end, key_start, key_end)
    attending_index: Tensor  # int64: the queries that see an image, in order
    sdpa_blocks: tuple[CrossSdpaBlock, ...]
    varlen_calls: tuple[CrossVarlenCall, ...]

    @classmethod
    def from_ranges(
        cls,
        num_queries: int,
        num_keys: int,
        images: list[tuple[int, int, int, int]],
        blind: list[tuple[int, int, int, int]] = (),
    ) -> CrossLayout:
        """`images`: each image's (key_start, key_end, query_start, query_end), its tokens in
        the key stream and the queries that see it; `blind`: key ranges in the same form that
        queries seeing no image attend to (each query in at most one). ValueError when a query
        would see images that are not contiguous in the stream."""
        start = np.full(num_queries, num_keys, dtype=np.int64)
        end = np.zeros(num_queries, dtype=np.int64)
        seen = np.zeros(num_queries, dtype=np.int64)
        sees_image = np.zeros(num_queries, dtype=bool)
        for key_start, key_end, query_start, query_end in images:
            sees_image[query_start : min(query_end, num_queries)] |= key_end > key_start
        for key_start, key_end, query_start, query_end in [*images, *blind]:
            if not (0 <= key_start <= key_end <= num_keys and 0 <= query_start <= query_end):
                raise ValueError(
                    f"an image's ranges {(key_start, key_end, query_start, query_end)}"
                )
            window = slice(query_start, min(query_end, num_queries))
            start[window] = np.minimum(start[window], key_start)
            end[window] = np.maximum(end[window], key_end)
            seen[window] += key_end - key_start
        start = np.where(seen > 0, start, 0)
        end = np.where(seen > 0, end, 0)
        gaps = np.nonzero(end - start != seen)[0]
        overlap = np.nonzero(sees_image & (seen > 0) & _covered(num_queries, blind))[0]
        if len(overlap):
            raise ValueError(f"query {overlap[0]} sees an image and has a blind range")
        if len(gaps):
            raise ValueError(
                f"query {gaps[0]} sees images that are not contiguous in the key stream"
            )
        segments = []
        for t in range(num_queries):
            if end[t] == start[t]:
                continue
            last = segments[-1] if segments else None
            if last and last[1] == t and (last[2], last[3]) == (start[t], end[t]):
                segments[-1] = (last[0], t + 1, last[2], last[3])
            else:
                segments.append((t, t + 1, int(start[t]), int(end[t])))
        attending = [torch.arange(q0, q1) for q0, q1, _, _ in segments]
        return cls(
            num_queries=num_queries,
            num_keys=num_keys,
            key_start=torch.from_numpy(start).to(torch.int32),
            key_end=torch.from_numpy(end).to(torch.int32),
            sees_image=torch.from_numpy(sees_image),
            segments=tuple(segments),
            attending_index=torch.cat(attending) if attending else torch.zeros(0, dtype=torch.long),
            sdpa_blocks=_plan_sdpa(segments),
            varlen_calls=_plan_varlen(segments, num_keys),
        )

    def to(self, device: torch.device | str) -> CrossLayout:
        return map_tensors(self, lambda tensor: tensor.to(device, non_blocking=True))


def _covered(num_queries: int, ranges) -> np.ndarray:
    covered = np.zeros(num_queries, dtype=bool)
    for _, _, query_start, query_end in ranges:
        covered[query_start : min(query_end, num_queries)] = True
    return covered


def mllama_query_ranges(image_token_positions: list[int], length: int) -> list[tuple[int, int]]:
    """LLaMA-3.2-Vision's rule for one document of `length` tokens whose `<|image|>` tokens sit
    at `image_token_positions`: image i is seen from its token up to the next image's, the last
    to the end, and images whose tokens are adjacent all up to where the last of them stops
    (transformers' `get_cross_attention_token_mask`). → (query_start, query_end) per image."""
    if not image_token_positions:
        return []
    ends = [*image_token_positions[1:], length]
    ranges = [[start, end] for start, end in zip(image_token_positions, ends, strict=True)]
    for index in range(len(ranges) - 2, -1, -1):
        if ranges[index][0] == ranges[index][1] - 1:  # adjacent to the next image's token
            ranges[index][1] = ranges[index + 1][1]
    return [(start, end) for start, end in ranges]


def _plan_sdpa(segments) -> tuple[CrossSdpaBlock, ...]:
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for segment in segments:
        q0, q1, k0, k1 = segment
        groups.setdefault((q1 - q0, k1 - k0), []).append(segment)
    blocks = []
    for (query_len, key_len), members in groups.items():
        blocks.append(
            CrossSdpaBlock(
                query_index=torch.cat([torch.arange(q0, q1) for q0, q1, _, _ in members]),
                key_index=torch.cat([torch.arange(k0, k1) for _, _, k0, k1 in members]),
                num_segments=len(members),
                query_len=query_len,
                key_len=key_len,
            )
        )
    return tuple(blocks)


def _plan_varlen(segments, num_keys: int) -> tuple[CrossVarlenCall, ...]:
    # Each call takes segments whose key intervals do not overlap, in stream order.
    calls: list[list[tuple[int, int, int, int]]] = []
    for segment in sorted(segments, key=lambda s: (s[2], s[0])):
        for call in calls:
            if call[-1][3] <= segment[2]:
                call.append(segment)
                break
        else:
            calls.append([segment])
    planned = []
    for members in calls:
        query_lengths, key_lengths, index = _varlen_runs(
            [(k0, k1, q0, q1) for q0, q1, k0, k1 in members], num_keys
        )
        planned.append(
            CrossVarlenCall(
                query_index=index,
                cu_seqlens_q=_cumulative(query_lengths),
                cu_seqlens_k=_cumulative(key_lengths),
                max_seqlen_q=max(query_lengths),
                max_seqlen_k=max(key_lengths),
            )
        )
    return tuple(planned)


def _cumulative(lengths: list[int]) -> Tensor:
    return torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: CrossLayout,
    backend: str = "sdpa",
    scale: float | None = None,
) -> Tensor:
    """q (T_q, H, D) over k, v (T_k, Hkv, D) → (T_q, H, D); a query that sees no image gets a
    zero row. H a multiple of Hkv; `scale` defaults to 1 / sqrt(D)."""
    if backend not in CROSS_ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; valid: {', '.join(CROSS_ATTENTION_BACKENDS)}"
        )
    if (
        q.shape[0] != layout.num_queries
        or k.shape[0] != layout.num_keys
        or v.shape[0] != k.shape[0]
    ):
        raise ValueError(
            f"q has {q.shape[0]} rows and k, v {k.shape[0]}, {v.shape[0]}; the layout has "
            f"{layout.num_queries} queries over {layout.num_keys} keys"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})"
        )
    if backend == "auto":
        runs = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        backend = "varlen" if runs and _torch_varlen_attn() is not None else "sdpa"
    if backend == "sdpa":
        return _sdpa(q, k, v, layout, scale)
    return _varlen(q, k, v, layout, scale, backend)


def _sdpa(q, k, v, layout: CrossLayout, scale) -> Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = q.new_zeros(q.shape)
    for block in layout.sdpa_blocks:
        q_B = q.index_select(0, block.query_index).view(
            block.num_segments, block.query_len, num_heads, head_dim
        )
        k_B = k.index_select(0, block.key_index).view(
            block.num_segments, block.key_len, -1, head_dim
        )
        v_B = v.index_select(0, block.key_index).view(
            block.num_segments, block.key_len, -1, head_dim
        )
        attended = F.scaled_dot_product_attention(
            q_B.transpose(1, 2),
            k_B.transpose(1, 2),
            v_B.transpose(1, 2),
            scale=scale,
            enable_gqa=num_heads != k.shape[1],
        )
        out = out.index_copy(0, block.query_index, attended.transpose(1, 2).flatten(0, 1))
    return out


def _varlen(q, k, v, layout: CrossLayout, scale, backend: str) -> Tensor:
    out = q.new_zeros(q.shape)
    for call in layout.varlen_calls:
        q_call = q.index_select(0, call.query_index)
        args = (q_call, k, v, call.cu_seqlens_q, call.cu_seqlens_k)
        if backend in ("flash", "flash_emulated"):
            if backend == "flash":
                from flash_attn import flash_attn_varlen_func as kernel
            else:
                kernel = flash_attn_varlen_func_emulated
            # max_seqlen_q at least 2: see models/attention.py `_flash_attn_call`.
            attended = kernel(
                *args,
                max(call.max_seqlen_q, 2),
                call.max_seqlen_k,
                softmax_scale=scale,
                causal=False,
            )
        else:
            kernel = _torch_varlen_attn() if backend == "varlen" else varlen_attn_emulated
            if kernel is None:
                raise ImportError("attention backend 'varlen' needs torch >= 2.10 (CUDA)")
            attended = kernel(
                *args,
                call.max_seqlen_q,
                call.max_seqlen_k,
                scale=scale,
                window_size=(-1, call.max_seqlen_k),  # full, and never cuDNN's path
                enable_gqa=q.shape[1] != k.shape[1],
            )
        out = out.index_copy(0, call.query_index, attended)
    return out


def dense_reference_cross_attention(q, k, v, layout: CrossLayout, scale=None) -> Tensor:
    """Naive T_q × T_k cross-attention from the interval vectors; for tests."""
    group = q.shape[1] // k.shape[1]
    key = torch.arange(layout.num_keys, device=q.device)
    visible = (key[None, :] >= layout.key_start[:, None]) & (key[None, :] < layout.key_end[:, None])
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, 1))


def mllama_layout(
    documents: list[tuple[int, list[int]]],
    keys_per_tile: int,
    tile_slots: int,
    own_tiles: list[int] | None = None,
) -> tuple[CrossLayout, Tensor]:
    """The cross-attention layout of a packed micro-batch under LLaMA-3.2-Vision's rule, and
    the order of its key stream. `documents`: each one's (length, positions of its images'
    tokens), in packing order; the tower gives each image `tile_slots` tiles of
    `keys_per_tile` keys, its own tiles first (`own_tiles`, one count an image in packing
    order; default 1 each), the rest padding tiles.

    A document's keys are its images' own tiles, image after image, then their padding tiles:
    a query sees the own tiles of the images `mllama_query_ranges` gives it (one interval), and
    a query before the document's first image attends, blind, to every key of the document,
    padding included, as transformers' model does with a row of no image. → (layout, the row
    of the tower's flattened output each key of the stream is)."""
    images, blind, key_index = [], [], []
    per_image = keys_per_tile * tile_slots
    query_offset = image_offset = key_offset = 0
    for length, positions in documents:
        count = len(positions)
        owns = [1] * count if own_tiles is None else own_tiles[image_offset : image_offset + count]
        own_starts = np.cumsum([0, *owns]) * keys_per_tile  # each image's own keys, in order
        for index, (query_start, query_end) in enumerate(mllama_query_ranges(positions, length)):
            images.append(
                (
                    key_offset + int(own_starts[index]),
                    key_offset + int(own_starts[index + 1]),
                    query_offset + query_start,
                    query_offset + query_end,
                )
            )
        if count:
            end = key_offset + count * per_image
            blind.append((key_offset, end, query_offset, query_offset + positions[0]))
            rows = [(image_offset + i) * per_image for i in range(count)]
            cut = [own * keys_per_tile for own in owns]
            key_index += [np.arange(row, row + c) for row, c in zip(rows, cut, strict=True)]
            key_index += [
                np.arange(row + c, row + per_image) for row, c in zip(rows, cut, strict=True)
            ]
        query_offset += length
        image_offset += count
        key_offset += count * per_image
    layout = CrossLayout.from_ranges(query_offset, key_offset, images, blind)
    order = np.concatenate(key_index) if key_index else np.zeros(0, dtype=np.int64)
    return layout, torch.from_numpy(order.astype(np.int64))


def flamingo_layout(
    documents: list[tuple[int, list[int]]], keys_per_image: int
) -> tuple[CrossLayout, Tensor]:
    """The cross-attention layout of a packed micro-batch under Flamingo's rule (transformers'
    Idefics processor, `image_attention_mask_for_packed_input_ids`): a query sees only the
    latest image whose token is at or before it in its document; a query before the
    document's first image sees none (a zero row, which Idefics' cross_attention_gate gives).
    `documents` as for `mllama_layout`; each image is `keys_per_image` keys of the stream, in
    the tower's order. → (layout, the row of the tower's flattened output each key is)."""
    images = []
    query_offset = key_offset = 0
    for length, positions in documents:
        ends = [*positions[1:], length][: len(positions)]  # up to the next image's token
        for index, (start, end) in enumerate(zip(positions, ends, strict=True)):
            key_start = key_offset + index * keys_per_image
            images.append(
                (key_start, key_start + keys_per_image, query_offset + start, query_offset + end)
            )
        query_offset += length
        key_offset += len(positions) * keys_per_image
    layout = CrossLayout.from_ranges(query_offset, key_offset, images)
    return layout, torch.arange(key_offset, dtype=torch.int64)


def packed_cross_layout(
    style: str,
    documents: list[tuple[int, list[int]]],
    keys_per_slot: int,
    slots: int,
    own_tiles: list[int] | None = None,
) -> tuple[CrossLayout, Tensor]:
    """The layout of `model.cross_attention_style` (`mllama_layout` or `flamingo_layout`) for
    images of `slots` tile slots of `keys_per_slot` keys (`ModelConfig.cross_keys_per_image`),
    `own_tiles` of them each an image's own (LLaMA-3.2-Vision's tiled images)."""
    if style == "flamingo":
        return flamingo_layout(documents, keys_per_slot * slots)
    return mllama_layout(documents, keys_per_slot, slots, own_tiles)


@dataclass(frozen=True)
class CrossContext:
    """What the cross-attention blocks of one forward read: the key stream's states (T_k, C),
    and which of them each query sees."""

    states_KC: Tensor
    layout: CrossLayout
