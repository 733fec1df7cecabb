"""What a user sees of a run: every step's metrics in JSONL, the console, W&B offline, the PNG;
model FLOPs against PyTorch's FLOP counter; no secret in the run directory."""

import io
import json
import math
import os
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from matplotlib.image import imread
from torch.utils.flop_counter import FlopCounterMode

from models.attention import PackedLayout
from models.flops import ModelFlops, attention_pairs, dense_weights
from trainer.callbacks import MetricsLogger
from trainer.config import ConfigError, load_config
from trainer.data.decode import SampleDecoder, load_tokenizer, tokenizer_dir
from trainer.data.packing import layout_options, pack_step
from trainer.data.stream import Skipped, StepBatches
from trainer.distributed import WorldInfo
from trainer.loop import build_training_model, train
from trainer.metrics import StepMeter, peak_flops_for_name
from trainer.reporting import ConsoleProgress, wandb_metrics

REPO = Path(__file__).resolve().parents[2]
FAKE_KEY = "fake0wandb0key0" + "0123456789abcdef" * 2
METRICS = {
    "step",
    "text_loss",
    "image_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "samples_per_s",
    "model_flops_per_token",
    "mfu",
    "data_wait_fraction",
    "host_fraction",
    "micro_batches",
    "token_imbalance",
    "skipped",
    "skipped_by_reason",
    "max_allocated_gb",
    "max_rss_gb",
    "tokens",
    "samples",
    "step_seconds",
    "tokens_seen",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_reports_every_metric_to_jsonl_console_wandb_and_a_png(
    tiny_overrides, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [
            *tiny_overrides,
            "run.steps=4",
            "run.log_every=2",
            # Short enough that some demo samples are skipped as too long, and steps need
            # several micro-batches.
            "data.max_tokens=30",
            "logging.wandb.mode=offline",
            "logging.wandb.tags=[test, tiny]",
            "logging.plot=true",
        ],
    )
    summary = train(cfg)
    run_dir = Path(cfg.run.dir)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 5))
    for m in metrics:
        assert set(m) == METRICS
        for key in METRICS - {"mfu", "max_allocated_gb", "skipped_by_reason"}:
            assert math.isfinite(m[key]), key
        assert m["mfu"] is None  # CPU: no peak FLOP/s
        if not torch.cuda.is_available():
            assert m["max_allocated_gb"] is None
        assert m["max_rss_gb"] > 0.05
        assert m["micro_batches"] >= 2 and 0 <= m["data_wait_fraction"] < 1
        assert m["token_imbalance"] == 1.0 and m["tokens_per_s_per_device"] == m["tokens_per_s"]
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["step_seconds"])
        assert m["skipped"] == sum(m["skipped_by_reason"].values())
    # Skips by reason per step add up to the data cursor's count for the run.
    assert sum(m["skipped_by_reason"].get("too_long", 0) for m in metrics) > 0
    assert summary["skipped"] == {"too_long": sum(m["skipped"] for m in metrics)}
    # Every token passes the core and the text-head blocks, forward and backward.
    model = build_training_model(cfg, load_tokenizer(tokenizer_dir(cfg.data)))
    core_weights = sum(dense_weights(getattr(model, n))[0] for n in ("core", "text_head_blocks"))
    assert all(m["model_flops_per_token"] > 6 * core_weights for m in metrics)

    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all("mfu n/a" in line and "eta " in line and "tokens/s" in line for line in lines)

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (offline_run,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    history_file = offline_run / f"run-{run_id}.wandb"
    # The wandb service process writes this file; under load it can land just after finish().
    for _ in range(100):
        if history_file.is_file():
            break
        time.sleep(0.1)
    history = history_file.read_bytes()
    assert b"text_loss" in history and b"peak_flops_per_device" in history  # metrics + config

    png = run_dir / "metrics.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _ = imread(png).shape
    assert height > 300 and width > 500

    # Resumed with a known peak: the same W&B run continues, MFU is computed, steps stay unique.
    cfg.run.steps = 6
    cfg.logging.peak_flops_per_device = 1e12
    train(cfg)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    # A second offline run directory for the same id; when both start within one second wandb
    # tells them apart with a "-1" suffix.
    resumed = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]
    assert len(resumed) == 2
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in resumed)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    for m in metrics[4:]:
        expected = m["model_flops_per_token"] * m["tokens"] / m["step_seconds"] / 1e12
        assert m["mfu"] == pytest.approx(expected)

    # The API key from the environment is in no file of the run directory (binary included)
    # and in nothing printed.
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaked = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    out = capsys.readouterr()
    assert FAKE_KEY not in out.out + out.err


