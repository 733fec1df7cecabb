"""Build a SplitVLM, optionally with its LLM read from a transformers causal-LM checkpoint.

The checkpoint's layers become, in order, the text-in blocks, the core and the text-head blocks;
its embeddings, final norm and LM head map onto ours. Image-in and image-head blocks start fresh
or as copies of the neighbouring text layers (`model.image_blocks_init`).

Weights are read from the checkpoint's safetensors one tensor (or one row range of a tensor) at
a time, never as a whole transformers model, so a sharded engine fills each rank's shard of a
parameter without any rank holding a second copy of the model (DESIGN.md §5):

    llm = PretrainedLLM(cfg.pretrained_llm)
    llm.apply_config(cfg)                      # width, heads, RoPE, vocabulary, depths
    for name in llm.source_names():            # our parameter names it provides
        shard = llm.read(name, rows=slice(a, b))   # fp32, in our layout
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.blocks import Block, CrossAttentionBlock, VisualExpert, make_norm
from models.config import ModelConfig
from models.safetensors_dir import SafetensorsDir, one_line
from models.split_vlm import SplitVLM

# Our block's modules → the checkpoint's, under "model.layers.{index}." (the Llama layout, which
# Mistral, Qwen2 and Qwen3 share; q_norm/k_norm exist only with qk_norm).
_LLAMA_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
# Persimmon's (Fuyu's LLM): LayerNorms, q/k/v fused in one projection (`LLMFamily.fused_qkv`),
# an un-gated MLP.
_PERSIMMON_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.wo": "self_attn.dense",
    "attn.q_norm": "self_attn.q_layernorm",
    "attn.k_norm": "self_attn.k_layernorm",
    "mlp.up": "mlp.dense_h_to_4h",
    "mlp.down": "mlp.dense_4h_to_h",
}
# OPT's decoder layer: LayerNorms before attention and before the MLP, biases everywhere.
_OPT_LAYER_KEYS = {
    "attn_norm": "self_attn_layer_norm",
    "mlp_norm": "final_layer_norm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.out_proj",
    "mlp.up": "fc1",
    "mlp.down": "fc2",
}
# Gemma 3's four norms a layer: before and after attention, before and after the MLP.
_GEMMA3_LAYER_KEYS = {
    **_LLAMA_LAYER_KEYS,
    "attn_post_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}
# Chameleon's: Llama's, q/k LayerNorms per head, and with swin_norm its two norms on the
# sublayers' outputs (our post norms) instead of their inputs.
_CHAMELEON_LAYER_KEYS = {
    **_LLAMA_LAYER_KEYS,
    "attn_post_norm": "input_layernorm",
    "mlp_post_norm": "post_attention_layernorm",
}


# LLaMA-3.2-Vision's gated cross-attention layers (MllamaCrossAttentionDecoderLayer): our
# `CrossAttentionBlock`'s modules (and its two gates) → the checkpoint's.
_MLLAMA_CROSS_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.wq": "cross_attn.q_proj",
    "attn.wk": "cross_attn.k_proj",
    "attn.wv": "cross_attn.v_proj",
    "attn.wo": "cross_attn.o_proj",
    "attn.q_norm": "cross_attn.q_norm",
    "attn.k_norm": "cross_attn.k_norm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
    "attn_gate": "cross_attn_attn_gate",
    "mlp_gate": "cross_attn_mlp_gate",
}


# Idefics' (Flamingo's) gated cross-attention layers (IdeficsGatedCrossAttentionLayer), under
# their own numbering (`LLMFamily.cross_layer_prefix`); q/k norms only with qk_layer_norms.
_IDEFICS_CROSS_LAYER_KEYS = {
    **_MLLAMA_CROSS_LAYER_KEYS,
    "attn.q_norm": "cross_attn.q_layer_norm",
    "attn.k_norm": "cross_attn.k_layer_norm",
    "attn_gate": "alpha_cross_attn",
    "mlp_gate": "alpha_dense",
}


@dataclass(frozen=True)
class LLMFamily:
    """How the checkpoints of one transformers `model_type` map onto our model."""

    # Sets our ModelConfig fields from the transformers config; a ValueError (one line) for any
    # feature our blocks lack, so a loaded model never silently differs from the checkpoint.
    translate: Callable[[object, ModelConfig], None]
    layer_keys: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_LAYER_KEYS))
    layer_prefix: str = "model.layers.{}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm"  # the module: its weight (and a LayerNorm's bias)
    lm_head: str = "lm_head.weight"
    # A layer's q, k and v projections as one module (under the layer prefix), its rows per
    # head: q, k, v of head 0, then of head 1, … (Persimmon's query_key_value); "": separate.
    fused_qkv: str = ""
    # A vision-language checkpoint: the language model's config is its `text_config`, and the
    # tensors under these prefixes (its vision tower and projector) are left unread.
    text_config: bool = False
    other_parts: tuple[str, ...] = ()
    # The learned position table (OPT's embed_positions), "": none.
    positions: str = ""
    # The layer keys of the cross-attention layers (`model.cross_attention_layers`), a
    # parameter of the block itself (a gate) by its own name.
    cross_layer_keys: dict[str, str] = field(default_factory=dict)
    # Cross-attention layers numbered apart from the decoder's, under this prefix (Idefics'
    # model.gated_cross_attn_layers.{j}.); "": numbered among them (LLaMA-3.2-Vision's).
    cross_layer_prefix: str = ""
    # Rows that continue the embedding and the LM head in tensors of their own (Idefics'
    # decoupled additional vocabulary), read when the checkpoint has them; "": none.
    embed_continued: str = ""
    lm_head_continued: str = ""


def _decoder(
    hf, cfg: ModelConfig, *, qkv_bias: bool, qk_norm: bool, partial_rotary: bool = False
) -> None:
    """What every family's translation shares: widths, depths, RoPE, norm eps, vocabulary; the
    Llama block's settings for everything a family turns on itself (Gemma's norms, windows,
    Persimmon's MLP). `partial_rotary`: the family's modeling reads partial_rotary_factor."""
    rope_fraction = float(getattr(hf, "partial_rotary_factor", 1.0))
    if rope_fraction != 1.0 and not partial_rotary:
        raise ValueError("partial_rotary_factor != 1 (RoPE on part of a head) is not supported")
    scaling = getattr(hf, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported (supported: linear, llama3)")
    num_layers = hf.num_hidden_layers
    num_core = num_layers - cfg.num_text_in_blocks - cfg.num_text_head_blocks
    if num_core < 0:
        raise ValueError(
            f"has {num_layers} layers, fewer than num_text_in_blocks + num_text_head_blocks"
        )
    cfg.d_model = hf.hidden_size
    cfg.num_heads = hf.num_attention_heads
    cfg.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    cfg.attention_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // cfg.num_heads
    cfg.mlp_hidden = hf.intermediate_size
    cfg.rope_theta = float(getattr(hf, "rope_theta", 10000.0))
    cfg.rope_fraction = rope_fraction
    cfg.rope_linear_factor = float(scaling["factor"]) if rope_type == "linear" else 0.0
    cfg.rope_llama3_factor = 0.0
    if rope_type == "llama3":
        cfg.rope_llama3_factor = float(scaling["factor"])
        cfg.rope_llama3_low_freq_factor = float(scaling["low_freq_factor"])
        cfg.rope_llama3_high_freq_factor = float(scaling["high_freq_factor"])
        cfg.rope_llama3_original_max_positions = int(scaling["original_max_position_embeddings"])
    cfg.norm_eps = hf.rms_norm_eps if hasattr(hf, "rms_norm_eps") else hf.layer_norm_eps
    cfg.attention_bias = qkv_bias
    cfg.qk_norm = qk_norm
    cfg.tie_embeddings = bool(hf.tie_word_embeddings)
    cfg.num_core_blocks = num_core
    cfg.vocab_size = max(cfg.vocab_size, hf.vocab_size)
    cfg.norm_style, cfg.post_norms, cfg.scale_embeddings = "default", False, False
    cfg.swin_norm = False
    cfg.mlp_gated, cfg.mlp_activation, cfg.mlp_bias = True, "silu", False
    cfg.attention_output_bias, cfg.attention_scale = False, 0.0
    cfg.cross_attention_layers, cfg.lm_head_rows = [], 0
    cfg.cross_attention_style, cfg.cross_attention_gate = "mllama", "scalar"
    cfg.cross_attention_qk_norm = True
    _set_windows(cfg, None, [])


def _set_windows(cfg: ModelConfig, window: int | None, layer_types: list[str]) -> None:
    """Our sliding-window fields from transformers' `sliding_window` and `layer_types`."""
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(
            f"layer_types has {unknown[0]!r}; supported: full_attention, sliding_attention"
        )
    sliding = window is not None and "sliding_attention" in layer_types
    cfg.layer_types = [kind.removesuffix("_attention") for kind in layer_types] if sliding else []
    cfg.sliding_window = int(window) if sliding else 0
    cfg.sliding_rope_theta = 0.0


