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
from test_pixtral import (
    as_document,
    packed_logits,
    pixels_of,
    samples,
    tiny_mistral,
    tiny_vision,
    trains_and_exports,
    transformers_logits,
)
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from cluster.cli import main
from models.split_vlm import SplitVLM
from models.vision import merge_patches

IMAGE_TOKEN = 63
TOKEN = 8  # pixels per image token a side: 4-pixel patches, merged 2 × 2
SIZES = [(16, 24), (32, 8), (16, 16), (8, 32)]


def tiny_mistral3() -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    config = Mistral3Config(
        vision_config=tiny_vision().to_dict(),
        text_config=tiny_mistral().to_dict(),
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


@pytest.mark.parametrize("num_images", [1, 3])
def test_mistral3_parity_packed_documents_match_transformers_alone(
    imported, mistral3_dir, num_images
):
    reference = Mistral3ForConditionalGeneration.from_pretrained(mistral3_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.vision.spatial_merge == 2 and ours.cfg.adaptor == "patch_merger"
    docs, alone = [], []
    with torch.no_grad():
        for index, pieces in enumerate(samples(num_images, seed=num_images, sizes=SIZES)):
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
    (pieces,) = samples(3, seed=5, sizes=SIZES)[:1]
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
    trains_and_exports(
        "yaml/mistral3.yaml", Mistral3ForConditionalGeneration, TOKEN, native_demo_data, tmp_path
    )
