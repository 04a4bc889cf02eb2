"""The one attention function of the model, the attention module built on it, and RoPE.

q, k, v are laid out ``[batch, heads, seq, head_dim]`` (what FlashAttention and PyTorch's fused
SDPA kernels want); no masks, because clips have fixed length and condition dropout uses null
embeddings instead of padding. Backends of :func:`attention`:

* ``sdpa`` — ``F.scaled_dot_product_attention`` (FlashAttention / cuDNN / memory-efficient kernels
  on GPU);
* ``flash_attn`` — ``flash_attn_func`` of the ``flash_attn`` package (CUDA, fp16/bf16: float32
  inputs run in bf16);
* ``math`` — the explicit softmax(q kᵀ/√d) v, the reference;
* ``linear`` — ReLU-kernel linear attention as in Sana (Xie et al. 2024), the option of the
  paper's later versions: out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j) with φ = ReLU,
  computed as φ(q)(φ(k)ᵀ v) in float32, so its cost grows linearly with sequence length.

RoPE (:func:`rope_rotation`, :func:`apply_rope`) rotates q and k by their tokens' (time, height,
width) coordinates, so softmax attention scores depend only on relative positions. With the
``linear`` backend the rotation comes before the ReLU feature map, which keeps RoPE's position
signal but not its exact relative-only property.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "flash_attn", "math", "linear")


def _flash_attn_func() -> Callable:
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except ImportError:
        raise ImportError("attention_backend 'flash_attn' needs the flash_attn package, which is not importable "
                          "here: install it on a CUDA machine (pip install flash-attn) or choose 'sdpa'") from None


def check_backend(backend: str) -> None:
    """Fail early, with the fix, on an unknown backend or on ``flash_attn`` without its package."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "flash_attn":
        _flash_attn_func()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Attention of q [B, H, N, d] over k/v [B, H, M, d] -> [B, H, N, d] with one of BACKENDS."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)
    if backend == "linear":
        fq, fk = F.relu(q).float(), F.relu(k).float()
        v1 = F.pad(v.float(), (0, 1), value=1.0)  # [B, H, M, d+1]: the ones column sums φ(k) for the normaliser
        out = torch.matmul(fq, torch.matmul(fk.transpose(-2, -1), v1))  # [B, H, N, d+1]
        return (out[..., :-1] / (out[..., -1:] + 1e-6)).to(v.dtype)
    if backend == "flash_attn":
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = _flash_attn_func()(*(x.transpose(1, 2).to(dtype) for x in (q, k, v)))  # [B, N, H, d]
        return out.transpose(1, 2).to(q.dtype)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def rope_rotation(coords: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE's rotation [2, N, head_dim/2]: cos and sin of the angles of tokens at integer (time, height, width)
    coords [N, 3], in float32. Computed once per forward pass and shared by every block's q and k.

    The head_dim/2 rotated channel pairs are split into bands: a quarter for time, the rest
    halved between height and width (a leftover pair stays unrotated); each band uses the
    usual geometric frequencies theta^(-i/band).
    """
    pairs = head_dim // 2
    time = pairs // 4
    space = (pairs - time) // 2
    bands = []
    for axis, size in enumerate((time, space, space)):
        freqs = theta ** (-torch.arange(size, device=coords.device, dtype=torch.float32) / size)
        bands.append(coords[:, axis, None].float() * freqs)  # [N, size]
    bands.append(coords.new_zeros(coords.shape[0], pairs - time - 2 * space, dtype=torch.float32))
    angles = torch.cat(bands, dim=-1)  # [N, d/2]
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_i, x_{i+d/2}) of x [..., N, d] by a `rope_rotation` [2, N, d/2], in float32."""
    cos, sin = rotation
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Context(NamedTuple):
    """Tokens [B, M, D] that supply keys and values, with their RoPE rotation [2, M, d/2] (None: unrotated).

    One context item may serve several consecutive sequences of the query batch: queries
    [B·G, N, D] (e.g. the G frames of a clip) share context [B, M, D] (e.g. its portrait).
    """

    tokens: torch.Tensor
    rope: torch.Tensor | None = None


def _share(x: torch.Tensor, batch: int) -> torch.Tensor:
    # [B, H, M, d] -> [B·G, H, M, d]: each context item serves G = batch / B consecutive query sequences
    return x if x.shape[0] == batch else x.repeat_interleave(batch // x.shape[0], dim=0)


def _rotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    return x if rotation is None else apply_rope(x, rotation)


class Attention(nn.Module):
    """Multi-head attention with QK-norm and optional RoPE.

    Self-attention (``context_dim=None``): q, k, v come from x through one fused projection;
    context tokens (a siamese twin's features) join as extra keys/values only, projected by the
    same k/v weights. Cross-attention: q from x, keys/values from the context alone, through
    their own projection. ``zero_out`` starts the output projection at zero, so a new branch
    is the identity at initialisation.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True,
                 backend: str = "sdpa", zero_out: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        check_backend(backend)
        self.dim, self.heads, self.head_dim, self.backend = dim, heads, dim // heads, backend
        self.zero_out = zero_out
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

    def _heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        # [B, N, n·D] -> n tensors of [B, H, N, d]
        b, length, _ = x.shape
        return x.view(b, length, n, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _kv(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cross:
            return self.kv(tokens)
        return F.linear(tokens, self.qkv.weight[self.dim:], self.qkv.bias[self.dim:])  # the k/v rows of qkv

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                context: Sequence[Context] = ()) -> torch.Tensor:
        """x [B·G, N, D] queries with their RoPE rotation [2, N, d/2] (None: unrotated); context: key/value token
        sets (see :class:`Context`) -> [B·G, N, D]."""
        if self.cross and len(context) == 1 and context[0].tokens.shape[0] < x.shape[0]:
            return self._shared_cross(x, rope, context[0])
        if self.cross:
            (q,) = self._heads(self.q(x), 1)
            keys, values = [], []
        else:
            q, k, v = self._heads(self.qkv(x), 3)
            keys, values = [_rotate(self.k_norm(k), rope)], [v]
        for item in context:
            k, v = self._heads(self._kv(item.tokens), 2)
            keys.append(_share(_rotate(self.k_norm(k), item.rope), x.shape[0]))
            values.append(_share(v, x.shape[0]))
        k, v = (keys[0], values[0]) if len(keys) == 1 else (torch.cat(keys, dim=2), torch.cat(values, dim=2))
        y = attention(_rotate(self.q_norm(q), rope), k, v, self.backend)  # [B·G, H, N, d]
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim))

    def _shared_cross(self, x: torch.Tensor, rope: torch.Tensor | None, item: Context) -> torch.Tensor:
        """Cross-attention of G consecutive query sequences to one shared context item (a clip's frames to its
        portrait): the G sequences fold into one query sequence per item ([B·G, N, D] -> [B, G·N, D], a view),
        so the item's keys and values are computed once and never repeated G times."""
        b, (bg, n, _) = item.tokens.shape[0], x.shape
        (q,) = self._heads(self.q(x.reshape(b, bg // b * n, self.dim)), 1)  # [B, H, G·N, d]
        k, v = self._heads(self._kv(item.tokens), 2)  # [B, H, M, d]
        rotation = None if rope is None else rope.repeat(1, bg // b, 1)  # [2, G·N, d/2]
        y = attention(_rotate(self.q_norm(q), rotation), _rotate(self.k_norm(k), item.rope), v, self.backend)
        return self.out(y.transpose(1, 2).reshape(bg, n, self.dim))
