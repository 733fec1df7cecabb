"""Packing benchmark: micro-batches per step, rank token imbalance, packed vs padded throughput.

The sample mixes (seeded; token counts include image spans, `IMAGE_TOKENS` per image); `blend`:
  - text-only (25%): log-normal length, median 180 tokens, clipped to [16, 1500]
  - single-image caption (35%): 1 image + 10–60 text tokens
  - multi-turn conversation (30%): 1 image + 1–12 question/answer turns (1 + a geometric count,
    mean 2.5 extra); questions 8–40 tokens; half the answers short (1–6 tokens, VQA-style), the
    rest log-normal (median 90 tokens, σ 0.9, clipped to [10, 800]): modelled on LLaVA-1.5's
    665k instruction mix, where VQA sources merge many one-word answers into one conversation
    and LLaVA-Instruct/ShareGPT-style sources give few turns with long answers
  - interleaved multi-image (10%): 2–5 images, 10–80 text tokens before each and after the last
This mirrors a LLaVA-style instruction mix with images scaled down to 64 tokens so a CPU can run it.
`conversation`: multi-turn conversations only (the mix the ≥ 2× throughput target is stated for).
`--native`: images at their own size instead (`NATIVE_SIZES`, 256–1,280 tokens each): tokens per
image, padding if the tower's batch were padded to its largest image, and the vision tower's time
packed (one call) vs one call per image.

Measured side by side in one run, same model, same samples, same optimizer-step semantics:
  - packed: the trainer's packer (first-fit-decreasing into ≤ max_tokens micro-batches, no padding)
  - padded: right-padded micro-batches of `--padded-rows` consecutive samples, each padded to its
    longest sample (what a transformers-style collator does); padding attends causally within its
    row and carries no loss, so it costs what a 4D-masked padded batch costs. Measured for 4 rows
    and for 16 (LLaVA-1.5's per-device batch) by default.
Throughput counts real tokens only. Imbalance is max ÷ mean real tokens over ranks, with samples
dealt to ranks as streaming deals them (in order, `--samples-per-rank` each), and after the
trainer's balancing (`data.balance_ranks`: whole samples move between ranks within the step).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from models.config import ModelConfig, VisionConfig
from models.split_vlm import SplitVLM
from trainer.data.decode import Document
from trainer.data.packing import collate, plan_micro_batches, plan_rank_balance

IMAGE_TOKENS = 64
MIXES = {
    "blend": (("text", 0.25), ("caption", 0.35), ("conversation", 0.30), ("interleaved", 0.10)),
    "conversation": (("conversation", 1.0),),
}


def sample_segments(rng: random.Random, mix=MIXES["blend"]) -> list[tuple[str, int]]:
    kind = rng.choices([k for k, _ in mix], weights=[w for _, w in mix])[0]
    if kind == "text":
        return [("text", int(min(1500, max(16, rng.lognormvariate(5.2, 0.8)))))]
    if kind == "caption":
        return [("text", 4), ("image", IMAGE_TOKENS), ("text", rng.randint(10, 60))]
    if kind == "conversation":
        num_turns = 1
        while num_turns < 12 and rng.random() < 0.7:  # geometric: mean 2.5 extra turns
            num_turns += 1
        turns = 0
        for _ in range(num_turns):
            turns += rng.randint(8, 40)
            if rng.random() < 0.5:
                turns += rng.randint(1, 6)
            else:
                turns += int(min(800, max(10, rng.lognormvariate(4.5, 0.9))))
        return [("text", 4), ("image", IMAGE_TOKENS), ("text", turns)]
    segments = []
    for _ in range(rng.randint(2, 5)):
        segments += [("text", rng.randint(10, 80)), ("image", IMAGE_TOKENS)]
    return segments + [("text", rng.randint(10, 80))]


def make_document(index: int, segments, vocab_size: int, image_size: int, pad: int = 0) -> Document:
    generator = torch.Generator().manual_seed(index)
    if pad:
        segments = [*segments, ("text", pad)]
    num_tokens = sum(n for _, n in segments)
    num_images = sum(1 for k, _ in segments if k == "image")
    target_mask = torch.ones(num_tokens, dtype=torch.bool)
    if pad:
        target_mask[-pad:] = False
    return Document(
        sample_id=str(index),
        input_ids=torch.randint(4, vocab_size, (num_tokens,), generator=generator),
        target_mask=target_mask,
        segments=segments,
        pixel_values=torch.randn(num_images, 3, image_size, image_size, generator=generator),
        image_mask=torch.rand(num_images * IMAGE_TOKENS, generator=generator) < 0.5,
        image_span_full=torch.zeros(num_images * IMAGE_TOKENS, dtype=torch.bool),
    )


def run_step(model, micro_batches) -> float:
    started = time.perf_counter()
    for micro_batch in micro_batches:
        out = model(micro_batch)
        (out["text_loss_sum"] + out["image_loss_sum"]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def interleaved_step_times(model, cases: dict[str, list], repeats: int) -> dict[str, float]:
    """Median step time of each case, measured in turn so load drift hits every case alike."""
    for micro_batches in cases.values():  # warm-up: allocator and kernels
        run_step(model, micro_batches)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, micro_batches in cases.items():
            times[name].append(run_step(model, micro_batches))
    return {name: statistics.median(values) for name, values in times.items()}


def padding_fraction(lengths: list[int], rows: int) -> float:
    groups = [lengths[i : i + rows] for i in range(0, len(lengths), rows)]
    return 1 - sum(lengths) / sum(len(g) * max(g) for g in groups)


# Native resolution: image sizes of a photo-and-document mix (width, height, weight), resized by
# the grid rule into a budget of NATIVE_TOKENS tokens per image (patch 16).
NATIVE_SIZES = (
    (640, 480, 3),
    (480, 640, 1),
    (1024, 768, 2),
    (1920, 1080, 2),
    (500, 375, 2),
    (300, 300, 1),
    (1700, 2200, 2),  # a scanned letter page
    (2480, 3508, 1),  # A4 at 300 dpi
    (1200, 400, 1),  # a wide chart or banner
)
NATIVE_TOKENS = (256, 1280)


def native_tower_benchmark(args) -> dict:
    """Tokens per image under the pixel budget, the tower's padding overhead if images were
    padded to the micro-batch's largest, and the tower's time packed (one call) vs one call per
    image (transformers' forward), measured in turn."""
    from transformers import SiglipVisionConfig

    from models.vision import PackedImages, PackedSiglipVisionModel

    patch = 16
    budget = VisionConfig(
        image_size=224,
        patch_size=patch,
        resize="native",
        min_pixels=NATIVE_TOKENS[0] * patch**2,
        max_pixels=NATIVE_TOKENS[1] * patch**2,
    )
    rng = random.Random(args.seed)
    sizes = [s[:2] for s in NATIVE_SIZES]
    weights = [s[2] for s in NATIVE_SIZES]
    grids = [budget.native_grid(*rng.choices(sizes, weights)[0]) for _ in range(2000)]
    tokens = [rows * cols for rows, cols in grids]
    batches = [
        tokens[i : i + args.native_images] for i in range(0, len(tokens), args.native_images)
    ]
    padded_over_packed = sum(len(b) * max(b) for b in batches) / sum(tokens)

    torch.set_num_threads(1)
    tower = PackedSiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=224,
            patch_size=patch,
            vision_use_head=False,
        )
    ).eval()
    times = {"packed": [], "per_image": []}
    with torch.no_grad():
        for step in range(args.repeats + 1):  # the first round warms up
            images = [
                torch.randn(3, rows * patch, cols * patch)
                for rows, cols in grids[step * args.native_images : (step + 1) * args.native_images]
            ]
            started = time.perf_counter()
            packed = PackedImages.from_images(images, patch, "sdpa")
            tower(packed=packed)
            packed_s = time.perf_counter() - started
            started = time.perf_counter()
            for image in images:
                tower(pixel_values=image[None], interpolate_pos_encoding=True)
            per_image_s = time.perf_counter() - started
            if step:
                times["packed"].append(packed_s)
                times["per_image"].append(per_image_s)
    packed_s, per_image_s = (statistics.median(times[k]) for k in ("packed", "per_image"))
    quantiles = statistics.quantiles(tokens, n=10)
    return {
        "images_per_micro_batch": args.native_images,
        "tokens_per_image_budget": list(NATIVE_TOKENS),
        "tokens_per_image_median": statistics.median(tokens),
        "tokens_per_image_p10": quantiles[0],
        "tokens_per_image_p90": quantiles[-1],
        "padded_over_packed_tokens": padded_over_packed,
        "tower_packed_s": packed_s,
        "tower_per_image_s": per_image_s,
        "tower_speedup": per_image_s / packed_s,
    }


