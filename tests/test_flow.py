"""Flow matching: path direction, band-progressive schedule, loss, ODE samplers against a closed-form velocity
field, guidance, time shift and sampling, and the diffusers scheduler."""

import math

import numpy as np
import pytest
import torch

from uae_gen.flow import (
    BandSchedule,
    FlowMatchBandScheduler,
    autoguidance,
    classifier_free_guidance,
    dimension_shift,
    flow_matching_loss,
    guided_velocity_fn,
    interpolate,
    rk4_step,
    sample_ode,
    sample_time,
    shift_time,
    shifted_time_grid,
    velocity_target,
)
from uae_gen.models.bands import BandProjector, DCTBandTransform

SHAPE = (1, 4, 4)  # C, h, w of the toy latent
DIM = 16
NUM_BANDS = 3


@pytest.fixture(scope="module")
def split_bands():
    return BandProjector(SHAPE[1], SHAPE[2], num_bands=NUM_BANDS, transform="fft").split


def finite_difference(fn, t, h=1e-5):
    return (fn(t + h) - fn(t - h)) / (2 * h)


# --------------------------------------------------------------------------------------------------------------
# Path direction, band schedule, loss
# --------------------------------------------------------------------------------------------------------------


def test_plain_path_direction_and_velocity():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 4, *SHAPE, generator=g, dtype=torch.float64)
    assert torch.equal(interpolate(x, noise, torch.zeros(4, dtype=torch.float64)), x)
    assert torch.equal(interpolate(x, noise, torch.ones(4, dtype=torch.float64)), noise)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    derivative = finite_difference(lambda s: interpolate(x, noise, s), t)
    torch.testing.assert_close(derivative, velocity_target(x, noise), rtol=0, atol=1e-8)
    torch.testing.assert_close(velocity_target(x, noise), noise - x)


