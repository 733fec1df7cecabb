"""Workarounds for mosaicml-streaming, fenced here: every use of its private API is in this file.

Written against mosaicml-streaming 0.11-0.13 (`TESTED_VERSIONS`; a test checks the installed one
and the names below); the private names touched, each where it is used below:
- `Stream._decompress_shard_part` (overridden: a temporary file of each process's own);
- the shared-memory layout of a registration: names `PREFIX_NAME` with a 6-digit prefix, and
  `streaming.base.constant.SHM_TO_CLEAN`, `BARRIER_FILELOCK`, `CACHE_FILELOCK`;
- `StreamingDataset._shm_prefix_int` (the prefix a dataset registered), and the scan for a free
  one, `streaming.base.shared.prefix._each_prefix_int` (started at a node rank's own range);
- `StreamingDataset._get_work` and the worlds it reads (`_unique_rank_world`,
  `_parallel_rank_world`, `_unique_worker_world`, `_parallel_worker_world`): the epoch's
  partition of samples over ranks, computed in the main process.

A streaming upgrade is checked against this list first.
"""

from __future__ import annotations

import atexit
import fcntl
import itertools
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from streaming import Stream, StreamingDataset

from trainer.distributed import WorldInfo, barrier

TESTED_VERSIONS = ("0.11.", "0.12.", "0.13.")


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
# Prefix numbers a node rank scans from: node rank k registers at k * PREFIXES_PER_NODE_RANK and
# up. Nodes that share one machine share /dev/shm, which streaming takes to be the node's own:
# each node's leader scans for the first free prefix, then all register at once, so two nodes of
# one job on one machine would pick the same prefix (FileExistsError '/000000_locals', seen with
# two Ray nodes on loopback addresses). On separate machines the ranges change nothing.
PREFIXES_PER_NODE_RANK = 10_000


def lock_name(node_rank: int) -> str:
    """The registration lock of a node rank, in the node's temp directory like streaming's own
    locks: one per node rank, so the nodes of one job on one machine never wait for each other."""
    return f"splitvlm-streaming.node{node_rank}.lock"


@contextmanager
def registration_lock(world: WorldInfo):
    """Serializes streaming's shared-memory registration between the jobs on this node.

    streaming finds its prefix by scanning for the first free one, then registers it, with
    barriers between ranks in the middle: two jobs starting together can pick the same prefix
    (seen here: FileExistsError '/001005_locals'). Each node's local leader holds its node rank's
    file lock from before any rank of the job scans until every rank has registered. Should a
    lock still be held after REGISTRATION_LOCK_TIMEOUT_S (two multi-node jobs waiting for each
    other in a barrier), the leader goes on without it, and says so.
    """
    lock_file = None
    barrier()
    if world.local_rank == 0:
        lock_file = open(Path(tempfile.gettempdir()) / lock_name(world.node_rank), "a")
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


def open_dataset(streams: list[Stream], world: WorldInfo, **kwargs) -> StreamingDataset:
    """A StreamingDataset registered under the node's lock, after releasing dead splitvlm
    registrations, with this process recorded as one of its readers. Collective over the job."""
    for attempt in range(REGISTRATION_ATTEMPTS):
        try:
            with registration_lock(world):
                if world.local_rank == 0:
                    released = release_dead_registrations()
                    if released:
                        print(f"released stale streaming registrations {released}", flush=True)
                barrier()  # every local rank registers after the cleanup
                with _prefixes_from(world.node_rank * PREFIXES_PER_NODE_RANK):
                    dataset = StreamingDataset(streams=streams, **kwargs)
                record_owner(dataset._shm_prefix_int)
            return dataset
        except FileExistsError:
            # A reader outside our lock (another program using streaming) registered the
            # prefix between streaming's scan and its own registration. Only with one rank
            # is trying again safe: with more, the others already wait in a barrier.
            if world.world_size > 1 or attempt == REGISTRATION_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


@contextmanager
def _prefixes_from(first: int):
    """streaming's prefix scan (`streaming.base.shared.prefix._each_prefix_int`) starting at
    `first` instead of 0, while a dataset registers."""
    from streaming.base.shared import prefix

    def each_prefix_int():
        yield from itertools.count(first)

    original = prefix._each_prefix_int
    prefix._each_prefix_int = each_prefix_int
    try:
        yield
    finally:
        prefix._each_prefix_int = original


def release_dataset(dataset: StreamingDataset, world: WorldInfo) -> None:
    """Give a dataset's registration back (every rank calls it; the local leader unlinks)."""
    barrier()  # no rank of this job still needs the registration's names
    if world.local_rank == 0:
        release_prefix(dataset._shm_prefix_int)


def epoch_partition(dataset: StreamingDataset, epoch: int, sample_in_epoch: int) -> np.ndarray:
    """This rank's samples of `epoch` from global sample `sample_in_epoch` on, in order:
    streaming's own partition, the one its iterator would read."""
    # _get_work computes the epoch's partition once per node (the local leader, into shared
    # memory) for the worlds __iter__ detects. Detected here, in the main process, a rank has one
    # worker: the loader's workers take its batches in turn, so the order does not depend on
    # data.num_workers.
    dataset._unique_worker_world = dataset._unique_rank_world.detect_workers()
    dataset._parallel_worker_world = dataset._parallel_rank_world.detect_workers()
    ids = dataset._get_work(epoch, sample_in_epoch)
    return ids[ids != -1]  # padding at the end of the epoch


def streaming_world() -> dict:
    """streaming's view of this process's place (nodes, ranks per node, …), from the same
    environment variables a StreamingDataset reads."""
    from streaming.base.world import World

    return World.detect().to_json()
