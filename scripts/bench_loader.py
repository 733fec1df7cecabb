"""Data pipeline throughput: streaming + decode + pack against a raw MDS iteration of the same
shards, measured in the same run, with 0, 2 and 4 DataLoader workers; and the time to the first
batch when resuming deep into an epoch against a fresh start.

    python scripts/bench_loader.py                     # writes the demo shards to a temp dir
    python scripts/bench_loader.py --data data/demo --samples 4096 --json

"raw" iterates the same StreamingDataset configuration (same streams, shuffle, batch size and
workers) and returns the stored samples undecoded; "pipeline" is what training runs: the
rank's sample ids from streaming's partition, read by index and decoded (tokenize, images →
tensors, spans, masks) in the loader workers, then packed in this process.
Times per sample are measured after the first batch (startup is reported separately); raw and
pipeline run alternately `--repeats` times and each reports its median run, with the CPU time
per sample of this process and of its loader workers (Linux). `--what-if` adds two experiments
that are not the trainer's code (`WHAT_IF`): packing in the workers, and also no tokenizing.
Last, in one process: what decoding costs from a list, inside streaming's iterator (how the
loader read until it read by index), read by index, and what the iterator costs alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="", help="a directory of MDS splits (default: demo)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokenizer", default="", help="default: DATA/tokenizer")
    parser.add_argument("--samples", type=int, default=4096, help="samples timed per case")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument(
        "--repeats", type=int, default=3, help="raw and pipeline alternately; medians reported"
    )
    parser.add_argument("--image-size", type=int, default=32, help="model.vision.image_size")
    parser.add_argument(
        "--resume-at", type=int, default=1_000_000, help="sample to resume at (0: skip this part)"
    )
    parser.add_argument("--resume-workers", type=int, default=2)
    parser.add_argument(
        "--what-if",
        action="store_true",
        help="also time two experiments that are not the trainer's code (see WHAT_IF)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    return parser.parse_args(argv)


def data_config(args, data: Path, num_workers: int, **extra):
    from trainer.config import DataConfig

    return DataConfig(
        path=str(data),
        split=args.split,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        num_workers=num_workers,
        **extra,
    )


def _keep_list(batch):
    return batch


def time_raw(args, cfg, num_image_tokens: int) -> dict:
    """Plain StreamingDataset over the same streams: read and return the stored samples."""
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    from trainer.data.stream import build_streams, streaming_kwargs

    dataset = StreamingDataset(
        streams=build_streams(cfg, cfg.split), **streaming_kwargs(cfg, cfg.batch_size)
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        collate_fn=_keep_list,
        drop_last=True,
        num_workers=cfg.num_workers,
    )

    def tokens(batch):
        return sum(s["num_text_tokens"] + num_image_tokens * len(s["image_sizes"]) for s in batch)

    batches = iter(loader)
    result = _time_batches(batches, args.samples, lambda batch: (len(batch), tokens(batch)))
    # To the end of the epoch: streaming's iterator left mid-epoch keeps its threads polling,
    # in this process when there are no workers, and would slow down what is timed next.
    for _ in batches:
        pass
    return result


def build_pipeline(args, cfg, tokenizer, model_cfg):
    from trainer.data.decode import SampleDecoder
    from trainer.data.stream import StepBatches
    from trainer.distributed import WorldInfo

    decoder = SampleDecoder(
        tokenizer, model_cfg, cfg.max_tokens, max_image_pixels=cfg.max_image_pixels
    )
    return StepBatches(cfg, decoder, WorldInfo())


def time_pipeline(args, cfg, tokenizer, model_cfg, what_if: str = "") -> dict:
    from trainer.data.packing import layout_options, pack_step

    with _what_if(what_if, cfg, tokenizer, model_cfg):
        batches = build_pipeline(args, cfg, tokenizer, model_cfg)

        def steps():
            while True:
                yield batches.next_step()

        def measure(step):
            docs, skipped = step
            if what_if:  # packed in the workers
                return len(docs) + len(skipped), sum(doc.num_tokens for doc in docs)
            micro_batches = pack_step(docs, cfg.max_tokens, **layout_options(model_cfg, "cpu"))
            return len(docs) + len(skipped), sum(mb.num_tokens for mb in micro_batches)

        return _time_batches(steps(), args.samples, measure)


WHAT_IF = {
    "pack_in_workers": "each loader worker also packs its batch; the main process only receives",
    "pack_in_workers_no_tokenizer": "that, and no tokenizing (renders looked up in a table)",
}


@contextmanager
def _what_if(what_if: str, cfg, tokenizer, model_cfg):
    """Experiments, not the trainer's code (`WHAT_IF`): patches the loader for the duration.
    Workers are forked inside, so they inherit the patches."""
    if not what_if:
        yield
        return
    from trainer.data import stream
    from trainer.data.decode import ChatRenderer
    from trainer.data.packing import layout_options, pack_step

    options = layout_options(model_cfg, "cpu")
    saved = stream.FlatBatch.__init__, ChatRenderer.__call__

    def pack_then_flatten(self, items):
        # The micro-batches are not sent back: their trip out of the worker is not counted.
        docs = [item for item in items if isinstance(item, stream.Document)]
        pack_step(docs, cfg.max_tokens, **options)
        saved[0](self, items)

    stream.FlatBatch.__init__ = pack_then_flatten
    if what_if == "pack_in_workers_no_tokenizer":
        renders = _render_table(cfg, tokenizer)
        ChatRenderer.__call__ = lambda self, sample, prompt_only=False: renders[sample["id"]]
    try:
        yield
    finally:
        stream.FlatBatch.__init__, ChatRenderer.__call__ = saved


def _render_table(cfg, tokenizer) -> dict:
    """Every sample's rendered tokens by id, as pre-tokenized shards would hold them."""
    from streaming import StreamingDataset

    from trainer.data.decode import ChatRenderer
    from trainer.data.stream import build_streams

    render = ChatRenderer(tokenizer)
    dataset = StreamingDataset(streams=build_streams(cfg, cfg.split), batch_size=1)
    samples = (dataset[index] for index in range(dataset.num_samples))
    return {sample["id"]: render(sample) for sample in samples}


