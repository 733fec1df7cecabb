"""Build a SplitVLM, optionally from a transformers causal-LM checkpoint (Llama, Qwen2 families).

The checkpoint's layers become, in order, the text-in blocks, the core and the text-head blocks;
its embeddings, final norm and LM head map onto ours. Image-in and image-head blocks start fresh
or as copies of the neighbouring text layers (`model.image_blocks_init`).
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.split_vlm import SplitVLM

SUPPORTED_LLMS = ("llama", "qwen2")


def apply_llm_config(cfg: ModelConfig) -> None:
    """Take width, heads, norms, RoPE, vocabulary and depth from the checkpoint's config."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(cfg.pretrained_llm)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.pretrained_llm={cfg.pretrained_llm!r}: {err}") from None
    if hf.model_type not in SUPPORTED_LLMS:
        raise ValueError(
            f"model.pretrained_llm is a {hf.model_type!r} model; supported: {', '.join(SUPPORTED_LLMS)}"
        )
    rope_scaling = getattr(hf, "rope_scaling", None) or {}
    if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
        raise ValueError(f"model.pretrained_llm uses RoPE scaling {rope_scaling}; not supported")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"model.pretrained_llm uses {hf.hidden_act}; only SwiGLU (silu) is supported"
        )
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ValueError("model.pretrained_llm: head_dim × heads != hidden size is not supported")
    num_layers = hf.num_hidden_layers
    num_core = num_layers - cfg.num_text_in_blocks - cfg.num_text_head_blocks
    if num_core < 0:
        raise ValueError(
            f"model.pretrained_llm has {num_layers} layers, fewer than num_text_in_blocks + "
            "num_text_head_blocks"
        )
    cfg.d_model = hf.hidden_size
    cfg.num_heads = hf.num_attention_heads
    cfg.num_kv_heads = hf.num_key_value_heads
    cfg.mlp_hidden = hf.intermediate_size
    cfg.rope_theta = float(getattr(hf, "rope_theta", 10000.0))
    cfg.norm_eps = hf.rms_norm_eps
    cfg.attention_bias = hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False))
    cfg.tie_embeddings = bool(hf.tie_word_embeddings)
    cfg.qk_norm = False
    cfg.num_core_blocks = num_core
    cfg.vocab_size = max(cfg.vocab_size, hf.vocab_size)


def load_llm_weights(model: SplitVLM) -> None:
    from transformers import AutoModelForCausalLM

    cfg = model.cfg
    hf_model = AutoModelForCausalLM.from_pretrained(cfg.pretrained_llm, torch_dtype=torch.float32)
    state = hf_model.state_dict()
    text_layers = [*model.text_in, *model.core, *model.text_head_blocks]
    with torch.no_grad():
        _copy_rows(model.embed.weight, state["model.embed_tokens.weight"])
        if not cfg.tie_embeddings:
            _copy_rows(model.lm_head.weight, state["lm_head.weight"])
        model.text_norm.weight.copy_(state["model.norm.weight"])
        for index, block in enumerate(text_layers):
            _load_block(block, state, f"model.layers.{index}.")
        if cfg.image_blocks_init == "copy":
            for index, block in enumerate(model.image_in):
                block.load_state_dict(text_layers[min(index, len(text_layers) - 1)].state_dict())
            tail = text_layers[len(text_layers) - len(model.image_head_blocks) :]
            for block, source in zip(model.image_head_blocks, tail, strict=True):
                block.load_state_dict(source.state_dict())
            model.image_norm.weight.copy_(state["model.norm.weight"])


_BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}


def _load_block(block: nn.Module, state: dict, prefix: str) -> None:
    ours = block.state_dict()
    loaded = {}
    for name in ours:
        for our_key, hf_key in _BLOCK_KEYS.items():
            if name == our_key or name.startswith(our_key + "."):
                loaded[name] = state[prefix + hf_key + name[len(our_key) :]]
    missing = set(ours) - set(loaded)
    assert not missing, f"no checkpoint tensor for {sorted(missing)}"
    block.load_state_dict(loaded)


def _copy_rows(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Copy a vocabulary matrix; rows for tokens the checkpoint lacks (added image tokens) start
    at the mean row, a neutral point that does not bias the softmax."""
    ours[: theirs.shape[0]] = theirs
    if ours.shape[0] > theirs.shape[0]:
        ours[theirs.shape[0] :] = theirs.mean(dim=0)


def build_split_vlm(cfg: ModelConfig) -> SplitVLM:
    """The model for `cfg`: random init, or with its LLM loaded from `cfg.pretrained_llm`."""
    if cfg.pretrained_llm:
        apply_llm_config(cfg)
    model = SplitVLM(cfg)
    if cfg.pretrained_llm:
        load_llm_weights(model)
    return model
