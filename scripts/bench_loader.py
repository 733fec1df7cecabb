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

    python scripts/bench_loader.py --photos            # the photo mix instead: image decoding alone

`--photos` times image decoding alone, one thread: the trainer's `decode_rgb` against PIL's
plain full-size decode and resize (`Image.open(...).convert("RGB").resize(size, BICUBIC)`, made
an array like ours), on generated JPEGs of photo and document sizes (640x480, 1024x768,
1700x2200; quality 90; each also stored sideways with an EXIF orientation), to a target of at
most `--photo-size` px keeping the aspect ratio and to the square. The two alternate image by
image for `--photo-repeats` rounds; medians of this thread's CPU time (µs per image per core,
what other work on the machine does not inflate) and of wall time. Also the resize alone, PIL's
BICUBIC against ours.
"""

from __future__ import annotations

import argparse
import io
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
    parser.add_argument(
        "--photos", action="store_true", help="time image decoding on the photo mix instead"
    )
    parser.add_argument("--photo-size", type=int, default=384, help="--photos: target px")
    parser.add_argument("--photo-repeats", type=int, default=15)
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


PHOTO_MIX = {  # name: (displayed width, height, a document page rather than a photo)
    "photo 640x480": (640, 480, False),
    "photo 1024x768": (1024, 768, False),
    "document 1700x2200": (1700, 2200, True),
}
PHOTO_SPEEDUP_TARGET = 2.0  # decode_rgb at least 2x faster per image than PIL's plain path


def photo_pixels(width: int, height: int, document: bool, seed: int):
    """uint8 (H, W, 3) that compresses like a photo: smooth gradients, sharp-edged shapes and
    sensor-like noise; a document is a light page of text-like bars with a picture in it."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)

    def gradients(w, h):
        return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (w, h), Image.BICUBIC
        )

    if document:
        image = Image.new("RGB", (width, height), (245, 244, 240))
        draw = ImageDraw.Draw(image)
        for y in range(height // 12, height * 11 // 12, height // 45):
            x = width // 10
            while x < width * 9 // 10:
                word = int(rng.integers(width // 60, width // 12))
                draw.rectangle([x, y, x + word, y + height // 110], fill=(30, 30, 35))
                x += word + width // 80
        image.paste(gradients(width // 2, height // 5), (width // 5, height // 2))
    else:
        image = gradients(width, height)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = [
                x,
                y,
                x + int(rng.integers(10, width // 3)),
                y + int(rng.integers(10, height // 3)),
            ]
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def photo_jpeg(pixels, orientation: int) -> bytes:
    """JPEG, quality 90; with orientation 6 the pixels are stored turned a quarter left and the
    EXIF tag says to turn them back, as a camera held upright writes them."""
    from PIL import Image

    image = Image.fromarray(pixels)
    options = {}
    if orientation == 6:
        image = image.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def time_photos(args) -> dict:
    """µs per image, one thread: `decode_rgb` against PIL's plain full-size decode + resize."""
    import numpy as np
    import torch
    from PIL import Image

    from trainer.data.decode import _resize, decode_rgb
    from trainer.data.shards import MAX_IMAGE_PIXELS

    torch.set_num_threads(1)
    side = args.photo_size

    def pil_plain(blob, size):
        return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize(size, Image.BICUBIC))

    def ours(blob, size):
        return decode_rgb(blob, MAX_IMAGE_PIXELS, size)

    cases = []  # (row, blob, target size)
    for seed, (name, (width, height, document)) in enumerate(PHOTO_MIX.items()):
        pixels = photo_pixels(width, height, document, seed)
        scale = side / max(width, height)
        for orientation in (1, 6):
            blob = photo_jpeg(pixels, orientation)
            for target, size in (
                ("fit", (round(width * scale), round(height * scale))),
                ("square", (side, side)),
            ):
                row = {
                    "image": name,
                    "orientation": orientation,
                    "kib": len(blob) // 1024,
                    "target": target,
                    "size": list(size),
                    **{key: [] for key in TIMES},
                }
                cases.append((row, blob, size))
    methods = {"ours": ours, "pil": pil_plain}
    for _, blob, size in cases:  # warm both paths
        assert ours(blob, size).shape == (size[1], size[0], 3)
        pil_plain(blob, size)
    for repeat in range(args.photo_repeats):
        for row, blob, size in cases:
            # Alternated image by image, each going first in turn: a slow spell hits both.
            order = list(methods) if repeat % 2 == 0 else list(methods)[::-1]
            for name in order:
                started, started_cpu = time.perf_counter(), time.thread_time()
                methods[name](blob, size)
                row[f"{name}_cpu_us"].append(1e6 * (time.thread_time() - started_cpu))
                row[f"{name}_us"].append(1e6 * (time.perf_counter() - started))
    rows = []
    for row, _, _ in cases:
        row.update({key: float(np.median(row[key])) for key in TIMES})
        rows.append({**row, **_speedups(row)})
    mix = {}
    for target in ("fit", "square"):
        chosen = [row for row in rows if row["target"] == target]
        means = {key: sum(row[key] for row in chosen) / len(chosen) for key in TIMES}
        mix[target] = {**means, **_speedups(means)}
    return {
        "photo_size": side,
        "repeats": args.photo_repeats,
        "rows": rows,
        "mix": mix,
        "resize_only": _time_resize_only(args, _resize),
        "speedup_target": PHOTO_SPEEDUP_TARGET,
        # Per core: on CPU time.
        "target_met_mix": all(m["speedup"] >= PHOTO_SPEEDUP_TARGET for m in mix.values()),
        "target_met_every_image": all(r["speedup"] >= PHOTO_SPEEDUP_TARGET for r in rows),
    }


TIMES = ("ours_cpu_us", "pil_cpu_us", "ours_us", "pil_us")  # medians: CPU (this thread), wall


def _speedups(times: dict) -> dict:
    return {
        "speedup": times["pil_cpu_us"] / times["ours_cpu_us"],
        "wall_speedup": times["pil_us"] / times["ours_us"],
    }


def _time_resize_only(args, resize) -> dict:
    """The resize alone on the same decoded 640x480 photo to the fit target: PIL's BICUBIC
    against ours (`decode._resize`), CPU time, and how far apart their outputs are."""
    import numpy as np
    from PIL import Image

    pixels = photo_pixels(640, 480, False, 0)
    image = Image.fromarray(pixels)
    size = (args.photo_size, round(480 * args.photo_size / 640))
    calls = {"pil": lambda: image.resize(size, Image.BICUBIC), "ours": lambda: resize(pixels, size)}
    timings = {name: [] for name in calls}
    for _ in range(args.photo_repeats):
        for name, call in calls.items():
            started = time.thread_time()
            call()
            timings[name].append(1e6 * (time.thread_time() - started))
    difference = np.abs(calls["ours"]().astype(int) - np.asarray(calls["pil"]()))
    result = {f"{name}_cpu_us": float(np.median(times)) for name, times in timings.items()}
    return {
        **result,
        "size": list(size),
        "speedup": result["pil_cpu_us"] / result["ours_cpu_us"],
        "max_difference": int(difference.max()),
        "fraction_different": float((difference > 0).mean()),
    }


def print_photos(result: dict) -> None:
    print(
        f"photo mix, one thread, medians of {result['repeats']} rounds: decode_rgb against PIL's "
        f"full decode + BICUBIC resize, to ≤ {result['photo_size']} px; µs per image"
    )
    print(
        f"{'image':20} {'EXIF':>4} {'KiB':>4} {'to':>7} | {'CPU: ours':>9} {'PIL':>7} "
        f"{'speed-up':>8} | {'wall: ours':>10} {'PIL':>7} {'speed-up':>8}"
    )

    def times(run: dict) -> str:
        return (
            f"{run['ours_cpu_us']:9,.0f} {run['pil_cpu_us']:7,.0f} {run['speedup']:7.2f}x | "
            f"{run['ours_us']:10,.0f} {run['pil_us']:7,.0f} {run['wall_speedup']:7.2f}x"
        )

    for row in result["rows"]:
        size = "x".join(map(str, row["size"]))
        print(f"{row['image']:20} {row['orientation']:>4} {row['kib']:>4} {size:>7} | {times(row)}")
    for target, mix in result["mix"].items():
        print(f"{'mix, mean per image':20} {'':>4} {'':>4} {target:>7} | {times(mix)}")
    resize = result["resize_only"]
    print(
        f"resize only, 640x480 → {'x'.join(map(str, resize['size']))}: PIL BICUBIC "
        f"{resize['pil_cpu_us']:,.0f} µs, ours {resize['ours_cpu_us']:,.0f} µs "
        f"({resize['speedup']:.2f}x); outputs differ by at most {resize['max_difference']} "
        f"({100 * resize['fraction_different']:.2f}% of values)"
    )
    target = result["speedup_target"]
    slow = sorted({row["image"] for row in result["rows"] if row["speedup"] < target})
    print(
        f"target ≥ {target:g}x faster per image per core (CPU time): on the mix "
        f"{'met' if result['target_met_mix'] else 'NOT met'}; for every image "
        + ("met" if not slow else f"NOT met ({', '.join(slow)} below)")
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.photos:
        result = time_photos(args)
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print_photos(result)
        return 0
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
            runs["raw"].append(time_raw(args, cfg, model_cfg.num_image_tokens()))
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
