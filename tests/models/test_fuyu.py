"""Fuyu (docs/designs.md) against transformers' FuyuForCausalLM: no vision encoder, each patch's
pixels embedded by one linear layer, a |NEWLINE| token after every row of patches, causal
attention over everything, Persimmon.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded. transformers
gets its image patches from Fuyu's own image processor (`patchify_image`), so our patch order
is checked against it, not against itself."""

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_classic_designs import imported_into, saved, with_random_vectors
from test_pixtral import _merged, packed_logits, pixels_of, samples, trained_and_exported
from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessor, PersimmonConfig

from cluster.cli import main
from models.config import ModelConfig, VisionConfig
from models.vision import RawPatches
from trainer.data.decode import DecodeError, Document, SampleDecoder, load_tokenizer
from trainer.data.shards import pack_blobs

VOCAB = 64
IMAGE_TOKEN, NEWLINE = 63, 62  # |SPEAKER| (transformers' image_token_id) and |NEWLINE|
PATCH = 4


def tiny_fuyu() -> FuyuForCausalLM:
    """A random Fuyu: 4-pixel patches embedded by a linear with a bias, a Persimmon with
    q/k LayerNorms and RoPE on half of each head. Every 1-D parameter (norms, biases) is moved
    off its init."""
    torch.manual_seed(0)
    text = PersimmonConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        rope_theta=5000.0,
        partial_rotary_factor=0.5,
        qk_layernorm=True,
        initializer_range=0.25,  # peaked attention: a wrong position or mask shows
    )
    config = FuyuConfig(
        text_config=text.to_dict(),
        vocab_size=VOCAB,
        hidden_size=32,
        patch_size=PATCH,
        image_token_id=IMAGE_TOKEN,
    )
    return with_random_vectors(FuyuForCausalLM(config))


@pytest.fixture(scope="module")
def fuyu_dir(tmp_path_factory) -> Path:
    return saved(tiny_fuyu(), tmp_path_factory, "fuyu")


@pytest.fixture(scope="module")
def imported(fuyu_dir, tmp_path_factory) -> Path:
    return imported_into(fuyu_dir, tmp_path_factory, "FuyuForCausalLM")


def image_ids(size, image_id: int, newline: int, patch=PATCH) -> list[int]:
    """One image's tokens: rows of `image_id`, each followed by `newline`."""
    rows, cols = size[0] // patch, size[1] // patch
    return ([image_id] * cols + [newline]) * rows


