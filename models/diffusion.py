"""A small per-position diffusion head: an MLP denoiser conditioned on image-head hidden states.

Standard DDPM (Ho et al. 2020) with the cosine noise schedule (Nichol & Dhariwal 2021): training
predicts the noise added to a target vector; sampling runs the ancestral sampler from pure noise.
Each position is denoised independently; the transformer supplies the context through `cond`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cosine_alphas_cumprod(num_steps: int) -> torch.Tensor:
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    alphas_cumprod = f[1:] / f[0]
    return alphas_cumprod.clamp(1e-5, 1.0 - 1e-5).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


class DiffusionHead(nn.Module):
    def __init__(self, target_dim: int, cond_dim: int, hidden: int, num_steps: int):
        super().__init__()
        self.num_steps = num_steps
        self.hidden = hidden
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(num_steps), persistent=False)
        self.input = nn.Linear(target_dim, hidden)
        self.cond = nn.Linear(cond_dim, hidden)
        self.time = nn.Linear(hidden, hidden)
        self.blocks = nn.Sequential(ResidualMLP(hidden), ResidualMLP(hidden), ResidualMLP(hidden))
        self.out = nn.Linear(hidden, target_dim)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # The noised targets and the time embedding are fp32; under mixed precision (FSDP's
        # param_dtype) the weights are bf16, so inputs take the weights' dtype.
        dtype = self.input.weight.dtype
        time = timestep_embedding(t, self.hidden).to(dtype)
        h = self.input(x_t.to(dtype)) + self.cond(cond.to(dtype)) + self.time(time)
        return self.out(self.blocks(h))

    def loss(self, cond_NC: torch.Tensor, target_ND: torch.Tensor) -> torch.Tensor:
        """Noise-prediction MSE, averaged over features and summed over positions."""
        t = torch.randint(0, self.num_steps, (target_ND.shape[0],), device=target_ND.device)
        noise = torch.randn_like(target_ND)
        alpha_bar = self.alphas_cumprod[t][:, None]
        x_t = alpha_bar.sqrt() * target_ND + (1 - alpha_bar).sqrt() * noise
        return (self.predict_noise(x_t, t, cond_NC).float() - noise).pow(2).mean(dim=-1).sum()

    @torch.no_grad()
    def sample(self, cond_NC: torch.Tensor, target_dim: int, generator=None) -> torch.Tensor:
        """Ancestral DDPM sampling from N(0, I), one vector per conditioning row."""
        x = torch.randn(cond_NC.shape[0], target_dim, device=cond_NC.device, generator=generator)
        alphas_cumprod = self.alphas_cumprod
        for step in reversed(range(self.num_steps)):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            alpha_bar = alphas_cumprod[step]
            alpha_bar_prev = alphas_cumprod[step - 1] if step > 0 else torch.ones(())
            alpha = alpha_bar / alpha_bar_prev
            eps = self.predict_noise(x, t, cond_NC)
            mean = (x - (1 - alpha) / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()
            if step > 0:
                variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha)
                noise = torch.randn(x.shape, device=x.device, generator=generator)
                x = mean + variance.sqrt() * noise
            else:
                x = mean
        return x
