"""Starting from public weights (pipeline/models/pretrained.py), tested without the real files.

A random network in the published layouts (key names and shapes from Vchitect/Latte models/latte.py and
facebookresearch/DiT models.py) runs through a reference forward written here from that code, independent
of ours; it is saved as the releases are ({"ema": state_dict}) and loaded through `init_from`.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_training import _data, _trainer, fit_args, write_shards

from lightning_modules.letstalk import LetsTalkModule
from pipeline.cli import main
from pipeline.models import pretrained
from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.models.pretrained import InitFrom, convert, load_pretrained, read_state, to_latte
from pipeline.shipped import CONFIGS

HIDDEN, DEPTH, HEADS, C, P = 128, 4, 4, 4, 2  # size "tiny" at head_dim 32
B, FRAMES, SIDE, CLASSES = 2, 4, 8, 5  # SIDE: latent height and width
WA, DA = 6, 16


# -- the published layout and its forward, from the public code ----------------------------------------------------
def sincos_table(positions: np.ndarray, dim: int) -> np.ndarray:
    """get_1d_sincos_pos_embed_from_grid of DiT/Latte: [sin | cos] of pos·10000^(-i/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_table_2d(dim: int, side: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of DiT/Latte: meshgrid(w, h), the first half of the channels from grid[0]."""
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)), axis=0)
    return np.concatenate([sincos_table(grid[0], dim // 2), sincos_table(grid[1], dim // 2)], axis=1)


def published_state(kind: str, classes: int | None = None, learn_sigma: bool = True, seed: int = 0) -> dict:
    """A random Latte (or DiT) state dict; every tensor non-zero, so no path is silent."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    c_out = 2 * C if learn_sigma else C
    state = {"x_embedder.proj.weight": rnd(HIDDEN, C, P, P, std=0.2), "x_embedder.proj.bias": rnd(HIDDEN),
             "t_embedder.mlp.0.weight": rnd(HIDDEN, 256, std=0.1), "t_embedder.mlp.0.bias": rnd(HIDDEN),
             "t_embedder.mlp.2.weight": rnd(HIDDEN, HIDDEN, std=0.1), "t_embedder.mlp.2.bias": rnd(HIDDEN),
             "pos_embed": torch.from_numpy(pos_table_2d(HIDDEN, SIDE // P)).float()[None],
             "final_layer.linear.weight": rnd(P * P * c_out, HIDDEN, std=0.1),
             "final_layer.linear.bias": rnd(P * P * c_out),
             "final_layer.adaLN_modulation.1.weight": rnd(2 * HIDDEN, HIDDEN),
             "final_layer.adaLN_modulation.1.bias": rnd(2 * HIDDEN)}
    if kind == "latte":
        state["temp_embed"] = torch.from_numpy(sincos_table(np.arange(FRAMES), HIDDEN)).float()[None]
    if classes is not None:
        state["y_embedder.embedding_table.weight"] = rnd(classes + 1, HIDDEN, std=0.3)  # + the null label
    for i in range(DEPTH):
        for name, shape in (("attn.qkv", (3 * HIDDEN, HIDDEN)), ("attn.proj", (HIDDEN, HIDDEN)),
                            ("mlp.fc1", (4 * HIDDEN, HIDDEN)), ("mlp.fc2", (HIDDEN, 4 * HIDDEN)),
                            ("adaLN_modulation.1", (6 * HIDDEN, HIDDEN))):
            state[f"blocks.{i}.{name}.weight"] = rnd(*shape, std=1 / math.sqrt(shape[1]))
            state[f"blocks.{i}.{name}.bias"] = rnd(shape[0])
    return state


def reference_forward(s: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                      temporal: bool) -> torch.Tensor:
    """Latte.forward (temporal) or DiT.forward (not) on x [B, F, C, H, W] -> ε [B, F, C, H, W]."""
    b, f, c, h, w = x.shape
    x = F.conv2d(x.reshape(b * f, c, h, w), s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=P)
    x = x.flatten(2).transpose(1, 2) + s["pos_embed"]  # [(b f), n, D]
    n = x.shape[1]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(emb, s["t_embedder.mlp.0.weight"], s["t_embedder.mlp.0.bias"])),
                   s["t_embedder.mlp.2.weight"], s["t_embedder.mlp.2.bias"])
    if y is not None:
        emb = emb + s["y_embedder.embedding_table.weight"][y]
    c_spatial, c_temporal = emb.repeat_interleave(f, 0), emb.repeat_interleave(n, 0)

    def modulate(v, shift, scale):
        return v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def block(v: torch.Tensor, cond: torch.Tensor, i: int) -> torch.Tensor:
        def lin(v, name):
            return F.linear(v, s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"])

        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(cond), "adaLN_modulation.1").chunk(6, dim=1)
        bb, nn_, d = v.shape
        qkv = lin(modulate(F.layer_norm(v, (d,), eps=1e-6), shift1, scale1), "attn.qkv")
        q, k, vv = qkv.reshape(bb, nn_, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (d // HEADS) ** -0.5).softmax(dim=-1)
        v = v + gate1.unsqueeze(1) * lin((attn @ vv).transpose(1, 2).reshape(bb, nn_, d), "attn.proj")
        hidden = F.gelu(lin(modulate(F.layer_norm(v, (d,), eps=1e-6), shift2, scale2), "mlp.fc1"), approximate="tanh")
        return v + gate2.unsqueeze(1) * lin(hidden, "mlp.fc2")

    for i in range(0, DEPTH, 2 if temporal else 1):
        x = block(x, c_spatial, i)
        if temporal:
            x = x.reshape(b, f, n, -1).transpose(1, 2).reshape(b * n, f, -1)
            if i == 0:
                x = x + s["temp_embed"]
            x = block(x, c_temporal, i + 1)
            x = x.reshape(b, n, f, -1).transpose(1, 2).reshape(b * f, n, -1)
    shift, scale = F.linear(F.silu(c_spatial), s["final_layer.adaLN_modulation.1.weight"],
                            s["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    x = modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale)
    x = F.linear(x, s["final_layer.linear.weight"], s["final_layer.linear.bias"])
    c_out, g = x.shape[-1] // (P * P), h // P
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(b * f, g, g, P, P, c_out)).reshape(b, f, c_out, h, w)
    return x[:, :, :C]  # ε; with learn_sigma the variance channels follow


# -- helpers ----------------------------------------------------------------------------------------------------------
def network(**overrides) -> LetsTalkDiT:
    config = dict(size="tiny", head_dim=HIDDEN // HEADS, latent_channels=C, patch_size=P, audio_dim=DA,
                  audio_tokens=WA, qk_norm=False, pos_encoding="latte", portrait_fusion="direct",
                  audio_fusion="direct")
    torch.manual_seed(1)
    return LetsTalkDiT(DiTConfig(**{**config, **overrides})).eval()


def save_release(state: dict, path: Path, **extra) -> Path:
    torch.save({"ema": state, "model": {k: torch.zeros_like(v) for k, v in state.items()}, **extra}, path)
    return path


def inputs(frames: int = FRAMES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, frames, C, SIDE, SIDE, generator=g), torch.tensor([17.0, 740.0]),
            torch.randn(B, 1, C, SIDE, SIDE, generator=g), torch.randn(B, frames, WA, DA, generator=g))


def ours(net: LetsTalkDiT, x, t, ref, audio, **kw) -> torch.Tensor:
    drop = torch.ones(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        return net(x, t, ref, audio, drop_ref=drop, drop_audio=drop, **kw)


# -- equivalence ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes, label", [(None, None), (CLASSES, None), (CLASSES, 3)],
                         ids=["unconditional", "class-null-label", "class-label-3"])
def test_latte_checkpoint_gives_the_reference_prediction_with_null_conditions(tmp_path, classes, label):
    state = published_state("latte", classes)
    net = network()
    report = load_pretrained(net, InitFrom(str(save_release(state, tmp_path / "latte.pt")), "latte", label))
    x, t, ref, audio = inputs()
    y = None if classes is None else torch.full((B,), CLASSES if label is None else label)
    expected = reference_forward(state, x, t, y, temporal=True)
    assert expected.abs().mean() > 0.1  # a real prediction, not the zero start
    torch.testing.assert_close(ours(net, x, t, ref, audio), expected, rtol=1e-4, atol=1e-5)
    assert report.exact.startswith("with null audio and portrait")
    assert not report.unused
    assert set(report.new) >= {"null_ref", "null_audio", "ref_type", "audio_in.0.weight"}
    assert len(report.loaded) + len(report.reshaped) + len(report.new) == len(net.state_dict())
    assert report.derived == ["pos_embed", "temp_embed"]


def test_the_fused_conditions_start_gated_so_real_audio_and_portrait_change_nothing_at_step_0(tmp_path):
    state = published_state("latte")
    net = network(motion_frames=1)
    load_pretrained(net, InitFrom(str(save_release(state, tmp_path / "latte.pt"))))
    x, t, ref, audio = inputs()
    with torch.no_grad():
        conditioned = net(x, t, ref, audio, motion=torch.randn(B, 1, C, SIDE, SIDE))
    torch.testing.assert_close(conditioned, reference_forward(state, x, t, None, temporal=True), rtol=1e-4, atol=1e-5)


def test_dit_checkpoint_gives_the_reference_prediction_on_single_frames(tmp_path):
    state = published_state("dit", CLASSES)
    path = tmp_path / "DiT.pt"
    torch.save(state, path)  # DiT's release is the bare EMA state dict
    net = network(temporal_attention=False)
    report = load_pretrained(net, InitFrom(str(path), "dit"))
    x, t, ref, audio = inputs(frames=2)  # two frames, each an image: no temporal block
    torch.testing.assert_close(ours(net, x, t, ref, audio),
                               reference_forward(state, x, t, torch.full((B,), CLASSES), temporal=False),
                               rtol=1e-4, atol=1e-5)
    assert report.derived == ["pos_embed"]


def test_safetensors_files_load_the_same(tmp_path):
    from safetensors.torch import save_file
    state = published_state("latte")
    save_file(state, tmp_path / "latte.safetensors")
    net = network()
    load_pretrained(net, InitFrom(str(tmp_path / "latte.safetensors")))
    x, t, ref, audio = inputs()
    torch.testing.assert_close(ours(net, x, t, ref, audio), reference_forward(state, x, t, None, True),
                               rtol=1e-4, atol=1e-5)


def test_a_shorter_clip_reads_the_same_positions(tmp_path):
    """The release's 4-frame table is sin-cos, defined at every frame count: a 2-frame clip of ours equals the
    reference on the same 2 frames with the table's first 2 rows."""
    state = published_state("latte")
    net = network()
    load_pretrained(net, InitFrom(str(save_release(state, tmp_path / "latte.pt"))))
    x, t, ref, audio = inputs(frames=2)
    short = {**state, "temp_embed": state["temp_embed"][:, :2]}
    torch.testing.assert_close(ours(net, x, t, ref, audio), reference_forward(short, x, t, None, True),
                               rtol=1e-4, atol=1e-5)


def test_symbiotic_fusion_loads_and_says_step_0_is_not_exact(tmp_path):
    net = network(portrait_fusion="symbiotic")
    report = load_pretrained(net, InitFrom(str(save_release(published_state("latte"), tmp_path / "l.pt"))))
    assert report.exact.startswith("close to the source, not equal: portrait fusion 'symbiotic'")
    assert "step 0: close to the source" in report.table()


def test_export_to_latte_layout_and_back_keeps_the_prediction(tmp_path):
    """`to_latte` (used to hand an unconditional model of ours to Latte-layout code) inverts `convert`."""
    source = network()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        for block in source.blocks[::2]:  # keep the fusion branches shut: Latte has no conditions
            for layer in (block.ref_attn.out, block.audio_attn.out):
                layer.weight.zero_()
                layer.bias.zero_()
    state = to_latte(source, frames=FRAMES, side=SIDE // P)
    x, t, ref, audio = inputs()
    torch.testing.assert_close(reference_forward(state, x, t, None, True), ours(source, x, t, ref, audio),
                               rtol=1e-4, atol=1e-5)
    torch.save({"ema": state}, tmp_path / "export.pt")
    target = network()
    load_pretrained(target, InitFrom(str(tmp_path / "export.pt")))
    torch.testing.assert_close(ours(target, x, t, ref, audio), ours(source, x, t, ref, audio), rtol=1e-5, atol=1e-6)


# -- refusals ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"size": "S"}, "hidden 128 and depth 4, ours 384 and 12: set model.net.size: tiny"),
    ({"patch_size": 4}, "patch 2, ours 4: set model.net.patch_size: 2"),
    ({"latent_channels": 8}, "4 latent channels, ours 8"),
    ({"qk_norm": True}, "set model.net.qk_norm: false"),
    ({"pos_encoding": "sincos"}, "set model.net.pos_encoding: latte"),
    ({"temporal_attention": False}, "set model.net.temporal_attention: true"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_setting(tmp_path, overrides, message):
    path = save_release(published_state("latte"), tmp_path / "latte.pt")
    with pytest.raises(ValueError, match="does not fit this network") as error:
        load_pretrained(network(**overrides), InitFrom(str(path)))
    assert message in str(error.value) and str(path) in str(error.value)


def test_published_widths_check_the_head_count(tmp_path, monkeypatch):
    """The releases fix heads per width (XL: 16, head_dim 72); the weights cannot show it, so the table does."""
    state = published_state("latte")
    monkeypatch.setitem(pretrained.PUBLISHED_HEADS, HIDDEN, 2)  # as if tiny were a published width with 2 heads
    with pytest.raises(ValueError, match="set model.net.head_dim: 64"):
        load_pretrained(network(), InitFrom(str(save_release(state, tmp_path / "l.pt"))))


def test_a_learned_position_table_is_refused(tmp_path):
    state = published_state("latte")
    state["temp_embed"] = state["temp_embed"] + 0.01
    with pytest.raises(ValueError, match="temp_embed is not the fixed sin-cos table"):
        load_pretrained(network(), InitFrom(str(save_release(state, tmp_path / "l.pt"))))


class Payload:
    """Unpickling it creates the file at `path`: proof that a loader unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_with_pickled_objects_is_refused_without_unpickling(tmp_path):
    path = save_release(published_state("latte"), tmp_path / "train.pt", args=Payload(tmp_path / "unpickled"))
    with pytest.raises(ValueError, match="cannot read it as weights without unpickling") as error:
        read_state(path)
    assert "torch.save({'ema': ckpt['ema']}" in str(error.value) and str(path) in str(error.value)
    assert not (tmp_path / "unpickled").exists()


def test_init_from_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        InitFrom(str(tmp_path), "sd3").validate()
    with pytest.raises(ValueError, match="no file at"):
        load_pretrained(network(), InitFrom(str(tmp_path / "missing.pt")))
    torch.save({"ema": {"weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a Latte/DiT state dict"):
        read_state(tmp_path / "other.pt")


# -- in training ------------------------------------------------------------------------------------------------------
def test_fit_starts_from_the_converted_weights(tmp_path, caplog):
    """`model.init_from` in a real fit: step 0 holds the converted weights, the report is logged, and the
    checkpoint records where they came from."""
    shards = write_shards(tmp_path / "shards")  # 4-channel 8×8 latents
    state = published_state("latte")
    source = save_release(state, tmp_path / "latte.pt")
    net = dict(size="tiny", head_dim=HIDDEN // HEADS, patch_size=P, qk_norm=False, pos_encoding="latte",
               portrait_fusion="direct")
    start = {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, module):
            start.update({k: v.clone() for k, v in module.net.state_dict().items()})

    module = LetsTalkModule(net=net, optim={"lr": 1e-3, "warmup_steps": 1},
                            init_from={"path": str(source), "kind": "latte"})
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 2, callbacks=[AtStart(), saver]).fit(module, _data(shards))
    mapped, _ = convert(state, "latte", module.net)
    assert all(torch.equal(start[k], v) for k, v in mapped.items())
    assert "letstalk fit: initialised from latte weights" in caplog.text and "step 0: with null audio" in caplog.text
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["hyper_parameters"]["init_from"] == {"path": str(source), "kind": "latte", "label": None}


def test_letstalk_fit_takes_init_from_and_refuses_a_misfit_with_the_setting(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards")
    source = save_release(published_state("latte"), tmp_path / "latte.pt")
    flags = [*fit_args(shards, tmp_path / "run"), "--trainer.max_steps", "1", "--model.init_from.path", str(source),
             "--model.init_from.kind", "latte", "--model.net.patch_size", "2", "--model.net.head_dim", "32"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *flags])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "letstalk fit: error: " in err and "set model.net.qk_norm: false" in err, err[-2000:]
    assert main(["fit", *flags, "--model.net.qk_norm", "false", "--model.net.pos_encoding", "latte"]) == 0


def test_the_latte_xl_config_composes_with_the_base_config(tmp_path, capsys):
    """configs/init/latte_xl.yaml: docs/training.md's fine-tune command resolves to a network Latte-XL/2's weights
    fit."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "init" / "latte_xl.yaml"),
              "--data.root", str(tmp_path), "--model.init_from.path", "/models/ffs.pt", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)["model"]
    assert config["init_from"] == {"path": "/models/ffs.pt", "kind": "latte", "label": None}
    net = DiTConfig(**{**config["net"], "patch_size": 2})
    assert (net.size, net.heads, net.qk_norm, net.pos_encoding) == ("XL", 16, False, "latte")
    assert config["diffusion"]["objective"] == "eps"