def as_document(pieces, images, name: str, newline=NEWLINE, patch=PATCH) -> Document:
    """Our document: text, then each image's span (pad ids at patches, a newline ending every
    row, inside the span); native pixels flattened, image after image."""
    ids, segments, grids = [], [], []
    for text, size in pieces:
        if text:
            ids += text
            segments.append(("text", len(text)))
        if size is None:
            continue
        span = image_ids(size, 0, newline, patch)
        ids += span
        segments.append(("image", len(span)))
        grids.append((size[0] // patch, size[1] // patch))
    num_patches = sum(rows * cols for rows, cols in grids)
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=_merged(segments),
        pixel_values=torch.cat([image.flatten() for image in images]),
        image_mask=torch.zeros(num_patches, dtype=torch.bool),
        image_span_full=torch.zeros(num_patches, dtype=torch.bool),
        image_grids=grids,
        span_grids=grids,
        row_breaks="all",
    )


def transformers_logits(model, pieces, images, newline=NEWLINE, patch=PATCH):
    """transformers' logits of one document: its images' patches in the order of Fuyu's image
    processor, one list entry for the batch's one sequence."""
    image_token = model.config.image_token_id
    ids = []
    for text, size in pieces:
        ids += text + (image_ids(size, image_token, newline, patch) if size else [])
    processor = FuyuImageProcessor(patch_size={"height": patch, "width": patch})
    patches = torch.cat([processor.patchify_image(image[None]) for image in images], dim=1)
    return model(input_ids=torch.tensor([ids]), image_patches=[patches]).logits[0]


@pytest.mark.parametrize("num_images", [1, 3])
def test_fuyu_parity_packed_documents_match_transformers_alone(imported, fuyu_dir, num_images):
    reference = FuyuForCausalLM.from_pretrained(fuyu_dir).eval()
    from models.split_vlm import SplitVLM

    ours = SplitVLM.from_pretrained(imported).eval()
    assert isinstance(ours.vision, RawPatches) and ours.cfg.rope_fraction == 0.5
    assert ours.cfg.norm_style == "layernorm" and not ours.cfg.mlp_gated
    docs, alone = [], []
    with torch.no_grad():
        for index, pieces in enumerate(samples(num_images, seed=num_images)):
            images = pixels_of(pieces, seed=index)
            docs.append(as_document(pieces, images, f"doc{index}"))
            alone.append(transformers_logits(reference, pieces, images))
        packed = packed_logits(ours, docs)
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"Fuyu parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_fuyu_round_trip_through_the_cli_gives_transformers_the_same_logits(fuyu_dir, tmp_path):
    assert main(["import-hf", str(fuyu_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = FuyuForCausalLM.from_pretrained(fuyu_dir).eval()
    again = FuyuForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert again.config.text_config.partial_rotary_factor == 0.5
    assert again.config.image_token_id == IMAGE_TOKEN
    (pieces,) = samples(3, seed=5)[:1]
    images = pixels_of(pieces, seed=5)
    with torch.no_grad():
        want = transformers_logits(original, pieces, images)
        got = transformers_logits(again, pieces, images)
    assert (want - got).abs().max() <= 1e-5


def test_fuyu_preset_trains_on_native_images_and_exports_to_transformers(
    native_demo_data, tmp_path
):
    ours, hf, decoder = trained_and_exported(
        "yaml/fuyu.yaml", FuyuForCausalLM, native_demo_data, tmp_path
    )
    newline = decoder.tokenizer.get_vocab()[ours.cfg.image_row_break_token]
    token = ours.cfg.vision.patch_size
    pieces = [([2, 5, 9], (token, 2 * token)), ([11, 12], (3 * token, token)), ([3, 4], None)]
    images = pixels_of(pieces, seed=1)
    with torch.no_grad():
        want = packed_logits(ours, [as_document(pieces, images, "probe", newline, token)])
        got = transformers_logits(hf, pieces, images, newline, token)
    assert (want - got).abs().max() <= 1e-5


def test_the_decoder_ends_every_row_with_a_newline_and_counts_them(demo_data):
    """`model.image_row_break: all`: a break after every row, the last one too, inside the
    image's span; the length limit counts them."""
    cfg = ModelConfig(
        image_row_break="all",
        image_markers=False,
        vocab_size=VOCAB,
        vision=VisionConfig(tower="none", image_size=32, patch_size=8, resize="longest_side"),
    )
    tokenizer = load_tokenizer(demo_data / "tokenizer", cfg)
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 30)).save(buffer, format="PNG")
    sample = {"text": "<image> green", "images": pack_blobs([buffer.getvalue()])}
    doc = SampleDecoder(tokenizer, cfg, max_tokens=512)(sample, 0)
    newline = tokenizer.convert_tokens_to_ids(cfg.image_row_break_token)
    pad = tokenizer.pad_token_id or 0
    assert doc.image_grids == [(2, 3)]
    image_segment = next(n for kind, n in doc.segments if kind == "image")
    assert image_segment == 2 * 3 + 2
    ids = doc.input_ids.tolist()
    start = ids.index(pad)
    assert ids[start : start + 8] == [pad, pad, pad, newline] * 2
    length = doc.num_tokens
    SampleDecoder(tokenizer, cfg, max_tokens=length)(sample, 0)
    with pytest.raises(DecodeError, match="too_long|tokens >"):
        SampleDecoder(tokenizer, cfg, max_tokens=length - 1)(sample, 0)