def micro_batch(demo_data, vision_trainable: bool, *overrides: str, preset="yaml/tiny.yaml"):
    cfg = load_config(
        REPO / preset,
        [
            f"data.path={demo_data}",
            "data.batch_size=8",
            f"model.vision.trainable={vision_trainable}",
            *overrides,
        ],
    )
    tokenizer = load_tokenizer(tokenizer_dir(cfg.data), cfg.model)
    model = build_training_model(cfg, tokenizer)
    decoder = SampleDecoder(tokenizer, cfg.model, cfg.data.max_tokens, seed=0)
    docs, _ = StepBatches(cfg.data, decoder, WorldInfo()).next_step()
    (batch,) = pack_step(docs, cfg.data.max_tokens, **layout_options(cfg.model))
    assert batch.pixel_values.shape[0] > 0
    assert batch.num_masked_image_tokens > 0 or not cfg.model.mask_rate_max
    assert batch.cross_layout is not None or not cfg.model.cross_attention_layers
    return model, batch


@pytest.mark.parametrize(
    "vision_trainable, overrides, preset",
    [
        (False, (), "yaml/tiny.yaml"),
        (True, (), "yaml/tiny.yaml"),
        (False, ("model.visual_expert=true",), "yaml/tiny.yaml"),
        (True, (), "yaml/blip2.yaml"),
        (False, (), "yaml/blip2.yaml"),
        (True, (), "yaml/qwen_vl.yaml"),
        (False, (), "yaml/deepseek_vl_hybrid.yaml"),
        (False, (), "yaml/chameleon.yaml"),
        (False, (), "yaml/janus.yaml"),
        (True, (), "yaml/janus.yaml"),
        (False, ("model.vision.extra_towers=[{tower: siglip}]",), "yaml/tiny.yaml"),
        (True, ("model.vision.extra_towers=[{tower: siglip}]",), "yaml/tiny.yaml"),
        (False, ("optim.freeze=[]",), "yaml/mllama.yaml"),
        (False, (), "yaml/idefics.yaml"),
        (True, ("optim.freeze=[]",), "yaml/idefics.yaml"),
    ],
    ids=[
        "frozen_tower",
        "trained_tower",
        "visual_expert",
        "blip2_qformer",
        "blip2_frozen",
        "qwen_vl_resampler",
        "deepseek_vl_hybrid",
        "chameleon_vq",
        "janus",
        "janus_trained_vit",
        "concatenated_towers",
        "concatenated_towers_trained",
        "mllama_cross_attention",
        "idefics_cross_attention",
        "idefics_trained_tower",
    ],
)
def test_dense_model_flops_equal_pytorchs_flop_count(
    demo_data, vision_trainable, overrides, preset
):
    model, batch = micro_batch(demo_data, vision_trainable, *overrides, preset=preset)
    with FlopCounterMode(display=False) as counter:
        out = model(batch)
        (out["text_loss_sum"] + out["image_loss_sum"]).backward()
    counts = counter.get_flop_counts()
    counted = counts["Global"]
    aten = torch.ops.aten
    matmuls = (aten.mm, aten.addmm, aten.bmm, aten.convolution, aten.convolution_backward)
    # Attention runs as SDPA kernels, which the counter prices as dense masks; compared below.
    # Towers whose attention runs as batched matmuls (BLIP-2's Q-Former, SAM): attention, not
    # dense weights; the count prices the Q-Former's exactly (no mask).
    flops = ModelFlops(model)
    qformer_attention = counts.get("SplitVLM.vision.qformer", {}).get(aten.bmm, 0)
    tower_attention = counts.get("SplitVLM.vision", {}).get(aten.bmm, 0)
    dense = sum(counted.get(op, 0) for op in matmuls) - tower_attention
    assert flops.dense(batch) == dense
    if model.cfg.vision.tower == "janus":  # images of both kinds: read and generated
        assert 0 < batch.num_masked_image_tokens < batch.image_index.numel()
        generated = batch.num_masked_image_tokens // model.cfg.num_image_tokens()
        _, (_, encoding_attention) = model.vision._forward_flops()  # its VQ-VAE's, by bmm
        assert tower_attention == encoding_attention * generated > 0
    elif model.cfg.image_target == "tokens":  # the VQ-VAE's middle block attends by bmm
        assert tower_attention == flops.attention_per_image["vision"] * len(batch.image_grids) > 0
    if "qformer" in dict(model.vision.named_children()):
        per_image = flops.attention_per_image["vision"]
        assert qformer_attention == per_image * len(batch.image_grids) > 0


def test_attention_pairs_are_the_visible_pairs_of_the_mask():
    docs = [[("text", 5), ("image", 4), ("text", 3)], [("text", 6)], [("image", 4), ("image", 2)]]
    layout = PackedLayout.from_docs(docs)
    visible = 0
    for doc in docs:
        position = 0
        for kind, length in doc:
            for query in range(position, position + length):
                # text: its document up to itself; image span [s, e): its document up to e - 1
                visible += query + 1 if kind == "text" else position + length
            position += length
    assert attention_pairs(layout) == visible
    assert attention_pairs(PackedLayout.from_docs([[("text", 6)]])) == 6 * 7 // 2
    # A sliding window of 2: each text token sees itself and the one before; an image token sees
    # the one before it and the rest of its span (5, 4, 3, 2 keys).
    windowed = PackedLayout.from_docs([[("text", 3), ("image", 4)]])
    assert attention_pairs(windowed, window=2) == (1 + 2 + 2) + (5 + 4 + 3 + 2)


