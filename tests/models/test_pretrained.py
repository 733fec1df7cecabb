"""Loading a transformers Llama / Qwen2 checkpoint through the path users use."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from models.config import ModelConfig, VisionConfig
from models.pretrained import build_split_vlm
from trainer.data.decode import Document
from trainer.data.packing import collate

# Two tiny checkpoints of the same shape; they differ in RoPE base, norm eps and tied embeddings.
TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 72,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
HF_CONFIGS = {
    "llama": LlamaConfig(**TINY, rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2": Qwen2Config(**TINY, tie_word_embeddings=True),
}


def text_doc(ids: torch.Tensor) -> Document:
    n = len(ids)
    return Document(
        sample_id="d",
        input_ids=ids,
        target_mask=torch.ones(n, dtype=torch.bool),
        segments=[("text", n)],
        pixel_values=torch.zeros(0, 3, 16, 16),
        image_mask=torch.zeros(0, dtype=torch.bool),
        image_span_full=torch.zeros(0, dtype=torch.bool),
    )


@pytest.fixture(params=sorted(HF_CONFIGS))
def checkpoint(request, tmp_path):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(HF_CONFIGS[request.param]).eval()
    hf_model.save_pretrained(tmp_path)
    return tmp_path, hf_model


def our_model(path, **overrides):
    cfg = ModelConfig(
        pretrained_llm=str(path),
        num_text_in_blocks=1,
        num_text_head_blocks=1,
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1),
        **overrides,
    )
    return build_split_vlm(cfg).eval()


def test_loaded_model_reproduces_the_checkpoint_logits_on_packed_documents(checkpoint):
    path, hf_model = checkpoint
    model = our_model(path)
    assert model.cfg.num_core_blocks == 2 and model.cfg.d_model == 32
    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 96, (n,), generator=generator) for n in (11, 5, 17)]
    batch = collate([text_doc(ids) for ids in docs])
    with torch.no_grad():
        trunk = model.trunk(batch)
        logits = model.text_logits(batch, trunk, torch.arange(batch.num_tokens))
        offset = 0
        for ids in docs:
            # Each packed document equals the checkpoint run on that document alone.
            expected = hf_model(input_ids=ids[None]).logits[0]
            got = logits[offset : offset + len(ids)]
            assert (got - expected).abs().max() <= 1e-5
            offset += len(ids)


def test_image_blocks_copy_their_neighbours(checkpoint):
    path, _ = checkpoint
    model = our_model(path, image_blocks_init="copy")
    first_text, last_text = model.text_in[0], model.text_head_blocks[-1]
    for ours, source in ((model.image_in[0], first_text), (model.image_head_blocks[0], last_text)):
        for (name, a), (_, b) in zip(
            ours.state_dict().items(), source.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name


def test_added_tokens_extend_the_vocabulary(checkpoint):
    path, hf_model = checkpoint
    model = our_model(path, vocab_size=100)  # a tokenizer with 4 added tokens
    assert model.embed.weight.shape[0] == 100
    embeddings = hf_model.get_input_embeddings().weight
    assert torch.allclose(model.embed.weight[:96], embeddings)
    assert torch.allclose(model.embed.weight[96:], embeddings.mean(0).expand(4, -1))


def test_unsupported_checkpoints_are_named(tmp_path):
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 1 layers, fewer than"):
        our_model(tmp_path)
    with pytest.raises(ValueError, match="model.pretrained_llm="):
        our_model(tmp_path / "missing")
