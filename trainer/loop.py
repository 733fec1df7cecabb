"""`train(cfg)`: the training loop. Runs the same in a Ray worker, a test or a notebook."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from models.split_vlm import SplitVLM
from trainer.callbacks import Checkpointer, MetricsLogger
from trainer.checkpoint import (
    CheckpointLoadError,
    complete_checkpoints,
    load_checkpoint,
    load_model_weights,
    warn_skipped,
)
from trainer.config import Config, save_config
from trainer.data.decode import Decoder
from trainer.data.packing import pack_step
from trainer.data.stream import StepBatches
from trainer.distributed import (
    WorldInfo,
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    world_info,
)
from trainer.engines import build_engine
from trainer.optim import apply_freeze, learning_rate


def tokenizer_path(cfg: Config) -> Path:
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.path) / "tokenizer"


def load_tokenizer(cfg: Config):
    path = tokenizer_path(cfg)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory not found: {path} (set data.tokenizer)")
    return AutoTokenizer.from_pretrained(str(path))


def build_model(cfg: Config, tokenizer) -> SplitVLM:
    """The single-device model, initialized (or loaded from checkpoint.init_from) and frozen
    as configured; engines shard it afterwards."""
    if cfg.model.vocab_size <= 0:
        cfg.model.vocab_size = len(tokenizer)
    # Same seed on every rank: replicas start identical before any sharding.
    torch.manual_seed(cfg.run.seed)
    model = SplitVLM(cfg.model)
    if cfg.checkpoint.init_from:
        load_model_weights(model, Path(cfg.checkpoint.init_from))
    apply_freeze(model, cfg.optim.freeze)
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
        seed_everything(cfg.run.seed + self.world.rank)
        tokenizer = load_tokenizer(cfg)
        model = build_model(cfg, tokenizer)
        device = (
            torch.device("cuda", self.world.local_rank)
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.engine = build_engine(cfg, self.world, model, device)
        decoder = Decoder(tokenizer, cfg.model, cfg.data.max_tokens, seed=cfg.run.seed)
        self.data = StepBatches(cfg.data, decoder, self.world)
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.callbacks = [
            MetricsLogger(self.run_dir, cfg.run.log_every),
            Checkpointer(self.run_dir, cfg.checkpoint.every, cfg.checkpoint.keep_last),
        ]

    def trainer_state(self) -> dict:
        return {
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "data": self.data.cursor.to_dict(),
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
        self.data.seek(state["data"]["epoch"], state["data"]["sample_in_epoch"])
        if self.world.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr, flush=True)

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
        while self.step < cfg.run.steps:
            metrics = self.train_step()
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
        for callback in self.callbacks:
            callback.on_train_end(self)
        elapsed = time.perf_counter() - started
        return self.summary(metrics if self.step > first_step else {}, elapsed)

    def train_step(self) -> dict:
        cfg = self.cfg
        step_started = time.perf_counter()
        docs, skipped = self.data.next_step()
        data_seconds = time.perf_counter() - step_started
        micro_batches = pack_step(
            docs,
            cfg.data.max_tokens,
            cfg.model.image_attention,
            agree_num_micro_batches=all_reduce_max,
        )
        losses = self.engine.forward_backward(micro_batches)
        lr = learning_rate(self.step, cfg.run.steps, cfg.optim)
        grad_norm = self.engine.step(lr)
        self.step += 1
        num_tokens, num_samples = all_reduce_sum([sum(d.num_tokens for d in docs), len(docs)])
        self.tokens_seen += int(num_tokens)
        self.samples_seen += self.data.global_batch_size
        seconds = time.perf_counter() - step_started
        return {
            "step": self.step,
            **{k: v for k, v in losses.items() if k.endswith("_loss")},
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": num_tokens / seconds,
            "samples_per_s": num_samples / seconds,
            "data_wait_fraction": data_seconds / seconds,
            "micro_batches": len(micro_batches),
            "skipped": len(skipped),
        }

    def summary(self, last: dict, elapsed: float) -> dict:
        summary = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "seconds": round(elapsed, 1),
            **{k: last[k] for k in ("text_loss", "image_loss") if k in last},
            "skipped": dict(self.data.cursor.skipped),
            "run_dir": str(self.run_dir),
        }
        if self.world.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg: Config, world: WorldInfo | None = None) -> dict:
    """Train to `cfg.run.steps`, resuming from the run directory's latest checkpoint if any."""
    return TrainLoop(cfg, world).run()