def _llama_like(hf, cfg: ModelConfig, *, qkv_bias: bool, qk_norm: bool) -> None:
    """A pre-norm SwiGLU decoder with (GQA) RoPE attention: the Llama family and its kin."""
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.hidden_act!r}; only SwiGLU (silu) is supported")
    _decoder(hf, cfg, qkv_bias=qkv_bias, qk_norm=qk_norm)


def _refuse_output_bias(hf) -> None:
    # transformers' attention_bias also puts a bias on o_proj, which our output projection lacks.
    if getattr(hf, "attention_bias", False):
        raise ValueError("attention_bias (q/k/v and output projection biases) is not supported")
    if getattr(hf, "mlp_bias", False):
        raise ValueError("mlp_bias is not supported")


def _llama(hf, cfg: ModelConfig) -> None:
    _refuse_output_bias(hf)
    _llama_like(hf, cfg, qkv_bias=False, qk_norm=False)


def _mistral(hf, cfg: ModelConfig) -> None:
    _llama_like(hf, cfg, qkv_bias=False, qk_norm=False)
    # Mistral's window, when set, is on every layer (its modeling reads no layer_types).
    _set_windows(cfg, hf.sliding_window, ["sliding_attention"] * hf.num_hidden_layers)


def _qwen2(hf, cfg: ModelConfig) -> None:
    _llama_like(hf, cfg, qkv_bias=True, qk_norm=False)  # Qwen2 always has q/k/v biases
    _set_windows(cfg, hf.sliding_window, hf.layer_types)  # use_sliding_window, max_window_layers


def _qwen3(hf, cfg: ModelConfig) -> None:
    _refuse_output_bias(hf)
    _llama_like(hf, cfg, qkv_bias=False, qk_norm=True)
    _set_windows(cfg, hf.sliding_window, hf.layer_types)


def _gemma3_text(hf, cfg: ModelConfig) -> None:
    """Gemma 3: (1 + w) norms before and after each sublayer, embeddings × sqrt(width), a GELU
    gated MLP, q/k norms, softmax scale query_pre_attn_scalar^-0.5, and sliding layers with a
    RoPE of their own (base rope_local_base_freq, unscaled)."""
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention (bidirectional text) is not supported")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(hf, name, None) is not None:
            raise ValueError(f"{name}={getattr(hf, name)} is not supported (only null)")
    if hf.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(
            f"hidden_activation={hf.hidden_activation!r}; only gelu_pytorch_tanh is supported"
        )
    _refuse_output_bias(hf)
    _decoder(hf, cfg, qkv_bias=False, qk_norm=True)
    cfg.norm_style, cfg.post_norms, cfg.scale_embeddings = "gemma", True, True
    cfg.mlp_activation = "gelu_tanh"
    cfg.attention_scale = float(hf.query_pre_attn_scalar) ** -0.5
    _set_windows(cfg, hf.sliding_window, hf.layer_types)
    if cfg.layer_types:
        cfg.sliding_rope_theta = float(hf.rope_local_base_freq)


