"""Transformer blocks over packed sequences: RMSNorm, RoPE, GQA attention, SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import PackedLayout, packed_attention
from models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(positions_T2: torch.Tensor, cfg: ModelConfig):
    """cos, sin of shape (T, head_dim // 2), computed once per forward and shared by all layers.

    `positions_T2` holds two position axes: the first half of the frequencies rotates by axis 0,
    the second half by axis 1 (2-D RoPE for image grids). Where both axes are equal — all text —
    this is exactly the 1-D RoPE of the checkpoint families (Llama-3 scaling included).
    """
    inv_freq = rope_inverse_frequencies(cfg, positions_T2.device)
    num_freqs = inv_freq.shape[0]
    axis = (torch.arange(num_freqs, device=positions_T2.device) >= num_freqs // 2).long()
    angles_TF = positions_T2.float()[:, axis] * inv_freq[None, :]
    return angles_TF.cos(), angles_TF.sin()


def rope_inverse_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim // 2,) fp32, in the order and with the operations of transformers'
    `_compute_default_rope_parameters` and `_compute_llama3_parameters`, so tables match exactly."""
    head_dim = cfg.head_dim
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / cfg.rope_theta**exponents
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
    # Half-split rotation, the convention of Llama/Qwen2 checkpoints in transformers.
    first, second = x_THD.chunk(2, dim=-1)
    cos, sin = cos_TF[:, None, :].to(x_THD.dtype), sin_TF[:, None, :].to(x_THD.dtype)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.backend = cfg.attention_backend
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.d_model, cfg.num_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.d_model, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x_TC: torch.Tensor, layout: PackedLayout, rope) -> torch.Tensor:
        num_tokens = x_TC.shape[0]
        q_THD = self.q_norm(self.wq(x_TC).view(num_tokens, self.num_heads, self.head_dim))
        k_THD = self.k_norm(self.wk(x_TC).view(num_tokens, self.num_kv_heads, self.head_dim))
        v_THD = self.wv(x_TC).view(num_tokens, self.num_kv_heads, self.head_dim)
        q_THD, k_THD = apply_rope(q_THD, *rope), apply_rope(k_THD, *rope)
        out_THD = packed_attention(q_THD, k_THD, v_THD, layout, backend=self.backend)
        return self.wo(out_THD.reshape(num_tokens, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or int(cfg.mlp_ratio * cfg.d_model + 7) // 8 * 8
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, hidden)

    def forward(self, x_TC: torch.Tensor, layout: PackedLayout, rope) -> torch.Tensor:
        x_TC = x_TC + self.attn(self.attn_norm(x_TC), layout, rope)
        return x_TC + self.mlp(self.mlp_norm(x_TC))


def run_blocks(blocks: nn.ModuleList, x_TC, layout, rope):
    for block in blocks:
        x_TC = block(x_TC, layout, rope)
    return x_TC
