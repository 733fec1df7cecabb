"""`train(cfg)`: the training loop. Runs the same in a Ray worker, a test or a notebook."""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from models.flops import ModelFlops
from models.split_vlm import SplitVLM
from trainer.callbacks import (
    Checkpointer,
    MetricsLogger,
    ReplayCounter,
    SampleIdLogger,
    StopOnRequest,
    WorkerLogger,
    fault_injection,
)
from trainer.checkpoint import (
    CheckpointLoadError,
    complete_checkpoints,
    load_checkpoint,
    warn_skipped,
)
from trainer.config import Config, DataConfig, save_config
from trainer.data.decode import SampleDecoder, load_tokenizer, tokenizer_dir
from trainer.data.pipeline import StepPipeline
from trainer.data.stream import run_cache_key
from trainer.distributed import WorldInfo, broadcast_object, ensure_process_group, world_info
from trainer.engines import build_engine
from trainer.engines.materialize import build_engine_model
from trainer.host_memory import set_mmap_threshold
from trainer.metrics import StepMeter
from trainer.optim import learning_rate
from trainer.reporting import reporting_callbacks


class DataError(RuntimeError):
    """The data went bad at run time (too many skipped samples): the run stops, exit code 1."""


def check_bad_fraction(skipped: Counter, samples_seen: int, cfg: DataConfig) -> None:
    """Raise DataError when more than `cfg.max_bad_fraction` of the samples seen were skipped."""
    num_skipped = sum(skipped.values())
    if (
        samples_seen < cfg.bad_fraction_min_samples
        or num_skipped <= cfg.max_bad_fraction * samples_seen
    ):
        return
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.most_common())
    raise DataError(
        f"{num_skipped} of {samples_seen} samples skipped "
        f"({num_skipped / samples_seen:.1%} > data.max_bad_fraction={cfg.max_bad_fraction:g}): "
        f"{reasons}"
    )


