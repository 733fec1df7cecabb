"""What a user sees during a run (rank 0): console progress, Weights & Biases, the final plot.

The per-step metrics dict comes from `TrainLoop.train_step`; RUN/metrics.jsonl is written by
`MetricsLogger` (trainer/callbacks.py). Nothing here logs environment variables; a test checks
that a WANDB_API_KEY in the environment reaches no file of the run directory.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

from trainer.callbacks import Callback
from trainer.config import Config, config_to_dict
from trainer.distributed import WorldInfo

WANDB_ID_FILE = "wandb_run_id"


def reporting_callbacks(cfg: Config, run_dir: Path, world: WorldInfo) -> list[Callback]:
    if not world.is_main:
        return []
    callbacks: list[Callback] = [
        ConsoleProgress(cfg.run.steps, cfg.run.log_every, cfg.logging.progress)
    ]
    if cfg.logging.wandb.mode != "disabled":
        callbacks.append(WandbLogger(cfg, run_dir))
    if cfg.logging.plot:
        callbacks.append(PlotWriter(run_dir))
    return callbacks


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_line(metrics: dict, total_steps: int, eta_seconds: float, skipped: int) -> str:
    """The periodic console line: `step  25/300  text_loss …  eta …`."""
    parts = [f"step {metrics['step']:>6}/{total_steps}"]
    parts += [f"{k} {metrics[k]:.4f}" for k in ("text_loss", "image_loss") if k in metrics]
    parts.append(f"lr {metrics['lr']:.2e}")
    parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    parts.append(f"tokens/s {metrics['tokens_per_s']:,.0f}")
    mfu = metrics.get("mfu")
    parts.append(f"mfu {mfu:.1%}" if mfu is not None else "mfu n/a")
    parts.append(f"data {metrics['data_wait_fraction']:.0%}")
    parts.append(f"host {metrics['host_fraction']:.0%}")
    if metrics.get("max_allocated_gb") is not None:
        parts.append(f"mem {metrics['max_allocated_gb']:.1f}GB")
    else:
        parts.append(f"rss {metrics['max_rss_gb']:.2f}GB")
    if skipped:
        parts.append(f"skipped {skipped}")
    parts.append(f"eta {format_duration(eta_seconds)}")
    return "  ".join(parts)


class ConsoleProgress(Callback):
    """A progress bar (step, ETA, loss, tokens/s) when stdout is a terminal, plus a line every
    `log_every` steps; only the lines otherwise (log files, Ray workers, CI)."""

    def __init__(self, total_steps: int, log_every: int, mode: str = "auto", stream=None):
        self.stream = stream or sys.stdout
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.use_bar = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self.bar = None
        self.started = 0.0
        self.first_step = 0
        self.skipped_since_line = 0

    def on_train_start(self, loop) -> None:
        self.started = time.perf_counter()
        self.first_step = loop.step
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total_steps,
                initial=loop.step,
                file=self.stream,
                dynamic_ncols=True,
                bar_format="step {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}",
            )

    def eta(self, step: int) -> float:
        per_step = (time.perf_counter() - self.started) / max(step - self.first_step, 1)
        return per_step * (self.total_steps - step)

    def on_step_end(self, loop, metrics: dict) -> None:
        step = metrics["step"]
        self.skipped_since_line += metrics.get("skipped", 0)
        if self.bar is not None:
            losses = "  ".join(
                f"{k.removesuffix('_loss')} {metrics[k]:.4f}"
                for k in ("text_loss", "image_loss")
                if k in metrics
            )
            self.bar.set_postfix_str(
                f"{losses}  tokens/s {metrics['tokens_per_s']:,.0f}", refresh=False
            )
            self.bar.update(step - self.bar.n)
        if step % self.log_every == 0 or step == self.total_steps:
            line = format_line(metrics, self.total_steps, self.eta(step), self.skipped_since_line)
            self.skipped_since_line = 0
            if self.bar is not None:
                self.bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def on_train_end(self, loop) -> None:
        if self.bar is not None:
            self.bar.close()


class WandbLogger(Callback):
    """Logs every step's metrics and the resolved config to W&B.

    offline (the default) writes RUN/wandb/offline-run-*/ and needs neither a network nor a key;
    `wandb sync RUN/wandb/offline-run-*` uploads later. The run id is kept in RUN/wandb_run_id,
    so a resumed run continues the same W&B run.
    """

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run = None

    def on_train_start(self, loop) -> None:
        import wandb

        settings = self.cfg.logging.wandb
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            mode=settings.mode,
            dir=str(self.run_dir),
            project=settings.project,
            entity=settings.entity or None,
            name=settings.name or self.cfg.run.name,
            tags=list(settings.tags) or None,
            config=config_to_dict(self.cfg),
            id=run_id,
            resume="allow",
            # quiet: the start banner and the sync hint, not the end-of-run summary table.
            settings=wandb.Settings(quiet=True),
        )

    def on_step_end(self, loop, metrics: dict) -> None:
        self.run.log(wandb_metrics(metrics), step=metrics["step"])

    def on_train_end(self, loop) -> None:
        self.run.finish()


def wandb_metrics(metrics: dict) -> dict:
    """Flat numbers for W&B: skips by reason as skipped/REASON, missing values (None) left out."""
    flat = {}
    for key, value in metrics.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, dict):
            flat.update({f"{key.removesuffix('_by_reason')}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


class PlotWriter(Callback):
    """RUN/metrics.png at the end of a run (same as `splitvlm plot RUN`)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_train_end(self, loop) -> None:
        from trainer.plot import plot_run

        path = plot_run(self.run_dir)
        print(f"wrote {path}", file=sys.stderr, flush=True)
