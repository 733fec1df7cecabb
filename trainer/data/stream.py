"""Step batches from MDS shards through mosaicml-streaming.

The data cursor is (epoch, global samples consumed in the epoch). With `num_canonical_nodes`
fixed, streaming gives the same global sample order for any world size, so a resumed run — on
the same or another number of workers — continues at exactly the next sample. The order is
streaming's partition of the epoch; the samples are read by index and decoded in the loader
workers (`SampleReader`), not through streaming's iterator.

A mixture is a list of `Stream`s (`data.streams`), each a local shard set or a remote one cached
locally, weighted by proportion, repeat or choose; without `data.streams` the one stream is
`data.path` (or `data.remote`, cached under `data.path`).

Two jobs on one node: streaming registers each dataset's shared memory under the first free
numeric prefix, so readers of the same local shards never share state (tested). A remote
stream's local cache, though, must have one reader: each reader downloads into it and evicts
from it on its own accounting, and streaming's check ("Reused local directory") misses a reader
that has started iterating (measured: two readers of one cache both ran). So a training run
caches remote streams in a directory of its own (`cache_key`).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader, Dataset

from trainer.config import DataConfig, StreamConfig
from trainer.data.decode import DecodeError, Document, SampleDecoder
from trainer.data.shards import check_split_dir
from trainer.data.streaming_compat import (
    SharedDirStream,
    epoch_partition,
    open_dataset,
    release_dataset,
)
from trainer.distributed import WorldInfo


@dataclass
class Skipped:
    sample_index: int
    reason: str


class SampleReader(Dataset):
    """Map-style view of a StreamingDataset: (epoch, sample id) → a decoded `Document`, or a
    `Skipped` marker. The loader workers only read and decode; which samples, in what order, is
    decided in the main process (`StepBatches`).

    Not inside streaming's own iterator: its download and ready threads poll every few
    milliseconds and take the GIL from the decoding thread each time it lets go of it, which
    makes decoding there several times slower (`scripts/bench_loader.py` measures both).
    """

    def __init__(self, source: StreamingDataset, decoder: SampleDecoder):
        self.source = source
        self.decoder = decoder

    def __getitem__(self, key: tuple[int, int]):
        epoch, sample_id = key
        try:
            raw = self.source.get_item(sample_id)  # downloads the shard if it is not here yet
        except UnicodeDecodeError:  # a str or json column that is not UTF-8
            return Skipped(sample_id, "invalid_utf8")
        except json.JSONDecodeError:
            return Skipped(sample_id, "invalid_json")
        try:
            return self.decoder(raw, sample_id, epoch=epoch)
        except DecodeError as err:
            return Skipped(sample_id, err.reason)


class ShardPrefetcher:
    """Prepares (downloads, decompresses) the shards of a rank's upcoming samples in the order
    they are first read, up to `ahead` samples beyond what the loader has asked for.

    One daemon thread that sleeps on a condition between shards: it never polls. A shard it
    fails on is left to the reader, whose `get_item` prepares it again and raises the error.
    """

    def __init__(self, source: StreamingDataset, sample_ids: np.ndarray, ahead: int):
        shard_of = np.searchsorted(source.sample_offset_per_shard, sample_ids, side="right") - 1
        shards, first_read = np.unique(shard_of, return_index=True)
        order = np.argsort(first_read)
        self._plan = list(zip(first_read[order].tolist(), shards[order].tolist(), strict=True))
        self._source = source
        self._ahead = ahead
        self._requested = 0
        self._stopped = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name="splitvlm-shard-prefetch", daemon=True
        )
        self._thread.start()

    def requested(self, num_samples: int) -> None:
        """The loader has asked for this many of the samples."""
        with self._condition:
            self._requested = num_samples
            self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()

    def _run(self) -> None:
        for position, shard_id in self._plan:
            with self._condition:
                self._condition.wait_for(
                    lambda position=position: (
                        self._stopped or position < self._requested + self._ahead
                    )
                )
                if self._stopped:
                    return
            try:
                self._source.prepare_shard(shard_id, blocking=False)
            except Exception:  # the reader prepares it again, and reports the error
                return


class EpochSampler:
    """The batch sampler of one epoch on one rank: lists of (epoch, sample id) keys, telling
    the shard prefetcher how far the loader has asked."""

    def __init__(self, epoch: int, batches: np.ndarray, prefetcher: ShardPrefetcher):
        self.epoch = epoch
        self.batches = batches  # int64 (num_batches, batch_size)
        self.prefetcher = prefetcher

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            self.prefetcher.requested((index + 1) * len(batch))
            yield [(self.epoch, sample_id) for sample_id in batch.tolist()]


@dataclass
class DataCursor:
    epoch: int = 0
    sample_in_epoch: int = 0  # global: summed over ranks
    skipped: Counter = field(default_factory=Counter)  # this rank's skips, by reason

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch}


def _keep_list(batch):
    return batch


_LIST_FIELDS = (
    "sample_id",
    "segments",
    "image_grids",
    "span_grids",
    "row_breaks",
    "image_tiles",
    "image_anchors",
)
_TENSOR_FIELDS = tuple(f.name for f in fields(Document) if f.name not in _LIST_FIELDS)


class FlatBatch:
    """A loader batch on its way out of a worker: each tensor field of its documents as one
    concatenated array, so a batch pickles as a handful of arrays instead of several per
    document: pickling cost grows with the number of arrays, not their size. (A tensor would
    cross through a shared-memory segment of its own, far slower for small arrays.)"""

    def __init__(self, items: list):
        docs = [item for item in items if isinstance(item, Document)]
        self.skipped = [item if isinstance(item, Skipped) else None for item in items]
        self.lists = {name: [getattr(doc, name) for doc in docs] for name in _LIST_FIELDS}
        self.arrays = {}
        for name in _TENSOR_FIELDS:
            parts = [getattr(doc, name).numpy() for doc in docs]
            self.arrays[name] = (
                np.concatenate(parts) if parts else None,
                [len(part) for part in parts],
            )

    def items(self) -> list:
        """The batch as it went in: Documents (their tensors views of the flat ones) and
        Skipped markers, in order."""
        split = {
            name: torch.from_numpy(flat).split(sizes) if sizes else ()
            for name, (flat, sizes) in self.arrays.items()
        }
        columns = {**self.lists, **split}
        docs = iter(
            Document(**dict(zip(columns, values, strict=True)))
            for values in zip(*columns.values(), strict=True)
        )
        return [next(docs) if item is None else item for item in self.skipped]


def streaming_kwargs(cfg: DataConfig, batch_size: int) -> dict:
    """StreamingDataset arguments besides the streams: the one place they are set, so the
    trainer and the loader benchmark's raw baseline read samples in the same order."""
    return {
        "epoch_size": cfg.epoch_size or None,
        "batch_size": batch_size,
        "shuffle": cfg.shuffle,
        "shuffle_algo": cfg.shuffle_algo,
        "shuffle_seed": cfg.shuffle_seed,
        "num_canonical_nodes": cfg.num_canonical_nodes,
        # streaming's own defaults, stated so it does not warn about choosing them
        "predownload": 8 * batch_size,
        "shuffle_block_size": cfg.shuffle_block_size
        or max(4_000_000 // cfg.num_canonical_nodes, 1 << 18),
    }


def stream_configs(cfg: DataConfig) -> list[StreamConfig]:
    return cfg.streams or [StreamConfig(path=cfg.path, remote=cfg.remote)]


def run_cache_key(run_name: str, run_dir: str) -> str:
    """A directory name of one run's own: the same run directory (a resume, a restart) maps to
    the same key, two runs never do."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', run_name)}-{digest}"


def local_dir(stream: StreamConfig, cache_dir: str, cache_key: str = "") -> Path:
    """Where a stream's shards are read from: its path, or a cache directory named after its
    remote (the same remote always maps to the same cache). A remote stream's cache goes one
    level down, into `cache_key`, when one is given."""
    if stream.path:
        local = Path(stream.path)
    else:
        root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "splitvlm-cache"
        local = root / re.sub(r"[^A-Za-z0-9._-]+", "_", stream.remote).strip("_")
    return local / cache_key if stream.remote and cache_key else local


def check_streams(cfg: DataConfig, split: str = "") -> None:
    """Raise ValueError (one line) for a local stream without shards; remote ones are fetched."""
    for stream in stream_configs(cfg):
        if not stream.remote:
            check_split_dir(Path(stream.path) / (split or cfg.split))


def build_streams(cfg: DataConfig, split: str, cache_key: str = "") -> list[Stream]:
    check_streams(cfg, split)
    streams = []
    for stream in stream_configs(cfg):
        weights = {
            "proportion": stream.proportion,
            "repeat": stream.repeat,
            "choose": stream.choose,
        }
        streams.append(
            SharedDirStream(
                remote=stream.remote or None,
                local=str(local_dir(stream, cfg.cache_dir, cache_key)),
                split=split,
                **{name: value for name, value in weights.items() if value is not None},
            )
        )
    return streams


def rank_batch_size(cfg: DataConfig, world_size: int) -> int:
    """Samples per rank per step: data.global_batch_size split evenly, else data.batch_size."""
    if cfg.global_batch_size <= 0:
        return cfg.batch_size
    if cfg.global_batch_size % world_size:
        raise ValueError(
            f"data.global_batch_size={cfg.global_batch_size} does not divide over "
            f"{world_size} workers"
        )
    return cfg.global_batch_size // world_size


class StepBatches:
    """Yields this rank's `batch_size` samples per step, forever, across epochs."""

    def __init__(
        self,
        cfg: DataConfig,
        decoder: SampleDecoder,
        world: WorldInfo,
        split: str = "",
        cache_key: str = "",
    ):
        streams = build_streams(cfg, split or cfg.split, cache_key)
        world.export_env()
        self.cfg = cfg
        self.world = world
        self.batch_size = rank_batch_size(cfg, world.world_size)
        self.source = open_dataset(streams, world, **streaming_kwargs(cfg, self.batch_size))
        self.reader = SampleReader(self.source, decoder)
        self.cursor = DataCursor()
        self.last_sample_ids: list[str] = []  # this rank's samples of the last step, in order
        self._iterator = None
        self._prefetcher: ShardPrefetcher | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world.world_size

    def seek(self, epoch: int, sample_in_epoch: int) -> None:
        """Continue at global sample `sample_in_epoch` of `epoch` (before the next `next()`)."""
        self.cursor.epoch, self.cursor.sample_in_epoch = epoch, sample_in_epoch
        self._stop_epoch()

    def _start_epoch(self) -> None:
        ids = epoch_partition(self.source, self.cursor.epoch, self.cursor.sample_in_epoch)
        num_batches = len(ids) // self.batch_size  # a partial last batch is dropped
        batches = ids[: num_batches * self.batch_size].reshape(num_batches, self.batch_size)
        # As far ahead as streaming's own iterator would download (`predownload`).
        ahead = self.source.predownload
        self._prefetcher = ShardPrefetcher(self.source, batches.reshape(-1), ahead)
        sampler = EpochSampler(self.cursor.epoch, batches, self._prefetcher)
        loader = DataLoader(
            self.reader,
            batch_sampler=sampler,
            collate_fn=FlatBatch if self.cfg.num_workers else _keep_list,
            num_workers=self.cfg.num_workers,
            # The reader holds streaming's dataset, which does not pickle (its locks): workers
            # are forked, also in a process whose default is spawn (torch.multiprocessing).
            multiprocessing_context="fork" if self.cfg.num_workers else None,
            # A loader draws its workers' base seed when it starts an epoch: from a generator
            # of its own, not from torch's global one, whose stream belongs to the model (a
            # prefetching thread starts epochs at other moments than the training thread).
            generator=torch.Generator().manual_seed(self.cursor.epoch),
        )
        self._iterator = iter(loader)

    def _stop_epoch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher = self._iterator = None

    def close(self) -> None:
        """Stop reading and give streaming's registration back; call on every rank at the end
        of a run. Ray ends its workers without Python's exit handlers, which is where streaming
        would unregister: without this, every run left its registration on the node."""
        self._stop_epoch()
        release_dataset(self.source, self.world)

    def __del__(self) -> None:
        # A prefetcher waiting for the reader would otherwise keep the dataset alive.
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()

    def next_step(self) -> tuple[list[Document], list[Skipped]]:
        for _attempt in range(2):
            if self._iterator is None:
                self._start_epoch()
            try:
                batch = next(self._iterator)
                break
            except StopIteration:
                self._stop_epoch()
                self.cursor.epoch += 1
                self.cursor.sample_in_epoch = 0
        else:
            raise ValueError(
                f"{self.cfg.path}: fewer samples than one global batch ({self.global_batch_size})"
            )
        self.cursor.sample_in_epoch += self.global_batch_size
        if isinstance(batch, FlatBatch):
            batch = batch.items()
        self.last_sample_ids = [
            item.sample_id if isinstance(item, Document) else str(item.sample_index)
            for item in batch
        ]
        docs = [item for item in batch if isinstance(item, Document)]
        skipped = [item for item in batch if isinstance(item, Skipped)]
        self.cursor.skipped.update(s.reason for s in skipped)
        return docs, skipped