def build_training_model(cfg: Config, tokenizer) -> SplitVLM:
    """The single-device model, initialized (or loaded from checkpoint.init_from) and frozen
    as configured."""
    model, initial = build_engine_model(cfg, tokenizer)
    assert initial is None, "a sharded engine's model: use build_engine_model"
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainLoop:
    def __init__(self, cfg: Config, world: WorldInfo | None = None):
        self.cfg = cfg
        self.world = world or world_info()
        self.run_dir = Path(cfg.run.dir)
        set_mmap_threshold(cfg.run.host_mmap_threshold_kib)  # before the model's memory
        seed_everything(cfg.run.seed + self.world.rank)
        tokenizer = load_tokenizer(tokenizer_dir(cfg.data), cfg.model)
        device = (
            torch.device("cuda", self.world.local_rank)
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        if cfg.engine.name == "deepspeed":
            # ZeRO-3 partitions the model as it is built, over the process group.
            ensure_process_group(self.world)
            self.world.export_env()
        model, initial_weights = build_engine_model(cfg, tokenizer, device)
        # Counted on the unsharded structure, so parameter counts are global.
        flops = ModelFlops(initial_weights.template if initial_weights else model)
        self.meter = StepMeter(flops, self.world, device, cfg.logging.peak_flops_per_device)
        self.engine = build_engine(cfg, self.world, model, device, initial_weights)
        decoder = SampleDecoder(
            tokenizer,
            cfg.model,
            cfg.data.max_tokens,
            seed=cfg.run.seed,
            max_image_pixels=cfg.data.max_image_pixels,
        )
        # Remote streams are cached per run: two jobs on a node never share a streaming cache.
        self.data = StepPipeline(
            cfg, decoder, self.world, device, cache_key=run_cache_key(cfg.run.name, cfg.run.dir)
        )
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.skipped: Counter = Counter()  # all ranks, by reason, since the run's first step
        self.stop_requested = False  # set by StopOnRequest (SIGINT/SIGTERM to the driver)
        self.replayed_steps = 0  # set by ReplayCounter: steps repeated after restarts
        self.callbacks = [
            ReplayCounter(self.run_dir),  # before MetricsLogger drops the replayed lines
            MetricsLogger(self.run_dir),
            *([SampleIdLogger(self.run_dir)] if cfg.run.log_sample_ids else []),
            WorkerLogger(self.run_dir),
            *reporting_callbacks(cfg, self.run_dir, self.world),
            StopOnRequest(self.run_dir),
            Checkpointer(
                self.run_dir,
                cfg.checkpoint.every,
                cfg.checkpoint.keep_last,
                save_on_stop=cfg.checkpoint.on_stop,
            ),
            *fault_injection(self.run_dir),
        ]

    def trainer_state(self) -> dict:
        return {
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "skipped": dict(self.skipped),
            "data": self.data.cursor.to_dict(),
            "world_size": self.world.world_size,
        }

    def resume(self) -> None:
        """Continue from the newest checkpoint that loads; a broken one is skipped on all ranks."""
        found = complete_checkpoints(self.run_dir) if self.world.is_main else []
        candidates = broadcast_object([str(p) for p in found])
        for candidate in map(Path, candidates):
            try:
                state = load_checkpoint(candidate, self.engine, self.world)
            except CheckpointLoadError as err:
                if self.world.is_main:
                    warn_skipped(candidate, f"it does not load ({err})")
                continue
            path = candidate
            break
        else:
            if candidates:
                # Starting over would soon prune these; they may only need a fixed environment.
                raise ValueError(
                    f"none of the checkpoints in {self.run_dir / 'checkpoints'} loads (see the "
                    "warnings above); move them away to start the run over"
                )
            return
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]
        self.tokens_seen = state["tokens_seen"]
        self.skipped = Counter(state.get("skipped", {}))
        self.data.seek(state["data"]["epoch"], state["data"]["sample_in_epoch"])
        if self.world.is_main:
            saved_on = state.get("world_size", self.world.world_size)
            resized = ""
            if saved_on != self.world.world_size:
                resized = f" (saved by {saved_on} workers, now {self.world.world_size})"
            print(f"resumed from {path} at step {self.step}{resized}", file=sys.stderr, flush=True)

    def run(self) -> dict:
        cfg = self.cfg
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.resume()
        for callback in self.callbacks:
            callback.on_train_start(self)
        started = time.perf_counter()
        first_step = self.step
        while self.step < cfg.run.steps and not self.stop_requested:
            metrics = self.train_step()
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
        for callback in self.callbacks:
            callback.on_train_end(self)
        self.data.close()
        elapsed = time.perf_counter() - started
        return self.summary(metrics if self.step > first_step else {}, elapsed)

    def train_step(self) -> dict:
        cfg = self.cfg
        step_started = time.perf_counter()
        data, wait_seconds = self.data.next_step()
        compute_started = time.perf_counter()
        losses = self.engine.forward_backward(data.micro_batches)
        lr = learning_rate(self.step, cfg.run.steps, cfg.optim)
        grad_norm = self.engine.step(lr)
        compute_seconds = time.perf_counter() - compute_started
        self.step += 1
        seconds = time.perf_counter() - step_started
        measured = self.meter.measure(data, wait_seconds, compute_seconds, seconds)
        self.tokens_seen += measured["tokens"]
        self.samples_seen += self.data.global_batch_size
        self.skipped.update(measured["skipped_by_reason"])
        check_bad_fraction(self.skipped, self.samples_seen, cfg.data)
        return {
            "step": self.step,
            **{k: v for k, v in losses.items() if k.endswith("_loss")},
            "lr": lr,
            "grad_norm": grad_norm,
            **measured,
            "tokens_seen": self.tokens_seen,
        }

    def summary(self, last: dict, elapsed: float) -> dict:
        summary = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "seconds": round(elapsed, 1),
            **{k: last[k] for k in ("text_loss", "image_loss") if k in last},
            "skipped": dict(self.skipped),
            "replayed_steps": self.replayed_steps,
            "stopped": self.stop_requested,
            "run_dir": str(self.run_dir),
        }
        if self.world.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg: Config, world: WorldInfo | None = None) -> dict:
    """Train to `cfg.run.steps`, resuming from the run directory's latest checkpoint if any."""
    return TrainLoop(cfg, world).run()
