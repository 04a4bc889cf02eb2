"""LetsTalkDiT: fusion schemes, adaLN-Zero init, attention backends, RoPE, audio alignment, sizes, FLOPs."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.attention import Attention, Context, apply_rope, attention, rope_rotation
from pipeline.models.dit import FUSIONS, DiTConfig, LetsTalkDiT
from pipeline.models.long_video import noise_context
from pipeline.models.sizes import SIZES, get_size

B, F, C, H, W, WA, DA = 2, 4, 4, 8, 8, 6, 16
SCHEMES = [{"portrait_fusion": p, "audio_fusion": a} for p, a in itertools.product(FUSIONS, FUSIONS)]
SCHEME_IDS = [f"portrait_{s['portrait_fusion']}-audio_{s['audio_fusion']}" for s in SCHEMES]
BACKENDS = ["sdpa", "math", "linear"]  # flash_attn: see test_flash_attn_matches_math_in_bf16
LONG = {"motion_frames": 2, "memory_frames": 3, "memory_stride": 2}  # long-video options (motion, memory)
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """At these tiny shapes intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DATA = {"latent_channels": C, "audio_dim": DA, "audio_tokens": WA}  # what the data decides, given by hand


def data_info(latent_channels: int = C, downsample: int = 8, radius: int = 2) -> dict:
    """A LetsTalkDataModule.data_info of a dataset with K = 2 audio vectors of DA dims a frame."""
    return {"latent_channels": latent_channels, "audio_dim": DA, "audio_tokens": (2 * radius + 1) * 2,
            "audio_radius": radius, "vae": {"id": "sd-vae", "downsample": downsample},
            "audio_encoder": {"id": "wav2vec2"}}


def test_the_data_sizes_come_from_the_data_and_a_number_that_disagrees_is_refused():
    """`auto` (the default) takes latent channels, audio dim and audio tokens from the data; a given number that
    disagrees is refused, every such setting named in one message with where the data's value comes from."""
    resolved = DiTConfig(patch_size="auto").for_data(data_info())
    assert (resolved.latent_channels, resolved.audio_dim, resolved.audio_tokens, resolved.patch_size) == (C, DA, 10, 2)
    assert DiTConfig(latent_channels=C, audio_dim=DA, audio_tokens=10).for_data(data_info()) == \
        DiTConfig(latent_channels=C, audio_dim=DA, audio_tokens=10)  # agreeing numbers stand
    with pytest.raises(ValueError) as refused:
        DiTConfig(latent_channels=16, audio_dim=DA, audio_tokens=20).for_data(data_info())
    message = str(refused.value)
    assert "model.net.latent_channels=16, but the data's VAE (sd-vae) makes 4-channel latents" in message
    assert "model.net.audio_tokens=20, but data.audio_radius=2 with 2 audio vectors a frame gives 10" in message
    assert "audio_dim" not in message and message.endswith("(its default, auto, takes it from the data)")
    with pytest.raises(ValueError, match="latent_channels must be an int >= 1 or 'auto'"):
        DiTConfig(latent_channels="many").validate()


def make(**overrides) -> LetsTalkDiT:
    torch.manual_seed(0)
    return LetsTalkDiT(DiTConfig(latent_channels=C, audio_dim=DA, audio_tokens=WA, **overrides))


