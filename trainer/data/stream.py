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

import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader, Dataset

from trainer.config import DataConfig, StreamConfig
from trainer.data.decode import DecodeError, Decoder, Document
from trainer.data.shards import check_split_dir
from trainer.distributed import WorldInfo, barrier


@dataclass
class Skipped:
    sample_index: int
    reason: str


class SampleReader(Dataset):
    """Map-style view of a StreamingDataset: (epoch, sample id) → a decoded `Document`, or a
    `Skipped` marker. The loader workers only read and decode; which samples, in what order, is
    decided in the main process (`StepBatches`).

    Decoding inside streaming's own iterator was 3x slower per sample than the same decoding of
    samples held in a list (657 vs 224 us, `scripts/bench_loader.py`): its download and ready
    threads poll every few milliseconds and take the GIL from the decoding thread each time it
    lets go of it.
    """

    def __init__(self, source: StreamingDataset, decoder: Decoder):
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


@dataclass
class _DocumentArrays:
    """A Document with numpy arrays in place of tensors, for the trip out of a loader worker."""

    fields: dict


_DOCUMENT_FIELDS = tuple(f.name for f in fields(Document))


def _to_arrays(batch: list) -> list:
    # Runs in the loader worker. Each tensor would cross to the main process through its own
    # shared-memory segment (measured: about 1 ms per sample); arrays are pickled inline (µs).
    return [
        _DocumentArrays({name: _as_array(getattr(item, name)) for name in _DOCUMENT_FIELDS})
        if isinstance(item, Document)
        else item
        for item in batch
    ]


def _as_array(value):
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _from_arrays(item):
    if not isinstance(item, _DocumentArrays):
        return item
    return Document(
        **{
            name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            for name, value in item.fields.items()
        }
    )


class SharedDirStream(Stream):
    """streaming's Stream, safe for a local shard directory several jobs read at once.

    The first reader of a compressed shard decompresses it next to the `.zstd` file, through a
    temporary file whose name (`NAME.tmp`) is the same in every process: two jobs reading fresh
    shards together could truncate the file the other had just renamed into place (measured: 2
    of 6 tries crashed with "Relative sample index … is not present"). Here each writes a
    temporary file of its own and renames it over the shard, which readers see whole, old or new.
    """

    def _decompress_shard_part(self, zip_info, zip_filename, raw_filename, compression) -> None:
        from streaming.base.compression import decompress
        from streaming.base.hashing import get_hash

        data = Path(zip_filename).read_bytes()
        if self.validate_hash:
            if get_hash(self.validate_hash, data) != zip_info.hashes.get(self.validate_hash):
                raise ValueError(f"Checksum failure: {zip_filename}")
        tmp = f"{raw_filename}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as out:
            out.write(decompress(compression, data))
        os.replace(tmp, raw_filename)
        if not self.safe_keep_zip:  # a remote stream's own cache: no other reader
            os.remove(zip_filename)


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


