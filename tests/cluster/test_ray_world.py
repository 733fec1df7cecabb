"""Two Ray Train workers on gloo, set up the way every job's workers are (cluster/launch.py):
the variables mosaicml-streaming reads come from Ray Train's context, and the process group
listens on loopback only in a local-only cluster."""

import json
import subprocess
import sys
import time

import pytest
from helpers import REPO, is_loopback, listening_addresses, pids_in_session

DRIVER = """
import json, os, sys, time
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from cluster.backend import ProcessGroupConfig


def report(config):
    import torch.distributed as dist
    from streaming.base.world import World

    from cluster.launch import init_process_group, world_from_context
    from trainer.distributed import all_gather_object

    world = world_from_context()
    world.export_env()
    init_process_group(world, "gloo")
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR")
    record = {name: os.environ[name] for name in names}
    record["streaming"] = World.detect().to_json()
    record["gathered"] = all_gather_object(world.rank)  # a gloo collective over both ranks
    out = Path(config["out"])
    (out / f"rank{world.rank}.json").write_text(json.dumps(record))
    while not (out / "seen").exists():  # the process group stays up while the test looks
        time.sleep(0.2)
    dist.destroy_process_group()


ray.init(address=sys.argv[1])
DataParallelTrainer(
    report,
    train_loop_config={"out": sys.argv[2]},
    backend_config=ProcessGroupConfig(),
    scaling_config=ScalingConfig(num_workers=2),
    run_config=RunConfig(storage_path=sys.argv[2] + "/ray"),
).fit()
"""


@pytest.mark.ray
def test_two_workers_get_streamings_variables_and_a_loopback_process_group(ray_head, tmp_path):
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, ray_head.gcs_address, str(tmp_path)],
        cwd=REPO,
        env=ray_head.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        reports = [tmp_path / "rank0.json", tmp_path / "rank1.json"]
        while not all(path.is_file() for path in reports):
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
            time.sleep(0.5)
        # Both ranks are in the process group now: its store and gloo's sockets included,
        # nothing the cluster runs listens beyond loopback.
        addresses = listening_addresses(pids_in_session(ray_head.session_id))
        assert addresses and [a for a in addresses if not is_loopback(a)] == []
        (tmp_path / "seen").write_text("")
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    for rank, path in enumerate(reports):
        record = json.loads(path.read_text())
        assert record["RANK"] == str(rank) and record["LOCAL_RANK"] == str(rank)
        assert record["WORLD_SIZE"] == "2" and record["LOCAL_WORLD_SIZE"] == "2"
        assert record["NODE_RANK"] == "0" and record["MASTER_ADDR"] == "127.0.0.1"
        streaming = record["streaming"]
        assert (streaming["num_nodes"], streaming["ranks_per_node"]) == (1, 2)
        assert (streaming["rank"], streaming["node"], streaming["rank_of_node"]) == (rank, 0, rank)
        assert record["gathered"] == [0, 1]
