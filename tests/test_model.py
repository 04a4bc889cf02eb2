"""LetsTalkDiT: shapes, adaLN-Zero init, attention backends, audio alignment, FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.attention import Attention, attention
from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.models.sizes import SIZES, get_size

B, F, C, H, W, WA, DA = 2, 4, 4, 8, 8, 6, 16


def make(**overrides) -> LetsTalkDiT:
    torch.manual_seed(0)
    return LetsTalkDiT(DiTConfig(latent_channels=C, audio_dim=DA, audio_tokens=WA, **overrides))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, F, C, H, W, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randn(B, 1, C, H, W, generator=g), torch.randn(B, F, WA, DA, generator=g))


def perturb(model: torch.nn.Module) -> None:
    """Give the zero-initialised layers random values, so every path carries signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_output_is_exactly_zero_at_init():
    out = make()(*inputs())
    assert out.shape == (B, F, C, H, W)
    assert torch.count_nonzero(out) == 0


def test_patchify_round_trip():
    model = make()
    x = inputs()[0]
    tokens = model.patchify(x)
    assert tokens.shape == (B, F, (H // 2) * (W // 2), C * 4)
    assert torch.equal(model.unpatchify(tokens, H, W), x)
    # the first token is the top-left 2x2 patch of every channel
    assert torch.equal(tokens[0, 0, 0].view(C, 2, 2), x[0, 0, :, :2, :2])


@pytest.mark.parametrize("overrides", [{}, {"grad_checkpointing": True}, {"patch_size": 4}, {"qk_norm": False}])
def test_every_parameter_gets_a_gradient(overrides):
    model = make(**overrides).train()
    perturb(model)
    x, t, ref, audio = inputs()
    drop = torch.tensor([True, False])
    model(x, t, ref, audio, drop_ref=drop, drop_audio=drop).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not dead, dead


def test_sdpa_and_math_backends_agree():
    a, b = make(attention_backend="sdpa"), make(attention_backend="math")
    perturb(a)
    b.load_state_dict(a.state_dict())
    args = inputs()
    torch.testing.assert_close(a(*args), b(*args), rtol=1e-5, atol=1e-5)


def test_attention_function_matches_softmax_definition():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(attention(q, k, v, backend), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, "nope")


def test_cross_attention_is_identity_branch_at_init():
    layer = Attention(16, 2, context_dim=16, zero_out=True)
    assert torch.count_nonzero(layer(torch.randn(1, 3, 16), torch.randn(1, 5, 16))) == 0


def changed_frames(model, j: int) -> list[int]:
    x, t, ref, audio = inputs()
    base = model(x, t, ref, audio)
    audio2 = audio.clone()
    audio2[:, j] += 1.0
    diff = (model(x, t, ref, audio2) - base).abs().amax(dim=(0, 2, 3, 4))  # [F]
    return [i for i in range(F) if diff[i] > 1e-6]


def test_audio_of_one_frame_reaches_only_that_frame_without_temporal_attention():
    model = make(temporal_attention=False).eval()
    perturb(model)
    assert changed_frames(model, 2) == [2]


def test_audio_of_one_frame_reaches_other_frames_through_temporal_attention():
    model = make().eval()
    perturb(model)
    assert changed_frames(model, 2) == list(range(F))


def test_dropped_conditions_ignore_their_input():
    model = make().eval()
    perturb(model)
    x, t, ref, audio = inputs()
    yes = torch.ones(B, dtype=torch.bool)
    a = model(x, t, ref, audio, drop_ref=yes, drop_audio=yes)
    b = model(x, t, torch.randn_like(ref), torch.randn_like(audio), drop_ref=yes, drop_audio=yes)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model(x, t, ref, audio))


def test_any_clip_length_and_latent_size():
    model = make().eval()
    perturb(model)
    x = torch.randn(1, 7, C, 12, 6)
    out = model(x, torch.tensor([500.0]), torch.randn(1, 1, C, 12, 6), torch.randn(1, 7, WA, DA))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("patch", [2, 4])
def test_flop_counter_matches_torch_within_5_percent(patch):
    model = make(patch_size=patch).eval()
    x, t, ref, audio = inputs()
    with FlopCounterMode(display=False) as counter:
        model(x[:1], t[:1], ref[:1], audio[:1])
    measured = counter.get_total_flops()
    ours = model.flops_per_clip(F, H, W)
    assert abs(ours - measured) / measured < 0.05, (ours, measured)


def test_size_registry_has_fa_friendly_head_dims_and_clear_errors():
    assert set(SIZES) >= {"tiny", "S", "B", "L", "XL"}
    for name, size in SIZES.items():
        assert size.hidden % size.heads == 0 and size.hidden // size.heads in (64, 128), name
    with pytest.raises(ValueError, match="unknown model size 'XXL'"):
        get_size("XXL")
    with pytest.raises(ValueError, match="patch size"):
        make(patch_size=3)(*inputs())
