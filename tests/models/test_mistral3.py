"""Mistral 3 (docs/designs.md) against transformers' Mistral3ForConditionalGeneration: Pixtral's
ViT, an RMSNorm and a 2 × 2 patch merger before the projector, Pixtral's image tokens at the
merged grid, Mistral.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded. The documents
and transformers' inputs are Pixtral's (test_pixtral), counted in image tokens of 8 pixels
(4-pixel patches, merged 2 × 2)."""

from pathlib import Path

import pytest
import torch
from test_classic_designs import imported_into, saved, with_random_vectors
from test_pixtral import as_document, packed_logits, pixels_of, transformers_logits
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
)

from cluster.cli import main
from models.split_vlm import SplitVLM
from models.vision import merge_patches

VOCAB = 64
IMAGE_TOKEN = 63
TOKEN = 8  # pixels per image token a side: 4-pixel patches, merged 2 × 2
SIZES = [(16, 24), (32, 8), (16, 16), (8, 32)]


def tiny_mistral3() -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            head_dim=16,
            image_size=32,
            patch_size=4,
            rope_theta=1000.0,
        ).to_dict(),
        text_config=MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rope_theta=5000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
        ).to_dict(),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        spatial_merge_size=2,
    )
    return with_random_vectors(Mistral3ForConditionalGeneration(config))


@pytest.fixture(scope="module")
def mistral3_dir(tmp_path_factory) -> Path:
    return saved(tiny_mistral3(), tmp_path_factory, "mistral3")


@pytest.fixture(scope="module")
def imported(mistral3_dir, tmp_path_factory) -> Path:
    return imported_into(mistral3_dir, tmp_path_factory, "Mistral3ForConditionalGeneration")


def samples(num_images: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for index, length in enumerate((5, 3, 7)):
        pieces = []
        for image in range(num_images):
            count = 0 if (index == 1 and image == 0) else length + image
            text = torch.randint(4, 60, (count,), generator=generator).tolist()
            pieces.append((text, SIZES[(index + image) % len(SIZES)]))
        pieces.append((torch.randint(4, 60, (length + 2,), generator=generator).tolist(), None))
        docs.append(pieces)
    return docs


@pytest.mark.parametrize("num_images", [1, 3])
def test_mistral3_parity_packed_documents_match_transformers_alone(
    imported, mistral3_dir, num_images
):
    reference = Mistral3ForConditionalGeneration.from_pretrained(mistral3_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.vision.spatial_merge == 2 and ours.cfg.adaptor == "patch_merger"
    docs, alone = [], []
    with torch.no_grad():
        for index, pieces in enumerate(samples(num_images, seed=num_images)):
            images = pixels_of(pieces, seed=index)
            docs.append(as_document(pieces, images, f"doc{index}", TOKEN))
            alone.append(transformers_logits(reference, pieces, images, TOKEN))
        packed = packed_logits(ours, docs)
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"Mistral 3 parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_mistral3_round_trip_through_the_cli_gives_transformers_the_same_logits(
    mistral3_dir, tmp_path
):
    assert main(["import-hf", str(mistral3_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = Mistral3ForConditionalGeneration.from_pretrained(mistral3_dir).eval()
    again = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.spatial_merge_size == 2 and again.config.vision_feature_layer == -2
    (pieces,) = samples(3, seed=5)[:1]
    images = pixels_of(pieces, seed=5)
    with torch.no_grad():
        want = transformers_logits(original, pieces, images, TOKEN)
        got = transformers_logits(again, pieces, images, TOKEN)
    assert (want - got).abs().max() <= 1e-5


def test_merged_patches_are_each_tokens_own_patches_in_unfold_order():
    """Token (r, c) of a merged grid holds patches (2r + i, 2c + j), i and j row-major, as
    torch's unfold (Mistral 3's merger) orders a 2 × 2 kernel."""
    rows, cols, channels = 2, 3, 5
    features = torch.randn(1, rows * 2 * cols * 2, channels)
    merged = merge_patches(features, (rows, cols), 2)
    grid = features.view(1, rows * 2, cols * 2, channels).permute(0, 3, 1, 2)
    unfolded = torch.nn.functional.unfold(grid, kernel_size=2, stride=2)  # (1, C·4, rows·cols)
    want = unfolded.view(channels, 4, rows * cols).permute(2, 1, 0).reshape(1, rows * cols, -1)
    assert torch.equal(merged, want)


def test_mistral3_preset_trains_on_native_images_and_exports_to_transformers(
    native_demo_data, tmp_path
):
    """yaml/mistral3.yaml on images of several aspect ratios: the text loss falls, and the run
    as a transformers Mistral 3 gives our logits."""
    import math
    from statistics import mean

    from test_classic_designs import read_metrics

    from trainer.config import load_config
    from trainer.export import export_to_hf
    from trainer.inference import load_for_inference
    from trainer.loop import train

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "yaml/mistral3.yaml",
        [
            f"data.path={native_demo_data}",
            f"run.dir={tmp_path / 'run'}",
            "run.steps=20",
            "optim.warmup_steps=4",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
        ],
    )
    train(cfg)
    text = [m["text_loss"] for m in read_metrics(Path(cfg.run.dir))]
    assert len(text) == 20 and all(math.isfinite(v) for v in text)
    assert mean(text[-5:]) < 0.9 * mean(text[:5]), text

    assert export_to_hf(Path(cfg.run.dir), tmp_path / "hf") == "Mistral3ForConditionalGeneration"
    hf = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours, _, decoder = load_for_inference(Path(cfg.run.dir))
    vocab = decoder.tokenizer.get_vocab()
    marks = vocab["<image_row_break>"], vocab["<image_end>"]
    pieces = [([2, 5, 9], (8, 16)), ([11, 12], (24, 8)), ([3, 4], None)]
    images = pixels_of(pieces, seed=1)
    with torch.no_grad():
        want = packed_logits(ours, [as_document(pieces, images, "probe", TOKEN, marks)])
        got = transformers_logits(hf, pieces, images, TOKEN, marks)
    assert (want - got).abs().max() <= 1e-5
