"""Flow matching on the UAE latent: path, time sampling, band-progressive schedule, loss, ODE samplers, guidance.

Direction (the official RAE/UAE code and diffusers' FlowMatchEulerDiscreteScheduler agree):

    x_t = (1 - t) x + t eps,    t = 1 is pure noise, t = 0 is data,    velocity target u = dx_t/dt = eps - x.

Sampling integrates dx/dt = v(x, t) from t = 1 down to t close to 0.

Band-progressive schedule. ``split_bands`` is any linear map (B, C, h, w) -> (B, K, C, h, w) whose bands sum
back to the input (``AutoencoderUAE.split_bands``). Band k runs on its own clock t_k = g_k(t):

    s_k = clamp((t - d_k) / (1 - d_k), 0, 1),   d_k = stagger * (K - 1 - k) / (K - 1),
    g_k = s_k^2 (2 - s_k)  ("smooth", default)   or   g_k = s_k  ("linear");   the highest band (d = 0): g = t.

g_k is monotone, g_k(0) = 0, g_k(1) = 1, and band k is clean for t <= d_k: integrating from noise to data, band 0
(semantics) is finished at t = stagger and the highest band last, at t = 0. With x_k, eps_k the bands of x and eps,

    x_t = sum_k (1 - t_k) x_k + t_k eps_k,    dx_t/dt = sum_k g_k'(t) (eps_k - x_k),

computed as the plain path plus sum_k (t_k - t)(eps_k - x_k) (the bands sum to the input), so stagger 0 IS plain
flow matching. Why "smooth": a linear ramp makes the velocity jump at t = d_k, which every ODE solver integrates
only to first order and a network smooth in t cannot fit; the smooth ramp starts with slope 0, so the target
velocity is continuous in t.

The dimension-dependent time shift t' = alpha t / (1 + (alpha - 1) t), alpha = sqrt(latent_dim / 4096), is applied
to the global t (training samples and the sampler grid) before the band ramps; the model sees the shifted t.

Shifted clocks (``clock="shifted"``, Semantic-First Diffusion's form): the clocks are shifted, not compressed. The
global time tau runs over [0, 1 + d_0] and band k has t_k = clamp(tau - d_k, 0, 1): every band moves at rate 1 inside
its own window (0 < tau - d_k <= 1) and stands still outside it, band 0 first. The model sees the K band times (one
time embedding each), and the sampler masks each band's drift outside its window, so a finished band stays put.
With all offsets 0 both clocks are plain flow matching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

Tensor = torch.Tensor
SplitBands = Callable[[Tensor], Tensor]  # (B, C, h, w) -> (B, K, C, h, w), bands summing to the input
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x, t of shape (B,)) -> v
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t of shape (B,), class_labels) -> v

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")
RAMPS = ("smooth", "linear")
BAND_CLOCKS = ("compressed", "shifted")


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample times (B,) to broadcast against a (B, ...) tensor."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# ---- The plain linear path ----


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t noise, with t of shape (B,)."""
    t = _per_sample(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """u = dx_t/dt = noise - x."""
    return noise - x


# ---- Time: training distribution, dimension-dependent shift, sampler grid ----


def sample_time(
    batch_size: int,
    distribution: str = "logit_normal",
    t_max: float = 0.999,
    mean: float = 0.0,
    std: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """Training times in [0, t_max] (official t1 = 0.999): sigmoid(N(mean, std)) or uniform, scaled by t_max."""
    if distribution == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, device=device))
    elif distribution == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device)
    else:
        raise ValueError(f"time distribution must be one of {TIME_DISTRIBUTIONS}, got {distribution!r}")
    return u * t_max


def dimension_shift(latent_dim: int, base_dim: int = 4096) -> float:
    """alpha = sqrt(latent_dim / base_dim); 768 x 16 x 16 = 196608 gives sqrt(48) (method.md 3.3)."""
    if latent_dim <= 0 or base_dim <= 0:
        raise ValueError(f"latent_dim and base_dim must be positive, got {latent_dim} and {base_dim}")
    return math.sqrt(latent_dim / base_dim)


def shift_time(t: Tensor, alpha: float) -> Tensor:
    """t' = alpha t / (1 + (alpha - 1) t): monotone, fixes 0 and 1, alpha > 1 moves mass toward noise."""
    return alpha * t / (1 + (alpha - 1) * t)


