"""Fast samplers for SDEs with Gaussian marginals x_t = alpha(t) x_0 + sigma(t) z.

All three integrate the probability-flow ODE (Song et al. 2021, Eq. 13) in few steps, using
only the SDE's `marginal_coeffs` (so they work for VP, sub-VP, cosine VP, VE and any user SDE
that provides them) and the half log-SNR lambda(t) = log(alpha(t) / sigma(t)):

- `sample_ddim`: DDIM (Song, Meng & Ermon 2021, Eq. 12 with sigma(eta) of Eq. 16), written for
  any (alpha, sigma). With eta = 0 it is the first-order exponential integrator of the ODE;
  with eta = 1 it draws from the DDPM posterior q(x_s | x_t, x_0 = x0_hat).
- `sample_dpm_solver`: DPM-Solver (Lu et al. 2022, "DPM-Solver", Prop. 3.1 and Sec. 3.3) with
  noise prediction and DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Sec. 4) with data
  prediction, orders 1-3, singlestep or multistep, each higher-order update in both published
  forms ("dpmsolver" and "taylor", `DPM_SOLVER_TYPES`).
- `sample_heun`: EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 and the rho time
  steps of Eq. 5) on the ODE of x / alpha against the noise level sigma / alpha.

Each sampler is a short loop over a step function from grid point p to q (`_run`: DDIM's
`_ddim_step`, DPM-Solver's `_multistep` / `_singlestep`; `sample_heun` over `_heun_step`).
DPM-Solver lives in `score_sde.dpm_solver` and the schedule, grids and loop the three share in
`score_sde._fast_common`; this module is where users import all three from.
Time and schedule coefficients are float64 on the CPU; the state stays in the caller's dtype and
on its device. Every score call goes through `CountingScore`, so the returned NFE is exact.
"""
import functools
import math
from typing import Optional, Tuple

import torch

from ._fast_common import (EDM_SIGMA_MAX, EDM_SIGMA_MIN, TIME_GRIDS, _edm_levels, _finish,
                           _Model, _Point, _prior, _run, _Schedule, _time_grid)
from ._utils import check_choice, check_positive, checks_times_on_host
from .checks import check_eps, check_fast_inputs, sample_dtype, state_dtype
from .dpm_solver import (DPM_DEFAULT_SOLVER_TYPES, DPM_METHODS, DPM_PREDICTIONS,
                         DPM_SOLVER_TYPES, sample_dpm_solver)
from .score import CountingScore
from .sde import SDE, ScoreFn

__all__ = ["sample_ddim", "sample_dpm_solver", "sample_heun", "TIME_GRIDS", "DPM_METHODS",
           "DPM_PREDICTIONS", "DPM_SOLVER_TYPES", "DPM_DEFAULT_SOLVER_TYPES"]


# --- DDIM ---------------------------------------------------------------------------------------

