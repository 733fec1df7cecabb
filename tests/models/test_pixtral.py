"""Pixtral (docs/designs.md) against transformers' LlavaForConditionalGeneration with a Pixtral
vision tower (Pixtral-12B's format).

Each test builds and saves its own tiny random checkpoint; nothing is downloaded. Pixtral's
processor lays each image out at its own grid as rows of [IMG] tokens, [IMG_BREAK] after every
row but the last and [IMG_END] after the last; our documents are built the same way (row breaks
inside the span, the end marker after it) and packed."""

import math
from pathlib import Path
from statistics import mean

import pytest
import torch
from test_classic_designs import imported_into, read_metrics, saved, with_random_vectors
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
)

from cluster.cli import main
from models.config import ModelConfig, VisionConfig
from models.split_vlm import SplitVLM
from trainer.config import load_config
from trainer.data.decode import Document
from trainer.data.packing import collate
from trainer.export import export_to_hf

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64
IMAGE_TOKEN, IMAGE_BREAK, IMAGE_END = 63, 61, 62  # [IMG], [IMG_BREAK], [IMG_END]
PATCH = 4
# (height, width) in pixels, whole patches: wide, tall, square, the full 8-patch side
SIZES = [(12, 20), (32, 8), (16, 16), (8, 28)]


def tiny_vision() -> PixtralVisionConfig:
    """Pixtral's ViT, tiny: 2-D RoPE over up to 8 × 8 patches of 4 pixels."""
    return PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        head_dim=16,
        image_size=32,
        patch_size=PATCH,
        rope_theta=1000.0,
        initializer_range=0.25,  # peaked attention: a wrong position or mask shows
    )


def tiny_mistral() -> MistralConfig:
    return MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        sliding_window=None,
        initializer_range=0.25,
    )


def tiny_pixtral() -> LlavaForConditionalGeneration:
    """A random Pixtral: its ViT read at the last layer, a GELU projector, Mistral. Every 1-D
    parameter is moved off its init."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=tiny_vision().to_dict(),
        text_config=tiny_mistral(),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    return with_random_vectors(LlavaForConditionalGeneration(config))


@pytest.fixture(scope="module")
def pixtral_dir(tmp_path_factory) -> Path:
    return saved(tiny_pixtral(), tmp_path_factory, "pixtral")


@pytest.fixture(scope="module")
def imported(pixtral_dir, tmp_path_factory) -> Path:
    return imported_into(pixtral_dir, tmp_path_factory, "LlavaForConditionalGeneration")


def image_ids(size, image_id: int, patch=PATCH, marks=(IMAGE_BREAK, IMAGE_END)) -> list[int]:
    """One image's tokens: rows of `image_id`, a break after each row but the last, the end
    (`marks`: the break and end ids)."""
    rows, cols = size[0] // patch, size[1] // patch
    ids = ([image_id] * cols + [marks[0]]) * rows
    ids[-1] = marks[1]
    return ids


def samples(num_images: int, seed: int, sizes=SIZES):
    """Three documents of (text, image size) pieces ending in text; the second opens with an
    image; each its own images, of several `sizes`."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for index, length in enumerate((5, 3, 7)):
        pieces = []
        for image in range(num_images):
            count = 0 if (index == 1 and image == 0) else length + image
            text = torch.randint(4, 60, (count,), generator=generator).tolist()
            pieces.append((text, sizes[(index + image) % len(sizes)]))
        pieces.append((torch.randint(4, 60, (length + 2,), generator=generator).tolist(), None))
        docs.append(pieces)
    return docs


def pixels_of(pieces, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, *size, generator=generator) for _, size in pieces if size]


def as_document(pieces, images, name: str, patch=PATCH, marks=(IMAGE_BREAK, IMAGE_END)):
    """Our document: text, then each image's span (pad ids at patches, row breaks inside) with
    [IMG_END] opening the text after it; native pixels flattened, image after image."""
    ids, segments, grids = [], [], []
    for text, size in pieces:
        if text:
            ids += text
            segments.append(("text", len(text)))
        if size is None:
            continue
        span = image_ids(size, 0, patch, marks)
        ids += span
        segments.append(("image", len(span) - 1))
        grids.append((size[0] // patch, size[1] // patch))
        segments.append(("text", 1))  # [IMG_END]
    segments = _merged(segments)
    num_patches = sum(rows * cols for rows, cols in grids)
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=segments,
        pixel_values=torch.cat([image.flatten() for image in images]),
        image_mask=torch.zeros(num_patches, dtype=torch.bool),
        image_span_full=torch.zeros(num_patches, dtype=torch.bool),
        image_grids=grids,
        span_grids=grids,
        row_breaks=True,
    )


def _merged(segments):
    """Adjacent text segments as one, empty ones left out (the decoder's layout)."""
    out = []
    for kind, length in segments:
        if out and kind == "text" and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + length)
        elif length:
            out.append((kind, length))
    return out