@pytest.mark.parametrize("ramp", ["smooth", "linear"])
def test_band_times_are_staggered_ramps(ramp):
    schedule = BandSchedule(num_bands=4, stagger=0.6, ramp=ramp)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    times = schedule.band_times(t)
    assert torch.equal(times[0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(times[-1], torch.ones(4, dtype=torch.float64))
    assert (times.diff(dim=0) >= 0).all()  # each g_k monotone
    assert (times.diff(dim=1) >= 0).all()  # lower bands are never noisier: band 0 is cleaned first
    offsets = schedule.band_offsets(dtype=torch.float64)
    torch.testing.assert_close(offsets, torch.tensor([0.6, 0.4, 0.2, 0.0], dtype=torch.float64))
    # band 0 is clean from t = stagger down, the highest band runs on the global clock
    assert torch.all(times[t <= 0.6, 0] == 0) and torch.all(times[t > 0.6, 0] > 0)
    torch.testing.assert_close(times[:, 3], t)
    # the rates are the derivatives of the ramps (away from the linear ramps' kinks at 0.2, 0.4, 0.6)
    s = torch.tensor([0.1, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64)
    torch.testing.assert_close(finite_difference(schedule.band_times, s), schedule.band_rates(s), atol=1e-8, rtol=0)
    # at the start of band 0's ramp the smooth rate is continuous (0), the linear one jumps to 1 / (1 - 0.6)
    rate = schedule.band_rates(torch.tensor([0.6 + 1e-6], dtype=torch.float64))[0, 0].item()
    assert rate < 1e-4 if ramp == "smooth" else rate == pytest.approx(2.5)


@pytest.mark.parametrize("ramp", ["smooth", "linear"])
def test_band_schedule_direction_and_velocity(split_bands, ramp):
    schedule = BandSchedule(num_bands=NUM_BANDS, stagger=0.5, ramp=ramp)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 4, *SHAPE, generator=g, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(schedule.interpolate(x, noise, 0 * ones, split_bands), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(schedule.interpolate(x, noise, ones, split_bands), noise, atol=1e-12, rtol=0)
    # the definition: sum_k (1 - t_k) x_k + t_k eps_k with x_k, eps_k the bands of x and of the white noise
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    t_k = schedule.band_times(t)[:, :, None, None, None]
    expected = ((1 - t_k) * split_bands(x) + t_k * split_bands(noise)).sum(1)
    torch.testing.assert_close(schedule.interpolate(x, noise, t, split_bands), expected, atol=1e-6, rtol=0)
    assert (schedule.interpolate(x, noise, t, split_bands) - interpolate(x, noise, t)).abs().max() > 0.1
    # kinks at 0.5 and 0.25 avoided
    derivative = finite_difference(lambda s: schedule.interpolate(x, noise, s, split_bands), t)
    target = schedule.velocity_target(x, noise, t, split_bands)
    torch.testing.assert_close(derivative, target, atol=1e-7, rtol=0)


def test_uniform_band_schedule_is_plain_flow_matching(split_bands):
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(2, 5, *SHAPE, generator=g)
    t = torch.rand(5, generator=g)
    schedule = BandSchedule(num_bands=NUM_BANDS, stagger=0.0)
    assert torch.equal(schedule.band_times(t), t[:, None].expand(5, NUM_BANDS))
    assert torch.equal(schedule.interpolate(x, noise, t, split_bands), interpolate(x, noise, t))
    assert torch.equal(schedule.velocity_target(x, noise, t, split_bands), velocity_target(x, noise))


def test_shifted_clocks_move_each_band_at_rate_one_in_its_window(split_bands):
    schedule = BandSchedule(num_bands=NUM_BANDS, stagger=0.4, clock="shifted")
    assert schedule.horizon == pytest.approx(1.4) and schedule.num_model_times == NUM_BANDS
    tau = torch.tensor([1.4, 1.2, 0.9, 0.3, 0.1, 0.0], dtype=torch.float64)
    expected = (tau[:, None] - torch.tensor([0.4, 0.2, 0.0], dtype=torch.float64)).clamp(0, 1)
    torch.testing.assert_close(schedule.band_times(tau), expected, rtol=0, atol=1e-12)
    # band 0 moves in (0.4, 1.4], the highest band in (0, 1]; rate 1 inside, 0 outside
    torch.testing.assert_close(schedule.band_rates(tau), ((expected > 0) & (tau[:, None] - torch.tensor(
        [0.4, 0.2, 0.0], dtype=torch.float64) <= 1)).double())
    assert schedule.band_window(0) == pytest.approx((0.4, 1.4)) and schedule.band_window(2) == pytest.approx((0, 1))
    g = torch.Generator().manual_seed(5)
    x, noise = torch.randn(2, 6, *SHAPE, generator=g, dtype=torch.float64)
    t_k = schedule.band_times(tau)[:, :, None, None, None]
    path = ((1 - t_k) * split_bands(x) + t_k * split_bands(noise)).sum(1)
    torch.testing.assert_close(schedule.interpolate(x, noise, tau, split_bands), path, atol=1e-6, rtol=0)
    inner = torch.tensor([1.3, 1.1, 0.7, 0.3, 0.1], dtype=torch.float64)  # away from the window edges
    derivative = finite_difference(lambda s: schedule.interpolate(x[:5], noise[:5], s, split_bands), inner)
    torch.testing.assert_close(schedule.velocity_target(x[:5], noise[:5], inner, split_bands), derivative,
                               atol=1e-7, rtol=0)
    # drift masking: a band outside its window keeps none of the model's velocity
    velocity = torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    rates = schedule.band_rates(tau)[:, :, None, None, None]
    masked = (rates * split_bands(velocity)).sum(1)
    torch.testing.assert_close(schedule.mask_drift(velocity, tau, split_bands), masked, atol=1e-6, rtol=0)
    # at the start only band 0 moves; at tau = 0 nothing does
    torch.testing.assert_close(masked[0], split_bands(velocity)[0, 0], atol=0, rtol=0)
    assert masked[-1].abs().max() == 0
    assert schedule.time_grid(5, dtype=torch.float64)[0] == pytest.approx(1.4)


def test_shifted_clocks_without_offsets_are_plain_flow_matching(split_bands):
    g = torch.Generator().manual_seed(6)
    x, noise, velocity = torch.randn(3, 5, *SHAPE, generator=g)
    t = torch.rand(5, generator=g)
    shifted, plain = BandSchedule(num_bands=NUM_BANDS, clock="shifted", shift=2.0), BandSchedule(shift=2.0)
    assert shifted.num_model_times == 1 and shifted.horizon == 1.0
    assert torch.equal(shifted.model_times(t), t) and torch.equal(shifted.mask_drift(velocity, t, split_bands), velocity)
    assert torch.equal(shifted.interpolate(x, noise, t, split_bands), interpolate(x, noise, t))
    assert torch.equal(shifted.velocity_target(x, noise, t, split_bands), velocity_target(x, noise))
    assert torch.equal(shifted.time_grid(11), plain.time_grid(11))
    assert torch.equal(shifted.sample_time(7, generator=torch.Generator().manual_seed(1)),
                       plain.sample_time(7, generator=torch.Generator().manual_seed(1)))


def test_band0_loss_weight(split_bands):
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    labels = torch.arange(4)
    zero = lambda x_t, t, y: torch.zeros_like(x_t)  # noqa: E731: the residual is minus the target
    schedule = BandSchedule(num_bands=NUM_BANDS)
    plain = flow_matching_loss(zero, x, labels, schedule, generator=torch.Generator().manual_seed(8))
    same = flow_matching_loss(zero, x, labels, schedule, split_bands, generator=torch.Generator().manual_seed(8),
                              band0_weight=1.0)
    assert torch.equal(plain.per_sample_loss, same.per_sample_loss)
    weighted = flow_matching_loss(zero, x, labels, schedule, split_bands, generator=torch.Generator().manual_seed(8),
                                  band0_weight=2.0)
    replay = torch.Generator().manual_seed(8)
    t = schedule.sample_time(4, generator=replay).double()
    target = schedule.velocity_target(x, torch.randn(x.shape, generator=replay, dtype=x.dtype), t, split_bands)
    residual = -target + (math.sqrt(2.0) - 1) * split_bands(-target)[:, 0]
    torch.testing.assert_close(weighted.per_sample_loss.double(), residual.pow(2).flatten(1).mean(1))
    assert (weighted.loss - plain.loss).abs() > 1e-3
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="band0_weight must be positive"):
            flow_matching_loss(zero, x, labels, schedule, split_bands, band0_weight=bad)


def test_band_schedule_rejects_bad_input(split_bands):
    with pytest.raises(ValueError, match="stagger"):
        BandSchedule(num_bands=3, stagger=1.0)
    with pytest.raises(ValueError, match="num_bands"):
        BandSchedule(num_bands=0)
    with pytest.raises(ValueError, match="ramp"):
        BandSchedule(num_bands=3, stagger=0.5, ramp="cosine")
    with pytest.raises(ValueError, match="clock must be one of .*'sliding'"):
        BandSchedule(num_bands=3, stagger=0.5, clock="sliding")
    with pytest.raises(ValueError, match="stagger must lie in \\[0, 1\\), got -0.1"):
        BandSchedule(num_bands=3, stagger=-0.1, clock="shifted")
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="split_bands"):
        BandSchedule(num_bands=3, stagger=0.5).interpolate(x, x, torch.ones(2))
    with pytest.raises(ValueError, match=r"\(B, 4"):
        BandSchedule(num_bands=4, stagger=0.5).interpolate(x, x, torch.ones(2), split_bands)


@pytest.mark.parametrize("stagger", [0.0, 0.5])
def test_loss_is_zero_for_the_exact_velocity(split_bands, stagger):
    schedule = BandSchedule(num_bands=NUM_BANDS, stagger=stagger, shift=2.0)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.arange(8)
    # replay the loss's draws (t first, then the noise) to build an oracle model
    replay = torch.Generator().manual_seed(4)
    t = schedule.sample_time(8, generator=replay).double()
    noise = torch.randn(x.shape, generator=replay, dtype=x.dtype)
    target = schedule.velocity_target(x, noise, t, split_bands)

    def oracle(x_t, t_in, y):
        torch.testing.assert_close(t_in, t)
        torch.testing.assert_close(x_t, schedule.interpolate(x, noise, t, split_bands))
        assert torch.equal(y, labels)
        return target

    out = flow_matching_loss(oracle, x, labels, schedule, split_bands, generator=torch.Generator().manual_seed(4))
    assert out.loss.item() < 1e-10
    # a model predicting zeros pays the mean squared target, per sample then over the batch
    zero = flow_matching_loss(
        lambda x_t, t_in, y: torch.zeros_like(x_t), x, labels, schedule, split_bands,
        generator=torch.Generator().manual_seed(4),
    )
    per_sample = target.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(zero.per_sample_loss, per_sample.float())
    torch.testing.assert_close(zero.loss, per_sample.mean().float())
    assert ((zero.timesteps >= 0) & (zero.timesteps <= shift_time(torch.tensor(0.999), 2.0))).all()


# --------------------------------------------------------------------------------------------------------------
# Samplers against the exact marginal velocity of a Gaussian mixture
# --------------------------------------------------------------------------------------------------------------


class GaussianMixture:
    """Two full-covariance Gaussians in R^DIM with weights 0.3 / 0.7 (float64)."""

    def __init__(self):
        g = torch.Generator().manual_seed(10)
        self.direction = torch.randn(DIM, generator=g, dtype=torch.float64)
        self.direction /= self.direction.norm()
        self.weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
        self.means = torch.stack([2.0 * self.direction, -1.0 * self.direction])
        factors = torch.randn(2, DIM, DIM, generator=g, dtype=torch.float64) / math.sqrt(DIM)
        self.covs = 0.2 * factors @ factors.transpose(1, 2) + 0.05 * torch.eye(DIM, dtype=torch.float64)

    @property
    def mean(self):
        return self.weights @ self.means

    @property
    def cov(self):
        second = sum(w * (c + torch.outer(m, m)) for w, m, c in zip(self.weights, self.means, self.covs))
        return second - torch.outer(self.mean, self.mean)


def band_matrices(split_bands, num_bands):
    """P_k (K, DIM, DIM) with band_k(z).flatten() = P_k z.flatten(): the split applied to the identity basis."""
    if num_bands == 1:
        return torch.eye(DIM, dtype=torch.float64)[None]
    basis = torch.eye(DIM, dtype=torch.float64).reshape(DIM, *SHAPE)
    return split_bands(basis).reshape(DIM, num_bands, DIM).permute(1, 2, 0)


class ExactVelocity:
    """E[dx_t/dt | x_t] for x_t = A(t) x + B(t) eps, x ~ mixture, in closed form (Gaussian conditioning)."""

    def __init__(self, mixture, schedule, projectors):
        self.mixture, self.schedule, self.projectors = mixture, schedule, projectors

    def matrices(self, t):
        times = self.schedule.band_times(t.reshape(1).double())[0]
        rates = self.schedule.band_rates(t.reshape(1).double())[0]
        P = self.projectors
        a = torch.einsum("k,kij->ij", 1 - times, P)
        b = torch.einsum("k,kij->ij", times, P)
        rate = torch.einsum("k,kij->ij", rates, P)
        return a, b, -rate, rate  # A, B, dA/dt, dB/dt

    def __call__(self, x, t):
        a, b, da, db = self.matrices(t[0])
        flat = x.reshape(x.shape[0], DIM)
        log_probs, means = [], []
        for w, m, s in zip(self.mixture.weights, self.mixture.means, self.mixture.covs):
            cov_xt = a @ s @ a.T + b @ b.T
            cov_u_xt = da @ s @ a.T + db @ b.T
            diff = flat - a @ m
            solved = torch.linalg.solve(cov_xt, diff.T).T
            log_probs.append(w.log() - 0.5 * torch.logdet(cov_xt) - 0.5 * (diff * solved).sum(1))
            means.append(da @ m + solved @ cov_u_xt.T)
        posterior = torch.softmax(torch.stack(log_probs, 1), dim=1)
        return (posterior[:, :, None] * torch.stack(means, 1)).sum(1).reshape(x.shape)


NUM_SAMPLES = 4000
# Monte-Carlo error at 4000 samples sets the tolerances (measured on exact mixture samples and converged solvers):
MEAN_TOL = 0.08  # max abs error of the mean; one coordinate's standard error is <= 0.013, measured 0.016-0.027
COV_TOL = 0.08  # relative Frobenius error of the covariance, measured 0.036-0.042; 2-step solvers give 0.3-0.8
WEIGHT_TOL = 0.03  # fraction in the 0.3 component; binomial standard error 0.007


def sample_statistics(samples, mixture):
    flat = samples.reshape(samples.shape[0], DIM)
    mean_error = (flat.mean(0) - mixture.mean).abs().max().item()
    cov_error = ((torch.cov(flat.T) - mixture.cov).norm() / mixture.cov.norm()).item()
    # the mixture components lie at +2 and -1 along `direction`: split at the midpoint
    weight = ((flat @ mixture.direction) > 0.5).double().mean().item()
    return mean_error, cov_error, weight


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture()


@pytest.fixture(scope="module")
def start_noise():
    return torch.randn(NUM_SAMPLES, *SHAPE, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def test_exact_mixture_statistics_are_within_tolerance(mixture):
    """The tolerances admit a true sample of the mixture (so sampler failures are not Monte-Carlo noise)."""
    g = torch.Generator().manual_seed(12)
    component = (torch.rand(NUM_SAMPLES, generator=g, dtype=torch.float64) >= 0.3).long()  # 0 with weight 0.3
    chol = torch.linalg.cholesky(mixture.covs)[component]
    samples = mixture.means[component] + (chol @ torch.randn(NUM_SAMPLES, DIM, 1, generator=g).double())[..., 0]
    mean_error, cov_error, weight = sample_statistics(samples, mixture)
    assert mean_error < 0.75 * MEAN_TOL and cov_error < 0.75 * COV_TOL and abs(weight - 0.3) < 0.75 * WEIGHT_TOL


SCHEDULES = {
    "uniform": BandSchedule(num_bands=1, shift=2.0),
    "bands_smooth": BandSchedule(num_bands=NUM_BANDS, stagger=0.6, ramp="smooth", shift=2.0),
    "bands_linear": BandSchedule(num_bands=NUM_BANDS, stagger=0.6, ramp="linear", shift=2.0),
    "bands_shifted": BandSchedule(num_bands=NUM_BANDS, stagger=0.6, shift=2.0, clock="shifted"),
}


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 30)])
def test_ode_sampler_reproduces_the_mixture(mixture, start_noise, split_bands, schedule_name, method, steps):
    schedule = SCHEDULES[schedule_name]
    velocity = ExactVelocity(mixture, schedule, band_matrices(split_bands, schedule.num_bands))
    # the matrices are the schedule's own path: x_t = A x + B eps and u = A' x + B' eps
    x, eps = start_noise[:4] + 1.0, start_noise[4:8]
    t = torch.tensor(0.7, dtype=torch.float64)
    a, b, da, db = velocity.matrices(t)
    flat = lambda z: z.reshape(4, DIM)
    torch.testing.assert_close(
        flat(schedule.interpolate(x, eps, t.expand(4), split_bands)),
        flat(x) @ a.T + flat(eps) @ b.T, atol=1e-5, rtol=0,
    )
    torch.testing.assert_close(
        flat(schedule.velocity_target(x, eps, t.expand(4), split_bands)),
        flat(x) @ da.T + flat(eps) @ db.T, atol=1e-5, rtol=0,
    )

    grid = schedule.time_grid(steps + 1, dtype=torch.float64)
    samples = sample_ode(velocity, start_noise, grid, method)
    mean_error, cov_error, weight = sample_statistics(samples, mixture)
    assert mean_error < MEAN_TOL, mean_error
    assert cov_error < COV_TOL, cov_error
    assert abs(weight - 0.3) < WEIGHT_TOL, weight
    # the same solver with 2 steps is measurably wrong: the check above can fail
    coarse_grid = schedule.time_grid(3, dtype=torch.float64)
    coarse = sample_statistics(sample_ode(velocity, start_noise, coarse_grid, method), mixture)
    assert coarse[1] > COV_TOL or abs(coarse[2] - 0.3) > WEIGHT_TOL


