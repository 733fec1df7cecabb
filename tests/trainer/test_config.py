import subprocess
import sys
from pathlib import Path

import pytest

import yaml
from trainer.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(
        tmp_path, "run:\n  steps: 7\nmodel:\n  d_model: 32\n  vision:\n    patch_size: 4\n"
    )
    cfg = load_config(path, ["run.steps=9", "optim.lr=1e-4", "model.vision.trainable=true"])
    assert cfg.run.steps == 9  # the override wins over the file
    assert cfg.model.d_model == 32
    assert cfg.model.vision.patch_size == 4
    assert cfg.model.vision.trainable is True
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.batch_size == Config().data.batch_size  # untouched default


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n"))
    assert isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match=r"'run.steps' must be int"):
        load_config(write(tmp_path, "run:\n  steps: 1.5\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("run:\n  stpes: 3\n", r"run.yaml: unknown key 'run.stpes'"),
        ("nope:\n  a: 1\n", r"unknown key 'nope'"),
        ("model:\n  vision:\n    image_size: big\n", r"'model.vision.image_size' must be int"),
        ("data:\n  shuffle: 'yes'\n", r"'data.shuffle' must be bool"),
        ("run: 3\n", r"'run' is a section"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("run: [\n", r"not valid YAML"),
        ("model:\n  num_heads: 3\n", r"not divisible by model.num_heads"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_bad_overrides_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"--set: unknown key 'optim.lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["run.steps=3", "model.vision.hidden_size=16"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_shipped_presets_load():
    for preset in sorted((REPO / "yaml").glob("*.yaml")):
        load_config(preset)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "nowhere.yaml"], "config file not found: nowhere.yaml"),
        (["train", "yaml/tiny.yaml", "--set", "run.bogus=1"], "unknown key 'run.bogus'"),
        (["train", "yaml/tiny.yaml", "--set", "run.steps=x"], "'run.steps' must be int"),
        (
            [
                "train",
                "yaml/tiny.yaml",
                "--set",
                "data.generate_demo=false",
                "--set",
                "data.path=/nonexistent",
            ],
            "data directory not found: /nonexistent/train",
        ),
    ],
)
def test_cli_user_errors_are_one_line_with_exit_2(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_an_empty_data_directory(tmp_path):
    (tmp_path / "train").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "train",
            "yaml/tiny.yaml",
            "--set",
            f"data.path={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"splitvlm train: error: no MDS shards in {tmp_path}/train (index.json is missing)"
    )


def test_stream_mixtures_load_from_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "data:\n  streams:\n    - {path: data/a, proportion: 0.7}\n"
        "    - {remote: 's3://bucket/b', proportion: 0.3}\n  shuffle_algo: py1br\n",
    )
    cfg = load_config(path)
    assert [(s.path, s.remote, s.proportion) for s in cfg.data.streams] == [
        ("data/a", "", 0.7),
        ("", "s3://bucket/b", 0.3),
    ]
    assert cfg.data.streams[0].repeat is None and cfg.data.shuffle_algo == "py1br"
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg
    cfg = load_config(None, ["data.streams=[{path: a, repeat: 2}, {path: b, choose: 10}]"])
    assert [(s.repeat, s.choose) for s in cfg.data.streams] == [(2.0, None), (None, 10)]


