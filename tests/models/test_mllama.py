"""LLaMA-3.2-Vision (docs/designs.md) against transformers' MllamaForConditionalGeneration: a
tiled ViT's tokens are a stream of keys that gated cross-attention layers among the language
model's layers attend to; each image stands in the sequence as one <|image|> token.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded."""

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_classic_designs import REPO, imported_into, read_metrics, saved, with_random_vectors
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from cluster.cli import main
from models.cross_attention import mllama_layout
from models.split_vlm import SplitVLM
from models.vision import PIXEL_NORMALIZATIONS, normalize_pixels
from trainer.config import load_config
from trainer.data.decode import Document
from trainer.data.packing import collate, layout_options

VOCAB, IMAGE = 60, 60  # the LM head's rows; <|image|> is the first of the 8 rows past them
SIZE, SLOTS = 16, 2  # one 16-pixel tile of two slots an image, 2 × 2 patches + CLS each
KEYS = 5


def tiny_mllama() -> MllamaForConditionalGeneration:
    torch.manual_seed(0)
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_global_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vision_output_dim=96,
            image_size=SIZE,
            patch_size=8,
            max_num_tiles=SLOTS,
            intermediate_layers_indices=[0, 1],
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        ),
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            cross_attention_layers=[1, 3],
            pad_token_id=0,
            rope_theta=5000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        image_token_index=IMAGE,
    )
    # Every 1-D weight moved off its init: the gates too, so the cross-attention blocks count.
    return with_random_vectors(MllamaForConditionalGeneration(config))


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory) -> Path:
    return saved(tiny_mllama(), tmp_path_factory, "mllama")


@pytest.fixture(scope="module")
def imported(mllama_dir, tmp_path_factory) -> Path:
    return imported_into(mllama_dir, tmp_path_factory, "MllamaForConditionalGeneration")


# Documents as runs of text ids and images: text before the first image (rows that see none),
# two consecutive images (seen together), no image at all, an image opening the document.
PIECES = [
    [[5, 9, 3, 7], "image", "image", [11, 4, 8, 2, 6], "image", [13, 1, 12]],
    [[21, 22, 23, 24, 25, 26]],
    ["image", [31, 32, 33, 34, 35, 36, 37]],
    [[41, 42, 43], "image", [44, 45, 46, 47]],
]


def as_ids(pieces, image: int = IMAGE) -> list[int]:
    return [i for piece in pieces for i in ([image] if piece == "image" else piece)]


def cross_document(ids, pixels: torch.Tensor, anchors, name: str = "d", targets=None):
    """A document of a cross-attention design: its images (uint8 (N, 3, H, W)) stand at the
    positions `anchors` (their one token each); every token a target unless `targets`."""
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.tensor([True] * len(ids) if targets is None else targets),
        segments=[("text", len(ids))],
        pixel_values=pixels,
        image_mask=torch.zeros(0, dtype=torch.bool),
        image_span_full=torch.zeros(0, dtype=torch.bool),
        image_grids=[(0, 0)] * len(pixels),
        image_anchors=list(anchors),
    )


def as_document(pieces, pixels: torch.Tensor, name: str, image: int = IMAGE) -> Document:
    ids = as_ids(pieces, image)
    anchors = [t for t, i in enumerate(ids) if i == image]
    return cross_document(ids, pixels, anchors, name, targets=[i != image for i in ids])


def transformers_inputs(pieces, pixels: torch.Tensor) -> dict:
    """One document alone as transformers' processor would give it: every image one tile of
    SLOTS (zero padding tiles), aspect ratio 1 × 1, and its cross-attention mask from the
    processor's own functions."""
    ids = as_ids(pieces)
    inputs = {"input_ids": torch.tensor([ids])}
    count = len(pixels)
    if not count:
        return inputs
    tiles = torch.zeros(1, count, SLOTS, 3, SIZE, SIZE)
    tiles[0, :, 0] = normalize_pixels(pixels, "clip")
    sparse = get_cross_attention_token_mask(ids, IMAGE)
    dense = convert_sparse_cross_attention_mask_to_dense([sparse], [[1] * count], SLOTS, len(ids))
    aspect_mask = torch.zeros(1, count, SLOTS, dtype=torch.long)
    aspect_mask[..., 0] = 1
    return inputs | {
        "pixel_values": tiles,
        "aspect_ratio_ids": torch.ones(1, count, dtype=torch.long),
        "aspect_ratio_mask": aspect_mask,
        "cross_attention_mask": torch.from_numpy(dense),
    }