@pytest.mark.parametrize("schedule_name", ["uniform", "bands_smooth"])
def test_higher_order_solvers_converge_with_fewer_steps(mixture, start_noise, split_bands, schedule_name):
    schedule = SCHEDULES[schedule_name]
    velocity = ExactVelocity(mixture, schedule, band_matrices(split_bands, schedule.num_bands))
    x0 = start_noise[:500]
    reference = sample_ode(velocity, x0, schedule.time_grid(401, dtype=torch.float64), "rk4")
    grid = schedule.time_grid(21, dtype=torch.float64)
    errors = {m: (sample_ode(velocity, x0, grid, m) - reference).abs().mean() for m in ("euler", "heun", "rk4")}
    assert errors["rk4"] < errors["heun"] < errors["euler"]
    assert errors["rk4"] < 0.1 * errors["euler"]


def test_sample_ode_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        sample_ode(lambda x, t: x, torch.zeros(1), torch.tensor([1.0, 0.0]), "dopri5")
    with pytest.raises(ValueError, match="time_grid"):
        sample_ode(lambda x, t: x, torch.zeros(1), torch.tensor([1.0]))


# --------------------------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------------------------


class CountingModel:
    """v = x * (1 + label) + t, recording the batch size of every call."""

    def __init__(self, offset=0.0):
        self.batch_sizes, self.offset = [], offset

    def __call__(self, x, t, labels):
        self.batch_sizes.append(x.shape[0])
        return x * (1 + labels.view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1) + self.offset


