"""Chameleon (docs/designs.md) against transformers' ChameleonForConditionalGeneration: a frozen
VQ-VAE makes each image region a code, every code is a vocabulary id, and one causal decoder
with per-head q/k LayerNorms reads and predicts text and image tokens alike.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_classic_designs import documents, imported_into, saved, tiny_llama, with_random_vectors
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from cluster.cli import main
from models.batch import IGNORE_INDEX
from models.hf_designs import chameleon_image_token_name
from models.split_vlm import SplitVLM
from trainer.data.decode import Document
from trainer.data.packing import collate

IMAGE_TOKEN, BOI, EOI = 63, 61, 62  # <image>, <racm3:break>, <eoss>
CODES, FIRST_CODE_ID = 32, 64  # image tokens: ids 64 … 95, in a shuffled code order
NUM_TOKENS = 16  # 16 × 16 images, 4 × 4 codes (the VQ-VAE halves them twice)


def tiny_chameleon(swin_norm: bool = False) -> ChameleonForConditionalGeneration:
    torch.manual_seed(0)
    order = torch.randperm(CODES).tolist()  # id FIRST_CODE_ID + i is code order[i]
    vocabulary_map = {f"tok{i}": i for i in range(FIRST_CODE_ID)}
    vocabulary_map |= {"<image>": IMAGE_TOKEN, "<racm3:break>": BOI, "<eoss>": EOI}
    vocabulary_map |= {
        chameleon_image_token_name(code): FIRST_CODE_ID + i for i, code in enumerate(order)
    }
    llama = tiny_llama()
    config = ChameleonConfig(
        vocab_size=FIRST_CODE_ID + CODES,
        hidden_size=llama.hidden_size,
        intermediate_size=llama.intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
        swin_norm=swin_norm,
        vocabulary_map=vocabulary_map,
        vq_config=dict(
            embed_dim=8,
            num_embeddings=CODES,
            latent_channels=32,
            resolution=16,
            base_channels=32,
            channel_multiplier=[1, 1, 1],
            num_res_blocks=1,
        ),
    )
    model = with_random_vectors(ChameleonForConditionalGeneration(config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_norm." in name and parameter.dim() == 2:  # per-head q/k norms: (heads, width)
                parameter.add_(torch.randn_like(parameter) * 0.2)
    codebook_from_encoder(model.model.vqmodel, CODES)
    return model


@pytest.fixture(scope="module")
def chameleon_dir(tmp_path_factory) -> Path:
    return saved(tiny_chameleon(), tmp_path_factory, "chameleon")


@pytest.fixture(scope="module")
def imported(chameleon_dir, tmp_path_factory) -> Path:
    return imported_into(chameleon_dir, tmp_path_factory, "ChameleonForConditionalGeneration")


def codebook_from_encoder(vq, codes: int) -> None:
    """The VQ-VAE's codebook drawn from its encoder's own outputs: images use many codes."""
    with torch.no_grad():
        images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        latents = vq.quant_conv(vq.encoder(images)).permute(0, 2, 3, 1).flatten(0, 2)
        vq.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:codes]])


def as_document(pieces, pixels: torch.Tensor, name: str, generated=None) -> Document:
    """Our document: text, then each image as <racm3:break>, its 16 tokens (the pad id), <eoss>
    (Janus's <begin_of_image> … <end_of_image>); the tokens of the images `generated` flags
    (default none) masked, their whole spans."""
    ids, segments = [], []
    for text, num_images in pieces:
        ids += text
        if text:
            segments.append(("text", len(text)))
        for _ in range(num_images):
            ids += [BOI] + [0] * NUM_TOKENS + [EOI]
            segments += [("text", 1), ("image", NUM_TOKENS), ("text", 1)]
    flags = torch.tensor(generated or [False] * pixels.shape[0])
    mask = flags.repeat_interleave(NUM_TOKENS)
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.tensor([i != 0 for i in ids]),
        segments=segments,
        pixel_values=pixels,
        image_mask=mask,
        image_span_full=mask.clone(),
    )


def transformers_ids(pieces) -> torch.Tensor:
    ids = []
    for text, num_images in pieces:
        ids += text + ([BOI] + [IMAGE_TOKEN] * NUM_TOKENS + [EOI]) * num_images
    return torch.tensor([ids])


def packed_and_alone(num_images: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    pieces = documents(num_images, seed=seed)
    pixels = [torch.rand(num_images, 3, 16, 16, generator=generator) * 2 - 1 for _ in pieces]
    docs = [as_document(p, x, str(i)) for i, (p, x) in enumerate(zip(pieces, pixels, strict=True))]
    return pieces, pixels, collate(docs, image_attention="causal", attention_backend="sdpa")


def parity(ours: SplitVLM, reference, num_images: int, seed: int) -> float:
    """Max |diff| of our logits of three documents packed into one micro-batch against each
    document alone in transformers (image tokens' logits at the lowest value in both)."""
    pieces, pixels, batch = packed_and_alone(num_images, seed)
    with torch.no_grad():
        packed = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        alone = [
            reference(input_ids=transformers_ids(p), pixel_values=x).logits[0]
            for p, x in zip(pieces, pixels, strict=True)
        ]
    return (packed - torch.cat(alone)).abs().max().item()


@pytest.mark.parametrize("num_images", [1, 3])
def test_chameleon_parity_packed_documents_match_transformers_alone(
    imported, chameleon_dir, num_images
):
    reference = ChameleonForConditionalGeneration.from_pretrained(chameleon_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.image_vocab_start == FIRST_CODE_ID and ours.cfg.qk_norm == "per_head_layernorm"
    worst = parity(ours, reference, num_images, seed=num_images)
    print(f"Chameleon parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_chameleon_parity_with_swin_norm(tmp_path):
    """Chameleon-30B's block: each sublayer's output normed before the residual add."""
    (tmp_path / "hf").mkdir()
    tiny_chameleon(swin_norm=True).save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    reference = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours = SplitVLM.from_pretrained(tmp_path / "ours").eval()
    assert ours.cfg.swin_norm
    worst = parity(ours, reference, num_images=1, seed=4)
    print(f"Chameleon (swin_norm) parity: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_chameleon_image_tokens_are_its_vq_codes_trained_as_text(imported, chameleon_dir):
    """Our image tokens are transformers' (its VQ-VAE's codes through its vocabulary map, the
    shuffled order included), and the image loss is the cross-entropy of each of them at the
    position before it over the whole vocabulary, from transformers' own hidden states."""
    reference = ChameleonForConditionalGeneration.from_pretrained(chameleon_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    pieces, pixels, batch = packed_and_alone(num_images=2, seed=7)
    with torch.no_grad():
        trunk = ours.trunk(batch)
        losses = ours(batch)
        want, count = 0.0, 0
        for p, x in zip(pieces, pixels, strict=True):
            ids = transformers_ids(p)
            image_ids = reference.get_image_tokens(x).flatten().long()
            positions = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
            hidden = reference.model(input_ids=ids, pixel_values=x).last_hidden_state[0]
            logits = reference.lm_head(hidden[positions - 1])  # unmasked: the whole vocabulary
            want += float(F.cross_entropy(logits, image_ids, reduction="sum"))
            count += len(image_ids)
    theirs = torch.cat([reference.get_image_tokens(x).flatten() for x in pixels])
    assert torch.equal(trunk.image_targets, theirs.long())
    assert len(set(trunk.image_targets.tolist())) >= CODES // 4  # the images use many codes
    assert batch.num_image_targets("all") == count
    assert math.isclose(float(losses["image_loss_sum"]), want, rel_tol=1e-5)
    # Text targets never include an image position's code, and text never predicts one.
    assert not torch.isin(batch.labels[batch.labels != IGNORE_INDEX], trunk.image_targets).any()


def test_chameleon_round_trip_through_the_cli_gives_transformers_the_same_logits(
    chameleon_dir, tmp_path
):
    assert main(["import-hf", str(chameleon_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "chameleon"
    original = ChameleonForConditionalGeneration.from_pretrained(chameleon_dir).eval()
    again = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pieces = documents(2, seed=5)[0]
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        want = original(input_ids=transformers_ids(pieces), pixel_values=pixels).logits
        got = again(input_ids=transformers_ids(pieces), pixel_values=pixels).logits
        assert torch.equal(original.get_image_tokens(pixels), again.get_image_tokens(pixels))
    assert (want - got).abs().max() <= 1e-5


def trained_with_falling_image_loss(preset: str, hf_class, demo_data, tmp_path):
    """`preset` trained 20 steps with falling text and image losses and exported to `hf_class`:
    (ours, transformers', the decoder, the image start and end marker ids)."""
    from test_classic_designs import read_metrics
    from test_pixtral import trained_and_exported

    ours, hf, decoder = trained_and_exported(preset, hf_class, demo_data, tmp_path)
    image = [m["image_loss"] for m in read_metrics(tmp_path / "run")]
    assert sum(image[-5:]) < 0.9 * sum(image[:5]), image
    start, end = (
        decoder.tokenizer.convert_tokens_to_ids(token)
        for token in (ours.cfg.image_start_token, ours.cfg.image_end_token)
    )
    return ours, hf, decoder, start, end


def test_chameleon_preset_trains_on_the_demo_data_and_exports_to_transformers(demo_data, tmp_path):
    """The preset's text and image losses fall (its image tokens learned as text), and its
    export is a ChameleonForConditionalGeneration with our logits."""
    ours, hf, decoder, start, end = trained_with_falling_image_loss(
        "yaml/chameleon.yaml", ChameleonForConditionalGeneration, demo_data, tmp_path
    )
    size, tokens = ours.cfg.vision.image_size, ours.cfg.num_image_tokens()
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    text = [[2, 5, 9], [11, 12, 3]]
    ids = text[0] + [start] + [decoder.pad_id] * tokens + [end] + text[1]
    doc = Document(
        sample_id="probe",
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=[("text", 4), ("image", tokens), ("text", 4)],
        pixel_values=pixels,
        image_mask=torch.zeros(tokens, dtype=torch.bool),
        image_span_full=torch.zeros(tokens, dtype=torch.bool),
    )
    batch = collate([doc], image_attention="causal", attention_backend="sdpa")
    hf_ids = torch.tensor(text[0] + [start] + [hf.config.image_token_id] * tokens + [end] + text[1])
    with torch.no_grad():
        want = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        got = hf(input_ids=hf_ids[None], pixel_values=pixels).logits[0]
    assert (want - got).abs().max() <= 1e-5
