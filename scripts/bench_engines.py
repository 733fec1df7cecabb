"""Per-rank parameter + optimizer memory and step time of the engines, against `local`.

Each engine trains the same config for a few steps on the demo task: `local` in one process,
`fsdp` and `deepspeed` (ZeRO-3) on --world-size ranks of a gloo group on this machine. Memory is
what a rank holds (its shards for the sharded engines, everything for local); step time is the
median of the timed steps of `TrainLoop.train_step` (data, forward/backward, update). Every
process, local included, runs one thread: one core stands for one device. Ratios are against
`local` measured in the same run.

    python scripts/bench_engines.py                 # table
    python scripts/bench_engines.py --json          # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_config(args, data: Path, run_dir: Path, engine: str, extra: list[str]):
    from trainer.config import load_config

    return load_config(
        REPO / "yaml/tiny.yaml",
        [
            f"data.path={data}",
            f"run.dir={run_dir}",
            f"engine.name={engine}",
            f"data.global_batch_size={args.global_batch_size}",
            f"data.max_tokens={args.max_tokens}",
            f"model.d_model={args.d_model}",
            f"model.num_heads={args.num_heads}",
            f"model.num_kv_heads={args.num_heads // 2}",
            f"model.num_core_blocks={args.core_blocks}",
            f"run.steps={args.warmup + args.steps}",
            "optim.warmup_steps=1",
            *extra,
        ],
    )


def measure(rank: int, world_size: int, init_file: str, cfg_args: tuple, out: str) -> None:
    from trainer.distributed import WorldInfo, world_info
    from trainer.loop import TrainLoop

    args, data, run_dir, engine, extra, label = cfg_args
    torch.set_num_threads(1)
    WorldInfo(rank, world_size, local_rank=rank, local_world_size=world_size).export_env()
    if world_size > 1 or engine != "local":
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
    loop = TrainLoop(bench_config(args, data, Path(run_dir), engine, extra), world_info())
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        metrics = loop.train_step()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    state = loop.engine.state()
    gathered = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(gathered, state)
        dist.destroy_process_group()
    else:
        gathered = [state]
    if rank == 0:
        result = {
            "engine": label,
            "world_size": world_size,
            "num_params": state["num_params"],
            "param_bytes": max(s["param_bytes"] for s in gathered),
            "optimizer_bytes": max(s["optimizer_bytes"] for s in gathered),
            "step_seconds": statistics.median(times),
            "text_loss": metrics["text_loss"],
        }
        Path(out).write_text(json.dumps(result))


def run(args, data: Path, tmp: Path, label: str, world_size: int) -> dict:
    engine, _, stage = label.partition(" ZeRO-")
    extra = [f"engine.zero_stage={stage}"] if stage else []
    out = tmp / f"{uuid.uuid4().hex}.json"
    cfg_args = (args, data, str(tmp / uuid.uuid4().hex), engine, extra, label)
    mp.start_processes(
        measure,
        args=(world_size, str(tmp / uuid.uuid4().hex), cfg_args, str(out)),
        nprocs=world_size,
        start_method="spawn",
    )
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--core-blocks", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from trainer.data.demo import write_demo

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "demo"
        write_demo(data, sizes={"train": 40 * args.global_batch_size, "heldout": 16})
        results = [run(args, data, tmp, "local", 1)]
        for label in ("fsdp", "deepspeed ZeRO-3", "deepspeed ZeRO-2", "deepspeed ZeRO-1"):
            results.append(run(args, data, tmp, label, args.world_size))
    load = {"before": load_before, "after": os.getloadavg()[0]}
    local = results[0]
    local_memory = local["param_bytes"] + local["optimizer_bytes"]
    for result in results:
        result["memory_ratio"] = (result["param_bytes"] + result["optimizer_bytes"]) / local_memory
        result["step_time_ratio"] = result["step_seconds"] / local["step_seconds"]
    if args.json:
        print(json.dumps({"config": vars(args), "load_average": load, "results": results}))
        return 0
    print(
        f"{local['num_params'] / 1e6:.2f}M parameters, global batch {args.global_batch_size}, "
        f"{args.steps} timed steps after {args.warmup}, fp32 on CPU, 1 thread per process; "
        f"load average {load['before']:.1f} before, {load['after']:.1f} after"
    )
    header = (
        "| engine | ranks | params MiB/rank | optimizer MiB/rank | memory vs local "
        "| step s | step time vs local |"
    )
    print(header)
    print("|" + "---|" * 7)
    mib = 2**20
    for r in results:
        print(
            f"| {r['engine']} | {r['world_size']} | {r['param_bytes'] / mib:.1f} "
            f"| {r['optimizer_bytes'] / mib:.1f} | {r['memory_ratio']:.2f} "
            f"| {r['step_seconds']:.3f} | {r['step_time_ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
