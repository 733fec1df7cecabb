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
    VOCAB,
    documents,
    imported_into,
    parity,
    probe_difference,
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
    OPTConfig,
)

from cluster.cli import main
from models.split_vlm import SplitVLM
from models.vision import Blip2QueryTower


def tiny_opt() -> OPTConfig:
    """The released checkpoints' kind of language model: OPT (learned positions, no RoPE)."""
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )


def tiny_blip2(text=None) -> Blip2ForConditionalGeneration:
    """A random BLIP-2: a ViT on 16-pixel images of 4-pixel patches, a Q-Former of 16 queries
    with cross-attention every other layer, a Llama (or `text`). Every 1-D parameter is moved off
    its init, the queries too."""
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
        text_config=(text or tiny_llama()).to_dict(),
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


@pytest.fixture(scope="module")
def opt_blip2_dir(tmp_path_factory) -> Path:
    return saved(tiny_blip2(tiny_opt()), tmp_path_factory, "blip2_opt")


def test_blip2_with_opt_packed_documents_match_transformers_alone(opt_blip2_dir, tmp_path_factory):
    """OPT's learned positions count every token of a document, its queries too: packed
    documents each start from position 0, as each alone does in transformers."""
    ours_dir = imported_into(opt_blip2_dir, tmp_path_factory, "Blip2ForConditionalGeneration")
    ours = SplitVLM.from_pretrained(ours_dir).eval()
    assert ours.cfg.learned_positions == 128 and ours.cfg.rotary_dim == 0
    reference = Blip2ForConditionalGeneration.from_pretrained(opt_blip2_dir).eval()
    worst = max(parity(ours, reference, n, seed=n) for n in (1, 3))
    print(f"BLIP-2 (OPT) parity: max |diff| {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("text_model", ["llama", "opt"])
def test_blip2_round_trip_through_the_cli_gives_transformers_the_same_logits(
    blip2_dir, opt_blip2_dir, tmp_path, text_model
):
    if text_model == "opt":
        blip2_dir = opt_blip2_dir
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
    image_id, num_tokens = hf.config.image_token_index, ours.cfg.vision.num_queries
    assert probe_difference(ours, hf, image_id, num_tokens, pad_id=decoder.pad_id) <= 1e-5
