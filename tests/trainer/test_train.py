import json
import math
from pathlib import Path

import pytest

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


def test_checkpoints_that_are_truncated_or_do_not_load_are_skipped(tiny_overrides, capsys):
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [*tiny_overrides, "run.steps=12", "checkpoint.every=4", "checkpoint.keep_last=0"],
    )
    train(cfg)
    root = Path(cfg.run.dir) / "checkpoints"
    # Truncated after the save (a partial copy): the manifest's sizes no longer match.
    weights = root / "step_0000012" / "engine" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # Same size, garbage inside: found only when loading, then skipped on every rank.
    optimizer = root / "step_0000008" / "engine" / "optimizer.pt"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)
    cfg.run.steps = 13
    assert train(cfg)["step"] == 13
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_0000012: engine/model.safetensors has 100" in err
    assert "step_0000008: it does not load" in err
    assert "resumed from" in err and "step_0000004" in err

    # When no checkpoint loads, the run stops instead of starting over (and pruning them).
    for step_dir in root.glob("step_*"):
        (step_dir / "engine" / "optimizer.pt").write_bytes(b"\0" * 64)
        (step_dir / "manifest.json").unlink()
    cfg.run.steps = 20
    with pytest.raises(ValueError, match="none of the checkpoints .* loads"):
        train(cfg)


def test_a_resumed_run_takes_optimizer_settings_from_its_config(tiny_overrides):
    from trainer.loop import TrainLoop

    common = [*tiny_overrides, "run.steps=2", "optim.weight_decay=0.01"]
    train(load_config(REPO / "yaml/tiny.yaml", common))
    changed = load_config(
        REPO / "yaml/tiny.yaml", [*common, "optim.weight_decay=0.2", "optim.adaptor_lr_scale=3"]
    )
    loop = TrainLoop(changed)
    loop.resume()
    assert loop.step == 2 and loop.engine.optimizer.state  # moments came from the checkpoint
    groups = {g["name"]: g for g in loop.engine.optimizer.param_groups}
    assert groups["llm_decay"]["weight_decay"] == 0.2
    assert groups["adaptor_decay"]["lr_scale"] == 3.0