NULL = 10


def guidance_inputs(t_value=0.5):
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(20))
    return x, torch.full((3,), t_value), torch.tensor([1, 4, 7])


def test_cfg_batches_cond_and_null_in_one_call():
    model = CountingModel()
    x, t, labels = guidance_inputs()
    v = classifier_free_guidance(model, x, t, labels, guidance_scale=3.0, null_class_id=NULL, interval=(0.2, 0.8))
    assert model.batch_sizes == [6]
    v_cond, v_uncond = model(x, t, labels), model(x, t, torch.full_like(labels, NULL))
    torch.testing.assert_close(v, v_uncond + 3.0 * (v_cond - v_uncond))


def test_cfg_scale_one_and_outside_interval_give_the_conditional_velocity():
    model = CountingModel()
    x, t, labels = guidance_inputs()
    v_cond = model(x, t, labels)
    model.batch_sizes.clear()
    assert torch.equal(classifier_free_guidance(model, x, t, labels, 1.0, NULL), v_cond)
    assert torch.equal(classifier_free_guidance(model, x, t, labels, 3.0, NULL, interval=(0.6, 1.0)), v_cond)
    # scale 1 skips the null batch (a host float); outside the interval is a mask on t, decided on the device
    # (skipping that forward is the caller's choice: UAEDiTPipeline.prepare_velocity_fns)
    assert model.batch_sizes == [3, 6]
    # a batch straddling the interval edge: guided where inside, conditional where outside
    t_mixed = torch.tensor([0.1, 0.5, 0.9])
    v = classifier_free_guidance(model, x, t_mixed, labels, 3.0, NULL, interval=(0.4, 0.95))
    v_cond, v_uncond = model(x, t_mixed, labels), model(x, t_mixed, torch.full_like(labels, NULL))
    torch.testing.assert_close(v[0], v_cond[0])
    torch.testing.assert_close(v[1:], (v_uncond + 3.0 * (v_cond - v_uncond))[1:])


