"""Packed attention: one flat sequence of documents, causal text, bidirectional image spans.

Tokens of a micro-batch are one flat sequence of T tokens (flash-attn varlen layout, no batch
dim). A text token sees its document up to itself; a token of an image span [s, e) sees its
document up to e - 1. Every visible set is one interval, so the whole mask is two int32 vectors:

    layout = PackedLayout.from_docs([[("text", 5), ("image", 16), ("text", 7)], [("text", 9)]])
    # query t sees exactly the keys k with layout.doc_start[t] <= k <= layout.vis_end[t]
    out_THD = packed_attention(q_THD, k_TKD, v_TKD, layout, backend="sdpa")

A sliding window (`window=W`, a property of the layer: one layout serves every layer) also
hides keys k <= t - W from query t, text and image tokens alike, so each visible set is still
one interval, [max(doc_start[t], t - W + 1), vis_end[t]] (`layout.first_visible(W)`): the last
W positions up to t, as transformers' `kv_idx > q_idx - sliding_window`, plus an image token's
later tokens of its span.

`PackedLayout.from_docs` runs once per micro-batch in the data pipeline and precomputes what
every backend needs (index tensors, cu_seqlens, block tables), so layers never sync with the host.

Backends (see `ATTENTION_BACKENDS`), all equal up to fp32 rounding, outputs and gradients:
- "sdpa": torch SDPA, one call per group of equal-length documents, boolean mask of n_d^2 per
  document (never T^2), none for causal text the window does not cut. The CPU training path.
- "flash": flash-attn 2.x `flash_attn_varlen_func`, one call per (segment kind, segment ordinal
  across documents); keys are never copied: gaps between key ranges are zero-query batches. A
  window is the kernel's window_size, (W - 1, 0) for text and (W - 1, -1) for image calls.
- "flash_emulated": the same decomposition through `flash_attn_varlen_func_emulated`, a
  pure-PyTorch stand-in with flash-attn's signature and semantics, so it is tested on CPU.
- "flex": FlexAttention with a BlockMask built from the interval vectors (GPU; on CPU torch
  only runs the forward, eagerly, materializing T^2 scores).
- "varlen": the "flash" decomposition through torch's own `torch.nn.attention.varlen.varlen_attn`
  (bundled FlashAttention-2; CUDA, fp16/bf16, torch >= 2.10), no external package.
- "varlen_emulated": the same through `varlen_attn_emulated`, varlen_attn's signature over the
  flash-attn emulator, so it is tested on CPU.
- "auto": "varlen" where its kernel runs (CUDA, fp16/bf16, head dim a multiple of 8 up to 256,
  torch >= 2.10), "sdpa" everywhere else; resolved per call from q, so layouts carry both plans.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.config import ATTENTION_BACKEND_NAMES

SEGMENT_KINDS = ("text", "image")
FLEX_BLOCK_SIZE = 128  # FlexAttention's default sparse block size


@dataclass(frozen=True)
class FlashCall:
    """One varlen kernel call: segment number `ordinal` of kind `kind` in every document.

    Batches alternate between real segments (queries of the segment, keys [doc_start, seg_end))
    and zero-query dummy batches over the key rows in between, so cu_seqlens_k runs from 0 to T
    over the unpermuted k/v and every key row belongs to exactly one batch.
    """

    kind: str
    ordinal: int
    causal: bool
    query_index: Tensor  # int64 (num_queries,): rows of q gathered for this call, batch-major
    cu_seqlens_q: Tensor  # int32 (num_batches + 1,)
    cu_seqlens_k: Tensor  # int32 (num_batches + 1,), last entry == T
    max_seqlen_q: int
    max_seqlen_k: int  # covers the dummy batches too (flash-attn's backward relies on it)


@dataclass(frozen=True)
class SdpaBlock:
    """Documents of equal length (and equal text-only-ness) run as one batched SDPA call."""

    num_docs: int
    seqlen: int
    token_index: Tensor  # int64 (num_docs * seqlen,), document-major
    # int32 (num_docs, seqlen): last visible key per query, relative to its document start.
    # None for text-only documents, which run with is_causal=True and no mask at all, and for
    # documents that are one image span (`bidirectional`), which run with no mask either.
    vis_end_local: Tensor | None
    bidirectional: bool = False


@dataclass(frozen=True)
class FlexBlocks:
    """FlexAttention block-sparse tables (block size FLEX_BLOCK_SIZE), shaped (1, 1, ...).

    The interval vectors are padded to a whole number of blocks because the compiled kernel
    evaluates mask_mod on the padding rows of the last block too (pytorch#137801); padding rows
    see no key, and the block tables ignore them.
    """

    doc_start_padded: Tensor  # int32 (num_blocks * FLEX_BLOCK_SIZE,)
    vis_end_padded: Tensor  # int32 (num_blocks * FLEX_BLOCK_SIZE,)
    kv_num_blocks: Tensor  # int32 (1, 1, num_blocks): partially masked blocks per query block
    kv_indices: Tensor  # int32 (1, 1, num_blocks, num_blocks)
    full_kv_num_blocks: Tensor  # int32 (1, 1, num_blocks): fully visible blocks, no mask_mod
    full_kv_indices: Tensor  # int32 (1, 1, num_blocks, num_blocks)


@dataclass(frozen=True)
class PackedLayout:
    """Where documents and image spans sit in a packed micro-batch, plus per-backend plans.

    Build it once per micro-batch with `from_docs` (CPU), move it with `to(device)`.
    """

    cu_seqlens: Tensor  # int32 (num_docs + 1,)
    position_ids: Tensor  # int64 (T,), restarts at 0 in every document
    doc_start: Tensor  # int32 (T,): first key each query sees
    vis_end: Tensor  # int32 (T,): last key each query sees
    is_image: Tensor  # bool (T,)
    max_seqlen: int  # longest document
    doc_lengths: tuple[int, ...]
    # (kind, start, end) per segment, adjacent text merged; python ints for planning and stats
    segments: tuple[tuple[str, int, int], ...]
    # Per-backend plans; None when the layout was built for another backend only.
    sdpa_blocks: tuple[SdpaBlock, ...] | None
    sdpa_inverse_index: Tensor | None  # int64 (T,): row t of the output in cat(per-block outputs)
    flash_calls: tuple[FlashCall, ...] | None
    flash_inverse_index: Tensor | None  # int64 (T,): row t of the output in cat(per-call outputs)
    flex_blocks: FlexBlocks | None

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[0]

    def first_visible(self, window: int | None = None) -> Tensor:
        """int32 (T,): the first key each query sees; `window`: under that sliding window."""
        if window is None:
            return self.doc_start
        token_T = torch.arange(self.num_tokens, device=self.doc_start.device, dtype=torch.int32)
        return torch.maximum(self.doc_start, token_T - (window - 1))

    @property
    def num_docs(self) -> int:
        return len(self.doc_lengths)

    @classmethod
    def from_docs(
        cls, docs: Sequence[Sequence[tuple[str, int]]], backend: str | None = None
    ) -> PackedLayout:
        """docs: per document, its segments in order as (kind, length), kind "text" or "image".

        `backend` plans for that attention backend only (the training path: planning is a
        noticeable part of packing); None plans for every backend."""
        if backend is not None and backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}"
            )
        plans_wanted = _PLANS_OF.values() if backend is None else [_PLANS_OF[backend]]
        plan = {name for names in plans_wanted for name in names}
        segments, doc_bounds = _parse_docs(docs)
        num_tokens = doc_bounds[-1][1]
        # Per-token arrays in numpy, made tensors once: planning runs for every micro-batch
        # (three layouts each), and one torch call on a small tensor costs microseconds.
        seg_doc_start, seg_start, seg_end, seg_is_image = np.array(
            [
                (doc_bounds[doc][0], start, end, kind == "image")
                for doc, kind, start, end in segments
            ],
            dtype=np.int64,
        ).T
        seg_lengths = seg_end - seg_start
        token_T = np.arange(num_tokens)
        doc_start_T = np.repeat(seg_doc_start, seg_lengths)
        is_image_T = np.repeat(seg_is_image.astype(bool), seg_lengths)
        vis_end = np.where(is_image_T, np.repeat(seg_end - 1, seg_lengths), token_T)
        cu_seqlens = torch.tensor([0] + [end for _, end in doc_bounds], dtype=torch.int32)
        doc_lengths = tuple(end - start for start, end in doc_bounds)
        position_ids = torch.from_numpy(token_T - doc_start_T)
        doc_start_T = torch.from_numpy(doc_start_T.astype(np.int32))
        vis_end_T = torch.from_numpy(vis_end.astype(np.int32))
        is_image_T = torch.from_numpy(is_image_T)

        sdpa_blocks = sdpa_inverse_index = flash_calls = flash_inverse_index = flex_blocks = None
        if "sdpa" in plan:
            sdpa_blocks, sdpa_inverse_index = _plan_sdpa(segments, doc_bounds, vis_end)
        if "flash" in plan:
            flash_calls, flash_inverse_index = _plan_flash(segments, doc_bounds)
        if "flex" in plan:
            flex_blocks = _plan_flex(doc_start_T, vis_end_T)
        return cls(
            cu_seqlens=cu_seqlens,
            position_ids=position_ids,
            doc_start=doc_start_T,
            vis_end=vis_end_T,
            is_image=is_image_T,
            max_seqlen=max(doc_lengths),
            doc_lengths=doc_lengths,
            segments=tuple((kind, start, end) for _, kind, start, end in segments),
            sdpa_blocks=sdpa_blocks,
            sdpa_inverse_index=sdpa_inverse_index,
            flash_calls=flash_calls,
            flash_inverse_index=flash_inverse_index,
            flex_blocks=flex_blocks,
        )

    def to(self, device: torch.device | str) -> PackedLayout:
        """A copy with every tensor on `device` (non_blocking: pin the CPU layout to overlap)."""
        return map_tensors(self, lambda tensor: tensor.to(device, non_blocking=True))


# The plans each backend runs on: the flash and varlen backends share one decomposition, and
# "auto" needs both of its candidates, since packing plans on CPU before the copy to a device.
_PLANS_OF = {
    "sdpa": ("sdpa",),
    "flash": ("flash",),
    "flash_emulated": ("flash",),
    "flex": ("flex",),
    "varlen": ("flash",),
    "varlen_emulated": ("flash",),
    "auto": ("sdpa", "flash"),
}
_PLAN_FIELD = {"sdpa": "sdpa_blocks", "flash": "flash_calls", "flex": "flex_blocks"}


def _require_plan(layout: PackedLayout, plan: str) -> None:
    if getattr(layout, _PLAN_FIELD[plan]) is None:
        raise ValueError(
            f"this PackedLayout has no {plan} plan: build it with from_docs(docs, backend=...) "
            "for the backend the model uses (model.attention_backend)"
        )


def map_tensors(value, function: Callable[[Tensor], Tensor]):
    """`value` with `function` applied to every tensor in it, through tuples and dataclasses
    (layouts, their plans, batches); anything else is kept as it is."""
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(item, function) for item in value)
    if dataclasses.is_dataclass(value):
        changes = {
            f.name: map_tensors(getattr(value, f.name), function) for f in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    return value


def _parse_docs(docs) -> tuple[list[tuple[int, str, int, int]], list[tuple[int, int]]]:
    """Validate docs; return segments (doc, kind, start, end) with adjacent text merged, and
    (start, end) per document, in flat token coordinates."""
    if len(docs) == 0:
        raise ValueError("a packed layout needs at least one document")
    segments: list[tuple[int, str, int, int]] = []
    doc_bounds: list[tuple[int, int]] = []
    cursor = 0
    for doc_number, doc in enumerate(docs):
        if len(doc) == 0:
            raise ValueError(f"document {doc_number} is empty")
        doc_begin = cursor
        for kind, length in doc:
            if kind not in SEGMENT_KINDS:
                raise ValueError(
                    f"document {doc_number}: unknown segment kind {kind!r}; "
                    f"valid kinds: {', '.join(SEGMENT_KINDS)}"
                )
            if not isinstance(length, int) or length <= 0:
                raise ValueError(
                    f"document {doc_number}: segment ({kind!r}, {length!r}) needs a length >= 1"
                )
            previous = segments[-1] if segments else None
            # Two text segments in a row are one causal run; image spans never merge, because
            # consecutive spans (multi-scale, dual input) must not see each other's later tokens.
            if kind == "text" and previous and previous[0] == doc_number and previous[1] == "text":
                segments[-1] = (doc_number, "text", previous[2], cursor + length)
            else:
                segments.append((doc_number, kind, cursor, cursor + length))
            cursor += length
        doc_bounds.append((doc_begin, cursor))
    return segments, doc_bounds


def _plan_sdpa(segments, doc_bounds, vis_end: np.ndarray) -> tuple[tuple[SdpaBlock, ...], Tensor]:
    docs_with_images = {doc for doc, kind, _, _ in segments if kind == "image"}
    segments_per_doc = np.bincount([doc for doc, *_ in segments], minlength=len(doc_bounds))
    # Documents that are a single image span (a packed vision tower's images) see all of
    # themselves: SDPA's unmasked kernel, not a mask that picks its slower path.
    whole_images = {doc for doc in docs_with_images if segments_per_doc[doc] == 1}
    groups: dict[tuple[int, bool, bool], list[int]] = {}
    for doc, (start, end) in enumerate(doc_bounds):
        key = (end - start, doc in docs_with_images, doc in whole_images)
        groups.setdefault(key, []).append(doc)

    # In numpy, one tensor per block field at the end (a torch call on a small tensor costs
    # microseconds, and there are a few per group of equal-length documents).
    blocks, token_indices = [], []
    for (seqlen, has_image, whole_image), group_docs in groups.items():
        doc_starts = np.array([doc_bounds[doc][0] for doc in group_docs])
        token_index = (doc_starts[:, None] + np.arange(seqlen)).reshape(-1)
        vis_end_local = None
        if has_image and not whole_image:
            local = vis_end[token_index].reshape(len(group_docs), seqlen) - doc_starts[:, None]
            vis_end_local = torch.from_numpy(local.astype(np.int32))
        token_indices.append(token_index)
        blocks.append(
            SdpaBlock(
                len(group_docs),
                seqlen,
                torch.from_numpy(token_index),
                vis_end_local,
                bidirectional=whole_image,
            )
        )
    inverse = np.argsort(np.concatenate(token_indices), kind="stable")
    return tuple(blocks), torch.from_numpy(inverse)


def _plan_flash(segments, doc_bounds) -> tuple[tuple[FlashCall, ...], Tensor]:
    num_tokens = doc_bounds[-1][1]
    # Within one call every document contributes at most one segment, so the key ranges
    # [doc_start, seg_end) of a call are disjoint and increasing, as cu_seqlens_k requires.
    entries: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    ordinals: dict[tuple[int, str], int] = {}
    for doc, kind, start, end in segments:
        ordinal = ordinals.get((doc, kind), 0)
        ordinals[(doc, kind)] = ordinal + 1
        entries.setdefault((kind, ordinal), []).append((doc_bounds[doc][0], start, end))

    calls = []
    for (kind, ordinal), call_entries in entries.items():
        query_lengths, key_lengths, query_index = _varlen_runs(
            [(key_start, end, start, end) for key_start, start, end in call_entries], num_tokens
        )
        calls.append(
            FlashCall(
                kind=kind,
                ordinal=ordinal,
                # Text is causal with keys ending at the segment end: flash-attn aligns causal
                # masks bottom-right, so query i of the segment sees keys up to itself.
                causal=kind == "text",
                query_index=query_index,
                cu_seqlens_q=_cumulative_int32(query_lengths),
                cu_seqlens_k=_cumulative_int32(key_lengths),
                max_seqlen_q=max(query_lengths),
                max_seqlen_k=max(key_lengths),
            )
        )
    query_order = torch.cat([call.query_index for call in calls])
    assert torch.equal(query_order.sort().values, torch.arange(num_tokens))
    return tuple(calls), torch.argsort(query_order)


def _varlen_runs(entries, num_keys: int) -> tuple[list[int], list[int], Tensor]:
    """The batches of one varlen call: `entries` (key_start, key_end, query_start, query_end),
    key ranges disjoint and increasing, each one batch of its queries over its keys, with
    zero-query batches over the key rows between them, so that cu_seqlens_k runs from 0 to
    `num_keys` and every key row is in exactly one batch. → (query lengths, key lengths, the
    queries' rows in batch order)."""
    query_lengths, key_lengths, query_ranges = [], [], []
    cursor = 0
    for key_start, key_end, query_start, query_end in entries:
        if key_start > cursor:
            query_lengths.append(0)
            key_lengths.append(key_start - cursor)
        query_lengths.append(query_end - query_start)
        key_lengths.append(key_end - key_start)
        query_ranges.append(torch.arange(query_start, query_end))
        cursor = key_end
    if cursor < num_keys:
        query_lengths.append(0)
        key_lengths.append(num_keys - cursor)
    return query_lengths, key_lengths, torch.cat(query_ranges)


def _block_table(selected: Tensor) -> tuple[Tensor, Tensor]:
    counts = selected.sum(1, dtype=torch.int32)
    # stable sort puts the selected block indices first, in increasing order
    indices = torch.argsort((~selected).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


def _cumulative_int32(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)


def _plan_flex(doc_start_T: Tensor, vis_end_T: Tensor) -> FlexBlocks:
    """The tables for the intervals [doc_start_T[t], vis_end_T[t]], on their device (packing
    plans on CPU; windowed layers plan on the fly from `first_visible`)."""
    num_tokens, device = doc_start_T.shape[0], doc_start_T.device
    block = FLEX_BLOCK_SIZE
    num_blocks = math.ceil(num_tokens / block)
    num_padding = num_blocks * block - num_tokens
    query_block_T = torch.arange(num_tokens, device=device) // block

    # A key block is touched by a query block if any query's interval overlaps it; mark the
    # overlaps with a difference array over key blocks instead of materializing T x T.
    first_key_block = doc_start_T.long() // block
    last_key_block = vis_end_T.long() // block
    overlap_count = torch.zeros(num_blocks, num_blocks + 1, dtype=torch.int64, device=device)
    ones_T = torch.ones(num_tokens, dtype=torch.int64, device=device)
    overlap_count.index_put_((query_block_T, first_key_block), ones_T, accumulate=True)
    overlap_count.index_put_((query_block_T, last_key_block + 1), -ones_T, accumulate=True)
    touched = overlap_count.cumsum(1)[:, :num_blocks] > 0

    # Fully visible: every query of the block sees every key of the block. The last key block
    # is never full when T is not a multiple of the block size (its end lies beyond T - 1).
    padded_doc_start = F.pad(doc_start_T, (0, num_padding), value=0)
    padded_vis_end = F.pad(vis_end_T, (0, num_padding), value=num_tokens)
    latest_doc_start = padded_doc_start.view(num_blocks, block).amax(1)
    earliest_vis_end = padded_vis_end.view(num_blocks, block).amin(1)
    key_block_start = torch.arange(num_blocks, device=device) * block
    full = (latest_doc_start[:, None] <= key_block_start[None, :]) & (
        earliest_vis_end[:, None] >= key_block_start[None, :] + block - 1
    )
    partial = touched & ~full
    kv_num_blocks, kv_indices = _block_table(partial)
    full_kv_num_blocks, full_kv_indices = _block_table(full)
    return FlexBlocks(
        doc_start_padded=F.pad(doc_start_T, (0, num_padding), value=num_tokens),
        vis_end_padded=F.pad(vis_end_T, (0, num_padding), value=-1),
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks,
        full_kv_indices=full_kv_indices,
    )


# ---------------------------------------------------------------------------------------------
# Backends: each takes q (T, H, D), k/v (T, Hkv, D), the layout, the softmax scale and the
# sliding window (None: none).


def _sdpa_attention(q_THD: Tensor, k_TKD: Tensor, v_TKD: Tensor, layout, scale, window) -> Tensor:
    _require_plan(layout, "sdpa")
    num_heads, num_kv_heads, head_dim = q_THD.shape[1], k_TKD.shape[1], q_THD.shape[2]
    outputs = []
    for block in layout.sdpa_blocks:
        shape = (block.num_docs, block.seqlen, -1, head_dim)
        q_BHND = q_THD.index_select(0, block.token_index).view(shape).transpose(1, 2)
        k_BKND = k_TKD.index_select(0, block.token_index).view(shape).transpose(1, 2)
        v_BKND = v_TKD.index_select(0, block.token_index).view(shape).transpose(1, 2)
        # A window no shorter than the documents hides nothing in them.
        cuts = window is not None and window < block.seqlen
        mask_B1NN = None
        if block.vis_end_local is not None or cuts:
            # Built per call from the n_d-long interval vector rather than stored in the layout:
            # n_d^2 cheap compares next to n_d^2 * H * D attention flops, and no n_d^2 bytes
            # to ship to a device that may never use this backend.
            key_N = torch.arange(block.seqlen, device=q_THD.device)
            if block.vis_end_local is not None:
                mask_B1NN = (key_N <= block.vis_end_local[:, :, None]).unsqueeze(1)
            elif block.bidirectional:
                mask_B1NN = torch.ones_like(key_N, dtype=torch.bool).expand(block.seqlen, -1)
            else:  # text only: causal, one (n_d, n_d) mask for every document of the block
                mask_B1NN = key_N[None, :] <= key_N[:, None]
            if cuts:
                mask_B1NN = mask_B1NN & (key_N[None, :] > key_N[:, None] - window)
        out_BHND = F.scaled_dot_product_attention(
            q_BHND,
            k_BKND,
            v_BKND,
            attn_mask=mask_B1NN,
            is_causal=mask_B1NN is None and not block.bidirectional,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        outputs.append(out_BHND.transpose(1, 2).reshape(-1, num_heads, head_dim))
    return torch.cat(outputs).index_select(0, layout.sdpa_inverse_index)


def _flash_decomposition(
    q_THD: Tensor, k_TKD: Tensor, v_TKD: Tensor, layout, run_call: Callable
) -> Tensor:
    """The FlashCall plan through `run_call(q of the call's queries, k, v, call)`, one kernel."""
    _require_plan(layout, "flash")
    # Each query row comes out of exactly one call, and the calls share the full k/v, so the
    # kernel's own autograd gives exact gradients: dK/dV of the calls simply add up.
    outputs = [
        run_call(q_THD.index_select(0, call.query_index), k_TKD, v_TKD, call)
        for call in layout.flash_calls
    ]
    return torch.cat(outputs).index_select(0, layout.flash_inverse_index)


def _flash_attn_call(kernel: Callable, scale: float | None, window: int | None) -> Callable:
    """A FlashCall through flash-attn's `flash_attn_varlen_func` signature."""
    # Bottom-right aligned, query i of a segment sits at its own key, so a left window of
    # W - 1 keeps keys t - W + 1 .. t of a text query, and of an image query all keys after
    # t - W + 1 up to the span end (right unbounded).
    window_left = -1 if window is None else window - 1

    def run_call(q_QHD, k_TKD, v_TKD, call: FlashCall) -> Tensor:
        # max_seqlen_q at least 2: at 1, with GQA and no window, flash-attn reshapes q to one
        # row per batch (seqlenq_ngroups_swapped), which our zero-query batches break. The bound
        # only sizes the launch grid (128-row blocks), so 2 costs nothing.
        max_seqlen_q = max(call.max_seqlen_q, 2)
        return kernel(
            q_QHD,
            k_TKD,
            v_TKD,
            call.cu_seqlens_q,
            call.cu_seqlens_k,
            max_seqlen_q,
            call.max_seqlen_k,
            softmax_scale=scale,
            causal=call.causal,
            window_size=(window_left, 0 if call.causal else -1),
        )

    return run_call


def _varlen_attn_call(kernel: Callable, scale: float | None, window: int | None) -> Callable:
    """A FlashCall through torch's `varlen_attn` signature. Its flash kernel is flash-attn 2's,
    with the same facts: int32 cu_seqlens, zero-query batches allowed, max_k covering them,
    fp16/bf16 only, head dim a multiple of 8 up to 256 (varlen_attn does not pad it)."""

    def run_call(q_QHD, k_TKD, v_TKD, call: FlashCall) -> Tensor:
        # Causal is the tuple (-1, 0): varlen_attn compares `window_size == (-1, 0)`. Full is
        # (-1, max_k), which the kernel clamps to no window in forward and backward: exactly
        # (-1, -1) lets varlen_attn pick cuDNN over its flash kernel (sm90/sm100, cuDNN >= 9.18,
        # equal heads, max_q > 128), and how cuDNN treats zero-query batches is unverified. Any
        # window also keeps flash off its max_q == 1 GQA path (see _flash_attn_call). A sliding
        # window is (W - 1, 0) or (W - 1, -1), as in _flash_attn_call: never (-1, -1) either.
        if window is None:
            window_size = (-1, 0) if call.causal else (-1, call.max_seqlen_k)
        else:
            window_size = (window - 1, 0 if call.causal else -1)
        return kernel(
            q_QHD,
            k_TKD,
            v_TKD,
            call.cu_seqlens_q,
            call.cu_seqlens_k,
            call.max_seqlen_q,
            call.max_seqlen_k,
            scale=scale,
            window_size=window_size,
            enable_gqa=q_QHD.shape[1] != k_TKD.shape[1],
        )

    return run_call


def _flash_attention(q_THD, k_TKD, v_TKD, layout, scale, window) -> Tensor:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise ImportError(
            "attention backend 'flash' needs flash-attn 2.x (CUDA only): "
            "pip install splitvlm[gpu]; on CPU use backend 'sdpa'"
        ) from error
    run_call = _flash_attn_call(flash_attn_varlen_func, scale, window)
    return _flash_decomposition(q_THD, k_TKD, v_TKD, layout, run_call)


def _flash_emulated_attention(q_THD, k_TKD, v_TKD, layout, scale, window) -> Tensor:
    run_call = _flash_attn_call(flash_attn_varlen_func_emulated, scale, window)
    return _flash_decomposition(q_THD, k_TKD, v_TKD, layout, run_call)


@functools.cache
def _torch_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def _varlen_attention(q_THD, k_TKD, v_TKD, layout, scale, window) -> Tensor:
    varlen_attn = _torch_varlen_attn()
    if varlen_attn is None:
        raise ImportError(
            f"attention backend 'varlen' needs torch >= 2.10 (this is {torch.__version__}); "
            "use backend 'auto' or 'sdpa'"
        )
    run_call = _varlen_attn_call(varlen_attn, scale, window)
    return _flash_decomposition(q_THD, k_TKD, v_TKD, layout, run_call)


def _varlen_emulated_attention(q_THD, k_TKD, v_TKD, layout, scale, window) -> Tensor:
    run_call = _varlen_attn_call(varlen_attn_emulated, scale, window)
    return _flash_decomposition(q_THD, k_TKD, v_TKD, layout, run_call)


def _auto_attention(q_THD, k_TKD, v_TKD, layout, scale, window) -> Tensor:
    # Where varlen's kernel runs: flash-attn 2 takes only fp16/bf16 (fp32 training on a GPU,
    # e.g. the local engine, gets sdpa) and head dims that are multiples of 8 up to 256.
    head_dim = q_THD.shape[2]
    use_varlen = (
        q_THD.is_cuda
        and q_THD.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and _torch_varlen_attn() is not None
    )
    backend = _varlen_attention if use_varlen else _sdpa_attention
    return backend(q_THD, k_TKD, v_TKD, layout, scale, window)


@functools.cache
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_block_tables(layout: PackedLayout, window: int | None = None) -> FlexBlocks:
    """The flex tables of a layout, or of its intervals under a sliding window."""
    _require_plan(layout, "flex")
    if window is None:
        return layout.flex_blocks
    # Planned on the device per call (O(T + num_blocks^2)): the tables skip the key blocks
    # behind every window, and no block the window cuts stays "full" (mask_mod skipped there).
    return _plan_flex(layout.first_visible(window), layout.vis_end)


def _flex_attention(q_THD, k_TKD, v_TKD, layout, scale, window) -> Tensor:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    blocks = flex_block_tables(layout, window)
    doc_start, vis_end = blocks.doc_start_padded, blocks.vis_end_padded

    def mask_mod(batch, head, q_idx, kv_idx):
        return (doc_start[q_idx] <= kv_idx) & (kv_idx <= vis_end[q_idx])

    num_tokens = q_THD.shape[0]
    block_mask = BlockMask.from_kv_blocks(
        blocks.kv_num_blocks,
        blocks.kv_indices,
        blocks.full_kv_num_blocks,
        blocks.full_kv_indices,
        BLOCK_SIZE=FLEX_BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(num_tokens, num_tokens),
    )
    # Only the compiled kernel is block-sparse; eager flex (CPU) materializes all T^2 scores,
    # while compiling on CPU is slow per shape and still has no backward there.
    attend = _compiled_flex_attention() if q_THD.is_cuda else flex_attention
    out_1HTD = attend(
        q_THD.transpose(0, 1).unsqueeze(0),
        k_TKD.transpose(0, 1).unsqueeze(0),
        v_TKD.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q_THD.shape[1] != k_TKD.shape[1],
    )
    return out_1HTD.squeeze(0).transpose(0, 1)


ATTENTION_BACKENDS: dict[str, Callable] = {
    "sdpa": _sdpa_attention,
    "flash": _flash_attention,
    "flash_emulated": _flash_emulated_attention,
    "flex": _flex_attention,
    "varlen": _varlen_attention,
    "varlen_emulated": _varlen_emulated_attention,
    "auto": _auto_attention,
}
assert tuple(ATTENTION_BACKENDS) == ATTENTION_BACKEND_NAMES, "update models.config as well"


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: PackedLayout,
    backend: str = "sdpa",
    scale: float | None = None,
    window: int | None = None,
) -> Tensor:
    """Attention over a packed micro-batch: q (T, H, D), k and v (T, Hkv, D) -> (T, H, D).

    H must be a multiple of Hkv (query head h uses key/value head h // (H // Hkv)); `scale`
    defaults to 1 / sqrt(D). `window`: a sliding window of that many positions (query t also
    sees no key k <= t - window); None: none.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}"
        )
    num_tokens = layout.num_tokens
    if q.shape[0] != num_tokens or k.shape[0] != num_tokens or v.shape[0] != num_tokens:
        raise ValueError(
            f"q, k, v have {q.shape[0]}, {k.shape[0]}, {v.shape[0]} tokens; "
            f"the layout has {num_tokens}"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})"
        )
    if window is not None and window < 1:
        raise ValueError(f"a sliding window needs at least 1 position, got {window}")
    return ATTENTION_BACKENDS[backend](q, k, v, layout, scale, window)


def dense_reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: PackedLayout,
    scale: float | None = None,
    window: int | None = None,
) -> Tensor:
    """Naive T x T attention straight from the interval vectors; for tests and benchmarks."""
    num_tokens, num_heads, head_dim = q.shape
    group_size = num_heads // k.shape[1]
    key_T = torch.arange(num_tokens, device=q.device)
    visible_TT = (key_T[None, :] >= layout.first_visible(window)[:, None]) & (
        key_T[None, :] <= layout.vis_end[:, None]
    )
    k_THD = k.repeat_interleave(group_size, dim=1)
    v_THD = v.repeat_interleave(group_size, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores_HTT = torch.einsum("qhd,khd->hqk", q, k_THD) * scale
    probs_HTT = scores_HTT.masked_fill(~visible_TT, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs_HTT, v_THD)


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func in plain PyTorch (semantics of flash-attn 2.8.3's public function).


def flash_attn_varlen_func_emulated(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
):
    """Pure-PyTorch `flash_attn.flash_attn_varlen_func`: q (total_q, H, D), k/v (total_k, Hkv, D).

    Same contract as the kernel, checked instead of trusted: cu_seqlens int32 and monotone,
    every batch no longer than max_seqlen_q/k, Hkv divides H, D <= 256, and no zero-query batch
    on the max_seqlen_q == 1 GQA path (the kernel reshapes q to one row per batch there).
    Masks are aligned bottom-right: query i of a batch sits at key i + seqlen_k - seqlen_q and
    sees keys [that - window_size[0], that + window_size[1]] (-1: unbounded); causal=True is
    window (-1, 0), so with seqlen_q != seqlen_k query i sees key j iff
    j <= i + seqlen_k - seqlen_q. A query row with no visible key returns 0 (and LSE +inf).
    Batches may have zero queries. Returns out, or (out, softmax_lse (H, total_q) fp32,
    S_dmask) with return_attn_probs; like the kernel, no gradient flows back through the LSE.
    Computes in fp32 and returns q.dtype. Dropout, softcap, ALiBi and paged KV are not emulated.
    """
    if dropout_p != 0.0 or softcap != 0.0:
        raise NotImplementedError("the emulator has no dropout or softcap")
    if alibi_slopes is not None or block_table is not None:
        raise NotImplementedError("the emulator has no ALiBi or paged KV cache")
    assert cu_seqlens_q.dtype == torch.int32, "cu_seqlens_q must have dtype int32"
    assert cu_seqlens_k.dtype == torch.int32, "cu_seqlens_k must have dtype int32"
    assert cu_seqlens_q.dim() == 1 and cu_seqlens_q.shape == cu_seqlens_k.shape
    assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    assert num_heads % num_kv_heads == 0, "number of heads in k/v must divide heads in q"
    assert head_dim <= 256, "flash-attn supports head dim <= 256"

    # note: host sync; this is a CPU test double, not a fast path
    offsets_q = cu_seqlens_q.tolist()
    offsets_k = cu_seqlens_k.tolist()
    assert offsets_q[0] == 0 and offsets_k[0] == 0
    assert offsets_q[-1] == q.shape[0], "cu_seqlens_q must end at total_q"
    assert offsets_k[-1] <= k.shape[0], "cu_seqlens_k must end within total_k"
    window_left, window_right = window_size
    no_window = window_left < 0 and window_right < 0
    swaps_q = max_seqlen_q == 1 and num_heads > num_kv_heads and no_window
    assert not swaps_q or q.shape[0] == len(offsets_q) - 1, (
        "max_seqlen_q == 1 with GQA and no window needs exactly one query per batch"
    )
    if causal:
        window_right = 0
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    group_size = num_heads // num_kv_heads

    outputs, lses = [], []
    for q_begin, q_end, k_begin, k_end in zip(
        offsets_q[:-1], offsets_q[1:], offsets_k[:-1], offsets_k[1:], strict=True
    ):
        seqlen_q, seqlen_k = q_end - q_begin, k_end - k_begin
        assert 0 <= seqlen_q <= max_seqlen_q, f"batch of {seqlen_q} queries > max_seqlen_q"
        assert 0 <= seqlen_k <= max_seqlen_k, f"batch of {seqlen_k} keys > max_seqlen_k"
        q_QHD = q[q_begin:q_end].float()
        k_KHD = k[k_begin:k_end].float().repeat_interleave(group_size, dim=1)
        v_KHD = v[k_begin:k_end].float().repeat_interleave(group_size, dim=1)
        scores_HQK = torch.einsum("qhd,khd->hqk", q_QHD, k_KHD) * scale
        if window_left >= 0 or window_right >= 0:
            diagonal_Q1 = torch.arange(seqlen_q, device=q.device)[:, None] + seqlen_k - seqlen_q
            key_1K = torch.arange(seqlen_k, device=q.device)[None, :]
            visible_QK = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
            if window_right >= 0:
                visible_QK &= key_1K <= diagonal_Q1 + window_right
            if window_left >= 0:
                visible_QK &= key_1K >= diagonal_Q1 - window_left
            scores_HQK = scores_HQK.masked_fill(~visible_QK, float("-inf"))
        # Softmax by hand so rows without a visible key give 0 (not NaN) in forward and backward.
        row_max_HQ1 = scores_HQK.amax(-1, keepdim=True).detach()
        row_max_HQ1 = torch.where(row_max_HQ1.isfinite(), row_max_HQ1, 0.0)
        weights_HQK = torch.exp(scores_HQK - row_max_HQ1)
        normalizer_HQ1 = weights_HQK.sum(-1, keepdim=True)
        probs_HQK = weights_HQK / normalizer_HQ1.clamp_min(torch.finfo(torch.float32).tiny)
        outputs.append(torch.einsum("hqk,khd->qhd", probs_HQK, v_KHD))
        lse_HQ = (normalizer_HQ1.log() + row_max_HQ1).squeeze(-1).detach()
        lses.append(torch.where(normalizer_HQ1.squeeze(-1) > 0, lse_HQ, float("inf")))
    out = torch.cat(outputs).to(q.dtype)
    if not return_attn_probs:
        return out
    # S_dmask is only materialized by the kernel when dropout_p > 0, which is not emulated
    return out, torch.cat(lses, dim=1), torch.empty(0, dtype=q.dtype, device=q.device)


def varlen_attn_emulated(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Tensor | None = None,
    block_table: Tensor | None = None,
    num_splits: int | None = None,
):
    """Pure-PyTorch `torch.nn.attention.varlen.varlen_attn` (torch 2.14): the flash-attn emulator
    behind varlen_attn's signature, since varlen_attn runs the same FlashAttention-2 kernel.

    window_size (left, right) as in the kernel, (-1, 0) causal, bottom-right aligned when query
    and key lengths differ; k/v with fewer heads need enable_gqa=True (ValueError otherwise, as
    in torch). Returns out, or (out, lse (H, total_q) fp32) when `return_aux.lse`. The paged KV
    cache (seqused_k, block_table) is not emulated; num_splits changes only rounding.
    """
    if seqused_k is not None or block_table is not None or cu_seq_k is None:
        raise NotImplementedError("the emulator has no paged KV cache (seqused_k, block_table)")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"Expect query and key/value to have the same number of heads but got "
            f"Hq={query.shape[1]} and Hkv={key.shape[1]}. Try setting enable_gqa=True for GQA."
        )
    out, lse, _ = flash_attn_varlen_func_emulated(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        softmax_scale=scale,
        window_size=tuple(window_size),
        return_attn_probs=True,
    )
    return (out, lse) if return_aux is not None and return_aux.lse else out
