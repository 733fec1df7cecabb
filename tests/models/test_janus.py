"""Janus (docs/designs.md) against transformers' JanusForConditionalGeneration: one causal
decoder with two image paths. An image the model reads goes through its ViT and aligner; an
image it generates goes through its VQ-VAE into codes, which the generation embedding and
aligner feed back in and the generation head predicts, each at the position before it.

transformers runs the read path in its forward and the generation path in `generate`, one code
at a time; with teacher forcing (every code of the image fed at once) a causal decoder gives each
code the hidden state `generate` would, so the reference below is transformers' own modules
over that sequence: `prepare_embeddings_for_image_generation` for a generated image's inputs,
its language model, `generation_head` for the codes' logits.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_chameleon import (  # Janus's markers and placeholder at Chameleon's test ids
    IMAGE_TOKEN,
    NUM_TOKENS,
    as_document,
    codebook_from_encoder,
    trained_with_falling_image_loss,
    transformers_ids,
)
from test_classic_designs import documents, imported_into, saved, tiny_llama, with_random_vectors
from transformers import JanusConfig, JanusForConditionalGeneration

from cluster.cli import main
from models.batch import IGNORE_INDEX
from models.split_vlm import SplitVLM
from trainer.data.decode import Document
from trainer.data.packing import collate

CODES = 32  # 16 × 16 images: 4 × 4 patches of the ViT, 4 × 4 codes of the VQ-VAE (NUM_TOKENS)


def tiny_janus() -> JanusForConditionalGeneration:
    torch.manual_seed(0)
    llama = tiny_llama()
    width = llama.hidden_size
    config = JanusConfig(
        text_config=llama.to_dict(),
        vision_config=dict(
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2.0,
            image_size=16,
            patch_size=4,
            projection_dim=width,
            depth=2,
            num_image_tokens=NUM_TOKENS,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=CODES,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1, 1],
            num_res_blocks=1,
            num_patches=4,
            projection_dim=width,
            image_token_embed_dim=width,
            num_hidden_layers=2,
        ),
        image_token_id=IMAGE_TOKEN,
    )
    model = with_random_vectors(JanusForConditionalGeneration(config))
    codebook_from_encoder(model.model.vqmodel, CODES)
    with torch.no_grad():  # a generation path whose output depends on its input
        for name, parameter in model.model.named_parameters():
            if name.startswith("generation_") and parameter.dim() == 2:
                parameter.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory) -> Path:
    return saved(tiny_janus(), tmp_path_factory, "janus")


@pytest.fixture(scope="module")
def imported(janus_dir, tmp_path_factory) -> Path:
    return imported_into(janus_dir, tmp_path_factory, "JanusForConditionalGeneration")


def packed(num_images: int, seed: int, generated):
    """Three documents, each with `num_images` images of which `generated(doc, image)` are
    generated, packed into one micro-batch: (pieces, pixels, flags, batch)."""
    generator = torch.Generator().manual_seed(seed)
    pieces = documents(num_images, seed=seed)
    pixels = [torch.rand(num_images, 3, 16, 16, generator=generator) * 2 - 1 for _ in pieces]
    flags = [[generated(d, i) for i in range(num_images)] for d in range(len(pieces))]
    docs = [
        as_document(p, x, str(i), f)
        for i, (p, x, f) in enumerate(zip(pieces, pixels, flags, strict=True))
    ]
    return pieces, pixels, flags, collate(docs, image_attention="causal", attention_backend="sdpa")


def transformers_alone(reference, pieces, pixels, generated, ids=None, slots=None):
    """One document alone through transformers' modules: (text logits (T, V), the generated
    images' codes (G · n,), the generation head's logits of each code at the position before
    it (G · n, codes)). The document: `pieces` (the test's ids), or `ids` (1, T) with its
    image tokens at `slots`."""
    if ids is None:
        ids = transformers_ids(pieces)
        slots = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    slots = slots.view(len(pixels), -1)
    model = reference.model
    embeds = model.get_input_embeddings()(ids)
    made = torch.tensor(generated)
    codes = torch.zeros(0, slots.shape[1], dtype=torch.long)
    if (~made).any():
        read = model.get_image_features(pixels[~made])
        embeds[0, slots[~made].flatten()] = read.flatten(0, 1)
    if made.any():
        codes = model.vqmodel.encode(pixels[made])[2].view(-1, slots.shape[1])
        inputs = reference.prepare_embeddings_for_image_generation(codes)
        embeds[0, slots[made].flatten()] = inputs.flatten(0, 1)
    hidden = model.language_model(inputs_embeds=embeds).last_hidden_state[0]
    head = model.generation_head(hidden[slots[made].flatten() - 1])
    return reference.lm_head(hidden), codes.flatten(), head


@pytest.mark.parametrize("num_images", [1, 3])
def test_janus_parity_packed_documents_match_transformers_alone(imported, janus_dir, num_images):
    """Every image read: transformers' own forward, each document alone."""
    reference = JanusForConditionalGeneration.from_pretrained(janus_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.vision.tower == "janus" and ours.cfg.image_target == "tokens"
    pieces, pixels, _, batch = packed(num_images, num_images, lambda d, i: False)
    with torch.no_grad():
        got = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        want = torch.cat(
            [
                reference(input_ids=transformers_ids(p), pixel_values=x).logits[0]
                for p, x in zip(pieces, pixels, strict=True)
            ]
        )
    worst = (got - want).abs().max().item()
    print(f"Janus parity, {num_images} image(s) per document, all read: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_janus_parity_with_generated_images_packed_match_transformers_alone(imported, janus_dir):
    """Read and generated images mixed in packed documents: the generated ones' codes are
    transformers' VQ-VAE's, our image loss is the cross-entropy of its generation head at the
    position before each code, and the text logits (a generated image in view) are its own."""
    reference = JanusForConditionalGeneration.from_pretrained(janus_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    pieces, pixels, flags, batch = packed(3, 11, lambda d, i: (d + i) % 2 == 0)
    with torch.no_grad():
        trunk = ours.trunk(batch)
        got_text = ours.text_logits(batch, trunk, torch.arange(batch.num_tokens))
        losses = ours(batch)
        alone = [
            transformers_alone(reference, p, x, f)
            for p, x, f in zip(pieces, pixels, flags, strict=True)
        ]
    want_text = torch.cat([text for text, _, _ in alone])
    codes = torch.cat([c for _, c, _ in alone])
    want_loss = sum(float(F.cross_entropy(h, c, reduction="sum")) for _, c, h in alone)
    worst = (got_text - want_text).abs().max().item()
    print(f"Janus parity with generated images: text max |diff| {worst:.2e}")
    assert worst <= 1e-4
    assert torch.equal(trunk.image_targets[batch.image_mask], codes)
    assert len(set(codes.tolist())) >= CODES // 4  # the images use many codes
    assert batch.num_image_targets("masked") == len(codes) == 16 * sum(map(sum, flags))
    assert math.isclose(float(losses["image_loss_sum"]), want_loss, rel_tol=1e-5)


def test_janus_read_images_have_no_loss_and_generated_ones_their_codes_as_inputs(imported):
    """A read image adds nothing to the image loss and has no target; a generated image's
    inputs are its codes' embeddings through the generation aligner (teacher forcing), not the
    mask token, though its tokens are the masked ones."""
    ours = SplitVLM.from_pretrained(imported).eval()
    _, _, _, read_only = packed(1, 3, lambda d, i: False)
    _, _, _, mixed = packed(2, 3, lambda d, i: i == 0)
    with torch.no_grad():
        assert float(ours(read_only)["image_loss_sum"]) == 0.0
        inputs, targets = ours.image_inputs_and_targets(
            mixed.pixel_values, mixed.image_mask, mixed.image_grids
        )
        made = mixed.image_mask
        assert (targets[~made] == IGNORE_INDEX).all() and (targets[made] >= 0).all()
        assert torch.equal(inputs[made], ours.generation.embed(targets[made]))
        assert float(ours(mixed)["image_loss_sum"]) > 0.0


def test_janus_image_generation_gives_transformers_codes(imported, janus_dir):
    """Greedy codes with classifier-free guidance (`generate_codes`) are transformers'
    `generate(generation_mode="image")`'s: the unconditional prompt all pad but BOS and
    <begin_of_image>, the logits u + scale · (c − u), each code fed back through the
    generation aligner."""
    from transformers import GenerationConfig

    from trainer.inference import generate_codes

    reference = JanusForConditionalGeneration.from_pretrained(janus_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    bos, pad = 1, 0
    text = documents(1, seed=9)[0][0][0]
    doc = as_document([([bos, *text], 1)], torch.zeros(1, 3, 16, 16), "prompt", [True])
    prompt = torch.tensor([[bos, *text, 61]])  # … <begin_of_image>
    config = GenerationConfig(
        do_sample=False,
        bos_token_id=bos,
        pad_token_id=pad,
        guidance_scale=3.0,
        generation_kwargs={"boi_token_id": 61},
    )
    with torch.no_grad():
        want = reference.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            generation_mode="image",
            generation_config=config,
        )[0]
    got = generate_codes(ours, doc, keep=[bos, 61], pad_id=pad, guidance_scale=3.0, greedy=True)
    assert len(set(want.tolist())) > 1  # not one code repeated
    assert torch.equal(got, want)
    unguided = generate_codes(
        ours, doc, keep=[bos, 61], pad_id=pad, guidance_scale=1.0, greedy=True
    )
    assert not torch.equal(unguided, want)  # the guidance is what made them


def test_janus_round_trip_through_the_cli_gives_transformers_the_same_logits(janus_dir, tmp_path):
    assert main(["import-hf", str(janus_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "janus"
    original = JanusForConditionalGeneration.from_pretrained(janus_dir).eval()
    again = JanusForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pieces = documents(2, seed=5)[0]
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        for flags in ([False, False], [True, False]):
            want = transformers_alone(original, pieces, pixels, flags)
            got = transformers_alone(again, pieces, pixels, flags)
            for a, b in zip(want, got, strict=True):
                assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5)


def test_janus_preset_trains_on_the_demo_data_and_exports_to_transformers(demo_data, tmp_path):
    """Both losses fall (text, and the generated images' codes), and the export is a
    JanusForConditionalGeneration with our logits."""
    ours, hf, decoder, start, end = trained_with_falling_image_loss(
        "yaml/janus.yaml", JanusForConditionalGeneration, demo_data, tmp_path
    )
    size, tokens = ours.cfg.vision.image_size, ours.cfg.num_image_tokens()
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    text = [[2, 5, 9], [11, 12, 3], [7, 8]]
    image = [start] + [decoder.pad_id] * tokens + [end]
    ids = text[0] + image + text[1] + image + text[2]
    segments = [("text", 4), ("image", tokens), ("text", 5), ("image", tokens), ("text", 3)]
    mask = torch.tensor([True, False]).repeat_interleave(tokens)  # the first one generated
    doc = Document(
        sample_id="probe",
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=segments,
        pixel_values=pixels,
        image_mask=mask,
        image_span_full=mask.clone(),
    )
    batch = collate([doc], image_attention="causal", attention_backend="sdpa")
    placeholder = [start] + [hf.config.image_token_id] * tokens + [end]
    hf_ids = text[0] + placeholder + text[1] + placeholder + text[2]
    with torch.no_grad():
        want = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        # One document: transformers' image positions are ours.
        ids, slots = torch.tensor([hf_ids]), batch.image_index
        got, _, _ = transformers_alone(hf, None, pixels, [True, False], ids, slots)
    assert (want - got).abs().max() <= 1e-5
    # It generates an image from a prompt: codes, then its VQ-VAE's decoder.
    from trainer.inference import generate_image

    generated, _ = generate_image(ours, decoder, "a red circle", seed=0)
    assert generated.size == (size, size)
