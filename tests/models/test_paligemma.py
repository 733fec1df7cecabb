"""PaliGemma (docs/designs.md) against transformers' PaliGemmaForConditionalGeneration.

Each test builds and saves its own tiny random checkpoint; nothing is downloaded. PaliGemma's
processor lays a sample out as [image tokens of every image] <bos> prompt \\n | answer <eos>,
with token_type_ids 0 (prefix: bidirectional) up to the bar and 1 (suffix: causal, the loss)
after it; our documents are built the same way and packed with `image_attention="prefix"`."""

import math
from pathlib import Path
from statistics import mean

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_classic_designs import imported_into, read_metrics, saved, with_random_vectors
from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

from cluster.cli import main
from models.hf_designs import import_hf
from models.split_vlm import SplitVLM
from trainer.config import load_config
from trainer.data.decode import Document
from trainer.data.packing import collate
from trainer.export import export_to_hf

REPO = Path(__file__).resolve().parents[2]
IMAGE_TOKEN = 63  # transformers' image_token_index; never a text token below
VOCAB = 64
NUM_PATCHES = 16  # 16 × 16 images, 4 × 4 patches
BOS, NEWLINE, EOS = 2, 7, 1


def tiny_paligemma() -> PaliGemmaForConditionalGeneration:
    """A random PaliGemma: SigLIP (last hidden state), a linear projector, Gemma with a head
    width of its own. Every 1-D parameter (norms, biases) is moved off its init, so each one's
    mapping counts."""
    torch.manual_seed(0)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=24,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            vision_use_head=False,
        ).to_dict(),
        text_config=GemmaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=5000.0,
        ).to_dict(),
        image_token_index=IMAGE_TOKEN,
        vocab_size=VOCAB,
        projection_dim=32,
        hidden_size=32,
    )
    return with_random_vectors(PaliGemmaForConditionalGeneration(config))


@pytest.fixture(scope="module")
def paligemma_dir(tmp_path_factory) -> Path:
    return saved(tiny_paligemma(), tmp_path_factory, "paligemma")


@pytest.fixture(scope="module")
def imported(paligemma_dir, tmp_path_factory) -> Path:
    return imported_into(paligemma_dir, tmp_path_factory, "PaliGemmaForConditionalGeneration")


