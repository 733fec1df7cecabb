"""The loop's side of cluster jobs, in one process: a stop request ends the run at a checkpoint,
a restart counts the steps it replays, and RUN/samples.jsonl records what every step consumed."""

import json
import shutil
from pathlib import Path

import pytest

from cluster.launch import check_elastic_batch, prepare_config
from trainer.callbacks import STOP_FILE, Callback
from trainer.checkpoint import find_latest_checkpoint
from trainer.config import load_config
from trainer.loop import TrainLoop, train

REPO = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class RequestStopAt(Callback):
    """What the driver does on SIGTERM, at a chosen step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop, metrics: dict) -> None:
        if loop.step == self.step:
            (loop.run_dir / STOP_FILE).write_text("SIGTERM\n")


@pytest.mark.parametrize("on_stop", [True, False])
def test_a_stop_request_ends_the_run_after_the_current_step(tiny_overrides, on_stop):
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [*tiny_overrides, "run.steps=20", "checkpoint.every=2", f"checkpoint.on_stop={on_stop}"],
    )
    loop = TrainLoop(cfg)
    loop.callbacks.insert(0, RequestStopAt(5))
    summary = loop.run()
    run_dir = Path(cfg.run.dir)
    assert summary["step"] == 5 and summary["stopped"]
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    latest = find_latest_checkpoint(run_dir)
    assert latest.name == ("step_0000005" if on_stop else "step_0000004")

    # Started again while the request stands (the driver removes it when it starts a run):
    # no step is taken and the checkpoint it resumed from is not written again.
    mtime = (latest / "trainer_state.json").stat().st_mtime_ns
    summary = train(cfg)
    assert summary["stopped"] and summary["step"] == int(latest.name[5:])
    assert (latest / "trainer_state.json").stat().st_mtime_ns == mtime


def test_a_stop_while_steps_are_prefetched_resumes_at_the_next_sample(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "run.steps=8", "run.log_sample_ids=true", "data.prefetch_steps=2"]
    common.append("data.num_workers=1")  # prefetching needs loader workers
    straight = load_config(REPO / "yaml/tiny.yaml", [*common, f"run.dir={tmp_path / 'straight'}"])
    train(straight)
    stopped = load_config(REPO / "yaml/tiny.yaml", [*common, f"run.dir={tmp_path / 'stopped'}"])
    loop = TrainLoop(stopped)
    loop.callbacks.insert(0, RequestStopAt(3))  # steps 4 and 5 are prepared by then
    assert loop.run()["step"] == 3
    state = json.loads(
        (tmp_path / "stopped/checkpoints/step_0000003/trainer_state.json").read_text()
    )
    assert state["data"] == {"epoch": 0, "sample_in_epoch": 3 * 8}  # no prefetched step counted
    (tmp_path / "stopped" / STOP_FILE).unlink()
    assert train(stopped)["step"] == 8

    consumed = read_jsonl(tmp_path / "stopped/samples.jsonl")
    assert consumed == read_jsonl(tmp_path / "straight/samples.jsonl")  # steps 1-8, once each
    for got, want in zip(
        read_jsonl(tmp_path / "stopped/metrics.jsonl"),
        read_jsonl(tmp_path / "straight/metrics.jsonl"),
        strict=True,
    ):
        assert (got["step"], got["text_loss"], got["image_loss"]) == (
            want["step"],
            want["text_loss"],
            want["image_loss"],
        )


def test_a_restart_replays_the_steps_after_the_checkpoint_and_counts_them(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "checkpoint.every=4", "checkpoint.keep_last=0"]
    common.append("run.log_sample_ids=true")
    straight = load_config(REPO / "yaml/tiny.yaml", [*common, "run.steps=8"])
    straight.run.dir = str(tmp_path / "straight")
    train(straight)
    # "Killed" after step 6: its checkpoint at the end of the run never happened.
    crashed = load_config(REPO / "yaml/tiny.yaml", [*common, "run.steps=6"])
    crashed.run.dir = str(tmp_path / "crashed")
    train(crashed)
    root = Path(crashed.run.dir) / "checkpoints"
    shutil.rmtree(root / "step_0000006")
    (root / "latest").write_text("step_0000004")
    crashed.run.steps = 8
    summary = train(crashed)

    assert summary["step"] == 8 and summary["replayed_steps"] == 2
    run_dir = Path(crashed.run.dir)
    assert read_jsonl(run_dir / "resumes.jsonl") == [
        {"resumed_from_step": 4, "last_logged_step": 6, "replayed_steps": 2, "world_size": 1}
    ]
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 9))
    expected = {r["step"]: r["sample_ids"] for r in read_jsonl(tmp_path / "straight/samples.jsonl")}
    consumed = read_jsonl(run_dir / "samples.jsonl")
    assert [r["step"] for r in consumed] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert all(r["sample_ids"] == expected[r["step"]] for r in consumed)
    assert len(expected[1]) == 8 and len({i for ids in expected.values() for i in ids}) == 64


def test_cluster_num_workers_is_an_int_or_a_min_max_range(tiny_overrides):
    cfg = load_config(REPO / "yaml/tiny.yaml", [*tiny_overrides, "cluster.num_workers=[1, 4]"])
    assert cfg.cluster.worker_range == (1, 4)
    assert load_config(None, ["cluster.num_workers=3"]).cluster.worker_range == (3, 3)
    for bad in ("[2, 1]", "[0, 2]", "[1, 2, 3]", "0"):
        with pytest.raises(ValueError, match="cluster.num_workers"):
            load_config(None, [f"cluster.num_workers={bad}"])
    with pytest.raises(ValueError, match="cluster.use_gpu"):
        load_config(None, ["cluster.use_gpu=maybe"])
    assert load_config(None, ["cluster.use_gpu=true"]).cluster.use_gpu is True
    # The local engine runs one worker, elastic or not.
    with pytest.raises(ValueError, match="engine.name=local runs one worker"):
        prepare_config(cfg)


def test_an_elastic_range_needs_a_global_batch_every_worker_count_divides(tiny_overrides):
    cfg = load_config(REPO / "yaml/tiny.yaml", [*tiny_overrides, "cluster.num_workers=[2, 4]"])
    with pytest.raises(ValueError, match="needs a fixed global batch"):
        check_elastic_batch(cfg)
    cfg.data.global_batch_size = 30
    with pytest.raises(ValueError, match="does not divide evenly over 4 workers"):
        check_elastic_batch(cfg)
    cfg.data.global_batch_size = 48
    check_elastic_batch(cfg)
