"""Diffusion: conversions agree with diffusers' formulas, min-SNR weights, guidance, condition dropout,
and every sampler driven by the exact denoiser of Gaussian data lands on that data's law."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from pipeline.diffusion import OBJECTIVES, PARAMETERISATIONS, PREDICTS, SAMPLERS, Diffusion, DiffusionConfig

# Toy data: x0 ~ N(MU, VAR) independently per channel of latents [B, 1, 4, 1, 1].
MU = torch.tensor([-1.0, 0.0, 0.7, 2.0]).view(1, 1, 4, 1, 1)
VAR = torch.tensor([0.25, 0.5, 1.0, 2.25]).view(1, 1, 4, 1, 1)
TOY_SAMPLES = 2000
COMBOS = [(objective, sampler) for objective in OBJECTIVES for sampler in SAMPLERS[objective]]


def scales(diffusion: Diffusion, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of x_t = a·x0 + b·ε computed here from diffusers' ᾱ or σ = t/N, independently of the library."""
    shape = (-1,) + (1,) * (ndim - 1)
    if diffusion.config.objective == "flow":
        sigma = (t.float() / diffusion.config.num_train_timesteps).view(shape)
        return 1 - sigma, sigma
    alpha_bar = diffusion.ddpm.alphas_cumprod[t.round().long()].view(shape)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def definitions(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameterisation of (x0, ε) by its textbook definition."""
    return {"eps": eps, "x0": x0, "v": a * eps - b * x0, "velocity": eps - x0}


def analytic_denoiser(diffusion: Diffusion, mu: torch.Tensor = MU, var: torch.Tensor = VAR,
                      predicts: str | None = None):
    """The exact optimal prediction E[target | x_t] for data N(mu, var), in the objective's parameterisation.

    x_t = a·x0 + b·ε is jointly Gaussian with x0, so E[x0 | x_t] = mu + a·var/(a²·var + b²)·(x_t - a·mu)
    and E[ε | x_t] = (x_t - a·E[x0 | x_t]) / b; every target is linear in (x0, ε).
    """
    predicts = predicts or PREDICTS[diffusion.config.objective]

    def denoise(x, t, drop_ref, drop_audio):
        a, b = scales(diffusion, t, x.dim())
        x0 = mu + a * var / (a * a * var + b * b) * (x - a * mu)
        return definitions(x0, (x - a * x0) / b, a, b)[predicts]

    return denoise


def standard_noise(seed: int = 0) -> torch.Tensor:
    """Gaussian noise [TOY_SAMPLES, 1, 4, 1, 1] standardised per channel: sample mean 0, sample variance 1.

    With the exact Gaussian denoiser every sampler is an affine map per channel, so the samples'
    mean and variance are then exactly those of the map: no Monte Carlo error, only the sampler's own.
    """
    z = torch.randn(TOY_SAMPLES, 1, 4, 1, 1, generator=torch.Generator().manual_seed(seed))
    return (z - z.mean(0)) / z.std(0)


def toy_sample(objective: str, sampler: str, steps: int, **denoiser_kwargs) -> torch.Tensor:
    d = Diffusion(DiffusionConfig(objective=objective))
    noise = standard_noise()
    return d.sample(analytic_denoiser(d, **denoiser_kwargs), noise.shape, sampler, steps, noise=noise)


def terminal_mean(objective: str) -> torch.Tensor:
    """Mean [1, 1, 4, 1, 1] of the exact ODE's samples when started from N(0, I) instead of x_T's true law.

    The linear DDPM schedule ends at ᾱ_999 ≈ 4e-5, not 0, so x_T ~ N(a·MU, a²·VAR + b²) and the exact
    flow map x0 = MU + √VAR·(x_T - a·MU)/s_T shifts the mean by -√VAR·a·MU/s_T (about -0.019 at MU = 2).
    Rectified flow reaches σ = 1, where x_T is pure noise: no shift.
    """
    if objective == "flow":
        return MU
    alpha_bar = Diffusion(DiffusionConfig(objective=objective)).ddpm.alphas_cumprod[-1]
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return MU - VAR.sqrt() * a * MU / (a * a * VAR + b * b).sqrt()


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sample mean and variance [1, 1, 4, 1, 1] of toy samples [B, 1, 4, 1, 1]."""
    return x.mean(0, keepdim=True), x.var(0, keepdim=True)


# -- the toy problem ------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_analytic_denoiser_matches_monte_carlo_posterior(objective):
    """At t = 500 the analytic E[target | x_t] agrees with a self-normalised importance-sampling estimate
    (400k prior draws of x0 weighted by the likelihood N(x_t; a·x0, b²)) within 4 standard errors of that
    estimate at every probe point; those standard errors are all below 0.005."""
    d = Diffusion(DiffusionConfig(objective=objective))
    t = torch.tensor([500.0])
    a, b = scales(d, t, 1)
    kind = PREDICTS[objective]
    std_t = (a * a * VAR + b * b).sqrt()  # marginal std of x_t per channel
    probes = a * MU + torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.5]).view(-1, 1, 1, 1, 1) * std_t  # [5, 1, 4, 1, 1]
    x0 = MU + VAR.sqrt() * torch.randn(400_000, 1, 4, 1, 1, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)  # prior draws
    # The target is linear in E[x0 | x_t] at fixed x_t, with slope c = d(target)/d(x0).
    slope = {"eps": -a / b, "v": -(b + a * a / b), "velocity": -(1 + a / b)}[kind]
    for x in probes:  # x: [1, 4, 1, 1]
        w = torch.softmax(-(x - a * x0) ** 2 / (2 * b * b), dim=0)  # [400k, 1, 4, 1, 1]
        posterior_x0 = (w * x0).sum(0, keepdim=True)  # [1, 1, 4, 1, 1]
        std_err = slope.abs() * (w.square() * (x0 - posterior_x0).square()).sum(0, keepdim=True).sqrt()
        assert std_err.max() < 0.005
        expected = definitions(posterior_x0, (x - a * posterior_x0) / b, a, b)[kind]
        got = analytic_denoiser(d)(x[None], t, None, None).double()
        assert ((got - expected).abs() < 4 * std_err).all(), (got - expected) / std_err


