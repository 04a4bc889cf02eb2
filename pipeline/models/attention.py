"""The one attention function of the model, and the attention module built on it.

q, k, v are laid out ``[batch, heads, seq, head_dim]`` (what FlashAttention and
PyTorch's fused SDPA kernels want); no masks, because clips have fixed length and
condition dropout uses null embeddings instead of padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ / √d) v for q [B, H, N, d], k/v [B, H, M, d] -> [B, H, N, d].

    ``sdpa`` dispatches to PyTorch's fused kernels (FlashAttention / cuDNN / memory-efficient
    on GPU); ``math`` is the explicit reference computation.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


class Attention(nn.Module):
    """Multi-head self-attention (``context=None``) or cross-attention with QK-norm.

    Self-attention uses one fused qkv projection. The output projection can start at
    zero (``zero_out``) so a new branch is the identity at initialisation.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True,
                 backend: str = "sdpa", zero_out: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        # [B, N, n*D] -> n tensors of [B, H, N, d]
        b, length, _ = x.shape
        return x.view(b, length, n, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D], context [B, M, Dc] (cross-attention only) -> [B, N, D]."""
        if self.cross:
            (q,) = self._heads(self.q(x), 1)
            k, v = self._heads(self.kv(context), 2)
        else:
            q, k, v = self._heads(self.qkv(x), 3)
        y = attention(self.q_norm(q), self.k_norm(k), v, self.backend)  # [B, H, N, d]
        return self.out(y.transpose(1, 2).reshape(x.shape))