def documents(seed: int, pieces_of_each=PIECES) -> tuple[list, list[torch.Tensor]]:
    """The documents' pieces and each one's random uint8 images (SIZE square)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = [
        torch.randint(0, 256, (pieces.count("image"), 3, SIZE, SIZE), generator=generator).to(
            torch.uint8
        )
        for pieces in pieces_of_each
    ]
    return pieces_of_each, pixels


def packed_logits(ours: SplitVLM, docs: list[Document]) -> torch.Tensor:
    batch = collate(docs, **layout_options(ours.cfg, "cpu"))
    with torch.no_grad():
        return ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))


def test_mllama_layout_follows_transformers_processor_and_its_blind_rows():
    """Our visibility against the processor's mask: a row sees its image's own tile (and the
    images before it, consecutive ones together); a row before the first image sees none of
    them as an image but attends to every key of its document, padding tiles included."""
    docs = [(len(as_ids(p)), [t for t, i in enumerate(as_ids(p)) if i == IMAGE]) for p in PIECES]
    layout, order = mllama_layout(docs, KEYS, SLOTS)
    start, end, sees = layout.key_start.tolist(), layout.key_end.tolist(), layout.sees_image
    query = key = image = 0
    for pieces, (length, anchors) in zip(PIECES, docs, strict=True):
        ids = as_ids(pieces)
        dense = np.zeros((length, 0, SLOTS))
        if anchors:
            sparse = get_cross_attention_token_mask(ids, IMAGE)
            dense = convert_sparse_cross_attention_mask_to_dense(
                [sparse], [[1] * len(anchors)], SLOTS, length
            )[0]
        for t in range(length):
            visible = [i for i in range(dense.shape[1]) if dense[t, i, 0]]
            assert bool(sees[query + t]) == bool(visible)
            if visible:  # own tiles, image after image, at the start of the document's keys
                assert (start[query + t], end[query + t]) == (
                    key + visible[0] * KEYS,
                    key + (visible[-1] + 1) * KEYS,
                )
            elif anchors:  # blind: everything of the document
                assert (start[query + t], end[query + t]) == (
                    key,
                    key + len(anchors) * SLOTS * KEYS,
                )
            else:
                assert start[query + t] == end[query + t]
        # The stream: the document's own tiles, then its padding tiles (rows of the tower output).
        rows = order[key : key + len(anchors) * SLOTS * KEYS].tolist()
        own = [(image + i) * SLOTS * KEYS + k for i in range(len(anchors)) for k in range(KEYS)]
        assert rows[: len(own)] == own
        assert sorted(rows) == list(
            range(image * SLOTS * KEYS, (image + len(anchors)) * SLOTS * KEYS)
        )
        query, key, image = query + length, key + len(anchors) * SLOTS * KEYS, image + len(anchors)


def test_mllama_parity_packed_documents_match_transformers_alone(imported, mllama_dir):
    reference = MllamaForConditionalGeneration.from_pretrained(mllama_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.cross_attention_layers == [1, 3] and ours.cfg.lm_head_rows == VOCAB
    pieces, pixels = documents(seed=3)
    docs = [as_document(p, x, str(i)) for i, (p, x) in enumerate(zip(pieces, pixels, strict=True))]
    with torch.no_grad():
        alone = [
            reference(**transformers_inputs(p, x)).logits[0]
            for p, x in zip(pieces, pixels, strict=True)
        ]
    worst = (packed_logits(ours, docs) - torch.cat(alone)).abs().max().item()
    print(f"LLaMA-3.2-Vision parity: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_mllama_round_trip_through_the_cli_gives_transformers_the_same_logits(mllama_dir, tmp_path):
    assert main(["import-hf", str(mllama_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = MllamaForConditionalGeneration.from_pretrained(mllama_dir).eval()
    again = MllamaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.text_config.cross_attention_layers == [1, 3]
    assert again.config.image_token_index == IMAGE
    pieces, pixels = documents(seed=4)
    inputs = transformers_inputs(pieces[0], pixels[0])
    with torch.no_grad():
        assert (original(**inputs).logits - again(**inputs).logits).abs().max() <= 1e-5


def preset_model(tiny_overrides) -> SplitVLM:
    cfg = load_config(REPO / "yaml/mllama.yaml", tiny_overrides)
    cfg.model.vocab_size = 64
    return SplitVLM(cfg.model).eval()


def test_new_cross_attention_blocks_start_as_the_identity(tiny_overrides):
    """tanh gates at 0: a freshly built model's text logits do not depend on its images, and
    equal the same model's with its cross-attention blocks skipped (no images at all)."""
    model = preset_model(tiny_overrides)
    size = model.cfg.vision.image_size
    ids = [5, 9, model.cfg.vocab_size - 1, 3, 7, 2]
    logits = []
    for seed in (0, 1):
        pixels = torch.randint(
            0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(seed)
        )
        doc = cross_document(ids, pixels.to(torch.uint8), [2])
        logits.append(packed_logits(model, [doc]))
    blind = cross_document(ids, torch.zeros(0, 3, size, size, dtype=torch.uint8), [])
    assert torch.equal(logits[0], logits[1])
    assert (logits[0] - packed_logits(model, [blind])).abs().max() <= 1e-6
    with torch.no_grad():  # the gates open: the images count
        for block in model.core:
            if hasattr(block, "attn_gate"):
                block.attn_gate.fill_(1.0)
    doc.pixel_values = doc.pixel_values.flip(0) * 0 + 255 - doc.pixel_values
    assert (packed_logits(model, [doc]) - logits[1]).abs().max() > 1e-3