def _gemma(hf, cfg: ModelConfig) -> None:
    """Gemma (1): Gemma 3's block without its post norms, q/k norms and sliding layers: (1 + w)
    norms, embeddings × sqrt(width), a GELU gated MLP, softmax scale 1 / sqrt(head width)."""
    # transformers' GemmaMLP runs hidden_act (hidden_activation is read by no layer).
    if hf.hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_act={hf.hidden_act!r}; only gelu_pytorch_tanh is supported")
    _refuse_output_bias(hf)
    _decoder(hf, cfg, qkv_bias=False, qk_norm=False)
    cfg.norm_style, cfg.scale_embeddings, cfg.mlp_activation = "gemma", True, "gelu_tanh"


def _persimmon(hf, cfg: ModelConfig) -> None:
    """Persimmon (Fuyu's LLM): LayerNorms with biases (q/k LayerNorms per head with
    qk_layernorm), RoPE on the first partial_rotary_factor of each head, biases on the fused
    q/k/v and the output projection, an un-gated squared-ReLU MLP with biases."""
    if hf.hidden_act != "relu2":
        raise ValueError(f"hidden_act={hf.hidden_act!r}; only relu2 is supported")
    _decoder(hf, cfg, qkv_bias=True, qk_norm=bool(hf.qk_layernorm), partial_rotary=True)
    cfg.norm_style, cfg.attention_output_bias = "layernorm", True
    cfg.mlp_gated, cfg.mlp_activation, cfg.mlp_bias = False, "relu2", True


def _chameleon(hf, cfg: ModelConfig) -> None:
    """Chameleon's language model: Llama's block with q/k LayerNorms over each head's width
    with per-head weights and biases, and with swin_norm (Chameleon-30B) each sublayer's
    output normed before the residual add instead of its input."""
    if getattr(hf, "model_parallel_size", 1) != 1:
        raise ValueError("model_parallel_size != 1 is not supported")
    _refuse_output_bias(hf)
    _llama_like(hf, cfg, qkv_bias=False, qk_norm=False)
    cfg.qk_norm, cfg.swin_norm = "per_head_layernorm", bool(hf.swin_norm)


def _only(model_type: str, translate: Callable[[object, ModelConfig], None]):
    """The translation of a vision-language checkpoint's language model that must be a
    `model_type` (Fuyu's Persimmon, BLIP-2's OPT, Idefics3's, SmolVLM's and DeepSeek-VL's Llama)."""

    def translate_only(hf, cfg: ModelConfig) -> None:
        if hf.model_type != model_type:
            raise ValueError(f"a {hf.model_type!r} language model; supported: {model_type}")
        translate(hf, cfg)

    return translate_only


def _opt(hf, cfg: ModelConfig) -> None:
    """OPT (BLIP-2's released LLMs): learned absolute positions (offset 2) and no RoPE,
    LayerNorms before attention and the MLP, biases on every projection, an un-gated ReLU MLP,
    tied embeddings. The pre-norm variant of every size but 350M."""
    if not hf.do_layer_norm_before or getattr(hf, "_remove_final_layer_norm", False):
        raise ValueError("do_layer_norm_before=False (OPT-350M's post-norm) is not supported")
    if hf.word_embed_proj_dim != hf.hidden_size:
        raise ValueError("word_embed_proj_dim != hidden_size (OPT-350M) is not supported")
    if hf.activation_function != "relu" or not hf.layer_norm_elementwise_affine:
        raise ValueError(
            f"activation_function={hf.activation_function!r}; supported: relu, with affine norms"
        )
    num_core = hf.num_hidden_layers - cfg.num_text_in_blocks - cfg.num_text_head_blocks
    if num_core < 0:
        raise ValueError(
            f"has {hf.num_hidden_layers} layers, fewer than num_text_in_blocks + "
            "num_text_head_blocks"
        )
    cfg.d_model, cfg.num_heads = hf.hidden_size, hf.num_attention_heads
    cfg.num_kv_heads = hf.num_attention_heads
    cfg.attention_head_dim = hf.hidden_size // hf.num_attention_heads
    cfg.mlp_hidden, cfg.num_core_blocks = hf.ffn_dim, num_core
    cfg.learned_positions, cfg.position_offset = hf.max_position_embeddings, 2
    cfg.rope_fraction, cfg.rope_linear_factor, cfg.rope_llama3_factor = 0.0, 0.0, 0.0
    cfg.norm_eps, cfg.norm_style, cfg.post_norms = 1e-5, "layernorm", False
    bias = bool(hf.enable_bias)
    cfg.attention_bias = cfg.attention_output_bias = cfg.mlp_bias = bias
    cfg.qk_norm, cfg.scale_embeddings, cfg.attention_scale = False, False, 0.0
    cfg.swin_norm = False
    cfg.mlp_gated, cfg.mlp_activation = False, "relu"
    cfg.tie_embeddings = bool(hf.tie_word_embeddings)
    cfg.vocab_size = max(cfg.vocab_size, hf.vocab_size)
    _set_windows(cfg, None, [])


def _opt_family(model: str, head: str, other_parts: tuple[str, ...] = ()) -> LLMFamily:
    """An OPT saved under `model` (decoder.layers, decoder.embed_tokens, decoder.embed_positions,
    decoder.final_layer_norm), its LM head `head`; of a vision-language checkpoint, its language
    model with the rest under `other_parts`."""
    return LLMFamily(
        _only("opt", _opt) if other_parts else _opt,
        layer_keys=dict(_OPT_LAYER_KEYS),
        layer_prefix=model + "decoder.layers.{}.",
        embed=model + "decoder.embed_tokens.weight",
        final_norm=model + "decoder.final_layer_norm",
        lm_head=head,
        text_config=bool(other_parts),
        other_parts=other_parts,
        positions=model + "decoder.embed_positions.weight",
    )


