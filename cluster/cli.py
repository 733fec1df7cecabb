"""`splitvlm`: the command line. The only place that parses argv.

Exit codes: 0 ok; 2 usage or config error (one line on stderr, no traceback); 1 runtime failure
(one line on stderr; the traceback goes to RUN/error.log for `train`, to a file in the temp
directory otherwise, and to stderr as well when SPLITVLM_DEBUG=1); 128 + the signal number for a
`train` stopped by SIGINT (130) or SIGTERM (143).

Each subcommand is registered by its own `add_<name>_parser(commands)`, listed in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _add_command(commands, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its one-line help and an example."""
    return commands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set optim.lr=1e-3",
    )


def _read_config(config: str, overrides: list[str]):
    """A YAML file, or `-`: YAML on stdin (how `splitvlm submit` hands a job its config)."""
    from trainer.config import load_config

    if config != "-":
        return load_config(config, overrides)
    with tempfile.NamedTemporaryFile("w", prefix="splitvlm-stdin-", suffix=".yaml") as file:
        file.write(sys.stdin.read())
        file.flush()
        return load_config(file.name, overrides)


def _cmd_train(args) -> int:
    from cluster.launch import prepare_config, run_job

    cfg = prepare_config(_read_config(args.config, args.overrides))
    args.error_log = Path(cfg.run.dir) / "error.log"
    summary = run_job(cfg)
    print("summary: " + json.dumps(summary), flush=True)
    if "signal" in summary:
        checkpoint = "a checkpoint" if cfg.checkpoint.on_stop else "no new checkpoint"
        print(
            f"splitvlm train: stopped by {summary['signal']} at step {summary['step']} "
            f"({checkpoint}; start the same command again to resume)",
            file=sys.stderr,
        )
        return 128 + signal.Signals[summary["signal"]].value
    return EXIT_OK


def add_train_parser(commands) -> None:
    parser = _add_command(
        commands,
        "train",
        "train a model from a YAML config",
        "splitvlm train yaml/tiny.yaml --set run.steps=50",
    )
    parser.add_argument("config", help="a YAML file, e.g. yaml/tiny.yaml; '-': read it from stdin")
    _add_overrides(parser)
    parser.set_defaults(func=_cmd_train)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="the cluster's dashboard / Jobs API, e.g. http://HEAD:8265 "
        "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)",
    )


def _cmd_submit(args) -> int:
    from cluster.jobs import submit

    cfg = _read_config(args.config, args.overrides)
    if not Path(cfg.run.dir).is_absolute():
        print(
            f"note: run.dir={cfg.run.dir} is relative: it resolves in the job's working directory "
            "on the cluster, which goes away with the cluster",
            file=sys.stderr,
        )
    job_id = submit(cfg, args.address, Path(args.working_dir) if args.working_dir else None)
    print(job_id, flush=True)
    print(
        f"follow it: splitvlm logs {job_id} --follow; stop it: splitvlm stop {job_id}",
        file=sys.stderr,
    )
    return EXIT_OK


def add_submit_parser(commands) -> None:
    parser = _add_command(
        commands,
        "submit",
        "submit a training job to a Ray cluster through its Jobs API and print the job id",
        "splitvlm submit yaml/tiny.yaml --address http://HEAD:8265 --set run.dir=/shared/runs/a",
    )
    parser.add_argument("config", help="a YAML file; relative paths resolve on the cluster")
    _add_overrides(parser)
    _add_address(parser)
    parser.add_argument(
        "--working-dir",
        help="uploaded as the job's working directory, .gitignore honoured "
        "(default: the splitvlm checkout this command runs from)",
    )
    parser.set_defaults(func=_cmd_submit)


def _cmd_status(args) -> int:
    from cluster.jobs import status_lines

    for line in status_lines(args.address, args.job_id):
        print(line)
    return EXIT_OK


def add_status_parser(commands) -> None:
    parser = _add_command(
        commands,
        "status",
        "show the state of a submitted job, or of all jobs",
        "splitvlm status raysubmit_XXXX --address http://HEAD:8265",
    )
    parser.add_argument("job_id", nargs="?", metavar="JOB_ID", help="default: every job")
    _add_address(parser)
    parser.set_defaults(func=_cmd_status)


def _cmd_logs(args) -> int:
    from cluster.jobs import print_logs

    print_logs(args.address, args.job_id, args.follow)
    return EXIT_OK