def test_a_micro_batch_without_images_gives_the_image_path_zero_gradients_when_sharded(
    tiny_overrides,
):
    """Under a sharded engine (`run_every_branch`) a rank without images still runs the tower,
    projector and cross-attention on a blank image no token sees: the same loss as without
    it, and every trained parameter of that path an exact zero gradient (not none)."""
    model = preset_model(tiny_overrides).train()
    ids = [5, 9, 3, 7, 2]
    doc = Document(
        sample_id="t",
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=[("text", len(ids))],
        pixel_values=torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
        image_mask=torch.zeros(0, dtype=torch.bool),
        image_span_full=torch.zeros(0, dtype=torch.bool),
    )
    batch = collate([doc], **layout_options(model.cfg, "cpu"))
    assert batch.cross_layout is None
    plain = model(batch)["text_loss_sum"]
    model.run_every_branch = True
    every = model(batch)["text_loss_sum"]
    every.backward()
    assert torch.equal(plain, every)
    path = [(n, p) for n, p in model.named_parameters() if n.startswith(("adaptor.", "core.1."))]
    assert path and all(p.grad is not None for _, p in path)
    assert all(not p.grad.any() for _, p in path)


def test_mllama_preset_trains_with_a_falling_text_loss_and_exports_to_transformers(
    tiny_overrides, native_demo_data, tmp_path
):
    """The stage of the preset: only the projector and the cross-attention blocks train (from
    gates at 0), on images of several aspect ratios (tiled into one or two tiles), and the run
    exports as a transformers LLaMA-3.2-Vision with our logits."""
    from trainer.export import export_to_hf
    from trainer.inference import load_for_inference
    from trainer.loop import train

    overrides = [*tiny_overrides, f"data.path={native_demo_data}", "run.steps=30"]
    cfg = load_config(REPO / "yaml/mllama.yaml", [*overrides, "optim.warmup_steps=4"])
    train(cfg)
    text = [m["text_loss"] for m in read_metrics(Path(cfg.run.dir))]
    assert len(text) == 30 and all(math.isfinite(v) for v in text)
    assert np.mean(text[-5:]) < 0.95 * np.mean(text[:5]), text

    assert export_to_hf(Path(cfg.run.dir), tmp_path / "hf") == "MllamaForConditionalGeneration"
    hf = MllamaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours, _, decoder = load_for_inference(Path(cfg.run.dir))
    image_id = decoder.tokenizer.convert_tokens_to_ids("<|image|>")
    assert hf.config.image_token_index == image_id
    assert any(float(b.attn_gate.detach()) != 0.0 for b in ours.core if hasattr(b, "attn_gate"))
    size = ours.cfg.vision.image_size
    pixels = torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(0))
    ids = [2, 5, image_id, 9, 11, 12, 3]
    doc = cross_document(ids, pixels.to(torch.uint8), [2], "probe")
    slots = ours.cfg.vision.max_num_tiles
    tiles = torch.zeros(1, 1, slots, 3, size, size)
    tiles[0, 0, 0] = normalize_pixels(pixels[0], "clip")
    mask = torch.zeros(1, len(ids), 1, slots, dtype=torch.long)
    mask[0, 2:, 0, 0] = 1
    with torch.no_grad():
        got = hf(
            input_ids=torch.tensor([ids]),
            pixel_values=tiles,
            aspect_ratio_ids=torch.ones(1, 1, dtype=torch.long),
            aspect_ratio_mask=torch.tensor([[[1] + [0] * (slots - 1)]]),
            cross_attention_mask=mask,
        ).logits[0]
    want = packed_logits(ours, [doc])
    assert (want[:, : got.shape[1]] - got).abs().max() <= 1e-5


