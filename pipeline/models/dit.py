"""LetsTalkDiT: a latent video diffusion transformer conditioned on a portrait and audio.

Video latents are cut into p×p patches, giving tokens ``[B, F, S, D]`` (F frames,
S = (h/p)·(w/p) positions). Blocks alternate spatial attention (within a frame) and
temporal attention (across frames at one position), as in Latte, each conditioned on
the timestep by adaLN-Zero, as in DiT. Conditions (DESIGN.md section 3):

* portrait — *symbiotic* fusion: the reference latent frame(s) are patchified like the
  video and prepended along the frame axis, so they pass through the same blocks and
  every video token reaches them through temporal attention;
* audio — *direct* fusion: per-frame cross-attention in the spatial blocks, so each
  frame attends only to its own window of W audio vectors.

Condition dropout (for classifier-free guidance) swaps in learned null embeddings,
never masks, so the hot path has no padding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.attention import Attention
from pipeline.models.sizes import get_size


@dataclass
class DiTConfig:
    """Everything needed to build a LetsTalkDiT; stored in checkpoints as a plain dict."""

    size: str = "tiny"  # a key of pipeline.models.sizes.SIZES
    latent_channels: int = 4  # C of the VAE latents (from the shard manifest)
    patch_size: int = 2
    audio_dim: int = 80  # D of the audio features (from the shard manifest)
    audio_tokens: int = 20  # W: audio vectors per frame window ((2·radius+1)·K)
    ref_frames: int = 1  # R reference portrait frames
    attention_backend: str = "sdpa"
    qk_norm: bool = True
    temporal_attention: bool = True  # False: every block is spatial (frames only meet through the portrait)
    grad_checkpointing: bool = False

    def validate(self) -> None:
        size = get_size(self.size)
        if size.hidden % size.heads:
            raise ValueError(f"size {self.size}: hidden {size.hidden} not divisible by heads {size.heads}")
        for name in ("latent_channels", "patch_size", "audio_dim", "audio_tokens", "ref_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) positions [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """2D sin-cos position embedding for an h×w grid -> [h·w, dim] (half the channels per axis)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.cat([sincos(ys.flatten(), dim // 2), sincos(xs.flatten(), dim // 2)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Diffusion timestep (0..1000, may be fractional) -> [B, D] via sinusoids and an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sincos(t, self.freq_dim))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Block(nn.Module):
    """One transformer block attending along one axis of ``[B, T, S, D]`` tokens.

    adaLN-Zero: the timestep embedding regresses shift/scale/gate for both sub-layers,
    and the regression starts at zero, so every block is the identity at initialisation.
    Spatial blocks also cross-attend, frame by frame, to that frame's audio tokens.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, axis: str, audio: bool,
                 qk_norm: bool, backend: str):
        super().__init__()
        self.axis = axis
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, backend=backend)
        self.audio_norm = nn.LayerNorm(dim, eps=1e-6) if audio else None
        self.audio_attn = Attention(dim, heads, context_dim=dim, qk_norm=qk_norm, backend=backend,
                                    zero_out=True) if audio else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, s, d = x.shape
        if self.axis == "spatial":  # each frame is a sequence of S tokens
            return self.attn(x.reshape(b * t, s, d)).view(b, t, s, d)
        y = self.attn(x.transpose(1, 2).reshape(b * s, t, d))  # each position is a sequence of T tokens
        return y.view(b, s, t, d).transpose(1, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """x [B, T, S, D], c [B, D], audio [B, T, W, D] -> [B, T, S, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None, None].chunk(6, dim=-1)
        x = x + gate1 * self._attend(modulate(self.norm1(x), shift1, scale1))
        if self.audio_attn is not None:
            b, t, s, d = x.shape
            x = x + self.audio_attn(self.audio_norm(x).reshape(b * t, s, d),
                                    audio.reshape(b * t, -1, d)).view(b, t, s, d)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a zero-initialised projection back to patch pixels, so the model outputs 0 at init."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, patch_dim)
        for layer in (self.ada[1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, None, None].chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class LetsTalkDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        size = get_size(config.size)
        dim, p, c = size.hidden, config.patch_size, config.latent_channels
        self.hidden = dim
        self.patch = nn.Linear(c * p * p, dim)
        self.ref_type = nn.Parameter(torch.zeros(dim))  # marks reference tokens apart from video tokens
        self.null_ref = nn.Parameter(torch.zeros(c * p * p))  # the "no portrait" patch, for guidance
        self.time = TimestepEmbedder(dim)
        self.audio_in = nn.Sequential(nn.Linear(config.audio_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.null_audio = nn.Parameter(torch.zeros(config.audio_tokens, config.audio_dim))
        self.blocks = nn.ModuleList(
            Block(dim, size.heads, size.mlp_ratio, axis=self._axis(i), audio=self._axis(i) == "spatial",
                  qk_norm=config.qk_norm, backend=config.attention_backend)
            for i in range(size.depth)
        )
        self.final = FinalLayer(dim, c * p * p)
        nn.init.normal_(self.time.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time.mlp[2].weight, std=0.02)

    def _axis(self, index: int) -> str:
        return "spatial" if index % 2 == 0 or not self.config.temporal_attention else "temporal"

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, C, h, w] -> [B, T, (h/p)(w/p), C·p·p]
        b, t, c, h, w = x.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
        x = x.reshape(b, t, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, t, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # [B, T, (h/p)(w/p), C·p·p] -> [B, T, C, h, w]
        b, t = x.shape[:2]
        p, c = self.config.patch_size, self.config.latent_channels
        x = x.reshape(b, t, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, t, c, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ref: torch.Tensor, audio: torch.Tensor,
                drop_ref: torch.Tensor | None = None, drop_audio: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the diffusion target for a clip.

        x [B, F, C, h, w] noisy latents; t [B] timesteps; ref [B, R, C, h, w] clean portrait
        latents; audio [B, F, W, Da]; drop_ref / drop_audio [B] bool: replace that condition
        by its null embedding (classifier-free guidance). Returns [B, F, C, h, w].
        """
        b, f, _, h, w = x.shape
        r = ref.shape[1]
        video = self.patchify(x)  # [B, F, S, Cp²]
        ref_patches = self.patchify(ref)  # [B, R, S, Cp²]
        if drop_ref is not None:
            ref_patches = torch.where(drop_ref[:, None, None, None], self.null_ref.to(ref_patches.dtype), ref_patches)
        tokens = self.patch(torch.cat([ref_patches, video], dim=1))  # [B, R+F, S, D]
        s = tokens.shape[2]
        p = self.config.patch_size
        pos = sincos_2d(h // p, w // p, self.hidden, x.device)[None, None]  # [1, 1, S, D]
        frame = sincos(torch.arange(r + f, device=x.device), self.hidden)[None, :, None]  # [1, R+F, 1, D]
        kind = torch.cat([self.ref_type.expand(r, -1), torch.zeros_like(self.ref_type).expand(f, -1)])
        tokens = tokens + (pos + frame + kind[None, :, None]).to(tokens.dtype)

        if drop_audio is not None:
            audio = torch.where(drop_audio[:, None, None, None], self.null_audio.to(audio.dtype), audio)
        audio = torch.cat([self.null_audio.expand(b, r, -1, -1).to(audio.dtype), audio], dim=1)  # [B, R+F, W, Da]
        wpos = sincos(torch.arange(audio.shape[2], device=x.device), self.hidden)
        audio = self.audio_in(audio) + wpos.to(audio.dtype)  # [B, R+F, W, D]

        c = self.time(t)  # [B, D]
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, c, audio, use_reentrant=False)
            else:
                tokens = block(tokens, c, audio)
        out = self.final(tokens[:, r:], c)  # [B, F, S, Cp²]
        return self.unpatchify(out, h, w)

    def flops_per_clip(self, frames: int, h: int, w: int) -> int:
        """Forward FLOPs (2 per multiply-add) of one clip of `frames` latent frames of h×w: matmuls
        and attention, the terms that dominate; used for throughput and MFU."""
        cfg, size = self.config, get_size(self.config.size)
        d, s = self.hidden, (h // cfg.patch_size) * (w // cfg.patch_size)
        t = frames + cfg.ref_frames
        n, wa, mlp = t * s, cfg.audio_tokens, int(d * size.mlp_ratio)
        cp2 = cfg.latent_channels * cfg.patch_size ** 2
        total = 2 * n * cp2 * d + 2 * frames * s * d * cp2  # patch embed + final projection
        total += 2 * t * wa * (cfg.audio_dim * d + d * d)  # audio MLP
        for i in range(size.depth):
            total += 2 * n * (3 * d * d + d * d + 2 * d * mlp)  # qkv, out, mlp
            spatial = self._axis(i) == "spatial"
            seq, num = (s, t) if spatial else (t, s)
            total += num * 4 * seq * seq * d  # q·kᵀ and attn·v
            if spatial:  # audio cross-attention
                total += 2 * n * (2 * d * d) + 2 * t * wa * 2 * d * d + t * 4 * s * wa * d
        return int(total)