@pytest.mark.parametrize("objective,sampler,steps", [
    ("eps", "dpm++", 25), ("v", "dpm++", 25), ("eps", "ddim", 200), ("v", "ddim", 200), ("flow", "euler", 200)])
def test_samplers_reproduce_gaussian_data(objective, sampler, steps):
    """Driven by the exact denoiser, each sampler lands on N(MU, VAR) per channel, 2000 samples:
    mean within 0.05 of MU and within 0.005 of the terminal-SNR-shifted mean (see `terminal_mean`),
    variance within 5% of VAR. DPM-Solver++ (second order) gets there in 25 steps; the first-order
    DDIM and Euler shrink the variance by O(1/steps) (about 11% at 50 steps, 3% at 200)."""
    mean, var = moments(toy_sample(objective, sampler, steps))
    assert (mean - MU).abs().max() < 0.05
    assert (mean - terminal_mean(objective)).abs().max() < 0.005
    assert ((var - VAR).abs() / VAR).max() < 0.05


@pytest.mark.parametrize("objective,sampler", [("eps", "ddim"), ("flow", "euler")])
def test_first_order_samplers_converge_to_the_data_variance(objective, sampler):
    """The variance error of a first-order sampler halves when the steps double, so its limit is VAR:
    the Richardson extrapolation 2·var(128) - var(64) is within 1% of VAR. Step counts that do not
    divide 1000 are covered: they broke diffusers' DDIMScheduler (see Diffusion.scheduler)."""
    _, var_64 = moments(toy_sample(objective, sampler, 64))
    _, var_128 = moments(toy_sample(objective, sampler, 128))
    ratio = (var_128 - VAR) / (var_64 - VAR)
    assert ((ratio - 0.5).abs() < 0.1).all()
    assert (((2 * var_128 - var_64) - VAR).abs() / VAR).max() < 0.01


