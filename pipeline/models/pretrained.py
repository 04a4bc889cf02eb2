"""Start from public weights: a Latte (video DiT) or DiT (image DiT) checkpoint mapped onto LetsTalkDiT.

Both layouts are read from the public model code (Vchitect/Latte ``models/latte.py``, facebookresearch/DiT
``models.py``); Latte is DiT with every other block attending over time. Every conversion between their
layout and ours happens here, once:

* ``x_embedder.proj`` (a Conv2d [D, C, p, p]) -> ``patch`` (a Linear on (c, i, j)-ordered patches: a reshape);
* ``t_embedder.mlp``: their sinusoids are [cos, sin], ours [sin, cos], so the first Linear's input columns swap;
* ``y_embedder`` (class-conditional sources): one label's row (default: the null label, the unconditional
  prediction) is a constant added to the timestep embedding, so it folds into ``time.mlp.2.bias``;
* ``blocks.i``: ``attn.qkv`` is fused as ours (nothing to split), ``attn.proj`` -> ``attn.out``,
  ``mlp.fc1/fc2`` -> ``mlp.0/2``, ``adaLN_modulation.1`` -> ``ada.1`` (same shift/scale/gate order);
* ``final_layer``: its rows are (i, j, c) ordered and, with learn_sigma, hold 2C channels (ε then the
  variance); ours are (c, i, j) and predict ε only, so the first C channels are kept and reordered;
* ``pos_embed`` / ``temp_embed`` are fixed sin-cos tables in both releases: they are checked against what
  ``pos_encoding: latte`` computes, and then need no copy and no interpolation, since a sin-cos table is
  defined at every frame count and latent size.

Everything of ours without a counterpart (audio and portrait fusion, motion, memory) keeps its zero start,
so with direct fusion and null conditions the network at step 0 predicts what the source model predicts
(tests/test_pretrained.py checks this against a reference forward). Symbiotic or siamese fusion and the
memory bank put extra tokens into attention, which no zero gate can hide: those start close to, not equal
to, the source, and the report says so. Weights are read with ``torch.load(weights_only=True)`` or
safetensors, never unpickled.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.models.dit import LetsTalkDiT, grid, sincos, sincos_cells
from pipeline.models.sizes import SIZES

KINDS = ("latte", "dit")
PUBLISHED_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # hidden -> heads of the released S, B, L, XL models
TABLE_TOLERANCE = 1e-4  # the releases store their sin-cos tables in float32
BLOCK_RENAMES = {"attn.qkv": "attn.qkv", "attn.proj": "attn.out", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
                 "adaLN_modulation.1": "ada.1"}


@dataclass
class InitFrom:
    """`model.init_from`: the checkpoint to start from and its layout."""

    path: str
    kind: str = "latte"  # latte (Vchitect/Latte) | dit (facebookresearch/DiT)
    label: int | None = None  # class-conditional sources: the label whose embedding is folded in; None: the null label

    def validate(self) -> None:
        """Checks the kind; the file is looked for when it is read (a finished run's config names it, and
        loading that run's checkpoint elsewhere must not need it)."""
        if self.kind not in KINDS:
            raise ValueError(f"model.init_from.kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Report:
    """What a conversion did, tensor by tensor (names of our network, or of the source for `unused`)."""

    loaded: list[str] = field(default_factory=list)  # copied as they are
    reshaped: list[str] = field(default_factory=list)  # copied through a layout conversion
    derived: list[str] = field(default_factory=list)  # source tables checked against what we compute
    new: list[str] = field(default_factory=list)  # ours, no counterpart: keep their (zero-gated) start
    unused: list[str] = field(default_factory=list)  # theirs, no counterpart
    exact: str = ""  # whether step 0 reproduces the source model, and if not why

    def table(self) -> str:
        lines = [f"{'':9}{'tensors':>8}  names (blocks.* = every block)"]
        for name in ("loaded", "reshaped", "derived", "new", "unused"):
            names = getattr(self, name)
            lines.append(f"{name:9}{len(names):>8}  {', '.join(_grouped(names)) or '-'}")
        return "\n".join(lines + [f"step 0: {self.exact}"])


def _grouped(names: list[str]) -> list[str]:
    groups: dict[str, int] = defaultdict(int)
    for name in names:
        groups[re.sub(r"^(blocks|ref_twin|audio_twin)\.\d+\.", r"\1.*.", name)] += 1
    return [f"{key} ×{count}" if count > 1 else key for key, count in groups.items()]


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a released checkpoint: a .safetensors file, or a torch file holding the state dict itself
    or under "ema" (preferred, as Latte's and DiT's samplers do) or "model"; read without unpickling."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read it as weights without unpickling ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}). A training checkpoint that also pickles its arguments "
                         f"must be reduced to its tensors once, where you trust it: "
                         f"torch.save({{'ema': ckpt['ema']}}, 'weights.pt')") from None
    for key in ("ema", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()} if isinstance(state, dict) else state
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise ValueError(f"{path}: not a Latte/DiT state dict (no x_embedder.proj.weight)")
    return state


def _size_name(hidden: int, depth: int) -> str:
    names = [name for name, size in SIZES.items() if (size.hidden, size.depth) == (hidden, depth)]
    if names:
        return f"set model.net.size: {names[0]}"
    return f"no size in pipeline/models/sizes.py has hidden {hidden} and depth {depth}: add one there"


def _check_fits(state: dict[str, torch.Tensor], kind: str, net: LetsTalkDiT, path: str) -> tuple[int, int]:
    """Refuse, naming the setting that fits, a source whose sizes or positions differ from `net`'s.
    Returns (patch size, source output channels)."""
    cfg = net.config
    hidden, channels, p, _ = state["x_embedder.proj.weight"].shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    problems = []
    if (hidden, depth) != (net.hidden, len(net.blocks)):
        problems.append(f"hidden {hidden} and depth {depth}, ours {net.hidden} and {len(net.blocks)}: "
                        + _size_name(hidden, depth))
    if p != cfg.patch_size:
        problems.append(f"patch {p}, ours {cfg.patch_size}: set model.net.patch_size: {p}")
    if channels != cfg.latent_channels:
        problems.append(f"{channels} latent channels, ours {cfg.latent_channels}: train on latents of a VAE with "
                        f"{channels} channels (SD's VAE, as the releases use, has 4)")
    heads = PUBLISHED_HEADS.get(hidden)
    if heads and cfg.heads != heads:
        problems.append(f"{heads} heads (head_dim {hidden // heads}), ours {cfg.heads}: "
                        f"set model.net.head_dim: {hidden // heads}")
    if cfg.qk_norm:
        problems.append("no QK-norm, ours has it: set model.net.qk_norm: false")
    if cfg.pos_encoding != "latte":
        problems.append(f"Latte's positions, ours are {cfg.pos_encoding!r}: set model.net.pos_encoding: latte")
    if kind == "latte" and not cfg.temporal_attention:
        problems.append("temporal attention in its odd blocks, ours has none: set model.net.temporal_attention: true")
    if kind == "dit" and "temp_embed" in state:
        problems.append("a temp_embed, so it is a Latte checkpoint: set model.init_from.kind: latte")
    if problems:
        raise ValueError(f"{path} does not fit this network; the checkpoint has " + "; ".join(problems))
    return p, state["final_layer.linear.weight"].shape[0] // (p * p)


def latte_tables(hidden: int, side: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The releases' fixed position tables: pos_embed [side², hidden] (DiT's column-first 2D sin-cos) and
    temp_embed [frames, hidden] (sin-cos of the frame index)."""
    cells = grid(side, side, torch.device("cpu"))
    return sincos_cells(cells, hidden, column_first=True), sincos(torch.arange(frames), hidden)


def _check_table(state: dict[str, torch.Tensor], key: str, expected: torch.Tensor, path: str) -> None:
    table = state[key].float().reshape(expected.shape)
    if not torch.allclose(table, expected, atol=TABLE_TOLERANCE):
        raise ValueError(f"{path}: {key} is not the fixed sin-cos table of the Latte/DiT releases (largest difference "
                         f"{(table - expected).abs().max():.2g}); learned position tables are not supported")


def convert(state: dict[str, torch.Tensor], kind: str, net: LetsTalkDiT, label: int | None = None,
            path: str = "checkpoint") -> tuple[dict[str, torch.Tensor], Report]:
    """Map a Latte/DiT state dict onto `net`'s keys. Returns (our state dict, covering the mapped tensors only;
    the report)."""
    p, c_out = _check_fits(state, kind, net, path)
    cfg, report, out = net.config, Report(), {}
    used = set()

    def take(theirs: str, ours: str, tensor: torch.Tensor | None = None) -> None:
        used.add(theirs)
        out[ours] = (state[theirs] if tensor is None else tensor).float()
        (report.loaded if tensor is None else report.reshaped).append(ours)

    weight = state["x_embedder.proj.weight"]
    take("x_embedder.proj.weight", "patch.weight", weight.reshape(weight.shape[0], -1))  # [D, C, p, p] -> [D, C·p·p]
    take("x_embedder.proj.bias", "patch.bias")
    first = state["t_embedder.mlp.0.weight"]
    # their sinusoids [cos, sin] -> ours [sin, cos]: swap the halves of the input columns
    take("t_embedder.mlp.0.weight", "time.mlp.0.weight", first.roll(first.shape[1] // 2, dims=1))
    take("t_embedder.mlp.0.bias", "time.mlp.0.bias")
    take("t_embedder.mlp.2.weight", "time.mlp.2.weight")
    if "y_embedder.embedding_table.weight" in state:
        table = state["y_embedder.embedding_table.weight"]
        row = table.shape[0] - 1 if label is None else label
        if not 0 <= row < table.shape[0]:
            raise ValueError(f"model.init_from.label {label} is out of range: {path} has {table.shape[0]} label rows")
        used.add("y_embedder.embedding_table.weight")
        take("t_embedder.mlp.2.bias", "time.mlp.2.bias", state["t_embedder.mlp.2.bias"] + table[row])
    else:
        take("t_embedder.mlp.2.bias", "time.mlp.2.bias")
    for i in range(len(net.blocks)):
        for theirs, ours in BLOCK_RENAMES.items():
            for param in ("weight", "bias"):
                take(f"blocks.{i}.{theirs}.{param}", f"blocks.{i}.{ours}.{param}")
    take("final_layer.adaLN_modulation.1.weight", "final.ada.1.weight")
    take("final_layer.adaLN_modulation.1.bias", "final.ada.1.bias")
    c = cfg.latent_channels
    ch, i, j = torch.meshgrid(torch.arange(c), torch.arange(p), torch.arange(p), indexing="ij")
    rows = ((i * p + j) * c_out + ch).flatten()  # our (c, i, j) order -> their (i, j, c) rows, ε channels only
    for param in ("weight", "bias"):
        take(f"final_layer.linear.{param}", f"final.proj.{param}", state[f"final_layer.linear.{param}"][rows])

    side = int(round(state["pos_embed"].shape[-2] ** 0.5))
    frames = state["temp_embed"].shape[-2] if "temp_embed" in state else 0
    pos_table, temp_table = latte_tables(net.hidden, side, frames)
    _check_table(state, "pos_embed", pos_table, path)
    used.add("pos_embed")
    report.derived.append("pos_embed")
    if "temp_embed" in state:
        _check_table(state, "temp_embed", temp_table, path)
        used.add("temp_embed")
        report.derived.append("temp_embed")
    report.unused = sorted(set(state) - used)
    report.new = [name for name in net.state_dict() if name not in out]
    report.exact = _step_zero(net)
    return out, report


def _step_zero(net: LetsTalkDiT) -> str:
    cfg, reasons = net.config, []
    if cfg.portrait_fusion != "direct":  # (direct fusion takes motion frames as portrait tokens: gated too)
        reasons.append(f"portrait fusion {cfg.portrait_fusion!r} adds its tokens to attention")
    if cfg.audio_fusion != "direct":
        reasons.append(f"audio fusion {cfg.audio_fusion!r} adds its tokens to attention")
    if cfg.memory_frames:
        reasons.append("the memory bank adds its tokens to attention")
    if not reasons:
        return "with null audio and portrait this network predicts what the source predicts"
    return "close to the source, not equal: " + "; ".join(reasons) + " (direct fusion would be exact)"


def load_pretrained(net: LetsTalkDiT, spec: InitFrom) -> Report:
    """Initialise `net` in place from `spec` (see the module docstring); returns the report."""
    spec.validate()
    if not Path(spec.path).is_file():
        raise ValueError(f"model.init_from.path: no file at {spec.path}")
    mapped, report = convert(read_state(spec.path), spec.kind, net, spec.label, spec.path)
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    assert not unexpected and sorted(missing) == sorted(report.new), (missing, unexpected)
    return report


def to_latte(net: LetsTalkDiT, frames: int, side: int) -> dict[str, torch.Tensor]:
    """`net`'s shared weights in Latte's layout (learn_sigma off), with sin-cos tables for `frames` frames of
    side×side patches: the inverse of `convert` for a network whose conditions are unused, e.g. to hand an
    unconditional model of ours to code that reads Latte checkpoints."""
    ours = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
    cfg, p, c = net.config, net.config.patch_size, net.config.latent_channels
    state = {"x_embedder.proj.weight": ours["patch.weight"].reshape(net.hidden, c, p, p),
             "x_embedder.proj.bias": ours["patch.bias"],
             "t_embedder.mlp.0.weight": ours["time.mlp.0.weight"].roll(-ours["time.mlp.0.weight"].shape[1] // 2, 1)}
    for key in ("mlp.0.bias", "mlp.2.weight", "mlp.2.bias"):
        state[f"t_embedder.{key}"] = ours[f"time.{key}"]
    for i in range(len(net.blocks)):
        for theirs, name in BLOCK_RENAMES.items():
            for param in ("weight", "bias"):
                state[f"blocks.{i}.{theirs}.{param}"] = ours[f"blocks.{i}.{name}.{param}"]
    state["final_layer.adaLN_modulation.1.weight"] = ours["final.ada.1.weight"]
    state["final_layer.adaLN_modulation.1.bias"] = ours["final.ada.1.bias"]
    proj = ours["final.proj.weight"].reshape(c, p, p, -1)  # our (c, i, j) rows -> their (i, j, c) rows
    state["final_layer.linear.weight"] = proj.permute(1, 2, 0, 3).flatten(0, 2)
    state["final_layer.linear.bias"] = ours["final.proj.bias"].reshape(c, p, p).permute(1, 2, 0).flatten()
    pos_table, temp_table = latte_tables(net.hidden, side, frames)
    state["pos_embed"] = pos_table[None]
    if cfg.temporal_attention:
        state["temp_embed"] = temp_table[None]
    return state
