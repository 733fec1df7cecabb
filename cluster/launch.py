"""Run a training job on Ray: an embedded local cluster by default, or an existing one.

The driver resolves the config (absolute paths, demo data generated) and hands it to Ray Train's
data-parallel trainer (TorchTrainer's base class; the workers set torch.distributed up
themselves, so that nothing of it listens beyond the node's cluster address); every worker calls
`trainer.loop.train(cfg)` with its rank from Ray Train. A worker failure restarts the whole
worker group (`cluster.max_failures`), and the restarted workers resume from the run directory's
latest complete checkpoint, as any start does.

SIGINT/SIGTERM to the driver: the first asks the workers to stop after their current step
(`RUN/stop_request`; they save a checkpoint there with `checkpoint.on_stop`), a second one shuts
Ray down at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from trainer.callbacks import STOP_FILE
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

# Environment variables a worker on another node needs from the driver (the embedded cluster's
# workers inherit the driver's environment anyway). Secrets such as WANDB_API_KEY are left out on
# purpose: a runtime_env is stored in the cluster and shown by the dashboard.
PROPAGATED_ENV_PREFIXES = ("SPLITVLM_", "NCCL_", "TORCH_NCCL_", "GLOO_")
PROPAGATED_ENV_NAMES = ("MKL_DYNAMIC", "OMP_NUM_THREADS")
CODE_PACKAGES = ("models", "trainer", "cluster")
CODE_ROOT = Path(__file__).resolve().parents[1]


class ForcedStop(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: Ray was shut down without waiting for the workers."""

    def __init__(self, signal_name: str):
        super().__init__(
            f"{signal_name} again: Ray shut down without waiting for the workers "
            "(the last complete checkpoint stays usable)"
        )
        self.exit_code = 128 + signal.Signals[signal_name].value


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
    low, high = cfg.cluster.worker_range
    if high > 1 and cfg.engine.name == "local":
        raise ValueError("engine.name=local runs one worker; set cluster.num_workers=1")
    rank_batch_size(cfg.data, high)  # a global batch must divide over workers
    if low != high:
        check_elastic_batch(cfg)
    return cfg


def check_elastic_batch(cfg: Config) -> None:
    """An elastic run must keep its global batch whatever the worker count Ray Train picks: the
    data cursor counts global samples, and the optimizer's hyperparameters assume that batch."""
    low, high = cfg.cluster.worker_range
    global_batch = cfg.data.global_batch_size  # per-rank batch: global // world size
    if not global_batch:
        raise ValueError(
            f"cluster.num_workers={[low, high]} (elastic) needs a fixed global batch: "
            "set data.global_batch_size"
        )
    uneven = [n for n in range(low, high + 1) if global_batch % n]
    if uneven:
        raise ValueError(
            f"data.global_batch_size={global_batch} does not divide evenly over "
            f"{', '.join(map(str, uneven))} workers (cluster.num_workers={[low, high]})"
        )


def world_from_context():
    """This worker's place in the job, from Ray Train's context."""
    import ray.train

    from trainer.distributed import WorldInfo

    context = ray.train.get_context()
    return WorldInfo(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        local_world_size=context.get_local_world_size(),
        node_rank=context.get_node_rank(),
        node_address=ray.util.get_node_ip_address(),
    )


def init_process_group(world, backend: str, timeout_s: float = 1800.0) -> None:
    """torch.distributed over a TCPStore that listens on rank 0's node address only.

    Ray Train's TorchTrainer leaves the store to `init_process_group("env://")`, whose server
    binds every interface; here rank 0 binds the socket itself (127.0.0.1 in the embedded
    cluster, the node's cluster address otherwise) and hands it to the store.
    """
    import ipaddress
    import socket
    from datetime import timedelta

    import ray
    import torch
    import torch.distributed as dist
    from ray.train.collective import broadcast_from_rank_zero

    host = ray.util.get_node_ip_address()
    if ipaddress.ip_address(host).is_loopback:
        # A local-only cluster (the embedded one): gloo's and NCCL's own sockets between ranks
        # listen on the loopback interface too, not on the address the hostname resolves to.
        loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(name, loopback)
    listen_fd = None
    address = None
    if world.rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, 0), family=family)
        address = (host, listener.getsockname()[1])
        listen_fd = listener.detach()  # the store owns the socket from here on
    host, port = broadcast_from_rank_zero(address)
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        host,
        port,
        world.world_size,
        is_master=world.rank == 0,
        timeout=timeout,
        master_listen_fd=listen_fd,
    )
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
        # A timed-out collective raises instead of hanging (Ray's TorchTrainer default too).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(
        backend, store=store, rank=world.rank, world_size=world.world_size, timeout=timeout
    )


def _train_worker(loop_config: dict) -> None:
    import torch.distributed as dist

    from trainer.loop import train

    world = world_from_context()
    # Before anything reads them (mosaicml-streaming partitions samples by these variables).
    world.export_env()
    init_process_group(world, loop_config["backend"])
    try:
        train(config_from_dict(loop_config["config"]), world)
    finally:
        dist.destroy_process_group()