def release_stale_caches(local_dirs: list[str]) -> list[str]:
    """Unregister dead readers of these remote-backed cache directories from streaming's shared
    memory; returns the prefixes released.

    A reader killed together with Python's resource tracker (Ray ending a worker's process
    group, a forced stop, the OOM killer) leaves its prefix registered, and streaming then
    refuses the directory to every later reader: the same run restarted would never start. The directories are this run's own (`cache_key`), so a registration
    naming one is a previous attempt of this run. Linux only (/dev/shm); call on the local leader.
    """
    # streaming's private layout (0.11-0.13): PREFIX_locals lists the local dirs of a prefix.
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    shm_root = Path("/dev/shm")
    if not shm_root.is_dir():
        return []
    ours = set(local_dirs)
    released = []
    for entry in sorted(shm_root.glob(f"[0-9][0-9][0-9][0-9][0-9][0-9]_{LOCALS}")):
        prefix_int = int(entry.name.split("_", 1)[0])
        try:
            their_locals, _ = _unpack_locals(entry.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if ours.isdisjoint(their_locals):
            continue
        for name in SHM_TO_CLEAN:
            (shm_root / _get_path(prefix_int, name)).unlink(missing_ok=True)
        released.append(entry.name.split("_", 1)[0])
    return released


REGISTRATION_ATTEMPTS = 5
REGISTRATION_LOCK_TIMEOUT_S = 120.0
LOCK_NAME = "splitvlm-streaming.lock"  # in the node's temp directory, like streaming's locks


@contextmanager
def registration_lock(world: WorldInfo):
    """Serializes streaming's shared-memory registration between the jobs on this node.

    streaming finds its prefix by scanning for the first free one, then registers it, with
    barriers between ranks in the middle: two jobs starting together can pick the same prefix
    (seen here: FileExistsError '/001005_locals'). Each node's local leader holds a file lock from
    before any rank of the job scans until every rank has registered. Multi-node jobs starting
    at once could each hold one node and wait for the other in a barrier: after
    REGISTRATION_LOCK_TIMEOUT_S a leader goes on without the lock, and says so.
    """
    lock_file = None
    barrier()
    if world.local_rank == 0:
        lock_file = open(Path(tempfile.gettempdir()) / LOCK_NAME, "a")
        deadline = time.monotonic() + REGISTRATION_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print("warning: streaming registration without the node lock", flush=True)
                    lock_file.close()
                    lock_file = None
                    break
                time.sleep(0.05)
    barrier()  # no rank of this job scans before its leader holds the lock
    try:
        yield
        barrier()  # every rank of this job has registered
    finally:
        if lock_file is not None:
            lock_file.close()  # releases the lock


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
        decoder: Decoder,
        world: WorldInfo,
        split: str = "",
        cache_key: str = "",
    ):
        streams = build_streams(cfg, split or cfg.split, cache_key)
        world.export_env()
        self.cfg = cfg
        self.world = world
        self.batch_size = rank_batch_size(cfg, world.world_size)
        remote_locals = [
            os.path.abspath(os.path.join(s.local, s.split)) for s in streams if s.remote
        ]
        for attempt in range(REGISTRATION_ATTEMPTS):
            try:
                with registration_lock(world):
                    if cache_key and remote_locals:
                        if world.local_rank == 0:
                            released = release_stale_caches(remote_locals)
                            if released:
                                note = f"released stale streaming registrations {released}"
                                print(note, flush=True)
                        barrier()  # every local rank registers after the cleanup
                    self.source = StreamingDataset(
                        streams=streams, **streaming_kwargs(cfg, self.batch_size)
                    )
                break
            except FileExistsError:
                # A reader outside our lock (another program using streaming) registered the
                # prefix between streaming's scan and its own registration. Only with one rank
                # is trying again safe: with more, the others already wait in a barrier.
                if world.world_size > 1 or attempt == REGISTRATION_ATTEMPTS - 1:
                    raise
        self.reader = SampleReader(self.source, decoder)
        self.cursor = DataCursor()
        self.last_sample_ids: list[str] = []  # this rank's samples of the last step, in order
        self._iterator = None
        self._prefetcher: ShardPrefetcher | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world.world_size

    def rank_sample_ids(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        """This rank's samples of `epoch` from global sample `sample_in_epoch` on, in order:
        streaming's own partition, the one its iterator would read."""
        # streaming 0.11-0.13: _get_work computes the epoch's partition once per node (the local
        # leader, into shared memory) for the worlds __iter__ detects. Detected here, in the main
        # process, a rank has one worker: the loader's workers take its batches in turn, so the
        # order does not depend on data.num_workers.
        source = self.source
        source._unique_worker_world = source._unique_rank_world.detect_workers()
        source._parallel_worker_world = source._parallel_rank_world.detect_workers()
        ids = source._get_work(epoch, sample_in_epoch)
        return ids[ids != -1]  # padding at the end of the epoch

    def seek(self, epoch: int, sample_in_epoch: int) -> None:
        """Continue at global sample `sample_in_epoch` of `epoch` (before the next `next()`)."""
        self.cursor.epoch, self.cursor.sample_in_epoch = epoch, sample_in_epoch
        self._stop_epoch()

    def _start_epoch(self) -> None:
        ids = self.rank_sample_ids(self.cursor.epoch, self.cursor.sample_in_epoch)
        num_batches = len(ids) // self.batch_size  # a partial last batch is dropped
        batches = ids[: num_batches * self.batch_size].reshape(num_batches, self.batch_size)
        # As far ahead as streaming's own iterator would download (`predownload`).
        ahead = self.source.predownload
        self._prefetcher = ShardPrefetcher(self.source, batches.reshape(-1), ahead)
        sampler = EpochSampler(self.cursor.epoch, batches, self._prefetcher)
        loader = DataLoader(
            self.reader,
            batch_sampler=sampler,
            collate_fn=_to_arrays if self.cfg.num_workers else _keep_list,
            num_workers=self.cfg.num_workers,
        )
        self._iterator = iter(loader)

    def _stop_epoch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher = self._iterator = None

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
        batch = [_from_arrays(item) for item in batch]
        self.last_sample_ids = [
            item.sample_id if isinstance(item, Document) else str(item.sample_index)
            for item in batch
        ]
        docs = [item for item in batch if isinstance(item, Document)]
        skipped = [item for item in batch if isinstance(item, Skipped)]
        self.cursor.skipped.update(s.reason for s in skipped)
        return docs, skipped
