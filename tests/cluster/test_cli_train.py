"""The README's main command, end to end: CLI → embedded Ray cluster → Train worker → model;
and SIGTERM to it: a checkpoint at the step it stopped, no Ray process left behind."""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (
    cli_env,
    end_session,
    free_port,
    is_loopback,
    listening_addresses,
    pids_in_session,
)

from trainer.checkpoint import find_latest_checkpoint

REPO = Path(__file__).resolve().parents[2]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_train_command_runs_on_an_embedded_ray_cluster(tmp_path):
    data = tmp_path / "demo"  # absent: the tiny preset writes the demo shards itself
    run_dir = tmp_path / "run"
    # What a `ray start` head killed with -9 leaves behind: Ray's record of the last cluster
    # started, naming a head that is gone, and a shell that still points at it. The default
    # (no cluster.address) starts a cluster of its own all the same.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))  # short: Ray's unix sockets
    dead_head = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead_head)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "train",
            "yaml/tiny.yaml",
            "--set",
            f"data.path={data}",
            "--set",
            f"run.dir={run_dir}",
            "--set",
            "run.steps=40",
            "--set",
            "run.log_every=20",
        ],
        cwd=REPO,
        env=cli_env(RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS=dead_head),
        capture_output=True,
        text=True,
        timeout=600,
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (data / "train" / "index.json").is_file() and (data / "tokenizer").is_dir()
    # The step lines come from the Ray Train worker process, once each.
    assert "RayTrainWorker" in result.stdout
    assert result.stdout.count("step     40/40") == 1
    summary_line = [line for line in result.stdout.splitlines() if line.startswith("summary: ")]
    summary = json.loads(summary_line[-1].removeprefix("summary: "))
    assert summary["step"] == 40
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 40
    assert metrics[-1]["text_loss"] < 0.8 * metrics[0]["text_loss"]
    assert metrics[-1]["image_loss"] < 0.8 * metrics[0]["image_loss"]
    assert (run_dir / "checkpoints" / "step_0000040" / "trainer_state.json").is_file()
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.ray
def test_sigterm_stops_at_a_checkpoint_and_leaves_no_ray_process(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    sets = [
        f"data.path={demo_data}",
        f"run.dir={run_dir}",
        "run.steps=100000",
        "run.log_every=1",
        "checkpoint.every=0",  # the only checkpoint is the one written on stop
        "data.batch_size=8",
        "logging.wandb.mode=disabled",
        "logging.plot=false",
    ]
    # A session of its own: the embedded cluster's processes are found by its id.
    driver = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "train", "yaml/tiny.yaml"]
        + [arg for item in sets for arg in ("--set", item)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
            time.sleep(0.5)
        # The embedded cluster, fully up: nothing of it listens beyond loopback.
        addresses = listening_addresses(pids_in_session(driver.pid))
        assert addresses and [a for a in addresses if not is_loopback(a)] == []
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            end_session(driver.pid)
    assert driver.returncode == 128 + signal.SIGTERM, output[-3000:]
    summary = json.loads(output.split("summary: ")[-1].splitlines()[0])
    step = summary["step"]
    assert summary["stopped"] and summary["signal"] == "SIGTERM" and step >= 3
    assert f"stopped by SIGTERM at step {step}" in output
    # The run ended at a complete checkpoint of its last step, the one a restart resumes from.
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, step + 1))
    assert find_latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step_{step:07d}"
    state = json.loads(
        (run_dir / "checkpoints" / f"step_{step:07d}" / "trainer_state.json").read_text()
    )
    assert state["step"] == step and state["samples_seen"] == 8 * step
    assert not (run_dir / "stop_request").exists()
    # ray.shutdown() ended every process the driver started.
    deadline = time.monotonic() + 30
    while pids_in_session(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pids_in_session(driver.pid) == []
    assert "Failed to query Ray Train Controller actor state" not in output