def _persimmon_family(model: str, head: str, other_parts: tuple[str, ...] = ()) -> LLMFamily:
    """A Persimmon saved under `model` (layers, embed_tokens, final_layernorm), its LM head
    `head`; of a Fuyu checkpoint, its language model with the rest under `other_parts`."""
    return LLMFamily(
        _only("persimmon", _persimmon) if other_parts else _persimmon,
        layer_keys=dict(_PERSIMMON_LAYER_KEYS),
        layer_prefix=model + "layers.{}.",
        embed=model + "embed_tokens.weight",
        final_norm=model + "final_layernorm",
        lm_head=head,
        fused_qkv="self_attn.query_key_value",
        text_config=bool(other_parts),
        other_parts=other_parts,
    )


def _text_model(hf, cfg: ModelConfig) -> None:
    """The language model of a vision-language checkpoint (LLaVA): its own family's translation,
    for the families with Llama's layer layout."""
    if hf.model_type not in _LLAMA_LAYOUT_TEXT_MODELS:
        raise ValueError(
            f"a {hf.model_type!r} language model; supported: {', '.join(_LLAMA_LAYOUT_TEXT_MODELS)}"
        )
    SUPPORTED_LLMS[hf.model_type].translate(hf, cfg)


_LLAMA_LAYOUT_TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen3")


def _mllama_text(hf, cfg: ModelConfig) -> None:
    """LLaMA-3.2-Vision's language model: Llama's layers, with gated cross-attention layers
    among them (`cross_attention_layers`, in the same numbering), and an embedding 8 rows
    longer than its LM head (<|image|> is one of them)."""
    if hf.model_type != "mllama_text_model":
        raise ValueError(f"a {hf.model_type!r} language model; supported: mllama_text_model")
    _llama_like(hf, cfg, qkv_bias=False, qk_norm=False)
    cfg.vocab_size = max(cfg.vocab_size, hf.vocab_size + 8)
    cfg.lm_head_rows = hf.vocab_size
    cfg.cross_attention_layers = sorted(hf.cross_attention_layers)


def _idefics(hf, cfg: ModelConfig) -> None:
    """Idefics' (Flamingo's) language model: Llama's layers, a gated cross-attention layer
    before every `cross_layer_interval`-th of them (our core holds both, the cross-attention
    block first), its embedding and LM head continued by `additional_vocab_size` rows."""
    if hf.model_type != "idefics":
        raise ValueError(f"a {hf.model_type!r} model; supported: idefics")
    if hf.alpha_type not in ("float", "vector"):
        raise ValueError(f"alpha_type={hf.alpha_type!r}; supported: float, vector")
    interval = hf.cross_layer_interval
    if hf.num_hidden_layers % interval:  # transformers' model runs past its last one then
        raise ValueError(
            f"num_hidden_layers={hf.num_hidden_layers} is not a multiple of "
            f"cross_layer_interval={interval}"
        )
    _llama_like(hf, cfg, qkv_bias=False, qk_norm=False)
    num_cross = hf.num_hidden_layers // interval
    cfg.num_core_blocks += num_cross
    cfg.cross_attention_layers = [index * (interval + 1) for index in range(num_cross)]
    cfg.cross_attention_style = "flamingo"
    cfg.cross_attention_gate = "vector" if hf.alpha_type == "vector" else "scalar"
    cfg.cross_attention_qk_norm = bool(hf.qk_layer_norms)
    cfg.vocab_size = max(cfg.vocab_size, hf.vocab_size + hf.additional_vocab_size)


def _paligemma_text(hf, cfg: ModelConfig) -> None:
    """PaliGemma's language model: Gemma (1) only (PaliGemma 2's Gemma 2 softcaps its logits)."""
    if hf.model_type != "gemma":
        raise ValueError(f"a {hf.model_type!r} language model; supported: gemma")
    _gemma(hf, cfg)


def _qwen2_vl_text(hf, cfg: ModelConfig) -> None:
    """Qwen2-VL's language model: Qwen2 with M-RoPE (its `mrope_section`)."""
    _qwen2(hf, cfg)
    section = (getattr(hf, "rope_scaling", None) or {}).get("mrope_section")
    if section:
        cfg.image_positions = "mrope"
        cfg.mrope_section = list(section)


def _qwen2_vl(layout: str) -> LLMFamily:
    """Qwen2VLForConditionalGeneration's language model, saved as transformers writes it (the
    LLM under model.*, the tower under visual.*) or under its nested in-memory names."""
    model, others = {"legacy": ("model.", ""), "nested": ("model.language_model.", "model.")}[
        layout
    ]
    return LLMFamily(
        _qwen2_vl_text,
        layer_prefix=model + "layers.{}.",
        embed=model + "embed_tokens.weight",
        final_norm=model + "norm",
        text_config=True,
        other_parts=(others + "visual.",),
    )


def _language_model_of_vlm(
    translate, layer_keys: dict[str, str], layout: str, extra_parts: tuple[str, ...] = ()
) -> LLMFamily:
    """The LLM of a transformers vision-language checkpoint saved in `layout`: "legacy"
    (language_model.model.*, what transformers writes, and the published checkpoints) or
    "nested" (model.language_model.*, transformers' in-memory names since 4.52). Tensors under
    the tower's, the projector's and `extra_parts` names are the rest of the model."""
    model, head, others = {
        "legacy": ("language_model.model.", "language_model.lm_head.weight", ""),
        "nested": ("model.language_model.", "lm_head.weight", "model."),
    }[layout]
    return LLMFamily(
        translate,
        layer_keys=dict(layer_keys),
        layer_prefix=model + "layers.{}.",
        embed=model + "embed_tokens.weight",
        final_norm=model + "norm",
        lm_head=head,
        text_config=True,
        other_parts=(
            others + "vision_tower.",
            others + "multi_modal_projector.",
            *(others + part for part in extra_parts),
        ),
    )


