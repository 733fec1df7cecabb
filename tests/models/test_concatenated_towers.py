"""Several towers concatenated (`model.vision.extra_towers`, docs/designs.md): a SigLIP and a
CLIP over the same images, each token's features theirs side by side.

Each test builds and saves its own tiny random transformers towers; nothing is downloaded."""

from pathlib import Path

import pytest
import torch
from test_classic_designs import with_random_vectors
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from models.config import ModelConfig, model_config_from_dict
from models.hf_designs import write_export
from models.meta import parameters_on_meta
from models.split_vlm import SplitVLM
from models.vision import normalize_pixels
from trainer.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
SIZE = dict(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[Path, Path]:
    """A saved SigLIP (24 wide) and CLIP (32 wide), both on a 4 × 4 grid of 32-pixel images."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("towers")
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=48, **SIZE))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, **SIZE))
    for name, model in (("siglip", siglip), ("clip", clip)):
        with_random_vectors(model).save_pretrained(root / name)
    return root / "siglip", root / "clip"


def concatenated_config(towers, clip_layer: int = -2) -> ModelConfig:
    siglip, clip = towers
    vision = {
        "pretrained": str(siglip),
        "extra_towers": [{"pretrained": str(clip), "feature_layer": clip_layer}],
    }
    return model_config_from_dict(
        {
            "vocab_size": 64,
            "d_model": 32,
            "num_heads": 2,
            "num_kv_heads": 2,
            "vision": {**vision, "image_size": 32, "patch_size": 8},
        }
    )


def test_features_are_each_transformers_tower_side_by_side(towers):
    """A token's features: SigLIP's last_hidden_state on the SigLIP-normalized image, then
    CLIP's hidden state −2 without its CLS on the CLIP-normalized one (LLaVA's), as
    transformers' own models give them."""
    model = SplitVLM(concatenated_config(towers)).eval()
    assert model.vision.feature_dim == 24 + 32 and model.adaptor[0].in_features == 56
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    siglip = SiglipVisionModel.from_pretrained(towers[0]).eval()
    clip = CLIPVisionModel.from_pretrained(towers[1]).eval()
    with torch.no_grad():
        got = model.encode_images(normalize_pixels(pixels, "siglip"))
        want_siglip = siglip(pixel_values=normalize_pixels(pixels, "siglip")).last_hidden_state
        hidden = clip(pixel_values=normalize_pixels(pixels, "clip"), output_hidden_states=True)
        want_clip = hidden.hidden_states[-2][:, 1:]
    assert got.shape == (3, 16, 56)
    assert (got[..., :24] - want_siglip).abs().max() <= 1e-5
    assert (got[..., 24:] - want_clip).abs().max() <= 1e-5
    # The CLIP tower's own feature layer: its last one differs.
    other = SplitVLM(concatenated_config(towers, clip_layer=-1)).eval()
    with torch.no_grad():
        moved = other.encode_images(normalize_pixels(pixels, "siglip"))[..., 24:]
    assert (moved - want_clip).abs().max() > 1e-2


def test_sharded_engines_fill_every_tower_from_its_checkpoint(towers):
    """Built on meta (fsdp, ZeRO-3), the tower unit's initial values are both checkpoints'
    tensors under the concatenation's names: what the eager build reads."""
    eager = SplitVLM(concatenated_config(towers))
    with parameters_on_meta():
        empty = SplitVLM(concatenated_config(towers))
    assert all(p.is_meta for p in empty.vision.parameters())
    values = empty.unit_initial_values("vision", seed=0)
    want = {f"vision.{k}": v for k, v in eager.vision.state_dict().items()}
    assert set(values) == {n for n, _ in eager.named_parameters() if n.startswith("vision.")}
    assert all(torch.equal(values[name], want[name]) for name in values)
    assert any(name.startswith("vision.towers.1.") for name in values)


def test_an_export_rebuilds_the_concatenation_without_the_checkpoints(towers, tmp_path):
    model = SplitVLM(concatenated_config(towers)).eval()
    write_export(model, tmp_path / "export")
    again = SplitVLM.from_pretrained(tmp_path / "export").eval()
    assert not again.cfg.vision.pretrained and not again.cfg.vision.extra_towers[0].pretrained
    pixels = normalize_pixels(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "siglip")
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels), again.encode_images(pixels))


def test_random_concatenated_towers_train_the_split_model(demo_data, tmp_path):
    """The split VLM's masked image loss reads the concatenated features as its targets too."""
    import json

    from trainer.loop import train

    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [
            f"data.path={demo_data}",
            f"run.dir={tmp_path / 'run'}",
            "run.steps=12",
            "optim.warmup_steps=2",
            "run.log_every=1",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            "model.vision.extra_towers=[{tower: clip, feature_layer: -2}]",
        ],
    )
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    text = [r["text_loss"] for r in rows if "text_loss" in r]
    image = [r["image_loss"] for r in rows if "image_loss" in r]
    assert len(text) == 12 and text[-1] < 0.9 * text[0] and image[-1] < 0.9 * image[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[{tower: pixtral}]", "model.vision.extra_towers[0]: tower one of siglip, clip"),
        ("[{pretrained: /x}]", "model.vision.extra_towers[0].pretrained: set exactly when"),
        ("[{feature_layer: 5}]", "model.vision.extra_towers[0].feature_layer=5 is outside"),
    ],
)
def test_extra_towers_are_validated_at_load(extra, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "yaml/tiny.yaml", [f"model.vision.extra_towers={extra}"])
    assert str(error.value).startswith(message)


def test_extra_towers_need_square_images_of_a_batched_tower():
    with pytest.raises(ConfigError, match="model.vision.extra_towers: with a SigLIP or CLIP"):
        load_config(
            REPO / "yaml/tiny.yaml",
            ["model.vision.tower=pixtral", "model.vision.extra_towers=[{tower: clip}]"],
        )
