"""DeepSeek-VL 7B (docs/designs.md) against transformers' DeepseekVLHybridForConditionalGeneration:
SAM-B on the image at its high resolution and SigLIP on it resized, as one tower whose features
are the two side by side, the aligner that projects each half, a Llama. The documents are
LLaVA's (test_classic_designs: 16 image tokens per image, SigLIP's 4 × 4 grid).

Each test builds and saves its own tiny random checkpoint; nothing is downloaded."""

from pathlib import Path

import pytest
import torch
from test_classic_designs import (
    IMAGE_TOKEN,
    imported_into,
    parity,
    probe_difference,
    saved,
    tiny_llama,
    with_random_vectors,
)
from transformers import (
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.sam.configuration_sam import SamVisionConfig

from cluster.cli import main
from models.split_vlm import SplitVLM
from models.vision import DeepseekHybridTower

HIGH_RES = 64  # SAM's input: 4 × 4 patches of 16 pixels; SigLIP sees the image at 16 pixels


def tiny_hybrid() -> DeepseekVLHybridForConditionalGeneration:
    """A random DeepSeek-VL 7B: SigLIP on 16-pixel images of 4-pixel patches, SAM on 64-pixel
    ones with windowed attention in its first layer and global in its second (the neck's
    input), a Llama. Every 1-D parameter is moved off its init, SAM's alpha too (0 at init:
    its early features would not count)."""
    torch.manual_seed(0)
    config = DeepseekVLHybridConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ).to_dict(),
        high_res_vision_config=SamVisionConfig(
            hidden_size=16,
            output_channels=8,
            mlp_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=HIGH_RES,
            patch_size=16,
            window_size=2,
            global_attn_indexes=[1],
        ).to_dict(),
        text_config=tiny_llama().to_dict(),
        image_token_id=IMAGE_TOKEN,
    )
    model = with_random_vectors(DeepseekVLHybridForConditionalGeneration(config))
    with torch.no_grad():
        model.model.high_res_vision_alpha.fill_(0.7)
    return model


class TwoResolutions:
    """transformers' model fed as its processor would be, from our one image: SigLIP's input
    is our tower's resize of it (`low_res_pixels`); so the comparison is of the models."""

    def __init__(self, model, tower: DeepseekHybridTower):
        self.model, self.tower = model, tower

    def __call__(self, input_ids, pixel_values):
        low = self.tower.low_res_pixels(pixel_values)
        return self.model(input_ids=input_ids, pixel_values=low, high_res_pixel_values=pixel_values)


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory) -> Path:
    return saved(tiny_hybrid(), tmp_path_factory, "deepseek_vl_hybrid")


@pytest.fixture(scope="module")
def imported(hybrid_dir, tmp_path_factory) -> Path:
    return imported_into(hybrid_dir, tmp_path_factory, "DeepseekVLHybridForConditionalGeneration")


@pytest.mark.parametrize("num_images", [1, 3])
def test_deepseek_vl_hybrid_parity_packed_documents_match_transformers_alone(
    imported, hybrid_dir, num_images
):
    ours = SplitVLM.from_pretrained(imported).eval()
    assert isinstance(ours.vision, DeepseekHybridTower)
    assert ours.cfg.vision.high_res_size == HIGH_RES
    reference = DeepseekVLHybridForConditionalGeneration.from_pretrained(hybrid_dir).eval()
    worst = parity(ours, TwoResolutions(reference, ours.vision), num_images, num_images, HIGH_RES)
    print(f"DeepSeek-VL (hybrid) parity, {num_images} image(s): max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_both_resolutions_and_the_early_sam_features_count(imported):
    """Each path moves the image tokens: SigLIP's, SAM's last layer and (through alpha) its
    global-attention layer's."""
    ours = SplitVLM.from_pretrained(imported).eval()
    pixels = torch.randn(1, 3, HIGH_RES, HIGH_RES, generator=torch.Generator().manual_seed(3))
    tower = ours.vision
    with torch.no_grad():
        features = tower(pixels)
        high, low = features.split(
            [tower.high_res_dim, features.shape[-1] - tower.high_res_dim], -1
        )
        tower.high_res_vision_alpha.zero_()
        without_early = tower(pixels)[..., : tower.high_res_dim]
    assert features.shape == (1, 16, 32 + 24)
    assert high.abs().mean() > 0 and low.abs().mean() > 0
    assert (high - without_early).abs().max() > 1e-3


def test_deepseek_vl_hybrid_round_trip_through_the_cli_gives_transformers_the_same_logits(
    hybrid_dir, tmp_path
):
    assert main(["import-hf", str(hybrid_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = DeepseekVLHybridForConditionalGeneration.from_pretrained(hybrid_dir).eval()
    again = DeepseekVLHybridForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN] * 16, 7, 8]])
    generator = torch.Generator().manual_seed(5)
    low = torch.randn(1, 3, 16, 16, generator=generator)
    high = torch.randn(1, 3, HIGH_RES, HIGH_RES, generator=generator)
    with torch.no_grad():
        want = original(input_ids=ids, pixel_values=low, high_res_pixel_values=high).logits
        got = again(input_ids=ids, pixel_values=low, high_res_pixel_values=high).logits
    assert (want - got).abs().max() <= 1e-5


def test_deepseek_vl_hybrid_preset_trains_and_exports_to_transformers(demo_data, tmp_path):
    from test_pixtral import trained_and_exported

    ours, hf, decoder = trained_and_exported(
        "yaml/deepseek_vl_hybrid.yaml",
        DeepseekVLHybridForConditionalGeneration,
        demo_data,
        tmp_path,
    )
    reference = TwoResolutions(hf, ours.vision)
    image_id = hf.config.image_token_id
    num_tokens = ours.cfg.num_image_tokens()
    size = ours.cfg.vision.high_res_size
    assert probe_difference(ours, reference, image_id, num_tokens, decoder.pad_id, size) <= 1e-5