def test_autoguidance():
    model, guide = CountingModel(), CountingModel(offset=0.25)
    x, t, labels = guidance_inputs()
    v = model(x, t, labels)
    assert torch.equal(autoguidance(model, model, x, t, labels, 1.42), v)
    v_guide = guide(x, t, labels)
    torch.testing.assert_close(autoguidance(model, guide, x, t, labels, 1.42), v_guide + 1.42 * (v - v_guide))
    assert torch.equal(autoguidance(model, guide, x, t, labels, 1.42, interval=(0.6, 1.0)), v)
    guide.batch_sizes.clear()
    assert torch.equal(autoguidance(model, guide, x, t, labels, 1.0), v)
    assert guide.batch_sizes == []  # weight 1: the guide is not called
    t_mixed = torch.tensor([0.1, 0.5, 0.9])
    v, v_guide = model(x, t_mixed, labels), guide(x, t_mixed, labels)
    mixed = autoguidance(model, guide, x, t_mixed, labels, 1.42, interval=(0.4, 0.95))
    torch.testing.assert_close(mixed[0], v[0])
    torch.testing.assert_close(mixed[1:], (v_guide + 1.42 * (v - v_guide))[1:])


@pytest.mark.parametrize("guidance", ["cfg", "autoguidance"])
def test_guidance_reads_no_tensor_on_the_host(monkeypatch, guidance):
    """The interval is applied as a mask: no bool(tensor) / .item() (each a device sync on an accelerator)."""
    model, guide = CountingModel(), CountingModel(offset=0.25)
    x, labels, t_mixed = guidance_inputs()[0], guidance_inputs()[2], torch.tensor([0.1, 0.5, 0.9])
    velocity = guided_velocity_fn(model, labels, 3.0, (0.4, 0.95), null_class_id=NULL,
                                  guide_fn=guide if guidance == "autoguidance" else None)
    expected = velocity(x, t_mixed)
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        probe = lambda self, *args, _n=name, _o=original: (reads.append(_n), _o(self, *args))[1]  # noqa: E731
        monkeypatch.setattr(torch.Tensor, name, probe)
    assert torch.equal(velocity(x, t_mixed), expected)
    bool(t_mixed[0] > 0)  # the probe itself works
    assert reads == ["__bool__"]


