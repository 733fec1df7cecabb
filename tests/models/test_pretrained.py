"""Loading transformers checkpoints (Llama, Llama 3, Mistral, Qwen2, Qwen3, Gemma, Gemma 3,
Persimmon) tensor by tensor from their safetensors, through the path users use."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open as real_safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PersimmonConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import models.pretrained
import models.safetensors_dir
import yaml
from models.blocks import rope_tables
from models.config import ModelConfig, VisionConfig
from models.pretrained import PretrainedLLM, build_split_vlm, checkpoint_tensors
from models.split_vlm import SplitVLM
from trainer.data.decode import Document
from trainer.data.packing import collate

# Tiny checkpoints of the same shape; they differ in RoPE (base, Llama-3 scaling), norm eps,
# tied embeddings, q/k/v biases (Qwen2), per-head q/k norms with a head width of their own
# (Qwen3: 4 heads × 16 != 32), sliding windows short enough to cut into the test documents
# (Mistral: every layer; Qwen3: layers from max_window_layers on), Gemma 3's block, and
# Persimmon's (LayerNorms, fused q/k/v, RoPE on half of each head, biases, squared ReLU), and
# OPT's (learned positions, no RoPE).
TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 72,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# With head dim 8 and base 5000 the wavelengths are 6, 53, 444 and 3736 positions: one kept
# (< 64 / 4), one interpolated, two slowed by the factor (> 64 / 1).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Gemma 3: (1 + w) norms around both sublayers, scaled embeddings, GELU, q/k norms, a softmax
# scale of its own (24^-0.5, not 16^-0.5), and a mix of layer types: the text-in block (layer 0),
# core layer 1 and the text-head block (layer 3) slide over 4 positions with RoPE base 500, the
# full layer 2 has base 20000 with linear scaling.
GEMMA3_TEXT = {
    **TINY,
    "head_dim": 16,
    "query_pre_attn_scalar": 24,
    "sliding_window": 4,
    "layer_types": ["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
    "rope_theta": 20000.0,
    "rope_local_base_freq": 500.0,
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
}
# The vision-language Gemma 3 (Gemma3ForConditionalGeneration): its language model is loaded, its
# vision tower and projector are not.
GEMMA3_VISION = SiglipVisionConfig(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
HF_CONFIGS = {
    "llama": LlamaConfig(**TINY, rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama3": LlamaConfig(**TINY, rope_theta=5000.0, rope_scaling=LLAMA3_ROPE),
    "mistral": MistralConfig(**TINY, sliding_window=None, rope_theta=20000.0),
    "mistral_window": MistralConfig(**TINY, sliding_window=4),
    "qwen2": Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**TINY, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen3_window": Qwen3Config(
        **TINY, head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=2
    ),
    # Gemma (1): (1 + w) norms, scaled embeddings, GELU, tied embeddings, its own head width.
    "gemma": GemmaConfig(**TINY, head_dim=16, rope_theta=2000.0),
    "gemma3_text": Gemma3TextConfig(**GEMMA3_TEXT),
    # No GQA: Persimmon has no num_key_value_heads.
    "persimmon": PersimmonConfig(
        **{k: v for k, v in TINY.items() if k != "num_key_value_heads"},
        rope_theta=3000.0,
        partial_rotary_factor=0.5,
        qk_layernorm=True,
    ),
    # OPT: learned positions (offset 2) and no RoPE, LayerNorms, biases, ReLU, tied embeddings.
    "opt": OPTConfig(
        vocab_size=96,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=72,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
    "gemma3": Gemma3Config(
        text_config=GEMMA3_TEXT, vision_config=GEMMA3_VISION.to_dict(), mm_tokens_per_image=4
    ),
}
SHARDED = {
    "llama3",
    "qwen3",
    "gemma3_text",
    "persimmon",
}  # saved as an index and shards; the others as one file
TWO_LAYERS = {**TINY, "num_hidden_layers": 2}


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


def save_checkpoint(hf_config, path, sharded=False):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():  # norms start at 1 (0 in Gemma), biases at 0: make each one tell
        for parameter in hf_model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.5 * torch.randn_like(parameter))
    hf_model.save_pretrained(path, max_shard_size="50KB" if sharded else "1GB")
    assert (path / "model.safetensors.index.json").is_file() == sharded
    return hf_model


@pytest.fixture(params=sorted(HF_CONFIGS))
def checkpoint(request, tmp_path):
    hf_model = save_checkpoint(HF_CONFIGS[request.param], tmp_path, request.param in SHARDED)
    return tmp_path, hf_model


def tiny_config(path, **overrides) -> ModelConfig:
    return ModelConfig(
        pretrained_llm=str(path),
        num_text_in_blocks=1,
        num_text_head_blocks=1,
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1),
        **overrides,
    )


def our_model(path, **overrides):
    return build_split_vlm(tiny_config(path, **overrides)).eval()


def test_loaded_model_reproduces_the_checkpoint_logits_alone_and_packed(checkpoint, monkeypatch):
    path, hf_model = checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("loading built a transformers model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", refuse)
    model = our_model(path)
    assert model.cfg.num_core_blocks == 2 and model.cfg.d_model == 32
    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 96, (n,), generator=generator) for n in (11, 5, 17)]
    with torch.no_grad():
        expected = [hf_model(input_ids=ids[None]).logits[0] for ids in docs]
        for batch_docs in ([docs[2]], docs):  # one document alone, then all of them packed
            batch = collate([text_doc(ids) for ids in batch_docs])
            trunk = model.trunk(batch)
            logits = model.text_logits(batch, trunk, torch.arange(batch.num_tokens))
            # Each packed document equals the checkpoint run on that document alone.
            theirs = torch.cat(expected[-len(batch_docs) :])
            assert (logits - theirs).abs().max() <= 1e-5


def test_llama3_rope_scaling_gives_the_checkpoint_frequencies(tmp_path):
    hf_config = HF_CONFIGS["llama3"]
    save_checkpoint(hf_config, tmp_path)
    cfg = tiny_config(tmp_path)
    PretrainedLLM(tmp_path).apply_config(cfg)
    positions = torch.arange(300)
    cos, sin = rope_tables(positions[:, None].repeat(1, 2), cfg).full
    reference = LlamaRotaryEmbedding(hf_config)
    their_cos, their_sin = reference(torch.zeros(1), positions[None])
    assert torch.allclose(cos, their_cos[0, :, :4], atol=1e-6)
    assert torch.allclose(sin, their_sin[0, :, :4], atol=1e-6)
    cfg.rope_llama3_factor = 0.0
    assert not torch.allclose(rope_tables(positions[:, None].repeat(1, 2), cfg).full[0], cos)


def test_gemma3_sliding_layers_get_the_local_rope_and_full_layers_the_scaled_global_one(
    tmp_path,
):
    hf_config = HF_CONFIGS["gemma3_text"]
    save_checkpoint(hf_config, tmp_path)
    model = our_model(tmp_path, image_blocks_init="copy")
    sliding = [block.sliding for block in model.transformer_blocks()]
    # text_in (layer 0), image_in (copies layer 0), core (1, 2), text head (3), image head (3)
    assert sliding == [True, True, True, False, True, True]
    assert {block.attn.window for block in model.transformer_blocks()} == {4, None}
    positions = torch.arange(300)
    tables = rope_tables(positions[:, None].repeat(1, 2), model.cfg)
    local_config = Gemma3TextConfig(**GEMMA3_TEXT)
    local_config.rope_theta, local_config.rope_scaling = 500.0, None
    for ours, reference in (
        (tables.full, Gemma3RotaryEmbedding(hf_config)),
        (tables.sliding, Gemma3RotaryEmbedding(local_config)),
    ):
        their_cos, their_sin = reference(torch.zeros(1), positions[None])
        assert torch.allclose(ours[0], their_cos[0, :, :8], atol=1e-6)
        assert torch.allclose(ours[1], their_sin[0, :, :8], atol=1e-6)
    assert not torch.allclose(tables.full[0], tables.sliding[0])


def test_gemma3_export_round_trip_and_fresh_init_keep_the_norm_offsets(tmp_path):
    checkpoint_dir, export_dir = tmp_path / "checkpoint", tmp_path / "export"
    save_checkpoint(HF_CONFIGS["gemma3_text"], checkpoint_dir)
    model = our_model(checkpoint_dir)
    export_dir.mkdir()
    (export_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(model.cfg)))
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    save_file(weights, export_dir / "model.safetensors")
    exported = SplitVLM.from_pretrained(export_dir).eval()
    batch = collate([text_doc(torch.arange(13) % 96)])
    positions = torch.arange(batch.num_tokens)
    with torch.no_grad():
        expected = model.text_logits(batch, model.trunk(batch), positions)
        assert torch.equal(exported.text_logits(batch, exported.trunk(batch), positions), expected)
    # A fresh model of the same config: (1 + w) norms start at w = 0, gain 1.
    model.reset_parameters(seed=0)
    norms = [
        parameter
        for name, parameter in model.named_parameters()
        if name.endswith("norm.weight") and model.parameter_component(name) == "llm"
    ]
    assert len(norms) == 2 + 6 * 6  # text and image norm; 4 and q/k norms in each of 6 blocks
    assert all(torch.equal(norm, torch.zeros_like(norm)) for norm in norms)


def test_image_blocks_copy_their_neighbours(checkpoint):
    path, _ = checkpoint
    model = our_model(path, image_blocks_init="copy")
    first_text, last_text = model.text_in[0], model.text_head_blocks[-1]
    for ours, source in ((model.image_in[0], first_text), (model.image_head_blocks[0], last_text)):
        for (name, a), (_, b) in zip(
            ours.state_dict().items(), source.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name


def test_added_tokens_extend_the_vocabulary(checkpoint, monkeypatch):
    path, hf_model = checkpoint
    # The mean row is averaged over row chunks (here 7 rows) rather than the whole matrix.
    monkeypatch.setattr(PretrainedLLM, "mean_chunk_elements", 7 * 32)
    model = our_model(path, vocab_size=100)  # a tokenizer with 4 added tokens
    assert model.embed.weight.shape[0] == 100
    for ours, theirs in (
        (model.embed.weight, hf_model.get_input_embeddings().weight),
        (model.lm_head.weight, hf_model.get_output_embeddings().weight),
    ):
        assert torch.allclose(ours[:96], theirs)
        assert torch.allclose(ours[96:], theirs.mean(0).expand(4, -1))


class RecordingSafeOpen:
    """safe_open that records what is read: (tensor, "whole") or (tensor, (start, stop))."""

    def __init__(self):
        self.reads = []

    def __call__(self, *args, **kwargs):
        return _RecordingHandle(real_safe_open(*args, **kwargs), self.reads)


class _RecordingHandle:
    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def __enter__(self):
        self.inner = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, name):
        self.reads.append((name, "whole"))
        return self.inner.get_tensor(name)

    def get_slice(self, name):
        inner, reads = self.inner.get_slice(name), self.reads

        class Slice:
            def get_shape(self):
                return inner.get_shape()

            def __getitem__(self, rows):
                reads.append((name, (rows.start, rows.stop)))
                return inner[rows]

        return Slice()


def test_sharded_engines_read_their_rows_of_any_llm_parameter(tmp_path, monkeypatch):
    hf_model = save_checkpoint(HF_CONFIGS["qwen3"], tmp_path, sharded=True)
    cfg = tiny_config(tmp_path, vocab_size=100, image_blocks_init="copy")
    llm = PretrainedLLM(tmp_path)
    llm.apply_config(cfg)
    # Every parameter of the language model, the copied image blocks included, and nothing else.
    model = SplitVLM(cfg)
    not_llm = ("vision.", "adaptor.", "mask_embedding", "image_head.")
    llm_names = {name for name, _ in model.named_parameters() if not name.startswith(not_llm)}
    assert set(llm.source_names()) == llm_names == PretrainedLLM.for_model(model).names
    full = {name: llm.read(name) for name in llm.source_names()}
    assert all(tensor.dtype == torch.float32 for tensor in full.values())
    q_norm = hf_model.state_dict()["model.layers.2.self_attn.q_norm.weight"]
    assert torch.equal(full["core.1.attn.q_norm.weight"], q_norm)
    recorder = RecordingSafeOpen()
    monkeypatch.setattr(models.safetensors_dir, "safe_open", recorder)
    layer_1_q, layer_3_down = "model.layers.1.self_attn.q_proj", "model.layers.3.mlp.down_proj"
    for name, rows, expected_reads in (
        ("embed.weight", slice(90, 100), [("model.embed_tokens.weight", (90, 96))]),
        ("embed.weight", slice(97, 99), []),  # added tokens only: the cached mean row
        ("lm_head.weight", slice(0, 50), [("lm_head.weight", (0, 50))]),
        ("core.0.attn.wq.weight", slice(16, 40), [(f"{layer_1_q}.weight", (16, 40))]),
        ("image_head_blocks.0.mlp.down.weight", slice(3, 5), [(f"{layer_3_down}.weight", (3, 5))]),
        ("text_norm.weight", slice(5, 9), [("model.norm.weight", (5, 9))]),
    ):
        recorder.reads.clear()
        assert torch.equal(llm.read(name, rows), full[name][rows]), (name, rows)
        assert recorder.reads == expected_reads, name


@pytest.mark.parametrize("family", ["persimmon", "qwen2", "opt"])
def test_what_is_read_writes_back_as_the_checkpoint_fused_qkv_included(tmp_path, family):
    """Export's inverse of the reading plan gives every tensor of the checkpoint back, bit for
    bit; Persimmon's fused q/k/v (rows per head: q, k, v) is read a third at a time."""
    hf_model = save_checkpoint(HF_CONFIGS[family], tmp_path)
    cfg = tiny_config(tmp_path)
    llm = PretrainedLLM(tmp_path)
    llm.apply_config(cfg)
    ours = {name: llm.read(name) for name in llm.source_names()}
    written = checkpoint_tensors(llm.family, cfg, ours)
    theirs = hf_model.state_dict()
    if cfg.tie_embeddings:
        del theirs["lm_head.weight"]
    assert written.keys() == theirs.keys()
    assert all(torch.equal(written[name], theirs[name]) for name in theirs)
    if family == "persimmon":
        fused = theirs["model.layers.1.self_attn.query_key_value.weight"].view(4, 3, 8, 32)
        assert torch.equal(ours["core.0.attn.wk.weight"], fused[:, 1].reshape(32, 32))
        assert torch.equal(
            llm.read("core.0.attn.wv.weight", slice(8, 20)), fused[:, 2].reshape(32, 32)[8:20]
        )