@pytest.mark.parametrize(
    "streams, message",
    [
        ("[{path: a, proportoin: 1}]", r"unknown key 'data.streams\[0\].proportoin'"),
        ("[{path: a}, 3]", r"'data.streams\[1\]' is a section"),
        ("[{path: a, choose: 1.5}]", r"'data.streams\[0\].choose' must be int \| None"),
        ("[{path: a, proportion: 1, repeat: 2}]", r"data.streams\[0\]: give at most one"),
        ("[{path: a, proportion: 1}, {path: b, repeat: 2}]", r"data.streams\[1\]: proportion"),
        ("[{proportion: 1}]", r"data.streams\[0\] needs a path or a remote"),
    ],
)
def test_bad_streams_name_the_item(streams, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.streams={streams}"])


def test_bad_data_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"data.shuffle_algo='py9'; valid: py1e"):
        load_config(None, ["data.shuffle_algo=py9"])
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction must be between 0 and 1"):
        load_config(None, ["data.max_bad_fraction=2"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.steps=-1"], "run.steps=-1 must be >= 0"),
        (["run.log_every=0"], "run.log_every=0 must be >= 1"),
        (["run.seed=-1"], "run.seed=-1 must be >= 0"),
        (["model.attention_backend=fast"], "model.attention_backend='fast'; valid: sdpa, flash,"),
        (["model.adaptor=conv"], "model.adaptor='conv'; valid: linear, mlp"),
        (["model.adaptor=resampler"], "model.vision.num_queries (> 0) goes with tower: blip2"),
        (
            ["model.adaptor=resampler", "model.vision.num_queries=8"],
            "adaptor: resampler: a square grid of queries",
        ),
        (["model.vision.num_queries=4"], "model.vision.num_queries (> 0) goes with"),
        (["model.vision.high_res_size=64"], "model.vision.high_res_size: a multiple of 16"),
        (["model.adaptor=hybrid_aligner"], "model.adaptor: hybrid_aligner goes with model.vision"),
        (
            ["model.learned_positions=16", "model.rope_fraction=0"],
            "data.max_tokens=1024 > model.learned_positions=16",
        ),
        (["model.rope_fraction=0"], "model.rope_fraction must be in (0, 1] (0 with learned"),
        (["model.image_target=tokens"], "model.image_target: tokens goes with a VQ tokenizer"),
        (["model.image_loss_tokens=all"], "model.image_loss_tokens=all predicts token j at j - 1"),
        (["model.qk_norm=per_head"], "model.qk_norm='per_head'; valid: false, true, per_head"),
        (["model.swin_norm=true", "model.post_norms=true"], "model.swin_norm and model.post_"),
        (
            ["model.vision.tower=chameleon_vq", "model.vision.codebook_size=8"],
            "model.vision.codebook_size: > 0 with a VQ tokenizer (tower: chameleon_vq or janus",
        ),
        (["data.num_workers=-1"], "data.num_workers must be >= 0"),
        (["optim.schedule=cosin"], "optim.schedule='cosin'; valid: cosine, linear, constant"),
        (["optim.lr=-1e-3"], "optim.lr=-0.001 must be >= 0"),
        (["optim.stage=warmup"], "optim.stage='warmup'; valid: align, instruct, full"),
        (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
        (["optim.beta2=1"], "optim.beta2=1.0 must be in [0, 1)"),
        (["optim.warmup_steps=-5"], "optim.warmup_steps=-5 must be >= 0"),
        (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5 must be in [0, 1]"),
        (["optim.grad_clip=-1"], "optim.grad_clip=-1.0 must be >= 0"),
        (["optim.adaptor_lr_scale=-0.5"], "optim.adaptor_lr_scale=-0.5 must be >= 0"),
        (["engine.name=fsdx"], "engine.name='fsdx'; valid: local, fsdp, deepspeed"),
        (["engine.mixed_precision=fp16"], "engine.mixed_precision='fp16'; valid: auto, bf16, fp32"),
        (["engine.zero_stage=4"], "engine.zero_stage=4; valid: 1, 2, 3"),
        (["engine.name=deepspeed", "engine.compile=true"], "engine.compile is not supported"),
        (["checkpoint.every=-1"], "checkpoint.every=-1 must be >= 0"),
        (["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1 must be >= 0"),
        (["cluster.num_workers=0"], "cluster.num_workers=0: need 1 <= min <= max"),
        (["logging.progress=fancy"], "logging.progress='fancy'; valid: auto, bar, lines"),
    ],
)
def test_every_section_is_validated_at_load(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "yaml/tiny.yaml", overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.mask_rate_max=0.5"], "model.vision.tower=janus: an image is read (its ViT's"),
        (["model.image_attention=bidirectional"], "model.vision.tower=janus: an image is read"),
        (["model.adaptor=vocabulary"], "model.adaptor: vocabulary goes with model.vision.tower"),
        (["model.vision.codebook_size=0"], "model.vision.codebook_size: > 0 with a VQ tokenizer"),
        (["model.image_target=encoder"], "model.image_target: tokens goes with a VQ tokenizer"),
    ],
)
def test_janus_two_image_paths_are_validated_at_load(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "yaml/janus.yaml", overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_config_from_a_dict_is_validated_too():
    raw = config_to_dict(load_config(None))
    raw["engine"]["zero_stage"] = 0
    with pytest.raises(ConfigError, match=r"^engine.zero_stage=0; valid: 1, 2, 3$"):
        config_from_dict(raw)


def test_the_valid_names_are_the_registries():
    from models.attention import ATTENTION_BACKENDS
    from models.vision import ADAPTORS
    from trainer.engines import ENGINES
    from trainer.engines.wrap import PRECISIONS
    from trainer.optim import SCHEDULES

    for key, registry in [
        ("model.attention_backend", ATTENTION_BACKENDS),
        ("model.adaptor", ADAPTORS),
        ("engine.name", ENGINES),
        ("engine.mixed_precision", PRECISIONS),
        ("optim.schedule", SCHEDULES),
    ]:
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"{key}=nope"])
        assert str(error.value) == f"{key}='nope'; valid: {', '.join(registry)}"
