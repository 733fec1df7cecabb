"""Packing benchmark: micro-batches per step, rank token imbalance, packed vs padded throughput.

The sample mixes (seeded; token counts include image spans, `IMAGE_TOKENS` per image); `blend`:
  - text-only (25%): log-normal length, median 180 tokens, clipped to [16, 1500]
  - single-image caption (35%): 1 image + 10–60 text tokens
  - multi-turn conversation (30%): 1 image + 2–6 turns of 15–120 tokens
  - interleaved multi-image (10%): 2–5 images, 10–80 text tokens before each and after the last
This mirrors a LLaVA-style instruction mix with images scaled down to 64 tokens so a CPU can run it.
`conversation`: multi-turn conversations only (the mix the ≥ 2× throughput target is stated for).

Measured side by side in one run, same model, same samples, same optimizer-step semantics:
  - packed: the trainer's packer (first-fit-decreasing into ≤ max_tokens micro-batches, no padding)
  - padded: right-padded micro-batches of `--padded-rows` consecutive samples, each padded to its
    longest sample (what a transformers-style collator does); padding attends causally within its
    row and carries no loss, so it costs what a 4D-masked padded batch costs.
Throughput counts real tokens only. Imbalance is max ÷ mean real tokens over ranks, with samples
dealt to ranks as streaming deals them (in order, `--samples-per-rank` each).
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
from trainer.data.packing import collate, plan_micro_batches

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
        turns = sum(rng.randint(15, 120) for _ in range(rng.randint(2, 6)))
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


def paired_step_times(model, packed, padded, repeats: int) -> tuple[float, float]:
    """Median step time of each, measured alternately so load drift hits both sides alike."""
    run_step(model, packed)  # warm-up: allocator and kernels
    run_step(model, padded)
    packed_times, padded_times = [], []
    for _ in range(repeats):
        packed_times.append(run_step(model, packed))
        padded_times.append(run_step(model, padded))
    return statistics.median(packed_times), statistics.median(padded_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples-per-rank", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=8, help="simulated ranks for the imbalance")
    parser.add_argument("--steps", type=int, default=50, help="simulated steps for counts")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--padded-rows", type=int, default=4)
    parser.add_argument("--timed-steps", type=int, default=2, help="steps timed for throughput")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=sorted(MIXES), default="blend", help="sample mix")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    mix = MIXES[args.mix]

    micro_batch_counts, imbalances, padding_fractions = [], [], []
    for _ in range(args.steps):
        ranks = [
            [sample_segments(rng, mix) for _ in range(args.samples_per_rank)]
            for _ in range(args.ranks)
        ]
        tokens = [sum(n for doc in rank for _, n in doc) for rank in ranks]
        imbalances.append(max(tokens) / statistics.mean(tokens))
        lengths = [sum(n for _, n in doc) for doc in ranks[0]]
        micro_batch_counts.append(len(plan_micro_batches(lengths, args.max_tokens)))
        rows = [lengths[i : i + args.padded_rows] for i in range(0, len(lengths), args.padded_rows)]
        padded = sum(len(r) * max(r) for r in rows)
        padding_fractions.append(1 - sum(lengths) / padded)

    cfg = ModelConfig(
        vocab_size=1024,
        d_model=128,
        num_heads=4,
        num_kv_heads=2,
        num_core_blocks=2,
        vision=VisionConfig(image_size=32, patch_size=4, hidden_size=64, num_layers=1),
    )
    model = SplitVLM(cfg)
    packed_times, padded_times, real_tokens = [], [], []
    for step in range(args.timed_steps):
        segments = [sample_segments(rng, mix) for _ in range(args.samples_per_rank)]
        lengths = [sum(n for _, n in s) for s in segments]
        base = step * args.samples_per_rank

        def doc(i, pad=0, segments=segments, base=base):
            return make_document(base + i, segments[i], cfg.vocab_size, 32, pad)

        docs = [doc(i) for i in range(len(segments))]
        bins = plan_micro_batches(lengths, args.max_tokens)
        packed = [collate([docs[i] for i in b]) for b in bins]
        padded = []
        for start in range(0, len(segments), args.padded_rows):
            rows = range(start, min(start + args.padded_rows, len(segments)))
            longest = max(lengths[i] for i in rows)
            padded.append(collate([doc(i, pad=longest - lengths[i]) for i in rows]))
        real_tokens.append(sum(lengths))
        packed_time, padded_time = paired_step_times(model, packed, padded, args.repeats)
        packed_times.append(packed_time)
        padded_times.append(padded_time)

    packed_tps = sum(real_tokens) / sum(packed_times)
    padded_tps = sum(real_tokens) / sum(padded_times)
    result = {
        "mix": args.mix,
        "samples_per_rank": args.samples_per_rank,
        "ranks": args.ranks,
        "max_tokens": args.max_tokens,
        "micro_batches_per_step_mean": statistics.mean(micro_batch_counts),
        "micro_batches_per_step_max": max(micro_batch_counts),
        "rank_token_imbalance_mean": statistics.mean(imbalances),
        "rank_token_imbalance_max": max(imbalances),
        "padded_rows": args.padded_rows,
        "padding_fraction_padded": statistics.mean(padding_fractions),
        "packed_tokens_per_s": packed_tps,
        "padded_tokens_per_s": padded_tps,
        "packed_over_padded": packed_tps / padded_tps,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"mix {args.mix}: {', '.join(f'{k} {w:.0%}' for k, w in mix)}; image span {IMAGE_TOKENS} tokens"
    )
    print(
        f"micro-batches per step (≤{args.max_tokens} tokens, {args.samples_per_rank} samples): "
        f"mean {result['micro_batches_per_step_mean']:.2f}, max {result['micro_batches_per_step_max']}"
    )
    print(
        f"rank token imbalance (max/mean over {args.ranks} ranks): "
        f"mean {result['rank_token_imbalance_mean']:.3f}, worst {result['rank_token_imbalance_max']:.3f}"
    )
    print(
        f"padded batches of {args.padded_rows} rows: "
        f"{result['padding_fraction_padded']:.0%} of tokens are padding"
    )
    print(f"{'':<10}{'tokens/s':>12}")
    print(f"{'packed':<10}{packed_tps:>12,.0f}")
    print(f"{'padded':<10}{padded_tps:>12,.0f}")
    print(f"packed / padded: {result['packed_over_padded']:.2f}x")


if __name__ == "__main__":
    main()