def _llama_under(model: str, other_parts: tuple[str, ...]) -> LLMFamily:
    """The Llama of a vision-language checkpoint whose language model is saved under `model`
    (`model.layers.*`, `model.embed_tokens`, `model.norm`), the rest under `other_parts`."""
    return LLMFamily(
        _only("llama", _llama),
        layer_prefix=model + "layers.{}.",
        embed=model + "embed_tokens.weight",
        final_norm=model + "norm",
        text_config=True,
        other_parts=other_parts,
    )


# Idefics3ForConditionalGeneration's and SmolVLM's (always under these names).
_IDEFICS3_LLM = _llama_under("model.text_model.", ("model.vision_model.", "model.connector."))
# DeepseekVLForConditionalGeneration's (saved under its nested names).
_DEEPSEEK_VL_LLM = _llama_under("model.language_model.", ("model.vision_model.", "model.aligner."))

# BLIP-2's tensors that are not its language model's.
_BLIP2_PARTS = ("vision_model.", "query_tokens", "qformer.", "language_projection.")
SUPPORTED_LLMS = {
    "llama": LLMFamily(_llama),
    "mistral": LLMFamily(_mistral),
    "qwen2": LLMFamily(_qwen2),
    "qwen3": LLMFamily(_qwen3),
    "gemma": LLMFamily(_gemma),
    "gemma3_text": LLMFamily(_gemma3_text, layer_keys=dict(_GEMMA3_LAYER_KEYS)),
    # Gemma3ForConditionalGeneration (Gemma 3 4B and up): its language model only. transformers
    # saves it, as the published checkpoints are, under language_model.*.
    "gemma3": _language_model_of_vlm(_gemma3_text, _GEMMA3_LAYER_KEYS, "legacy"),
    # LlavaForConditionalGeneration: its language model (the whole model: models/hf_designs.py).
    "llava": _language_model_of_vlm(_text_model, _LLAMA_LAYER_KEYS, "legacy"),
    # PaliGemmaForConditionalGeneration: its language model (the whole model: hf_designs).
    "paligemma": _language_model_of_vlm(_paligemma_text, _LLAMA_LAYER_KEYS, "legacy"),
    # Mistral3ForConditionalGeneration: its language model (the whole model: hf_designs).
    "mistral3": _language_model_of_vlm(_text_model, _LLAMA_LAYER_KEYS, "legacy"),
    # LlavaNextForConditionalGeneration: its language model (the whole model: hf_designs).
    "llava_next": _language_model_of_vlm(
        _text_model, _LLAMA_LAYER_KEYS, "legacy", extra_parts=("image_newline",)
    ),
    # Qwen2VLForConditionalGeneration: its language model (the whole model: hf_designs).
    "qwen2_vl": _qwen2_vl("legacy"),
    # Idefics3ForConditionalGeneration and SmolVLMForConditionalGeneration (the same names):
    # their language model (the whole model: hf_designs).
    "idefics3": _IDEFICS3_LLM,
    "smolvlm": _IDEFICS3_LLM,
    # DeepseekVLForConditionalGeneration: its language model (the whole model: hf_designs).
    "deepseek_vl": _DEEPSEEK_VL_LLM,
    # DeepseekVLHybridForConditionalGeneration's (DeepSeek-VL 7B), under its nested names.
    "deepseek_vl_hybrid": _llama_under(
        "model.language_model.",
        (
            "model.vision_model.",
            "model.high_res_vision_model.",
            "model.high_res_vision_neck.",
            "model.high_res_vision_proj.",
            "model.high_res_vision_alpha",
            "model.aligner.",
        ),
    ),
    # Blip2ForConditionalGeneration with a decoder-only language model: that model (the whole
    # model: hf_designs), under transformers' saved names.
    "blip-2": _language_model_of_vlm(
        _text_model,
        _LLAMA_LAYER_KEYS,
        "legacy",
        extra_parts=_BLIP2_PARTS,
    ),
    # ChameleonForConditionalGeneration: its language model (the whole model: hf_designs); its
    # VQ-VAE is under model.vqmodel.
    # JanusForConditionalGeneration's, under its nested names.
    "janus": _llama_under(
        "model.language_model.",
        (
            "model.vision_model.",
            "model.aligner.",
            "model.vqmodel.",
            "model.generation_embeddings.",
            "model.generation_aligner.",
            "model.generation_head.",
        ),
    ),
    "chameleon": LLMFamily(
        _chameleon, layer_keys=dict(_CHAMELEON_LAYER_KEYS), other_parts=("model.vqmodel.",)
    ),
    # MllamaForConditionalGeneration: its language model (the whole model: hf_designs), as
    # transformers saves it.
    "mllama": LLMFamily(
        _mllama_text,
        layer_prefix="language_model.model.layers.{}.",
        embed="language_model.model.embed_tokens.weight",
        final_norm="language_model.model.norm",
        lm_head="language_model.lm_head.weight",
        text_config=True,
        other_parts=("vision_model.", "multi_modal_projector."),
        cross_layer_keys=dict(_MLLAMA_CROSS_LAYER_KEYS),
    ),
    # IdeficsForVisionText2Text: its language model (the whole model: hf_designs).
    "idefics": LLMFamily(
        _idefics,
        other_parts=("model.vision_model.", "model.perceiver_resampler."),
        cross_layer_keys=dict(_IDEFICS_CROSS_LAYER_KEYS),
        cross_layer_prefix="model.gated_cross_attn_layers.{}.",
        embed_continued="model.embed_tokens.additional_embedding.weight",
        lm_head_continued="lm_head.additional_fc.weight",
    ),
    "persimmon": _persimmon_family("model.", "lm_head.weight"),
    "opt": _opt_family("model.", "lm_head.weight"),
    # FuyuForCausalLM: its language model (the whole model: hf_designs), as transformers saves
    # it.
    "fuyu": _persimmon_family(
        "language_model.model.", "language_model.lm_head.weight", ("vision_embed_tokens.",)
    ),
}
# Vision-language checkpoints whose language model's layout depends on its kind: (model type,
# text model type) → its family (else SUPPORTED_LLMS[model type]).
_BY_TEXT_MODEL = {
    ("blip-2", "opt"): _opt_family(
        "language_model.model.", "language_model.lm_head.weight", _BLIP2_PARTS
    ),
}


