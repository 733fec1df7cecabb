"""The classic designs (docs/designs.md) against their transformers classes: LLaVA-1.5.

Each test builds and saves its own tiny random transformers checkpoint; nothing is downloaded."""

import gc
import io
import json
import math
from pathlib import Path
from statistics import mean

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

import yaml
from cluster.cli import main
from models.config import ModelConfig, VisionConfig, model_config_from_dict
from models.hf_designs import import_hf
from models.split_vlm import SplitVLM
from trainer.config import load_config
from trainer.data.decode import Document, SampleDecoder
from trainer.data.packing import collate
from trainer.data.shards import pack_blobs
from trainer.export import export_to_hf

REPO = Path(__file__).resolve().parents[2]
IMAGE_TOKEN = 63  # transformers' image_token_index; never a text token below
VOCAB = 64  # above the demo tokenizer's 59 tokens, so a run on the demo data can start from it
NUM_PATCHES = 16  # 16 × 16 images, 4 × 4 patches


def tiny_llava(tower: str = "clip") -> LlavaForConditionalGeneration:
    """A random LLaVA-1.5: CLIP read at layer -2 without its CLS token (or a SigLIP tower, which
    has none), a GELU projector, Llama. Every 1-D parameter (norms, biases) is moved off its
    init, so each one's mapping counts."""
    torch.manual_seed(0)
    vision_class = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[tower]
    config = LlavaConfig(
        vision_config=vision_class(
            hidden_size=24,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ).to_dict(),
        text_config=tiny_llama(),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
        projector_hidden_act="gelu",
        image_seq_length=NUM_PATCHES,
    )
    return with_random_vectors(LlavaForConditionalGeneration(config))


def tiny_llama() -> LlamaConfig:
    """The language model of the tiny LLaVA-like checkpoints."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
    )


def with_random_vectors(model):
    """`model` in eval mode with its norm weights and biases moved off their init, so that a
    norm or bias read into the wrong place changes the logits."""
    model.eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def saved(model, tmp_path_factory, name: str) -> Path:
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path


def imported_into(checkpoint: Path, tmp_path_factory, transformers_class: str) -> Path:
    out = tmp_path_factory.mktemp(f"{checkpoint.name}_import")
    assert import_hf(checkpoint, out) == transformers_class
    return out


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return saved(tiny_llava(), tmp_path_factory, "llava")


@pytest.fixture(scope="module")
def imported(llava_dir, tmp_path_factory) -> Path:
    return imported_into(llava_dir, tmp_path_factory, "LlavaForConditionalGeneration")


def documents(num_images: int, seed: int) -> list[tuple[list[int], int]]:
    """Three documents as (text ids, then an image) pieces ending in text: [(ids, images after
    them)]; the second opens with an image."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for index, length in enumerate((5, 3, 7)):
        pieces = []
        for image in range(num_images):
            count = 0 if (index == 1 and image == 0) else length + image
            pieces.append((torch.randint(4, 60, (count,), generator=generator).tolist(), 1))
        pieces.append((torch.randint(4, 60, (length + 2,), generator=generator).tolist(), 0))
        docs.append(pieces)
    return docs


def as_document(pieces, pixels: torch.Tensor, name: str) -> Document:
    """Our document: [text, N image tokens (the pad id), text, …], the layout the decoder gives
    without image markers (tested below)."""
    ids, segments = [], []
    for text, num_images in pieces:
        ids += text
        if text:
            segments.append(("text", len(text)))
        for _ in range(num_images):
            ids += [0] * NUM_PATCHES
            segments.append(("image", NUM_PATCHES))
    num_image_tokens = NUM_PATCHES * pixels.shape[0]
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=segments,
        pixel_values=pixels,
        image_mask=torch.zeros(num_image_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_image_tokens, dtype=torch.bool),
    )


def transformers_ids(pieces) -> torch.Tensor:
    ids = []
    for text, num_images in pieces:
        ids += text + [IMAGE_TOKEN] * NUM_PATCHES * num_images
    return torch.tensor([ids])