def test_guided_velocity_fn_binds_labels_and_guidance():
    model, guide = CountingModel(), CountingModel(offset=0.25)
    x, t, labels = guidance_inputs()
    cfg = guided_velocity_fn(model, labels, guidance_scale=2.0, null_class_id=NULL)
    torch.testing.assert_close(cfg(x, t), classifier_free_guidance(model, x, t, labels, 2.0, NULL))
    auto = guided_velocity_fn(model, labels, guidance_scale=2.0, guide_fn=guide)
    torch.testing.assert_close(auto(x, t), autoguidance(model, guide, x, t, labels, 2.0))
    with pytest.raises(ValueError, match="null_class_id"):
        guided_velocity_fn(model, labels, guidance_scale=2.0)


# --------------------------------------------------------------------------------------------------------------
# Time shift and time sampling
# --------------------------------------------------------------------------------------------------------------


def test_shift():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    assert dimension_shift(196608) == math.sqrt(48)
    assert dimension_shift(4096) == 1.0
    for alpha in (0.5, 2.0, math.sqrt(48)):
        shifted = shift_time(t, alpha)
        assert shifted[0] == 0 and shifted[-1] == 1
        assert ((shifted >= 0) & (shifted <= 1)).all() and (shifted.diff() > 0).all()
    assert (shift_time(t[1:-1], math.sqrt(48)) > t[1:-1]).all()  # alpha > 1 spends more time near the noise
    with pytest.raises(ValueError, match="latent_dim"):
        dimension_shift(0)


