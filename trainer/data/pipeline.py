"""The data side as one stage: each optimizer step's micro-batches, ready for the engine.

    StepBatches (read + decode) → balance_ranks → pack_step → [pin, copy to the device] → StepData

The loop only asks for the next `StepData`. With `data.prefetch_steps` > 0 (and loader worker
processes, `data.num_workers` > 0) a background thread prepares the steps after the one being
computed, so the host's share of a step (waiting for
samples, balancing, packing, planning layouts, the host-to-device copy) overlaps the model's
forward/backward instead of preceding it.

What keeps it exact:
- The collectives of the data side (the balance's gathers, the micro-batch count's all_reduce)
  run on a gloo process group of their own, so they never interleave with the gradient
  collectives of the default group, whichever thread issues them.
- Every rank's thread prepares exactly the steps it was permitted (the steps taken plus
  `prefetch_steps`), in order, so the ranks' data collectives always match, also when the run
  stops: a closing pipeline finishes the steps already permitted, and starts no other.
- A prepared step is not consumed until the loop takes it: `cursor` and `last_sample_ids` are
  those of the last step taken, so a checkpoint never counts a prefetched step.
- Nothing here touches torch's global random state (the loaders draw from their own generator),
  so a model that samples noise sees the same stream with prefetching as without.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from models.batch import PackedBatch
from trainer.data.decode import Document, SampleDecoder
from trainer.data.packing import balance_ranks, layout_options, pack_step
from trainer.data.stream import DataCursor, Skipped, StepBatches
from trainer.distributed import (
    WorldInfo,
    all_gather_object,
    all_reduce_max,
    is_distributed,
    new_cpu_group,
)


@dataclass
class StepData:
    """One optimizer step's input on this rank."""

    micro_batches: list[PackedBatch]  # on the engine's device
    docs: list[Document]  # the documents this rank runs, after balancing
    skipped: list[Skipped]  # this rank's skipped samples of the step
    sample_ids: list[str]  # this rank's samples as streaming dealt them, skipped ones included
    cursor: DataCursor  # the data cursor once this step is consumed
    ready: torch.cuda.Event | None = None  # the device copy is complete (CUDA only)


class StepPipeline:
    """`next_step()` gives this rank's next `StepData`; `seek`, `cursor`, `close` as a reader."""

    def __init__(
        self,
        cfg,
        decoder: SampleDecoder,
        world: WorldInfo,
        device: torch.device,
        cache_key: str = "",
    ):
        self.cfg = cfg
        self.world = world
        self.device = device
        self.batches = StepBatches(cfg.data, decoder, world, cache_key=cache_key)
        self.layout_options = layout_options(cfg.model, device)
        # Prefetching runs in a thread of this process, so it pays only when the samples are
        # read and decoded in loader worker processes: with data.num_workers 0 the thread would
        # decode beside the training thread and the two would take turns at the interpreter
        # (`scripts/bench_step.py --num-workers 0` measures it).
        self.prefetch_steps = cfg.data.prefetch_steps if cfg.data.num_workers > 0 else 0
        # Created on every rank, in the same order: a collective of the default group.
        self.group = new_cpu_group() if is_distributed() else None
        self.cursor = DataCursor()  # after the last step taken
        self.last_sample_ids: list[str] = []
        self._prefetcher: _Prefetcher | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batches.global_batch_size

    def seek(self, epoch: int, sample_in_epoch: int) -> None:
        """Continue at global sample `sample_in_epoch` of `epoch`; before the first step."""
        assert self._prefetcher is None, "seek after the pipeline started"
        self.batches.seek(epoch, sample_in_epoch)
        self.cursor = DataCursor(epoch, sample_in_epoch)

    def next_step(self) -> tuple[StepData, float]:
        """The next step's data and the seconds this call waited for it."""
        started = time.perf_counter()
        if self.prefetch_steps == 0:
            step = self._prepare()
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._prepare, self.prefetch_steps)
            step = self._prefetcher.take()
        if step.ready is not None:
            # note: the compute stream waits for the copy stream; no host sync.
            torch.cuda.current_stream(self.device).wait_event(step.ready)
            for micro_batch in step.micro_batches:
                _record_stream(micro_batch, torch.cuda.current_stream(self.device))
        self.cursor = step.cursor
        self.last_sample_ids = step.sample_ids
        return step, time.perf_counter() - started

    def _prepare(self) -> StepData:
        docs, skipped = self.batches.next_step()
        sample_ids = list(self.batches.last_sample_ids)
        cursor = DataCursor(self.batches.cursor.epoch, self.batches.cursor.sample_in_epoch)
        if self.cfg.data.balance_ranks:
            docs = balance_ranks(docs, self.world.rank, self._all_gather_object)
        micro_batches = pack_step(
            docs,
            self.cfg.data.max_tokens,
            agree_num_micro_batches=self._all_reduce_max,
            **self.layout_options,
        )
        ready = None
        if self.device.type == "cuda":
            micro_batches, ready = _copy_to_device(micro_batches, self.device)
        return StepData(micro_batches, docs, skipped, sample_ids, cursor, ready)

    def _all_gather_object(self, obj) -> list:
        return all_gather_object(obj, group=self.group)

    def _all_reduce_max(self, value: int) -> int:
        return all_reduce_max(value, group=self.group)

    def close(self) -> None:
        """Stop prefetching (after the steps already permitted) and give streaming's
        registration back; every rank calls it at the end of a run."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        self.batches.close()


class _Prefetcher:
    """A thread that runs `prepare` ahead of `take`: at most `depth` steps beyond the last one
    taken, each step once, in order; an error is raised from the `take` that wanted that step."""

    def __init__(self, prepare, depth: int):
        self._prepare = prepare
        self._permits = depth  # steps the thread may still prepare
        self._ready: list = []  # prepared steps (or an exception), oldest first
        self._closed = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name="splitvlm-step-prefetch", daemon=True
        )
        self._thread.start()

    def take(self) -> StepData:
        with self._condition:
            self._permits += 1  # the step after the prefetched ones may start now
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._ready)
            item = self._ready.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                # A closed prefetcher still prepares the steps it was permitted: every rank's
                # thread has the same permits, so their data collectives stay matched.
                self._condition.wait_for(lambda: self._permits > 0 or self._closed)
                if self._permits == 0:
                    return
                self._permits -= 1
            try:
                item = self._prepare()
            except BaseException as err:  # re-raised in the training thread
                item = err
            with self._condition:
                self._ready.append(item)
                self._condition.notify_all()
            if isinstance(item, BaseException):
                return


def _copy_to_device(micro_batches: list[PackedBatch], device: torch.device):
    """Pinned host memory → device on a side stream, so the copy overlaps compute; returns the
    device batches and an event that marks the copy complete."""
    stream = _copy_stream(device)
    with torch.cuda.stream(stream):
        moved = [mb.pin_memory().to(device) for mb in micro_batches]
        ready = torch.cuda.Event()
        ready.record(stream)
    return moved, ready


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def _record_stream(micro_batch: PackedBatch, stream) -> None:
    # The batch was allocated on the copy stream and is used on the compute stream: tell the
    # caching allocator, or its memory could be reused while compute still reads it.
    for tensor in micro_batch.tensors():
        tensor.record_stream(stream)