@pytest.mark.parametrize("objective,sampler", [("eps", "dpm++"), ("flow", "euler")])
def test_toy_check_rejects_a_wrong_denoiser(objective, sampler):
    """Control: the same checks fail for the exact denoiser of slightly different data, N(MU + 0.1, 1.2·VAR),
    and for the right data in the wrong parameterisation."""
    mean, var = moments(toy_sample(objective, sampler, 200, mu=MU + 0.1, var=1.2 * VAR))
    assert (mean - terminal_mean(objective)).abs().min() > 0.05
    assert ((var - VAR).abs() / VAR).min() > 0.1
    wrong = "v" if objective == "eps" else "eps"
    mean, var = moments(toy_sample(objective, sampler, 200, predicts=wrong))
    assert (mean - MU).abs().max() > 0.05 or ((var - VAR).abs() / VAR).max() > 0.05


def test_ddim_equals_diffusers_ddim_where_that_is_consistent():
    """Our "ddim" (first-order DPM-Solver++) takes the same steps as diffusers' DDIMScheduler (η = 0, ending
    on ᾱ = 1) when the step count divides 1000, for eps and v."""
    for objective in ("eps", "v"):
        d = Diffusion(DiffusionConfig(objective=objective))
        denoise = analytic_denoiser(d)
        x = torch.randn(64, 1, 4, 1, 1, generator=torch.Generator().manual_seed(1))
        ddim = DDIMScheduler.from_config(d.ddpm.config, timestep_spacing="trailing", set_alpha_to_one=True)
        ddim.set_timesteps(25)
        expected = x
        for t in ddim.timesteps:
            expected = ddim.step(denoise(expected, t.float().expand(64), None, None), t, expected).prev_sample
        got = d.sample(denoise, x.shape, "ddim", 25, noise=x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# -- parameterisation conversions -------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_conversions_agree_with_the_definitions(objective):
    """From any parameterisation to any other (round trips included), at early, middle and late t."""
    d = Diffusion(DiffusionConfig(objective=objective))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    t = torch.tensor([0, 10, 500, 990]) if objective != "flow" else torch.tensor([0.5, 10.0, 500.0, 990.0])
    a, b = scales(d, t, 3)
    xt = a * x0 + b * eps
    defs = definitions(x0, eps, a, b)
    for source, to in itertools.product(PARAMETERISATIONS, PARAMETERISATIONS):
        got = d.convert(defs[source], xt, t, to, source)
        torch.testing.assert_close(got, defs[to], atol=2e-4, rtol=1e-4, msg=f"{source} -> {to}")
    torch.testing.assert_close(d.convert(defs[PREDICTS[objective]], xt, t, "x0"), x0, atol=2e-4, rtol=1e-4)


def test_eps_and_v_targets_match_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    for objective in ("eps", "v"):
        d = Diffusion(DiffusionConfig(objective=objective))
        xt, target = d.noise_and_target(x0, noise, t)
        torch.testing.assert_close(xt, d.ddpm.add_noise(x0, noise, t))
        torch.testing.assert_close(target, noise if objective == "eps" else d.ddpm.get_velocity(x0, noise, t))
        torch.testing.assert_close(d.convert(noise, xt, t, "v", "eps"), d.ddpm.get_velocity(x0, noise, t))


@pytest.mark.parametrize("objective,prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_conversions_agree_with_diffusers_ddim_and_ddpm_steps(objective, prediction_type):
    """For an arbitrary model output, DDIMScheduler.step's x0 and its η = 0 update, and DDPMScheduler.step's
    x0, equal ours from `convert`."""
    d = Diffusion(DiffusionConfig(objective=objective))
    ddim = DDIMScheduler.from_config(d.ddpm.config, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(10)  # stride 100 divides 1000: DDIM's own previous timestep is right
    ddpm = DDPMScheduler.from_config(d.ddpm.config)
    assert ddim.config.prediction_type == ddpm.config.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    for t in ddim.timesteps:
        xt, pred = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
        tt = t.expand(2)
        x0_hat, eps_hat = d.convert(pred, xt, tt, "x0"), d.convert(pred, xt, tt, "eps")
        out = ddim.step(pred, t, xt)
        torch.testing.assert_close(out.pred_original_sample, x0_hat, atol=1e-4, rtol=1e-4)
        prev = int(t) - 100
        alpha_bar = d.ddpm.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        torch.testing.assert_close(out.prev_sample, alpha_bar.sqrt() * x0_hat + (1 - alpha_bar).sqrt() * eps_hat,
                                   atol=1e-4, rtol=1e-4)
        ddpm_x0 = ddpm.step(pred, t, xt, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(ddpm_x0, x0_hat, atol=1e-4, rtol=1e-4)


def test_flow_conversions_agree_with_flow_match_euler():
    """FlowMatchEulerDiscreteScheduler's forward process equals our x_t, and each of its Euler steps
    σ -> σ' equals (1-σ')·x0_hat + σ'·eps_hat from `convert` (Euler is DDIM for rectified flow)."""
    d = Diffusion(DiffusionConfig(objective="flow"))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        xt, target = d.noise_and_target(x0, noise, t.view(1))
        torch.testing.assert_close(xt, scheduler.scale_noise(x0, t.view(1), noise))
        torch.testing.assert_close(target, noise - x0)
        pred = torch.randn(1, 3, 4, generator=g)
        next_sigma = scheduler.sigmas[i + 1]
        expected = (1 - next_sigma) * d.convert(pred, xt, t.view(1), "x0") + next_sigma * d.convert(pred, xt, t.view(1), "eps")
        torch.testing.assert_close(scheduler.step(pred, t, xt).prev_sample, expected, atol=1e-5, rtol=1e-5)


def test_flow_target_and_interpolation():
    d = Diffusion(DiffusionConfig(objective="flow"))
    x0, noise = torch.ones(2, 3), torch.full((2, 3), -1.0)
    xt, target = d.noise_and_target(x0, noise, torch.tensor([0.0, 250.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], torch.full((3,), 0.5))  # 0.75·1 + 0.25·(-1)
    torch.testing.assert_close(target, noise - x0)


def test_noise_and_target_keep_the_input_dtype():
    d = Diffusion(DiffusionConfig(objective="v"))
    x0 = torch.randn(2, 3, dtype=torch.bfloat16)
    xt, target = d.noise_and_target(x0, torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([3, 700]))
    assert xt.dtype == target.dtype == torch.bfloat16


# -- min-SNR-γ loss weighting -----------------------------------------------------------------

def test_snr_matches_diffusers_compute_snr():
    d = Diffusion(DiffusionConfig(objective="eps"))
    t = torch.arange(0, 1000, 37)
    torch.testing.assert_close(d.snr(t), compute_snr(d.ddpm, t))
    flow = Diffusion(DiffusionConfig(objective="flow"))
    torch.testing.assert_close(flow.snr(torch.tensor([250.0, 500.0])), torch.tensor([9.0, 1.0]))


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_follow_the_paper(gamma):
    """eps: min(SNR, γ)/SNR and v: min(SNR, γ)/(SNR+1), as diffusers' training scripts apply them to
    compute_snr; flow: min(SNR, γ)·σ²."""
    t = torch.arange(0, 1000, 37)
    for objective, divide in (("eps", lambda s: s), ("v", lambda s: s + 1)):
        d = Diffusion(DiffusionConfig(objective=objective, loss_weighting="min_snr", min_snr_gamma=gamma))
        snr = compute_snr(d.ddpm, t)
        torch.testing.assert_close(d.loss_weights(t), snr.clamp(max=gamma) / divide(snr))
    d = Diffusion(DiffusionConfig(objective="flow", loss_weighting="min_snr", min_snr_gamma=gamma))
    sigma = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 0.999])
    snr = ((1 - sigma) / sigma) ** 2
    torch.testing.assert_close(d.loss_weights(sigma * 1000), snr.clamp(max=gamma) * sigma**2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weight_turns_every_objective_into_the_min_snr_x0_loss(objective):
    """The point of the weights: weight·|pred - target|² = min(SNR, γ)·|x0_hat - x0|² for a prediction whose
    x0 is off by Δ, whatever the objective; and every weight is finite and in [0, 1]."""
    d = Diffusion(DiffusionConfig(objective=objective, loss_weighting="min_snr"))
    g = torch.Generator().manual_seed(0)
    x0, eps, delta = (torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 40, 150, 400, 700, 990])
    a, b = scales(d, t, 2)
    xt = a * x0 + b * eps
    kind = PREDICTS[objective]
    target = definitions(x0, eps, a, b)[kind]
    off = x0 + delta
    pred = definitions(off, (xt - a * off) / b, a, b)[kind]  # the prediction at the same x_t whose x0 is off
    snr = (a / b).square().view(-1)
    weighted = d.loss_weights(t).double() * (pred - target).square().mean(1)
    torch.testing.assert_close(weighted, snr.clamp(max=5.0) * delta.square().mean(1), rtol=1e-4, atol=1e-6)
    edge = d.loss_weights(torch.tensor([0, 999]) if objective != "flow" else torch.tensor([0.0, 999.9]))
    assert torch.isfinite(edge).all() and (edge >= 0).all() and (edge <= 1).all()


def test_loss_is_mse_without_weighting_and_weighted_per_sample_with_min_snr():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    t = torch.tensor([5, 200, 600, 950])
    plain = Diffusion(DiffusionConfig(objective="eps"))
    torch.testing.assert_close(plain.loss(pred, target, t), torch.nn.functional.mse_loss(pred, target))
    assert torch.equal(plain.loss_weights(t), torch.ones(4))
    weighted = Diffusion(DiffusionConfig(objective="eps", loss_weighting="min_snr"))
    per_sample = (pred - target).square().mean((1, 2))
    torch.testing.assert_close(weighted.loss(pred, target, t), (per_sample * weighted.loss_weights(t)).mean())
    assert weighted.loss_weights(t)[0] < 0.01 and weighted.loss_weights(t)[-1] == 1.0  # low noise down-weighted


# -- guidance, dropout, timesteps, seeds --------------------------------------------------------

def test_guidance_scale_one_is_the_conditional_prediction():
    calls = []

    def model(x, t, drop_ref, drop_audio):
        calls.append(x.shape[0])
        return x * 2 + drop_ref.float().view(-1, 1) * 10 + drop_audio.float().view(-1, 1) * 100

    x, t = torch.randn(2, 3), torch.ones(2)
    assert torch.equal(Diffusion.guided(model, x, t, 1.0, 1.0), x * 2)  # exact, one unguided call
    # separate scales: u + s_ref (c_ref - u) + s_audio (c_full - c_ref)
    u, c_ref, c_full = x * 2 + 110, x * 2 + 100, x * 2
    expected = u + 1.5 * (c_ref - u) + 3.0 * (c_full - c_ref)
    torch.testing.assert_close(Diffusion.guided(model, x, t, 3.0, 1.5), expected)
    assert calls == [2, 6]  # the guided call batches its three predictions
    # the same formula at scales 1 reduces to c_full
    torch.testing.assert_close(u + 1.0 * (c_ref - u) + 1.0 * (c_full - c_ref), c_full)
    # a model that ignores its conditions is unchanged by any guidance
    torch.testing.assert_close(Diffusion.guided(lambda x, t, r, a: x * 2, x, t, 4.0, 2.5), x * 2)


def test_dropout_masks_follow_the_configured_odds():
    d = Diffusion(DiffusionConfig(audio_dropout=0.2, ref_dropout=0.1, both_dropout=0.1))
    drop_ref, drop_audio = d.dropout_masks(100_000, torch.Generator().manual_seed(0))
    assert abs((drop_ref & drop_audio).float().mean().item() - 0.1) < 0.01
    assert abs((drop_audio & ~drop_ref).float().mean().item() - 0.2) < 0.01
    assert abs((drop_ref & ~drop_audio).float().mean().item() - 0.1) < 0.01
    assert abs((~drop_ref & ~drop_audio).float().mean().item() - 0.6) < 0.01
    drop_ref, drop_audio = Diffusion(DiffusionConfig(audio_dropout=0, ref_dropout=0, both_dropout=0)).dropout_masks(1000)
    assert not drop_ref.any() and not drop_audio.any()
    drop_ref, drop_audio = Diffusion(DiffusionConfig(audio_dropout=0, ref_dropout=0, both_dropout=1)).dropout_masks(1000)
    assert drop_ref.all() and drop_audio.all()


def test_timestep_sampling_ranges():
    for objective in ("eps", "flow"):
        for sampling in ("uniform", "logit_normal"):
            d = Diffusion(DiffusionConfig(objective=objective, timestep_sampling=sampling))
            t = d.sample_timesteps(10_000, torch.Generator().manual_seed(0))
            assert t.min() >= 0 and t.max() < 1000
            assert (t.dtype == torch.long) == (objective == "eps")
    ln = Diffusion(DiffusionConfig(timestep_sampling="logit_normal")).sample_timesteps(10_000)
    assert ((ln > 250) & (ln < 750)).float().mean() > 0.6  # mass concentrated mid-range


@pytest.mark.parametrize("objective,sampler", COMBOS)
def test_fixed_seed_gives_the_same_sample(objective, sampler):
    """Same seed, same sample (bit for bit); another seed, another sample; passing the seed's noise
    (as generation does) equals passing the generator."""
    d = Diffusion(DiffusionConfig(objective=objective))
    den = analytic_denoiser(d)
    shape = (2, 1, 4, 1, 1)

    def draw(seed):
        return d.sample(den, shape, sampler, steps=5, audio_scale=2.0, ref_scale=1.5,
                        generator=torch.Generator().manual_seed(seed))

    a, b = draw(3), draw(3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, draw(4))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d.sample(den, shape, sampler, 5, 2.0, 1.5, noise=noise), a)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="objective must be one of"):
        Diffusion(DiffusionConfig(objective="x0"))
    with pytest.raises(ValueError, match="does not fit objective"):
        Diffusion(DiffusionConfig(objective="flow")).scheduler("ddim", 10)
    with pytest.raises(ValueError, match="sum to <= 1"):
        Diffusion(DiffusionConfig(audio_dropout=0.9, ref_dropout=0.2))
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        Diffusion(DiffusionConfig(loss_weighting="snr"))
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        Diffusion(DiffusionConfig(min_snr_gamma=0.0))
    with pytest.raises(ValueError, match="parameterisation must be one of"):
        Diffusion(DiffusionConfig()).convert(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), "score")


