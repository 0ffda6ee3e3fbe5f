"""What the fast samplers share: the float64 schedule of an SDE with Gaussian marginals
x_t = alpha(t) x_0 + sigma(t) z in the half log-SNR lambda(t) = log(alpha(t) / sigma(t)), the
time grids, the model's noise and data predictions at a grid point, and the loop from the prior
draw through the steps.

`score_sde.fast_sampling` (DDIM, EDM's Heun) and `score_sde.dpm_solver` build on it; users
import the samplers and `TIME_GRIDS` from `score_sde.fast_sampling`.
"""
import math
from typing import Callable, List, Optional, Tuple

import torch

from ._utils import float64_like
from .checks import sample_device, sample_dtype, state_dtype
from .score import CountingScore
from .sde import SDE

EDM_SIGMA_MIN = 0.002  # EDM's smallest noise level, the default end of sample_heun's grid
EDM_SIGMA_MAX = 80.0  # EDM's largest noise level, where sample_heun's grid starts at most
EDM_RHO = 7.0  # EDM's exponent of the noise-level grid
# The "edm" time grid's steps above sigma_max, as a share of those a logSNR grid puts there.
EDM_SHARE_ABOVE_SIGMA_MAX = 0.25
# Halvings of [0, T] enough to reach adjacent floats at any positive t, down to the smallest
# double 2^-1074 (a root near 0.5 takes about 53; the loop stops once all are adjacent).
BISECTION_STEPS = 1100
MONOTONE_CHECK_POINTS = 1001  # where lambda(t) must be strictly decreasing