def test_official_time_grid():
    alpha = math.sqrt(48)
    grid = shifted_time_grid(50, alpha, dtype=torch.float64)
    s = 1 - np.linspace(0, 0.999, 50)
    np.testing.assert_allclose(grid.numpy(), alpha * s / (1 + (alpha - 1) * s), rtol=1e-12)
    assert grid[0] == 1.0 and abs(grid[-1].item() - 0.0069) < 1e-4  # method.md 3.4


def test_time_sampling():
    t = sample_time(20000, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 0.999
    assert abs(t.median().item() - 0.5) < 0.02
    logits = torch.logit(t / 0.999)
    assert abs(logits.std().item() - 1.0) < 0.03 and abs(logits.mean().item()) < 0.03
    again = sample_time(20000, "logit_normal", generator=torch.Generator().manual_seed(0))
    other = sample_time(20000, "logit_normal", generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again) and not torch.equal(t, other)
    u = sample_time(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 0.999 and abs(u.mean().item() - 0.4995) < 0.01
    with pytest.raises(ValueError, match="time distribution"):
        sample_time(4, "beta")


# --------------------------------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------------------------------


def test_scheduler_save_load_round_trip(tmp_path):
    scheduler = FlowMatchBandScheduler(
        latent_dim=196608, solver="rk4", num_bands=4, band_stagger=0.5, band_ramp="linear", final_time=0.99
    )
    assert scheduler.time_shift == math.sqrt(48)
    scheduler.save_pretrained(tmp_path)
    loaded = FlowMatchBandScheduler.from_pretrained(tmp_path)
    saved = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == saved
    assert saved["solver"] == "rk4" and saved["latent_dim"] == 196608 and saved["final_time"] == 0.99
    assert loaded.band_schedule == BandSchedule(num_bands=4, stagger=0.5, ramp="linear", shift=math.sqrt(48))
    scheduler.set_timesteps(49)
    loaded.set_timesteps(49)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    # 49 steps on the official 50-point grid
    assert len(scheduler.timesteps) == 49 and len(scheduler.time_grid) == 50
    torch.testing.assert_close(scheduler.time_grid, shifted_time_grid(50, math.sqrt(48), final_time=0.99))
    default = FlowMatchBandScheduler(latent_dim=196608)
    default.set_timesteps(49)
    torch.testing.assert_close(default.time_grid, shifted_time_grid(50, math.sqrt(48)))  # the official grid


def test_scheduler_rejects_bad_config():
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMatchBandScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="not both"):
        FlowMatchBandScheduler(shift=2.0, latent_dim=4096)
    with pytest.raises(ValueError, match="solver"):
        FlowMatchBandScheduler(solver="dpm")
    with pytest.raises(ValueError, match="set_timesteps"):
        FlowMatchBandScheduler().step(torch.zeros(1), 1.0, torch.zeros(1))


def test_scheduler_steps_match_sample_ode():
    model = CountingModel()
    labels = torch.tensor([0, 3])
    velocity = guided_velocity_fn(model, labels, guidance_scale=1.5, null_class_id=NULL)
    x_init = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(30))

    scheduler = FlowMatchBandScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    x = x_init
    for t in scheduler.timesteps:  # the diffusers loop: model output in, prev_sample out
        x = scheduler.step(velocity(x, t.expand(2)), t, x).prev_sample
    assert torch.equal(x, sample_ode(velocity, x_init, scheduler.time_grid, "euler"))
    with pytest.raises(ValueError, match="not on the grid"):
        scheduler.step(x, 0.123, x)

    heun = FlowMatchBandScheduler(shift=3.0, solver="heun")
    heun.set_timesteps(8)
    with pytest.raises(ValueError, match="solver_step"):
        heun.step(x, heun.timesteps[0], x)
    x = x_init
    for t in heun.timesteps:
        x = heun.solver_step(velocity, t, x).prev_sample
    assert torch.equal(x, sample_ode(velocity, x_init, heun.time_grid, "heun"))