def transformers_logits(model, pieces, images, patch=PATCH, marks=(IMAGE_BREAK, IMAGE_END)):
    """transformers' logits of one document: its images padded into one batch, with their
    sizes (what Pixtral's processor gives)."""
    image_token = model.config.image_token_index
    ids = []
    for text, size in pieces:
        ids += text + (image_ids(size, image_token, patch, marks) if size else [])
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = torch.zeros(len(images), 3, height, width)
    for index, image in enumerate(images):
        padded[index, :, : image.shape[1], : image.shape[2]] = image
    sizes = torch.tensor([image.shape[1:] for image in images])
    return model(input_ids=torch.tensor([ids]), pixel_values=padded, image_sizes=sizes).logits[0]


def packed_logits(model: SplitVLM, docs: list[Document]) -> torch.Tensor:
    batch = collate(docs, image_attention="causal", attention_backend="sdpa")
    return model.text_logits(batch, model.trunk(batch), torch.arange(batch.num_tokens))


@pytest.mark.parametrize("num_images", [1, 3])
def test_pixtral_parity_packed_documents_match_transformers_alone(
    imported, pixtral_dir, num_images
):
    reference = LlavaForConditionalGeneration.from_pretrained(pixtral_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.vision.resize == "longest_side" and ours.cfg.image_markers == "end"
    docs, alone = [], []
    with torch.no_grad():
        for index, pieces in enumerate(samples(num_images, seed=num_images)):
            images = pixels_of(pieces, seed=index)
            docs.append(as_document(pieces, images, f"doc{index}"))
            alone.append(transformers_logits(reference, pieces, images))
        packed = packed_logits(ours, docs)
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"Pixtral parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_pixtral_round_trip_through_the_cli_gives_transformers_the_same_logits(
    pixtral_dir, tmp_path
):
    assert main(["import-hf", str(pixtral_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = LlavaForConditionalGeneration.from_pretrained(pixtral_dir).eval()
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.vision_config.model_type == "pixtral"
    assert again.config.text_config.model_type == "mistral"
    (pieces,) = samples(3, seed=5)[:1]
    images = pixels_of(pieces, seed=5)
    with torch.no_grad():
        want = transformers_logits(original, pieces, images)
        got = transformers_logits(again, pieces, images)
    assert (want - got).abs().max() <= 1e-5


def test_pixtral_grids_follow_its_processor():
    """`resize: longest_side` gives the grid Pixtral's image processor resizes to."""
    from transformers.models.pixtral.image_processing_pixtral import get_resize_output_image_size

    vision = VisionConfig(image_size=64, patch_size=8, resize="longest_side")
    for width, height in [(640, 480), (30, 200), (64, 64), (65, 9), (7, 7), (100, 37), (19, 650)]:
        image = torch.zeros(height, width, 3).numpy()
        want = get_resize_output_image_size(
            image, size=(64, 64), patch_size=(8, 8), input_data_format="channels_last"
        )
        rows, cols = vision.grid(width, height)
        assert (rows * 8, cols * 8) == tuple(want), (width, height)
    # A side the scaling takes below one pixel: transformers' processor gives it no patch (an
    # empty image); ours keeps one.
    assert vision.grid(1000, 1) == (1, 8)


def test_a_too_large_image_for_the_position_grid_is_one_clear_error():
    cfg = ModelConfig(
        image_markers="end",
        image_row_break=True,
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        vocab_size=32,
        vision=VisionConfig(tower="pixtral", image_size=16, patch_size=4, resize="longest_side"),
    )
    model = SplitVLM(cfg)
    with pytest.raises(ValueError, match=r"larger than the Pixtral tower's 4x4 position grid"):
        model.image_inputs_and_targets(
            torch.randn(3 * 20 * 8), torch.zeros(10, dtype=torch.bool), [(5, 2)]
        )


def test_pixtral_preset_trains_on_native_images_and_exports_to_transformers(
    native_demo_data, tmp_path
):
    trains_and_exports(
        "yaml/pixtral.yaml", LlavaForConditionalGeneration, 8, native_demo_data, tmp_path
    )


def trains_and_exports(preset: str, hf_class, token: int, data: Path, tmp_path: Path) -> None:
    """`preset` on images of several aspect ratios (image tokens of `token` pixels): the text
    loss falls, and the run as a transformers `hf_class` gives our logits."""
    ours, hf, decoder = trained_and_exported(preset, hf_class, data, tmp_path)
    vocab = decoder.tokenizer.get_vocab()
    marks = vocab[ours.cfg.image_row_break_token], vocab[ours.cfg.image_end_token]
    pieces = [([2, 5, 9], (token, 2 * token)), ([11, 12], (3 * token, token)), ([3, 4], None)]
    images = pixels_of(pieces, seed=1)
    with torch.no_grad():
        want = packed_logits(ours, [as_document(pieces, images, "probe", token, marks)])
        got = transformers_logits(hf, pieces, images, token, marks)
    assert (want - got).abs().max() <= 1e-5


def trained_and_exported(preset: str, hf_class, data: Path, tmp_path: Path):
    """20 steps of `preset` on `data` with a falling text loss, exported with `--to-hf`: (our
    model, the transformers `hf_class` model, the run's decoder)."""
    from trainer.inference import load_for_inference
    from trainer.loop import train

    cfg = load_config(
        REPO / preset,
        [
            f"data.path={data}",
            f"run.dir={tmp_path / 'run'}",
            "run.steps=20",
            "optim.warmup_steps=4",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
        ],
    )
    train(cfg)
    text = [m["text_loss"] for m in read_metrics(Path(cfg.run.dir))]
    assert len(text) == 20 and all(math.isfinite(v) for v in text)
    assert mean(text[-5:]) < 0.9 * mean(text[:5]), text
    assert export_to_hf(Path(cfg.run.dir), tmp_path / "hf") == hf_class.__name__
    ours, _, decoder = load_for_inference(Path(cfg.run.dir))
    return ours, hf_class.from_pretrained(tmp_path / "hf").eval(), decoder


def test_an_import_decodes_with_the_checkpoints_own_break_and_end_tokens(pixtral_dir, tmp_path):
    """A Pixtral checkpoint's tokenizer has [IMG_BREAK] and [IMG_END], whose embedding rows it
    trained: the import names them (model.image_row_break_token, image_end_token), so decoding
    for a run from it uses those ids and adds no token of its own."""
    import io

    from PIL import Image
    from transformers import AutoTokenizer

    import yaml
    from cluster.cli import main as cli
    from models.config import model_config_from_dict
    from trainer.data.decode import SampleDecoder, load_tokenizer
    from trainer.data.demo import save_tokenizer
    from trainer.data.shards import pack_blobs

    checkpoint = tmp_path / "hf"
    tiny_pixtral().save_pretrained(checkpoint)
    save_tokenizer(tmp_path / "demo_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "demo_tokenizer"))
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]}
    )
    tokenizer.save_pretrained(checkpoint)
    assert cli(["import-hf", str(checkpoint), "--out", str(tmp_path / "ours")]) == 0

    cfg = model_config_from_dict(yaml.safe_load((tmp_path / "ours" / "config.yaml").read_text()))
    assert (cfg.image_row_break_token, cfg.image_end_token) == ("[IMG_BREAK]", "[IMG_END]")
    ours = load_tokenizer(tmp_path / "ours" / "tokenizer", cfg)
    assert len(ours) == len(tokenizer)  # nothing added
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 30)).save(buffer, format="PNG")
    sample = {"text": "<image> green", "images": pack_blobs([buffer.getvalue()])}
    doc = SampleDecoder(ours, cfg, max_tokens=512)(sample, 0)
    vocab = ours.get_vocab()
    ids = doc.input_ids.tolist()
    assert doc.image_grids == [(4, 6)]
    assert ids.count(vocab["[IMG_BREAK]"]) == 3 and ids.count(vocab["[IMG_END]"]) == 1
    end = ids.index(vocab["[IMG_END]"])
    assert ids[end - 6 : end] == [ours.pad_token_id or 0] * 6  # the last row, then the end