def _ddim_step(model: _Model, x: torch.Tensor, p: _Point, q: _Point, *, eta: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """DDIM from p to q: x_q = alpha_q x0_hat + sqrt(sigma_q^2 - c^2) eps_hat + c z."""
    t, score = model.score_at(x, p)
    x0, noise_pred = model.sde.denoise(x, t, score), -p.sigma * score
    # Noise std c of the step: (c / sigma_s)^2 = eta^2 (1 - SNR_t / SNR_s) <= 1.
    frac = eta ** 2 * -math.expm1(2 * (p.lam - q.lam))
    c = q.sigma * math.sqrt(frac)
    x = q.alpha * x0 + q.sigma * math.sqrt(1 - frac) * noise_pred
    if c > 0:
        x = x + c * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@checks_times_on_host
def sample_ddim(sde: SDE, score_fn: ScoreFn, shape, *, num_steps: int = 50, eta: float = 0.0,
                eps: float = 1e-3, denoise: bool = False, time_grid: str = "uniform",
                device=None, dtype: Optional[torch.dtype] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, int]:
    """DDIM sampling (Song, Meng & Ermon 2021) for any SDE with marginals N(alpha x_0, sigma^2).

    Each step from t to s < t predicts x0_hat = (x + sigma_t^2 score) / alpha_t and
    eps_hat = -sigma_t score, then

        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
        c = eta sigma_s sqrt(1 - exp(2 (lambda_t - lambda_s))),

    with lambda = log(alpha / sigma). For every c <= sigma_s this keeps the marginals
    q(x_s | x_0) = N(alpha_s x_0, sigma_s^2). eta = 0 is deterministic, the first-order
    exponential integrator of the probability-flow ODE (DPM-Solver of order 1); eta = 1 makes
    c^2 the variance of the forward posterior q(x_s | x_t, x_0), i.e. ancestral (DDPM) sampling.
    For VP (alpha^2 = 1 - sigma^2) c is the paper's sigma(eta) of Eq. 16; for VE (alpha = 1) it
    is eta sigma_s sqrt(1 - sigma_s^2 / sigma_t^2).

    Args:
        sde: forward SDE with closed-form marginals.
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        shape: sample shape [B, ...].
        num_steps: steps from T to eps, one score evaluation each (>= 1).
        eta: stochasticity in [0, 1].
        eps: final time, in (0, T).
        denoise: replace the result at eps by Tweedie's E[x_0 | x_eps] (one more evaluation).
        time_grid: a name in `TIME_GRIDS` ("uniform" in t, "quadratic" = uniform in sqrt(t),
            "logsnr" = uniform in lambda, "edm" = EDM's rho = 7 grid in sigma / alpha, see
            `sample_dpm_solver`).
        device: device of the samples; defaults to the generator's device, else CPU.
        dtype: dtype of the samples (default: torch's default dtype).
        generator: torch.Generator for the prior and, when eta > 0, the step noise.

    Returns:
        (x, nfe): samples of `shape` and the number of score evaluations (num_steps + denoise).

    Raises:
        ValueError: invalid arguments, or an SDE without marginals or without a strictly
            decreasing lambda(t).
        RuntimeError: the samples became non-finite.
    """
    shape = check_fast_inputs(sde, score_fn, shape, num_steps=num_steps)
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    check_eps(eps, sde)
    check_choice("time_grid", time_grid, TIME_GRIDS)
    sched = _Schedule(sde)
    sched.check(eps)
    points = sched.points(_time_grid(sched, time_grid, num_steps, eps))
    model = _Model(sde, CountingScore(score_fn, eps, sde.T, model_dtype=sample_dtype(dtype)))
    step = functools.partial(_ddim_step, model, eta=eta, generator=generator)
    return _run(model, points, step, shape, denoise=denoise, device=device, dtype=dtype,
                generator=generator, name="sample_ddim")



# --- EDM Heun -----------------------------------------------------------------------------------

def _heun_times(sched: _Schedule, num_steps: int, rho: float, eps: Optional[float],
                sigma_max: Optional[float]) -> torch.Tensor:
    """The times of `sample_heun`'s noise levels, float64 [num_steps]: EDM's Eq. 5 between
    s_max = min(sigma_max, s(T)) and s(eps), mapped back to times, the ends exactly; eps=None
    takes the time where s = EDM_SIGMA_MIN.

    Raises:
        ValueError: eps or sigma_max invalid for the SDE, or lambda(t) not strictly decreasing.
    """
    sde = sched.sde
    if eps is None:
        lam_min = -math.log(EDM_SIGMA_MIN)
        if float(sched.lam(torch.tensor([sde.T], dtype=torch.float64))) >= lam_min:
            raise ValueError(f"eps=None needs a noise level sigma/alpha above {EDM_SIGMA_MIN} "
                             f"at T for {type(sde).__name__}; pass eps")
        eps = float(sched.time_of(torch.tensor([lam_min], dtype=torch.float64)))
    else:
        check_eps(eps, sde)
    sched.check(eps)

    s_max, s_min = (math.exp(-float(v)) for v in
                    sched.lam(torch.tensor([sde.T, eps], dtype=torch.float64)))
    t_start = sde.T
    if sigma_max is not None:
        check_positive("sigma_max", sigma_max)
        if sigma_max <= s_min:
            raise ValueError(f"sigma_max must exceed the noise level at eps, {s_min:.6g}; got "
                             f"{sigma_max:g}")
        if s_max > sigma_max:
            t_start = float(sched.time_of(torch.tensor([-math.log(sigma_max)],
                                                       dtype=torch.float64), t_lo=eps))
            s_max = math.exp(-float(sched.lam(torch.tensor([t_start], dtype=torch.float64))))
    t = sched.time_of(-torch.log(_edm_levels(s_max, s_min, num_steps, rho)))
    t[-1] = eps
    t[0] = t_start  # with num_steps = 1 the only level is s(t_0)
    return t


def _heun_step(model: _Model, y: torch.Tensor, p: _Point, q: _Point) -> torch.Tensor:
    """EDM's step from noise level s_p to s_q of dy/ds = eps_hat (y = x / alpha, s = sigma /
    alpha): Euler, then the 2nd-order correction with the slope at its end."""
    s_cur = math.exp(-p.lam)
    d_cur = model(p.alpha * y, p, "noise")
    ds = math.exp(-q.lam) - s_cur
    y_next = y + ds * d_cur
    d_next = model(q.alpha * y_next, q, "noise")
    return y + ds * 0.5 * (d_cur + d_next)


@checks_times_on_host
def sample_heun(sde: SDE, score_fn: ScoreFn, shape, *, num_steps: int = 18, rho: float = 7.0,
                eps: Optional[float] = None, sigma_max: Optional[float] = EDM_SIGMA_MAX,
                device=None, dtype: Optional[torch.dtype] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, int]:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1 without churn).

    In y = x / alpha and the noise level s = sigma / alpha = e^-lambda every SDE with marginals
    becomes y = x_0 + s z, whose probability-flow ODE is dy/ds = (y - D(y; s)) / s = eps_hat
    with the denoiser D = x0_hat (Tweedie). The noise levels follow EDM's Eq. 5,

        s_i = (s_max^(1/rho) + i / (num_steps - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho,

    for i < num_steps, from s_max = min(sigma_max, s(T)) to s_min = s(eps), then s = 0; each s_i
    is turned back into a time t_i by float64 bisection of lambda(t). When s(T) exceeds
    sigma_max (VP's is 152, cosine VP's about 6000), the grid starts at the time t_0 < T where
    s = sigma_max, from EDM's prior y ~ N(0, sigma_max^2 I), i.e. x ~ N(0, sigma(t_0)^2 I);
    the steps EDM saves there are spent where the data take shape. Steps between the s_i are
    Heun's, with 2 evaluations each (as in EDM, the second is not reused: the next step starts
    from the corrected point), and the last, from s_min to 0, is Euler's, so the sample is the
    denoised D(y; s_min) in data space. NFE = 2 num_steps - 1; num_steps = 1 denoises the prior draw
    at the start.

    Args:
        sde: forward SDE with closed-form marginals (VP, sub-VP, cosine VP, VE, ...).
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        shape: sample shape [B, ...].
        num_steps: noise levels before 0 (>= 1); EDM uses 18 (35 evaluations).
        rho: exponent of the time steps (> 0); 7 in EDM.
        eps: time of the smallest noise level, in (0, T); by default the time where
            sigma / alpha = 0.002 (EDM's sigma_min).
        sigma_max: largest noise level sigma / alpha of the grid (> s(eps)); 80 in EDM. None
            starts at T, from the SDE's prior.
        device: device of the samples; defaults to the generator's device, else CPU.
        dtype: dtype of the samples (default: torch's default dtype).
        generator: torch.Generator for the prior draw (the only randomness): one standard
            normal draw of `shape`.

    Returns:
        (x, nfe): denoised samples of `shape` and the number of score evaluations.

    Raises:
        ValueError: invalid arguments, or an SDE without marginals or without a strictly
            decreasing lambda(t), or (eps=None) whose noise level at T is below 0.002.
        RuntimeError: the samples became non-finite.
    """
    shape = check_fast_inputs(sde, score_fn, shape, num_steps=num_steps)
    check_positive("rho", rho)
    sched = _Schedule(sde)
    points = sched.points(_heun_times(sched, num_steps, rho, eps, sigma_max))
    dtype = sample_dtype(dtype)
    model = _Model(sde, CountingScore(score_fn, points[-1].t, sde.T,  # the end: eps
                                      model_dtype=dtype))

    with torch.no_grad():
        y = (_prior(sde, points[0], shape, device, state_dtype(dtype), generator)
             / points[0].alpha)
        for p, q in zip(points[:-1], points[1:]):
            y = _heun_step(model, y, p, q)
        # Euler step to s = 0: y - s eps_hat = x0_hat, the denoised sample.
        p = points[-1]
        y = y - math.exp(-p.lam) * model(p.alpha * y, p, "noise")
    return _finish(y.to(dtype), "sample_heun"), model.score.nfe
