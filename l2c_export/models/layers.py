"""Layers that DiT and U-ViT share, with the parameter names of timm's modules (so that both official checkpoint
layouts load), and the cache lookup of the L2C cached forwards."""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that normalises in fp32 when the model runs in fp16 or bf16 (a no-op difference in fp32), so that
    a half-precision export keeps its normalisation accurate. No parameters: the state_dict is unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D); the parameter names of timm's PatchEmbed (``proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj.weight.dtype == torch.bfloat16:
            # ONNX Conv takes bfloat16 only from opset 22 (TensorRT 10 parses up to 20): convolve in fp32.
            weight, bias = self.proj.weight.float(), self.proj.bias.float()
            x = F.conv2d(x.float(), weight, bias, stride=self.proj.stride).to(torch.bfloat16)
        else:
            x = self.proj(x)
        return x.flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps (N,) into vectors (N, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """Sinusoidal embeddings (N, dim) of the (N,) possibly fractional timesteps ``t``."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None].to(t.device)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = self.timestep_embedding(t, self.frequency_embedding_size)  # fp32, whatever the model's dtype
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention with the parameter names of timm's Attention (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, D)."""
        # Shapes as Python ints with -1 for the batch: an exported graph then has constant reshapes, not a chain of
        # Shape/Gather/Concat nodes per reshape.
        tokens, dim = int(x.shape[1]), int(x.shape[2])
        qkv = self.qkv(x).reshape(-1, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if x.dtype == torch.float32 and not torch.jit.is_tracing():
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # exported or half precision: a constant scale, softmax in fp32 (SDPA exports a dynamic one)
            scores = (q @ k.transpose(-2, -1)).float() * self.head_dim ** -0.5
            x = scores.softmax(dim=-1).to(v.dtype) @ v
        return self.proj(x.transpose(1, 2).reshape(-1, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU (DiT: tanh approximation; U-ViT: exact) -> fc2, the parameter names of timm's Mlp."""

    def __init__(self, dim: int, hidden_dim: int, approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def cached_output(cache: Mapping[int, torch.Tensor], index: int) -> torch.Tensor:
    """The value of sub-layer ``index`` in a request's cache, with a clear error where it was never computed."""
    try:
        return cache[index]
    except KeyError:
        raise KeyError(f"sub-layer {index} is reused but was never computed in this request") from None