def add_logs_parser(commands) -> None:
    parser = _add_command(
        commands,
        "logs",
        "print or follow a job's logs",
        "splitvlm logs raysubmit_XXXX --follow --address http://HEAD:8265",
    )
    parser.add_argument("job_id", metavar="JOB_ID")
    parser.add_argument(
        "--follow", "-f", action="store_true", help="keep printing until the job ends"
    )
    _add_address(parser)
    parser.set_defaults(func=_cmd_logs)


def _cmd_stop(args) -> int:
    from cluster.jobs import stop

    print(stop(args.address, args.job_id, args.wait))
    return EXIT_OK


def add_stop_parser(commands) -> None:
    parser = _add_command(
        commands,
        "stop",
        "stop a submitted job (it finishes its step and saves a checkpoint first)",
        "splitvlm stop raysubmit_XXXX --address http://HEAD:8265",
    )
    parser.add_argument("job_id", metavar="JOB_ID")
    parser.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="wait this long for the job to end, then print its status (0: do not wait)",
    )
    _add_address(parser)
    parser.set_defaults(func=_cmd_stop)


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


def add_shards_parser(commands) -> None:
    from trainer.data.shards import MAX_IMAGE_PIXELS, SHARD_SIZE_LIMIT

    parser = _add_command(
        commands,
        "shards",
        "convert a data set into MDS shards, or write the built-in demo task",
        "splitvlm shards llava.json --format llava --image-root images --out data/llava/train",
    )
    parser.add_argument(
        "source", help="'demo', or a file or folder in the format given by --format"
    )
    parser.add_argument("--out", required=True, help="output directory (the MDS index goes here)")
    parser.add_argument(
        "--format",
        choices=["text", "llava", "captions", "webdataset"],
        help="text: JSONL {text}; llava: conversation JSON/JSONL; captions: images + a "
        "JSONL/CSV of captions; webdataset: .tar files",
    )
    parser.add_argument(
        "--image-root", default="", help="where image paths point (default: the source's folder)"
    )
    parser.add_argument(
        "--tokenizer",
        default="",
        help="a local transformers tokenizer directory: exact token counts (default: estimates)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="skip samples with more text tokens (needs --tokenizer)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="skip images with more pixels (decompression bombs); 0: no limit",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="worker processes (default: every core)"
    )
    parser.add_argument("--compression", default="zstd", help="MDS shard compression, or 'none'")
    parser.add_argument(
        "--size-limit",
        type=int,
        default=SHARD_SIZE_LIMIT,
        help="bytes per shard before compression",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is up to date"
    )
    parser.add_argument("--seed", type=int, default=0, help="demo only: the generator seed")
    parser.set_defaults(func=_cmd_shards)


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


def _cmd_eval(args) -> int:
    from trainer.inference import evaluate, load_for_inference

    model, cfg, decoder = load_for_inference(Path(args.checkpoint))
    if args.data:
        cfg.data.path = args.data
    result = evaluate(model, cfg, decoder, split=args.split, limit=args.limit)
    print(json.dumps(result, indent=1))
    return EXIT_OK


