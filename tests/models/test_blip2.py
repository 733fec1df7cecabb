"""BLIP-2 (docs/designs.md) against transformers' Blip2ForConditionalGeneration: its ViT and
Q-Former (learned queries cross-attending to the image) as one tower whose query outputs are the
image's tokens, the language projection, a Llama. The documents are LLaVA's
(test_classic_designs: 16 image tokens per image, here the 16 queries).

Each test builds and saves its own tiny random checkpoint; nothing is downloaded."""

from pathlib import Path

import pytest
import torch
from test_classic_designs import (
    IMAGE_TOKEN,
    NUM_PATCHES,
    documents,
    imported_into,
    parity,
    saved,
    tiny_llama,
    transformers_ids,
    with_random_vectors,
)
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
)

from cluster.cli import main
from models.split_vlm import SplitVLM
from models.vision import Blip2QueryTower
from trainer.data.decode import Document
from trainer.data.packing import collate


def tiny_blip2() -> Blip2ForConditionalGeneration:
    """A random BLIP-2: a ViT on 16-pixel images of 4-pixel patches, a Q-Former of 16 queries
    with cross-attention every other layer, a Llama. Every 1-D parameter is moved off its init,
    the queries too."""
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            cross_attention_frequency=2,
        ).to_dict(),
        text_config=tiny_llama().to_dict(),
        num_query_tokens=NUM_PATCHES,
        image_token_index=IMAGE_TOKEN,
    )
    model = with_random_vectors(Blip2ForConditionalGeneration(config))
    with torch.no_grad():
        model.query_tokens.normal_()
    return model


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> Path:
    return saved(tiny_blip2(), tmp_path_factory, "blip2")


@pytest.fixture(scope="module")
def imported(blip2_dir, tmp_path_factory) -> Path:
    return imported_into(blip2_dir, tmp_path_factory, "Blip2ForConditionalGeneration")


@pytest.mark.parametrize("num_images", [1, 3])
def test_blip2_parity_packed_documents_match_transformers_alone(imported, blip2_dir, num_images):
    reference = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert isinstance(ours.vision, Blip2QueryTower) and ours.cfg.square_grid == (1, NUM_PATCHES)
    worst = parity(ours, reference, num_images, seed=num_images)
    print(f"BLIP-2 parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_blip2_round_trip_through_the_cli_gives_transformers_the_same_logits(blip2_dir, tmp_path):
    assert main(["import-hf", str(blip2_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.num_query_tokens == NUM_PATCHES
    pieces = documents(2, seed=5)[0]
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = original(input_ids=transformers_ids(pieces), pixel_values=pixels).logits
        got = again(input_ids=transformers_ids(pieces), pixel_values=pixels).logits
    assert (want - got).abs().max() <= 1e-5


def test_the_image_tokens_do_not_depend_on_the_text(imported):
    """The queries read the image only: an image's tokens are the same whatever text is around
    it, in whichever document of the micro-batch."""
    ours = SplitVLM.from_pretrained(imported).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, _ = ours.image_inputs_and_targets(
            pixels, torch.zeros(2 * NUM_PATCHES, dtype=torch.bool), [(1, NUM_PATCHES)] * 2
        )
        alone, _ = ours.image_inputs_and_targets(
            pixels[1:], torch.zeros(NUM_PATCHES, dtype=torch.bool), [(1, NUM_PATCHES)]
        )
    assert tokens.shape == (2 * NUM_PATCHES, ours.cfg.d_model)
    assert torch.allclose(tokens[NUM_PATCHES:], alone, atol=1e-6)


def test_blip2_preset_trains_the_qformer_and_exports_to_transformers(demo_data, tmp_path):
    from test_pixtral import trained_and_exported

    ours, hf, decoder = trained_and_exported(
        "yaml/blip2.yaml", Blip2ForConditionalGeneration, demo_data, tmp_path
    )
    trained = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trained  # load_for_inference leaves requires_grad as built
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text, num_tokens = [[2, 5, 9], [11, 12, 3]], ours.cfg.vision.num_queries
    doc = Document(
        sample_id="probe",
        input_ids=torch.tensor(text[0] + [decoder.pad_id] * num_tokens + text[1]),
        target_mask=torch.ones(6 + num_tokens, dtype=torch.bool),
        segments=[("text", 3), ("image", num_tokens), ("text", 3)],
        pixel_values=pixels,
        image_mask=torch.zeros(num_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_tokens, dtype=torch.bool),
    )
    batch = collate([doc], image_attention="causal", attention_backend="sdpa")
    image_id = hf.config.image_token_index
    with torch.no_grad():
        want = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        hf_ids = torch.tensor(text[0] + [image_id] * num_tokens + text[1])
        got = hf(input_ids=hf_ids[None], pixel_values=pixels).logits[0]
    assert (want - got).abs().max() <= 1e-5
