"""Transformer blocks over packed sequences: RMSNorm, RoPE, GQA attention, gated MLP.

The Llama block by default; Gemma's is the same with config switches: (1 + w) norms, sandwich
norms around each sublayer, a GELU-gated MLP, its own softmax scale and sliding-window layers
with a RoPE base of their own; so is Persimmon's (Fuyu's LLM): LayerNorms with biases, RoPE on
half of each head, an un-gated squared-ReLU MLP and biases on every linear
(`models.config.ModelConfig`). A block may carry CogVLM's visual expert: q/k/v, output and MLP
weights of its own for the image tokens (`VisualExpert`, routed by `ExpertRoute`). A core block
may instead be LLaMA-3.2-Vision's gated cross-attention block (`CrossAttentionBlock`), whose
queries are the sequence and whose keys are the images' stream (`models.cross_attention`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import PackedLayout, packed_attention
from models.config import ModelConfig
from models.cross_attention import CrossContext, cross_attention


class RMSNorm(nn.Module):
    """RMSNorm scaling by `weight`, or with `offset_weight` (Gemma) by (1 + weight) in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, offset_weight: bool = False):
        super().__init__()
        self.eps = eps
        self.offset_weight = offset_weight
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.offset_weight else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset_weight:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Gemma scales in fp32 and rounds once, (x * w).to(bf16) rather than x.to(bf16) * w
        # (transformers#29402): the same rounding as its checkpoints were trained with.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm_style == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, offset_weight=cfg.norm_style == "gemma")


