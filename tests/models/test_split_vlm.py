"""The split VLM's properties: features train, masks don't leak, predictions shift by one."""

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from models.config import ModelConfig, VisionConfig
from models.pretrained import build_split_vlm
from models.split_vlm import SplitVLM
from trainer.config import load_config
from trainer.data.decode import SampleDecoder
from trainer.data.demo import make_sample
from trainer.data.packing import collate
from trainer.data.shards import pack_blobs
from trainer.loop import train

REPO = Path(__file__).resolve().parents[2]

FEATURES = {
    "split": [],
    "llava": [
        "model.num_text_in_blocks=0",
        "model.num_image_in_blocks=0",
        "model.num_text_head_blocks=0",
        "model.num_image_head_blocks=0",
        "model.image_attention=causal",
    ],
    "pixels_cosine_qknorm": [
        "model.image_target=pixels",
        "model.image_loss=cosine",
        "model.qk_norm=true",
    ],
    "positions_2d": ["model.image_positions=2d"],
    "positions_shared": ["model.image_positions=shared"],
    "multiscale": ["model.image_scales=[1,2]"],
    "dual": ["model.dual_input=true"],
    "diffusion": [
        "model.diffusion_head=true",
        "model.full_mask_prob=0.5",
        "model.image_target=pixels",
    ],
    # images at their own aspect ratio (the native demo data), with every span kind
    "native": [
        "model.vision.resize=native",
        "model.image_row_break=true",
        "model.image_scales=[2]",
        "model.dual_input=true",
        "model.image_positions=2d",
        "model.image_target=pixels",
    ],
    "everything": [
        "model.image_scales=[1,2]",
        "model.dual_input=true",
        "model.diffusion_head=true",
        "model.full_mask_prob=0.3",
        "model.image_target=pixels",
        "model.image_positions=2d",
        "model.qk_norm=true",
    ],
}


def mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_trains_with_finite_falling_losses(feature, tiny_overrides, request):
    extra = FEATURES[feature]
    if feature == "native":
        extra = [*extra, f"data.path={request.getfixturevalue('native_demo_data')}"]
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [*tiny_overrides, "run.steps=24", "optim.warmup_steps=4", *extra],
    )
    train(cfg)
    metrics = [
        json.loads(x) for x in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
    ]
    keys = ["text_loss", "image_loss"] + (["diffusion_loss"] if cfg.model.diffusion_head else [])
    for key in keys:
        values = [m[key] for m in metrics if key in m]
        assert len(values) >= 20 and all(math.isfinite(v) for v in values), key
        assert mean(values[-6:]) < mean(values[:6]), (key, values)


def tiny_model(**overrides) -> SplitVLM:
    torch.manual_seed(0)
    settings = dict(
        vocab_size=64,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=16, num_layers=2),
    )
    return SplitVLM(ModelConfig(**{**settings, **overrides})).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from trainer.data.demo import save_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def image_sample(seed: int = 0) -> dict:
    rng = random.Random(seed)
    sample = next(
        s
        for s in (make_sample(i, rng, 16) for i in range(100))
        if s["images"] and s["messages"][1]["content"] != "<image>"
    )
    sample["images"] = pack_blobs(sample["images"])
    return sample


def all_outputs(model: SplitVLM, batch) -> torch.Tensor:
    """Every output the model produces: text logits everywhere, image predictions everywhere."""
    with torch.no_grad():
        trunk = model.trunk(batch)
        logits = model.text_logits(batch, trunk, torch.arange(batch.num_tokens))
        every_image_token = torch.arange(batch.image_index.numel())
        predictions = model.image_head(model.image_condition(batch, trunk, every_image_token))
    return torch.cat([logits.flatten(), predictions.flatten()])


