"""Flamingo (docs/designs.md) against transformers' reproduction, IdeficsForVisionText2Text: a
ViT and a perceiver resampler give each image a fixed number of keys, which gated
cross-attention layers placed before every N-th decoder layer attend to; a text token sees only
the latest image before it. Each image stands in the sequence as its <image> token.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_classic_designs import REPO, imported_into, read_metrics, saved, with_random_vectors
from test_mllama import SIZE, cross_document, packed_logits
from test_mllama import as_document as mllama_document
from test_mllama import as_ids as mllama_ids
from test_mllama import documents as mllama_documents
from transformers import IdeficsConfig, IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids_pt,
    incremental_to_binary_attention_mask,
)

from cluster.cli import main
from models.cross_attention import flamingo_layout
from models.split_vlm import SplitVLM
from models.vision import normalize_pixels
from trainer.config import load_config
from trainer.data.decode import Document
from trainer.data.packing import collate, layout_options

VOCAB, ADDITIONAL = 60, 2  # its vocabulary, then <fake_token_around_image> and <image>
IMAGE, EOS = 61, 2
LATENTS = 4  # perceiver latents (keys) an image, of SIZE-pixel images


def tiny_idefics(alpha_type: str = "vector", use_resampler: bool = True):
    torch.manual_seed(0)
    config = IdeficsConfig(
        vocab_size=VOCAB,
        additional_vocab_size=ADDITIONAL,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=2,  # a cross-attention layer before layers 0 and 2
        qk_layer_norms=True,
        alpha_type=alpha_type,
        use_resampler=use_resampler,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        pad_token_id=0,
        eos_token_id=EOS,
        vision_config=dict(
            embed_dim=24,
            image_size=SIZE,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
        ),
        perceiver_config=dict(
            use_resampler=use_resampler,
            resampler_n_latents=LATENTS,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=True,
        ),
    )
    model = with_random_vectors(IdeficsForVisionText2Text(config))
    with torch.no_grad():  # the gates open (a vector gate is 3-D), so the images count
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_(0.0, 1.0)
            layer.alpha_dense.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory) -> Path:
    return saved(tiny_idefics(), tmp_path_factory, "idefics")


@pytest.fixture(scope="module")
def imported(idefics_dir, tmp_path_factory) -> Path:
    return imported_into(idefics_dir, tmp_path_factory, "IdeficsForVisionText2Text")


# Documents as runs of text ids and images: text before the first image (rows that see none),
# two consecutive images (the second alone is seen after it), no image at all, an image
# opening the document. No EOS (id 2) inside: its processor blinds the tokens after one.
PIECES = [
    [[5, 9, 3, 7], "image", "image", [11, 4, 8, 6], "image", [13, 1, 12]],
    [[21, 22, 23, 24, 25, 26]],
    ["image", [31, 32, 33, 34, 35, 36, 37]],
    [[41, 42, 43], "image", [44, 45, 46, 47]],
]


def as_ids(pieces) -> list[int]:
    return mllama_ids(pieces, IMAGE)


def as_document(pieces, pixels: torch.Tensor, name: str) -> Document:
    return mllama_document(pieces, pixels, name, IMAGE)


# What the processor's mask functions read of its tokenizer: the <image> and EOS ids.
TOKEN_IDS = SimpleNamespace(convert_tokens_to_ids=lambda token: IMAGE, eos_token_id=EOS)


def transformers_inputs(pieces, pixels: torch.Tensor) -> dict:
    """One document alone as transformers' processor gives it: its images normalized, the
    image attention mask from the processor's own functions; a document without images gets
    its one blank image and an all-zero mask, as the processor makes them."""
    ids = torch.tensor([as_ids(pieces)])
    if not len(pixels):
        return {
            "input_ids": ids,
            "pixel_values": torch.zeros(1, 1, 3, SIZE, SIZE),
            "image_attention_mask": torch.zeros(1, ids.shape[1], 1, dtype=torch.long),
        }
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(ids, TOKEN_IDS)
    mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=len(pixels))
    return {
        "input_ids": ids,
        "pixel_values": normalize_pixels(pixels, "clip")[None],
        "image_attention_mask": mask,
    }


def documents(seed: int) -> tuple[list, list[torch.Tensor]]:
    return mllama_documents(seed, PIECES)


def test_flamingo_layout_is_the_latest_image_as_transformers_processor_marks_it():
    """Token by token, the image our layout shows a query is the one transformers' processor
    marks for it (the latest <image> at or before it), and a query before its document's first
    image sees nothing."""
    docs = [(len(as_ids(p)), [t for t, i in enumerate(as_ids(p)) if i == IMAGE]) for p in PIECES]
    layout, order = flamingo_layout(docs, LATENTS)
    assert order.tolist() == list(range(layout.num_keys))
    query = image = 0
    for pieces, (length, anchors) in zip(PIECES, docs, strict=True):
        incremental, _ = image_attention_mask_for_packed_input_ids_pt(
            torch.tensor([as_ids(pieces)]), TOKEN_IDS
        )
        for t, marked in enumerate(incremental[0].tolist()):
            start, end = layout.key_start[query + t], layout.key_end[query + t]
            if marked < 0:
                assert start == end and not layout.sees_image[query + t]
            else:
                key = (image + marked) * LATENTS
                assert (start, end) == (key, key + LATENTS) and layout.sees_image[query + t]
        query, image = query + length, image + len(anchors)


@pytest.mark.parametrize("blind_mlp", [True, False])
def test_idefics_parity_packed_documents_match_transformers_alone(
    imported, idefics_dir, blind_mlp, monkeypatch
):
    """Several documents packed into one micro-batch give each one's logits in transformers
    alone. The check can fail: with the MLP of rows that see no image dropped (LLaMA-3.2-Vision's
    rule, not Flamingo's) the logits move."""
    reference = IdeficsForVisionText2Text.from_pretrained(idefics_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.cross_attention_layers == [0, 3] and ours.cfg.vocab_size == VOCAB + 2
    if not blind_mlp:
        for block in ours.core:
            if hasattr(block, "mask_blind_mlp"):
                monkeypatch.setattr(block, "mask_blind_mlp", True)
    pieces, pixels = documents(seed=3)
    docs = [as_document(p, x, str(i)) for i, (p, x) in enumerate(zip(pieces, pixels, strict=True))]
    with torch.no_grad():
        alone = [
            reference(**transformers_inputs(p, x)).logits[0]
            for p, x in zip(pieces, pixels, strict=True)
        ]
    worst = (packed_logits(ours, docs) - torch.cat(alone)).abs().max().item()
    print(f"Idefics parity (blind rows' MLP kept: {blind_mlp}): max |diff| {worst:.2e}")
    if blind_mlp:
        assert worst <= 1e-4
    else:
        assert worst > 1e-3
    # A document without images alone (no key stream at all) is the same as in the pack.
    text_only = packed_logits(ours, [docs[1]])
    if blind_mlp:
        assert (text_only - alone[1]).abs().max() <= 1e-4


def test_idefics_round_trip_through_the_cli_gives_transformers_the_same_logits(
    idefics_dir, tmp_path
):
    assert main(["import-hf", str(idefics_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = IdeficsForVisionText2Text.from_pretrained(idefics_dir).eval()
    again = IdeficsForVisionText2Text.from_pretrained(tmp_path / "hf").eval()
    config = again.config
    assert (config.cross_layer_interval, config.additional_vocab_size) == (2, ADDITIONAL)
    assert config.alpha_type == "vector" and config.use_resampler
    pieces, pixels = documents(seed=4)
    inputs = transformers_inputs(pieces[0], pixels[0])
    with torch.no_grad():
        assert (original(**inputs).logits - again(**inputs).logits).abs().max() <= 1e-5


def test_idefics_without_a_resampler_and_with_scalar_gates_imports(tmp_path):
    """The ViT's tokens (patches and class token) as the keys when use_resampler is off, and
    float gates: the same logits as transformers."""
    checkpoint = tmp_path / "plain"
    tiny_idefics(alpha_type="float", use_resampler=False).save_pretrained(checkpoint)
    assert main(["import-hf", str(checkpoint), "--out", str(tmp_path / "ours")]) == 0
    ours = SplitVLM.from_pretrained(tmp_path / "ours").eval()
    assert ours.cfg.cross_keys_per_image == ((SIZE // 8) ** 2 + 1, 1)
    reference = IdeficsForVisionText2Text.from_pretrained(checkpoint).eval()
    pieces, pixels = documents(seed=5)
    with torch.no_grad():
        want = reference(**transformers_inputs(pieces[0], pixels[0])).logits[0]
    got = packed_logits(ours, [as_document(pieces[0], pixels[0], "0")])
    assert (got - want).abs().max() <= 1e-4


def test_idefics_preset_trains_with_a_falling_text_loss_and_exports_to_transformers(
    tiny_overrides, tmp_path
):
    """The stage of the preset: the language model and the tower frozen, the cross-attention
    blocks trained (from gates at 0); the run exports as a transformers Idefics with our
    logits."""
    from trainer.export import export_to_hf
    from trainer.inference import load_for_inference
    from trainer.loop import train

    cfg = load_config(
        REPO / "yaml/idefics.yaml", [*tiny_overrides, "run.steps=30", "optim.warmup_steps=4"]
    )
    train(cfg)
    text = [m["text_loss"] for m in read_metrics(Path(cfg.run.dir))]
    assert len(text) == 30 and all(math.isfinite(v) for v in text)
    assert np.mean(text[-5:]) < 0.95 * np.mean(text[:5]), text

    assert export_to_hf(Path(cfg.run.dir), tmp_path / "hf") == "IdeficsForVisionText2Text"
    hf = IdeficsForVisionText2Text.from_pretrained(tmp_path / "hf").eval()
    ours, _, decoder = load_for_inference(Path(cfg.run.dir))
    image_id = decoder.tokenizer.convert_tokens_to_ids(ours.cfg.image_start_token)
    gates = [b.attn_gate for b in ours.core if hasattr(b, "attn_gate")]
    assert gates and any(bool(g.detach().any()) for g in gates)
    size = ours.cfg.vision.image_size
    pixels = torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(0))
    ids = [2, 5, image_id, 9, 11, 12, 3]
    doc = cross_document(ids, pixels.to(torch.uint8), [2], "probe")
    mask = torch.zeros(1, len(ids), 1, dtype=torch.long)
    mask[0, 2:] = 1
    with torch.no_grad():
        got = hf(
            input_ids=torch.tensor([ids]),
            pixel_values=normalize_pixels(pixels, "clip")[None],
            image_attention_mask=mask,
        ).logits[0]
    want = packed_logits(ours, [doc])
    assert (want[:, : got.shape[1]] - got).abs().max() <= 1e-5


def preset_model(tiny_overrides) -> SplitVLM:
    cfg = load_config(REPO / "yaml/idefics.yaml", tiny_overrides)
    cfg.model.vocab_size = 64
    return SplitVLM(cfg.model).eval()


def text_document(ids: list[int], size: int) -> Document:
    return cross_document(ids, torch.zeros(0, 3, size, size, dtype=torch.uint8), [])


def test_new_flamingo_blocks_start_as_the_identity(tiny_overrides):
    """Vector gates at 0: a fresh model's logits do not depend on its images and equal those
    of the same text without images; opened gates make the images count."""
    model = preset_model(tiny_overrides)
    size, ids = model.cfg.vision.image_size, [5, 9, 63, 3, 7, 2]  # its image at position 2
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 1, 3, size, size), generator=generator).to(torch.uint8)
    with_image = [cross_document(ids, image, [2]) for image in pixels]
    logits = [packed_logits(model, [doc]) for doc in with_image]
    assert torch.equal(logits[0], logits[1])
    assert (logits[0] - packed_logits(model, [text_document(ids, size)])).abs().max() <= 1e-6
    with torch.no_grad():
        for block in model.core:
            if hasattr(block, "attn_gate"):
                block.attn_gate.fill_(1.0)
    assert (
        packed_logits(model, [with_image[0]]) - packed_logits(model, [with_image[1]])
    ).abs().max() > 1e-3


def test_a_micro_batch_without_images_runs_the_flamingo_mlps_and_prices_them(tiny_overrides):
    """Without images a Flamingo block still runs its MLP (as Idefics does on its blank
    image): the MLP gets a gradient, and the model's FLOPs equal torch's count; under a sharded
    engine the attention half runs on a blank image no token sees, its projections an exact
    zero gradient, the loss unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.flops import ModelFlops

    model = preset_model(tiny_overrides).train()
    with torch.no_grad():
        for block in model.core:
            if hasattr(block, "mlp_gate"):
                block.mlp_gate.fill_(0.5)
    batch = collate([text_document([5, 9, 3, 7, 2], 32)], **layout_options(model.cfg, "cpu"))
    assert batch.cross_layout is None
    with FlopCounterMode(display=False) as counter:
        plain = model(batch)["text_loss_sum"]
        plain.backward()
    dense = sum(
        counter.get_flop_counts()["Global"].get(op, 0)
        for op in (torch.ops.aten.mm, torch.ops.aten.addmm)
    )
    assert ModelFlops(model).dense(batch) == dense
    assert model.core[0].mlp.up.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.run_every_branch = True
    every = model(batch)["text_loss_sum"]
    every.backward()
    assert torch.equal(plain, every)
    attention = [p for n, p in model.core[0].attn.named_parameters()]
    assert attention and all(p.grad is not None and not p.grad.any() for p in attention)


def test_an_idefics_checkpoint_whose_layers_outrun_its_cross_layers_is_refused_in_one_line(
    idefics_dir, tmp_path, capsys
):
    """transformers builds num_hidden_layers // cross_layer_interval cross-attention layers
    but looks one up before every interval-th layer: a depth that is no multiple of the
    interval is a checkpoint no forward runs, refused by name."""
    config = json.loads((idefics_dir / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    for file in idefics_dir.iterdir():
        (tmp_path / "bad" / file.name).write_bytes(file.read_bytes())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert main(["import-hf", str(tmp_path / "bad"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "num_hidden_layers=3 is not a multiple of cross_layer_interval=2" in err
