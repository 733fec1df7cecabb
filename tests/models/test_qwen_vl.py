"""Qwen-VL (docs/designs.md): a cross-attention resampler of learned queries with fixed 2-D
sine-cosine positions between the ViT and the LLM (`model.adaptor: resampler`). transformers has
no Qwen-VL class, so these tests check the defining properties against our own model (the
engines test is in test_classic_designs, the FLOPs in test_metrics)."""

from pathlib import Path

import numpy as np
import torch
from test_pixtral import _merged

from models.config import ModelConfig, VisionConfig
from models.split_vlm import SplitVLM
from models.vision import QueryResampler, sincos_2d
from trainer.config import load_config
from trainer.data.decode import Document
from trainer.data.packing import collate
from trainer.optim import apply_freeze

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64
QUERIES = 4  # a 2 × 2 grid of queries over 16-pixel images of 4-pixel patches (4 × 4 patches)
START, END = 61, 62  # <image_start>, <image_end>


def tiny_model(seed: int = 0) -> SplitVLM:
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        num_text_in_blocks=0,
        num_image_in_blocks=0,
        num_core_blocks=2,
        num_text_head_blocks=0,
        num_image_head_blocks=0,
        image_attention="causal",
        adaptor="resampler",
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        init_std=0.2,  # peaked attention: a query reading the wrong patches shows
        vision=VisionConfig(
            image_size=16, patch_size=4, hidden_size=16, num_layers=1, num_queries=QUERIES
        ),
    )
    model = SplitVLM(cfg)
    model.reset_parameters(seed)
    return model.eval()


def document(pieces, name: str, seed: int) -> Document:
    """[text, <image_start>, the image's queries, <image_end>, …] from (text ids, images after
    them) pieces, with random pixels."""
    ids, segments, num_images = [], [], 0
    for text, images in pieces:
        ids += text
        segments.append(("text", len(text)))
        for _ in range(images):
            ids += [START, *[0] * QUERIES, END]
            segments += [("text", 1), ("image", QUERIES), ("text", 1)]
            num_images += 1
    generator = torch.Generator().manual_seed(seed)
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=_merged(segments),
        pixel_values=torch.randn(num_images, 3, 16, 16, generator=generator),
        image_mask=torch.zeros(QUERIES * num_images, dtype=torch.bool),
        image_span_full=torch.zeros(QUERIES * num_images, dtype=torch.bool),
    )


DOCS = [[([5, 6, 7], 1), ([8, 9], 0)], [([], 1), ([10, 11, 12], 1), ([14], 0)], [([15, 16], 0)]]


def logits(model: SplitVLM, documents) -> torch.Tensor:
    batch = collate(documents, image_attention="causal")
    return model.text_logits(batch, model.trunk(batch), torch.arange(batch.num_tokens))


def mae_sincos(width: int, side: int) -> np.ndarray:
    """MAE's 2-D sine-cosine table, which Qwen-VL's resampler uses, written from its
    definition: meshgrid(w, h), the first half of the channels from the first grid (columns)."""
    cols, rows = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))

    def one_axis(positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def test_the_query_positions_are_maes_2d_sine_cosine_table():
    np.testing.assert_allclose(sincos_2d(32, 4, 4).numpy(), mae_sincos(32, 4), atol=1e-6)
    resampler = QueryResampler(
        vision_dim=16, d_model=32, num_queries=16, num_heads=4, num_patches=16
    )
    assert torch.equal(resampler.key_positions(4), resampler.query_positions)
    assert resampler.key_positions(6).shape == (36, 32)  # resized to a larger patch grid


def test_every_image_is_num_queries_tokens_that_do_not_depend_on_the_text():
    model = tiny_model()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grids = [model.cfg.square_grid] * 2
    with torch.no_grad():
        both, targets = model.image_inputs_and_targets(
            pixels, torch.zeros(2 * QUERIES, dtype=torch.bool), grids
        )
        alone, _ = model.image_inputs_and_targets(
            pixels[1:], torch.zeros(QUERIES, dtype=torch.bool), grids[:1]
        )
    assert model.cfg.square_grid == (1, QUERIES)
    assert both.shape == (2 * QUERIES, model.cfg.d_model) and targets.shape[0] == 2 * QUERIES
    assert torch.allclose(both[QUERIES:], alone, atol=1e-6)


def test_the_key_positions_are_what_tells_the_patches_apart():
    """Cross-attention is blind to the order of its keys: swapping two patches changes the
    resampler's output only through the positions added to the keys."""
    resampler = tiny_model().adaptor
    assert isinstance(resampler, QueryResampler)
    features = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(2))
    swapped = features.clone()
    swapped[0, [0, 15]] = features[0, [15, 0]]
    with torch.no_grad():
        assert (resampler(features) - resampler(swapped)).abs().max() > 1e-3
        resampler.query_positions.zero_()  # no positions: the same output whatever the order
        assert torch.allclose(resampler(features), resampler(swapped), atol=1e-6)


def test_packed_documents_equal_each_alone():
    model = tiny_model()
    documents = [document(pieces, f"doc{i}", seed=i) for i, pieces in enumerate(DOCS)]
    with torch.no_grad():
        packed = logits(model, documents)
        alone = torch.cat([logits(model, [doc]) for doc in documents])
    assert (packed - alone).abs().max() <= 1e-5


def test_the_preset_trains_the_tower_and_the_resampler_only():
    cfg = load_config(REPO / "yaml/qwen_vl.yaml", [])
    cfg.model.vocab_size = VOCAB
    model = SplitVLM(cfg.model)
    apply_freeze(model, cfg.optim.freeze)
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"vision", "adaptor"}
    assert isinstance(model.adaptor, QueryResampler) and model.cfg.square_grid == (1, 16)