def _embedded_worker_setup() -> None:
    """Runs first in every worker process of the embedded cluster."""
    import logging

    import ray

    # Ray Train's PlacementGroupCleaner finds "the" cluster by auto-detection, which fails when
    # the machine runs other Ray instances ("Found multiple active Ray instances"): point it here.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    # It polls the controller through the State API, which lives in the dashboard: without one it
    # warns "Failed to query Ray Train Controller actor state" every second. The embedded cluster
    # removes its placement groups at ray.shutdown() anyway.
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


def worker_env_vars() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name.startswith(PROPAGATED_ENV_PREFIXES) or name in PROPAGATED_ENV_NAMES
    }


def _init_ray(cfg: Config) -> None:
    import ray

    cluster = cfg.cluster
    if cluster.address:
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            # A driver started by the Jobs API (`splitvlm submit`): the job's runtime_env already
            # carries the code and variables to every worker; a second one would conflict.
            ray.init(address=cluster.address, log_to_driver=True)
        else:
            # Our code travels with the job, so every node runs the driver's version of it.
            ray.init(
                address=cluster.address,
                log_to_driver=True,
                runtime_env={
                    "py_modules": [str(CODE_ROOT / name) for name in CODE_PACKAGES],
                    "env_vars": worker_env_vars(),
                },
            )
        return
    _, high = cluster.worker_range
    ray.init(
        # "local": always a new cluster of our own. Without it ray.init joins whatever RAY_ADDRESS
        # or Ray's address file of the last `ray start` names (left behind when that head was
        # killed), and then refuses num_cpus ("When connecting to an existing cluster ...").
        address="local",
        num_cpus=cluster.num_cpus or max(os.cpu_count() or 1, high * cluster.cpus_per_worker + 1),
        num_gpus=cluster.num_gpus,
        include_dashboard=cluster.dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": _embedded_worker_setup},
    )


def use_gpu(cfg: Config) -> bool:
    """`cluster.use_gpu`, with `auto` decided by the GPUs the (connected) cluster has."""
    import ray

    if isinstance(cfg.cluster.use_gpu, bool):
        return cfg.cluster.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def build_trainer(cfg: Config):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from cluster.backend import ProcessGroupConfig

    cluster = cfg.cluster
    gpu = use_gpu(cfg)
    resources = {"CPU": cluster.cpus_per_worker}
    if gpu:
        resources["GPU"] = cluster.gpus_per_worker
    low, high = cluster.worker_range
    # The base class of Ray Train's TorchTrainer, with the process group made in the worker.
    return DataParallelTrainer(
        _train_worker,
        train_loop_config={"config": config_to_dict(cfg), "backend": "nccl" if gpu else "gloo"},
        backend_config=ProcessGroupConfig(),
        scaling_config=ScalingConfig(
            num_workers=low if low == high else (low, high),
            use_gpu=gpu,
            resources_per_worker=resources,
            placement_strategy=cluster.placement_strategy,
            elastic_resize_monitor_interval_s=cluster.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(Path(cfg.run.dir) / "ray"),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
        ),
    )


class _SignalStop:
    """SIGINT/SIGTERM while the job runs: the first writes the stop request the workers poll,
    a second raises ForcedStop in the main thread."""

    def __init__(self, stop_file: Path, save_on_stop: bool):
        self.stop_file = stop_file
        self.save_on_stop = save_on_stop
        self.received: list[str] = []
        self.previous: dict = {}

    def install(self) -> None:
        # Only the main thread can set handlers (a notebook cell or a test thread running
        # run_job: Ray Train's own SIGINT handling applies). Called again after ray.init(),
        # whose core worker replaces the SIGTERM handler with one that prints a stack and exits.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self.handle)
            self.previous.setdefault(signum, previous)

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1:
            # A third signal must not interrupt the ray.shutdown() this one leads to.
            for other in (signal.SIGINT, signal.SIGTERM):
                signal.signal(other, signal.SIG_IGN)
            raise ForcedStop(name)
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.write_text(name + "\n")
        then = " and saving a checkpoint" if self.save_on_stop else ""
        print(
            f"{name}: stopping after the current step{then}; send it again to stop at once",
            file=sys.stderr,
            flush=True,
        )


def _fit_in_thread(trainer) -> None:
    """trainer.fit() off the main thread: Ray Train installs its own SIGINT handler (which aborts
    the workers mid-step) only when fit() runs on the main thread."""
    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the calling thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # wakes up for signal handlers
    if "error" in outcome:
        raise outcome["error"]


def run_job(cfg: Config) -> dict:
    """Train `cfg` on Ray and return the run summary written by rank 0 (with `signal` set when a
    SIGINT/SIGTERM stopped it)."""
    if not cfg.cluster.address:
        # Ray's local-only mode: every server of the embedded cluster (GCS, raylet, workers,
        # dashboard) binds to 127.0.0.1 instead of all interfaces. Read when ray is imported, and
        # inherited by the processes ray.init starts.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    run_dir = Path(cfg.run.dir)
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    with _SignalStop(stop_file, cfg.checkpoint.on_stop) as signals:
        started_here = not ray.is_initialized()
        try:
            if started_here:
                _init_ray(cfg)
                signals.install()
            _fit_in_thread(build_trainer(cfg))
        finally:
            stop_file.unlink(missing_ok=True)
            if started_here:
                ray.shutdown()
    summary = json.loads((run_dir / "summary.json").read_text())
    if signals.received:
        summary["signal"] = signals.received[0]
    return summary