def print_native(result: dict) -> None:
    low, high = result["tokens_per_image_budget"]
    print(
        f"native resolution, {low}-{high} tokens per image (patch 16): median "
        f"{result['tokens_per_image_median']:.0f}, p10 {result['tokens_per_image_p10']:.0f}, "
        f"p90 {result['tokens_per_image_p90']:.0f}"
    )
    print(
        f"tower tokens if {result['images_per_micro_batch']} images were padded to the largest: "
        f"{result['padded_over_packed_tokens']:.2f}x the packed ones"
    )
    print(
        f"vision tower (width 256, 4 layers, 1 thread), {result['images_per_micro_batch']} images: "
        f"packed {result['tower_packed_s'] * 1000:.0f} ms, one call per image "
        f"{result['tower_per_image_s'] * 1000:.0f} ms: {result['tower_speedup']:.2f}x "
        f"(target >= 1.5x: {'met' if result['tower_speedup'] >= 1.5 else 'NOT MET'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples-per-rank", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=8, help="simulated ranks for the imbalance")
    parser.add_argument("--steps", type=int, default=50, help="simulated steps for counts")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--padded-rows", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--timed-steps", type=int, default=2, help="steps timed for throughput")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=sorted(MIXES), default="blend", help="sample mix")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--native",
        action="store_true",
        help="native-resolution images instead: tokens per image, the packed vision tower",
    )
    parser.add_argument("--native-images", type=int, default=8, help="images per micro-batch")
    args = parser.parse_args()
    if args.native:
        result = native_tower_benchmark(args)
        print(json.dumps(result)) if args.json else print_native(result)
        return
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    mix = MIXES[args.mix]

    micro_batch_counts, imbalances, balanced_imbalances, lengths_seen = [], [], [], []
    padding = {rows: [] for rows in args.padded_rows}
    for _ in range(args.steps):
        ranks = [
            [sample_segments(rng, mix) for _ in range(args.samples_per_rank)]
            for _ in range(args.ranks)
        ]
        rank_lengths = [[sum(n for _, n in doc) for doc in rank] for rank in ranks]
        tokens = [sum(lengths) for lengths in rank_lengths]
        imbalances.append(max(tokens) / statistics.mean(tokens))
        plan = plan_rank_balance(rank_lengths)
        balanced = [sum(rank_lengths[r][i] for r, i in keys) for keys in plan]
        balanced_imbalances.append(max(balanced) / statistics.mean(balanced))
        lengths = rank_lengths[0]
        lengths_seen += lengths
        # Every rank runs the largest count any rank needs (after balancing).
        micro_batch_counts.append(
            max(
                len(plan_micro_batches([rank_lengths[r][i] for r, i in keys], args.max_tokens))
                for keys in plan
            )
        )
        for rows in args.padded_rows:
            padding[rows].append(padding_fraction(lengths, rows))

    cfg = ModelConfig(
        vocab_size=1024,
        d_model=128,
        num_heads=4,
        num_kv_heads=2,
        num_core_blocks=2,
        vision=VisionConfig(image_size=32, patch_size=4, hidden_size=64, num_layers=1),
    )
    model = SplitVLM(cfg)
    step_times = {name: [] for name in ["packed", *(f"padded_{r}" for r in args.padded_rows)]}
    real_tokens = []
    for step in range(args.timed_steps):
        segments = [sample_segments(rng, mix) for _ in range(args.samples_per_rank)]
        lengths = [sum(n for _, n in s) for s in segments]
        base = step * args.samples_per_rank

        def doc(i, pad=0, segments=segments, base=base):
            return make_document(base + i, segments[i], cfg.vocab_size, 32, pad)

        docs = [doc(i) for i in range(len(segments))]
        cases = {
            "packed": [
                collate([docs[i] for i in b]) for b in plan_micro_batches(lengths, args.max_tokens)
            ]
        }
        for rows in args.padded_rows:
            cases[f"padded_{rows}"] = []
            for start in range(0, len(segments), rows):
                group = range(start, min(start + rows, len(segments)))
                longest = max(lengths[i] for i in group)
                cases[f"padded_{rows}"].append(
                    collate([doc(i, pad=longest - lengths[i]) for i in group])
                )
        real_tokens.append(sum(lengths))
        for name, seconds in interleaved_step_times(model, cases, args.repeats).items():
            step_times[name].append(seconds)

    tokens_per_s = {name: sum(real_tokens) / sum(t) for name, t in step_times.items()}
    quantiles = statistics.quantiles(lengths_seen, n=10)
    result = {
        "mix": args.mix,
        "samples_per_rank": args.samples_per_rank,
        "ranks": args.ranks,
        "max_tokens": args.max_tokens,
        "sample_tokens_median": statistics.median(lengths_seen),
        "sample_tokens_p90": quantiles[-1],
        "sample_tokens_max": max(lengths_seen),
        "micro_batches_per_step_mean": statistics.mean(micro_batch_counts),
        "micro_batches_per_step_max": max(micro_batch_counts),
        "rank_token_imbalance_mean": statistics.mean(imbalances),
        "rank_token_imbalance_max": max(imbalances),
        "balanced_rank_token_imbalance_mean": statistics.mean(balanced_imbalances),
        "balanced_rank_token_imbalance_max": max(balanced_imbalances),
        "packed_tokens_per_s": tokens_per_s["packed"],
        "padded": [
            {
                "rows": rows,
                "padding_fraction": statistics.mean(padding[rows]),
                "tokens_per_s": tokens_per_s[f"padded_{rows}"],
                "packed_over_padded": tokens_per_s["packed"] / tokens_per_s[f"padded_{rows}"],
            }
            for rows in args.padded_rows
        ],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"mix {args.mix}: {', '.join(f'{k} {w:.0%}' for k, w in mix)}; image span {IMAGE_TOKENS} tokens"
    )
    print(
        f"tokens per sample: median {result['sample_tokens_median']:.0f}, "
        f"p90 {result['sample_tokens_p90']:.0f}, max {result['sample_tokens_max']}"
    )
    print(
        f"micro-batches per step (≤{args.max_tokens} tokens, {args.samples_per_rank} samples): "
        f"mean {result['micro_batches_per_step_mean']:.2f}, max {result['micro_batches_per_step_max']}"
    )
    print(
        f"rank token imbalance (max/mean over {args.ranks} ranks), as dealt: "
        f"mean {result['rank_token_imbalance_mean']:.3f}, worst {result['rank_token_imbalance_max']:.3f}; "
        f"balanced (data.balance_ranks): mean {result['balanced_rank_token_imbalance_mean']:.3f}, "
        f"worst {result['balanced_rank_token_imbalance_max']:.3f}"
    )
    print(f"{'':<16}{'padding':>8}{'tokens/s':>12}{'packed/this':>13}")
    print(f"{'packed':<16}{0:>8.0%}{tokens_per_s['packed']:>12,.0f}{1:>12.2f}x")
    for row in result["padded"]:
        name = f"padded, {row['rows']} rows"
        print(
            f"{name:<16}{row['padding_fraction']:>8.0%}{row['tokens_per_s']:>12,.0f}"
            f"{row['packed_over_padded']:>12.2f}x"
        )


if __name__ == "__main__":
    main()
