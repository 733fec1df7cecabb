"""The Ray Jobs API: submit a training job to a running cluster, then watch or stop it.

A submitted job runs `python -m cluster.cli train -` on the head node, inside the uploaded
working directory, with the resolved config in its runtime_env (`SPLITVLM_JOB_CONFIG`, read from
stdin): the same driver `splitvlm train` is, joined to the cluster (`cluster.address: auto`).
Paths in the config are not resolved here: relative ones resolve on the cluster, against the
job's working directory (a per-job copy of the upload), so a run meant to outlive the job needs
an absolute `run.dir` on storage every node sees.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import yaml
from cluster.launch import CODE_ROOT, worker_env_vars
from trainer.config import Config, config_to_dict

CONFIG_ENV = "SPLITVLM_JOB_CONFIG"
ENTRYPOINT = f'printf "%s" "${CONFIG_ENV}" | python -m cluster.cli train -'
# `splitvlm stop` (Ray: SIGTERM to the driver, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S): time for
# the workers to finish their step and write the stop checkpoint.
STOP_WAIT_SECONDS = "300"


def job_client(address: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # The variables `ray job` reads, in its order.
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        address = address or os.environ.get(name, "")
    if not address:
        raise ValueError("no cluster: give --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise ValueError(
            f"{address} wants a Ray auth token ({str(err).splitlines()[0]}): set RAY_AUTH_MODE=token "
            "and the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
        ) from None


def job_runtime_env(cfg: Config, working_dir: Path) -> dict:
    env_vars = {
        **worker_env_vars(),
        "RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", STOP_WAIT_SECONDS),
        CONFIG_ENV: yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
    }
    # The upload honours .gitignore (data/ and runs/ stay home).
    return {"working_dir": str(working_dir), "env_vars": env_vars}


def submit(cfg: Config, address: str | None, working_dir: Path | None = None) -> str:
    """Submit `cfg` as a Ray job; returns the job id."""
    working_dir = Path(working_dir or CODE_ROOT).resolve()
    if not (working_dir / "cluster" / "cli.py").is_file():
        raise ValueError(f"--working-dir {working_dir} does not hold splitvlm's code (cluster/)")
    client = job_client(address)
    cfg.cluster.address = "auto"  # the job's driver joins the cluster it runs on
    return client.submit_job(
        entrypoint=ENTRYPOINT,
        runtime_env=job_runtime_env(cfg, working_dir),
        metadata={"splitvlm_run": cfg.run.name},
    )


def status_lines(address: str | None, job_id: str | None) -> list[str]:
    """One line per job (all jobs without `job_id`): id, status, message."""
    client = job_client(address)
    jobs = [client.get_job_info(job_id)] if job_id else client.list_jobs()
    jobs.sort(key=lambda job: job.start_time or 0)
    return [
        f"{job.submission_id or job.job_id}  {job.status.value:<9}  {job.message or ''}".rstrip()
        for job in jobs
    ]


def print_logs(address: str | None, job_id: str, follow: bool) -> None:
    client = job_client(address)
    if not follow:
        print(client.get_job_logs(job_id), end="", flush=True)
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def stop(address: str | None, job_id: str, wait_seconds: float) -> str:
    """Ask the job to stop; with `wait_seconds` > 0, wait for it to end. Returns its status."""
    client = job_client(address)
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_seconds
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    return status.value
