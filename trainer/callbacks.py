"""Side concerns of the loop as hooks: metrics logging and checkpointing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from trainer.checkpoint import save_checkpoint


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


class Checkpointer(Callback):
    def __init__(self, run_dir: Path, every: int, keep_last: int):
        self.run_dir = Path(run_dir)
        self.every = every
        self.keep_last = keep_last
        self.last_saved = -1

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
        if self.last_saved != loop.step:
            self.save(loop)