def language_model_family(model_type: str, text_model_type: str | None = None) -> LLMFamily:
    """The family of a checkpoint of `model_type` whose language model is a `text_model_type`
    (a vision-language checkpoint's `text_config.model_type`)."""
    return _BY_TEXT_MODEL.get((model_type, text_model_type), SUPPORTED_LLMS[model_type])


# The same checkpoints with their tensors under transformers' nested names.
_NESTED_LAYOUTS = {
    "gemma3": _language_model_of_vlm(_gemma3_text, _GEMMA3_LAYER_KEYS, "nested"),
    "llava": _language_model_of_vlm(_text_model, _LLAMA_LAYER_KEYS, "nested"),
    "paligemma": _language_model_of_vlm(_paligemma_text, _LLAMA_LAYER_KEYS, "nested"),
    "mistral3": _language_model_of_vlm(_text_model, _LLAMA_LAYER_KEYS, "nested"),
    "llava_next": _language_model_of_vlm(
        _text_model, _LLAMA_LAYER_KEYS, "nested", extra_parts=("image_newline",)
    ),
    "qwen2_vl": _qwen2_vl("nested"),
    "mllama": LLMFamily(
        _mllama_text,
        layer_prefix="model.language_model.layers.{}.",
        embed="model.language_model.embed_tokens.weight",
        final_norm="model.language_model.norm",
        lm_head="lm_head.weight",
        text_config=True,
        other_parts=("model.vision_model.", "model.multi_modal_projector."),
        cross_layer_keys=dict(_MLLAMA_CROSS_LAYER_KEYS),
    ),
    "fuyu": _persimmon_family(
        "model.language_model.", "lm_head.weight", ("model.vision_embed_tokens.",)
    ),
}


@dataclass(frozen=True)
class _Source:
    """Where one of our parameters comes from."""

    tensor: str  # the checkpoint's tensor name
    shape: tuple[int, ...]  # ours
    vocabulary: bool  # rows past the checkpoint's vocabulary are filled with its mean row
    # Of a fused q/k/v tensor (`LLMFamily.fused_qkv`): which of the three, and a head's width.
    part: int = -1
    head_dim: int = 0
    # A vocabulary matrix's rows continued in a second tensor (`LLMFamily.embed_continued`).
    continued: str = ""

    @property
    def pieces(self) -> tuple[str, ...]:
        """The checkpoint tensors our parameter's rows are, in order."""
        return (self.tensor, self.continued) if self.continued else (self.tensor,)

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """Our parameter's rows of the checkpoint's `tensor` (a fused one's part)."""
        if self.part < 0:
            return tensor
        return tensor.unflatten(0, (-1, 3, self.head_dim))[:, self.part].flatten(0, 1)

    @property
    def checkpoint_shape(self) -> tuple[int, ...]:
        """The shape the checkpoint's tensor must have (a vocabulary's rows: at most ours)."""
        return (self.shape[0] * 3, *self.shape[1:]) if self.part >= 0 else self.shape


def plan_sources(family: LLMFamily, cfg: ModelConfig) -> dict[str, _Source]:
    """Where each of our LLM parameters comes from in a checkpoint of `family` (also the names
    an export to that layout writes them under)."""
    vocab = (cfg.vocab_size, cfg.d_model)
    sources = {"embed.weight": _Source(family.embed, vocab, True, continued=family.embed_continued)}
    if not cfg.tie_embeddings:
        head = (cfg.lm_head_size, cfg.d_model)
        sources["lm_head.weight"] = _Source(
            family.lm_head, head, True, continued=family.lm_head_continued
        )
    with torch.device("meta"):
        block = Block(cfg, expert=cfg.visual_expert)
        block_shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
        cross_shapes = {
            name: tuple(p.shape) for name, p in CrossAttentionBlock(cfg).named_parameters()
        }
        norm_leaves = [leaf for leaf, _ in make_norm(cfg, cfg.d_model).named_parameters()]
    for leaf in norm_leaves:
        sources[f"text_norm.{leaf}"] = _Source(f"{family.final_norm}.{leaf}", (cfg.d_model,), False)
    if cfg.learned_positions:
        rows = cfg.learned_positions + cfg.position_offset
        sources["positions.weight"] = _Source(family.positions, (rows, cfg.d_model), False)
    fused = ("attn.wq", "attn.wk", "attn.wv") if family.fused_qkv else ()
    # Our block stacks; each block starts from the checkpoint layer `cfg.text_layer_of` says.
    stacks = {
        "text_in": cfg.num_text_in_blocks,
        "core": cfg.num_core_blocks,
        "text_head_blocks": cfg.num_text_head_blocks,
    }
    if cfg.image_blocks_init == "copy":
        stacks["image_in"] = cfg.num_image_in_blocks
        stacks["image_head_blocks"] = cfg.num_image_head_blocks
    for stack, num_blocks in stacks.items():
        for index in range(num_blocks):
            layer = cfg.text_layer_of(stack, index)
            if family.cross_layer_prefix:  # cross-attention layers numbered apart
                crosses = cfg.cross_attention_layers
                crosses_before = sum(i < index for i in crosses) if stack == "core" else 0
                layer -= len(crosses) if stack == "text_head_blocks" else crosses_before
            prefix = family.layer_prefix.format(layer)
            if cfg.is_cross_attention(stack, index):
                if family.cross_layer_prefix:
                    prefix = family.cross_layer_prefix.format(crosses_before)
                if not family.cross_layer_keys:
                    raise ValueError(
                        f"a {stack}.{index} cross-attention block: its checkpoint has none"
                    )
                for name, shape in cross_shapes.items():
                    module, _, leaf = name.rpartition(".")
                    key = family.cross_layer_keys[module or leaf]
                    tensor = f"{prefix}{key}.{leaf}" if module else f"{prefix}{key}"
                    sources[f"{stack}.{index}.{name}"] = _Source(tensor, shape, False)
                continue
            for name, shape in block_shapes.items():
                module, _, leaf = name.rpartition(".")
                if module.startswith("expert."):  # a visual expert starts as its text twin
                    if not cfg.has_expert(stack):
                        continue
                    module = _text_twin(module.removeprefix("expert."))
                if module in fused:
                    tensor = f"{prefix}{family.fused_qkv}.{leaf}"
                    part = _Source(tensor, shape, False, fused.index(module), cfg.head_dim)
                    sources[f"{stack}.{index}.{name}"] = part
                    continue
                tensor = f"{prefix}{family.layer_keys[module]}.{leaf}"
                sources[f"{stack}.{index}.{name}"] = _Source(tensor, shape, False)
    if cfg.image_blocks_init == "copy":
        for leaf in norm_leaves:
            sources[f"image_norm.{leaf}"] = sources[f"text_norm.{leaf}"]
    return sources


