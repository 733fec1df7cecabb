"""Run a training job on Ray: an embedded local cluster by default, or an existing one.

The driver resolves the config (absolute paths, demo data generated) and hands it to Ray Train's
`TorchTrainer`; every worker calls `trainer.loop.train(cfg)` with its rank from Ray Train.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.config import Config, config_from_dict, config_to_dict

# Ray Train v2 re-logs every print() of a worker, so each console line would appear twice; the
# preemption watcher only matters on spot instances. Both propagate from driver to workers.
for _name, _value in (
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
    ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
    # A fixed thread count in MKL: results must not depend on machine load (exact resume).
    ("MKL_DYNAMIC", "FALSE"),
):
    os.environ.setdefault(_name, _value)


def prepare_config(cfg: Config) -> Config:
    """Driver-side checks and path resolution; raises ValueError for user errors."""
    from trainer.data.demo import write_demo
    from trainer.data.stream import check_streams, rank_batch_size

    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    cfg.data.path = str(Path(cfg.data.path).resolve())
    for stream in cfg.data.streams:
        stream.path = str(Path(stream.path).resolve()) if stream.path else ""
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).resolve())
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())
    if cfg.data.generate_demo and not Path(cfg.data.path).exists():
        print(f"writing demo shards to {cfg.data.path}", flush=True)
        write_demo(Path(cfg.data.path))
    check_streams(cfg.data)
    if cfg.cluster.num_workers > 1 and cfg.engine.name == "local":
        raise ValueError("engine.name=local runs one worker; set cluster.num_workers=1")
    rank_batch_size(cfg.data, cfg.cluster.num_workers)  # a global batch must divide over workers
    return cfg


def _train_worker(loop_config: dict) -> None:
    import ray.train

    from trainer.distributed import WorldInfo
    from trainer.loop import train

    context = ray.train.get_context()
    world = WorldInfo(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        local_world_size=context.get_local_world_size(),
        node_rank=context.get_node_rank(),
    )
    train(config_from_dict(loop_config["config"]), world)


def run_job(cfg: Config) -> dict:
    """Train `cfg` on Ray and return the run summary written by rank 0."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_here = False
    if not ray.is_initialized():
        if cfg.cluster.address:
            ray.init(address=cfg.cluster.address, log_to_driver=True)
        else:
            # Embedded cluster: nothing listens beyond loopback.
            ray.init(
                num_cpus=max(
                    os.cpu_count() or 1, cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1
                ),
                include_dashboard=False,
                dashboard_host="127.0.0.1",
                log_to_driver=True,
            )
        started_here = True
    try:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"config": config_to_dict(cfg)},
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.cluster.num_workers,
                use_gpu=cfg.cluster.use_gpu,
                resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=str(Path(cfg.run.dir) / "ray"),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    return json.loads((Path(cfg.run.dir) / "summary.json").read_text())
