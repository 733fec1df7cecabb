"""M-RoPE (`model.image_positions: mrope`, Qwen2-VL's) against transformers' Qwen2-VL: the
positions equal `Qwen2VLModel.get_rope_index`, and a Qwen2 language model with them gives
`Qwen2VLTextModel`'s logits for the same input embeddings. Tiny random checkpoints the test
saves itself; nothing is downloaded."""

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLModel

from models.config import ModelConfig, VisionConfig
from models.pretrained import build_split_vlm
from trainer.data.decode import Document
from trainer.data.packing import collate

VISION_START, VISION_END, IMAGE = 60, 61, 62  # Qwen2-VL's <|vision_start|>, …_end, <|image_pad|>
SECTION = [2, 3, 3]  # frequencies by time, row, column: head_dim 16
GRIDS = [(4, 4), (4, 4)]  # 16 × 16 images, 4-pixel patches: one token each (our random tower)


def tiny_qwen2() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=300.0,  # short wavelengths: every axis's offset shows in the logits
        initializer_range=0.25,  # peaked attention, so that positions change the logits
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(tiny_qwen2()).save_pretrained(path)
    return path


def documents(seed: int) -> list[list[tuple[str, list[int]]]]:
    """Three documents of ("text", ids) and ("image", []) pieces: images between text, one
    document opening with an image, one with none."""
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> tuple[str, list[int]]:
        return "text", torch.randint(4, 60, (n,), generator=generator).tolist()

    return [
        [text(5), ("image", []), text(4), ("image", []), text(3)],
        [("image", []), text(6)],
        [text(9)],
    ]


def our_document(pieces, name: str) -> Document:
    """Image markers are text tokens around each image span (pad ids)."""
    ids, segments, num_images = [], [], 0
    for kind, content in pieces:
        if kind == "text":
            ids += content
            segments.append(("text", len(content)))
            continue
        rows, cols = GRIDS[num_images % len(GRIDS)]
        ids += [VISION_START] + [0] * rows * cols + [VISION_END]
        segments += [("text", 1), ("image", rows * cols), ("text", 1)]
        num_images += 1
    merged = []
    for kind, length in segments:
        if merged and kind == "text" and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + length)
        else:
            merged.append((kind, length))
    num_tokens = sum(r * c for r, c in GRIDS[:num_images]) if num_images else 0
    generator = torch.Generator().manual_seed(len(ids))
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=merged,
        pixel_values=torch.randn(num_images, 3, 16, 16, generator=generator),
        image_mask=torch.zeros(num_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_tokens, dtype=torch.bool),
        image_grids=GRIDS[:num_images],
        span_grids=GRIDS[:num_images],
    )


def transformers_positions(doc: Document) -> torch.Tensor:
    """(T, 3) of transformers' get_rope_index for one document (its grids counted in patches
    before Qwen2-VL's 2 × 2 merge)."""
    config = Qwen2VLConfig(
        text_config=tiny_qwen2().to_dict(),
        vision_config={"depth": 1, "embed_dim": 16, "num_heads": 2, "spatial_merge_size": 2},
        image_token_id=IMAGE,
        vision_start_token_id=VISION_START,
    )
    ids = doc.input_ids.clone()
    ids[ids == 0] = IMAGE
    grids = torch.tensor([[1, 2 * r, 2 * c] for r, c in doc.image_grids]).reshape(-1, 3)
    model = Qwen2VLModel.__new__(Qwen2VLModel)  # get_rope_index reads only the config
    model.config = config
    positions, _ = Qwen2VLModel.get_rope_index(model, ids[None], grids if len(grids) else None)
    return positions[:, 0].T


def test_mrope_positions_of_packed_documents_are_transformers_get_rope_index():
    docs = [our_document(pieces, str(i)) for i, pieces in enumerate(documents(0))]
    batch = collate(docs, image_attention="causal", image_positions="mrope")
    want = torch.cat([transformers_positions(doc) for doc in docs])
    assert batch.rope_positions.shape == want.shape
    assert torch.equal(batch.rope_positions, want)


def test_mrope_logits_match_qwen2_vl_text_model(qwen2_dir):
    """Our Qwen2 with M-RoPE over packed documents = transformers' Qwen2-VL language model on
    each document alone, fed the same input embeddings and its own positions."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    cfg = ModelConfig(
        pretrained_llm=str(qwen2_dir),
        num_text_in_blocks=0,
        num_image_in_blocks=0,
        num_text_head_blocks=0,
        num_image_head_blocks=0,
        image_attention="causal",
        image_positions="mrope",
        mrope_section=SECTION,
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=16, num_layers=1),
    )
    ours = build_split_vlm(cfg, seed=0).eval()
    fields = {**tiny_qwen2().to_dict(), "rope_scaling": {"type": "mrope", "mrope_section": SECTION}}
    text_config = Qwen2VLTextConfig(**fields)
    reference = Qwen2VLTextModel(text_config).eval()
    hf = Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    reference.load_state_dict(hf.model.state_dict())

    docs = [our_document(pieces, str(i)) for i, pieces in enumerate(documents(1))]
    batch = collate(docs, image_attention="causal", image_positions="mrope")
    captured = {}

    def keep_input(module, args) -> None:
        captured["x"] = args[0]

    hook = ours.core[0].register_forward_pre_hook(keep_input)
    try:
        with torch.no_grad():
            packed = ours.text_logits(batch, ours.trunk(batch), torch.arange(batch.num_tokens))
    finally:
        hook.remove()
    alone, start = [], 0
    with torch.no_grad():
        for doc in docs:
            embeddings = captured["x"][start : start + doc.num_tokens][None]
            positions = transformers_positions(doc).T[:, None]  # (3, 1, T)
            hidden = reference(inputs_embeds=embeddings, position_ids=positions).last_hidden_state
            alone.append(hf.lm_head(hidden)[0])
            start += doc.num_tokens
    worst = (packed - torch.cat(alone)).abs().max().item()
    print(f"M-RoPE logits vs Qwen2VLTextModel: max |diff| {worst:.2e}")
    assert worst <= 1e-4
    # The positions matter: the same model with 1-D positions gives other logits.
    one_d = collate(docs, image_attention="causal")
    with torch.no_grad():
        plain = ours.text_logits(one_d, ours.trunk(one_d), torch.arange(one_d.num_tokens))
    moved = (plain - packed).abs().max().item()
    print(f"the same with 1-D positions: max |diff| {moved:.2e}")
    assert moved > 1e-2


def test_mrope_needs_three_sections_of_the_head():
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig(image_positions="mrope", mrope_section=[2, 2]).validate()
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig(image_positions="mrope").validate()
