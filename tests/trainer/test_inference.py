"""Inference from what training leaves behind: eval on a run and on its export, generate."""

import json
from pathlib import Path

import pytest
from PIL import Image

from cluster.cli import main
from trainer.config import load_config
from trainer.loop import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pixel_run(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pixel_run")
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [
            f"data.path={demo_data}",
            f"run.dir={run_dir}",
            "data.batch_size=8",
            "run.steps=6",
            "run.log_every=1000",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            "model.image_target=pixels",
            "model.image_scales=[1,2]",
            "model.dual_input=true",
            "model.diffusion_head=true",
            "model.diffusion_steps=4",
        ],
    )
    train(cfg)
    return run_dir


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_eval_of_a_run_and_of_its_export_agree(pixel_run, demo_data, tmp_path, capsys):
    code, out = run_cli(capsys, "eval", str(pixel_run), "--limit", "24")
    assert code == 0
    from_run = json.loads(out)
    assert from_run["samples"] == 24 and 0 <= from_run["exact_match"] <= 1
    assert from_run["image_loss"] > 0 and from_run["image_loss_mean_baseline"] > 0
    export = tmp_path / "export"
    assert run_cli(capsys, "export", str(pixel_run), "--out", str(export))[0] == 0
    assert main(["eval", str(export), "--limit", "24"]) == 2  # no data path in an export
    assert "pass --data" in capsys.readouterr().err
    code, out = run_cli(capsys, "eval", str(export), "--limit", "24", "--data", str(demo_data))
    assert code == 0 and json.loads(out) == from_run


def test_generate_writes_every_scale_coarse_to_fine(pixel_run, tmp_path, capsys):
    out = tmp_path / "gen.png"
    code, printed = run_cli(
        capsys,
        "generate",
        str(pixel_run),
        "--prompt",
        "draw a red circle at the top left .",
        "--out",
        str(out),
    )
    assert code == 0 and "3 scales" in printed
    with Image.open(out) as image:
        assert image.size == (3 * 128, 128)  # scales 1, 2 and the full 4×4 grid, side by side


def test_generate_needs_pixel_targets(demo_data, tmp_path, capsys):
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [
            f"data.path={demo_data}",
            f"run.dir={tmp_path}",
            "run.steps=1",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
        ],
    )
    train(cfg)
    assert main(["generate", str(tmp_path), "--prompt", "draw a red circle ."]) == 2
    assert "needs model.image_target=pixels" in capsys.readouterr().err
