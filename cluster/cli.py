"""`splitvlm`: the command line. The only place that parses argv.

Exit codes: 0 ok, 2 usage or config error (one line on stderr, no traceback), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def _cmd_export(args) -> int:
    from trainer.export import export_checkpoint

    source = export_checkpoint(Path(args.checkpoint), Path(args.out))
    print(f"exported {source} to {args.out}")
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

    export = commands.add_parser(
        "export",
        help="write a checkpoint as one safetensors model for inference",
        description=(
            "Consolidate a checkpoint of any engine (local, fsdp, deepspeed) into one "
            "safetensors model plus its config and tokenizer, loadable with "
            "models.split_vlm.SplitVLM.from_pretrained(DIR) without torch.distributed. "
            "Example: splitvlm export runs/tiny --out exports/tiny"
        ),
    )
    export.add_argument(
        "checkpoint", help="a checkpoint directory (step_NNNNNNN) or a run directory (its latest)"
    )
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(func=_cmd_export)
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
