"""LLaVA-NeXT (docs/designs.md) against transformers' LlavaNextForConditionalGeneration: any-res
tiling over `image_grid_pinpoints` (the base image, then the padded pinpoint tile by tile, its
padding's rows or columns dropped, a learned newline after every row), CLIP, the MLP projector,
Llama.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded. The documents
come from our decoder on real PNG images of several sizes; transformers gets the same pixels as
its processor lays them out (base first, then the tiles row-major) with the images' sizes."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_classic_designs import imported_into, saved, tiny_llama, with_random_vectors
from test_pixtral import trained_and_exported
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
)
from transformers.image_processing_utils import get_patch_output_size
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from cluster.cli import main
from models.split_vlm import SplitVLM
from models.vision import normalize_pixels
from trainer.data.decode import SampleDecoder, load_tokenizer
from trainer.data.demo import save_tokenizer
from trainer.data.packing import collate
from trainer.data.shards import pack_blobs

VOCAB = 64
IMAGE_TOKEN = 63
TILE = 16  # pixels a tile side: 4 × 4 patches of 4
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
# (width, height): wide, tall, square, small, a pinpoint exactly
SIZES = [(40, 18), (12, 30), (24, 24), (9, 7), (32, 16)]


def tiny_llava_next() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=TILE,
            patch_size=4,
            initializer_range=0.25,  # peaked attention: a wrong tile or position shows
        ).to_dict(),
        text_config=tiny_llama(),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=PINPOINTS,
        image_seq_length=16,
    )
    return with_random_vectors(LlavaNextForConditionalGeneration(config))


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory) -> Path:
    return saved(tiny_llava_next(), tmp_path_factory, "llava_next")


@pytest.fixture(scope="module")
def imported(llava_next_dir, tmp_path_factory) -> Path:
    return imported_into(llava_next_dir, tmp_path_factory, "LlavaNextForConditionalGeneration")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(path)
    return path


def noise_png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def samples(num_images: int, seed: int) -> list[dict]:
    """Three documents, each image of another size; the second opens with an image."""
    docs = []
    for index in range(3):
        sizes = [SIZES[(index + k) % len(SIZES)] for k in range(num_images)]
        text = " ".join(["<image> red green"] * num_images) + " blue"
        if index == 1:
            text = text.replace("<image> red", "<image>", 1)
        blobs = [noise_png(size, seed * 10 + index * 3 + k) for k, size in enumerate(sizes)]
        docs.append({"text": text, "images": pack_blobs(blobs), "sizes": sizes})
    return docs


def transformers_inputs(doc, sizes, pad_id: int, image_token: int = IMAGE_TOKEN):
    """transformers' input ids (image positions as `image_token`) and its processor's
    pixel_values layout: every image's base, then its padded pinpoint's tiles, row-major."""
    ids = doc.input_ids.clone()
    ids[ids == pad_id] = image_token
    images, offset = [], 0
    for tiles in doc.image_tiles:
        rows, cols = (TILE, TILE) if tiles == (0, 0) else (tiles[0] * TILE, tiles[1] * TILE)
        images.append(doc.pixel_values[offset : offset + 3 * rows * cols].view(3, rows, cols))
        offset += 3 * rows * cols
    views = []
    for base, canvas, tiles in zip(images[::2], images[1::2], doc.image_tiles[1::2], strict=True):
        tile_views = canvas.view(3, tiles[0], TILE, tiles[1], TILE).permute(1, 3, 0, 2, 4)
        views.append(torch.cat([base[None], tile_views.reshape(-1, 3, TILE, TILE)]))
    pixel_values = torch.zeros(len(views), max(len(v) for v in views), 3, TILE, TILE)
    for index, image_views in enumerate(views):
        pixel_values[index, : len(image_views)] = normalize_pixels(image_views, "clip")
    image_sizes = torch.tensor([(height, width) for width, height in sizes])
    return ids[None], pixel_values, image_sizes


@pytest.mark.parametrize("num_images", [1, 3])
def test_llava_next_parity_packed_documents_match_transformers_alone(
    imported, llava_next_dir, tokenizer_dir, num_images
):
    reference = LlavaNextForConditionalGeneration.from_pretrained(llava_next_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.vision.tiling == "llava_next" and ours.image_newline is not None
    tokenizer = load_tokenizer(tokenizer_dir, ours.cfg)
    decoder = SampleDecoder(tokenizer, ours.cfg, max_tokens=4096)
    docs, alone = [], []
    with torch.no_grad():
        for index, sample in enumerate(samples(num_images, seed=num_images)):
            doc = decoder(sample, index)
            docs.append(doc)
            ids, pixels, sizes = transformers_inputs(doc, sample["sizes"], decoder.pad_id)
            alone.append(reference(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits[0])
        batch = collate(docs, image_attention="causal", attention_backend="sdpa")
        packed = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"LLaVA-NeXT parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_llava_next_round_trip_through_the_cli_gives_transformers_the_same_logits(
    llava_next_dir, tokenizer_dir, tmp_path
):
    assert main(["import-hf", str(llava_next_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = LlavaNextForConditionalGeneration.from_pretrained(llava_next_dir).eval()
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.image_grid_pinpoints == PINPOINTS
    assert torch.equal(again.model.image_newline, original.model.image_newline)
    ours = SplitVLM.from_pretrained(tmp_path / "ours")
    decoder = SampleDecoder(load_tokenizer(tokenizer_dir, ours.cfg), ours.cfg, max_tokens=4096)
    sample = samples(3, seed=5)[0]
    inputs = transformers_inputs(decoder(sample, 0), sample["sizes"], decoder.pad_id)
    with torch.no_grad():
        want = original(*inputs[:1], pixel_values=inputs[1], image_sizes=inputs[2]).logits
        got = again(*inputs[:1], pixel_values=inputs[1], image_sizes=inputs[2]).logits
    assert (want - got).abs().max() <= 1e-5


def test_llava_next_layout_is_transformers_best_resolution_resize_and_unpadding():
    from models.config import VisionConfig

    vision = VisionConfig(
        image_size=TILE, patch_size=4, tiling="llava_next", grid_pinpoints=PINPOINTS
    )
    side = TILE // 4
    for width, height in [*SIZES, (100, 37), (37, 100), (16, 16), (1, 50), (333, 111)]:
        tiles, resized, _, kept = vision.llava_next_layout(width, height)
        assert tiles == tuple(get_anyres_image_grid_shape((height, width), PINPOINTS, TILE))
        pinpoint = (tiles[0] * TILE, tiles[1] * TILE)
        image = np.zeros((height, width, 3))
        assert resized[::-1] == get_patch_output_size(image, pinpoint, "channels_last")
        features = torch.zeros(1, tiles[0] * side, tiles[1] * side)
        assert kept == tuple(unpad_image(features, (height, width)).shape[1:]), (width, height)


def test_decoded_views_are_llava_next_processors_up_to_the_resize_filter(tokenizer_dir):
    """The decoder's base and tiles are its image processor's (base first, then the padded
    pinpoint's tiles row-major, black padding around the centre): the same pixels but for the
    resampling filter (PIL's bicubic there, torch's antialiased bicubic here)."""
    from models.config import ModelConfig, VisionConfig

    cfg = ModelConfig(
        image_markers=False,
        image_attention="causal",
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        vision=VisionConfig(
            tower="clip",
            image_size=TILE,
            patch_size=4,
            tiling="llava_next",
            grid_pinpoints=PINPOINTS,
            normalization="clip",
        ),
    )
    decoder = SampleDecoder(load_tokenizer(tokenizer_dir, cfg), cfg, max_tokens=4096)
    processor = LlavaNextImageProcessor(
        image_grid_pinpoints=PINPOINTS,
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
    )
    for index, size in enumerate([(40, 18), (12, 30), (60, 60)]):
        blob = noise_png(size, index)
        doc = decoder({"text": "<image>", "images": pack_blobs([blob])}, 0)
        _, pixels, _ = transformers_inputs(doc, [size], decoder.pad_id)
        want = processor(images=[Image.open(io.BytesIO(blob))], return_tensors="pt")
        assert want["pixel_values"].shape == pixels.shape, size
        # Noise resampled by two bicubic filters: equal on average, a few levels apart.
        difference = (want["pixel_values"] - pixels).abs()
        assert difference.mean() < 0.1 and (difference < 1e-3).float().mean() > 0.1, size


def test_llava_next_preset_trains_on_native_images_and_exports_to_transformers(
    native_demo_data, tmp_path
):
    ours, hf, decoder = trained_and_exported(
        "yaml/llava_next.yaml", LlavaNextForConditionalGeneration, native_demo_data, tmp_path
    )
    sample = {"text": "a <image> b <image>", "images": pack_blobs([noise_png((40, 18), 1)] * 2)}
    doc = decoder(sample, 0)
    image_token = hf.config.image_token_index
    ids, pixels, sizes = transformers_inputs(doc, [(40, 18)] * 2, decoder.pad_id, image_token)
    with torch.no_grad():
        batch = collate([doc], image_attention="causal", attention_backend="sdpa")
        want = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        got = hf(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits[0]
    assert (want - got).abs().max() <= 1e-5
