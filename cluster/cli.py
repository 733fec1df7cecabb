"""`splitvlm`: the command line. The only place that parses argv.

Exit codes: 0 ok, 2 usage or config error (one line on stderr, no traceback), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _cmd_train(args) -> int:
    from cluster.launch import prepare_config, run_job
    from trainer.config import load_config

    cfg = prepare_config(load_config(args.config, args.overrides))
    summary = run_job(cfg)
    print("summary: " + json.dumps(summary), flush=True)
    return 0


def _cmd_shards(args) -> int:
    from trainer.data.demo import write_demo

    if args.source != "demo":
        raise ValueError(f"unknown shard source {args.source!r}; valid: demo")
    written = write_demo(Path(args.out), seed=args.seed)
    print(f"wrote {written} samples and a tokenizer to {args.out}")
    return 0


def _cmd_eval(args) -> int:
    from trainer.inference import evaluate, load_for_inference

    model, cfg, decoder = load_for_inference(Path(args.checkpoint))
    if args.data:
        cfg.data.path = args.data
    result = evaluate(model, cfg, decoder, split=args.split, limit=args.limit)
    print(json.dumps(result, indent=1))
    return 0


def _cmd_generate(args) -> int:
    from trainer.inference import generate_image, load_for_inference

    model, _, decoder = load_for_inference(Path(args.checkpoint))
    image, scales = generate_image(model, decoder, args.prompt, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Tiny images are upscaled for viewing; each scale, coarse to fine, left to right.
    cell = max(128, image.width)
    strip = Image.new("RGB", (cell * len(scales), cell))
    for i, scale in enumerate(scales):
        strip.paste(scale.resize((cell, cell), Image.NEAREST), (i * cell, 0))
    strip.save(out)
    print(f"wrote {out} ({len(scales)} scales, coarse to fine)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitvlm", description="Train split-head, late-merge vision-language models on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config. Example: splitvlm train yaml/tiny.yaml --set run.steps=50",
    )
    train.add_argument("config", help="a YAML file, e.g. yaml/tiny.yaml")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set optim.lr=1e-3",
    )
    train.set_defaults(func=_cmd_train)

    shards = commands.add_parser(
        "shards",
        help="write MDS shards",
        description="Write MDS shards. Example: splitvlm shards demo --out data/demo",
    )
    shards.add_argument("source", help="what to convert: 'demo' writes the built-in demo task")
    shards.add_argument("--out", required=True, help="output directory")
    shards.add_argument("--seed", type=int, default=0)
    shards.set_defaults(func=_cmd_shards)

    evaluate = commands.add_parser(
        "eval",
        help="exact-match accuracy and text loss on a held-out split",
        description="Evaluate a checkpoint. Example: splitvlm eval runs/tiny",
    )
    evaluate.add_argument("checkpoint", help="a run directory, checkpoint or exported model")
    evaluate.add_argument("--split", default="heldout")
    evaluate.add_argument("--data", default="", help="shard directory (default: the run's)")
    evaluate.add_argument("--limit", type=int, default=0, help="evaluate the first N samples")
    evaluate.set_defaults(func=_cmd_eval)

    generate = commands.add_parser(
        "generate",
        help="generate an image coarse to fine from a text prompt (pixel-target models)",
        description=(
            "Generate an image. Example: splitvlm generate runs/tiny_gen "
            '--prompt "draw a red circle at the top left ." --out red.png'
        ),
    )
    generate.add_argument("checkpoint", help="a run directory, checkpoint or exported model")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--out", default="generated.png")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        # ConfigError and every other user error: one line, no traceback.
        print(f"splitvlm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"splitvlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