def test_config_from_an_older_checkpoint_gets_the_new_defaults():
    old = {"objective": "v", "num_train_timesteps": 1000, "beta_schedule": "linear", "timestep_sampling": "uniform",
           "audio_dropout": 0.1, "ref_dropout": 0.05, "both_dropout": 0.05}
    config = Diffusion(DiffusionConfig(**old)).config
    assert config.loss_weighting == "none" and config.min_snr_gamma == 5.0
    assert DiffusionConfig(**config.to_dict()) == config


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_x0_network_output_becomes_the_objectives_target(objective):
    """network_output x0: the true x0 as output gives the exact training target (above the noise floor), and a
    network that always answers x0 = c makes every sampler end on c."""
    diffusion = Diffusion(DiffusionConfig(objective=objective, network_output="x0"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = torch.linspace(100, 900, 64)
    xt, target = diffusion.noise_and_target(x0, noise, t)
    torch.testing.assert_close(diffusion.from_network(x0, xt, t), target, rtol=1e-4, atol=1e-4)
    native = Diffusion(DiffusionConfig(objective=objective))
    assert native.from_network(x0, xt, t) is x0
    c = torch.full((2, 3), 0.7)
    for sampler in SAMPLERS[objective]:
        out = diffusion.sample(lambda x, t, dr, da: c.expand_as(x), (2, 3), sampler, steps=5, generator=g)
        torch.testing.assert_close(out, c, rtol=0, atol=5e-3)  # flow: the scheduler's σ grid differs by ~1e-3
