"""The command line: every subcommand listed with an example, exit codes 0 / 2 / 1, `plot`."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

import yaml
from cluster import cli

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = "train submit status logs stop shards eval export plot generate".split()


def test_help_lists_every_subcommand_with_one_line_of_help():
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    listed = {}
    for line in result.stdout.splitlines():
        words = line.split(maxsplit=1)
        if line.startswith("    ") and len(words) == 2 and words[0] in SUBCOMMANDS:
            listed[words[0]] = words[1]
    assert list(listed) == SUBCOMMANDS
    assert all(len(help_text) > 10 for help_text in listed.values())


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    example = out.split("example:\n", 1)[1].strip()
    assert example.startswith(f"splitvlm {command}")


def test_a_missing_checkpoint_is_a_usage_error_naming_it(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nowhere"), "--out", "x"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err


def test_usage_and_config_errors_exit_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nonsense"])
    assert exit_info.value.code == cli.EXIT_USAGE
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config file not found" in err
    assert cli.main(["plot", str(tmp_path)]) == cli.EXIT_USAGE
    assert "metrics.jsonl not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("engine.name=fsdx", "engine.name='fsdx'; valid: local, fsdp, deepspeed"),
        ("optim.schedule=cosin", "optim.schedule='cosin'; valid: cosine, linear, constant"),
    ],
)
def test_a_bad_config_value_exits_2_before_ray_starts(override, message, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(REPO)
    assert cli.main(["train", "yaml/tiny.yaml", "--set", override]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not ray.is_initialized()


def test_a_runtime_failure_exits_1_and_keeps_the_traceback(tmp_path, monkeypatch, capsys):
    def broken(run_dir, out=None):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("trainer.plot.plot_run", broken)
    monkeypatch.delenv("SPLITVLM_DEBUG", raising=False)
    assert cli.main(["plot", str(tmp_path)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("splitvlm plot: failed: RuntimeError: disk on fire (traceback in ")
    log = Path(err.rsplit("traceback in ", 1)[1].rstrip(")\n"))
    assert "Traceback" in log.read_text() and "def broken" not in err
    log.unlink()

    monkeypatch.setenv("SPLITVLM_DEBUG", "1")
    assert cli.main(["plot", str(tmp_path)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    Path(err.rsplit("traceback in ", 1)[1].rstrip(")\n")).unlink()


def test_a_failed_train_leaves_its_traceback_in_the_run_directory(
    demo_data, tmp_path, monkeypatch, capsys
):
    def crash(cfg):
        raise RuntimeError("worker died")

    monkeypatch.setattr("cluster.launch.run_job", crash)
    run_dir = tmp_path / "run"
    argv = ["train", str(REPO / "yaml/tiny.yaml"), "--set", f"data.path={demo_data}"]
    assert cli.main([*argv, "--set", f"run.dir={run_dir}"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err == (
        "splitvlm train: failed: RuntimeError: worker died "
        f"(traceback in {run_dir / 'error.log'})\n"
    )
    assert "in crash" in (run_dir / "error.log").read_text()


def test_plot_writes_a_png_of_a_run(tmp_path, capsys):
    lines = [
        {
            "step": step,
            "text_loss": 4.0 / step,
            "image_loss": 1.0 / step,
            "lr": 1e-3 * min(1.0, step / 5),
            "tokens_per_s": 1000.0 + step,
            "tokens_per_s_per_device": 500.0 + step,
            "mfu": 0.3,
        }
        for step in range(1, 21)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    out = tmp_path / "plot.png"
    assert cli.main(["plot", str(tmp_path), "--out", str(out)]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    height, width, channels = imread(out).shape
    assert height > 300 and width > 500 and channels in (3, 4)


def test_job_commands_need_a_cluster_address(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for command in (["status"], ["logs", "raysubmit_1"], ["stop", "raysubmit_1"]):
        assert cli.main(command) == cli.EXIT_USAGE
        assert "give --address http://HEAD:8265 or set RAY_ADDRESS" in capsys.readouterr().err


def test_train_reads_a_config_from_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("run:\n  stepz: 3\n"))
    assert cli.main(["train", "-"]) == cli.EXIT_USAGE
    assert "unknown key 'run.stepz'" in capsys.readouterr().err


def test_a_submitted_job_carries_the_config_unresolved_and_joins_its_cluster():
    from cluster.jobs import CONFIG_ENV, ENTRYPOINT, job_runtime_env
    from trainer.config import config_from_dict, config_to_dict, load_config

    cfg = load_config(REPO / "yaml/tiny.yaml", ["run.dir=runs/relative"])
    cfg.cluster.address = "auto"  # what submit() sets
    runtime_env = job_runtime_env(cfg, REPO)
    assert runtime_env["working_dir"] == str(REPO)
    shipped = config_from_dict(yaml.safe_load(runtime_env["env_vars"][CONFIG_ENV]))
    assert config_to_dict(shipped) == config_to_dict(cfg)
    assert shipped.run.dir == "runs/relative"  # resolved on the cluster, not here
    assert int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    assert ENTRYPOINT.endswith("python -m cluster.cli train -") and CONFIG_ENV in ENTRYPOINT