def samples(seed: int) -> list[tuple[list[int], list[int]]]:
    """Three (prefix text, suffix) pairs as PaliGemma's processor tokenizes them:
    <bos> prompt \\n and answer <eos>."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for prompt, answer in ((5, 3), (2, 6), (7, 1)):
        prompt_ids = torch.randint(8, 60, (prompt,), generator=generator).tolist()
        answer_ids = torch.randint(8, 60, (answer,), generator=generator).tolist()
        pairs.append(([BOS, *prompt_ids, NEWLINE], [*answer_ids, EOS]))
    return pairs


def as_document(prefix, suffix, pixels: torch.Tensor, name: str) -> Document:
    """Our document: the image tokens (the pad id) first, then the prefix and the suffix, the
    loss on the suffix."""
    num_image_tokens = NUM_PATCHES * pixels.shape[0]
    ids = [0] * num_image_tokens + prefix + suffix
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.tensor([False] * (len(ids) - len(suffix)) + [True] * len(suffix)),
        segments=[("image", NUM_PATCHES)] * pixels.shape[0] + [("text", len(prefix + suffix))],
        pixel_values=pixels,
        image_mask=torch.zeros(num_image_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_image_tokens, dtype=torch.bool),
    )


def transformers_logits(model, prefix, suffix, pixels: torch.Tensor) -> torch.Tensor:
    """PaliGemma in its training mode (token_type_ids and labels given): the prefix-LM mask."""
    num_prefix = NUM_PATCHES * pixels.shape[0] + len(prefix)
    ids = torch.tensor([[IMAGE_TOKEN] * (num_prefix - len(prefix)) + prefix + suffix])
    token_types = torch.tensor([[0] * num_prefix + [1] * len(suffix)])
    return model(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=torch.ones_like(ids),
        token_type_ids=token_types,
        labels=ids,
    ).logits[0]


def packed_logits(model: SplitVLM, docs: list[Document]) -> torch.Tensor:
    batch = collate(docs, image_attention="prefix", attention_backend="sdpa")
    return model.text_logits(batch, model.trunk(batch), torch.arange(batch.num_tokens))


@pytest.mark.parametrize("num_images", [1, 3])
def test_paligemma_parity_packed_documents_match_transformers_alone(
    imported, paligemma_dir, num_images
):
    reference = PaliGemmaForConditionalGeneration.from_pretrained(paligemma_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    assert ours.cfg.image_attention == "prefix" and ours.cfg.adaptor == "linear"
    generator = torch.Generator().manual_seed(num_images)
    pairs = samples(seed=num_images)
    pixels = [torch.randn(num_images, 3, 16, 16, generator=generator) for _ in pairs]
    docs = [
        as_document(prefix, suffix, x, f"doc{i}")
        for i, ((prefix, suffix), x) in enumerate(zip(pairs, pixels, strict=True))
    ]
    with torch.no_grad():
        packed = packed_logits(ours, docs)
        alone = [
            transformers_logits(reference, p, s, x) for (p, s), x in zip(pairs, pixels, strict=True)
        ]
        # The prefix-LM mask is what makes them equal: causal attention differs.
        batch = collate(docs, image_attention="causal", attention_backend="sdpa")
        causal = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"PaliGemma parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4
    assert (causal - torch.cat(alone)).abs().max() > 1e-2


def test_paligemma_import_reads_transformers_nested_tensor_names_too(
    paligemma_dir, imported, tmp_path
):
    renames = {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    }
    nested = {}
    for name, tensor in load_file(str(paligemma_dir / "model.safetensors")).items():
        prefix = next(p for p in renames if name.startswith(p))
        nested[renames[prefix] + name.removeprefix(prefix)] = tensor
    save_file(nested, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((paligemma_dir / "config.json").read_text())
    import_hf(tmp_path, tmp_path / "out")
    want = load_file(str(imported / "model.safetensors"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_paligemma_round_trip_through_the_cli_gives_transformers_the_same_logits(
    paligemma_dir, tmp_path
):
    assert main(["import-hf", str(paligemma_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = PaliGemmaForConditionalGeneration.from_pretrained(paligemma_dir).eval()
    again = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.image_token_index == IMAGE_TOKEN
    prefix, suffix = samples(seed=5)[0]
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = transformers_logits(original, prefix, suffix, pixels)
        got = transformers_logits(again, prefix, suffix, pixels)
    assert (want - got).abs().max() <= 1e-5


def test_paligemma_2_is_refused_by_name(tmp_path, capsys):
    from transformers import Gemma2Config

    config = tiny_paligemma().config.to_dict()
    text = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    config["text_config"] = text.to_dict()
    tiny = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(config))
    tiny.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gemma2' language model; supported: gemma" in err


def test_paligemma_preset_trains_with_a_falling_text_loss_and_exports_to_transformers(
    tiny_overrides, tmp_path
):
    from trainer.inference import load_for_inference
    from trainer.loop import train

    cfg = load_config(
        REPO / "yaml/paligemma.yaml", [*tiny_overrides, "run.steps=20", "optim.warmup_steps=4"]
    )
    train(cfg)
    metrics = read_metrics(Path(cfg.run.dir))
    text = [m["text_loss"] for m in metrics]
    assert len(text) == 20 and all(math.isfinite(v) for v in text)
    assert mean(text[-5:]) < 0.9 * mean(text[:5]), text
    assert all(m.get("image_loss", 0.0) == 0.0 for m in metrics)

    # The run as a transformers PaliGemma: the same logits under its prefix-LM mask.
    assert export_to_hf(Path(cfg.run.dir), tmp_path / "hf") == "PaliGemmaForConditionalGeneration"
    hf = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours, _, decoder = load_for_inference(Path(cfg.run.dir))
    image_id = decoder.tokenizer.convert_tokens_to_ids("<image>")
    assert hf.config.image_token_index == image_id
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prefix, suffix, num_patches = [2, 5, 9], [11, 12, 3], 16
    doc = Document(
        sample_id="probe",
        input_ids=torch.tensor([0] * num_patches + prefix + suffix),
        target_mask=torch.tensor([False] * (num_patches + 3) + [True] * 3),
        segments=[("image", num_patches), ("text", 6)],
        pixel_values=pixels,
        image_mask=torch.zeros(num_patches, dtype=torch.bool),
        image_span_full=torch.zeros(num_patches, dtype=torch.bool),
    )
    batch = collate([doc], image_attention="prefix", attention_backend="sdpa")
    with torch.no_grad():
        want = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        ids = torch.tensor([[image_id] * num_patches + prefix + suffix])
        got = hf(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(ids),
            token_type_ids=torch.tensor([[0] * (num_patches + 3) + [1] * 3]),
            labels=ids,
        ).logits[0]
    assert (want - got).abs().max() <= 1e-5


def test_generation_under_prefix_attention_is_transformers_generate(imported, paligemma_dir):
    """A prompt (no targets) is all prefix, as PaliGemma's prefill; each generated token is a
    target, so the answer stays causal, as its cached decoding: the same greedy tokens, and the
    same logits at every step."""
    from types import SimpleNamespace

    from trainer.inference import extend, generate_text

    reference = PaliGemmaForConditionalGeneration.from_pretrained(paligemma_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    decoder = SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=EOS))
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    prefix, _ = samples(seed=3)[0]
    prompt = as_document(prefix, [], pixels, "prompt")
    assert not prompt.target_mask.any()
    (got,) = generate_text(ours, decoder, [prompt], max_new_tokens=8)
    ids = torch.tensor([[IMAGE_TOKEN] * NUM_PATCHES + prefix])
    with torch.no_grad():
        out = reference.generate(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        want = out.sequences[0, ids.shape[1] :].tolist()
        want = want[: want.index(EOS)] if EOS in want else want
        assert len(want) >= 3 and got == want
        for step, their_logits in enumerate(out.logits[: len(want)]):
            doc = extend(prompt, want[:step]) if step else prompt
            batch = collate([doc], image_attention="prefix", attention_backend="sdpa")
            last = torch.tensor([batch.num_tokens - 1])
            logits = ours.text_logits(batch, ours.trunk(batch), last)
            assert (logits - their_logits).abs().max() <= 1e-5, step