class PerHeadLayerNorm(nn.Module):
    """Chameleon's q/k norm: a LayerNorm over each head's width (eps 1e-5), then each head's own
    weight and bias, (heads, head_dim) each (transformers' ChameleonLayerNorm)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x_THD: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x_THD, (x_THD.shape[-1],), eps=1e-5)
        return normed * self.weight + self.bias


def _qk_norm(cfg: ModelConfig, num_heads: int) -> nn.Module:
    """The q (or k, with the KV heads) norm `model.qk_norm` asks for."""
    if cfg.qk_norm == "per_head_layernorm":
        return PerHeadLayerNorm(num_heads, cfg.head_dim)
    return make_norm(cfg, cfg.head_dim) if cfg.qk_norm else nn.Identity()


class TokenEmbedding(nn.Embedding):
    """Token embeddings, times sqrt(width) with `scaled` (Gemma)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scaled: bool = False):
        super().__init__(num_embeddings, embedding_dim)
        self.scale = math.sqrt(embedding_dim) if scaled else None

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids` (a sharded engine may look them up otherwise)."""
        return super().forward(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.lookup(ids)
        if self.scale is None:
            return embeddings
        return embeddings * _rounded(self.scale, embeddings.dtype)


@functools.cache
def _rounded(value: float, dtype: torch.dtype) -> float:
    # transformers multiplies by the scale cast to the weights' dtype (sqrt(3072) is 55.5 in bf16)
    return torch.tensor(value).to(dtype).item()


@dataclass(frozen=True)
class RopeTables:
    """RoPE (cos, sin) tables of one micro-batch, each (T, rotary_dim // 2): one for full-attention
    layers and one for sliding layers (the same tensors unless `sliding_rope_theta` is set)."""

    full: tuple[torch.Tensor, torch.Tensor]
    sliding: tuple[torch.Tensor, torch.Tensor]

    def select(self, index: torch.Tensor) -> RopeTables:
        """The rows of the tokens `index`."""
        full = (self.full[0][index], self.full[1][index])
        if self.sliding is self.full:
            return RopeTables(full, full)
        return RopeTables(full, (self.sliding[0][index], self.sliding[1][index]))


def rope_tables(positions_TA: torch.Tensor, cfg: ModelConfig) -> RopeTables:
    """The tables of every layer type, computed once per forward and shared by all layers.

    `positions_TA` holds A position axes, each rotating its own frequencies (`frequency_axes`):
    with two, the first half by axis 0 and the second half by axis 1 (2-D RoPE for image grids);
    with three (M-RoPE), `cfg.mrope_section` frequencies each. Where the axes are equal — all
    text — this is exactly the 1-D RoPE of the checkpoint families (Llama-3 scaling included).
    """
    axes = frequency_axes(cfg, positions_TA.shape[1], positions_TA.device)
    full = _rope_table(positions_TA, rope_inverse_frequencies(cfg, positions_TA.device), axes)
    if not (cfg.sliding_rope_theta and "sliding" in cfg.layer_types):
        return RopeTables(full, full)
    inv_freq = rope_inverse_frequencies(cfg, positions_TA.device, sliding=True)
    return RopeTables(full, _rope_table(positions_TA, inv_freq, axes))


def frequency_axes(cfg: ModelConfig, num_axes: int, device=None) -> torch.Tensor:
    """(rotary_dim // 2,) the position axis each RoPE frequency rotates by."""
    num_freqs = cfg.rotary_dim // 2
    if num_axes == 3:  # M-RoPE: time, row, column, in frequency order (Qwen2-VL's sections)
        sizes = torch.tensor(cfg.mrope_section, device=device)
        return torch.arange(3, device=device).repeat_interleave(sizes)
    return (torch.arange(num_freqs, device=device) >= num_freqs // 2).long()


def _rope_table(positions_TA: torch.Tensor, inv_freq: torch.Tensor, axes: torch.Tensor):
    angles_TF = positions_TA.float()[:, axes] * inv_freq[None, :]
    return angles_TF.cos(), angles_TF.sin()


def rope_inverse_frequencies(cfg: ModelConfig, device=None, sliding: bool = False) -> torch.Tensor:
    """(rotary_dim // 2,) fp32, in the order and with the operations of transformers'
    `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters` and
    `_compute_llama3_parameters`, so tables match exactly. `sliding`: the sliding layers' own
    base, unscaled (Gemma 3's local RoPE)."""
    rotary_dim = cfg.rotary_dim
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (cfg.sliding_rope_theta if sliding else cfg.rope_theta) ** exponents
    if sliding:
        return inv_freq
    if cfg.rope_linear_factor:
        return inv_freq / cfg.rope_linear_factor
    factor = cfg.rope_llama3_factor
    if not factor:
        return inv_freq
    low, high = cfg.rope_llama3_low_freq_factor, cfg.rope_llama3_high_freq_factor
    original = cfg.rope_llama3_original_max_positions
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x_THD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Half-split rotation, the convention of Llama/Qwen2 checkpoints in transformers, of a head's
    first 2F dimensions (all of them but with partial RoPE); the rest pass unrotated."""
    rotary_dim = 2 * cos_TF.shape[-1]
    if rotary_dim == 0:  # no RoPE (learned absolute positions)
        return x_THD
    rotated, passed = x_THD[..., :rotary_dim], x_THD[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    cos, sin = cos_TF[:, None, :].to(x_THD.dtype), sin_TF[:, None, :].to(x_THD.dtype)
    return torch.cat((first * cos - second * sin, second * cos + first * sin, passed), dim=-1)


class ExpertRoute(NamedTuple):
    """Which tokens of a sequence take a block's text weights and which its visual expert's
    (indices; together every token once)."""

    text: torch.Tensor
    image: torch.Tensor


def _routed(text: nn.Module, expert: nn.Module | None, x_TC: torch.Tensor, route) -> torch.Tensor:
    """`text(x_TC)`, or with a `route`, `text` on its text tokens and `expert` on its image ones."""
    if route is None:
        return text(x_TC)
    text_out, image_out = text(x_TC[route.text]), expert(x_TC[route.image])
    out = text_out.new_empty(x_TC.shape[0], text_out.shape[-1])
    return out.index_copy(0, route.text, text_out).index_copy(0, route.image, image_out)


def _projections(
    cfg: ModelConfig, key_width: int | None = None
) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """Attention's q, k, v and output projections; k and v read `key_width` (d_model)."""
    bias, key_width = cfg.attention_bias, key_width or cfg.d_model
    return (
        nn.Linear(cfg.d_model, cfg.num_heads * cfg.head_dim, bias=bias),
        nn.Linear(key_width, cfg.num_kv_heads * cfg.head_dim, bias=bias),
        nn.Linear(key_width, cfg.num_kv_heads * cfg.head_dim, bias=bias),
        nn.Linear(cfg.num_heads * cfg.head_dim, cfg.d_model, bias=cfg.attention_output_bias),
    )


def _set_heads(attention: nn.Module, cfg: ModelConfig) -> None:
    """The head counts, head width and backend an attention module reads from `cfg`."""
    attention.num_heads, attention.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    attention.head_dim, attention.backend = cfg.head_dim, cfg.attention_backend


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        _set_heads(self, cfg)
        self.scale = cfg.attention_scale or None
        self.window = window  # None: full attention
        self.wq, self.wk, self.wv, self.wo = _projections(cfg)
        self.q_norm = _qk_norm(cfg, cfg.num_heads)
        self.k_norm = _qk_norm(cfg, cfg.num_kv_heads)

    def forward(
        self, x_TC: torch.Tensor, layout: PackedLayout, rope, expert=None, route=None
    ) -> torch.Tensor:
        """`expert` (a `VisualExpert`) projects the image tokens of `route`."""
        num_tokens = x_TC.shape[0]

        def project(name: str) -> torch.Tensor:
            return _routed(getattr(self, name), getattr(expert, name, None), x_TC, route)

        q_THD = self.q_norm(project("wq").view(num_tokens, self.num_heads, self.head_dim))
        k_THD = self.k_norm(project("wk").view(num_tokens, self.num_kv_heads, self.head_dim))
        v_THD = project("wv").view(num_tokens, self.num_kv_heads, self.head_dim)
        q_THD, k_THD = apply_rope(q_THD, *rope), apply_rope(k_THD, *rope)
        out_THD = packed_attention(
            q_THD, k_THD, v_THD, layout, self.backend, scale=self.scale, window=self.window
        )
        wo = getattr(expert, "wo", None)
        return _routed(self.wo, wo, out_THD.reshape(num_tokens, -1), route)


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


# `model.mlp_activation` → the function
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu2": _squared_relu,
    "relu": F.relu,
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with "silu", Gemma's GeGLU with "gelu_tanh"."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.gate(x)) * self.up(x))


class MLP(nn.Module):
    """down(act(up(x))): the un-gated MLP (Persimmon's, with squared ReLU and biases)."""

    def __init__(self, dim: int, hidden: int, activation: str = "relu2", bias: bool = True):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))


def _make_mlp(cfg: ModelConfig) -> nn.Module:
    hidden = cfg.mlp_hidden or int(cfg.mlp_ratio * cfg.d_model + 7) // 8 * 8
    mlp_class = GatedMLP if cfg.mlp_gated else MLP
    return mlp_class(cfg.d_model, hidden, cfg.mlp_activation, cfg.mlp_bias)


class VisualExpert(nn.Module):
    """CogVLM's visual expert of one block: q/k/v, output and MLP weights of its own, which the
    block's image tokens take instead of its text weights (its norms are shared). Each module
    starts as a copy of its text twin (`TEXT_TWIN`), which a pretrained LLM fills too."""

    # Our module → the block's module it copies.
    TEXT_TWIN = {"wq": "attn.wq", "wk": "attn.wk", "wv": "attn.wv", "wo": "attn.wo", "mlp": "mlp"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = _projections(cfg)
        self.mlp = _make_mlp(cfg)


class Block(nn.Module):
    """A pre-norm block (with `model.post_norms` normed on both sides of each sublayer, with
    `model.swin_norm` on its output only); `sliding`: its attention has the sliding window
    (`cfg.sliding_window`) and its RoPE is the sliding layers' table; `expert`: it carries a
    `VisualExpert`."""

    def __init__(self, cfg: ModelConfig, sliding: bool = False, expert: bool = False):
        super().__init__()
        self.sliding = sliding

        def norm(used: bool) -> nn.Module:
            return make_norm(cfg, cfg.d_model) if used else nn.Identity()

        pre, post = not cfg.swin_norm, cfg.post_norms or cfg.swin_norm
        self.attn_norm = norm(pre)
        self.attn = Attention(cfg, window=cfg.sliding_window if sliding else None)
        self.attn_post_norm = norm(post)
        self.mlp_norm = norm(pre)
        self.mlp = _make_mlp(cfg)
        self.mlp_post_norm = norm(post)
        self.expert = VisualExpert(cfg) if expert else None

    def forward(
        self, x_TC: torch.Tensor, layout: PackedLayout, rope: RopeTables, route=None, cross=None
    ) -> torch.Tensor:
        """`route` (`ExpertRoute`): which tokens take the visual expert, when there is one;
        `cross` is the cross-attention blocks' (`run_blocks` gives every block the same
        arguments)."""
        table = rope.sliding if self.sliding else rope.full
        route = route if self.expert is not None else None
        attended = self.attn(self.attn_norm(x_TC), layout, table, self.expert, route)
        x_TC = x_TC + self.attn_post_norm(attended)
        expert_mlp = self.expert.mlp if route is not None else None
        return x_TC + self.mlp_post_norm(_routed(self.mlp, expert_mlp, self.mlp_norm(x_TC), route))

    @torch.no_grad()
    def copy_text_weights_into_expert(self) -> None:
        """The visual expert's start: its text twins' values."""
        for name, twin in VisualExpert.TEXT_TWIN.items():
            source = dict(self.get_submodule(twin).named_parameters())
            for leaf, parameter in self.expert.get_submodule(name).named_parameters():
                parameter.copy_(source[leaf])


class CrossAttention(nn.Module):
    """Attention of the sequence's tokens (queries) over the images' stream (keys, values):
    q/k/v and output projections as a self-attention's (k and v reading the stream's width,
    `cfg.cross_key_width`), with `cross_attention_qk_norm` an RMSNorm over each head's width on
    queries and keys, no RoPE (transformers' MllamaTextCrossAttention, Idefics' cross-attention
    IdeficsAttention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _set_heads(self, cfg)
        self.window = None  # models/flops.py: attention over its whole layout
        self.wq, self.wk, self.wv, self.wo = _projections(cfg, cfg.cross_key_width)
        if cfg.cross_attention_qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x_TC: torch.Tensor, cross: CrossContext) -> torch.Tensor:
        states = cross.states_KC.to(x_TC.dtype)
        q_THD = self.q_norm(self.wq(x_TC).view(x_TC.shape[0], self.num_heads, self.head_dim))
        k_KHD = self.k_norm(self.wk(states).view(states.shape[0], self.num_kv_heads, self.head_dim))
        v_KHD = self.wv(states).view(states.shape[0], self.num_kv_heads, self.head_dim)
        out_THD = cross_attention(q_THD, k_KHD, v_KHD, cross.layout, self.backend)
        if not cross.layout.segments:
            # No query sees a key (a micro-batch without images under a sharded engine): the
            # projections still join the graph, so each of them gets an exact zero gradient.
            out_THD = out_THD + 0.0 * (q_THD.sum() + k_KHD.sum() + v_KHD.sum())
        return self.wo(out_THD.reshape(x_TC.shape[0], -1))


class CrossAttentionBlock(nn.Module):
    """A gated cross-attention block between the language model's layers, LLaMA-3.2-Vision's
    (transformers' MllamaCrossAttentionDecoderLayer) or Flamingo's (IdeficsGatedCrossAttention-
    Layer):

        h = x + tanh(attn_gate) · cross_attn(norm(x), images)
        out = h + tanh(mlp_gate) · sees_image · mlp(norm(h))

    The gates start at 0, so a new block passes its input through unchanged; with
    `cross_attention_gate: vector` each is one a channel, shaped (1, 1, d_model) as Idefics
    stores it. A query that sees no image gets a zero attention output (its layout's empty
    row) and, in the "mllama" style, has its MLP output dropped too (`sees_image`; "flamingo"
    keeps it). Without images (`cross` None) every query sees none: a "mllama" block is then
    skipped, as transformers skips it for text, and a "flamingo" one runs its MLP alone, as
    Idefics does on its processor's blank image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        gate_shape = (1, 1, cfg.d_model) if cfg.cross_attention_gate == "vector" else (1,)
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = CrossAttention(cfg)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = _make_mlp(cfg)
        self.mlp_gate = nn.Parameter(torch.zeros(gate_shape))
        self.mask_blind_mlp = cfg.cross_attention_style == "mllama"
        self.expert = None

    def reset_gates(self) -> None:
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.mlp_gate)

    def forward(self, x_TC, layout=None, rope=None, route=None, cross: CrossContext | None = None):
        if cross is None and self.mask_blind_mlp:
            return x_TC
        attn_gate, mlp_gate = (
            gate.tanh().reshape(-1).to(x_TC.dtype) for gate in (self.attn_gate, self.mlp_gate)
        )
        if cross is not None:
            x_TC = x_TC + attn_gate * self.attn(self.attn_norm(x_TC), cross)
        mlp_out = self.mlp(self.mlp_norm(x_TC))
        if self.mask_blind_mlp:
            mlp_out = mlp_out * cross.layout.sees_image[:, None].to(x_TC.dtype)
        return x_TC + mlp_gate * mlp_out


def run_blocks(blocks: nn.ModuleList, x_TC, layout, rope: RopeTables, route=None, cross=None):
    """`cross` (`CrossContext`): what cross-attention blocks attend to, None without images."""
    for block in blocks:
        x_TC = block(x_TC, layout, rope, route, cross)
    return x_TC
