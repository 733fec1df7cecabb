"""Qwen2-VL (docs/designs.md) against transformers' Qwen2VLForConditionalGeneration: its ViT
(2-D RoPE, Conv3d over two frames of a still image), the 2 × 2 merger, <|vision_start|> …
<|vision_end|> around each image at its own size, M-RoPE, Qwen2.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded. transformers'
inputs come from its own image processor (no resize, no rescale: the pixels are normalized
already), so the patch order and the frame repetition are its own."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_classic_designs import imported_into, saved, with_random_vectors
from test_pixtral import _merged, pixels_of, samples, trained_and_exported
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from cluster.cli import main
from models.config import VisionConfig
from models.split_vlm import SplitVLM
from trainer.data.decode import Document
from trainer.data.packing import collate

REPO = Path(__file__).resolve().parents[2]
VISION_START, VISION_END, IMAGE, VIDEO = 60, 61, 62, 63  # above test_pixtral's text ids
TOKEN = 8  # pixels per image token a side: 4-pixel patches merged 2 × 2
SIZES = [(16, 24), (32, 8), (8, 8), (24, 16)]  # (height, width) in pixels


def tiny_qwen2_vl() -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_size": 64,
            "initializer_range": 0.25,  # peaked attention: a wrong position shows
        },
        text_config={
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_theta": 300.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "initializer_range": 0.1,
            "tie_word_embeddings": False,
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return with_random_vectors(Qwen2VLForConditionalGeneration(config))


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory) -> Path:
    return saved(tiny_qwen2_vl(), tmp_path_factory, "qwen2_vl")


@pytest.fixture(scope="module")
def imported(qwen2_vl_dir, tmp_path_factory) -> Path:
    return imported_into(qwen2_vl_dir, tmp_path_factory, "Qwen2VLForConditionalGeneration")


def as_document(pieces, images, name: str, marks=(VISION_START, VISION_END)) -> Document:
    ids, segments, grids = [], [], []
    for text, size in pieces:
        ids += text
        if size is None:
            segments.append(("text", len(text)))
            continue
        rows, cols = size[0] // TOKEN, size[1] // TOKEN
        ids += [marks[0]] + [0] * rows * cols + [marks[1]]
        segments += [("text", len(text) + 1), ("image", rows * cols)]
        segments.append(("text", 1))
        grids.append((rows, cols))
    merged = _merged(segments)
    num_tokens = sum(r * c for r, c in grids)
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=merged,
        pixel_values=torch.cat([image.flatten() for image in images]),
        image_mask=torch.zeros(num_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_tokens, dtype=torch.bool),
        image_grids=grids,
        span_grids=grids,
    )


def transformers_logits(model, pieces, images, marks=(VISION_START, VISION_END)):
    """One document through transformers: its processor patchifies the (normalized) images."""
    processor = Qwen2VLImageProcessor(
        do_resize=False, do_rescale=False, do_normalize=False, patch_size=4, merge_size=2
    )
    inputs = processor(
        images=[image.numpy().astype(np.float32) for image in images],
        input_data_format="channels_first",
        return_tensors="pt",
    )
    image_id = model.config.image_token_id
    ids = []
    for text, size in pieces:
        ids += text
        if size:
            ids += [marks[0]] + [image_id] * (size[0] // TOKEN) * (size[1] // TOKEN) + [marks[1]]
    out = model(
        input_ids=torch.tensor([ids]),
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
    )
    return out.logits[0]


def packed_logits(model: SplitVLM, docs: list[Document]) -> torch.Tensor:
    batch = collate(docs, image_attention="causal", image_positions="mrope")
    return model.text_logits(batch, model.trunk(batch), torch.arange(batch.num_tokens))


@pytest.mark.parametrize("num_images", [1, 3])
def test_qwen2_vl_parity_packed_documents_match_transformers_alone(
    imported, qwen2_vl_dir, num_images
):
    reference = Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.image_positions == "mrope" and ours.cfg.vision.spatial_merge == 2
    docs, alone = [], []
    with torch.no_grad():
        for index, pieces in enumerate(samples(num_images, seed=num_images, sizes=SIZES)):
            images = pixels_of(pieces, seed=index)
            docs.append(as_document(pieces, images, f"doc{index}"))
            alone.append(transformers_logits(reference, pieces, images))
        packed = packed_logits(ours, docs)
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"Qwen2-VL parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_qwen2_vl_round_trip_through_the_cli_gives_transformers_the_same_logits(
    qwen2_vl_dir, tmp_path
):
    assert main(["import-hf", str(qwen2_vl_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_dir).eval()
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.vision_config.spatial_merge_size == 2
    (pieces,) = samples(3, seed=5, sizes=SIZES)[:1]
    images = pixels_of(pieces, seed=5)
    with torch.no_grad():
        want = transformers_logits(original, pieces, images)
        got = transformers_logits(again, pieces, images)
    assert (want - got).abs().max() <= 1e-5


def test_smart_grids_follow_qwen2_vl_smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    vision = VisionConfig(
        image_size=64,
        patch_size=4,
        spatial_merge=2,
        resize="smart",
        min_pixels=256,
        max_pixels=4096,
    )
    for width, height in [(640, 480), (30, 200), (64, 64), (65, 9), (12, 12), (100, 37), (9, 9)]:
        want = smart_resize(height, width, factor=8, min_pixels=256, max_pixels=4096)
        rows, cols = vision.grid(width, height)
        assert (rows * 8, cols * 8) == tuple(want), (width, height)
    with pytest.raises(ValueError, match="aspect ratio over 200"):
        vision.grid(1000, 4)


def test_qwen2_vl_preset_trains_on_native_images_and_exports_to_transformers(
    native_demo_data, tmp_path
):
    ours, hf, decoder = trained_and_exported(
        "yaml/qwen2_vl.yaml", Qwen2VLForConditionalGeneration, native_demo_data, tmp_path
    )
    vocab = decoder.tokenizer.get_vocab()
    marks = vocab[ours.cfg.image_start_token], vocab[ours.cfg.image_end_token]
    assert (hf.config.vision_start_token_id, hf.config.vision_end_token_id) == marks
    pieces = [([2, 5, 9], (8, 16)), ([11, 12], (24, 8)), ([3, 4], None)]
    images = pixels_of(pieces, seed=1)
    with torch.no_grad():
        want = packed_logits(ours, [as_document(pieces, images, "probe", marks)])
        got = transformers_logits(hf, pieces, images, marks)
    assert (want - got).abs().max() <= 1e-5