def shifted_time_grid(
    num_points: int, shift: float = 1.0, final_time: float = 0.999, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The official sampler grid shift(1 - linspace(0, final_time, N)): N points, 1 down to shift(1 - final_time)."""
    if num_points < 2:
        raise ValueError(f"a time grid needs at least 2 points (1 step), got {num_points}")
    t = 1 - torch.linspace(0, final_time, num_points, dtype=torch.float64)
    return shift_time(t, shift).to(device=device, dtype=dtype)


# ---- Band-progressive schedule (shared by training and sampling) ----


@dataclass(frozen=True)
class BandSchedule:
    """Staggered per-band noise clocks (see the module docstring) plus the global time shift.

    Args:
        num_bands: K, the number of bands ``split_bands`` returns.
        stagger: d_0 in [0, 1): band 0 is clean for t <= stagger. 0 = plain flow matching.
        ramp: "smooth" (C1 at the start of each ramp) or "linear" (clamped linear ramps).
        shift: alpha of the dimension-dependent time shift applied to sampled training times and the sampler grid.
        clock: "compressed" (band k's clock squeezed into [d_k, 1], the model sees the global t) or "shifted"
            (band k's clock is tau - d_k over a global time [0, 1 + d_0]; the model sees the K band times).
    """

    num_bands: int = 1
    stagger: float = 0.0
    ramp: str = "smooth"
    shift: float = 1.0
    clock: str = "compressed"

    def __post_init__(self):
        if self.num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {self.num_bands}")
        if not 0.0 <= self.stagger < 1.0:
            raise ValueError(f"stagger must lie in [0, 1), got {self.stagger}")
        if self.num_bands == 1 and self.stagger != 0.0:
            raise ValueError("a stagger needs at least 2 bands")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}, got {self.ramp!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.clock not in BAND_CLOCKS:
            raise ValueError(f"clock must be one of {BAND_CLOCKS}, got {self.clock!r}")

    @property
    def is_staggered(self) -> bool:
        return self.stagger > 0.0

    @property
    def horizon(self) -> float:
        """The global time runs from ``horizon`` (all noise) down to 0: 1 + d_0 for shifted clocks, else 1."""
        return 1.0 + self.stagger if self.clock == "shifted" else 1.0

    @property
    def num_model_times(self) -> int:
        """How many times the model is conditioned on: K band times for staggered shifted clocks, else 1."""
        return self.num_bands if self.clock == "shifted" and self.is_staggered else 1

    def band_offsets(self, device=None, dtype=torch.float32) -> Tensor:
        """d_k (K,): stagger for band 0 down to 0 for the highest band."""
        k = torch.arange(self.num_bands, device=device, dtype=torch.float64)
        fraction = (self.num_bands - 1 - k) / max(self.num_bands - 1, 1)
        return (self.stagger * fraction).to(dtype)

    def _ramp_position(self, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """s_k (B, K), ds_k/dt (B, K) and a mask (K,) of the bands on a smooth ramp."""
        d = self.band_offsets(t.device, t.dtype)
        s = ((t[:, None] - d) / (1 - d)).clamp(0.0, 1.0)
        ds = (t[:, None] >= d).to(t.dtype) / (1 - d)
        return s, ds, (d > 0) & (self.ramp == "smooth")

    def band_times(self, t: Tensor) -> Tensor:
        """t_k: (B,) -> (B, K); g_k(t) for compressed clocks, clamp(t - d_k, 0, 1) for shifted ones."""
        if self.clock == "shifted":
            return (t[:, None] - self.band_offsets(t.device, t.dtype)).clamp(0.0, 1.0)
        s, _, smooth = self._ramp_position(t)
        return torch.where(smooth, s * s * (2 - s), s)

    def band_rates(self, t: Tensor) -> Tensor:
        """dt_k/dt: (B,) -> (B, K); 0 where band k is clean (and, for shifted clocks, where it has not started)."""
        if self.clock == "shifted":
            local = t[:, None] - self.band_offsets(t.device, t.dtype)
            return ((local > 0) & (local <= 1)).to(t.dtype)
        s, ds, smooth = self._ramp_position(t)
        return torch.where(smooth, s * (4 - 3 * s) * ds, ds)

    def band_window(self, k: int) -> Tuple[float, float]:
        """(lo, hi) of global time in which band k moves: (d_k, 1 + d_k) for shifted clocks, (d_k, 1) for compressed
        ones; e.g. a guidance interval that follows band 0."""
        offset = float(self.band_offsets(dtype=torch.float64)[k])
        return (offset, offset + 1.0) if self.clock == "shifted" else (offset, 1.0)

    def model_times(self, t: Tensor) -> Tensor:
        """What the model is conditioned on: the K band times (B, K) for staggered shifted clocks, else t (B,)."""
        return self.band_times(t) if self.num_model_times > 1 else t

    def mask_drift(self, velocity: Tensor, t: Tensor, split_bands: Optional[SplitBands] = None) -> Tensor:
        """Shifted clocks: each band's part of ``velocity`` outside its window is dropped (a finished band stays
        put, a waiting one stays noise). Identity otherwise."""
        if self.num_model_times == 1:
            return velocity
        return velocity + self._band_correction(self.band_rates(t) - 1, velocity, split_bands)

    def _band_correction(self, coefficients: Tensor, difference: Tensor, split_bands: Optional[SplitBands]) -> Tensor:
        """sum_k c_k * band_k(difference) for per-sample coefficients c (B, K)."""
        if split_bands is None:
            raise ValueError("a staggered band schedule needs split_bands")
        bands = split_bands(difference)
        if bands.ndim != difference.ndim + 1 or bands.shape[1] != self.num_bands:
            raise ValueError(f"split_bands must return (B, {self.num_bands}, ...), got {tuple(bands.shape)}")
        weights = coefficients.reshape(*coefficients.shape, *([1] * (bands.ndim - 2))).to(bands.dtype)
        return (weights * bands).sum(1)

    def interpolate(self, x: Tensor, noise: Tensor, t: Tensor, split_bands: Optional[SplitBands] = None) -> Tensor:
        """x_t = sum_k (1 - t_k) x_k + t_k eps_k, for the (already shifted) global t (B,)."""
        x_t = interpolate(x, noise, t)
        if not self.is_staggered:
            return x_t
        offsets = self.band_times(t) - t[:, None]
        return x_t + self._band_correction(offsets, noise - x, split_bands)

    def velocity_target(self, x: Tensor, noise: Tensor, t: Tensor, split_bands: Optional[SplitBands] = None) -> Tensor:
        """dx_t/dt = sum_k g_k'(t) (eps_k - x_k)."""
        target = velocity_target(x, noise)
        if not self.is_staggered:
            return target
        return target + self._band_correction(self.band_rates(t) - 1, noise - x, split_bands)

    def sample_time(self, batch_size: int, distribution: str = "logit_normal", **kwargs) -> Tensor:
        """Shifted training times in [0, horizon]; kwargs go to :func:`sample_time` (t_max, mean, std, generator,
        device)."""
        return shift_time(sample_time(batch_size, distribution, **kwargs), self.shift) * self.horizon

    def time_grid(self, num_points: int, final_time: float = 0.999, device=None, dtype=torch.float32) -> Tensor:
        """The shifted sampler grid with ``num_points`` points (num_points - 1 steps), from ``horizon`` down."""
        return shifted_time_grid(num_points, self.shift, final_time, device, dtype) * self.horizon


@dataclass
class FlowMatchingLossOutput(BaseOutput):
    """loss: batch mean; per_sample_loss (B,): mean over non-batch dims of |v - u|^2; timesteps (B,): shifted t."""

    loss: Tensor
    per_sample_loss: Tensor
    timesteps: Tensor


def flow_matching_loss(
    model_fn: ModelFn,
    x: Tensor,
    class_labels: Tensor,
    schedule: BandSchedule,
    split_bands: Optional[SplitBands] = None,
    time_distribution: str = "logit_normal",
    generator: Optional[torch.Generator] = None,
    noise_projection: Optional[Callable[[Tensor], Tensor]] = None,
    band0_weight: float = 1.0,
) -> FlowMatchingLossOutput:
    """Sample t and eps, build x_t on the schedule, regress the model's velocity on the target.

    The model gets ``schedule.model_times(t)`` (the band times for shifted clocks). ``band0_weight`` w scales band
    0's share of the error: the residual r becomes r + (sqrt(w) - 1) band_0(r), so w = 1 is the plain loss (SFD
    weights its semantic stream 2). ``noise_projection`` maps eps into the subspace x lies in (a frequency-token
    model's low-pass), so x_t and the target stay there and the loss holds no part the model cannot see."""
    if band0_weight <= 0:
        raise ValueError(f"band0_weight must be positive, got {band0_weight}")
    t = schedule.sample_time(x.shape[0], time_distribution, generator=generator, device=x.device).to(x.dtype)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if noise_projection is not None:
        noise = noise_projection(noise)
    x_t = schedule.interpolate(x, noise, t, split_bands)
    target = schedule.velocity_target(x, noise, t, split_bands)
    prediction = model_fn(x_t, schedule.model_times(t), class_labels)
    residual = prediction.float() - target.float()
    if band0_weight != 1.0:
        if split_bands is None:
            raise ValueError("a band 0 loss weight needs split_bands")
        residual = residual + (math.sqrt(band0_weight) - 1) * split_bands(residual)[:, 0]
    per_sample = residual.pow(2).flatten(1).mean(1)
    return FlowMatchingLossOutput(loss=per_sample.mean(), per_sample_loss=per_sample, timesteps=t)


# ---- ODE solvers: one step from t to t_next < t, and a loop over a grid ----


def _update(x: Tensor, dt: Tensor, velocity: Tensor) -> Tensor:
    """x + dt * v, computed in at least float32 and cast back to x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) + dt.to(dtype) * velocity.to(dtype)).to(x.dtype)


def _batch_time(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.device).reshape(1).expand(x.shape[0])


def euler_step(velocity_fn: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    return _update(x, t_next - t, velocity_fn(x, _batch_time(t, x)))


def heun_step(velocity_fn: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Trapezoidal predictor-corrector: 2 velocity evaluations."""
    v = velocity_fn(x, _batch_time(t, x))
    v_next = velocity_fn(_update(x, t_next - t, v), _batch_time(t_next, x))
    return _update(x, t_next - t, (v + v_next) / 2)


def rk4_step(velocity_fn: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Classic fourth-order Runge-Kutta: 4 velocity evaluations (the UAE 64/100-token sampler)."""
    h = t_next - t
    k1 = velocity_fn(x, _batch_time(t, x))
    k2 = velocity_fn(_update(x, h / 2, k1), _batch_time(t + h / 2, x))
    k3 = velocity_fn(_update(x, h / 2, k2), _batch_time(t + h / 2, x))
    k4 = velocity_fn(_update(x, h, k3), _batch_time(t_next, x))
    return _update(x, h, (k1 + 2 * k2 + 2 * k3 + k4) / 6)


ODE_STEPS = {"euler": euler_step, "heun": heun_step, "rk4": rk4_step}
SOLVERS = tuple(ODE_STEPS)  # the solver names, for argparse choices and error messages


def sample_ode(velocity_fn: VelocityFn, x_init: Tensor, time_grid: Tensor, method: str = "euler") -> Tensor:
    """Integrate dx/dt = velocity_fn(x, t) along ``time_grid`` (from noise at time_grid[0]); len-1 steps."""
    if method not in ODE_STEPS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    if time_grid.ndim != 1 or time_grid.numel() < 2:
        raise ValueError(f"time_grid must be 1-D with at least 2 points, got shape {tuple(time_grid.shape)}")
    x = x_init
    for t, t_next in zip(time_grid[:-1], time_grid[1:]):
        x = ODE_STEPS[method](velocity_fn, x, t, t_next)
    return x


# ---- Guidance: model callables (x, t, labels) -> v in, velocity out ----
#
# Both guidance functions are pure tensor code: which samples are guided is a mask on t, so they never read a
# device value on the host. Only ``guidance_scale == 1`` (a host float) skips the extra forward; a caller that
# knows on the host that no time of a step lies in the interval (the pipeline, from its time grid) should call
# the model alone for that step.


def _guidance_scales(t: Tensor, scale: float, interval: Tuple[float, float], like: Tensor) -> Tensor:
    """Per-sample scale: ``scale`` where t lies in [lo, hi], 1 (no guidance) elsewhere."""
    lo, hi = interval
    inside = (t >= lo) & (t <= hi)
    return _per_sample(torch.where(inside, scale, 1.0), like)


def classifier_free_guidance(
    model_fn: ModelFn,
    x: Tensor,
    t: Tensor,
    class_labels: Tensor,
    guidance_scale: float,
    null_class_id: int,
    interval: Tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """v = v_u + s (v_c - v_u) with one forward on the doubled batch [cond labels; null labels].

    Samples whose (shifted) time lies outside ``interval`` get the conditional velocity (scale 1). At
    ``guidance_scale == 1`` only the conditional batch is evaluated.
    """
    if guidance_scale == 1.0:
        return model_fn(x, t, class_labels)
    null_labels = torch.full_like(class_labels, null_class_id)
    v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null_labels])).chunk(2)
    scale = _guidance_scales(t, guidance_scale, interval, v_cond)
    return v_cond + (scale - 1) * (v_cond - v_uncond)  # == v_u + s (v_c - v_u), exact at s = 1


def autoguidance(
    model_fn: ModelFn,
    guide_fn: ModelFn,
    x: Tensor,
    t: Tensor,
    class_labels: Tensor,
    guidance_scale: float,
    interval: Tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """AutoGuidance v = v_guide + w (v - v_guide); the guide is a weaker model called with the same labels.

    Samples whose time lies outside ``interval`` get v (weight 1); at ``guidance_scale == 1`` the guide is not called.
    """
    v = model_fn(x, t, class_labels)
    if guidance_scale == 1.0:
        return v
    v_guide = guide_fn(x, t, class_labels)
    scale = _guidance_scales(t, guidance_scale, interval, v)
    return v + (scale - 1) * (v - v_guide)


def guided_velocity_fn(
    model_fn: ModelFn,
    class_labels: Tensor,
    guidance_scale: float = 1.0,
    guidance_interval: Tuple[float, float] = (0.0, 1.0),
    null_class_id: Optional[int] = None,
    guide_fn: Optional[ModelFn] = None,
) -> VelocityFn:
    """Bind labels and guidance into the (x, t) -> v callable the solvers take.

    ``guide_fn`` given: AutoGuidance with it. Otherwise CFG against ``null_class_id`` (needed when scale != 1).
    ``class_labels`` are passed on as given: validating them is the caller's job (``UAEDiTPipeline.check_inputs``).
    """
    if guide_fn is None and guidance_scale != 1.0 and null_class_id is None:
        raise ValueError("classifier-free guidance needs null_class_id (= num_classes)")
    if guidance_interval[0] > guidance_interval[1]:
        raise ValueError(f"guidance_interval must be (lo, hi) with lo <= hi, got {guidance_interval}")

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if guide_fn is not None:
            return autoguidance(model_fn, guide_fn, x, t, class_labels, guidance_scale, guidance_interval)
        return classifier_free_guidance(model_fn, x, t, class_labels, guidance_scale, null_class_id, guidance_interval)

    return velocity


# ---- diffusers scheduler: the schedule's config saved with a pipeline, plus the solver steps ----


@dataclass
class FlowMatchBandSchedulerOutput(BaseOutput):
    """prev_sample: the sample at the next (smaller) grid time."""

    prev_sample: Tensor


class FlowMatchBandScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching scheduler for the band-progressive UAE latent.

    The band schedule shapes the training target. Sampling integrates the learned velocity; for shifted clocks
    the caller conditions the model on ``band_schedule.model_times(t)`` and masks its drift with
    ``band_schedule.mask_drift`` (the pipeline does both), so the solvers themselves never need the band split.
    The scheduler stores the schedule (``band_schedule``, also used by the trainer) and the sampler settings.

    Grid: ``set_timesteps(N)`` builds the official grid shift(1 - linspace(0, final_time, N + 1)) in
    ``time_grid`` (N + 1 points; times the schedule's horizon for shifted clocks); ``timesteps`` are its first N
    points, the times at which the model is evaluated, floats in [0, horizon] with horizon = noise. The official
    "50 grid points" sampler is N = 49.

    Two ways to step (diffusers' ``step`` receives one model output, which cannot drive a multi-stage solver):

    * ``step(model_output, timestep, sample)``: one Euler step, like FlowMatchEulerDiscreteScheduler; only for
      ``solver="euler"``.
    * ``solver_step(velocity_fn, timestep, sample)``: one step of the configured solver (euler / heun / rk4),
      calling ``velocity_fn(x, t)`` as often as it needs (build it with :func:`guided_velocity_fn`).

    Each step looks ``timestep`` up on the grid, which reads it on the host (a device sync on an accelerator).
    As in diffusers, ``set_begin_index(0)`` after ``set_timesteps`` makes the steps count from that index instead
    (the ``timestep`` argument is then not read); ``set_timesteps`` switches back to the lookup.

    Args:
        num_train_timesteps: kept for diffusers compatibility; times here are continuous in [0, 1].
        shift: alpha of the time shift. None = ``dimension_shift(latent_dim, base_dim)``, or 1 if no latent_dim.
        latent_dim, base_dim: C*h*w of the latent and the reference dimension (4096) for the shift.
        solver: "euler" | "heun" | "rk4".
        num_bands, band_stagger, band_ramp, band_clock: the band-progressive schedule (see :class:`BandSchedule`).
        final_time: the grid runs from t = 1 to shift(1 - final_time) (official 0.999).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: Optional[float] = None,
        latent_dim: Optional[int] = None,
        base_dim: int = 4096,
        solver: str = "euler",
        num_bands: int = 1,
        band_stagger: float = 0.0,
        band_ramp: str = "smooth",
        final_time: float = 0.999,
        band_clock: str = "compressed",
    ):
        if shift is not None and latent_dim is not None:
            raise ValueError("give either shift or latent_dim (which derives the shift), not both")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not 0.0 < final_time <= 1.0:
            raise ValueError(f"final_time must lie in (0, 1], got {final_time}")
        alpha = dimension_shift(latent_dim, base_dim) if latent_dim is not None else (1.0 if shift is None else shift)
        self.band_schedule = BandSchedule(num_bands, band_stagger, band_ramp, alpha, band_clock)
        self.num_inference_steps: Optional[int] = None
        self.time_grid: Optional[Tensor] = None
        self.timesteps: Optional[Tensor] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    @property
    def time_shift(self) -> float:
        return self.band_schedule.shift

    def set_timesteps(self, num_inference_steps: int, device: Optional[Union[str, torch.device]] = None):
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.time_grid = self.band_schedule.time_grid(num_inference_steps + 1, self.config.final_time, device)
        self.timesteps = self.time_grid[:-1]
        self._step_index, self._begin_index = None, None

    @property
    def step_index(self) -> Optional[int]:
        """Index in ``timesteps`` of the next step while counting (see ``set_begin_index``), else None."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Count steps from ``begin_index`` instead of looking each timestep up (no host sync per step)."""
        self._begin_index, self._step_index = begin_index, None

    def index_for_timestep(self, timestep: Union[float, Tensor]) -> int:
        """Position of ``timestep`` (a float or a tensor of equal values) in ``timesteps``."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps before stepping")
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        if t.numel() == 0 or not torch.all(t == t[0]):
            raise ValueError("all samples in a step must share one timestep")
        distance = (self.timesteps.double().cpu() - t[0]).abs()
        index = int(distance.argmin())
        if distance[index] > 1e-6:
            raise ValueError(f"timestep {float(t[0])} is not on the grid; pass values from scheduler.timesteps")
        return index

    def _times(self, timestep) -> Tuple[Tensor, Tensor]:
        if self._begin_index is None:
            index = self.index_for_timestep(timestep)
        else:
            index = self._begin_index if self._step_index is None else self._step_index
            if self.timesteps is None or index >= len(self.timesteps):
                raise ValueError(f"step {index} is past the {self.num_inference_steps} steps; call set_timesteps again")
            self._step_index = index + 1
        return self.time_grid[index], self.time_grid[index + 1]

    def step(
        self, model_output: Tensor, timestep: Union[float, Tensor], sample: Tensor, return_dict: bool = True
    ) -> Union[FlowMatchBandSchedulerOutput, Tuple[Tensor]]:
        """One Euler step: prev_sample = sample + (t_next - t) * model_output."""
        if self.config.solver != "euler":
            raise ValueError(f"step() is Euler only; use solver_step() for solver={self.config.solver!r}")
        t, t_next = self._times(timestep)
        prev_sample = _update(sample, (t_next - t).to(sample.device), model_output)
        return FlowMatchBandSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def solver_step(
        self, velocity_fn: VelocityFn, timestep: Union[float, Tensor], sample: Tensor, return_dict: bool = True
    ) -> Union[FlowMatchBandSchedulerOutput, Tuple[Tensor]]:
        """One step of the configured solver from ``timestep`` to the next grid time."""
        t, t_next = self._times(timestep)
        prev_sample = ODE_STEPS[self.config.solver](velocity_fn, sample, t, t_next)
        return FlowMatchBandSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
