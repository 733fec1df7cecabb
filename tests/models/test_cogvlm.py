"""CogVLM (docs/designs.md): a visual expert in every block over the merged sequence and one
position per image. transformers has no CogVLM class, so these tests check the defining
properties against our own model (the engines test is in test_classic_designs)."""

from pathlib import Path

import pytest
import torch
from test_pixtral import _merged

from models.config import ModelConfig, VisionConfig
from models.pretrained import build_split_vlm
from models.split_vlm import SplitVLM
from trainer.config import load_config
from trainer.data.decode import Document
from trainer.data.packing import collate
from trainer.optim import apply_freeze

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64
GRID = 2  # 16-pixel images, 8-pixel patches: 2 × 2 image tokens
START, END = 61, 62  # <image_start>, <image_end>


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        num_text_in_blocks=0,
        num_image_in_blocks=0,
        num_core_blocks=2,
        num_text_head_blocks=1,
        num_image_head_blocks=0,
        image_attention="causal",
        image_positions="collapsed",
        visual_expert=True,
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        init_std=0.2,  # peaked attention: a token routed to the wrong weights shows
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1),
    )
    return ModelConfig(**{**fields, **overrides})


def document(pieces, name: str, seed: int) -> Document:
    """[text, <image_start>, 2 × 2 image tokens, <image_end>, …] from (text ids, images after
    them) pieces, with random pixels."""
    ids, segments, num_images = [], [], 0
    for text, images in pieces:
        ids += text
        segments.append(("text", len(text)))
        for _ in range(images):
            ids += [START, *[0] * GRID**2, END]
            segments += [("text", 1), ("image", GRID**2), ("text", 1)]
            num_images += 1
    merged = _merged(segments)
    generator = torch.Generator().manual_seed(seed)
    num_tokens = GRID**2 * num_images
    return Document(
        sample_id=name,
        input_ids=torch.tensor(ids),
        target_mask=torch.ones(len(ids), dtype=torch.bool),
        segments=merged,
        pixel_values=torch.randn(num_images, 3, 16, 16, generator=generator),
        image_mask=torch.zeros(num_tokens, dtype=torch.bool),
        image_span_full=torch.zeros(num_tokens, dtype=torch.bool),
    )


DOCS = [
    [([5, 6, 7], 1), ([8, 9], 0)],
    [([], 1), ([10, 11, 12, 13], 1), ([14], 0)],
    [([15, 16, 17, 18, 19], 0)],
]


def docs():
    return [document(pieces, f"doc{i}", seed=i) for i, pieces in enumerate(DOCS)]


def logits(model: SplitVLM, documents) -> torch.Tensor:
    batch = collate(documents, image_attention="causal", image_positions="collapsed")
    return model.text_logits(batch, model.trunk(batch), torch.arange(batch.num_tokens))


def cogvlm_positions(token_types: list[int]) -> list[int]:
    """The published CogVLM rule (`build_position_ids`) for one sequence, token type 1 for its
    vision tokens (boi, patches, eoi), 0 for text: boi and eoi count as text, and only the first
    patch of a run of vision tokens takes a new position."""
    types = list(token_types)
    for i, kind in enumerate(token_types):
        first = kind == 1 and (i == 0 or token_types[i - 1] == 0)
        last = kind == 1 and (i == len(types) - 1 or token_types[i + 1] == 0)
        if first or last:
            types[i] = 0
    positions, current = [], 0
    for i, kind in enumerate(types):
        if i > 0 and (kind == 0 or types[i - 1] == 0):
            current += 1
        positions.append(current)
    return positions


def test_an_images_tokens_share_one_position_as_cogvlm_numbers_them():
    documents = docs()
    batch = collate(documents, image_attention="causal", image_positions="collapsed")
    want = []
    for doc in documents:
        ids = doc.input_ids.tolist()
        inside = False
        types = []
        for token in ids:  # boi, patches and eoi are CogVLM's vision tokens
            inside = inside or token == START
            types.append(1 if inside else 0)
            inside = inside and token != END
        want += cogvlm_positions(types)
    assert batch.rope_positions[:, 0].tolist() == want
    assert torch.equal(batch.rope_positions[:, 0], batch.rope_positions[:, 1])
    assert want[:10] == [0, 1, 2, 3, 4, 4, 4, 4, 5, 6]  # text, boi, 4 patches, eoi, text