def write_checkpoint(path, hf_config=None) -> dict:
    """A two-layer Llama checkpoint in one file; its tensors, to rewrite them."""
    save_checkpoint(hf_config or LlamaConfig(**TWO_LAYERS), path)
    return load_file(path / "model.safetensors")


def error_of(path) -> str:
    with pytest.raises(ValueError) as info:
        our_model(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "hf_config, expected",
    [
        (GPT2Config(n_layer=2, n_embd=16, n_head=2), "a 'gpt2' model; supported: llama, mistral"),
        (
            Gemma3TextConfig(**TWO_LAYERS, head_dim=8, final_logit_softcapping=30.0),
            "final_logit_softcapping=30.0 is not supported (only null)",
        ),
        (
            Gemma3TextConfig(**TWO_LAYERS, head_dim=8, hidden_activation="gelu"),
            "hidden_activation='gelu'; only gelu_pytorch_tanh is supported",
        ),
        (GemmaConfig(**TWO_LAYERS, hidden_act="gelu"), "hidden_act='gelu'; only gelu_pytorch"),
        (Gemma2Config(**TWO_LAYERS), "a 'gemma2' model; supported:"),
        (
            LlamaConfig(**TWO_LAYERS, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "RoPE scaling 'dynamic' is not supported (supported: linear, llama3)",
        ),
        (LlamaConfig(**TWO_LAYERS, attention_bias=True), "attention_bias (q/k/v and output"),
        (LlamaConfig(**TWO_LAYERS, hidden_act="gelu"), "hidden_act='gelu'; only SwiGLU"),
    ],
    ids=[
        "gpt2",
        "gemma3-softcap",
        "gemma3-gelu",
        "gemma-gelu",
        "gemma2-softcap",
        "rope-dynamic",
        "bias",
        "gelu",
    ],
)
def test_unsupported_architectures_are_refused_by_name(tmp_path, hf_config, expected):
    hf_config.save_pretrained(tmp_path)
    message = error_of(tmp_path)
    assert expected in message and str(tmp_path / "config.json") in message


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    tensors = write_checkpoint(tmp_path)
    file = tmp_path / "model.safetensors"
    up = "model.layers.1.mlp.up_proj.weight"

    def rewrite(changed):
        save_file(changed, file, metadata={"format": "pt"})
        return error_of(tmp_path)

    missing = {k: v for k, v in tensors.items() if k != up}
    assert (
        rewrite(missing) == f"{file}: no tensor {up!r} (for our text_head_blocks.0.mlp.up.weight)"
    )
    message = rewrite({**tensors, up: tensors[up][:-1]})
    assert message.startswith(f"{file}: tensor {up!r} has shape [71, 32], our ")
    bias = "model.layers.0.self_attn.o_proj.bias"
    message = rewrite({**tensors, bias: torch.zeros(32)})
    assert message.startswith(f"{file}: tensor {bias!r} (and 0 more) has no place")
    file.write_bytes(b"not a safetensors file")
    assert error_of(tmp_path).startswith(f"{file}: ")


def test_broken_shard_indexes_are_named(tmp_path):
    save_checkpoint(LlamaConfig(**TWO_LAYERS), tmp_path, sharded=True)
    index = tmp_path / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    shards = sorted(set(good["weight_map"].values()))
    assert len(shards) > 2

    def with_index(text):
        index.write_text(text)
        return error_of(tmp_path)

    assert with_index("{not json").startswith(f"{index}: not a safetensors index")
    moved = dict(good["weight_map"], **{"model.norm.weight": shards[0]})
    if good["weight_map"]["model.norm.weight"] == shards[0]:
        moved["model.norm.weight"] = shards[1]
    message = with_index(json.dumps({"weight_map": moved}))
    assert message == (
        f"{tmp_path / moved['model.norm.weight']}: no tensor 'model.norm.weight' "
        "(model.safetensors.index.json puts it here)"
    )
    (tmp_path / shards[-1]).unlink()
    assert (
        with_index(json.dumps(good)) == f"{index}: names the shard {shards[-1]}, which is missing"
    )
    index.unlink()
    assert error_of(tmp_path).startswith(
        f"{tmp_path}: no model.safetensors or model.safetensors.index.json"
    )


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
