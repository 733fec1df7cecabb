"""Images at their own size: the grid rule, the packed vision tower, leak-free masking on
non-square grids, and grids that agree between what the shards record and what decoding makes."""

import io
import random

import pytest
import torch
from PIL import Image
from test_split_vlm import all_outputs, perturb_patch
from transformers import Siglip2VisionConfig, SiglipVisionConfig

from models.config import ModelConfig, VisionConfig
from models.split_vlm import SplitVLM
from models.vision import PackedImages, PackedSiglip2VisionModel, PackedSiglipVisionModel
from trainer.data.decode import SampleDecoder, load_tokenizer
from trainer.data.packing import collate
from trainer.data.shards import pack_blobs

BUDGET = VisionConfig(image_size=32, patch_size=8)  # at most 32 × 32 pixels: 16 patches


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((32, 32), (4, 4)),  # square, exactly the budget
        ((64, 16), (2, 8)),  # wide, within the budget: kept
        ((24, 40), (5, 3)),  # tall, within
        ((640, 480), (3, 5)),  # a photo: scaled down into the budget, aspect ratio kept
        ((1000, 10), (1, 16)),  # extreme: one row, as many columns as the budget allows
    ],
)
def test_native_grids_follow_the_rule(size, grid):
    assert BUDGET.native_grid(*size) == grid


def test_native_grids_stay_in_the_budget_and_keep_the_aspect_ratio():
    rng = random.Random(0)
    budget = VisionConfig(image_size=32, patch_size=8, min_pixels=256, max_pixels=4096)
    for _ in range(2000):
        width, height = rng.randint(1, 3000), rng.randint(1, 3000)
        rows, cols = budget.native_grid(width, height)
        area = rows * cols * 64
        assert 1 <= rows and 1 <= cols and area <= 4096
        if 1 / 4 <= width / height <= 4:  # no side clamped to one patch
            assert area >= 256
            # each side within one patch of the exact scaled side
            scale = (min(max(width * height, 256), 4096) / (width * height)) ** 0.5
            assert abs(rows - height * scale / 8) <= 1 and abs(cols - width * scale / 8) <= 1
    # a tiny image is scaled up to the minimum
    assert budget.native_grid(4, 4) == (2, 2)


TOWER_SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _tower(name: str):
    """A tiny random tower whose position grid is 4 × 4 patches of 4 pixels."""
    if name == "siglip2":
        config = Siglip2VisionConfig(**TOWER_SIZE, num_patches=16, patch_size=4)
        return PackedSiglip2VisionModel(config).eval()
    config = SiglipVisionConfig(**TOWER_SIZE, image_size=16, patch_size=4)
    return PackedSiglipVisionModel(config).eval()


def _alone(name, tower, image):
    """transformers' own forward for one image at its size."""
    if name == "siglip":
        out = tower(pixel_values=image[None], interpolate_pos_encoding=True)
        return out.last_hidden_state[0]
    rows, cols = image.shape[1] // 4, image.shape[2] // 4
    patches = image.reshape(3, rows, 4, cols, 4).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)
    out = tower(
        pixel_values=patches[None],
        pixel_attention_mask=torch.ones(1, rows * cols, dtype=torch.long),
        spatial_shapes=torch.tensor([[rows, cols]]),
    )
    return out.last_hidden_state[0]


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_an_image_in_a_packed_tower_batch_encodes_as_it_does_alone(name):
    torch.manual_seed(0)
    tower = _tower(name)
    # a wide, a tall, the checkpoint's own grid and a larger one
    images = [torch.randn(3, 4 * rows, 4 * cols) for rows, cols in [(2, 5), (3, 2), (4, 4), (6, 5)]]
    with torch.no_grad():
        packed = PackedImages.from_images(images, 4, "sdpa")
        features = packed.split(tower(packed=packed))
        for image, got in zip(images, features, strict=True):
            torch.testing.assert_close(got, _alone(name, tower, image), rtol=1e-5, atol=1e-5)


