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
    """One JSON line per step in RUN/metrics.jsonl (rank 0), a console line every `log_every`."""

    def __init__(self, run_dir: Path, log_every: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_every = max(1, log_every)
        self.file = None

    def on_train_start(self, loop) -> None:
        if loop.world.is_main:
            self.file = self.path.open("a")

    def on_step_end(self, loop, metrics: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = metrics["step"]
        if step % self.log_every == 0 or step == loop.cfg.run.steps:
            losses = "  ".join(
                f"{k} {metrics[k]:.4f}" for k in ("text_loss", "image_loss") if k in metrics
            )
            skipped = f"  skipped {metrics['skipped']}" if metrics.get("skipped") else ""
            print(
                f"step {step:>6}/{loop.cfg.run.steps}  {losses}  lr {metrics['lr']:.2e}  "
                f"tokens/s {metrics['tokens_per_s']:,.0f}{skipped}",
                flush=True,
            )

    def on_train_end(self, loop) -> None:
        if self.file is not None:
            self.file.close()


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
