"""Idefics3 (docs/designs.md) against transformers' Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration (the same design under other names): its SigLIP
over square tiles plus a global view of each image, the pixel shuffle into one bias-free
linear, Llama.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded. An image is
split into tiles as Idefics3's processor splits it (`model.vision.tiling: idefics3`); every tile
and the global view are images of the sequence, with the processor's text around each."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_classic_designs import imported_into, png, saved, tiny_llama, with_random_vectors
from test_pixtral import _merged, trained_and_exported
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.processing_idefics3 import get_image_prompt_string
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

from cluster.cli import main
from models.config import VisionConfig
from models.split_vlm import SplitVLM
from trainer.data.decode import Document, SampleDecoder, load_tokenizer
from trainer.data.demo import save_tokenizer
from trainer.data.packing import collate
from trainer.data.shards import pack_blobs

VOCAB = 64
IMAGE_TOKEN = 63
TILE = 16  # pixels a tile side: 4 × 4 patches of 4, shuffled 2 × 2 into 2 × 2 image tokens
TOKENS_PER_TILE = 4
# Test ids of the processor's text: <fake_token_around_image>, <global-img>, "\n", "\n\n" and
# <row_r_col_c> for up to 2 × 2 tiles.
AROUND, GLOBAL, NEWLINE, BLANK_LINE = 62, 61, 60, 59
ROW_COL = {(r, c): 50 + 2 * r + c for r in range(2) for c in range(2)}


# Idefics3's design under its two transformers classes: (config, vision config, model).
CLASSES = {
    "idefics3": (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration),
}


def tiny_idefics3(model_type: str = "idefics3"):
    config_class, vision_class, model_class = CLASSES[model_type]
    torch.manual_seed(0)
    config = config_class(
        vision_config=vision_class(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TILE,
            patch_size=4,
            initializer_range=0.25,  # peaked attention: a wrong position or tile shows
        ).to_dict(),
        text_config=tiny_llama().to_dict(),
        scale_factor=2,
        image_token_id=IMAGE_TOKEN,
    )
    return with_random_vectors(model_class(config))


@pytest.fixture(scope="module", params=list(CLASSES))
def model_type(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def idefics3_dir(model_type, tmp_path_factory) -> Path:
    return saved(tiny_idefics3(model_type), tmp_path_factory, model_type)


@pytest.fixture(scope="module")
def imported(model_type, idefics3_dir, tmp_path_factory) -> Path:
    return imported_into(idefics3_dir, tmp_path_factory, CLASSES[model_type][2].__name__)


def image_ids(tiles: tuple[int, int], image_id: int) -> list[int]:
    """The processor's prompt of one image of rows × cols tiles ((0, 0): one tile), in the
    test's ids."""
    rows, cols = tiles
    ids = []
    for row in range(rows):
        for col in range(cols):
            ids += [AROUND, ROW_COL[row, col]] + [image_id] * TOKENS_PER_TILE
        ids.append(NEWLINE)
    if rows:
        ids[-1] = BLANK_LINE  # the last row's newline and the blank line before the global view
    return ids + [AROUND, GLOBAL] + [image_id] * TOKENS_PER_TILE + [AROUND]


def samples(num_images: int, seed: int):
    """Three documents of (text, tiles) pieces ending in text; the second opens with an image;
    images of 2 × 2, 1 × 2, 2 × 1 tiles and single ones."""
    generator = torch.Generator().manual_seed(seed)
    layouts = [(2, 2), (0, 0), (1, 2), (2, 1)]
    docs = []
    for index, length in enumerate((5, 3, 7)):
        pieces = []
        for image in range(num_images):
            count = 0 if (index == 1 and image == 0) else length + image
            text = torch.randint(4, 48, (count,), generator=generator).tolist()
            pieces.append((text, layouts[(index + image) % len(layouts)]))
        pieces.append((torch.randint(4, 48, (length + 2,), generator=generator).tolist(), None))
        docs.append(pieces)
    return docs


def views_of(pieces, seed: int) -> torch.Tensor:
    """(views, 3, TILE, TILE): each image's tiles, then its global view."""
    generator = torch.Generator().manual_seed(seed)
    count = sum(rows * cols + 1 for _, tiles in pieces if tiles for rows, cols in [tiles])
    return torch.randn(count, 3, TILE, TILE, generator=generator)


def as_document(pieces, views: torch.Tensor, name: str) -> Document:
    """Our document: every tile and global view an image span (pad ids), the processor's text
    tokens between them (the decoder's layout, tested below)."""
    ids, segments = [], []
    for text, tiles in pieces:
        ids += text
        segments.append(("text", len(text)))
        if tiles is None:
            continue
        for token in image_ids(tiles, 0):
            if token == 0 and segments[-1][0] == "image":
                segments[-1] = ("image", segments[-1][1] + 1)
            else:
                segments.append(("image", 1) if token == 0 else ("text", 1))
            ids.append(token)
    segments = [piece for piece in _merged(segments) if piece[1]]
    num_image_tokens = TOKENS_PER_TILE * views.shape[0]
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=segments,
        pixel_values=views,
        image_mask=torch.zeros(num_image_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_image_tokens, dtype=torch.bool),
    )


def transformers_logits(model, pieces, views: torch.Tensor) -> torch.Tensor:
    ids = []
    for text, tiles in pieces:
        ids += text + (image_ids(tiles, IMAGE_TOKEN) if tiles else [])
    return model(input_ids=torch.tensor([ids]), pixel_values=views[None]).logits[0]


