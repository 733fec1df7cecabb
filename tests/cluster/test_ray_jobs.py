"""Jobs on a running Ray cluster: `splitvlm submit/status/logs`, a driver that joins the cluster,
and recovery from a worker killed mid-run (Ray Train restarts the group; the run resumes from
its latest checkpoint and replays exactly the steps after it)."""

import json
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run_cli

# 10 steps, a checkpoint every 4: a worker killed after step 6 loses steps 5 and 6.
STEPS, EVERY, KILL_AT = 10, 4, 6


def overrides(demo_data: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [
        f"data.path={demo_data}",
        f"run.dir={run_dir}",
        f"run.steps={STEPS}",
        f"checkpoint.every={EVERY}",
        "run.log_sample_ids=true",
        "run.log_every=1",
        "data.batch_size=8",
        "logging.wandb.mode=disabled",
        "logging.plot=false",
        *extra,
    ]
    return [arg for item in sets for arg in ("--set", item)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def submitted_run(ray_head, demo_data, tmp_path_factory):
    """An uninterrupted run, submitted through the Jobs API and followed to its end."""
    run_dir = tmp_path_factory.mktemp("submitted") / "run"
    env = ray_head.env
    submit = run_cli(
        "submit",
        "yaml/tiny.yaml",
        "--address",
        ray_head.jobs_address,
        *overrides(demo_data, run_dir),
        env=env,
        timeout=300,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = submit.stdout.strip().splitlines()[-1]
    follow = run_cli("logs", job_id, "--follow", "--address", ray_head.jobs_address, env=env)
    assert follow.returncode == 0, follow.stderr
    return SimpleNamespace(job_id=job_id, run_dir=run_dir, logs=follow.stdout)


@pytest.mark.ray
def test_a_submitted_job_trains_and_status_and_logs_report_it(submitted_run, ray_head):
    env, address = ray_head.env, ray_head.jobs_address
    assert submitted_run.job_id.startswith("raysubmit_")
    status = run_cli("status", submitted_run.job_id, "--address", address, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    every_job = run_cli("status", "--address", address, env=env)
    assert submitted_run.job_id in every_job.stdout
    # The job's driver is `splitvlm train`: its summary line ends the logs.
    summary_line = [
        line for line in submitted_run.logs.splitlines() if line.startswith("summary: ")
    ]
    summary = json.loads(summary_line[-1].removeprefix("summary: "))
    assert summary["step"] == STEPS and summary["replayed_steps"] == 0
    run_dir = submitted_run.run_dir
    assert (run_dir / "checkpoints" / f"step_{STEPS:07d}" / "trainer_state.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:07d}"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    logs = run_cli("logs", submitted_run.job_id, "--address", address, env=env)
    assert summary_line[-1] in logs.stdout
    # The Jobs API wants the cluster's token; without one: a usage error that says so.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    refused = run_cli("status", "--address", address, env=no_token)
    assert refused.returncode == 2 and "wants a Ray auth token" in refused.stderr


@pytest.mark.ray
def test_a_killed_worker_is_restarted_and_replays_exactly_the_steps_after_the_checkpoint(
    submitted_run, ray_head, demo_data, tmp_path
):
    run_dir = tmp_path / "run"
    # A driver joining the running cluster; rank 0 SIGKILLs itself right after step KILL_AT.
    result = run_cli(
        "train",
        "yaml/tiny.yaml",
        *overrides(
            demo_data,
            run_dir,
            f"cluster.address={ray_head.gcs_address}",
            "cluster.max_failures=1",
        ),
        env={**ray_head.env, "SPLITVLM_FAULT_AT_STEP": str(KILL_AT)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run_dir / f"fault_injected_step_{KILL_AT}_rank_0").is_file()
    summary = json.loads(result.stdout.split("summary: ")[-1].splitlines()[0])
    assert summary["step"] == STEPS
    replayed = list(range(EVERY + 1, KILL_AT + 1))  # steps 5 and 6
    assert summary["replayed_steps"] == len(replayed)
    assert read_jsonl(run_dir / "resumes.jsonl") == [
        {
            "resumed_from_step": EVERY,
            "last_logged_step": KILL_AT,
            "replayed_steps": len(replayed),
            "world_size": 1,
        }
    ]
    assert f"replaying steps {EVERY + 1}-{KILL_AT}" in result.stdout + result.stderr

    # Every sample consumed, in order, replays included: each step consumed the same samples as
    # in the uninterrupted run, and only the replayed steps were consumed twice.
    expected = {
        r["step"]: r["sample_ids"] for r in read_jsonl(submitted_run.run_dir / "samples.jsonl")
    }
    consumed = read_jsonl(run_dir / "samples.jsonl")
    assert [r["step"] for r in consumed] == [
        *range(1, KILL_AT + 1),
        *replayed,
        *range(KILL_AT + 1, STEPS + 1),
    ]
    for record in consumed:
        assert record["sample_ids"] == expected[record["step"]], record["step"]
    seen = defaultdict(int)
    for record in consumed:
        seen[record["step"]] += 1
    assert sorted(step for step, count in seen.items() if count > 1) == replayed

    # Same training: every step's losses, and so the final loss, bitwise as uninterrupted.
    want = read_jsonl(submitted_run.run_dir / "metrics.jsonl")
    got = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # each step once
    for w, g in zip(want, got, strict=True):
        assert (g["text_loss"], g["image_loss"]) == (w["text_loss"], w["image_loss"]), g["step"]
    assert summary["text_loss"] == want[-1]["text_loss"]


@pytest.mark.ray
def test_stop_ends_a_submitted_job_at_a_checkpoint_of_its_last_step(ray_head, demo_data, tmp_path):
    env, address = ray_head.env, ray_head.jobs_address
    run_dir = tmp_path / "run"
    submit = run_cli(
        "submit",
        "yaml/tiny.yaml",
        "--address",
        address,
        *overrides(demo_data, run_dir, "run.steps=100000", "checkpoint.every=0"),
        env=env,
        timeout=300,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().splitlines()[-1]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    # Ray sends the job's driver SIGTERM; it lets the workers finish their step and save.
    stop = run_cli("stop", job_id, "--address", address, env=env)
    assert stop.returncode == 0 and stop.stdout.strip() == "STOPPED", stop.stdout + stop.stderr
    step = read_jsonl(metrics)[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:07d}"
    state = json.loads(
        (run_dir / "checkpoints" / f"step_{step:07d}" / "trainer_state.json").read_text()
    )
    assert state["step"] == step
    logs = run_cli("logs", job_id, "--address", address, env=env).stdout
    assert f"stopped by SIGTERM at step {step}" in logs