# -- tiled images (model.vision.tiling: mllama) -------------------------------------------------


def test_mllama_canvas_is_its_image_processors():
    """`VisionConfig.mllama_canvas` picks the canvas and the size inside it that transformers'
    image processor does (get_optimal_tiled_canvas, get_image_size_fit_to_canvas)."""
    from transformers.models.mllama.image_processing_mllama import (
        get_image_size_fit_to_canvas,
        get_optimal_tiled_canvas,
    )

    from models.config import VisionConfig

    rng = np.random.default_rng(0)
    for slots in (1, 2, 4, 6):
        vision = VisionConfig(tower="mllama", image_size=16, patch_size=8, max_num_tiles=slots)
        for width, height in [*rng.integers(1, 400, (200, 2)).tolist(), (16, 16), (5, 80)]:
            canvas = get_optimal_tiled_canvas(height, width, slots, 16)
            fit = get_image_size_fit_to_canvas(height, width, *canvas, 16)
            (rows, cols), (w, h) = vision.mllama_canvas(width, height)
            assert (rows * 16, cols * 16, h, w) == (*canvas, *fit), (slots, width, height)


def tiled_cfg():
    from models.config import ModelConfig, VisionConfig

    return ModelConfig(
        num_text_in_blocks=0,
        num_image_in_blocks=0,
        num_text_head_blocks=0,
        num_image_head_blocks=0,
        num_core_blocks=2,
        cross_attention_layers=[1],
        image_markers="start",
        image_start_token="<|image|>",
        image_target="none",
        image_attention="causal",
        adaptor="linear",
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        vision=VisionConfig(
            tower="mllama",
            image_size=SIZE,
            patch_size=8,
            max_num_tiles=4,
            tiling="mllama",
            normalization="clip",
        ),
    )