class _Schedule:
    """alpha(t), sigma(t) and lambda(t) = log(alpha / sigma) of an SDE in float64 on the CPU,
    and the inverse t(lambda) by bisection (lambda is strictly decreasing in t)."""

    def __init__(self, sde: SDE):
        self.sde = sde

    def coeffs(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.sde.marginal_coeffs(t.to(torch.float64))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.coeffs(t)
        return torch.log(alpha) - torch.log(sigma)

    def check(self, eps: float) -> None:
        """Raises ValueError unless lambda is finite and strictly decreasing on [eps, T]."""
        lam = self.lam(torch.linspace(eps, self.sde.T, MONOTONE_CHECK_POINTS,
                                      dtype=torch.float64))
        if not (torch.isfinite(lam).all() and (lam[1:] < lam[:-1]).all()):
            raise ValueError(f"the fast samplers need lambda(t) = log(alpha(t) / sigma(t)) "
                             f"finite and strictly decreasing on [eps, T] = [{eps:g}, "
                             f"{self.sde.T:g}]; {type(self.sde).__name__}'s marginal_coeffs "
                             f"do not give that")

    def time_of(self, lam: torch.Tensor, t_lo: float = 0.0) -> torch.Tensor:
        """t in (t_lo, T] with lambda(t) = lam (float64 [M]); midpoints only, so lambda is never
        evaluated at t_lo itself (where sigma may vanish)."""
        lo = torch.full_like(lam, t_lo, dtype=torch.float64)
        hi = torch.full_like(lam, self.sde.T, dtype=torch.float64)
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if ((mid == lo) | (mid == hi)).all():
                break  # adjacent floats: done
            early = self.lam(mid) > lam  # lambda decreases in t: the root lies after mid
            lo, hi = torch.where(early, mid, lo), torch.where(early, hi, mid)
        return 0.5 * (lo + hi)

    def points(self, t: torch.Tensor) -> List["_Point"]:
        alpha, sigma = self.coeffs(t)
        return [_Point(float(ti), float(a), float(s), math.log(a) - math.log(s))
                for ti, a, s in zip(t.tolist(), alpha.tolist(), sigma.tolist())]


class _Point:
    """One time of the grid with its float64 coefficients."""

    __slots__ = ("t", "alpha", "sigma", "lam")

    def __init__(self, t: float, alpha: float, sigma: float, lam: float):
        self.t, self.alpha, self.sigma, self.lam = t, alpha, sigma, lam


# --- time grids: num_steps + 1 float64 times from T down to eps ------------------------------

def _uniform_grid(sched: _Schedule, num_steps: int, eps: float) -> torch.Tensor:
    return torch.linspace(sched.sde.T, eps, num_steps + 1, dtype=torch.float64)


def _quadratic_grid(sched: _Schedule, num_steps: int, eps: float) -> torch.Tensor:
    # Uniform in sqrt(t) (DDIM's "quadratic" skip, DPM-Solver's "time_quadratic").
    root = torch.linspace(math.sqrt(sched.sde.T), math.sqrt(eps), num_steps + 1,
                          dtype=torch.float64)
    return root ** 2


def _logsnr_grid(sched: _Schedule, num_steps: int, eps: float) -> torch.Tensor:
    # Uniform in lambda (DPM-Solver's "logSNR" steps).
    ends = sched.lam(torch.tensor([sched.sde.T, eps], dtype=torch.float64))
    lam = torch.linspace(float(ends[0]), float(ends[1]), num_steps + 1, dtype=torch.float64)
    return sched.time_of(lam)


def _edm_levels(s_max: float, s_min: float, num: int, rho: float) -> torch.Tensor:
    """EDM's Eq. 5: `num` noise levels from s_max to s_min, uniform in s^(1/rho), float64.

    Formed in logs, s_max (1 - f + f (s_min / s_max)^(1/rho))^rho for the fraction f of the
    way, so that s^(1/rho) cannot overflow (s_max = 80 and rho < 0.0067) or underflow."""
    frac = torch.linspace(0, 1, num, dtype=torch.float64)
    log_ratio = (math.log(s_min) - math.log(s_max)) / rho
    inner = torch.logaddexp(torch.log1p(-frac), torch.log(frac) + log_ratio)
    return torch.exp(math.log(s_max) + rho * inner)


def _edm_grid(sched: _Schedule, num_steps: int, eps: float) -> torch.Tensor:
    # EDM's rho = 7 steps in the noise level s = sigma / alpha = e^-lambda (Karras et al. 2022,
    # Eq. 5) down to s(eps). Where s(T) exceeds EDM's sigma_max = 80 (VP and sub-VP: 152,
    # cosine VP: about 6000), the span from T to s = 80 takes `_steps_above_sigma_max` steps
    # uniform in lambda (one up to 19 steps on cosine VP, 89 on VP, 131 on sub-VP) and the
    # others follow the grid from 80. The prediction hardly changes up there, but one step
    # over that span would leave an error that no num_steps removes.
    lam_T, lam_eps = (float(v) for v in
                      sched.lam(torch.tensor([sched.sde.T, eps], dtype=torch.float64)))
    s_eps, lam_max = math.exp(-lam_eps), -math.log(EDM_SIGMA_MAX)
    # Only a span worth a step of its own (s(T) > 1.1 x 80) with eps below 80: else the grid
    # would turn back up to s(eps), or spend a step on a sliver whose slope amplifies round-off.
    if num_steps > 1 and s_eps < EDM_SIGMA_MAX and lam_max - lam_T > math.log(1.1):
        above = _steps_above_sigma_max(num_steps, (lam_max - lam_T) / (lam_eps - lam_T))
        lam = torch.linspace(lam_T, lam_max, above + 1, dtype=torch.float64)[:-1]
        levels = torch.cat([torch.exp(-lam), _edm_levels(EDM_SIGMA_MAX, s_eps,
                                                         num_steps - above + 1, EDM_RHO)])
    else:
        levels = _edm_levels(math.exp(-lam_T), s_eps, num_steps + 1, EDM_RHO)
    return sched.time_of(-torch.log(levels))


def _steps_above_sigma_max(num_steps: int, fraction: float) -> int:
    """Steps of the EDM grid from T to sigma_max: a quarter of the num_steps * fraction that a
    grid uniform in lambda takes there (fraction: that span's share of lambda_eps - lambda_T),
    at least one and at most num_steps - 1 (benchmarks/edm_grid_convergence.py measures the
    share against one step, BENCHMARKS.md)."""
    share = round(num_steps * fraction * EDM_SHARE_ABOVE_SIGMA_MAX)
    return min(num_steps - 1, max(1, share))


TIME_GRIDS = {"uniform": _uniform_grid, "quadratic": _quadratic_grid, "logsnr": _logsnr_grid,
              "edm": _edm_grid}


def _time_grid(sched: _Schedule, name: str, num_steps: int, eps: float) -> torch.Tensor:
    t = TIME_GRIDS[name](sched, num_steps, eps)
    t[0], t[-1] = sched.sde.T, eps  # the ends exactly, whatever round-off did inside
    return t


# --- shared set-up and the model outputs -------------------------------------------------------

def _prior(sde: SDE, start: _Point, shape, device, dtype, generator) -> torch.Tensor:
    """The draw at the grid's first point: the SDE's prior at T, else N(0, sigma^2 I) at that
    time (EDM's prior N(0, sigma_max^2 I) of x / alpha, when `sample_heun` starts below T)."""
    device = sample_device(device, generator)
    dtype = sample_dtype(dtype)
    if start.t < sde.T:
        return start.sigma * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


class _Model:
    """The score at one grid point, and the noise and data predictions derived from it:
    eps_hat = -sigma score and x0_hat = (x + sigma^2 score) / alpha (Tweedie, `SDE.denoise`)."""

    def __init__(self, sde: SDE, score: CountingScore):
        self.sde, self.score = sde, score

    def score_at(self, x: torch.Tensor, p: _Point) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t [B], score) at the grid point p."""
        t = torch.full((x.shape[0],), p.t, dtype=float64_like(x), device=x.device)
        return t, self.score(x, t)

    def __call__(self, x: torch.Tensor, p: _Point, prediction: str) -> torch.Tensor:
        t, score = self.score_at(x, p)
        if prediction == "noise":
            return -p.sigma * score
        return self.sde.denoise(x, t, score)

    def denoise(self, x: torch.Tensor, p: _Point) -> torch.Tensor:
        return self(x, p, "data")


def _finish(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise RuntimeError(f"{name} produced non-finite samples; check that score_fn is finite "
                           f"on [eps, T]")
    return x


Step = Callable[[torch.Tensor, _Point, _Point], torch.Tensor]


def _run(model: _Model, points: List[_Point], step: Step, shape, *, denoise: bool, device,
         dtype: Optional[torch.dtype], generator: Optional[torch.Generator],
         name: str) -> Tuple[torch.Tensor, int]:
    """The loop of DDIM and DPM-Solver: a prior draw at the first grid point, `step(x, p, q)`
    between consecutive points, and with `denoise` Tweedie's formula at the last one; returns
    (x, nfe)."""
    dtype = sample_dtype(dtype)
    with torch.no_grad():
        x = _prior(model.sde, points[0], shape, device, state_dtype(dtype), generator)
        for p, q in zip(points[:-1], points[1:]):
            x = step(x, p, q)
        if denoise:
            x = model.denoise(x, points[-1])
    return _finish(x.to(dtype), name), model.score.nfe