def add_eval_parser(commands) -> None:
    parser = _add_command(
        commands,
        "eval",
        "exact-match accuracy of greedy answers and text loss on a held-out split",
        "splitvlm eval runs/tiny",
    )
    parser.add_argument("checkpoint", help="a run directory, checkpoint or exported model")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--data", default="", help="shard directory (default: the run's)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N samples")
    parser.set_defaults(func=_cmd_eval)


def _cmd_export(args) -> int:
    from trainer.export import export_checkpoint, export_to_hf

    if args.to_hf:
        transformers_class = export_to_hf(Path(args.checkpoint), Path(args.out))
        print(f"exported {args.checkpoint} to {args.out} as a transformers {transformers_class}")
        return EXIT_OK
    source = export_checkpoint(Path(args.checkpoint), Path(args.out))
    print(f"exported {source} to {args.out}")
    return EXIT_OK


def add_export_parser(commands) -> None:
    parser = _add_command(
        commands,
        "export",
        "write a checkpoint as one safetensors model plus its config, for inference anywhere",
        "splitvlm export runs/tiny --out exports/tiny",
    )
    parser.add_argument(
        "checkpoint", help="a run directory (its latest checkpoint) or a step_NNNNNNN directory"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--to-hf",
        action="store_true",
        help="write the transformers checkpoint of the model's design instead "
        "(LLaVA: LlavaForConditionalGeneration; docs/designs.md)",
    )
    parser.set_defaults(func=_cmd_export)


def _cmd_import_hf(args) -> int:
    from models.hf_designs import import_hf

    transformers_class = import_hf(Path(args.checkpoint), Path(args.out))
    print(f"imported the {transformers_class} at {args.checkpoint} to {args.out}")
    return EXIT_OK


def add_import_hf_parser(commands) -> None:
    parser = _add_command(
        commands,
        "import-hf",
        "write a transformers checkpoint of a classic VLM design as a splitvlm export",
        "splitvlm import-hf checkpoints/llava-1.5-7b-hf --out exports/llava",
    )
    parser.add_argument(
        "checkpoint", help="a transformers checkpoint directory (config.json, safetensors)"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(func=_cmd_import_hf)


def _cmd_plot(args) -> int:
    from trainer.plot import plot_run

    path = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return EXIT_OK


def add_plot_parser(commands) -> None:
    parser = _add_command(
        commands,
        "plot",
        "plot a run's losses, learning rate, throughput and MFU to a PNG",
        "splitvlm plot runs/tiny --out tiny.png",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    parser.add_argument(
        "--out", metavar="FILE", help="the PNG to write (default RUN_DIR/metrics.png)"
    )
    parser.set_defaults(func=_cmd_plot)


def _cmd_generate(args) -> int:
    from PIL import Image

    from trainer.inference import generate_image, load_for_inference

    model, _, decoder = load_for_inference(Path(args.checkpoint))
    image, scales = generate_image(
        model, decoder, args.prompt, seed=args.seed, size=args.size, guidance_scale=args.guidance
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Tiny images are upscaled for viewing (aspect ratio kept); each scale, coarse to fine, left
    # to right.
    zoom = max(1, 128 // min(image.size))
    cell = (image.width * zoom, image.height * zoom)
    strip = Image.new("RGB", (cell[0] * len(scales), cell[1]))
    for i, scale in enumerate(scales):
        strip.paste(scale.resize(cell, Image.NEAREST), (i * cell[0], 0))
    strip.save(out)
    print(f"wrote {out} ({len(scales)} scales, coarse to fine)")
    return EXIT_OK


def add_generate_parser(commands) -> None:
    parser = _add_command(
        commands,
        "generate",
        "generate an image from a text prompt: coarse to fine (pixel-target models) or code by "
        "code (Janus)",
        'splitvlm generate runs/tiny_gen --prompt "draw a red circle at the top left ." '
        "--out red.png",
    )
    parser.add_argument("checkpoint", help="a run directory, checkpoint or exported model")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", default="generated.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size",
        type=_image_size,
        default=None,
        metavar="WxH",
        help="image size for native-resolution models (rounded to their patch grid)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=5.0,
        help="classifier-free guidance scale of Janus's code sampling (1: none)",
    )
    parser.set_defaults(func=_cmd_generate)


def _image_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) and int(height)):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 64x32")
    return int(width), int(height)


COMMANDS = (
    add_train_parser,
    add_submit_parser,
    add_status_parser,
    add_logs_parser,
    add_stop_parser,
    add_shards_parser,
    add_eval_parser,
    add_export_parser,
    add_import_hf_parser,
    add_plot_parser,
    add_generate_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitvlm",
        description="Train split-head, late-merge vision-language models on Ray.",
        epilog="exit codes: 0 ok, 2 usage or config error, 1 runtime failure "
        "(SPLITVLM_DEBUG=1 prints tracebacks)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(commands)
    return parser


def _report_failure(args, err: BaseException) -> None:
    """One line on stderr; the traceback into a log file (and stderr with SPLITVLM_DEBUG=1)."""
    text = "".join(traceback.format_exception(err))
    log = getattr(args, "error_log", None)
    try:
        if log is None:
            fd, name = tempfile.mkstemp(prefix=f"splitvlm-{args.command}-", suffix=".log")
            os.close(fd)
            log = Path(name)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
        where = f" (traceback in {log})"
    except OSError:
        where = ""
    if os.environ.get("SPLITVLM_DEBUG") == "1":
        print(text, file=sys.stderr, end="")
    first_line = next((line for line in str(err).splitlines() if line.strip()), "")
    print(
        f"splitvlm {args.command}: failed: {type(err).__name__}: {first_line}{where}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        # ConfigError and every other user error: one line, no traceback.
        print(f"splitvlm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        # A plain Ctrl-C (130), or a second SIGINT/SIGTERM during `train` (cluster.launch).
        detail = f": {err}" if str(err) else ""
        print(f"splitvlm {args.command}: interrupted{detail}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception as err:
        data_error = _data_error(err)
        if data_error is not None:
            # The data went bad during a run: a runtime failure, but one line says all there is.
            print(f"splitvlm {args.command}: data error: {data_error}", file=sys.stderr)
            return EXIT_FAILURE
        _report_failure(args, err)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