def test_scheduler_counts_steps_after_set_begin_index(monkeypatch):
    """set_begin_index (as diffusers pipelines call it) replaces the per-step timestep lookup, a host sync."""
    model = CountingModel()
    velocity = guided_velocity_fn(model, torch.tensor([0, 3]), guidance_scale=1.5, null_class_id=NULL)
    x_init = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(31))
    scheduler = FlowMatchBandScheduler(shift=3.0, solver="rk4")
    scheduler.set_timesteps(5)
    assert scheduler.begin_index is None and scheduler.step_index is None
    expected = sample_ode(velocity, x_init, scheduler.time_grid, "rk4")

    def no_lookup(timestep):
        raise AssertionError("the timestep was looked up")

    monkeypatch.setattr(scheduler, "index_for_timestep", no_lookup)
    scheduler.set_begin_index(0)
    x = x_init
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.solver_step(velocity, t, x).prev_sample
        assert scheduler.step_index == i + 1
    assert torch.equal(x, expected)
    with pytest.raises(ValueError, match="past the 5 steps"):
        scheduler.solver_step(velocity, scheduler.timesteps[0], x)

    scheduler.set_begin_index(3)  # start part-way: the timestep argument is not read
    x = scheduler.solver_step(velocity, 1.0, x_init).prev_sample
    assert scheduler.step_index == 4
    assert torch.equal(x, rk4_step(velocity, x_init, scheduler.time_grid[3], scheduler.time_grid[4]))

    scheduler.set_timesteps(5)  # back to looking timesteps up
    assert scheduler.begin_index is None and scheduler.step_index is None
    with pytest.raises(AssertionError, match="looked up"):
        scheduler.solver_step(velocity, scheduler.timesteps[0], x_init)


def test_noise_projection_keeps_the_path_in_the_subspace():
    lowpass = DCTBandTransform(8, 8, cutoffs=[]).lowpass
    x = lowpass(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), 10)
    seen = {}

    def model(x_t, t, labels):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    out = flow_matching_loss(model, x, torch.zeros(4, dtype=torch.long), BandSchedule(),
                             generator=torch.Generator().manual_seed(1), noise_projection=lambda n: lowpass(n, 10))
    assert (lowpass(seen["x_t"], 10) - seen["x_t"]).abs().max() < 1e-5
    # Zero prediction: the loss is the target's energy, eps and x both inside the 10-coefficient subspace.
    full = flow_matching_loss(model, x, torch.zeros(4, dtype=torch.long), BandSchedule(),
                              generator=torch.Generator().manual_seed(1))
    assert out.loss < 0.5 * full.loss
