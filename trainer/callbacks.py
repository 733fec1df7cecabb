"""Side concerns of the loop as hooks: metrics logging, checkpointing, stop requests, replay
accounting after a restart, and the fault-injection hook of the recovery tests."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from trainer.checkpoint import save_checkpoint
from trainer.distributed import all_gather_object, all_reduce_max

STOP_FILE = "stop_request"  # written by the driver on SIGINT/SIGTERM (cluster/launch.py)
FAULT_ENV = "SPLITVLM_FAULT_AT_STEP"


class Callback:
    def on_train_start(self, loop) -> None: ...

    def on_step_end(self, loop, metrics: dict) -> None: ...

    def on_train_end(self, loop) -> None: ...


class MetricsLogger(Callback):
    """One JSON line per step in RUN/metrics.jsonl (rank 0). Console output: trainer/reporting.py."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = None

    def on_train_start(self, loop) -> None:
        if not loop.world.is_main:
            return
        if self.path.is_file():
            # A resumed run repeats the steps after its checkpoint: drop their old lines so the
            # file holds each step once, from the run that continued.
            # A line cut short by a crash is dropped too.
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if 0 < _step_of(line) <= loop.step]
            if len(kept) < len(lines):
                self.path.write_text("".join(kept))
        self.file = self.path.open("a")

    def on_step_end(self, loop, metrics: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()

    def on_train_end(self, loop) -> None:
        if self.file is not None:
            self.file.close()


def _step_of(line: str) -> int:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return -1


def _record(line: str) -> dict:
    """A JSON line, or {} for one cut short by a crash."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


class Checkpointer(Callback):
    def __init__(self, run_dir: Path, every: int, keep_last: int, save_on_stop: bool = True):
        self.run_dir = Path(run_dir)
        self.every = every
        self.keep_last = keep_last
        self.save_on_stop = save_on_stop
        self.last_saved = -1

    def on_train_start(self, loop) -> None:
        if loop.step > 0:  # resumed: that step's checkpoint exists
            self.last_saved = loop.step

    def save(self, loop) -> None:
        started = time.perf_counter()
        path = save_checkpoint(
            self.run_dir,
            loop.step,
            loop.engine,
            loop.trainer_state(),
            loop.cfg,
            loop.world,
            self.keep_last,
        )
        self.last_saved = loop.step
        if loop.world.is_main:
            print(
                f"saved {path} in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True
            )

    def on_step_end(self, loop, metrics: dict) -> None:
        if self.every > 0 and loop.step % self.every == 0:
            self.save(loop)

    def on_train_end(self, loop) -> None:
        if self.last_saved != loop.step and (self.save_on_stop or not loop.stop_requested):
            self.save(loop)


class StopOnRequest(Callback):
    """Ends the run after the current step once RUN/stop_request exists. Rank 0 looks and every
    rank follows its answer, so all leave the loop at the same step (a rank that stopped alone
    would hang the others in their next collective)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / STOP_FILE

    def check(self, loop) -> None:
        # note: one tiny all_reduce per step (a CPU-GPU sync point on NCCL).
        if all_reduce_max(int(loop.world.is_main and self.path.exists())):
            loop.stop_requested = True
            if loop.world.is_main:
                print(f"stop requested: stopping at step {loop.step}", file=sys.stderr, flush=True)

    def on_train_start(self, loop) -> None:
        self.check(loop)

    def on_step_end(self, loop, metrics: dict) -> None:
        self.check(loop)


class ReplayCounter(Callback):
    """Counts the steps a restarted run repeats: those its previous attempt finished (logged in
    metrics.jsonl) after the checkpoint it resumes from. One line per restart goes to
    RUN/resumes.jsonl; `loop.replayed_steps` is the run's total. Must run before MetricsLogger,
    which drops those lines."""

    def __init__(self, run_dir: Path):
        self.metrics = Path(run_dir) / "metrics.jsonl"
        self.log = Path(run_dir) / "resumes.jsonl"

    def on_train_start(self, loop) -> None:
        if not loop.world.is_main:
            return
        if self.metrics.is_file():
            last_logged = max(map(_step_of, self.metrics.read_text().splitlines()), default=0)
            replayed = max(0, last_logged - loop.step)
            record = {
                "resumed_from_step": loop.step,
                "last_logged_step": last_logged,
                "replayed_steps": replayed,
                "world_size": loop.world.world_size,
            }
            with self.log.open("a") as file:
                file.write(json.dumps(record) + "\n")
            if replayed:
                print(
                    f"replaying steps {loop.step + 1}-{last_logged}: finished before the restart, "
                    "after the last checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
        if self.log.is_file():
            records = [_record(line) for line in self.log.read_text().splitlines()]
            loop.replayed_steps = sum(r.get("replayed_steps", 0) for r in records)


class SampleIdLogger(Callback):
    """RUN/samples.jsonl (`run.log_sample_ids`): every step's sample ids over all ranks, in rank
    order. Appended, never truncated: a step replayed after a restart appears again, so the file
    shows exactly what was consumed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "samples.jsonl"
        self.file = None

    def on_train_start(self, loop) -> None:
        if not loop.world.is_main:
            return
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                cut_short = existing.read(1) != b"\n"
        else:
            cut_short = False
        self.file = self.path.open("a")
        if cut_short:
            self.file.write("\n")  # a line cut short by a crash stays a line of its own

    def on_step_end(self, loop, metrics: dict) -> None:
        per_rank = all_gather_object(loop.data.last_sample_ids)
        if self.file is not None:
            ids = [sample_id for rank_ids in per_rank for sample_id in rank_ids]
            record = {"step": loop.step, "epoch": loop.data.cursor.epoch, "sample_ids": ids}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def on_train_end(self, loop) -> None:
        if self.file is not None:
            self.file.close()


class WorkerLogger(Callback):
    """RUN/workers.jsonl: one line per start of the run (restarts and resizes included) with
    where every rank runs: its ranks and node, the node's address, host and process, its temp
    directory (node-local caches) and streaming's view of the world. Rank 0 writes it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "workers.jsonl"

    def on_train_start(self, loop) -> None:
        from trainer.data.streaming_compat import streaming_world

        world = loop.world
        here = {
            **dataclasses.asdict(world),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "temp_dir": tempfile.gettempdir(),
            "streaming": streaming_world(),
        }
        workers = all_gather_object(here)
        if world.is_main:
            record = {"step": loop.step, "world_size": world.world_size, "workers": workers}
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


class FaultInjector(Callback):
    """Test hook for recovery: with SPLITVLM_FAULT_AT_STEP=STEP[:RANK] (rank 0 by default) that
    rank's process kills itself with SIGKILL right after STEP, as a lost node would die. A marker
    file in the run directory keeps the restarted run from dying again."""

    def __init__(self, run_dir: Path, spec: str):
        step, _, rank = spec.partition(":")
        self.step, self.rank = int(step), int(rank or 0)
        self.marker = Path(run_dir) / f"fault_injected_step_{self.step}_rank_{self.rank}"

    def on_step_end(self, loop, metrics: dict) -> None:
        if loop.step != self.step or loop.world.rank != self.rank or self.marker.exists():
            return
        self.marker.write_text(f"{os.getpid()}\n")
        print(f"fault injection: killing rank {self.rank} after step {loop.step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def fault_injection(run_dir: Path) -> list[Callback]:
    spec = os.environ.get(FAULT_ENV, "")
    return [FaultInjector(run_dir, spec)] if spec else []