@pytest.mark.parametrize("num_images", [1, 3])
def test_idefics3_parity_packed_documents_match_transformers_alone(
    model_type, imported, idefics3_dir, num_images
):
    reference = CLASSES[model_type][2].from_pretrained(idefics3_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.vision.tiling == "idefics3" and ours.cfg.adaptor == "pixel_shuffle"
    docs, alone = [], []
    with torch.no_grad():
        for index, pieces in enumerate(samples(num_images, seed=num_images)):
            views = views_of(pieces, seed=index)
            docs.append(as_document(pieces, views, f"doc{index}"))
            alone.append(transformers_logits(reference, pieces, views))
        batch = collate(docs, image_attention="causal", attention_backend="sdpa")
        packed = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"{model_type} parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_idefics3_round_trip_through_the_cli_gives_transformers_the_same_logits(
    model_type, idefics3_dir, tmp_path
):
    """Each class comes back as itself (a SmolVLM as a SmolVLM, not an Idefics3)."""
    model_class = CLASSES[model_type][2]
    assert main(["import-hf", str(idefics3_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == model_type
    original = model_class.from_pretrained(idefics3_dir).eval()
    again = model_class.from_pretrained(tmp_path / "hf").eval()
    assert again.config.scale_factor == 2 and again.config.image_token_id == IMAGE_TOKEN
    pieces = samples(3, seed=5)[0]
    views = views_of(pieces, seed=5)
    with torch.no_grad():
        want = transformers_logits(original, pieces, views)
        got = transformers_logits(again, pieces, views)
    assert (want - got).abs().max() <= 1e-5


def test_idefics3_tiles_follow_its_image_processor():
    """`tile_grid` splits an image into the tiles Idefics3's image processor cuts it into."""
    processor = Idefics3ImageProcessor(
        size={"longest_edge": 4 * TILE}, max_image_size={"longest_edge": TILE}
    )
    vision = VisionConfig(image_size=TILE, patch_size=4, tiling="idefics3")
    for width, height in [(64, 48), (30, 200), (16, 16), (65, 9), (7, 7), (100, 37), (19, 65)]:
        image = np.zeros((height, width, 3), dtype=np.uint8)
        out = processor(images=[image], return_row_col_info=True, return_tensors="np")
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        assert vision.tile_grid(width, height) == (rows, cols), (width, height)
        assert out["pixel_values"].shape[1] == rows * cols + 1


def test_decoder_lays_out_tiles_as_idefics3s_processor_does(tmp_path):
    """A decoded image is its tiles, then its global view, each a span of the pad id, with the
    processor's prompt around them (`get_image_prompt_string`), the <row_r_col_c> of each tile
    in the tokenizer."""
    from models.config import ModelConfig

    cfg = ModelConfig(
        image_markers=False,
        image_attention="causal",
        adaptor="pixel_shuffle",
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        vision=VisionConfig(
            tower="idefics3", image_size=TILE, patch_size=4, spatial_merge=2, tiling="idefics3"
        ),
    )
    save_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer", cfg)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<image>"]}, replace_additional_special_tokens=False
    )
    decoder = SampleDecoder(tokenizer, cfg, max_tokens=512)
    sample = {"text": "a <image> b", "images": pack_blobs([png(40)])}  # 40 × 40: 4 × 4 tiles
    doc = decoder(sample, 0)
    rows, cols = cfg.vision.tile_grid(40, 40)
    assert (rows, cols) == (4, 4)
    assert doc.pixel_values.shape == (rows * cols + 1, 3, TILE, TILE)
    assert doc.image_grids == [(2, 2)] * (rows * cols + 1)

    ids = doc.input_ids.tolist()
    around = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    first, last = ids.index(around), len(ids) - 1 - ids[::-1].index(around)
    expansion = ids[first : last + 1]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expansion = [image_id if token == tokenizer.pad_token_id else token for token in expansion]
    prompt = get_image_prompt_string(
        rows, cols, TOKENS_PER_TILE, "<fake_token_around_image>", "<image>", "<global-img>"
    )
    assert expansion == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_idefics3_preset_trains_on_native_images_and_exports_to_transformers(
    native_demo_data, tmp_path
):
    ours, hf, decoder = trained_and_exported(
        "yaml/idefics3.yaml", Idefics3ForConditionalGeneration, native_demo_data, tmp_path
    )
    sample = {"text": "a <image> b", "images": pack_blobs([png(40)])}
    doc = decoder(sample, 0)
    views = doc.pixel_values.float() / 127.5 - 1.0  # the preset's (SigLIP) normalization
    doc.pixel_values = views
    ids = doc.input_ids.clone()
    ids[ids == decoder.pad_id] = hf.config.image_token_id
    with torch.no_grad():
        batch = collate([doc], image_attention="causal", attention_backend="sdpa")
        want = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        got = hf(input_ids=ids[None], pixel_values=views[None]).logits[0]
    assert (want - got).abs().max() <= 1e-5


def test_tiling_is_one_clear_error_with_images_at_their_own_size():
    vision = VisionConfig(image_size=TILE, patch_size=4, tiling="idefics3", resize="longest_side")
    with pytest.raises(ValueError, match=r"tiling splits images into square tiles"):
        vision.validate()
    with pytest.raises(ValueError, match=r"tiling='tiles'; valid: none, idefics3"):
        VisionConfig(tiling="tiles").validate()
