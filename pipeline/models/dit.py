"""LetsTalkDiT: a latent video diffusion transformer conditioned on a portrait and audio.

Video latents are cut into p×p patches, giving tokens ``[B, T, N, D]`` (T frames, N tokens per
frame: the S = (h/p)·(w/p) patches, plus any condition tokens fused into the sequence). Blocks
alternate spatial attention (within a frame) and temporal attention (across frames at one
position), as in Latte, each conditioned on the timestep by adaLN-Zero, as in DiT.

Each condition is fused by one of the paper's three schemes, chosen per condition in the config
(``portrait_fusion``, ``audio_fusion``); conditions fused by layers join in the spatial blocks:

* ``direct`` — cross-attention from the video tokens to the condition's tokens. Portrait: every
  frame's tokens attend to the portrait's R·S patch tokens; audio: each frame attends only to
  its own window of W audio vectors.
* ``siamese`` — a twin branch with its own weights: one light block (pre-norm self-attention and
  MLP, no timestep modulation because the condition is clean, as in ReferenceNet) per spatial
  block. The twin's features after twin block i join spatial block i's self-attention as extra
  keys/values, projected by that attention's own k/v weights, never as queries. Portrait: one
  sequence of R·S tokens shared by all frames; audio: one W-token window per frame.
* ``symbiotic`` — the condition's tokens join the video's token sequence and pass through the
  same blocks. Portrait: its R latent frames are patchified like the video and prepended along
  the frame axis, marked by a learned ref-type embedding; audio: each frame's W projected audio
  tokens are appended to that frame's spatial tokens (N = S + W) and dropped at the output.

Paper defaults, and this module's: portrait symbiotic (deep fusion keeps identity), audio direct
(shallow fusion keeps motion diverse).

Positions (``pos_encoding``): ``sincos`` adds fixed sin-cos embeddings of (height, width) and of
the frame index to the tokens; ``rope`` instead rotates q and k by (time, height, width), so
attention sees relative positions only; ``latte`` lays positions out as the public Latte and DiT
weights expect (`pipeline.models.pretrained`): DiT's (width, height) sin-cos table at the input and
the frame index's sin-cos added just before the first temporal block, not at the input. Frame
indices run 0..R-1 over the portrait frames and R..R+F-1 over the video in every scheme (latte:
0..F-1 over the video, as in Latte, and -R..-1 over the portrait). Audio tokens are off the grid: they carry an additive
embedding of their index in the window and, under RoPE, sit at the grid origin of their frame
(as text tokens do in Flux); direct audio cross-attention is not rotated.

Condition dropout (for classifier-free guidance) swaps in learned null embeddings, never masks,
so the hot path has no padding.

Long videos (paper v2/v3; off by default, so older configs and checkpoints are unchanged):

* motion frames (``motion_frames`` = M): the last M latent frames of the previous clip, fused
  exactly like the portrait — they are patchified with it and placed right after its R frames
  (R+M "context frames", marked by their own motion-type embedding), so symbiotic fusion
  prepends them to the sequence and direct/siamese fusion takes them as extra portrait tokens.
  Frame indices run 0..R-1 portrait, R..R+M-1 motion, R+M..R+M+F-1 video.
* memory bank (``memory_frames`` = N): N earlier latent frames, ``memory_stride`` frames apart,
  2× average-pooled in latent space (a quarter of the tokens) and embedded by the same patch
  layer, with a memory-type embedding and a sin-cos embedding of the slot. Every spatial block's
  self-attention takes them as extra keys/values (the siamese path, without a twin branch),
  so the video reads the memory at a quarter of a frame's cost per memory frame and the memory
  never grows with the video.

Either one missing (the first clip, or ``drop_motion`` in training) is replaced by its learned
null, as for guidance; pipeline/models/long_video.py says which frames they are and how they are noised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.attention import Attention, Context, check_backend, rope_rotation
from pipeline.models.long_video import LongVideoContext
from pipeline.models.sizes import get_size

DATA_SIZES = ("latent_channels", "audio_dim", "audio_tokens")  # what the data decides ("auto": DiTConfig.for_data)
FUSIONS = ("direct", "siamese", "symbiotic")
POS_ENCODINGS = ("sincos", "rope", "latte")
INITS = ("dit", "pytorch")


# ------------------------------------------------------------------------------------------------------ configuration
@dataclass
class DiTConfig:
    """Everything needed to build a LetsTalkDiT; stored in checkpoints as a plain dict."""

    size: str = "tiny"  # a key of pipeline.models.sizes.SIZES
    # "auto" (the three data sizes' default): taken from the data by `for_data`; a number that disagrees is refused
    latent_channels: int | str = "auto"  # C of the VAE latents (the shard manifest's VAE)
    patch_size: int | str = 2  # "auto": from the data's VAE (pipeline.vae.recommended_patch_size)
    audio_dim: int | str = "auto"  # D of the audio features (the shard manifest's audio encoder)
    audio_tokens: int | str = "auto"  # W: audio vectors per frame window ((2·data.audio_radius+1)·K)
    ref_frames: int = 1  # R reference portrait frames
    head_dim: int = 64  # heads = hidden / head_dim; 64 or 128 suit FlashAttention
    portrait_fusion: str = "symbiotic"  # direct | siamese | symbiotic
    audio_fusion: str = "direct"  # direct | siamese | symbiotic
    # sincos | rope | latte. rope generalises to clip lengths and latent sizes unseen in training, where sincos
    # degrades (benchmarks/defaults.md); sincos stays the default so checkpoints without this key load unchanged.
    # latte: the positions of the public Latte/DiT weights (see the module docstring), for `init_from`
    # (pipeline/models/pretrained.py).
    pos_encoding: str = "sincos"
    attention_backend: str = "sdpa"  # sdpa | flash_attn | math | linear
    qk_norm: bool = True
    temporal_attention: bool = True  # False: every block is spatial, so frames never exchange information
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each block in place (state-dict keys unchanged)
    # dit: DiT's and Latte's initialisation (LetsTalkDiT.initialize_weights); pytorch: PyTorch's default Linear init,
    # with the same zero starts. On the tiny demo the second learns lip sync sooner (configs/demo.yaml).
    init: str = "dit"
    # Long videos (see the module docstring and pipeline/models/long_video.py); 0 frames = off.
    motion_frames: int = 0  # M: last latent frames of the previous clip
    memory_frames: int = 0  # N: strided earlier latent frames, 2x pooled (latent size / patch_size must be even)
    memory_stride: int = 4  # latent frames between memory frames, for data sampling and generation alike
    motion_dropout: float = 0.1  # P(a training clip gets null motion and memory, as a video's first clip does)
    cond_noise_max: float = 0.3  # training: motion/memory noised to a level ~ U(0, cond_noise_max)
    cond_noise_infer: float = 0.3  # generation: motion/memory noised to this level (configs/long_video.yaml)
    # True: the diffusion generates each frame's latent minus the portrait's (known at generation, added back after
    # sampling), so a zero output is the still portrait and the network only draws what moves (README, fidelity).
    residual: bool = False

    def validate(self) -> None:
        hidden = get_size(self.size).hidden
        if self.head_dim < 2 or self.head_dim % 2 or hidden % self.head_dim:
            raise ValueError(f"model config: size {self.size} (hidden {hidden}) cannot use head_dim {self.head_dim}; "
                             f"set head_dim to an even divisor of {hidden}, e.g. 64 or 128")
        if self.patch_size != "auto" and (not isinstance(self.patch_size, int) or self.patch_size < 1):
            raise ValueError(f"model config: patch_size must be an int >= 1 or 'auto', got {self.patch_size!r}")
        for name in DATA_SIZES:
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"model config: {name} must be an int >= 1 or 'auto' (from the data), got {value!r}")
        if self.ref_frames < 1:
            raise ValueError(f"model config: ref_frames must be >= 1, got {self.ref_frames}")
        for name in ("motion_frames", "memory_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"model config: {name} must be >= 0, got {getattr(self, name)}")
        if self.memory_stride < 1:
            raise ValueError(f"model config: memory_stride must be >= 1, got {self.memory_stride}")
        for name in ("motion_dropout", "cond_noise_max", "cond_noise_infer"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model config: {name} must be in [0, 1], got {getattr(self, name)}")
        for name, options in (("portrait_fusion", FUSIONS), ("audio_fusion", FUSIONS), ("pos_encoding", POS_ENCODINGS),
                              ("init", INITS)):
            if getattr(self, name) not in options:
                raise ValueError(f"model config: {name} must be one of {options}, got {getattr(self, name)!r}")
        check_backend(self.attention_backend)

    def for_data(self, info: dict) -> "DiTConfig":
        """This config with what the data decides filled in from a data description (`LetsTalkDataModule.data_info`):
        latent channels, audio feature size and audio tokens, and an "auto" patch size. A number given for one of
        them that disagrees with the data is refused, all such settings named in one message."""
        from pipeline.vae import recommended_patch_size

        radius, data = int(info["audio_radius"]), {name: int(info[name]) for name in DATA_SIZES}
        source = {  # where the data's value comes from
            "latent_channels": f"the data's VAE ({info['vae'].get('id')}) makes {data['latent_channels']}-channel latents",
            "audio_dim": f"the data's audio encoder ({info['audio_encoder'].get('id')}) makes "
                         f"{data['audio_dim']}-dim features",
            "audio_tokens": f"data.audio_radius={radius} with {data['audio_tokens'] // (2 * radius + 1)} audio vectors "
                            f"a frame gives {data['audio_tokens']}",
        }
        wrong = [f"model.net.{name}={getattr(self, name)}, but {source[name]}"
                 for name in DATA_SIZES if getattr(self, name) not in ("auto", data[name])]
        if wrong:
            raise ValueError(f"{'; '.join(wrong)}: remove the setting (its default, auto, takes it from the data)")
        patch = recommended_patch_size(info["vae"]) if self.patch_size == "auto" else self.patch_size
        return replace(self, patch_size=patch, **data)

    @property
    def heads(self) -> int:
        return get_size(self.size).hidden // self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def long_video(self) -> LongVideoContext:
        """Which earlier frames condition a clip, and how they are noised (pipeline/models/long_video.py)."""
        return LongVideoContext(self.motion_frames, self.memory_frames, self.memory_stride, self.motion_dropout,
                                self.cond_noise_max, self.cond_noise_infer)


# ------------------------------------------------------------------------------------------- positions and embeddings
def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) positions [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Row-major (row, column) coordinates of an h×w grid -> [h·w, 2]."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=-1)


def sincos_cells(cells: torch.Tensor, dim: int, column_first: bool = False) -> torch.Tensor:
    """Sin-cos embedding of (row, column) cells [N, 2] -> [N, dim], half the channels per axis: rows in the
    first half (ours), or columns (DiT's and Latte's table, which pos_encoding "latte" reproduces)."""
    first, second = (cells[:, 1], cells[:, 0]) if column_first else (cells[:, 0], cells[:, 1])
    return torch.cat([sincos(first, dim // 2), sincos(second, dim // 2)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


@dataclass
class Rope:
    """RoPE rotations (cos, sin) of one forward pass, computed once for every block (attention.rope_rotation); all
    None with sincos or latte positions."""

    frame: torch.Tensor | None = None  # [2, N, d/2] a frame's tokens, spatial blocks: patches at (0, i, j), audio at 0
    time: torch.Tensor | None = None  # [2, T, d/2] the sequence's frames in temporal blocks, at (t, 0, 0)
    ref: torch.Tensor | None = None  # [2, R·S, d/2] portrait tokens (direct, siamese), at (r, i, j)
    memory: torch.Tensor | None = None  # [2, N·S/4, d/2] pooled memory tokens, at (0, 2i+½, 2j+½) of the frame grid


class TimestepEmbedder(nn.Module):
    """Diffusion timestep (0..1000, may be fractional) -> [B, D] via sinusoids and an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sincos(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ------------------------------------------------------------------------------------------------------------- blocks
def _fusion_layers(scheme: str | None, dim: int, heads: int, qk_norm: bool,
                   backend: str) -> tuple[nn.Module | None, Attention | None]:
    """A spatial block's layers for one condition: direct -> (norm of the queries, zero-initialised
    cross-attention); siamese -> (norm of the twin's features, None: they join the self-attention)."""
    norm = nn.LayerNorm(dim, eps=1e-6) if scheme in ("direct", "siamese") else None
    attn = Attention(dim, heads, context_dim=dim, qk_norm=qk_norm, backend=backend,
                     zero_out=True) if scheme == "direct" else None
    return norm, attn


class Block(nn.Module):
    """One transformer block attending along one axis of ``[B, T, N, D]`` tokens.

    adaLN-Zero: the timestep embedding regresses shift/scale/gate for both sub-layers, and the
    regression starts at zero, so every block is the identity at initialisation. ``portrait`` and
    ``audio`` say how a spatial block takes in that condition: ``direct`` (cross-attention),
    ``siamese`` (twin features as extra keys/values) or None (temporal blocks, symbiotic fusion).
    ``memory``: a spatial block whose self-attention also takes the memory bank as keys/values.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, axis: str, portrait: str | None,
                 audio: str | None, qk_norm: bool, backend: str, memory: bool = False):
        super().__init__()
        self.axis, self.portrait, self.audio = axis, portrait, audio
        self.memory_norm = nn.LayerNorm(dim, eps=1e-6) if memory else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, backend=backend)
        self.ref_norm, self.ref_attn = _fusion_layers(portrait, dim, heads, qk_norm, backend)
        self.audio_norm, self.audio_attn = _fusion_layers(audio, dim, heads, qk_norm, backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # zero at init: LetsTalkDiT.initialize_weights

    def _attend(self, x: torch.Tensor, ref: torch.Tensor | None, audio: torch.Tensor | None,
                rope: Rope, memory: torch.Tensor | None) -> torch.Tensor:
        b, t, n, d = x.shape
        if self.axis == "temporal":  # each position is a sequence of T tokens
            y = self.attn(x.transpose(1, 2).reshape(b * n, t, d), rope.time)
            return y.view(b, n, t, d).transpose(1, 2)
        context = []  # siamese twin features join as extra keys/values, never as queries
        if self.portrait == "siamese":
            context.append(Context(self.ref_norm(ref), rope.ref))  # [B, R·S, D], shared by the T frames
        if self.audio == "siamese":
            context.append(Context(self.audio_norm(audio)))  # [B·T, W, D], one window per frame
        if self.memory_norm is not None:
            context.append(Context(self.memory_norm(memory), rope.memory))  # [B, N·S/4, D], shared by the T frames
        return self.attn(x.reshape(b * t, n, d), rope.frame, context).view(b, t, n, d)  # each frame is a sequence

    def forward(self, x: torch.Tensor, c: torch.Tensor, ref: torch.Tensor | None, audio: torch.Tensor | None,
                rope: Rope, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, N, D], c [B, D]; ref [B, R·S, D] portrait tokens (direct) or twin features
        (siamese); audio [B·T, W, D] likewise, one window per frame; memory [B, N·S/4, D] memory-bank
        tokens -> [B, T, N, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None, None].chunk(6, dim=-1)
        x = x + gate1 * self._attend(modulate(self.norm1(x), shift1, scale1), ref, audio, rope, memory)
        b, t, n, d = x.shape
        if self.ref_attn is not None:  # every frame's tokens query the portrait's tokens
            x = x + self.ref_attn(self.ref_norm(x).view(b * t, n, d), rope.frame, [Context(ref, rope.ref)]).view_as(x)
        if self.audio_attn is not None:  # each frame queries only its own audio window
            x = x + self.audio_attn(self.audio_norm(x).view(b * t, n, d), None, [Context(audio)]).view_as(x)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TwinBlock(nn.Module):
    """A block of a siamese twin branch over condition tokens [B', M, D]: pre-norm self-attention and
    MLP, without timestep modulation (the condition is clean)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, y: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        y = y + self.attn(self.norm1(y), rope)
        return y + self.mlp(self.norm2(y))


class FinalLayer(nn.Module):
    """adaLN then a projection back to patch pixels; both start at zero (LetsTalkDiT.initialize_weights)."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, None, None].chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


# -------------------------------------------------------------------------------------------------------- the network
class LetsTalkDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        auto = [name for name in ("patch_size", *DATA_SIZES) if getattr(config, name) == "auto"]
        if auto:
            raise ValueError(f"model config: {', '.join(auto)} 'auto' is resolved from the data (DiTConfig.for_data, "
                             "as LetsTalkModule does when training); to build LetsTalkDiT directly give ints")
        self.config = config
        size = get_size(config.size)
        dim, p, c, heads = size.hidden, config.patch_size, config.latent_channels, config.heads
        self.hidden = dim
        self.patch = nn.Linear(c * p * p, dim)
        self.ref_type = nn.Parameter(torch.zeros(dim))  # marks reference tokens apart from video tokens
        self.null_ref = nn.Parameter(torch.zeros(c * p * p))  # the "no portrait" patch, for guidance
        if config.motion_frames:  # created only when used, so older checkpoints keep their exact keys
            self.motion_type = nn.Parameter(torch.zeros(dim))
            self.null_motion = nn.Parameter(torch.zeros(c * p * p))  # "no previous clip"
        if config.memory_frames:
            self.memory_type = nn.Parameter(torch.zeros(dim))
            self.null_memory = nn.Parameter(torch.zeros(c * p * p))  # "no earlier clips"
        self.time = TimestepEmbedder(dim)
        self.audio_in = nn.Sequential(nn.Linear(config.audio_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.null_audio = nn.Parameter(torch.zeros(config.audio_tokens, config.audio_dim))
        spatial = [i for i in range(size.depth) if self._axis(i) == "spatial"]

        def joins(scheme: str, i: int) -> str | None:  # conditions fused by layers join in spatial blocks
            return scheme if scheme != "symbiotic" and i in spatial else None

        self.blocks = nn.ModuleList(
            Block(dim, heads, size.mlp_ratio, self._axis(i), joins(config.portrait_fusion, i),
                  joins(config.audio_fusion, i), config.qk_norm, config.attention_backend,
                  memory=bool(config.memory_frames) and i in spatial)
            for i in range(size.depth)
        )
        self.final = FinalLayer(dim, c * p * p)

        def twin(scheme: str) -> nn.ModuleDict:  # twin block i feeds main block i
            if scheme != "siamese":
                return nn.ModuleDict()
            return nn.ModuleDict({str(i): TwinBlock(dim, heads, size.mlp_ratio, config.qk_norm,
                                                    config.attention_backend) for i in spatial})

        self.ref_twin, self.audio_twin = twin(config.portrait_fusion), twin(config.audio_fusion)
        self.initialize_weights()
        if config.compile:
            for module in (*self.blocks, *self.ref_twin.values(), *self.audio_twin.values()):
                module.compile()

    def initialize_weights(self) -> None:
        """DiT's initialisation (facebookresearch/DiT, `initialize_weights`), which Latte keeps: xavier-uniform on
        every Linear, the patch embedding included, with zero biases; N(0, 0.02) on the timestep MLP (`init: pytorch`
        keeps PyTorch's default Linear init instead). Then the zero starts (adaLN-Zero): every block's adaLN
        regression, the final layer and each new branch's output (`Attention.zero_out`) begin at zero, so every
        block is the identity and the network outputs exactly 0. Gradients still reach every weight: the zeroed
        regressions get them first and open the gates."""
        if self.config.init == "dit":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
            nn.init.normal_(self.time.mlp[0].weight, std=0.02)
            nn.init.normal_(self.time.mlp[2].weight, std=0.02)
        zeroed = [block.ada[1] for block in self.blocks] + [self.final.ada[1], self.final.proj]
        zeroed += [m.out for m in self.modules() if isinstance(m, Attention) and m.zero_out]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_weights(cls, config: DiTConfig, state: dict[str, torch.Tensor],
                     device: torch.device | str = "cpu") -> LetsTalkDiT:
        """An eval-mode network holding `state`, for sampling: built on the meta device, so nothing is initialised only
        to be overwritten (seconds for XL), and never compiled (compile is a training switch; a compiled block would
        recompile for every network built). A state that does not fit the config raises ValueError naming the keys."""
        with torch.device("meta"):
            net = cls(replace(config, compile=False))
        net.to_empty(device=device)
        missing, unexpected = net.load_state_dict(state, strict=False)  # copies: the network owns its weights
        if missing or unexpected:
            raise ValueError(f"weights do not match the model config (missing {missing[:3]}..., "
                             f"unexpected {unexpected[:3]}...)")
        return net.eval().requires_grad_(False)

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

    def _rope(self, frames: torch.Tensor, r: int, gh: int, gw: int) -> Rope:
        """RoPE rotations for a sequence of `frames` (indices [T]) of gh×gw patches, R portrait (and motion)
        frames and the pooled memory frames."""
        cfg = self.config
        if cfg.pos_encoding != "rope":
            return Rope()
        cells = grid(gh, gw, frames.device)  # [S, 2]
        frame = F.pad(cells, (1, 0))  # [S, 3] at (0, i, j)
        if cfg.audio_fusion == "symbiotic":
            frame = torch.cat([frame, frame.new_zeros(cfg.audio_tokens, 3)])  # [S+W, 3]
        time = F.pad(frames[:, None], (0, 2))  # [T, 3] at (t, 0, 0)
        ref = torch.cat([torch.arange(r, device=frames.device).repeat_interleave(gh * gw)[:, None],
                         cells.repeat(r, 1)], dim=1)  # [R·S, 3] at (r, i, j)
        memory = None
        if cfg.memory_frames:  # pooled cell (i, j) covers frame cells 2i..2i+1, 2j..2j+1
            memory = F.pad(grid(gh // 2, gw // 2, frames.device) * 2 + 0.5, (1, 0)).repeat(cfg.memory_frames, 1)
        return Rope(*(rope_rotation(coords, cfg.head_dim) for coords in (frame, time, ref)),
                    None if memory is None else rope_rotation(memory, cfg.head_dim))

    def _run(self, module: nn.Module, *args) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training:
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _context_patches(self, frames: torch.Tensor | None, count: int, null: torch.Tensor,
                         drop: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:
        """Motion or memory latents [B, K, C, h', w'] (None: absent) -> patches [B, K, S', Cp²], with the
        learned null patch where absent or dropped (drop [B] bool)."""
        b, _, c, h, w = like.shape
        if frames is None:
            s = (h // self.config.patch_size) * (w // self.config.patch_size)
            return null.to(like.dtype).expand(b, count, s, -1)
        if frames.shape[0] != b or frames.shape[1] != count or frames.shape[2] != c:
            raise ValueError(f"{name} must be [B={b}, {count}, C={c}, h, w] latents, got {list(frames.shape)}")
        patches = self.patchify(frames)
        if drop is not None:
            patches = torch.where(drop[:, None, None, None], null.to(patches.dtype), patches)
        return patches

    def _memory_tokens(self, memory: torch.Tensor | None, drop: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Memory latents [B, N, C, h, w] -> 2×-pooled memory tokens [B, N·S/4, D] (see the module docstring)."""
        cfg, (b, _, c, h, w) = self.config, x.shape
        n, p = cfg.memory_frames, cfg.patch_size
        if h % (2 * p) or w % (2 * p):
            raise ValueError(f"memory_frames needs latent size {h}x{w} divisible by 2·patch_size = {2 * p}")
        if memory is not None:
            if memory.shape[0] != b or memory.shape[1:] != (n, c, h, w):
                raise ValueError(f"memory must be [B={b}, {n}, {c}, {h}, {w}] latents, got {list(memory.shape)}")
            memory = F.avg_pool2d(memory.flatten(0, 1), 2).unflatten(0, (b, n))  # [B, N, C, h/2, w/2]
        like = x[:, :1, :, : h // 2, : w // 2]
        tokens = self.patch(self._context_patches(memory, n, self.null_memory, drop, like, "memory"))  # [B, N, S/4, D]
        embed = self.memory_type + sincos(torch.arange(n, device=x.device), self.hidden)[:, None]  # [N, 1, D]
        if cfg.pos_encoding != "rope":  # pooled cell (i, j) sits at (2i+½, 2j+½) of the frame grid
            cells = grid(h // (2 * p), w // (2 * p), x.device) * 2 + 0.5
            embed = embed + sincos_cells(cells, self.hidden, column_first=cfg.pos_encoding == "latte")
        return (tokens + embed.to(tokens.dtype)).flatten(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ref: torch.Tensor, audio: torch.Tensor,
                drop_ref: torch.Tensor | None = None, drop_audio: torch.Tensor | None = None,
                motion: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                drop_motion: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the diffusion target for a clip.

        x [B, F, C, h, w] noisy latents; t [B] timesteps; ref [B, R, C, h, w] clean portrait
        latents; audio [B, F, W, Da]; drop_ref / drop_audio [B] bool: replace that condition
        by its null embedding (classifier-free guidance). With long-video options: motion
        [B, M, C, h, w] the previous clip's last latent frames, memory [B, N, C, h, w] earlier
        frames (None: absent, the learned nulls); drop_motion [B] bool nulls both, per sample
        (motion dropout: "this is a first clip"). Returns [B, F, C, h, w].
        """
        cfg, p = self.config, self.config.patch_size
        dtype = self.null_ref.dtype  # the weights' (bf16 when DeepSpeed has cast them, no autocast then)
        x, ref, audio = x.to(dtype), ref.to(dtype), audio.to(dtype)
        motion, memory = (v if v is None else v.to(dtype) for v in (motion, memory))
        if (motion is not None and not cfg.motion_frames) or (memory is not None and not cfg.memory_frames):
            raise ValueError("motion/memory given to a model built with motion_frames=0/memory_frames=0")
        f, h, w = x.shape[1], x.shape[3], x.shape[4]
        r = ref.shape[1] + cfg.motion_frames  # context frames: the portrait's R, then the motion frames
        tokens, ref_tokens, index, frames_embed = self._embed_frames(x, ref, motion, drop_ref, drop_motion)
        # tokens [B, T, S, D]: T = R+M+F with symbiotic portrait fusion, else F and ref_tokens [B, (R+M)·S, D]
        tokens, audio = self._embed_audio(audio, drop_audio, tokens, index, r)
        # symbiotic audio fusion: tokens [B, T, S+W, D] and no audio; else audio [B·T, W, D]
        rope = self._rope(index, r, h // p, w // p)
        memory_tokens = self._memory_tokens(memory, drop_motion, x) if cfg.memory_frames else None  # [B, N·S/4, D]
        c = self.time(t)  # [B, D]
        tokens = self._run_blocks(tokens, c, ref_tokens, audio, rope, memory_tokens, frames_embed)  # shape kept
        out = self.final(tokens[:, -f:, :(h // p) * (w // p)], c)  # [B, F, S, Cp²]: video tokens only
        return self.unpatchify(out, h, w)  # [B, F, C, h, w]

    def _embed_frames(self, x: torch.Tensor, ref: torch.Tensor, motion: torch.Tensor | None,
                      drop_ref: torch.Tensor | None, drop_motion: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Portrait, motion and video latents -> patch tokens with their type and position embeddings.

        Returns (tokens [B, T, S, D], portrait and motion tokens [B, (R+M)·S, D] or None when symbiotic fusion keeps
        them in the sequence, frame index [T], Latte's frame embedding [1, T, 1, D] or None)."""
        cfg, m = self.config, self.config.motion_frames
        f, h, w = x.shape[1], x.shape[3], x.shape[4]
        video = self.patchify(x)  # [B, F, S, Cp²]
        ref_patches = self.patchify(ref)  # [B, R, S, Cp²]
        if drop_ref is not None:
            ref_patches = torch.where(drop_ref[:, None, None, None], self.null_ref.to(ref_patches.dtype), ref_patches)
        frames = [ref_patches]
        if m:  # motion frames follow the portrait: R+M context frames, fused by the portrait's scheme
            frames.append(self._context_patches(motion, m, self.null_motion, drop_motion, x, "motion"))
        tokens = self.patch(torch.cat([*frames, video], dim=1))  # [B, R+M+F, S, D]
        p = cfg.patch_size
        types = [self.ref_type.expand(ref.shape[1], -1)] + ([self.motion_type.expand(m, -1)] if m else [])
        r = ref.shape[1] + m  # context frames from here on
        latte = cfg.pos_encoding == "latte"
        # frame indices: context 0..R+M-1, video R+M..R+M+F-1 (latte: video 0..F-1 as in Latte, context before)
        index = torch.arange(r + f, device=x.device) - (r if latte else 0)
        embed = torch.cat([*types, torch.zeros_like(self.ref_type).expand(f, -1)])[None, :, None]  # [1, R+M+F, 1, D]
        if cfg.pos_encoding != "rope":  # + (height, width) [1, 1, S, D]
            embed = embed + sincos_cells(grid(h // p, w // p, x.device), self.hidden, column_first=latte)[None, None]
        if cfg.pos_encoding == "sincos":  # + frame index [1, R+M+F, 1, D]
            embed = embed + sincos(index, self.hidden)[None, :, None]
        tokens = tokens + embed.to(tokens.dtype)
        # latte: the frame index [1, R+M+F, 1, D] joins before the first temporal block, as in Latte
        frames_embed = sincos(index, self.hidden)[None, :, None].to(tokens.dtype) if latte else None
        if cfg.portrait_fusion == "symbiotic":
            return tokens, None, index, frames_embed
        ref_tokens, tokens, index = tokens[:, :r], tokens[:, r:], index[r:]  # the context leaves the sequence
        if latte:  # context tokens never reach a temporal block: their frame index joins here
            ref_tokens, frames_embed = ref_tokens + frames_embed[:, :r], frames_embed[:, r:]
        return tokens, ref_tokens.flatten(1, 2), index, frames_embed  # [B, F, S, D], [B, (R+M)·S, D]

    def _embed_audio(self, audio: torch.Tensor, drop_audio: torch.Tensor | None, tokens: torch.Tensor,
                     index: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Audio windows [B, F, W, Da] -> window tokens with their positions: (tokens, audio [B·T, W, D]), or with
        symbiotic audio fusion (tokens [B, T, S+W, D], None): each frame's window joins its frame's tokens."""
        cfg = self.config
        if drop_audio is not None:
            audio = torch.where(drop_audio[:, None, None, None], self.null_audio.to(audio.dtype), audio)
        if cfg.portrait_fusion == "symbiotic":  # portrait and motion frames hear nothing
            null = self.null_audio.expand(audio.shape[0], r, -1, -1).to(audio.dtype)
            audio = torch.cat([null, audio], dim=1)  # [B, T, W, Da]
        wpos = sincos(torch.arange(audio.shape[2], device=audio.device), self.hidden)
        audio = self.audio_in(audio) + wpos.to(audio.dtype)  # [B, T, W, D]
        if cfg.audio_fusion == "symbiotic":
            if cfg.pos_encoding == "sincos":
                audio = audio + sincos(index, self.hidden)[None, :, None].to(audio.dtype)
            return torch.cat([tokens, audio], dim=2), None  # [B, T, S+W, D]
        return tokens, audio.flatten(0, 1)  # [B·T, W, D]: one window per frame

    def _run_blocks(self, tokens: torch.Tensor, c: torch.Tensor, ref_tokens: torch.Tensor | None,
                    audio: torch.Tensor | None, rope: Rope, memory_tokens: torch.Tensor | None,
                    frames_embed: torch.Tensor | None) -> torch.Tensor:
        """The spatial and temporal blocks in order, each siamese twin branch run just before its block."""
        for i, block in enumerate(self.blocks):
            if frames_embed is not None and block.axis == "temporal":
                tokens, frames_embed = tokens + frames_embed, None
            if str(i) in self.ref_twin:
                ref_tokens = self._run(self.ref_twin[str(i)], ref_tokens, rope.ref)
            if str(i) in self.audio_twin:
                audio = self._run(self.audio_twin[str(i)], audio)
            tokens = self._run(block, tokens, c, ref_tokens, audio, rope, memory_tokens)
        return tokens

    def flops_per_clip(self, frames: int, h: int, w: int) -> int:
        """Forward FLOPs (2 per multiply-add) of one clip of `frames` latent frames of h×w: every matmul
        (projections and attention), as torch.utils.flop_counter counts them; for throughput and MFU."""
        cfg, size = self.config, get_size(self.config.size)
        d, hd, mlp = self.hidden, cfg.head_dim, int(self.hidden * size.mlp_ratio)
        s, wa = (h // cfg.patch_size) * (w // cfg.patch_size), cfg.audio_tokens
        r = cfg.ref_frames + cfg.motion_frames  # context frames: portrait and motion
        mem = cfg.memory_frames * s // 4  # pooled memory tokens
        t = frames + r if cfg.portrait_fusion == "symbiotic" else frames  # frames in the sequence
        n = s + wa if cfg.audio_fusion == "symbiotic" else s  # tokens per frame
        cp2 = cfg.latent_channels * cfg.patch_size ** 2

        def linear(tokens: int, fan_in: int, fan_out: int) -> int:
            return 2 * tokens * fan_in * fan_out

        def core(seqs: int, queries: int, keys: int) -> int:  # q·kᵀ and weights·v, or linear attention's products
            if cfg.attention_backend == "linear":
                return 2 * seqs * d * (hd + 1) * (queries + keys)
            return 4 * seqs * queries * keys * d

        def twin(seqs: int, length: int) -> int:
            m = seqs * length
            return linear(m, d, 4 * d) + core(seqs, length, length) + 2 * linear(m, d, mlp)

        total = linear((r + frames) * s + mem, cp2, d) + linear(frames * s, d, cp2)  # patch embedding, final projection
        total += linear(1, 256, d) + linear(1, d, d) + linear(1, d, 2 * d)  # timestep MLP, final adaLN
        total += linear(t * wa, cfg.audio_dim, d) + linear(t * wa, d, d)  # audio MLP
        for block in self.blocks:
            total += linear(1, d, 6 * d) + linear(t * n, d, 4 * d) + 2 * linear(t * n, d, mlp)  # adaLN, qkv+out, MLP
            if block.axis == "temporal":
                total += core(n, t, t)
                continue
            keys = n
            if block.memory_norm is not None:
                keys += mem
                total += linear(mem, d, 2 * d)
            if block.portrait == "siamese":
                keys += r * s
                total += twin(1, r * s) + linear(r * s, d, 2 * d)
            if block.audio == "siamese":
                keys += wa
                total += twin(t, wa) + linear(t * wa, d, 2 * d)
            total += core(t, n, keys)
            if block.portrait == "direct":
                total += linear(t * n, d, 2 * d) + linear(r * s, d, 2 * d) + core(t, n, r * s)
            if block.audio == "direct":
                total += linear(t * n, d, 2 * d) + linear(t * wa, d, 2 * d) + core(t, n, wa)
        return int(total)
