"""Packed attention cost: (query, key) pairs computed vs needed, mask memory, CPU time.

For three seeded document mixes, documents are drawn one by one and packed greedily into rows
(micro-batches) of at most --tokens tokens: a document that does not fit closes the row; a
document longer than --tokens is redrawn. Lengths are in tokens, U[a, b] is a uniform integer:

- llava: system text U[24, 48], one 576-token image, question U[8, 64], answer U[16, 256]
  (one LLaVA-1.5 conversation turn, 624-944 tokens).
- interleaved: 2-6 images, each preceded by a text chunk U[16, 128]; an image is one span of
  64, 144 or 256 tokens (equal odds) or, one time in four, a multi-scale image: spans of 16, 64
  and 256 tokens in a row; a closing text U[32, 256].
- text: text-heavy; 90% text-only documents, length log-uniform in [32, 2048]; 10% have text
  U[16, 128], one 256-token image, text U[16, 256].

Per mix it reports, for every way of computing the attention, the pairs computed divided by the
pairs needed (the pairs the mask allows: sum over queries of vis_end - doc_start + 1):
- dense masked SDPA over right-padded rows: rows x L_max^2 (L_max = longest row);
- sdpa backend: one n x n mask per document (n(n+1)/2 for text-only documents, which run with
  is_causal);
- flash decomposition: per kernel call and batch, seqlen_q x seqlen_k for image calls and the
  bottom-right causal band (prefix + lower triangle) for text calls; also rounded up to the
  128 x 128 tiles the kernel actually iterates over;
- flex block-sparse: 128 x 128 blocks not fully masked, x 128^2.
It also reports mask memory (dense padded bool mask, sdpa per-document bool masks, the two int32
interval vectors, flex block tables) and the CPU forward+backward time of the sdpa backend and of
the dense padded baseline, measured in this run (median of --repeats, after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

from models.attention import FLEX_BLOCK_SIZE, PackedLayout, packed_attention

FLASH_TILE = 128
TARGETS = {"flash": "<= 1.05x", "dense_padded": "5-26x", "flex": "1.09-1.39x"}


def llava_doc(rng: random.Random) -> list[tuple[str, int]]:
    return [
        ("text", rng.randint(24, 48)),
        ("image", 576),
        ("text", rng.randint(8, 64)),
        ("text", rng.randint(16, 256)),
    ]


def interleaved_doc(rng: random.Random) -> list[tuple[str, int]]:
    doc = []
    for _ in range(rng.randint(2, 6)):
        doc.append(("text", rng.randint(16, 128)))
        if rng.random() < 0.25:
            doc += [("image", 16), ("image", 64), ("image", 256)]
        else:
            doc.append(("image", rng.choice([64, 144, 256])))
    return doc + [("text", rng.randint(32, 256))]


def text_heavy_doc(rng: random.Random) -> list[tuple[str, int]]:
    if rng.random() < 0.1:
        return [("text", rng.randint(16, 128)), ("image", 256), ("text", rng.randint(16, 256))]
    return [("text", round(math.exp(rng.uniform(math.log(32), math.log(2048)))))]


MIXES = {"llava": llava_doc, "interleaved": interleaved_doc, "text": text_heavy_doc}


def pack_rows(draw_doc, rng: random.Random, num_rows: int, max_tokens: int):
    rows, row, row_tokens = [], [], 0
    while len(rows) < num_rows:
        doc = draw_doc(rng)
        length = sum(n for _, n in doc)
        if length > max_tokens:
            continue
        if row_tokens + length > max_tokens:
            rows.append(row)
            row, row_tokens = [], 0
        row.append(doc)
        row_tokens += length
    return rows


# ---------------------------------------------------------------------------------------------
# Pair counts


def needed_pairs(layout: PackedLayout) -> int:
    return int((layout.vis_end - layout.doc_start + 1).sum())


def sdpa_pairs(layout: PackedLayout) -> int:
    total = 0
    for block in layout.sdpa_blocks:
        n = block.seqlen
        total += block.num_docs * (n * n if block.vis_end_local is not None else n * (n + 1) // 2)
    return total


def flash_pairs(layout: PackedLayout, tile: int | None = None) -> int:
    """Pairs the varlen kernel computes; with `tile`, whole tile x tile tiles it visits."""
    total = 0
    for call in layout.flash_calls:
        lengths = zip(
            call.cu_seqlens_q.diff().tolist(), call.cu_seqlens_k.diff().tolist(), strict=True
        )
        for seqlen_q, seqlen_k in lengths:
            if seqlen_q == 0:
                continue  # dummy batch: the kernel launches no query tile for it
            # keys visible to each query row (bottom-right causal alignment)
            query = torch.arange(seqlen_q)
            if call.causal:
                keys_Q = (query + seqlen_k - seqlen_q + 1).clamp(0, seqlen_k)
            else:
                keys_Q = torch.full((seqlen_q,), seqlen_k)
            if tile is None:
                total += int(keys_Q.sum())
            else:
                last_rows = torch.arange(tile - 1, seqlen_q + tile - 1, tile).clamp(
                    max=seqlen_q - 1
                )
                key_tiles = (keys_Q[last_rows] + tile - 1) // tile
                total += int(key_tiles.sum()) * tile * tile
    return total


def flex_pairs(layout: PackedLayout) -> int:
    blocks = layout.flex_blocks
    visited = int(blocks.kv_num_blocks.sum() + blocks.full_kv_num_blocks.sum())
    return visited * FLEX_BLOCK_SIZE**2


def flex_table_bytes(layout: PackedLayout) -> int:
    blocks = layout.flex_blocks
    tables = [
        blocks.kv_num_blocks,
        blocks.kv_indices,
        blocks.full_kv_num_blocks,
        blocks.full_kv_indices,
    ]
    return sum(t.numel() * t.element_size() for t in tables)


# ---------------------------------------------------------------------------------------------
# Timing


def padded_dense_mask(layouts: list[PackedLayout], padded_length: int) -> torch.Tensor:
    """(rows, 1, L_max, L_max) bool: the packed mask of each row, right-padded."""
    key_L = torch.arange(padded_length)
    masks = []
    for layout in layouts:
        pad = padded_length - layout.num_tokens
        # padding queries see the whole row so that no softmax row is empty (no NaN)
        doc_start = F.pad(layout.doc_start, (0, pad), value=0)
        vis_end = F.pad(layout.vis_end, (0, pad), value=padded_length - 1)
        masks.append((key_L[None, :] >= doc_start[:, None]) & (key_L[None, :] <= vis_end[:, None]))
    return torch.stack(masks).unsqueeze(1)


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_backends(layouts, args, seed: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    padded_length = max(layout.num_tokens for layout in layouts)
    qkv_rows = []
    for layout in layouts:
        q = torch.randn(layout.num_tokens, args.heads, args.head_dim, generator=generator)
        k, v = (
            torch.randn(layout.num_tokens, args.kv_heads, args.head_dim, generator=generator)
            for _ in range(2)
        )
        qkv_rows.append([t.requires_grad_() for t in (q, k, v)])

    def right_padded(tensors):  # per row (T_row, H, D) -> (rows, H, L_max, D), same values
        rows = [F.pad(t.detach(), (0, 0, 0, 0, 0, padded_length - t.shape[0])) for t in tensors]
        return torch.stack(rows).transpose(1, 2).contiguous().requires_grad_()

    padded = [right_padded([row[i] for row in qkv_rows]) for i in range(3)]
    mask = padded_dense_mask(layouts, padded_length)

    def sdpa_step():
        outputs = [
            packed_attention(*qkv, layout, backend="sdpa")
            for qkv, layout in zip(qkv_rows, layouts, strict=True)
        ]
        torch.cat(outputs).sum().backward()
        return outputs

    def dense_step():
        out = F.scaled_dot_product_attention(
            *padded, attn_mask=mask, enable_gqa=args.heads != args.kv_heads
        )
        out.sum().backward()
        return out

    # the two must compute the same thing, or the timing comparison means nothing
    dense_out = dense_step().detach().transpose(1, 2)
    for row, out in enumerate(sdpa_step()):
        torch.testing.assert_close(
            out.detach(), dense_out[row, : out.shape[0]], rtol=1e-4, atol=1e-4
        )
    return {
        "sdpa": median_seconds(sdpa_step, args.repeats),
        "dense_padded": median_seconds(dense_step, args.repeats),
    }


# ---------------------------------------------------------------------------------------------


def measure_mix(name: str, seed: int, args) -> dict:
    rows = pack_rows(MIXES[name], random.Random(seed), args.rows, args.tokens)
    layouts = [PackedLayout.from_docs(row) for row in rows]
    padded_length = max(layout.num_tokens for layout in layouts)
    needed = sum(needed_pairs(layout) for layout in layouts)
    pairs = {
        "dense_padded": len(layouts) * padded_length**2,
        "sdpa": sum(sdpa_pairs(layout) for layout in layouts),
        "flash": sum(flash_pairs(layout) for layout in layouts),
        "flash_tiles": sum(flash_pairs(layout, FLASH_TILE) for layout in layouts),
        "flex": sum(flex_pairs(layout) for layout in layouts),
    }
    mask_bytes = {
        "dense_padded": len(layouts) * padded_length**2,
        "sdpa": sum(
            block.num_docs * block.seqlen**2
            for layout in layouts
            for block in layout.sdpa_blocks
            if block.vis_end_local is not None
        ),
        "interval_vectors": sum(2 * 4 * layout.num_tokens for layout in layouts),
        "flex_tables": sum(flex_table_bytes(layout) for layout in layouts),
    }
    seconds = time_backends(layouts, args, seed)
    return {
        "num_docs": sum(layout.num_docs for layout in layouts),
        "num_rows": len(layouts),
        "num_tokens": sum(layout.num_tokens for layout in layouts),
        "padded_row_length": padded_length,
        "needed_pairs": needed,
        "pairs": pairs,
        "pairs_over_needed": {key: value / needed for key, value in pairs.items()},
        "mask_bytes": mask_bytes,
        "cpu_fwd_bwd_seconds": seconds,
        "sdpa_speedup_over_dense_padded": seconds["dense_padded"] / seconds["sdpa"],
    }


LABELS = {
    "dense_padded": "dense masked SDPA, padded rows",
    "sdpa": "sdpa backend, per-document masks",
    "flash": "flash decomposition",
    "flash_tiles": "  same, in 128x128 kernel tiles",
    "flex": "flex block-sparse, 128x128 blocks",
}


def print_table(name: str, result: dict, args) -> None:
    print(
        f"\n== mix {name}: {result['num_docs']} docs in {result['num_rows']} rows of <= "
        f"{args.tokens} tokens (T={result['num_tokens']}, L_max={result['padded_row_length']})"
    )
    print(f"  {'attention':36} {'pairs computed':>15} {'/ needed':>9}  target")
    print(f"  {'needed (allowed by the mask)':36} {result['needed_pairs']:>15,} {1:>8.2f}x")
    for key, label in LABELS.items():
        ratio = result["pairs_over_needed"][key]
        print(f"  {label:36} {result['pairs'][key]:>15,} {ratio:>8.2f}x  {TARGETS.get(key, '')}")
    mask = result["mask_bytes"]
    print(
        f"  mask bytes: dense padded {mask['dense_padded']:,} | sdpa per-document {mask['sdpa']:,}"
        f" | interval vectors {mask['interval_vectors']:,} | flex tables {mask['flex_tables']:,}"
    )
    seconds = result["cpu_fwd_bwd_seconds"]
    print(
        f"  CPU fwd+bwd (median of {args.repeats}): sdpa {seconds['sdpa']:.3f} s | dense padded "
        f"{seconds['dense_padded']:.3f} s | sdpa is {result['sdpa_speedup_over_dense_padded']:.1f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096, help="max tokens per packed row")
    parser.add_argument("--rows", type=int, default=2, help="packed rows (micro-batches) per mix")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    args = parser.parse_args()
    if args.tokens < 1024:
        parser.error("--tokens must be >= 1024 (a LLaVA document is up to 944 tokens)")

    results = {
        name: measure_mix(name, args.seed + index, args) for index, name in enumerate(args.mixes)
    }
    if args.json:
        config = {key: value for key, value in vars(args).items() if key != "json"}
        config["torch_threads"] = torch.get_num_threads()
        print(json.dumps({"config": config, "targets": TARGETS, "mixes": results}, indent=2))
        return
    print(
        f"packed attention, H={args.heads} Hkv={args.kv_heads} D={args.head_dim}, fp32 CPU, "
        f"{torch.get_num_threads()} threads"
    )
    for name, result in results.items():
        print_table(name, result, args)


if __name__ == "__main__":
    main()