def _text_twin(expert_module: str) -> str:
    """The block module a visual expert's module (`wq`, `mlp.gate`, …) copies."""
    head, dot, rest = expert_module.partition(".")
    return VisualExpert.TEXT_TWIN[head] + dot + rest


def checkpoint_tensors(
    family: LLMFamily, cfg: ModelConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Our LLM parameters (`state`) under the checkpoint names of `family`: the inverse of
    `plan_sources` (a fused q/k/v tensor put together from our three)."""
    tensors, parts = {}, {}
    for name, source in plan_sources(family, cfg).items():
        if ".expert." in name:  # a visual expert has no place in the language model's checkpoint
            continue
        if source.part < 0:
            tensors[source.tensor] = state[name]
        else:
            parts.setdefault(source.tensor, [None] * 3)[source.part] = (state[name], source)
    for tensor, pieces in parts.items():
        head_dim = pieces[0][1].head_dim
        per_head = [value.unflatten(0, (-1, head_dim)) for value, _ in pieces]
        tensors[tensor] = torch.stack(per_head, dim=1).flatten(0, 2)
    return tensors


class PretrainedLLM:
    """A transformers causal-LM checkpoint, read tensor by tensor from its safetensors
    (`model.safetensors`, or `model.safetensors.index.json` and its shards)."""

    # Rows × width read at once when averaging a vocabulary matrix (64 MiB in fp32).
    mean_chunk_elements = 1 << 24

    def __init__(self, path: str | Path):
        from transformers import AutoConfig  # imported here: seconds, and only when loading

        self.path = _local_directory(str(path))
        try:
            self.hf_config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise ValueError(f"model.pretrained_llm={str(path)!r}: {one_line(err)}") from None
        self.model_type = self.hf_config.model_type
        if self.model_type not in SUPPORTED_LLMS:
            raise ValueError(
                f"{self.path / 'config.json'}: a {self.model_type!r} model; "
                f"supported: {', '.join(SUPPORTED_LLMS)}"
            )
        text = getattr(getattr(self.hf_config, "text_config", None), "model_type", None)
        self.family = language_model_family(self.model_type, text)
        nested = _NESTED_LAYOUTS.get(self.model_type)
        if nested is not None and self.family.embed not in self._tensor_files:
            if nested.embed in self._tensor_files:
                self.family = nested
        continued = self.family.embed_continued
        if continued and continued not in self._tensor_files:  # no decoupled rows
            self.family = dataclasses.replace(self.family, embed_continued="", lm_head_continued="")
        # The language model's config (of a vision-language checkpoint: its text part).
        self.llm_config = self.hf_config.text_config if self.family.text_config else self.hf_config
        self._sources: dict[str, _Source] | None = None
        self._mean_rows: dict[str, torch.Tensor] = {}

    # -- public API -------------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model: SplitVLM) -> PretrainedLLM:
        """The reader for a model (on meta or sharded too) built from an applied config."""
        llm = cls(model.cfg.pretrained_llm)
        llm.apply_config(model.cfg)
        return llm

    def apply_config(self, cfg: ModelConfig) -> None:
        """Take width, heads, norms, RoPE, vocabulary and depth from the checkpoint, and check
        that every tensor we will read exists with the shape we need (headers only). Applying
        it again to the same config changes nothing."""
        try:
            self.family.translate(self.llm_config, cfg)
        except ValueError as err:
            raise ValueError(f"{self.path / 'config.json'} ({self.model_type}): {err}") from None
        self._sources = self._plan(cfg)
        self._check_tensors(cfg)

    def source_names(self) -> list[str]:
        """Our parameter names this checkpoint provides (a tied LM head is `embed.weight`)."""
        assert self._sources is not None, "apply_config first"
        return list(self._sources)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.source_names())

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Our parameter `name` (or the row range `rows` of its first dimension) in fp32."""
        assert self._sources is not None and name in self._sources, f"not provided: {name}"
        source = self._sources[name]
        start, stop, step = (rows or slice(None)).indices(source.shape[0])
        assert step == 1, "row ranges are contiguous"
        with self._open(self._tensor_files[source.tensor]) as handle:
            if source.part >= 0:  # a third of a fused matrix: read whole, one at a time
                return source.rows_of(handle.get_tensor(source.tensor))[start:stop].float()
            if rows is None and not source.vocabulary:
                return handle.get_tensor(source.tensor).float()
        parts, their_rows = [], 0  # theirs < ours only for a vocabulary matrix
        for piece in source.pieces:
            with self._open(self._tensor_files[piece]) as handle:
                tensor = handle.get_slice(piece)
                count = tensor.get_shape()[0]
                low, high = max(start, their_rows), min(stop, their_rows + count)
                if low < high:
                    parts.append(tensor[low - their_rows : high - their_rows].float())
            their_rows += count
        if stop > max(start, their_rows):
            parts.append(self._mean_row(source.tensor).expand(stop - max(start, their_rows), -1))
        return torch.cat(parts) if parts else torch.empty(0, *source.shape[1:])

    def load_into(self, model: SplitVLM) -> None:
        """Copy every parameter the checkpoint provides into `model` (one device), one at a
        time: the only extra memory is one tensor."""
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name in self.source_names():
                parameters[name].copy_(self.read(name))

    # -- internals ---------------------------------------------------------------------------------

    def _plan(self, cfg: ModelConfig) -> dict[str, _Source]:
        apart = len(cfg.cross_attention_layers) if self.family.cross_layer_prefix else 0
        assert cfg.num_text_layers - apart == self.llm_config.num_hidden_layers
        return plan_sources(self.family, cfg)

    def _check_tensors(self, cfg: ModelConfig) -> None:
        files, listed_in = self._tensor_files, self._tensors_listed_in
        # Each checkpoint tensor once (copied image blocks read the text layers' tensors again).
        needed = {
            piece: (name, source)
            for name, source in self._sources.items()
            for piece in source.pieces
        }
        for tensor, (name, _) in needed.items():
            if tensor not in files:
                raise ValueError(f"{listed_in}: no tensor {tensor!r} (for our {name})")
        shapes = {}
        for file in sorted({files[tensor] for tensor in needed}):
            with self._open(file) as handle:
                present = set(handle.keys())
                for tensor in (t for t in needed if files[t] == file):
                    if tensor not in present:
                        raise ValueError(
                            f"{file}: no tensor {tensor!r} ({listed_in.name} puts it here)"
                        )
                    shapes[tensor] = tuple(handle.get_slice(tensor).get_shape())
        for tensor, (name, source) in needed.items():
            theirs, ours = shapes[tensor], source.checkpoint_shape
            rows = sum(shapes[piece][0] for piece in source.pieces)
            fits = (
                len(theirs) == 2 and theirs[1] == ours[1] and rows <= ours[0]
                if source.vocabulary
                else theirs == ours
            )
            if not fits:
                raise ValueError(
                    f"{files[tensor]}: tensor {tensor!r} has shape {list(theirs)}, our {name} "
                    f"needs {list(ours)} (from {self.path / 'config.json'})"
                )
        # A tensor we would not read is a feature our blocks lack (a bias, an extra norm): refuse
        # it rather than load a model that differs from the checkpoint.
        unused = [
            tensor
            for tensor in files
            if tensor not in needed
            and not tensor.endswith("rotary_emb.inv_freq")
            and not tensor.startswith(self.family.other_parts)
            and not (cfg.tie_embeddings and tensor == self.family.lm_head)
        ]
        if unused:
            raise ValueError(
                f"{files[unused[0]]}: tensor {unused[0]!r} (and {len(unused) - 1} more) has no "
                f"place in our {self.model_type} model; refusing to load it without them"
            )

    @functools.cached_property
    def _checkpoint(self) -> SafetensorsDir:
        return SafetensorsDir(self.path, "our model")

    @property
    def _tensors_listed_in(self) -> Path:
        return self._checkpoint.listed_in

    @property
    def _tensor_files(self) -> dict[str, Path]:
        return self._checkpoint.tensor_files

    def _open(self, file: Path):
        return self._checkpoint.open(file)

    def _mean_row(self, tensor: str) -> torch.Tensor:
        """The mean row of a vocabulary matrix, read in row chunks: the neutral start for tokens
        the checkpoint lacks (added image tokens), which does not bias the softmax."""
        if tensor in self._mean_rows:
            return self._mean_rows[tensor]
        with self._open(self._tensor_files[tensor]) as handle:
            matrix = handle.get_slice(tensor)
            num_rows, width = matrix.get_shape()
            chunk = max(1, self.mean_chunk_elements // width)
            total = torch.zeros(width, dtype=torch.float64)
            for start in range(0, num_rows, chunk):
                total += matrix[start : start + chunk].double().sum(dim=0)
        self._mean_rows[tensor] = (total / num_rows).float()
        return self._mean_rows[tensor]


def _local_directory(path: str) -> Path:
    """A local checkpoint directory as is; a model id is fetched (configs and safetensors only)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # hub errors share no base class; every one means "not found"
        raise ValueError(
            f"model.pretrained_llm={path!r}: not a directory, and not a model id that could be "
            f"fetched ({one_line(err)})"
        ) from None


def apply_llm_config(cfg: ModelConfig) -> PretrainedLLM:
    """The reader for `cfg.pretrained_llm`, with `cfg` updated from it."""
    llm = PretrainedLLM(cfg.pretrained_llm)
    llm.apply_config(cfg)
    return llm


def load_llm_weights(model: SplitVLM) -> None:
    """Load `model.cfg.pretrained_llm` into a model built from an applied config."""
    apply_llm_config(model.cfg).load_into(model)


def build_split_vlm(
    cfg: ModelConfig, seed: int | None = None, load_weights: bool = True
) -> SplitVLM:
    """The model for `cfg`, its LLM loaded from `cfg.pretrained_llm` when set. `seed`: every
    parameter first set to its unit's seeded init (`SplitVLM.reset_parameters`), the values a
    sharded build fills its shards with. `load_weights=False`: constructed only (a meta or
    partitioned build, filled by the engine)."""
    llm = apply_llm_config(cfg) if cfg.pretrained_llm else None
    model = SplitVLM(cfg)
    if not load_weights:
        return model
    if seed is not None:
        model.reset_parameters(seed)
    if llm is not None:
        llm.load_into(model)
    return model
