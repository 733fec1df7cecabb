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

import atexit
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


_TENSOR_FIELDS = tuple(f.name for f in fields(Document) if f.name not in ("sample_id", "segments"))


class FlatBatch:
    """A loader batch on its way out of a worker: each tensor field of its documents as one
    concatenated array, so a batch pickles as a handful of arrays instead of several per
    document. Measured over the demo shards (batch 16, one process): flattening, pickling,
    unpickling and rebuilding the documents take 26 us a sample, against 51 us with an array per
    field per document. (A tensor would cross through a shared-memory segment of its own, about
    1 ms each.)"""

    def __init__(self, items: list):
        docs = [item for item in items if isinstance(item, Document)]
        self.skipped = [item if isinstance(item, Skipped) else None for item in items]
        self.sample_ids = [doc.sample_id for doc in docs]
        self.segments = [doc.segments for doc in docs]
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
        docs = iter(
            Document(sample_id, segments=segments, **dict(zip(split, tensors, strict=True)))
            for sample_id, segments, *tensors in zip(
                self.sample_ids, self.segments, *split.values(), strict=True
            )
        )
        return [next(docs) if item is None else item for item in self.skipped]


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


SHM_ROOT = Path("/dev/shm")
OWNERS_SUFFIX = "splitvlm_owners"  # SHM_ROOT/PREFIX_splitvlm_owners: PIDs of a prefix's readers


def _prefix_name(prefix_int: int, name: str) -> str:
    # streaming's private layout (0.11-0.13): the names of a prefix are PREFIX_NAME, 6 digits.
    return f"{prefix_int:06}_{name}"


def release_prefix(prefix_int: int) -> None:
    """Unlink a streaming registration's shared memory, its lock files and our owner record of
    it. Processes that have it mapped keep their mapping; only the names go, so the prefix is
    free again (streaming's scan also skips every prefix whose lock files are left)."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

    for name in [*SHM_TO_CLEAN, OWNERS_SUFFIX]:
        (SHM_ROOT / _prefix_name(prefix_int, name)).unlink(missing_ok=True)
    for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
        (Path(tempfile.gettempdir()) / _prefix_name(prefix_int, name)).unlink(missing_ok=True)


def record_owner(prefix_int: int) -> None:
    """Add this process to the readers of a registration (every local rank calls it). A normal
    exit removes the record along with streaming's own exit-time cleanup, so a record outlives
    its registration only when the registration is left behind too."""
    if not SHM_ROOT.is_dir():
        return
    path = SHM_ROOT / _prefix_name(prefix_int, OWNERS_SUFFIX)
    with open(path, "a") as record:
        record.write(f"{os.getpid()}\n")  # one short append: whole, even with several writers
    atexit.register(path.unlink, missing_ok=True)


def release_dead_registrations() -> list[int]:
    """Release the registrations of splitvlm readers that are all dead; returns their prefixes.

    A process that ends without Python's exit handlers (killed, crashed, or ended by Ray, which
    does not run them) leaves its streaming registration behind. streaming then refuses that
    registration's remote cache to every later reader ("Reused local directory"): a restarted
    run would never start. And every later reader on the node scans past it, keeping one file
    descriptor open per registration it scanned until its process exits (seen here: 184 left-over registrations, 17,000 open descriptors
    after the trainer tests, then "Too many open files"). Only registrations splitvlm recorded
    (`record_owner`) are released: another program's are not ours to judge. A recycled PID
    makes a registration look alive, which only delays its release. Call on the local leader.
    """
    released = []
    for record in sorted(SHM_ROOT.glob(f"*_{OWNERS_SUFFIX}")):
        try:
            pids = [int(line) for line in record.read_text().split()]
        except (OSError, ValueError):
            continue
        if not any(_alive(pid) for pid in pids):
            prefix_int = int(record.name.split("_", 1)[0])
            release_prefix(prefix_int)
            released.append(prefix_int)
    return released


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


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
        for attempt in range(REGISTRATION_ATTEMPTS):
            try:
                with registration_lock(world):
                    if world.local_rank == 0:
                        released = release_dead_registrations()
                        if released:
                            print(f"released stale streaming registrations {released}", flush=True)
                    barrier()  # every local rank registers after the cleanup
                    self.source = StreamingDataset(
                        streams=streams, **streaming_kwargs(cfg, self.batch_size)
                    )
                    record_owner(self.source._shm_prefix_int)
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
            collate_fn=FlatBatch if self.cfg.num_workers else _keep_list,
            num_workers=self.cfg.num_workers,
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
        barrier()  # no rank of this job still needs the registration's names
        if self.world.local_rank == 0:
            release_prefix(self.source._shm_prefix_int)

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
