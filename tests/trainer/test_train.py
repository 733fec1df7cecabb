import json
import math
from pathlib import Path

import yaml
from trainer.config import load_config
from trainer.loop import train

REPO = Path(__file__).resolve().parents[2]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(values):
    return sum(values) / len(values)


def test_short_run_learns_and_leaves_a_complete_run_dir(tiny_overrides, tmp_path):
    cfg = load_config(
        REPO / "yaml/tiny.yaml", [*tiny_overrides, "run.steps=60", "checkpoint.every=30"]
    )
    summary = train(cfg)
    run_dir = Path(cfg.run.dir)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 61))
    for key in ("text_loss", "image_loss", "grad_norm"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    # Both losses clearly fall: the last ten steps average well below the first ten.
    for key in ("text_loss", "image_loss"):
        first, last = mean([m[key] for m in metrics[:10]]), mean([m[key] for m in metrics[-10:]])
        assert last < 0.75 * first, (key, first, last)
    assert all(m["tokens_per_s"] > 0 for m in metrics)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["run"]["steps"] == 60 and resolved["model"]["vocab_size"] > 0
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_0000030", "step_0000060"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000060"
    assert summary["step"] == 60 and summary["samples_seen"] == 60 * 8
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_resumed_run_repeats_the_uninterrupted_losses_exactly(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "checkpoint.every=8"]
    straight = load_config(
        REPO / "yaml/tiny.yaml", [*common, "run.steps=16", f"run.dir={tmp_path / 'a'}"]
    )
    train(straight)
    # Stop after step 8, then start the same run again with the full budget: it resumes.
    first = load_config(
        REPO / "yaml/tiny.yaml", [*common, "run.steps=8", f"run.dir={tmp_path / 'b'}"]
    )
    train(first)
    second = load_config(
        REPO / "yaml/tiny.yaml", [*common, "run.steps=16", f"run.dir={tmp_path / 'b'}"]
    )
    train(second)
    expected = read_metrics(tmp_path / "a")
    resumed = read_metrics(tmp_path / "b")
    assert [m["step"] for m in resumed] == list(range(1, 17))
    for want, got in zip(expected[8:], resumed[8:], strict=True):
        assert (got["text_loss"], got["image_loss"]) == (want["text_loss"], want["image_loss"])


def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(
    tiny_overrides, tmp_path, capsys
):
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [*tiny_overrides, "run.steps=8", "checkpoint.every=4", "checkpoint.keep_last=0"],
    )
    train(cfg)
    root = Path(cfg.run.dir) / "checkpoints"
    (root / "step_0000008" / "trainer_state.json").write_text("{not json")
    cfg.run.steps = 9
    summary = train(cfg)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_0000008" in err and "corrupt" in err
    assert "resumed from" in err and "step_0000004" in err
    assert summary["step"] == 9