def _time_batches(batches, num_samples: int, measure) -> dict:
    started = time.perf_counter()
    first = measure(next(batches))
    first_batch = time.perf_counter() - started
    samples = tokens = 0
    workers = _children()  # started by now
    cpu_before = _cpu_seconds([os.getpid()]), _cpu_seconds(workers)
    steady = time.perf_counter()
    while samples < num_samples:
        num, num_tokens = measure(next(batches))
        samples += num
        tokens += num_tokens
    seconds = time.perf_counter() - steady
    main_cpu, workers_cpu = (
        after - before
        for after, before in zip(
            (_cpu_seconds([os.getpid()]), _cpu_seconds(workers)), cpu_before, strict=True
        )
    )
    assert first[0] > 0
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "us_per_sample": 1e6 * seconds / samples,
        "first_batch_s": first_batch,
        # CPU time (user + system) per sample, this process (all threads) and its loader workers
        "main_cpu_us_per_sample": 1e6 * main_cpu / samples,
        "workers_cpu_us_per_sample": 1e6 * workers_cpu / samples,
    }


def _children() -> list[int]:
    """PIDs of this process's children (Linux /proc; empty elsewhere)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # the field after the state is the parent's PID
            pids.append(int(stat.parent.name))
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited: its time is lost, so stop at an epoch's end, not after it
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def time_resume(args, data: Path, tokenizer, model_cfg) -> dict:
    """Time to the first step batch at sample 0 and at `--resume-at` of one long epoch."""
    from trainer.config import StreamConfig
    from trainer.data.shards import check_split_dir

    check_split_dir(data / args.split)
    index = json.loads((data / args.split / "index.json").read_text())
    num_samples = sum(shard["samples"] for shard in index["shards"])
    # One epoch longer than the resume point: the stream repeated (the data cursor and the
    # partition work the same way for a repeated stream as for distinct samples).
    repeat = math.ceil((args.resume_at + 100 * args.batch_size) / num_samples)
    cfg = data_config(
        args,
        data,
        args.resume_workers,
        streams=[StreamConfig(path=str(data), repeat=float(repeat))],
    )
    results = {"epoch_samples": repeat * num_samples, "workers": args.resume_workers}
    # The first run warms imports and the page cache; then each case in turn.
    for name, at in (("warmup", 0), ("fresh", 0), ("resumed", args.resume_at)):
        started = time.perf_counter()
        batches = build_pipeline(args, cfg, tokenizer, model_cfg)
        if at:
            batches.seek(epoch=0, sample_in_epoch=at)
        batches.next_step()
        if name != "warmup":
            results[f"{name}_first_batch_s"] = time.perf_counter() - started
        del batches
    results["ratio"] = results["resumed_first_batch_s"] / results["fresh_first_batch_s"]
    return results


def time_decode_in_iterator(args, cfg, tokenizer, model_cfg) -> dict:
    """In one process, µs per sample: decoding samples held in a list, iterating the dataset
    alone, decoding inside streaming's iterator (how the loader read before), and reading by
    index then decoding (how it reads now, `SampleReader`)."""
    from streaming import StreamingDataset

    from trainer.data.decode import SampleDecoder
    from trainer.data.stream import SampleReader, build_streams, streaming_kwargs

    decoder = SampleDecoder(
        tokenizer, model_cfg, cfg.max_tokens, max_image_pixels=cfg.max_image_pixels
    )
    dataset = StreamingDataset(
        streams=build_streams(cfg, cfg.split), **streaming_kwargs(cfg, cfg.batch_size)
    )
    # Whole epochs: an iterator left mid-epoch keeps its threads reading the shards.
    count = dataset.num_samples

    def per_sample(decode: bool, source) -> float:
        started = time.perf_counter()
        for index, sample in enumerate(source):
            if decode:
                decoder(sample, index)
        return 1e6 * (time.perf_counter() - started) / count

    def by_index() -> float:
        reader = SampleReader(dataset, decoder)
        started = time.perf_counter()
        for index in range(count):
            reader[0, index]
        return 1e6 * (time.perf_counter() - started) / count

    held = [dataset[i] for i in range(count)]
    return {
        "decode_from_list_us": per_sample(True, held),
        "iterate_only_us": per_sample(False, dataset),
        "decode_while_iterating_us": per_sample(True, dataset),
        "read_by_index_and_decode_us": by_index(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from models.config import ModelConfig, VisionConfig
    from trainer.data.decode import load_tokenizer
    from trainer.data.demo import write_demo

    temp = None
    data = Path(args.data) if args.data else None
    if data is None:
        temp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        data = Path(temp.name)
        write_demo(data, sizes={args.split: 6000})
    tokenizer = load_tokenizer(args.tokenizer or data / "tokenizer")
    model_cfg = ModelConfig(vision=VisionConfig(image_size=args.image_size))
    rows = []
    for num_workers in args.workers:
        cfg = data_config(args, data, num_workers)
        what_ifs = list(WHAT_IF) if args.what_if and num_workers else []
        runs = {name: [] for name in ["raw", "pipeline", *what_ifs]}
        for _ in range(args.repeats):  # alternated, so a slow spell of the machine hits all
            runs["raw"].append(time_raw(args, cfg, model_cfg.num_image_tokens))
            runs["pipeline"].append(time_pipeline(args, cfg, tokenizer, model_cfg))
            for name in what_ifs:
                runs[name].append(time_pipeline(args, cfg, tokenizer, model_cfg, name))
        medians = {name: _median_run(name_runs) for name, name_runs in runs.items()}
        raw, pipeline = medians["raw"], medians["pipeline"]
        rows.append(
            {
                "workers": num_workers,
                "raw": raw,
                "pipeline": pipeline,
                "time_ratio": pipeline["us_per_sample"] / raw["us_per_sample"],
                "what_if": {
                    name: {
                        **medians[name],
                        "time_ratio": medians[name]["us_per_sample"] / raw["us_per_sample"],
                    }
                    for name in what_ifs
                },
                "runs": runs,
            }
        )
        if not args.json:
            print(_row_line(rows[-1]), flush=True)
            for name, run in rows[-1]["what_if"].items():
                print(
                    f"  what if {name} ({WHAT_IF[name]}): {run['samples_per_s']:,.0f} samples/s, "
                    f"{run['time_ratio']:.2f}x raw, CPU us per sample {_cpu(run)}",
                    flush=True,
                )
    result = {"batch_size": args.batch_size, "samples": args.samples, "loader": rows}
    if args.resume_at:
        result["resume"] = time_resume(args, data, tokenizer, model_cfg)
    result["in_iterator"] = time_decode_in_iterator(
        args, data_config(args, data, 0), tokenizer, model_cfg
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        resume = result.get("resume")
        if resume:
            print(
                f"first batch, {resume['workers']} workers, epoch of {resume['epoch_samples']:,}: "
                f"fresh {resume['fresh_first_batch_s']:.2f} s, resumed at sample "
                f"{args.resume_at:,} {resume['resumed_first_batch_s']:.2f} s "
                f"(ratio {resume['ratio']:.2f})"
            )
        inside = result["in_iterator"]
        print(
            f"one process, us per sample: decode from a list {inside['decode_from_list_us']:.0f}, "
            f"iterate only {inside['iterate_only_us']:.0f}, decode inside streaming's iterator "
            f"{inside['decode_while_iterating_us']:.0f}, read by index and decode "
            f"{inside['read_by_index_and_decode_us']:.0f}"
        )
    if temp is not None:
        temp.cleanup()
    return 0


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time per sample."""
    return sorted(runs, key=lambda run: run["us_per_sample"])[len(runs) // 2]


def _row_line(row: dict) -> str:
    raw, pipeline = row["raw"], row["pipeline"]
    return (
        f"workers {row['workers']}: raw {raw['samples_per_s']:8,.0f} samples/s "
        f"{raw['tokens_per_s']:9,.0f} tokens/s | pipeline {pipeline['samples_per_s']:8,.0f} "
        f"samples/s {pipeline['tokens_per_s']:9,.0f} tokens/s | time per sample "
        f"{row['time_ratio']:.2f}x raw | CPU us per sample, main + workers: "
        f"raw {_cpu(raw)}, pipeline {_cpu(pipeline)}"
    )


def _cpu(run: dict) -> str:
    return f"{run['main_cpu_us_per_sample']:.0f} + {run['workers_cpu_us_per_sample']:.0f}"


if __name__ == "__main__":
    sys.exit(main())
