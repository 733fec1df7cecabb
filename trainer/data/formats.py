"""`splitvlm shards SOURCE --format FMT --out DIR`: common VLM data formats → MDS shards.

Formats (docs/data.md has an example of each):
- `text`: JSONL, one `{"text": …}` per line; loss on every token.
- `llava`: LLaVA-style JSON (a list) or JSONL of `{"id", "image": path | [paths],
  "conversations": [{"from": "human" | "gpt" | "system", "value": …}]}`; image paths are
  relative to `image_root` (default: the JSON file's folder). A record with images but no
  `<image>` gets them in front of its first user turn (LLaVA's convention).
- `captions`: a folder of images with a captions file (`metadata|captions.jsonl|csv`, or the
  file itself as SOURCE); columns `file_name` (or `image`, `path`) and `caption` (or `text`).
  Each pair is stored as plain text `<image>caption`: loss on the caption.
- `webdataset`: a `.tar` file or a folder of them; members are grouped by key (the name up to
  the first dot of its base name): images (`key.jpg`, `key.png`, … in name order) plus
  `key.txt` (a caption) or `key.json` (`{"caption"}` or a LLaVA record's `conversations`).

Sources are read in this process, in order; parsing, image checks and token counting run in a
process pool; results come back in source order and one MDSWriter writes them, so the same
inputs always give the same shards, byte for byte. A defective record never stops the
conversion: it is left out and counted by reason (`SKIP_REASONS`), with example ids, in the
summary table and in `DIR/splitvlm_shards.json`.

Re-running: the output is written to `DIR.partial` and renamed to `DIR` when complete. A re-run
whose inputs and options match the manifest of a complete `DIR` does nothing; an interrupted
run leaves only `DIR.partial`, which the next run discards and redoes (with the same result).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from trainer.data.decode import (
    SKIP_REASONS,
    ChatRenderer,
    DecodeError,
    check_image,
    load_tokenizer,
)
from trainer.data.shards import (
    IMAGE_PLACEHOLDER,
    MAX_IMAGE_PIXELS,
    SHARD_HASHES,
    SHARD_SIZE_LIMIT,
    estimate_text_tokens,
    write_shards,
)

MANIFEST = "splitvlm_shards.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
CAPTION_FILES = ("metadata.jsonl", "metadata.csv", "captions.jsonl", "captions.csv")
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MAX_EXAMPLES = 5  # example record ids kept per skip reason


@dataclasses.dataclass
class Options:
    """What every worker process needs to turn a record into a sample."""

    image_root: str
    max_image_pixels: int
    max_tokens: int
    tokenizer: str  # a transformers tokenizer directory; empty: estimated token counts


@dataclasses.dataclass
class Report:
    out: str
    format: str
    num_samples: int = 0
    num_text_tokens: int = 0
    token_count: str = "estimate"  # or "exact": counted with the tokenizer given
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    up_to_date: bool = False  # a re-run that found DIR complete and did nothing

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def table(self) -> str:
        verb = "up to date:" if self.up_to_date else "wrote"
        lines = [
            f"{verb} {self.num_samples:,} samples, {self.num_text_tokens:,} text tokens "
            f"({self.token_count}) in {self.out}"
        ]
        if self.skipped:
            lines.append(f"skipped {self.num_skipped:,} records:")
            lines.append(f"  {'reason':<16} {'count':>8}  examples")
            for reason in SKIP_REASONS:
                if reason in self.skipped:
                    examples = "; ".join(self.examples.get(reason, []))
                    lines.append(f"  {reason:<16} {self.skipped[reason]:>8,}  {examples}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Readers: SOURCE → (tasks, total). A task is a small picklable tuple handled by `build_sample`
# in a worker; `total` is the number of tasks when known cheaply (for the progress bar).


def _read_lines(path: Path) -> tuple[Iterator[tuple[int, bytes]], int]:
    data = path.read_bytes()
    lines = data.split(b"\n")

    def tasks():
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield number, line

    return tasks(), sum(1 for line in lines if line.strip())


def read_text(source: Path, options: Options):
    if not source.is_file():
        raise ValueError(f"--format text needs a JSONL file, got {source}")
    lines, total = _read_lines(source)
    return ((("text", f"{source.stem}-{n:08d}", line) for n, line in lines), total)


def read_llava(source: Path, options: Options):
    if not source.is_file():
        raise ValueError(f"--format llava needs a .json or .jsonl file, got {source}")
    root = options.image_root or str(source.parent)
    if source.suffix == ".jsonl":
        lines, total = _read_lines(source)
        tasks = (("llava", f"{source.stem}-{n:08d}", line, root) for n, line in lines)
        return tasks, total
    # Bytes that are not UTF-8 survive as lone surrogates and are found per record.
    text = source.read_bytes().decode("utf-8", errors="surrogateescape")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON list of records")
    tasks = (("llava", f"{source.stem}-{i:08d}", r, root) for i, r in enumerate(records))
    return tasks, len(records)


def read_captions(source: Path, options: Options):
    if source.is_dir():
        found = [source / name for name in CAPTION_FILES if (source / name).is_file()]
        if not found:
            raise ValueError(f"{source}: no captions file (looked for {', '.join(CAPTION_FILES)})")
        source = found[0]
    root = options.image_root or str(source.parent)
    if source.suffix == ".csv":
        text = source.read_bytes().decode("utf-8", errors="surrogateescape")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        tasks = (("captions", f"{source.stem}-{i:08d}", row, root) for i, row in enumerate(rows))
        return tasks, len(rows)
    lines, total = _read_lines(source)
    return ((("captions", f"{source.stem}-{n:08d}", line, root) for n, line in lines), total)


def read_webdataset(source: Path, options: Options):
    tars = sorted(source.glob("*.tar")) if source.is_dir() else [source]
    if not tars or not all(path.is_file() for path in tars):
        raise ValueError(f"--format webdataset needs a .tar file or a folder of them: {source}")

    def tasks():
        for path in tars:
            group_key, members = None, {}
            try:
                with tarfile.open(path, "r:*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        directory, _, base = member.name.rpartition("/")
                        stem, dot, extension = base.partition(".")
                        key = f"{directory}/{stem}" if directory else stem
                        if key != group_key and members:
                            yield ("webdataset", f"{path.stem}/{group_key}", members)
                            members = {}
                        group_key = key
                        if dot:
                            members[extension.lower()] = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as err:
                # A broken archive ends its own records, not the conversion.
                members = {}
                yield ("unreadable", f"{path.name}@{group_key}", f"{type(err).__name__}: {err}")
            if members:
                yield ("webdataset", f"{path.stem}/{group_key}", members)

    return tasks(), None


READERS: dict[str, Callable] = {
    "text": read_text,
    "llava": read_llava,
    "captions": read_captions,
    "webdataset": read_webdataset,
}


# ---------------------------------------------------------------------------------------------
# Workers: one task → ("ok", sample) or ("skip", reason, record id, detail).

_worker: dict = {}


def _init_worker(options: Options) -> None:
    if _worker.get("options") == options:
        return  # forked from a parent that already loaded everything
    renderer = None
    if options.tokenizer:
        renderer = ChatRenderer(load_tokenizer(options.tokenizer))
    _worker.update(options=options, renderer=renderer)


def build_sample(task: tuple) -> tuple:
    kind, record_id = task[0], task[1]
    try:
        if kind == "unreadable":
            raise DecodeError("unreadable", task[2])
        record_id, sample, image_sources = BUILDERS[kind](*task[1:])
        return ("ok", _finish(record_id, sample, image_sources))
    except DecodeError as err:
        return ("skip", err.reason, record_id, err.detail)
    except Exception as err:  # one odd record must not end a long conversion
        return ("skip", "unreadable", record_id, f"{type(err).__name__}: {err}")


def _parse_json(raw) -> dict:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DecodeError("invalid_utf8", f"byte {err.start}") from None
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DecodeError("invalid_json", err.msg) from None
    if not isinstance(raw, dict):
        raise DecodeError("invalid_record", "not a JSON object")
    return raw


def _text_sample(record_id: str, raw) -> tuple[str, dict, list]:
    record = _parse_json(raw)
    text = record.get("text")
    if not isinstance(text, str):
        raise DecodeError("invalid_record", 'no string "text"')
    if not text.strip():
        raise DecodeError("empty", "blank text")
    return str(record.get("id") or record_id), {"text": text}, []


def _llava_messages(conversations) -> list[dict]:
    if not isinstance(conversations, list):
        raise DecodeError("invalid_record", "conversations is not a list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise DecodeError("invalid_record", "a turn is not an object")
        role = LLAVA_ROLES.get(turn.get("from", turn.get("role")))
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise DecodeError("invalid_record", f"turn {turn.get('from', turn.get('role'))!r}")
        messages.append({"role": role, "content": content})
    if not any(message["content"].strip() for message in messages):
        raise DecodeError("empty", "no conversation")
    return messages


def _place_images(messages: list[dict], num_images: int) -> None:
    num_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if num_images and not num_placeholders:
        first_user = next((m for m in messages if m["role"] == "user"), messages[0])
        first_user["content"] = f"{IMAGE_PLACEHOLDER}\n" * num_images + first_user["content"]
    elif num_placeholders > num_images:
        raise DecodeError("image_missing", f"{num_placeholders} <image>, {num_images} images")
    elif num_placeholders < num_images:
        raise DecodeError("image_unused", f"{num_images} images, {num_placeholders} <image>")


def _llava_sample(record_id: str, raw, root: str) -> tuple[str, dict, list]:
    record = _parse_json(raw)
    record_id = str(record.get("id") or record_id)
    messages = _llava_messages(record.get("conversations"))
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DecodeError("invalid_record", '"image" is not a path or a list of paths')
    _place_images(messages, len(images))
    return record_id, {"messages": messages}, [Path(root) / p for p in images]


def _caption_sample(record_id: str, raw, root: str) -> tuple[str, dict, list]:
    record = _parse_json(raw) if isinstance(raw, bytes) else raw
    image = next((record[k] for k in ("file_name", "image", "path") if record.get(k)), None)
    caption = next((record[k] for k in ("caption", "text") if k in record), None)
    if not isinstance(image, str) or not isinstance(caption, str):
        raise DecodeError(
            "invalid_record", "needs file_name (or image, path) and caption (or text)"
        )
    if not caption.strip():
        raise DecodeError("empty", "blank caption")
    record_id = str(record.get("id") or Path(image).stem)
    return record_id, {"text": IMAGE_PLACEHOLDER + caption}, [Path(root) / image]


def _webdataset_sample(record_id: str, members: dict[str, bytes]) -> tuple[str, dict, list]:
    images = [members[ext] for ext in sorted(members) if ext.rpartition(".")[2] in IMAGE_EXTENSIONS]
    record = _parse_json(members["json"]) if "json" in members else {}
    if "conversations" in record:
        messages = _llava_messages(record["conversations"])
        _place_images(messages, len(images))
        return record_id, {"messages": messages}, images
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise DecodeError("invalid_utf8", f"txt byte {err.start}") from None
    else:
        caption = record.get("caption", record.get("text", ""))
        if not isinstance(caption, str):
            raise DecodeError("invalid_record", "caption is not a string")
    if not caption.strip():
        raise DecodeError("empty", "no caption and no conversation")
    return record_id, {"text": IMAGE_PLACEHOLDER * len(images) + caption}, images


BUILDERS = {
    "text": _text_sample,
    "llava": _llava_sample,
    "captions": _caption_sample,
    "webdataset": _webdataset_sample,
}


def _finish(record_id: str, fields: dict, image_sources: list) -> dict:
    """Check the text, read and check the images, count tokens: one complete MDS sample."""
    options: Options = _worker["options"]
    sample = {
        "id": record_id,
        "text": fields.get("text", ""),
        "messages": fields.get("messages", []),
    }
    try:
        record_id.encode("utf-8")
        sample["text"].encode("utf-8")
        json.dumps(sample["messages"], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError("invalid_utf8", "text that is not valid UTF-8") from None
    texts = [sample["text"], *(m["content"] for m in sample["messages"])]
    num_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    if num_placeholders > len(image_sources):
        raise DecodeError(
            "image_missing", f"{num_placeholders} <image>, {len(image_sources)} images"
        )
    if num_placeholders < len(image_sources):
        raise DecodeError(
            "image_unused", f"{len(image_sources)} images, {num_placeholders} <image>"
        )
    sample["images"], sample["image_sizes"] = [], []
    for image in image_sources:
        if isinstance(image, Path):
            try:
                image = image.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise DecodeError("image_missing", f"{image} not found") from None
        sample["image_sizes"].append(list(check_image(image, options.max_image_pixels)))
        sample["images"].append(image)
    renderer = _worker["renderer"]
    if renderer is None:
        sample["num_text_tokens"] = estimate_text_tokens(sample)
    else:
        sample["num_text_tokens"] = renderer(sample).num_text_tokens
        if options.max_tokens and sample["num_text_tokens"] > options.max_tokens:
            raise DecodeError(
                "too_long", f"{sample['num_text_tokens']} text tokens > {options.max_tokens}"
            )
    return sample


# ---------------------------------------------------------------------------------------------
# The conversion.


def _ordered_map(function, items: Iterable, num_workers: int, chunk: int = 16) -> Iterator:
    """`map` over a process pool, in order, with a bounded number of tasks in flight."""
    if num_workers <= 1:
        yield from map(function, items)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(num_workers, _init_worker, (_worker["options"],)) as pool:
        pending: collections.deque = collections.deque()
        batch: list = []
        for item in items:
            batch.append(item)
            if len(batch) == chunk:
                pending.append(pool.apply_async(_map_list, (function, batch)))
                batch = []
                # Bounded: a huge tar is never read far ahead of the workers.
                if len(pending) >= 4 * num_workers:
                    yield from pending.popleft().get()
        if batch:
            pending.append(pool.apply_async(_map_list, (function, batch)))
        while pending:
            yield from pending.popleft().get()


def _map_list(function, items: list) -> list:
    return [function(item) for item in items]


class ShardProgress:
    """tqdm on a terminal; otherwise a plain line every `every` seconds (logs, CI)."""

    def __init__(self, total: int | None, enabled: bool, every: float = 10.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.bar = None
        self.done = self.skipped = 0
        self.started = self.last = time.monotonic()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit=" records", file=sys.stderr, smoothing=0.1)
            except ImportError:
                pass

    def update(self, skipped: bool) -> None:
        self.done += 1
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(1)
            if skipped:
                self.bar.set_postfix(skipped=self.skipped, refresh=False)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            of = f"/{self.total:,}" if self.total else ""
            rate = self.done / (self.last - self.started)
            print(
                f"shards: {self.done:,}{of} records ({rate:,.0f}/s), {self.skipped:,} skipped",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fingerprint(fmt: str, source: Path, options: Options, writer: dict) -> str:
    """Identifies the inputs and options; image files named by a JSON source are not included."""
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    if options.tokenizer:
        files += sorted(Path(options.tokenizer).glob("*"))
    stats = [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()
    ]
    payload = {"format": fmt, "options": dataclasses.asdict(options), "writer": writer}
    payload["files"] = (
        stats if fmt != "captions" else [s for s in stats if s[0].endswith((".csv", ".jsonl"))]
    )
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def convert(
    source: str | Path,
    fmt: str,
    out: str | Path,
    *,
    image_root: str | Path = "",
    tokenizer: str | Path = "",
    max_tokens: int = 0,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    num_workers: int | None = None,
    compression: str | None = "zstd",
    size_limit: int = SHARD_SIZE_LIMIT,
    overwrite: bool = False,
    progress: bool = False,
) -> Report:
    """Convert SOURCE (format `fmt`) into MDS shards at `out`; see the module docstring."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(READERS)}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise ValueError(f"source not found: {source}")
    if tokenizer and not Path(tokenizer).is_dir():
        raise ValueError(f"tokenizer directory not found: {tokenizer}")
    if max_tokens and not tokenizer:
        raise ValueError("--max-tokens needs --tokenizer (without one, counts are estimates)")
    if image_root and not Path(image_root).is_dir():
        raise ValueError(f"image root not found: {image_root}")
    options = Options(
        image_root=str(Path(image_root).resolve()) if image_root else "",
        max_image_pixels=max_image_pixels,
        max_tokens=max_tokens,
        tokenizer=str(Path(tokenizer).resolve()) if tokenizer else "",
    )
    writer_options = {"compression": compression, "size_limit": size_limit, "hashes": SHARD_HASHES}
    fingerprint = _fingerprint(fmt, source, options, writer_options)
    manifest = out / MANIFEST
    if manifest.is_file() and (out / "index.json").is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("fingerprint") == fingerprint and not overwrite:
            return Report(**{**previous["report"], "up_to_date": True})
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{out} is not empty and was not written by splitvlm shards; pass --overwrite"
        )

    tasks, total = READERS[fmt](source, options)
    _worker.clear()
    _init_worker(options)
    report = Report(out=str(out), format=fmt, token_count="exact" if tokenizer else "estimate")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    bar = ShardProgress(total, progress)
    num_workers = num_workers or os.cpu_count() or 1

    def accepted() -> Iterator[dict]:
        for result in _ordered_map(build_sample, tasks, num_workers):
            bar.update(result[0] != "ok")
            if result[0] == "ok":
                report.num_samples += 1
                report.num_text_tokens += result[1]["num_text_tokens"]
                yield result[1]
                continue
            _, reason, record_id, detail = result
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            examples = report.examples.setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{record_id} ({detail})"[:200])

    try:
        write_shards(partial, accepted(), compression=compression, size_limit=size_limit)
    finally:
        bar.close()
    report.skipped = {r: report.skipped[r] for r in SKIP_REASONS if r in report.skipped}
    record = {"fingerprint": fingerprint, "source": str(source.resolve()), "report": report}
    (partial / MANIFEST).write_text(json.dumps(record, default=dataclasses.asdict, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out)
    return report