def inputs(seed: int = 0, frames: int = F, h: int = H, w: int = W, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(B, frames, C, h, w, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randn(B, 1, C, h, w, generator=g), torch.randn(B, frames, WA, DA, generator=g))
    return tuple(a.to(device) for a in args)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised tensors (adaLN-Zero regressions, the final projection, zero-out
    cross-attention outputs, null/type embeddings, norm biases) small random values.

    At initialisation adaLN-Zero makes every block the identity and the final projection outputs
    zero, so most weights would get exactly zero gradient and most paths would carry no signal;
    after this, any weight that still gets no gradient, or any path that stays silent, is really
    disconnected.
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("pos", ["sincos", "rope", "latte"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_output_is_exactly_zero_at_init(scheme, pos):
    out = make(**scheme, pos_encoding=pos)(*inputs())
    assert out.shape == (B, F, C, H, W)
    assert torch.count_nonzero(out) == 0


def test_initialisation_is_dits():
    """xavier-uniform on every Linear (bound √(6/(fan_in+fan_out)), so std bound/√3) with zero biases,
    N(0, 0.02) on the timestep MLP, and zero adaLN regressions, final layer and new-branch outputs."""
    model = make(portrait_fusion="direct", audio_fusion="siamese", **LONG)
    zeroed = {id(b.ada[1]) for b in model.blocks} | {id(model.final.ada[1]), id(model.final.proj)}
    zeroed |= {id(m.out) for m in model.modules() if isinstance(m, Attention) and m.zero_out}
    timestep = {id(model.time.mlp[0]), id(model.time.mlp[2])}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(zeroed) == len(model.blocks) + 2 + len(model.blocks) // 2  # one direct portrait branch per spatial block
    for layer in linears:
        assert torch.count_nonzero(layer.bias) == 0
        w = layer.weight
        if id(layer) in zeroed:
            assert torch.count_nonzero(w) == 0
        elif id(layer) in timestep:
            assert abs(w.std().item() - 0.02) < 0.002
        else:
            bound = (6 / sum(w.shape)) ** 0.5
            assert w.abs().max() <= bound
            if w.numel() >= 2000:
                assert abs(w.std().item() / (bound / 3 ** 0.5) - 1) < 0.1, w.shape


def test_pytorch_initialisation_keeps_the_zero_starts_and_torchs_linear_init():
    """`init: pytorch`: Linears keep PyTorch's default (weights and biases uniform within 1/√fan_in), the zero
    starts stay, so the output is still exactly zero; an unknown init is refused."""
    model = make(init="pytorch", **LONG)
    assert torch.count_nonzero(model(*inputs(), **context())) == 0
    zeroed = {id(b.ada[1]) for b in model.blocks} | {id(model.final.ada[1]), id(model.final.proj)}
    zeroed |= {id(m.out) for m in model.modules() if isinstance(m, Attention) and m.zero_out}
    for layer in (m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in zeroed):
        bound = layer.weight.shape[1] ** -0.5
        assert layer.weight.abs().max() <= bound and 0 < layer.bias.abs().max() <= bound
        if layer.weight.numel() >= 2000:  # not xavier: std bound/√3, not √(2/(fan_in+fan_out))
            assert abs(layer.weight.std().item() / (bound / 3 ** 0.5) - 1) < 0.1, layer.weight.shape
    assert torch.count_nonzero(model.time.mlp[0].bias) > 0  # DiT's zero biases and N(0, 0.02) do not apply
    with pytest.raises(ValueError, match="init must be one of"):
        make(init="kaiming")


@pytest.mark.parametrize("overrides", [{}, {"portrait_fusion": "siamese", "audio_fusion": "symbiotic", **LONG}])
def test_every_parameter_learns_from_the_zero_start(overrides):
    """No perturbation: from the real initialisation, a few optimizer steps move every parameter (the zeroed
    adaLN regressions get gradients first and open the paths behind them)."""
    model = make(**overrides).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    drop = torch.tensor([True, False])
    extra = context() if overrides else {}
    target = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        optimizer.zero_grad()
        out = model(*inputs(), drop_ref=drop, drop_audio=drop, **extra,
                    **({"drop_motion": drop} if overrides else {}))
        (out - target).square().mean().backward()
        optimizer.step()
    assert not [n for n, p in model.named_parameters() if torch.equal(p, start[n])]


def test_default_config_is_the_papers():
    config = DiTConfig()
    assert (config.portrait_fusion, config.audio_fusion, config.pos_encoding, config.head_dim) == \
        ("symbiotic", "direct", "sincos", 64)
    model = make()
    assert not model.ref_twin and not model.audio_twin
    assert all(block.ref_attn is None for block in model.blocks)
    assert [block.audio_attn is not None for block in model.blocks] == [True, False, True, False]


def test_patchify_round_trip():
    model = make()
    x = inputs()[0]
    tokens = model.patchify(x)
    assert tokens.shape == (B, F, (H // 2) * (W // 2), C * 4)
    assert torch.equal(model.unpatchify(tokens, H, W), x)
    # the first token is the top-left 2x2 patch of every channel
    assert torch.equal(tokens[0, 0, 0].view(C, 2, 2), x[0, 0, :, :2, :2])


def dead_parameters(model: LetsTalkDiT) -> list[str]:
    model.train()
    x, t, ref, audio = inputs()
    drop = torch.tensor([True, False])
    model(x, t, ref, audio, drop_ref=drop, drop_audio=drop).square().mean().backward()
    return [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_every_parameter_gets_a_gradient(scheme, backend):
    assert not dead_parameters(perturb(make(**scheme, attention_backend=backend)))


@pytest.mark.parametrize("overrides", [{"grad_checkpointing": True}, {"patch_size": 4}, {"qk_norm": False},
                                       {"pos_encoding": "rope", "portrait_fusion": "siamese"},
                                       {"pos_encoding": "rope", "audio_fusion": "symbiotic"},
                                       {"head_dim": 128}, {"head_dim": 32, "portrait_fusion": "direct"}])
def test_every_parameter_gets_a_gradient_with_options(overrides):
    assert not dead_parameters(perturb(make(**overrides)))


def test_grad_checkpointing_gives_the_same_gradients():
    plain, ckpt = perturb(make(portrait_fusion="siamese")), make(portrait_fusion="siamese", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    for model in (plain, ckpt):
        model.train()(*inputs()).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("pos", ["sincos", "rope"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_sdpa_and_math_backends_agree(scheme, pos):
    a = perturb(make(**scheme, pos_encoding=pos, attention_backend="sdpa"))
    b = make(**scheme, pos_encoding=pos, attention_backend="math")
    b.load_state_dict(a.state_dict())
    args = inputs()
    torch.testing.assert_close(a(*args), b(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotated", [False, True])
def test_cross_attention_to_a_shared_context_equals_attending_to_its_copies(backend, rotated):
    """G = 3 query sequences per context item take the folded path (no k/v copies); repeating the items 3× takes
    the plain one: same outputs and gradients."""
    torch.manual_seed(0)
    layer = perturb(Attention(32, 4, context_dim=32, backend=backend, zero_out=True))
    x, ctx = torch.randn(2 * 3, 5, 32, requires_grad=True), torch.randn(2, 7, 32)
    rope = rope_rotation(torch.randint(0, 4, (5, 3)), 8) if rotated else None
    ctx_rope = rope_rotation(torch.randint(0, 4, (7, 3)), 8) if rotated else None
    shared = layer(x, rope, [Context(ctx, ctx_rope)])
    (grad_shared,) = torch.autograd.grad(shared.square().sum(), x)
    copies = layer(x, rope, [Context(ctx.repeat_interleave(3, dim=0), ctx_rope)])
    (grad_copies,) = torch.autograd.grad(copies.square().sum(), x)
    torch.testing.assert_close(shared, copies, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_shared, grad_copies, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASH_ATTN or not torch.cuda.is_available(), reason="needs flash_attn and a CUDA GPU")
def test_flash_attn_matches_math_in_bf16():
    reference = perturb(make(attention_backend="math")).cuda()
    flash = make(attention_backend="flash_attn").cuda()
    flash.load_state_dict(reference.state_dict())
    args = inputs(device="cuda")
    with torch.no_grad():
        want = reference(*args)
        got = flash.to(torch.bfloat16)(*(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args))
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash_attn is installed here")
def test_flash_attn_backend_without_the_package_names_it():
    with pytest.raises(ImportError, match="flash_attn package"):
        make(attention_backend="flash_attn")


def test_attention_function_matches_its_definitions():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    k, v = torch.cat([k, k[:, :, :2]], dim=2), torch.cat([v, v[:, :, :2]], dim=2)  # 7 keys for 5 queries
    softmax = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(attention(q, k, v, backend), softmax, rtol=1e-5, atol=1e-6)
    kernel = torch.relu(q) @ torch.relu(k).transpose(-1, -2)  # [2, 3, 5, 7]: φ(q_i)·φ(k_j), never formed by linear
    assert (kernel.sum(-1) == 0).any()  # a query with no positive feature gets 0, not NaN
    torch.testing.assert_close(attention(q, k, v, "linear"), kernel / (kernel.sum(-1, keepdim=True) + 1e-6) @ v,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, "nope")


def test_context_tokens_join_self_attention_as_keys_and_values_only():
    torch.manual_seed(0)
    layer = Attention(16, 2, qk_norm=False, backend="math")
    x, extra = torch.randn(6, 3, 16), torch.randn(2, 4, 16)  # 2 clips x 3 frames of 3 tokens, 4 shared tokens per clip
    out = layer(x, context=[Context(extra)])
    assert out.shape == x.shape  # extra tokens are never queries
    # the same as self-attention over [frame; its clip's extra tokens], keeping the frame's outputs
    joined = torch.cat([x, extra.repeat_interleave(3, dim=0)], dim=1)  # [6, 7, 16]
    torch.testing.assert_close(out, layer(joined)[:, :3], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, layer(x), atol=1e-3)


def test_cross_attention_is_identity_branch_at_init():
    layer = Attention(16, 2, context_dim=16, zero_out=True)
    assert torch.count_nonzero(layer(torch.randn(1, 3, 16), context=[Context(torch.randn(1, 5, 16))])) == 0


def changed_frames(model: LetsTalkDiT, j: int) -> list[int]:
    x, t, ref, audio = inputs()
    base = model(x, t, ref, audio)
    audio2 = audio.clone()
    audio2[:, j] += 1.0
    diff = (model(x, t, ref, audio2) - base).abs().amax(dim=(0, 2, 3, 4))  # [F]
    return [i for i in range(F) if diff[i] > 1e-6]


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_audio_of_one_frame_reaches_only_that_frame_without_temporal_attention(scheme):
    model = perturb(make(**scheme, temporal_attention=False)).eval()
    assert changed_frames(model, 2) == [2]


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_audio_of_one_frame_reaches_other_frames_through_temporal_attention(scheme):
    model = perturb(make(**scheme)).eval()
    assert changed_frames(model, 2) == list(range(F))


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_dropped_conditions_ignore_their_input(scheme):
    model = perturb(make(**scheme)).eval()
    x, t, ref, audio = inputs()
    yes = torch.ones(B, dtype=torch.bool)
    a = model(x, t, ref, audio, drop_ref=yes, drop_audio=yes)
    b = model(x, t, torch.randn_like(ref), torch.randn_like(audio), drop_ref=yes, drop_audio=yes)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model(x, t, ref, audio))


ROPE_MIX = {"pos_encoding": "rope", "portrait_fusion": "siamese", "audio_fusion": "symbiotic"}


@pytest.mark.parametrize("overrides", [{}, {"pos_encoding": "rope"}, ROPE_MIX])
def test_any_clip_length_and_latent_size(overrides):
    model = perturb(make(**overrides)).eval()
    for frames, h, w in ((F, H, W), (7, 12, 6), (2, 16, 16)):
        x, t, ref, audio = inputs(frames=frames, h=h, w=w)
        out = model(x, t, ref, audio)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert 0.01 < out.std() < 100  # neither vanishing nor blowing up at sizes it was not built for


@pytest.mark.parametrize("pos", ["sincos", "rope"])
def test_positions_make_frame_order_matter(pos):
    """Without positions attention is permutation-equivariant; with them reversing the clip's
    frames (video and audio) must not just reverse the output."""
    model = perturb(make(pos_encoding=pos, portrait_fusion="direct")).eval()
    x, t, ref, audio = inputs()
    flipped = model(x.flip(1), t, ref, audio.flip(1)).flip(1)
    assert not torch.allclose(flipped, model(x, t, ref, audio), atol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_scores_depend_only_on_relative_positions(head_dim):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, head_dim, generator=g) for _ in range(3))
    coords = torch.randint(0, 8, (12, 3), generator=g)  # (time, height, width) per token

    def rotated(cq: torch.Tensor, ck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, rope_rotation(cq, head_dim)), apply_rope(k, rope_rotation(ck, head_dim))

    qr, kr = rotated(coords, coords)
    scores = qr @ kr.transpose(-1, -2)
    for shift in ([5, 0, 0], [0, 7, 0], [0, 0, 3], [40, -30, 90]):  # beyond any training grid
        qs, ks = rotated(coords + torch.tensor(shift), coords + torch.tensor(shift))
        torch.testing.assert_close(qs @ ks.transpose(-1, -2), scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(attention(qs, ks, v), attention(qr, kr, v), rtol=1e-4, atol=1e-5)
    for axis in range(3):  # every axis is encoded: moving the keys alone along it changes the scores
        moved = coords.clone()
        moved[:, axis] += 1
        assert not torch.allclose(qr @ rotated(coords, moved)[1].transpose(-1, -2), scores, atol=1e-2)
    torch.testing.assert_close(apply_rope(q, rope_rotation(torch.zeros(12, 3, dtype=torch.long), head_dim)), q,
                               rtol=0, atol=0)  # the origin is not rotated


def flops_ratio(model: LetsTalkDiT, frames: int, h: int, w: int, audio_dim: int, audio_tokens: int) -> float:
    x, ref = torch.randn(1, frames, C, h, w), torch.randn(1, model.config.ref_frames, C, h, w)
    audio = torch.randn(1, frames, audio_tokens, audio_dim)
    cfg = model.config
    extra = {name: torch.randn(1, count, C, h, w) for name, count in
             (("motion", cfg.motion_frames), ("memory", cfg.memory_frames)) if count}  # long-video inputs
    with FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500.0], device=x.device), ref, audio, **extra)
    return model.flops_per_clip(frames, h, w) / counter.get_total_flops()


# On the CPU torch's counter has no formula for the fused SDPA kernel (it counts 0 FLOPs for it); on
# the meta device SDPA decomposes into counted matmuls, and nothing is computed, so count there.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_flop_counter_matches_torch_within_5_percent(scheme, backend):
    with torch.device("meta"):
        model = make(**scheme, attention_backend=backend)
        ratio = flops_ratio(model, F, H, W, DA, WA)
    assert abs(ratio - 1) < 0.05, ratio


@pytest.mark.parametrize("overrides", [{"patch_size": 4}, {"pos_encoding": "rope", "head_dim": 32},
                                       {"temporal_attention": False}, {"ref_frames": 2, "portrait_fusion": "siamese"}])
def test_flop_counter_matches_torch_with_options(overrides):
    with torch.device("meta"):
        ratio = flops_ratio(make(**overrides), F, H, W, DA, WA)
    assert abs(ratio - 1) < 0.05, ratio


def test_flop_counter_matches_torch_on_real_tensors():
    assert abs(flops_ratio(make(attention_backend="math", audio_fusion="siamese"), F, H, W, DA, WA) - 1) < 0.05


UNIFORM = [{"portrait_fusion": f, "audio_fusion": f} for f in FUSIONS]  # every scheme for both conditions


@pytest.mark.parametrize("overrides", [*UNIFORM, {"head_dim": 128}], ids=[*FUSIONS, "head_dim_128"])
@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_registry_sizes_build_and_run_on_meta(size, overrides):
    """The real sizes at the benchmark's clip (16 frames of 32×32 latents, 768-d audio), on meta."""
    with torch.device("meta"):
        model = LetsTalkDiT(DiTConfig(size=size, latent_channels=4, audio_dim=768, audio_tokens=10, **overrides))
        assert all(block.attn.heads == get_size(size).hidden // model.config.head_dim for block in model.blocks)
        assert abs(flops_ratio(model, 16, 32, 32, 768, 10) - 1) < 0.05


def test_registry_sizes_grow_and_head_dim_only_changes_qk_norms():
    def params(size: str, head_dim: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in LetsTalkDiT(DiTConfig(size=size, head_dim=head_dim, **DATA)).parameters())

    counts = [params(size, 64) for size in ("S", "B", "L", "XL")]
    assert counts == sorted(counts) and 20e6 < counts[0] and counts[-1] < 1e9, counts
    with torch.device("meta"):
        norms = sum(isinstance(m, torch.nn.RMSNorm) for m in LetsTalkDiT(DiTConfig(size="B", **DATA)).modules())
    assert params("B", 128) - params("B", 64) == norms * (128 - 64)


def test_size_registry_and_config_errors_name_the_fix():
    assert set(SIZES) >= {"tiny", "S", "B", "L", "XL"}
    for name, size in SIZES.items():
        assert size.hidden % 64 == 0 and size.hidden % 128 == 0, name
    with pytest.raises(ValueError, match="unknown model size 'XXL'"):
        get_size("XXL")
    with pytest.raises(ValueError, match=r"cannot use head_dim 96; set head_dim to an even divisor of 128, e\.g\. 64"):
        make(head_dim=96)
    with pytest.raises(ValueError, match=r"portrait_fusion must be one of \('direct', 'siamese', 'symbiotic'\)"):
        make(portrait_fusion="cross")
    with pytest.raises(ValueError, match="pos_encoding must be one of"):
        make(pos_encoding="alibi")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        make(attention_backend="xformers")
    with pytest.raises(ValueError, match="patch size"):
        make(patch_size=3)(*inputs())


def test_compile_switch_compiles_every_block_in_place():
    plain, compiled = make(audio_fusion="siamese"), make(audio_fusion="siamese", compile=True)
    assert list(plain.state_dict()) == list(compiled.state_dict())  # checkpoints interchange
    blocks = [*compiled.blocks, *compiled.audio_twin.values()]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(block._compiled_call_impl is None for block in plain.blocks)


def test_a_network_built_from_weights_is_the_trained_one_for_sampling():
    """`from_weights` (generation, evaluation): the trained network's outputs, eval mode, no gradients, never compiled,
    and nothing initialised on the way (the meta device); weights that do not fit are refused, naming the keys."""
    trained = perturb(make(**LONG, audio_fusion="siamese"))
    state = trained.state_dict()
    net = LetsTalkDiT.from_weights(trained.config, state)
    args = inputs()
    torch.testing.assert_close(net(*args), trained(*args), rtol=0, atol=0)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(p.data_ptr() != state[name].data_ptr() for name, p in net.named_parameters())  # its own copy
    compiled = make(**LONG, audio_fusion="siamese", compile=True).config
    assert all(block._compiled_call_impl is None for block in LetsTalkDiT.from_weights(compiled, state).blocks)
    with pytest.raises(ValueError, match=r"missing \['null_ref'\]"):
        LetsTalkDiT.from_weights(trained.config, {k: v for k, v in state.items() if k != "null_ref"})
    with pytest.raises(ValueError, match="unexpected .'extra'"):
        LetsTalkDiT.from_weights(trained.config, {**state, "extra": torch.zeros(1)})


@pytest.mark.slow
def test_compiled_model_matches_eager():
    eager = perturb(make())
    compiled = make(compile=True)
    compiled.load_state_dict(eager.state_dict())
    args = inputs()
    torch.testing.assert_close(compiled(*args), eager(*args), rtol=1e-4, atol=1e-5)


# Long videos: motion frames (M) and a memory bank (N), see pipeline/models/dit.py.


def context(seed: int = 5, m: int = 2, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return {"motion": torch.randn(B, m, C, H, W, generator=g), "memory": torch.randn(B, n, C, H, W, generator=g)}


@pytest.mark.parametrize("pos", ["sincos", "rope", "latte"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_long_video_model_is_zero_at_init_and_every_parameter_learns(scheme, pos):
    model = make(**scheme, pos_encoding=pos, **LONG)
    assert torch.count_nonzero(model(*inputs(), **context())) == 0
    perturb(model).train()
    drop = torch.tensor([True, False])
    model(*inputs(), drop_ref=drop, drop_audio=drop, drop_motion=drop, **context()).square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]


def test_long_video_options_off_keep_the_state_dict_keys():
    """Checkpoints of models without motion/memory load unchanged: the options add parameters only when on."""
    plain, long = set(make().state_dict()), set(make(**LONG).state_dict())
    assert plain < long
    assert {k.split(".")[0] for k in long - plain} == {"motion_type", "null_motion", "memory_type", "null_memory",
                                                       "blocks"}
    assert all(k.endswith(("memory_norm.weight", "memory_norm.bias")) for k in long - plain if k.startswith("blocks"))


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_motion_and_memory_each_reach_the_output_and_dropping_nulls_them(scheme):
    model = perturb(make(**scheme, **LONG)).eval()
    x, t, ref, audio = inputs()
    ctx, other = context(5), context(6)
    base = model(x, t, ref, audio, **ctx)
    assert not torch.allclose(base, model(x, t, ref, audio, motion=other["motion"], memory=ctx["memory"]), atol=1e-5)
    assert not torch.allclose(base, model(x, t, ref, audio, motion=ctx["motion"], memory=other["memory"]), atol=1e-5)
    # dropped: the learned nulls, whatever was given, exactly as if nothing was given (a video's first clip)
    drop = torch.tensor([True, False])
    a, b = model(x, t, ref, audio, drop_motion=drop, **ctx), model(x, t, ref, audio, drop_motion=drop, **other)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1], atol=1e-5)
    torch.testing.assert_close(a[0], model(x, t, ref, audio)[0])


@pytest.mark.parametrize("pos", ["sincos", "rope"])
def test_long_video_sdpa_and_math_backends_agree(pos):
    model = perturb(make(**LONG, pos_encoding=pos, portrait_fusion="siamese")).eval()
    reference = make(**LONG, pos_encoding=pos, portrait_fusion="siamese", attention_backend="math").eval()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(*inputs(), **context()), reference(*inputs(), **context()),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_flop_counter_matches_torch_with_motion_and_memory(scheme):
    with torch.device("meta"):
        model = make(**scheme, **LONG)
        ratio = flops_ratio(model, F, H, W, DA, WA)
    assert abs(ratio - 1) < 0.05, ratio


def test_memory_indices_are_strided_before_the_motion_frames_and_clamped_at_the_start():
    config = DiTConfig(motion_frames=2, memory_frames=3, memory_stride=4)
    assert config.long_video.memory_indices(40) == [26, 30, 34]  # motion: 38, 39
    assert config.long_video.memory_indices(8) == [0, 0, 2]
    assert config.long_video.memory_indices(0) == [0, 0, 0]
    assert config.long_video.history_frames == 2 + 3 * 4


def test_noise_context_levels():
    from pipeline.diffusion import Diffusion, DiffusionConfig

    latents = torch.randn(4, 2, C, H, W, generator=torch.Generator().manual_seed(9))
    flow = Diffusion(DiffusionConfig(objective="flow"))
    assert torch.equal(noise_context(flow, latents, 0.0), latents)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([0.0, 0.1, 0.3, 1.0])
    out = noise_context(flow, latents, level, g)
    u = level.view(4, 1, 1, 1, 1)
    torch.testing.assert_close(out, (1 - u) * latents + u * noise)  # flow: x_σ = (1-σ)·x0 + σ·ε
    eps = Diffusion(DiffusionConfig(objective="eps"))
    noisy = noise_context(eps, latents, 0.05, torch.Generator().manual_seed(0))
    assert 0.9 < torch.nn.functional.cosine_similarity(noisy.flatten(), latents.flatten(), dim=0) < 1


def test_long_video_input_errors_name_the_fix():
    model = make(**LONG)
    x, t, ref, audio = inputs()
    with pytest.raises(ValueError, match="motion must be"):
        model(x, t, ref, audio, motion=torch.randn(B, 1, C, H, W))
    with pytest.raises(ValueError, match="memory must be"):
        model(x, t, ref, audio, memory=torch.randn(B, 3, C, H // 2, W))
    with pytest.raises(ValueError, match="memory_frames=0"):
        make()(x, t, ref, audio, memory=torch.randn(B, 3, C, H, W))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(*inputs(h=H + 2, w=W + 2)[:1], t, torch.randn(B, 1, C, H + 2, W + 2), audio)
    with pytest.raises(ValueError, match="memory_stride"):
        DiTConfig(memory_stride=0).validate()
    with pytest.raises(ValueError, match="cond_noise_max"):
        DiTConfig(cond_noise_max=1.5).validate()


@pytest.mark.parametrize("downsample, patch", [(8, 2), (4, 4), (32, 1)])
def test_patch_size_auto_follows_the_data_vae(downsample, patch):
    """`patch_size: auto` keeps tokens per frame independent of the VAE: f8 SD-VAE -> 2, f4 -> 4, f32 DC-AE -> 1."""
    from types import SimpleNamespace

    from lightning_modules.letstalk import LetsTalkModule

    module = LetsTalkModule(net={"patch_size": "auto"})
    info = data_info(latent_channels=32 if downsample == 32 else 4, downsample=downsample)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(data_info=info))
    module.configure_model()
    assert module.net.config.patch_size == patch and module.hparams["net"]["patch_size"] == patch
    assert module.net.patch.in_features == info["latent_channels"] * patch * patch
    with pytest.raises(ValueError, match="patch_size, latent_channels, audio_dim, audio_tokens 'auto' is resolved"):
        LetsTalkDiT(DiTConfig(patch_size="auto"))
    with pytest.raises(ValueError, match="patch_size must be an int >= 1 or 'auto'"):
        DiTConfig(patch_size="big").validate()
