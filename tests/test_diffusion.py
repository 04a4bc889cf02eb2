"""Diffusion: targets agree with diffusers' formulas, guidance algebra, samplers on a known Gaussian."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import Diffusion, DiffusionConfig

MU, VAR = 0.7, 0.25  # data distribution N(MU, VAR) per element


def analytic_denoiser(diffusion: Diffusion):
    """The exact optimal prediction for Gaussian data, in the parameterisation of the objective."""
    objective, n = diffusion.config.objective, diffusion.config.num_train_timesteps

    def denoise(x, t, drop_ref, drop_audio):
        shape = (-1,) + (1,) * (x.dim() - 1)
        if objective == "flow":
            sigma = (t / n).view(shape)
            a, b = 1 - sigma, sigma
        else:
            alpha_bar = diffusion.ddpm.alphas_cumprod[t.long()].view(shape)
            a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = MU + a * VAR / (a * a * VAR + b * b) * (x - a * MU)  # E[x0 | x_t]
        eps = (x - a * x0) / b
        return {"eps": eps, "v": a * eps - b * x0, "flow": eps - x0}[objective]

    return denoise


@pytest.mark.parametrize("objective,sampler,steps,tol", [
    ("eps", "ddim", 100, 0.03), ("eps", "dpm++", 25, 0.03), ("v", "ddim", 100, 0.03),
    ("v", "dpm++", 25, 0.03), ("flow", "euler", 100, 0.03)])
def test_samplers_reproduce_gaussian_data(objective, sampler, steps, tol):
    """Driven by the exact denoiser, every sampler must land on N(MU, VAR): mean and variance within tol."""
    diffusion = Diffusion(DiffusionConfig(objective=objective))
    x = diffusion.sample(analytic_denoiser(diffusion), (4000, 1, 1, 2, 2), sampler, steps,
                         generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - MU) < tol
    assert abs(x.var().item() - VAR) < tol


def test_eps_and_v_targets_match_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    for objective in ("eps", "v"):
        d = Diffusion(DiffusionConfig(objective=objective))
        xt, target = d.noise_and_target(x0, noise, t)
        ab = d.ddpm.alphas_cumprod[t].view(-1, 1, 1)
        torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
        expected = noise if objective == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        torch.testing.assert_close(target, expected)


def test_flow_target_and_interpolation():
    d = Diffusion(DiffusionConfig(objective="flow"))
    x0, noise = torch.ones(2, 3), torch.full((2, 3), -1.0)
    xt, target = d.noise_and_target(x0, noise, torch.tensor([0.0, 250.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], torch.full((3,), 0.5))  # 0.75·1 + 0.25·(-1)
    torch.testing.assert_close(target, noise - x0)


def test_guidance_scale_one_is_the_conditional_prediction():
    calls = []

    def model(x, t, drop_ref, drop_audio):
        calls.append(x.shape[0])
        return x * 2 + drop_ref.float().view(-1, 1) * 10 + drop_audio.float().view(-1, 1) * 100

    x, t = torch.randn(2, 3), torch.ones(2)
    torch.testing.assert_close(Diffusion.guided(model, x, t, 1.0, 1.0), x * 2)
    # separate scales: u + s_ref (c_ref - u) + s_audio (c_full - c_ref)
    u, c_ref, c_full = x * 2 + 110, x * 2 + 100, x * 2
    expected = u + 1.5 * (c_ref - u) + 3.0 * (c_full - c_ref)
    torch.testing.assert_close(Diffusion.guided(model, x, t, 3.0, 1.5), expected)
    assert calls == [2, 6]  # the guided call batches its three predictions


def test_dropout_masks_follow_the_configured_odds():
    d = Diffusion(DiffusionConfig(audio_dropout=0.2, ref_dropout=0.1, both_dropout=0.1))
    drop_ref, drop_audio = d.dropout_masks(100_000, torch.Generator().manual_seed(0))
    both = (drop_ref & drop_audio).float().mean().item()
    assert abs(both - 0.1) < 0.01
    assert abs((drop_audio & ~drop_ref).float().mean().item() - 0.2) < 0.01
    assert abs((drop_ref & ~drop_audio).float().mean().item() - 0.1) < 0.01


def test_timestep_sampling_ranges():
    for objective in ("eps", "flow"):
        for sampling in ("uniform", "logit_normal"):
            d = Diffusion(DiffusionConfig(objective=objective, timestep_sampling=sampling))
            t = d.sample_timesteps(10_000, torch.Generator().manual_seed(0))
            assert t.min() >= 0 and t.max() < 1000
            assert (t.dtype == torch.long) == (objective == "eps")
    ln = Diffusion(DiffusionConfig(timestep_sampling="logit_normal")).sample_timesteps(10_000)
    assert ((ln > 250) & (ln < 750)).float().mean() > 0.6  # mass concentrated mid-range


def test_fixed_seed_gives_the_same_sample():
    d = Diffusion(DiffusionConfig())
    den = analytic_denoiser(d)
    a = d.sample(den, (2, 1, 1, 2, 2), steps=5, generator=torch.Generator().manual_seed(3))
    b = d.sample(den, (2, 1, 1, 2, 2), steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="objective must be one of"):
        Diffusion(DiffusionConfig(objective="x0"))
    with pytest.raises(ValueError, match="does not fit objective"):
        Diffusion(DiffusionConfig(objective="flow")).scheduler("ddim", 10)
    with pytest.raises(ValueError, match="sum to <= 1"):
        Diffusion(DiffusionConfig(audio_dropout=0.9, ref_dropout=0.2))
