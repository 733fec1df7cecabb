"""The README's main command, end to end: CLI → embedded Ray cluster → Train worker → model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_train_command_runs_on_an_embedded_ray_cluster(tmp_path):
    data = tmp_path / "demo"  # absent: the tiny preset writes the demo shards itself
    run_dir = tmp_path / "run"
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
        capture_output=True,
        text=True,
        timeout=600,
    )
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