def parity(ours: SplitVLM, reference, num_images: int, seed: int, size: int = 16) -> float:
    """Max |diff| of our logits of three documents (`documents`, `size`-pixel square images)
    packed into one micro-batch against each document alone in the transformers `reference`."""
    generator = torch.Generator().manual_seed(seed)
    pieces = documents(num_images, seed=seed)
    pixels = [torch.randn(num_images, 3, size, size, generator=generator) for _ in pieces]
    docs = [as_document(p, x, str(i)) for i, (p, x) in enumerate(zip(pieces, pixels, strict=True))]
    batch = collate(docs, image_attention="causal", attention_backend="sdpa")
    with torch.no_grad():
        packed = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        alone = [
            reference(input_ids=transformers_ids(p), pixel_values=x).logits[0]
            for p, x in zip(pieces, pixels, strict=True)
        ]
    return (packed - torch.cat(alone)).abs().max().item()


@pytest.mark.parametrize("num_images", [1, 3])
def test_llava_parity_packed_documents_match_transformers_alone(imported, llava_dir, num_images):
    reference = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    ours = SplitVLM.from_pretrained(imported).eval()
    worst = parity(ours, reference, num_images, seed=num_images)
    print(f"LLaVA parity, {num_images} image(s) per document: max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_llava_parity_with_a_siglip_tower(tmp_path):
    """LLaVA with SigLIP (`vision_feature_select_strategy: full`, no CLS token to drop)."""
    tiny_llava("siglip").save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours = SplitVLM.from_pretrained(tmp_path / "ours").eval()
    assert parity(ours, reference, num_images=2, seed=7) <= 1e-4


def test_llava_import_reads_transformers_nested_tensor_names_too(llava_dir, imported, tmp_path):
    """transformers ≥ 4.52 names the tensors model.language_model.* / model.vision_tower.* in
    memory; a checkpoint saved under those names imports to the same weights."""
    renames = {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    }
    nested = {}
    for name, tensor in load_file(str(llava_dir / "model.safetensors")).items():
        prefix = next(p for p in renames if name.startswith(p))
        nested[renames[prefix] + name.removeprefix(prefix)] = tensor
    save_file(nested, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((llava_dir / "config.json").read_text())
    import_hf(tmp_path, tmp_path / "out")
    want = load_file(str(imported / "model.safetensors"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_llava_import_reads_a_sharded_checkpoint(imported, tmp_path):
    tiny_llava().save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    import_hf(tmp_path / "hf", tmp_path / "ours")
    want = load_file(str(imported / "model.safetensors"))
    got = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_llava_round_trip_through_the_cli_gives_transformers_the_same_logits(
    llava_dir, tmp_path, capsys
):
    assert main(["import-hf", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", str(tmp_path / "ours"), "--to-hf", "--out", str(tmp_path / "hf")]) == 0
    original = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert again.config.vision_feature_layer == -2
    assert again.config.image_token_index == IMAGE_TOKEN
    (pieces,) = documents(3, seed=5)[:1]
    ids = transformers_ids(pieces)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = original(input_ids=ids, pixel_values=pixels).logits
        got = again(input_ids=ids, pixel_values=pixels).logits
    assert (want - got).abs().max() <= 1e-5


def test_import_refuses_an_unsupported_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["import-hf", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'bert'" in err and "fuyu (FuyuForCausalLM)" in err


def test_export_to_hf_refuses_a_model_of_no_design_in_one_line(tmp_path, capsys):
    from models.hf_designs import write_export

    cfg = ModelConfig(vocab_size=32, vision=VisionConfig(image_size=16, patch_size=4))
    write_export(SplitVLM(cfg), tmp_path / "split")  # the split VLM: per-modality blocks
    assert main(["export", str(tmp_path / "split"), "--to-hf", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_text_in_blocks=1, LLaVA has 0" in err


def png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from trainer.data.decode import prepare_tokenizer
    from trainer.data.demo import save_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prepare_tokenizer(tokenizer)
    return tokenizer


def test_decoder_without_image_markers_puts_the_image_tokens_between_the_text(tokenizer):
    cfg = ModelConfig(
        image_markers=False,
        mask_rate_min=1.0,  # every image token masked: the first one opens the document
        vision=VisionConfig(image_size=16, patch_size=4),
    )
    sample = {
        "messages": [
            {"role": "user", "content": "<image> what is it ? <image>"},
            {"role": "assistant", "content": "red"},
        ],
        "images": pack_blobs([png(), png()]),
    }
    with_markers = SampleDecoder(tokenizer, ModelConfig(vision=cfg.vision), max_tokens=512)
    without = SampleDecoder(tokenizer, cfg, max_tokens=512)
    marked, doc = with_markers(sample, 0), without(sample, 0)
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<image_start>", "<image_end>"))
    ids = marked.input_ids.tolist()
    # The same sequence with <image_start> and <image_end> taken out.
    assert doc.input_ids.tolist() == [i for i in ids if i not in (start, end)]
    assert doc.num_tokens == marked.num_tokens - 4
    kinds = [kind for kind, _ in doc.segments]
    assert [n for kind, n in doc.segments if kind == "image"] == [NUM_PATCHES] * 2
    assert sum(n for _, n in doc.segments) == doc.num_tokens
    assert doc.target_mask.tolist() == [
        t for i, t in zip(ids, marked.target_mask.tolist(), strict=True) if i not in (start, end)
    ]
    # The default renderer starts with <bos> and <|user|>: text, image, text, image, text.
    assert kinds == ["text", "image", "text", "image", "text"]
    too_long = SampleDecoder(tokenizer, cfg, max_tokens=doc.num_tokens)
    assert too_long(sample, 0).num_tokens == doc.num_tokens  # fits exactly without markers


def test_an_image_opening_a_document_never_has_its_first_token_masked(tokenizer):
    cfg = ModelConfig(
        image_markers=False, mask_rate_min=1.0, vision=VisionConfig(image_size=16, patch_size=4)
    )
    tokenizer_bos = tokenizer.bos_token_id
    tokenizer.bos_token_id = None  # plain text without <bos>: the image is the first token
    try:
        doc = SampleDecoder(tokenizer, cfg, max_tokens=512)(
            {"text": "<image> red", "images": pack_blobs([png()])}, 0
        )
    finally:
        tokenizer.bos_token_id = tokenizer_bos
    assert doc.segments[0] == ("image", NUM_PATCHES)
    assert not doc.image_mask[0] and doc.image_mask[1:].all()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_llava_preset_trains_with_a_falling_text_loss_and_exports_to_transformers(
    tiny_overrides, tmp_path
):
    from trainer.inference import load_for_inference
    from trainer.loop import train

    cfg = load_config(
        REPO / "yaml/llava.yaml", [*tiny_overrides, "run.steps=20", "optim.warmup_steps=4"]
    )
    train(cfg)
    metrics = read_metrics(Path(cfg.run.dir))
    text = [m["text_loss"] for m in metrics]
    assert len(text) == 20 and all(math.isfinite(v) for v in text)
    assert mean(text[-5:]) < 0.9 * mean(text[:5]), text
    assert all(m.get("image_loss", 0.0) == 0.0 for m in metrics)  # no image loss in LLaVA

    # The run as a transformers LLaVA: the same logits. Its image token is the tokenizer's
    # <image> (ours has the pad id, 0, at image positions: the embedding is replaced anyway).
    assert export_to_hf(Path(cfg.run.dir), tmp_path / "hf") == "LlavaForConditionalGeneration"
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours, _, decoder = load_for_inference(Path(cfg.run.dir))
    image_id = decoder.tokenizer.convert_tokens_to_ids("<image>")
    assert hf.config.image_token_index == image_id
    assert probe_difference(ours, hf, image_id, num_tokens=16) <= 1e-5


def probe_difference(
    ours: SplitVLM, hf, image_id: int, num_tokens: int, pad_id: int = 0, size: int = 32
) -> float:
    """Max |diff| of our logits and a transformers model's (an export of ours) on one causal
    probe document: three text tokens, a `size`-pixel image of `num_tokens` tokens, three more."""
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    text = [[2, 5, 9], [11, 12, 3]]
    doc = Document(
        sample_id="probe",
        input_ids=torch.tensor(text[0] + [pad_id] * num_tokens + text[1]),
        target_mask=torch.ones(6 + num_tokens, dtype=torch.bool),
        segments=[("text", 3), ("image", num_tokens), ("text", 3)],
        pixel_values=pixels,
        image_mask=torch.zeros(num_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_tokens, dtype=torch.bool),
    )
    batch = collate([doc], image_attention="causal", attention_backend="sdpa")
    with torch.no_grad():
        want = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
        hf_ids = torch.tensor(text[0] + [image_id] * num_tokens + text[1])
        got = hf(input_ids=hf_ids[None], pixel_values=pixels).logits[0]
    return (want - got).abs().max().item()


def test_a_run_starts_from_an_imported_llava(imported, tiny_overrides, tokenizer):
    from trainer.engines.materialize import build_engine_model

    cfg = load_config(REPO / "yaml/llava.yaml", tiny_overrides)
    cfg.model = model_config_from_dict(yaml.safe_load((imported / "config.yaml").read_text()))
    cfg.checkpoint.init_from = str(imported)
    model, _ = build_engine_model(cfg, tokenizer)
    weights = load_file(str(imported / "model.safetensors"))
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert not any(p.requires_grad for p in model.vision.parameters())  # stage 2: frozen tower


def _engine_worker(
    rank: int, world_size: int, init_file: str, runs: list, out: str, preset: str
) -> None:
    import torch.distributed as dist

    from trainer.distributed import WorldInfo, world_info
    from trainer.loop import TrainLoop

    torch.set_num_threads(1)  # two ranks on two cores
    WorldInfo(rank, world_size, local_rank=rank, local_world_size=world_size).export_env()
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        for args in runs:
            TrainLoop(load_config(REPO / preset, args), world_info()).run()
        if rank == 0:
            Path(out).write_text("done")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "preset",
    [
        "yaml/llava.yaml",
        "yaml/paligemma.yaml",
        "yaml/pixtral.yaml",
        "yaml/mistral3.yaml",
        "yaml/qwen2_vl.yaml",
        "yaml/idefics3.yaml",
        "yaml/llava_next.yaml",
        "yaml/fuyu.yaml",
        "yaml/cogvlm.yaml",
        "yaml/blip2.yaml",
        "yaml/qwen_vl.yaml",
        "yaml/deepseek_vl_hybrid.yaml",
        "yaml/chameleon.yaml",
        "yaml/janus.yaml",
        "yaml/mllama.yaml",
        "yaml/idefics.yaml",
    ],
)
def test_llava_trains_alike_on_local_fsdp_and_deepspeed(demo_data, tmp_path, preset):
    """The family's engine check: 2 gloo ranks of FSDP2 and of ZeRO-3 give the local losses
    (PaliGemma too: tied embeddings, prefix-LM layouts, a trained tower; Fuyu: no tower at
    all, Persimmon's LayerNorms and biases; CogVLM: a frozen LLM, only the adaptor and the
    visual experts trained; BLIP-2: a
    frozen ViT under a trained Q-Former; Qwen-VL: a frozen LLM under a trained ViT and
    resampler; DeepSeek-VL 7B: two frozen towers on two resolutions; Chameleon: image tokens as
    vocabulary ids from a frozen VQ-VAE, their loss the LM head's; Janus: a rank's images read
    by the ViT or generated as codes, as drawn, with one tower call either way; LLaMA-3.2-Vision:
    images as a stream of keys for gated cross-attention blocks, the only trained part of the
    language model, a blank image on a rank without images; Flamingo: the same with a perceiver
    resampler's latents as the keys and per-channel gates)."""
    import torch.multiprocessing as mp

    from trainer.distributed import WorldInfo
    from trainer.loop import TrainLoop

    def args(name: str, *extra: str) -> list[str]:
        return [
            f"data.path={demo_data}",
            f"run.dir={tmp_path / name}",
            "data.global_batch_size=16",
            "data.max_tokens=256",
            "run.steps=3",
            "optim.warmup_steps=1",
            "run.log_every=1000",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            *extra,
        ]

    TrainLoop(load_config(REPO / preset, args("local")), WorldInfo()).run()
    gc.collect()  # release the streaming datasets' shared memory before the ranks open theirs
    sharded = [args("fsdp", "engine.name=fsdp"), args("ds", "engine.name=deepspeed")]
    context = mp.start_processes(
        _engine_worker,
        args=(2, str(tmp_path / "pg"), sharded, str(tmp_path / "done"), preset),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    assert context is None or context.join()

    def losses(name: str) -> list[tuple[float, float]]:
        # (text, image): the image loss is Chameleon's and Janus's image tokens' (none elsewhere)
        return [(m["text_loss"], m.get("image_loss", 0.0)) for m in read_metrics(tmp_path / name)]

    local = losses("local")
    assert len(local) == 3
    assert all(image > 0 for _, image in local) == preset.endswith(("chameleon.yaml", "janus.yaml"))
    for name in ("fsdp", "ds"):
        got = losses(name)
        assert [v for pair in got for v in pair] == pytest.approx(
            [v for pair in local for v in pair], rel=1e-5
        ), name
