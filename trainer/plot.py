"""RUN/metrics.jsonl → a PNG of losses, learning rate, throughput and MFU per step.

Uses matplotlib's object API with the Agg canvas, never pyplot: no display, no global state, safe
in a Ray worker or a test.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOSS_COLORS = {"text_loss": "tab:blue", "image_loss": "tab:orange"}


def read_metrics(path: Path) -> list[dict]:
    """The steps of a metrics.jsonl, each once (the last line of a step wins), in step order."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (the curve a reader's eye draws through the noise)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(records: list[dict], out: Path, title: str = "") -> Path:
    if not records:
        raise ValueError("no steps to plot")
    steps = [r["step"] for r in records]
    window = max(1, len(records) // 30)
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    (loss_ax, lr_ax), (speed_ax, mfu_ax) = fig.subplots(2, 2, sharex=True)

    for key, color in LOSS_COLORS.items():
        if all(key in r for r in records):
            values = [r[key] for r in records]
            loss_ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            loss_ax.plot(steps, smooth(values, window), color=color, label=key)
    loss_ax.set_title("losses")
    loss_ax.legend()

    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:green")
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    speed = [r["tokens_per_s"] for r in records]
    speed_ax.plot(steps, speed, color="tab:purple", alpha=0.25, linewidth=0.8)
    speed_ax.plot(steps, smooth(speed, window), color="tab:purple", label="all devices")
    if "tokens_per_s_per_device" in records[0] and any(
        r["tokens_per_s_per_device"] != r["tokens_per_s"] for r in records
    ):
        per_device = smooth([r["tokens_per_s_per_device"] for r in records], window)
        speed_ax.plot(steps, per_device, color="tab:gray", label="per device")
        speed_ax.legend(loc="lower right")
    speed_ax.set_title("throughput (tokens/s)")
    speed_ax.set_ylim(bottom=0)
    speed_ax.set_xlabel("step")

    mfu = [r.get("mfu") for r in records]
    if any(v is not None for v in mfu):
        mfu_ax.plot(steps, [100 * v if v is not None else float("nan") for v in mfu])
        mfu_ax.set_title("MFU (%)")
        mfu_ax.set_ylim(bottom=0)
    elif all("model_flops_per_token" in r for r in records):
        # No peak FLOP/s for this device (a CPU, say): the achieved model FLOP/s instead.
        achieved = [
            r["model_flops_per_token"] * r["tokens_per_s_per_device"] / 1e9 for r in records
        ]
        mfu_ax.plot(steps, achieved, color="tab:red", alpha=0.25, linewidth=0.8)
        mfu_ax.plot(steps, smooth(achieved, window), color="tab:red")
        mfu_ax.set_title("model GFLOP/s per device (MFU n/a)")
        mfu_ax.set_ylim(bottom=0)
    else:
        mfu_ax.set_title("MFU n/a")
        mfu_ax.set_yticks([])
    mfu_ax.set_xlabel("step")
    for ax in (loss_ax, lr_ax, speed_ax, mfu_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out = Path(out)
    fig.savefig(out, dpi=100)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Plot RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/metrics.png); returns the path."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found (is {run_dir} a run directory?)")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} holds no steps yet")
    return plot_metrics(records, out or run_dir / "metrics.png", title=run_dir.name)
