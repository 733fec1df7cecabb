"""DeepSeek-VL (docs/designs.md) against transformers' DeepseekVLForConditionalGeneration
(DeepSeek-VL 1.3B's design): SigLIP read at its last_hidden_state, the aligner
(Linear-GELU-Linear), Llama. Square images in the sequence as LLaVA lays them out
(test_classic_designs' documents).

Each test builds and saves its own tiny random checkpoint; nothing is downloaded."""

import json
from pathlib import Path

import pytest
import torch
from test_classic_designs import (
    IMAGE_TOKEN,
    documents,
    imported_into,
    parity,
    probe_difference,
    saved,
    tiny_llama,
    transformers_ids,
    with_random_vectors,
)
from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, SiglipVisionConfig

from cluster.cli import main
from models.split_vlm import SplitVLM


def tiny_deepseek_vl() -> DeepseekVLForConditionalGeneration:
    torch.manual_seed(0)
    config = DeepseekVLConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ).to_dict(),
        text_config=tiny_llama().to_dict(),
        image_token_id=IMAGE_TOKEN,
    )
    return with_random_vectors(DeepseekVLForConditionalGeneration(config))


@pytest.fixture(scope="module")
def deepseek_vl_dir(tmp_path_factory) -> Path:
    return saved(tiny_deepseek_vl(), tmp_path_factory, "deepseek_vl")


@pytest.fixture(scope="module")
def imported(deepseek_vl_dir, tmp_path_factory) -> Path:
    return imported_into(deepseek_vl_dir, tmp_path_factory, "DeepseekVLForConditionalGeneration")


@pytest.mark.parametrize("num_images", [1, 3])
def test_deepseek_vl_parity_packed_documents_match_transformers_alone(
    imported, deepseek_vl_dir, num_images
):
    reference = DeepseekVLForConditionalGeneration.from_pretrained(deepseek_vl_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.vision.feature_layer == 0 and ours.cfg.adaptor == "mlp"
    worst = parity(ours, reference, num_images, seed=num_images)
    print(f"DeepSeek-VL parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_deepseek_vl_round_trip_through_the_cli_gives_transformers_the_same_logits(
    deepseek_vl_dir, tmp_path
):
    assert main(["import-hf", str(deepseek_vl_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_vl"  # not taken for a LLaVA with a SigLIP tower
    original = DeepseekVLForConditionalGeneration.from_pretrained(deepseek_vl_dir).eval()
    again = DeepseekVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pieces = documents(2, seed=5)[0]
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = original(input_ids=transformers_ids(pieces), pixel_values=pixels).logits
        got = again(input_ids=transformers_ids(pieces), pixel_values=pixels).logits
    assert (want - got).abs().max() <= 1e-5


def test_deepseek_vl_preset_trains_on_the_demo_data_and_exports_to_transformers(
    demo_data, tmp_path
):
    from test_pixtral import trained_and_exported

    ours, hf, decoder = trained_and_exported(
        "yaml/deepseek_vl.yaml", DeepseekVLForConditionalGeneration, demo_data, tmp_path
    )
    image_id = hf.config.image_token_id
    assert probe_difference(ours, hf, image_id, num_tokens=16, pad_id=decoder.pad_id) <= 1e-5
