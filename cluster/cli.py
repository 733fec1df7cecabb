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
    if args.source == "demo" and args.format in (None, "demo"):
        from trainer.data.demo import write_demo

        written = write_demo(Path(args.out), seed=args.seed)
        print(f"wrote {written} samples and a tokenizer to {args.out}")
        return 0
    from trainer.data.formats import READERS, convert

    if args.format is None:
        raise ValueError(f"--format is required for {args.source!r}; valid: {', '.join(READERS)}")
    report = convert(
        args.source,
        args.format,
        args.out,
        image_root=args.image_root,
        tokenizer=args.tokenizer,
        max_tokens=args.max_tokens,
        max_image_pixels=args.max_image_pixels,
        num_workers=args.workers,
        compression=None if args.compression == "none" else args.compression,
        size_limit=args.size_limit,
        overwrite=args.overwrite,
        progress=True,
    )
    print(report.table(), flush=True)
    if report.num_samples == 0:
        print(f"splitvlm shards: error: no usable samples in {args.source}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _data_error(err: BaseException):
    """The trainer's DataError behind `err`, also when it comes back wrapped by Ray Train."""
    from trainer.loop import DataError

    seen = set()
    pending = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DataError):
            return current
        pending += [current.__cause__, current.__context__]
        pending += list(getattr(current, "worker_failures", {}).values())
    return None


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
        description=(
            "Convert a data set into MDS shards, or write the built-in demo task. "
            "Examples: splitvlm shards demo --out data/demo; "
            "splitvlm shards llava.json --format llava --image-root images --out data/llava/train"
        ),
    )
    shards.add_argument(
        "source", help="'demo', or a file or folder in the format given by --format"
    )
    shards.add_argument("--out", required=True, help="output directory (the MDS index goes here)")
    shards.add_argument(
        "--format",
        choices=["text", "llava", "captions", "webdataset"],
        help="text: JSONL {text}; llava: conversation JSON/JSONL; captions: images + a "
        "JSONL/CSV of captions; webdataset: .tar files",
    )
    shards.add_argument(
        "--image-root", default="", help="where image paths point (default: the source's folder)"
    )
    shards.add_argument(
        "--tokenizer",
        default="",
        help="a local transformers tokenizer directory: exact token counts (default: estimates)",
    )
    shards.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="skip samples with more text tokens (needs --tokenizer)",
    )
    shards.add_argument(
        "--max-image-pixels",
        type=int,
        default=1 << 26,
        help="skip images with more pixels (decompression bombs); 0: no limit",
    )
    shards.add_argument(
        "--workers", type=int, default=0, help="worker processes (default: every core)"
    )
    shards.add_argument("--compression", default="zstd", help="MDS shard compression, or 'none'")
    shards.add_argument(
        "--size-limit", type=int, default=1 << 26, help="bytes per shard before compression"
    )
    shards.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is up to date"
    )
    shards.add_argument("--seed", type=int, default=0, help="demo only: the generator seed")
    shards.set_defaults(func=_cmd_shards)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        # ConfigError and every other user error: one line, no traceback.
        print(f"splitvlm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        # The data went bad during a run: a runtime failure, but one line says all there is.
        data_error = _data_error(err)
        if data_error is None:
            raise
        print(f"splitvlm {args.command}: data error: {data_error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"splitvlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
