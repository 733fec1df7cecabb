"""Elastic scaling through Ray Train: one run whose worker count changes 1 → 2 → 1 between its
restarts, against an uninterrupted 2-worker run of the same config.

Every phase asks Ray Train for `cluster.num_workers=[1, 2]` (its elastic ScalingConfig) on the
shared 2-CPU head; what changes is how much room a worker needs (`cluster.cpus_per_worker`: 2 CPUs
leave room for one worker, 1 CPU for two), so Ray Train itself picks the group size, as it does
when nodes come and go. The global batch stays 16 samples whatever the size; each phase resumes
from the previous one's last checkpoint, resharding the FSDP state through DCP.
"""

import json
import math

import pytest
from helpers import run_cli

GLOBAL_BATCH, EVERY = 16, 3
# (run.steps at the end of the phase, CPUs per worker): room for 1, then 2, then 1 worker
PHASES = ((3, 2), (6, 1), (9, 2))
STEPS = PHASES[-1][0]


def overrides(demo_data, run_dir, *extra: str) -> list[str]:
    sets = [
        f"data.path={demo_data}",
        f"run.dir={run_dir}",
        "engine.name=fsdp",
        f"data.global_batch_size={GLOBAL_BATCH}",
        f"checkpoint.every={EVERY}",
        "run.log_sample_ids=true",
        "run.log_every=1",
        "logging.wandb.mode=disabled",
        "logging.plot=false",
        *extra,
    ]
    return [arg for item in sets for arg in ("--set", item)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(ray_head, demo_data, run_dir, *extra: str) -> str:
    result = run_cli(
        "train",
        "yaml/tiny.yaml",
        *overrides(demo_data, run_dir, f"cluster.address={ray_head.gcs_address}", *extra),
        env=ray_head.env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.ray
def test_a_run_resized_1_to_2_to_1_workers_continues_at_the_next_sample_with_the_same_batch(
    ray_head, demo_data, tmp_path
):
    reference = tmp_path / "uninterrupted"
    train(ray_head, demo_data, reference, f"run.steps={STEPS}", "cluster.num_workers=2")

    elastic = tmp_path / "elastic"
    outputs = []
    for steps, cpus in PHASES:
        outputs.append(
            train(
                ray_head,
                demo_data,
                elastic,
                f"run.steps={steps}",
                "cluster.num_workers=[1, 2]",
                f"cluster.cpus_per_worker={cpus}",
            )
        )

    # Ray Train chose the sizes the cluster had room for; each restart says what it resumed.
    assert read_jsonl(elastic / "resumes.jsonl") == [
        {"resumed_from_step": 3, "last_logged_step": 3, "replayed_steps": 0, "world_size": 2},
        {"resumed_from_step": 6, "last_logged_step": 6, "replayed_steps": 0, "world_size": 1},
    ]
    assert "(saved by 1 workers, now 2)" in outputs[1]
    assert "(saved by 2 workers, now 1)" in outputs[2]

    # Exactly the next samples: every step took the same 16 samples as the uninterrupted run,
    # however many ranks shared them, and no sample was repeated or skipped.
    want = {r["step"]: sorted(r["sample_ids"]) for r in read_jsonl(reference / "samples.jsonl")}
    got = read_jsonl(elastic / "samples.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for record in got:
        assert len(record["sample_ids"]) == GLOBAL_BATCH
        assert sorted(record["sample_ids"]) == want[record["step"]], record["step"]

    # The same training: losses agree with the 2-worker run up to the order of the reductions.
    want_metrics = read_jsonl(reference / "metrics.jsonl")
    got_metrics = read_jsonl(elastic / "metrics.jsonl")
    assert [m["step"] for m in got_metrics] == list(range(1, STEPS + 1))
    for w, g in zip(want_metrics, got_metrics, strict=True):
        for key in ("text_loss", "image_loss"):
            assert math.isclose(g[key], w[key], rel_tol=1e-5), (g["step"], key, g[key], w[key])
