"""Step time, data wait and host share of the training loop with step prefetching on and off
(issue #19), side by side, on the tiny preset and on a larger model whose steps take >= 100 ms.

    python scripts/bench_step.py                     # demo shards written to a temp dir
    python scripts/bench_step.py --steps 15 --repeats 1 --json

Each run trains yaml/tiny.yaml (plus the model's overrides, `MODELS`) from scratch in this
process: engine local, no Ray, W&B and the plot off, a temp run dir, data.num_workers
`--num-workers`, data.prefetch_steps 1 ("on") or 0 ("off"), for `--warmup` + `--steps` steps.
The numbers are those of RUN/metrics.jsonl, the warm-up steps left out:
- step_seconds: the whole step, waiting for its data included;
- data_wait_fraction: the time the step waited for its data / step time;
- host_fraction: the training thread's time outside forward/backward/optimizer step / step time.
A run reports the median of each over its steps, a case the median of its `--repeats` runs; on
and off run alternately (on, off, on, off, ...) so the machine's load hits both alike. The
baseline is prefetching off, measured in the same run: the ratio is step time on / off.

Targets (issue #19), prefetching on:
- tiny, data.num_workers=2: data_wait_fraction <= 2%, host_fraction <= 5%, step time on / off
  <= 1 (not worse than without prefetching);
- large (its measured step time is printed: >= 100 ms is the condition): host_fraction <= 2%.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Overrides of yaml/tiny.yaml. "large": about 0.35 s per step on a busy 2-core CPU, one
# micro-batch a step (~850 tokens: a demo sample is ~27); tiny: about 55 ms.
MODELS = {
    "tiny": [],
    "large": [
        "model.d_model=256",
        "model.num_heads=8",
        "model.num_kv_heads=4",
        "model.num_core_blocks=4",
        "data.batch_size=32",
        "data.max_tokens=2048",
    ],
}
METRICS = ("step_seconds", "data_wait_fraction", "host_fraction")
# (model, metric, "<=" or ">=", bound): the metric with prefetching on, or the ratio on / off.
TARGETS = (
    ("tiny", "data_wait_fraction", "<=", 0.02),
    ("tiny", "host_fraction", "<=", 0.05),
    ("tiny", "step_time_ratio", "<=", 1.0),
    ("large", "step_seconds", ">=", 0.1),  # the condition for the large model's targets
    ("large", "host_fraction", "<=", 0.02),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of a run, not timed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, on/off alternated")
    parser.add_argument("--num-workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    return parser.parse_args(argv)


def run_once(args, data: Path, run_dir: Path, model: str, prefetch_steps: int) -> dict:
    """Train one run; the median over its timed steps of each of `METRICS`."""
    from trainer.config import load_config
    from trainer.loop import TrainLoop

    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [
            f"data.path={data}",
            f"run.dir={run_dir}",
            f"run.steps={args.warmup + args.steps}",
            "run.log_every=1000000",
            "logging.progress=lines",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            "checkpoint.every=0",  # still saves once after the last step: in no step's time
            f"data.num_workers={args.num_workers}",
            f"data.prefetch_steps={prefetch_steps}",
            *MODELS[model],
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's progress line at the end
        TrainLoop(cfg).run()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [record for record in map(json.loads, lines) if record["step"] > args.warmup]
    assert len(steps) == args.steps, (len(steps), args.steps)
    return {name: statistics.median(step[name] for step in steps) for name in METRICS}


def bench(args, data: Path, scratch: Path) -> dict:
    models = {}
    for model in args.models:
        runs = {"on": [], "off": []}
        for repeat in range(args.repeats):
            for case, prefetch_steps in (("on", 1), ("off", 0)):
                run_dir = scratch / f"{model}-{case}-{repeat}"
                runs[case].append(run_once(args, data, run_dir, model, prefetch_steps))
        result = {"overrides": MODELS[model]}
        for case, case_runs in runs.items():
            medians = {name: statistics.median(run[name] for run in case_runs) for name in METRICS}
            result[case] = {**medians, "runs": case_runs}
        result["step_time_ratio"] = result["on"]["step_seconds"] / result["off"]["step_seconds"]
        models[model] = result
        if not args.json:
            for line in model_lines(model, result):
                print(line, flush=True)
    return models


def check_targets(models: dict) -> list[dict]:
    targets = []
    for model, metric, sense, bound in TARGETS:
        if model in models:
            result = models[model]
            value = result[metric] if metric == "step_time_ratio" else result["on"][metric]
            met = value <= bound if sense == "<=" else value >= bound
            target = {"model": model, "metric": metric, "value": value, "sense": sense}
            targets.append({**target, "bound": bound, "met": met})
    return targets


def show(metric: str, value: float) -> str:
    if metric.endswith("_fraction"):
        return f"{value:.1%}"
    if metric == "step_seconds":
        return f"{1e3 * value:.0f} ms"
    return f"{value:.2f}"


def model_lines(model: str, result: dict) -> list[str]:
    lines = []
    for case in ("on", "off"):
        run = result[case]
        step_ms = sorted(1e3 * one["step_seconds"] for one in run["runs"])
        lines.append(
            f"{model:5} prefetch {case:3}: step {1e3 * run['step_seconds']:7.1f} ms  data wait "
            f"{run['data_wait_fraction']:6.1%}  host {run['host_fraction']:6.1%}  (runs' step "
            f"{step_ms[0]:.1f}-{step_ms[-1]:.1f} ms)"
        )
    lines.append(f"{model:5} step time on / off: {result['step_time_ratio']:.2f}")
    return lines


def target_line(target: dict) -> str:
    metric = target["metric"]
    return (
        f"target {target['model']:5} {metric} {show(metric, target['value'])} {target['sense']} "
        f"{show(metric, target['bound'])}: {'met' if target['met'] else 'NOT MET'}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainer.data.demo import write_demo

    load_average = os.getloadavg()[0]  # the last minute's, before this benchmark: other jobs
    with tempfile.TemporaryDirectory(prefix="bench_step_") as temp:
        data = Path(temp) / "data"
        # One epoch holds every run's samples (the largest batch is 32).
        num_train = max(6000, 32 * (args.warmup + args.steps))
        write_demo(data, sizes={"train": num_train, "heldout": 64})
        models = bench(args, data, Path(temp))
    targets = check_targets(models)
    if args.json:
        settings = {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "num_workers")}
        settings.update(cpus=os.cpu_count(), load_average=load_average)
        print(json.dumps({**settings, "models": models, "targets": targets}, indent=1))
    else:
        print(
            f"{args.repeats} runs per case, {args.steps} steps each after {args.warmup} warm-up; "
            f"load average at the start {load_average:.1f} on {os.cpu_count()} CPUs (other jobs: "
            "on a busy machine the timings are noisy)"
        )
        print(f"targets (prefetching on, data.num_workers={args.num_workers}):")
        for target in targets:
            print(target_line(target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