def perturb_patch(png: bytes, row: int, col: int, patch: int) -> bytes:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for y in range(row * patch, (row + 1) * patch):
        for x in range(col * patch, (col + 1) * patch):
            image.putpixel((x, y), (255, 0, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("target", ["encoder", "pixels"])
def test_masking_never_leaks_its_target(tokenizer, target):
    from trainer.data.shards import unpack_blobs

    model = tiny_model(image_target=target, vocab_size=len(tokenizer))
    cfg = model.cfg
    decoder = SampleDecoder(tokenizer, cfg, max_tokens=512)
    sample = image_sample()
    doc = decoder(sample, 0)
    doc.image_mask[:] = False
    side = cfg.image_tokens_per_side
    masked_token = 5  # row 1, column 1 of the 4×4 grid
    doc.image_mask[masked_token] = True
    batch = collate([doc])
    before = all_outputs(model, batch)

    # Change the pixels under the masked token only: its target changes, no output may.
    (png,) = unpack_blobs(sample["images"])
    changed = dict(sample, images=pack_blobs([perturb_patch(png, 1, 1, cfg.vision.patch_size)]))
    changed_doc = decoder(changed, 0)
    changed_doc.image_mask[:] = doc.image_mask
    changed_batch = collate([changed_doc])
    _, targets_before = model.image_inputs_and_targets(
        batch.pixel_values, batch.image_mask, batch.image_grids
    )
    _, targets_after = model.image_inputs_and_targets(
        changed_batch.pixel_values, changed_batch.image_mask, changed_batch.image_grids
    )
    assert not torch.allclose(targets_before[masked_token], targets_after[masked_token])
    assert torch.equal(all_outputs(model, changed_batch), before)

    # Control: the same change under an unmasked token does reach the outputs.
    changed_doc.image_mask[:] = False
    changed_doc.image_mask[side * side - 1] = True
    doc.image_mask[:] = changed_doc.image_mask
    assert not torch.equal(
        all_outputs(model, collate([changed_doc])), all_outputs(model, collate([doc]))
    )


def test_image_predictions_are_shifted_by_one(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    decoder = SampleDecoder(tokenizer, model.cfg, max_tokens=512)
    doc = decoder(image_sample(), 0)
    doc.image_mask[:] = False
    doc.image_mask[[0, 3, 15]] = True
    batch = collate([doc])
    # bos, <|user|>, <image_start> at 0..2: the 16 image tokens sit at positions 3..18.
    assert batch.image_index.tolist() == list(range(3, 19))
    assert batch.input_ids[2] == tokenizer.convert_tokens_to_ids("<image_start>")
    with torch.no_grad():
        trunk = model.trunk(batch)
        hidden = trunk.hidden_TC
        for block in model.image_head_blocks:
            hidden = block(hidden, batch.layout, trunk.rope)
        # Token j of the image is predicted from position j - 1: token 0 from <image_start>.
        expected = model.image_head(model.image_norm(hidden[[2, 5, 17]]))
        predictions = model.image_head(
            model.image_condition(batch, trunk, torch.tensor([0, 3, 15]))
        )
        assert torch.equal(predictions, expected)
        targets = trunk.image_targets[[0, 3, 15]]
        loss = (expected - targets).pow(2).mean(-1).sum()
        assert torch.allclose(model(batch)["image_loss_sum"], loss)


def test_llava_configuration_is_a_plain_decoder(tokenizer, tmp_path):
    """Depths 0 and causal images: our model equals the checkpoint's own decoder run on the
    merged embeddings (text embeddings with adapted image tokens in place)."""
    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    cfg = ModelConfig(
        pretrained_llm=str(tmp_path),
        num_text_in_blocks=0,
        num_image_in_blocks=0,
        num_text_head_blocks=0,
        num_image_head_blocks=0,
        image_attention="causal",
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=16, num_layers=1),
    )
    model = build_split_vlm(cfg).eval()
    decoder = SampleDecoder(tokenizer, cfg, max_tokens=512)
    doc = decoder(image_sample(), 0)
    doc.image_mask[:] = False
    batch = collate([doc], image_attention="causal")
    with torch.no_grad():
        ours = model.text_logits(batch, model.trunk(batch), torch.arange(batch.num_tokens))
        embeddings = model.embed(batch.input_ids)
        adapted, _ = model.image_inputs_and_targets(
            batch.pixel_values, batch.image_mask, batch.image_grids
        )
        embeddings[batch.image_index] = adapted
        theirs = hf_model(inputs_embeds=embeddings[None]).logits[0]
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("adaptor", ["linear", "mlp", "patch_merger"])
def test_every_adaptor_gets_its_seeded_init(adaptor):
    """Sharded engines fill parameters from `unit_initial_values`, built on uninitialized
    memory: every adaptor's parameters must come out of it set, the same for the same seed
    (norms 1, biases 0)."""
    from models.vision import ADAPTORS

    assert adaptor in ADAPTORS
    cfg = ModelConfig(
        vocab_size=32,
        adaptor=adaptor,
        vision=VisionConfig(image_size=16, patch_size=4, spatial_merge=2),
    )
    model = SplitVLM(cfg)
    first, again = (model.unit_initial_values("adaptor", seed=3) for _ in range(2))
    assert first.keys() == {f"adaptor.{n}" for n, _ in model.adaptor.named_parameters()}
    for name, value in first.items():
        assert torch.equal(value, again[name]), name
        if name.endswith("norm.weight"):
            assert torch.equal(value, torch.ones_like(value))
        elif name.endswith("bias"):
            assert not value.any()
        else:
            assert 0.01 < value.std() < 0.03, name  # normal(0, init_std = 0.02)