def _png(width: int, height: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata([tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(width * height)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _native_model(tokenizer, **overrides) -> SplitVLM:
    torch.manual_seed(0)
    settings = dict(
        vocab_size=len(tokenizer),
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        vision=VisionConfig(
            image_size=16, patch_size=4, hidden_size=16, num_layers=2, resize="native"
        ),
    )
    return SplitVLM(ModelConfig(**{**settings, **overrides})).eval()


def _sample(png: bytes) -> dict:
    return {
        "text": "",
        "messages": [
            {"role": "user", "content": "<image>\ndescribe the image ."},
            {"role": "assistant", "content": "a red square ."},
        ],
        "images": pack_blobs([png]),
    }


@pytest.mark.parametrize("target", ["encoder", "pixels"])
def test_masking_never_leaks_its_target_on_a_non_square_grid(demo_data, target):
    tokenizer = load_tokenizer(demo_data / "tokenizer")
    model = _native_model(tokenizer, image_target=target)
    decoder = SampleDecoder(tokenizer, model.cfg, max_tokens=512)
    png = _png(16, 8)  # 2 rows × 4 columns of 4-pixel patches
    doc = decoder(_sample(png), 0)
    assert doc.image_grids == [(2, 4)]
    full_start = doc.image_mask.numel() - 8  # the full grid is the last span
    masked = full_start + 1 * 4 + 2  # row 1, column 2
    doc.image_mask[:] = False
    doc.image_mask[masked] = True
    before = all_outputs(model, collate([doc]))

    # Change the pixels under the masked token only: no output may change.
    changed = decoder(_sample(perturb_patch(png, 1, 2, 4)), 0)
    changed.image_mask[:] = doc.image_mask
    assert torch.equal(all_outputs(model, collate([changed])), before)
    # ... while its target does.
    batch, changed_batch = collate([doc]), collate([changed])
    _, targets = model.image_inputs_and_targets(
        batch.pixel_values, batch.image_mask, batch.image_grids
    )
    _, changed_targets = model.image_inputs_and_targets(
        changed_batch.pixel_values, changed_batch.image_mask, changed_batch.image_grids
    )
    assert not torch.allclose(targets[masked], changed_targets[masked])

    # Control: the same change under an unmasked token reaches the outputs.
    doc.image_mask[:] = False
    doc.image_mask[full_start] = True
    changed.image_mask[:] = doc.image_mask
    assert not torch.equal(
        all_outputs(model, collate([changed])), all_outputs(model, collate([doc]))
    )


def test_a_document_packed_with_others_gives_its_outputs_alone(demo_data):
    tokenizer = load_tokenizer(demo_data / "tokenizer")
    model = _native_model(tokenizer, image_scales=[2], dual_input=True, image_positions="2d")
    decoder = SampleDecoder(tokenizer, model.cfg, max_tokens=512)
    docs = [
        decoder(_sample(_png(w, h, seed=i)), i)
        for i, (w, h) in enumerate([(16, 8), (8, 12), (16, 16)])
    ]
    assert [doc.image_grids for doc in docs] == [[(2, 4)], [(3, 2)], [(4, 4)]]
    with torch.no_grad():
        packed = model(collate(docs))
        alone = [model(collate([doc])) for doc in docs]
    for key, value in packed.items():
        torch.testing.assert_close(value, sum(out[key] for out in alone), rtol=1e-5, atol=1e-5)


def test_shards_record_the_sizes_whose_grids_decoding_makes(native_demo_data):
    tokenizer = load_tokenizer(native_demo_data / "tokenizer")
    cfg = ModelConfig(vision=VisionConfig(image_size=32, patch_size=8, resize="native"))
    decoder = SampleDecoder(tokenizer, cfg, max_tokens=1024)
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(native_demo_data / "heldout"), shuffle=False, batch_size=1)
    grids = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        doc = decoder(sample, index)
        expected = [cfg.image_grid(*size) for size in sample["image_sizes"]]
        assert doc.image_grids == expected
        assert int(doc.image_mask.numel()) == sum(cfg.num_image_tokens(g) for g in expected)
        grids.update(expected)
    assert len(grids) >= 3  # several aspect ratios really were decoded


def test_shards_record_the_displayed_size_of_a_rotated_photo():
    from trainer.data.decode import check_image

    image = Image.new("RGB", (40, 16), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated a quarter turn: 16 wide, 40 tall
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    assert check_image(out.getvalue(), 0) == (16, 40)
    assert BUDGET.native_grid(16, 40) == (5, 2)


@pytest.mark.parametrize("kind", ["siglip_vision", "siglip_two_towers", "siglip2_vision"])
def test_pretrained_towers_load_tensor_by_tensor(tmp_path, monkeypatch, kind):
    """A SigLIP or SigLIP2 checkpoint (a vision model, or the vision half of a two-tower one)
    gives our tower its exact weights, read from safetensors without building a transformers
    model from the checkpoint; on meta, the engines' fill reads the same values."""
    from transformers import PreTrainedModel, SiglipConfig, SiglipModel, SiglipTextConfig

    torch.manual_seed(0)
    reference = _tower("siglip2" if kind == "siglip2_vision" else "siglip")
    if kind == "siglip_two_towers":
        text = SiglipTextConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
        full = SiglipModel(
            SiglipConfig(text_config=text.to_dict(), vision_config=reference.config.to_dict())
        )
        full.save_pretrained(tmp_path)
        reference.vision_model.load_state_dict(full.vision_model.state_dict())
    else:
        reference.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("built a transformers model from the checkpoint")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", refuse)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        vision=VisionConfig(pretrained=str(tmp_path), image_size=16, patch_size=4),
    )
    model = SplitVLM(cfg)
    ours = dict(model.vision.named_parameters())
    for name, value in reference.named_parameters():
        assert torch.equal(ours[name], value), name
    filled = model.unit_initial_values("vision", seed=0)
    for name, value in reference.named_parameters():
        assert torch.equal(filled[f"vision.{name}"], value), name


def test_row_breaks_sit_between_rows_inside_the_image_block(demo_data):
    tokenizer = load_tokenizer(demo_data / "tokenizer", ModelConfig(image_row_break=True))
    model = _native_model(tokenizer, image_row_break=True, image_positions="2d")
    decoder = SampleDecoder(tokenizer, model.cfg, max_tokens=512)
    doc = decoder(_sample(_png(16, 8)), 0)  # 2 rows of 4 patches
    ids = doc.input_ids.tolist()
    start = ids.index(tokenizer.convert_tokens_to_ids("<image_start>")) + 1
    row_break = tokenizer.convert_tokens_to_ids("<image_row_break>")
    pad = tokenizer.pad_token_id
    assert ids[start : start + 10] == [pad] * 4 + [row_break] + [pad] * 4 + [
        tokenizer.convert_tokens_to_ids("<image_end>")
    ]
    batch = collate([doc], image_positions="2d")
    position = start + 4
    assert position not in batch.image_index.tolist() and position in batch.text_index.tolist()
    assert batch.image_index.numel() == 8 == batch.image_mask.numel()
    # the break and every patch token see the whole span (both rows)
    for token in range(start, start + 9):
        assert batch.layout.vis_end[token] == start + 8
    first = int(batch.rope_positions[start, 0])
    assert batch.rope_positions[position].tolist() == [first, first + 4]  # past row 0's end
    assert batch.rope_positions[start + 5].tolist() == [first + 1, first]  # row 1, column 0
    # packed with another document, each gives its outputs alone
    other = decoder(_sample(_png(8, 12, seed=1)), 1)
    with torch.no_grad():
        packed = model(collate([doc, other], image_positions="2d"))
        alone = [model(collate([d], image_positions="2d")) for d in (doc, other)]
    for key, value in packed.items():
        torch.testing.assert_close(value, sum(out[key] for out in alone), rtol=1e-5, atol=1e-5)