class FlopsPerMicroBatch:
    def step(self, micro_batches: list) -> int:
        return 1000 * len(micro_batches)


def _meter_worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        world = WorldInfo(rank=rank, world_size=world_size)
        meter = StepMeter(FlopsPerMicroBatch(), world, torch.device("cpu"), peak=1e3)
        # Rank 0: 2 samples, 100 tokens, one skip; rank 1: 3 samples, 300 tokens, three skips.
        docs = (
            [SimpleNamespace(num_tokens=50)] * 2
            if rank == 0
            else [SimpleNamespace(num_tokens=100)] * 3
        )
        reasons = ["too_long"] if rank == 0 else ["too_long", "image_corrupt", "too_long"]
        skipped = [Skipped(i, reason) for i, reason in enumerate(reasons)]
        data = SimpleNamespace(docs=docs, skipped=skipped, micro_batches=[1, 2])
        results[rank] = meter.measure(
            data, wait_seconds=0.1 + 0.2 * rank, compute_seconds=1.5 - 0.5 * rank, seconds=2.0
        )
    finally:
        dist.destroy_process_group()


def test_step_metrics_are_global_over_ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_meter_worker, args=(2, port, results), nprocs=2, join=True)
    assert results[0] == results[1]  # every rank sees the same step metrics
    m = results[0]
    assert m["tokens"] == 400 and m["samples"] == 5
    assert m["tokens_per_s"] == 200 and m["tokens_per_s_per_device"] == 100
    assert m["samples_per_s"] == 2.5
    assert m["token_imbalance"] == 300 / 200
    assert m["data_wait_fraction"] == pytest.approx(0.3 / 2.0)  # the slowest rank's wait
    assert m["host_fraction"] == pytest.approx(1.0 / 2.0)  # rank 1: 2.0 s, 1.0 s computing
    assert m["skipped"] == 4 and m["skipped_by_reason"] == {"image_corrupt": 1, "too_long": 3}
    assert m["model_flops_per_token"] == 2 * 2000 / 400
    assert m["mfu"] == pytest.approx(4000 / 2.0 / (2 * 1e3))


def test_peak_flops_table_matches_device_names():
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for_name("NVIDIA A10G") == 70e12
    assert peak_flops_for_name("NVIDIA L40S") == 362e12
    assert peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("NVIDIA GeForce GTX 1080") is None


class FakeLoop:
    def __init__(self, step: int):
        self.step = step
        self.world = WorldInfo()


def test_a_resumed_run_drops_the_lines_of_steps_it_repeats(tmp_path):
    lines = [json.dumps({"step": s, "text_loss": 1.0}) for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "te')
    logger = MetricsLogger(tmp_path)
    logger.on_train_start(FakeLoop(step=6))  # resumed from the step-6 checkpoint
    logger.on_step_end(FakeLoop(step=7), {"step": 7, "text_loss": 0.5})
    logger.on_train_end(FakeLoop(step=7))
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 8))


def step_metrics(step: int) -> dict:
    return {
        "step": step,
        "text_loss": 2.5,
        "image_loss": 0.75,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 12345.0,
        "mfu": None,
        "data_wait_fraction": 0.02,
        "host_fraction": 0.04,
        "max_allocated_gb": None,
        "max_rss_gb": 1.25,
        "skipped": 1,
        "skipped_by_reason": {"too_long": 1},
    }


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_type", [io.StringIO, Terminal])
def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(stream_type):
    stream = stream_type()
    progress = ConsoleProgress(total_steps=10, log_every=5, mode="auto", stream=stream)
    progress.on_train_start(FakeLoop(step=0))
    for step in range(1, 11):
        progress.on_step_end(FakeLoop(step=step), step_metrics(step))
    progress.on_train_end(FakeLoop(step=10))
    text = stream.getvalue()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("step ")]
    periodic = [line for line in lines if "lr 1.00e-03" in line]
    assert [line.split()[1] for line in periodic] == ["5/10", "10/10"]
    assert "skipped 5" in periodic[0] and "mfu n/a" in periodic[0] and "rss 1.25GB" in periodic[0]
    assert "data 2%  host 4%" in periodic[0]
    if stream_type is Terminal:
        assert "\r" in text and any("tokens/s 12,345" in line for line in lines)
        assert any("10/10 |" in line for line in lines)  # the bar, with its ETA
    else:
        assert "\r" not in text and lines == periodic


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "logging.wandb.mode=cloud",
            "logging.wandb.mode='cloud'; valid: online, offline, disabled",
        ),
        ("logging.progress=fancy", "logging.progress='fancy'; valid: auto, bar, lines"),
        ("logging.wandb.tags=oops", "'logging.wandb.tags' must be list"),
    ],
)
def test_logging_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_wandb_gets_flat_numbers():
    flat = wandb_metrics(step_metrics(3))
    assert flat["skipped/too_long"] == 1 and "skipped_by_reason" not in flat
    assert "mfu" not in flat and "step" not in flat