def test_decoder_tiles_images_as_its_image_processor_does(tmp_path):
    """A decoded image is its processor's tiles (row-major), in one row of tile slots, with
    its aspect-ratio arrangement; images that need no resize give its pixels exactly, the
    canvas padding included."""
    from PIL import Image
    from transformers import MllamaImageProcessor
    from transformers.models.mllama.image_processing_mllama import convert_aspect_ratios_to_ids

    from trainer.data.decode import SampleDecoder, load_tokenizer
    from trainer.data.demo import save_tokenizer
    from trainer.data.shards import pack_blobs

    cfg = tiled_cfg()
    save_tokenizer(tmp_path / "tokenizer")
    decoder = SampleDecoder(load_tokenizer(tmp_path / "tokenizer", cfg), cfg, max_tokens=512)
    mean, std = PIXEL_NORMALIZATIONS["clip"]  # Meta's checkpoints' (the class default is 0.5)
    processor = MllamaImageProcessor(
        size={"height": SIZE, "width": SIZE}, max_image_tiles=4, image_mean=mean, image_std=std
    )
    rng = np.random.default_rng(1)
    for width, height in [(24, 16), (16, 40), (32, 32), (16, 16), (48, 16)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        doc = decoder({"text": "a <image> b", "images": pack_blobs([buffer.getvalue()])}, 0)
        want = processor(images=[[Image.fromarray(pixels)]], return_tensors="pt")
        rows, cols = doc.image_tiles[0]
        assert want["num_tiles"] == [[rows * cols]]
        assert doc.pixel_values.shape == (1, 3, SIZE, 4 * SIZE)
        ours = normalize_pixels(doc.pixel_values, "clip")[0].view(3, SIZE, 4, SIZE)
        ours = ours.permute(2, 0, 1, 3)[: rows * cols]
        assert (ours - want["pixel_values"][0, 0, : rows * cols]).abs().max() < 1e-5
        assert doc.image_anchors == [doc.input_ids.tolist().index(decoder.image_start_id)]
    for width, height in [(50, 30), (200, 90), (9, 70), (300, 300)]:  # resized: its tiling
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        doc = decoder({"text": "a <image> b", "images": pack_blobs([buffer.getvalue()])}, 0)
        want = processor(images=[[image]], return_tensors="pt")
        assert convert_aspect_ratios_to_ids([doc.image_tiles], 4) == want["aspect_ratio_ids"]


def tiled_documents(seed: int):
    """PIECES' images as tiled ones: each a row of 4 tile slots of which the first
    rows × cols are its own, the arrangements of one, two and four tiles."""
    generator = torch.Generator().manual_seed(seed)
    arrangements = iter([(1, 2), (2, 2), (1, 1), (2, 1), (1, 3)])
    docs = []
    for pieces in PIECES:
        count = pieces.count("image")
        pixels = torch.randint(0, 256, (count, 3, SIZE, 4 * SIZE), generator=generator)
        tiles = [next(arrangements) for _ in range(count)]
        docs.append((pieces, pixels.to(torch.uint8), tiles))
    return docs


def tiled_transformers_inputs(pieces, pixels, tiles) -> dict:
    """One document of tiled images as transformers' processor gives it: each image's own
    tiles normalized, the rest of its slots zero, its aspect-ratio id and mask, the
    processor's cross-attention mask over the own tiles."""
    from transformers.models.mllama.image_processing_mllama import (
        build_aspect_ratio_mask,
        convert_aspect_ratios_to_ids,
    )

    ids = as_ids(pieces)
    inputs = {"input_ids": torch.tensor([ids])}
    if not len(pixels):
        return inputs
    slots = normalize_pixels(pixels, "clip").view(len(pixels), 3, SIZE, 4, SIZE)
    slots = slots.permute(0, 3, 1, 2, 4).clone()
    for image, (rows, cols) in enumerate(tiles):
        slots[image, rows * cols :] = 0
    counts = [rows * cols for rows, cols in tiles]
    sparse = get_cross_attention_token_mask(ids, IMAGE)
    dense = convert_sparse_cross_attention_mask_to_dense([sparse], [counts], 4, len(ids))
    return inputs | {
        "pixel_values": slots[None],
        "aspect_ratio_ids": torch.from_numpy(convert_aspect_ratios_to_ids([tiles], 4)),
        "aspect_ratio_mask": torch.from_numpy(build_aspect_ratio_mask([tiles], 4)),
        "cross_attention_mask": torch.from_numpy(dense),
    }


def test_mllama_tiled_images_packed_match_transformers_alone(tmp_path):
    """Images of one, two, three and four tiles: several documents packed give each one's
    logits in transformers alone (the tower's aspect-ratio embeddings and each image's own
    tiles as its keys). The check can fail: every image read as one tile moves them."""
    config = tiny_mllama().config
    config.vision_config.max_num_tiles = 4
    config.vision_config.supported_aspect_ratios = [
        [r, c] for r in range(1, 5) for c in range(1, 5) if r * c <= 4
    ]
    torch.manual_seed(1)
    reference = with_random_vectors(MllamaForConditionalGeneration(config))
    reference.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours = SplitVLM.from_pretrained(tmp_path / "ours").eval()
    ours.cfg.vision.tiling = "mllama"
    docs, alone = [], []
    for index, (pieces, pixels, tiles) in enumerate(tiled_documents(seed=6)):
        doc = as_document(pieces, pixels, str(index))
        doc.image_tiles = tiles
        docs.append(doc)
        with torch.no_grad():
            inputs = tiled_transformers_inputs(pieces, pixels, tiles)
            alone.append(reference(**inputs).logits[0])
    worst = (packed_logits(ours, docs) - torch.cat(alone)).abs().max().item()
    print(f"LLaMA-3.2-Vision tiled parity: max |diff| {worst:.2e}")
    assert worst <= 1e-4
    for doc in docs:  # each image its first tile alone
        doc.image_tiles = [(1, 1)] * len(doc.image_tiles)
    assert (packed_logits(ours, docs) - torch.cat(alone)).abs().max() > 1e-3