def test_an_expert_equal_to_the_text_weights_is_the_model_without_one():
    """The visual expert starts as its block's text weights, and routing tokens to it loses
    nothing: the same logits as the same model without experts."""
    torch.manual_seed(0)
    with_expert = SplitVLM(tiny_cfg())
    with_expert.reset_parameters(seed=3)
    without = SplitVLM(tiny_cfg(visual_expert=False))
    without.reset_parameters(seed=3)
    for block in with_expert.transformer_blocks():
        assert torch.equal(block.expert.wq.weight, block.attn.wq.weight)
        assert torch.equal(block.expert.mlp.down.weight, block.mlp.down.weight)
    assert all(block.expert is None for block in with_expert.image_in)
    with torch.no_grad():
        assert torch.allclose(logits(with_expert, docs()), logits(without, docs()), atol=1e-6)


def test_the_expert_weights_take_exactly_the_image_tokens():
    model = SplitVLM(tiny_cfg())
    model.reset_parameters(seed=1)
    batch = collate(docs(), image_attention="causal", image_positions="collapsed")
    block = model.core[0]
    seen = {}
    block.attn.register_forward_pre_hook(lambda _, args: seen.update(x=args[0]))
    for name, module in (("text", block.attn.wq), ("image", block.expert.wq)):
        module.register_forward_hook(lambda _, args, out, name=name: seen.update({name: args[0]}))
    model.text_logits(batch, model.trunk(batch), torch.arange(batch.num_tokens))
    assert torch.equal(seen["image"], seen["x"][batch.image_index])
    assert torch.equal(seen["text"], seen["x"][batch.text_index])
    assert len(batch.image_index) == 3 * GRID**2  # the three images' tokens; markers are text

    # A text-only micro-batch: the experts get exactly zero gradient, the text weights do not.
    text_only = collate([docs()[2]], image_attention="causal", image_positions="collapsed")
    out = model(text_only)
    out["text_loss_sum"].backward()
    assert all(
        p.grad is None or not p.grad.any() for n, p in model.named_parameters() if ".expert." in n
    )
    assert model.core[0].attn.wq.weight.grad.abs().sum() > 0


def test_changing_the_experts_changes_nothing_before_the_first_image():
    model = SplitVLM(tiny_cfg())
    model.reset_parameters(seed=2)
    with torch.no_grad():
        before = logits(model, docs())
        for name, parameter in model.named_parameters():
            if ".expert." in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
        after = logits(model, docs())
    first_image = 4  # document 0: three text tokens and <image_start> see no image token
    assert torch.equal(before[:first_image], after[:first_image])
    assert (before[first_image:] - after[first_image:]).abs().max() > 1e-3
    text_only = slice(-5, None)  # document 2: text only, unaffected
    assert torch.equal(before[text_only], after[text_only])


def test_packed_documents_equal_each_alone():
    model = SplitVLM(tiny_cfg()).eval()
    model.reset_parameters(seed=4)
    with torch.no_grad():
        packed = logits(model, docs())
        alone = torch.cat([logits(model, [doc]) for doc in docs()])
    assert (packed - alone).abs().max() <= 1e-5


def test_a_pretrained_llm_fills_the_experts_from_its_layers(tmp_path):
    from test_pretrained import HF_CONFIGS, save_checkpoint

    hf_model = save_checkpoint(HF_CONFIGS["llama"], tmp_path)
    cfg = tiny_cfg(pretrained_llm=str(tmp_path), num_text_head_blocks=1)
    model = build_split_vlm(cfg, seed=0)
    state = hf_model.state_dict()
    for index, block in enumerate(model.core):
        layer = f"model.layers.{index}."
        assert torch.equal(block.expert.wk.weight, state[layer + "self_attn.k_proj.weight"])
        assert torch.equal(block.expert.mlp.gate.weight, state[layer + "mlp.gate_proj.weight"])
    assert torch.equal(
        model.text_head_blocks[0].expert.wo.weight, state["model.layers.3.self_attn.o_proj.weight"]
    )


def test_the_preset_trains_the_adaptor_and_the_experts_only():
    cfg = load_config(REPO / "yaml/cogvlm.yaml", [])
    cfg.model.vocab_size = VOCAB
    model = SplitVLM(cfg.model)
    apply_freeze(model, cfg.optim.freeze)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adaptor", "core"}
    core = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("core")]
    assert core and all(".expert." in n for n in core)


@pytest.mark.parametrize("positions", ["collapsed", "shared"])
def test_positions_after_an_image_continue_one_past_it_only_when_collapsed(positions):
    doc = docs()[0]
    batch = collate([doc], image_attention="causal", image_positions=positions)
    after_end = batch.rope_positions[9, 0].item()  # the first text token after <image_end>
    assert after_end == (6 if positions == "collapsed" else 9)
