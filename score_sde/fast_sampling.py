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
Time and schedule coefficients are float64 on the CPU; the state stays in the caller's dtype and
on its device. Every score call goes through `CountingScore`, so the returned NFE is exact.
"""
import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ._utils import check_choice, check_positive, checks_times_on_host, float64_like
from .checks import check_eps, check_fast_inputs, sample_device
from .score import CountingScore
from .sde import SDE, ScoreFn

__all__ = ["sample_ddim", "sample_dpm_solver", "sample_heun", "TIME_GRIDS", "DPM_METHODS",
           "DPM_PREDICTIONS", "DPM_SOLVER_TYPES", "DPM_DEFAULT_SOLVER_TYPES"]

DPM_METHODS = ("multistep", "singlestep")
DPM_ORDERS = (1, 2, 3)
DPM_PREDICTIONS = ("data", "noise")  # DPM-Solver++ / DPM-Solver
# The two published forms of the higher-order updates (Lu et al.'s code, `solver_type`):
# "taylor" replaces the prediction by its Taylor polynomial in lambda and integrates each term
# exactly; "dpmsolver" is DPM-Solver's Algorithms 1-2 / DPM-Solver++(2M): the first-derivative
# term of a second-order update weighted h (e^h - 1) / 2 instead of e^h - 1 - h, singlestep
# order 3 ending with the slope through its r = 2/3 stage alone, and multistep order 3 with
# the authors' weight of the second derivative (half the Taylor one). Order 1 has one form.
DPM_SOLVER_TYPES = ("dpmsolver", "taylor")
# (method, order, prediction) -> the form used when solver_type is None: the one with the
# smaller error at 10, 15 and 20 evaluations on the 64-d mixture of benchmarks/bench.py for
# each of VP, sub-VP, VE and cosine VP (BENCHMARKS.md; the median error against the ODE from
# the same prior draw). Taylor / dpmsolver error ratios, geometric mean over the four SDEs:
# multistep 2: 1.75 (data), 1.50 (noise); multistep 3: 1.33 (data), 0.70 (noise);
# singlestep 2: 0.57, 0.35; singlestep 3: 1.26, 0.28. Order 1 has one form.
DPM_DEFAULT_SOLVER_TYPES = {
    ("multistep", 1, "data"): "taylor", ("multistep", 1, "noise"): "taylor",
    ("multistep", 2, "data"): "dpmsolver", ("multistep", 2, "noise"): "dpmsolver",
    ("multistep", 3, "data"): "dpmsolver", ("multistep", 3, "noise"): "taylor",
    ("singlestep", 1, "data"): "taylor", ("singlestep", 1, "noise"): "taylor",
    ("singlestep", 2, "data"): "taylor", ("singlestep", 2, "noise"): "taylor",
    ("singlestep", 3, "data"): "dpmsolver", ("singlestep", 3, "noise"): "taylor",
}
# Singlestep intermediate points as fractions r of the step in lambda (DPM-Solver, Sec. 3.3:
# r1 = 1/2 for order 2; r1 = 1/3, r2 = 2/3 for order 3, whose last stage then gains an order).
SINGLESTEP_FRACTIONS = {1: (), 2: (1 / 2,), 3: (1 / 3, 2 / 3)}
EDM_SIGMA_MIN = 0.002  # EDM's smallest noise level, the default end of sample_heun's grid
EDM_SIGMA_MAX = 80.0  # EDM's largest noise level, where sample_heun's grid starts at most
EDM_RHO = 7.0  # EDM's exponent of the noise-level grid
BISECTION_STEPS = 100  # halvings of [0, T]: t(lambda) to float64 round-off
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
    """EDM's Eq. 5: `num` noise levels from s_max to s_min, uniform in s^(1/rho), float64."""
    frac = torch.linspace(0, 1, num, dtype=torch.float64)
    return (s_max ** (1 / rho) + frac * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def _edm_grid(sched: _Schedule, num_steps: int, eps: float) -> torch.Tensor:
    # EDM's rho = 7 steps in the noise level s = sigma / alpha = e^-lambda (Karras et al. 2022,
    # Eq. 5) down to s(eps). Where s(T) exceeds EDM's sigma_max = 80 (VP and sub-VP: 152,
    # cosine VP: about 6000), the first step goes from T to s = 80 and the other num_steps - 1
    # follow the grid from 80: one exponential-integrator step crosses the range where the
    # prediction hardly changes.
    s_T, s_eps = (math.exp(-float(v)) for v in
                  sched.lam(torch.tensor([sched.sde.T, eps], dtype=torch.float64)))
    if s_T > EDM_SIGMA_MAX and num_steps > 1:
        levels = torch.cat([torch.tensor([s_T], dtype=torch.float64),
                            _edm_levels(EDM_SIGMA_MAX, s_eps, num_steps, EDM_RHO)])
    else:
        levels = _edm_levels(s_T, s_eps, num_steps + 1, EDM_RHO)
    return sched.time_of(-torch.log(levels))


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
    dtype = torch.get_default_dtype() if dtype is None else dtype
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
    with torch.no_grad():
        x = _prior(model.sde, points[0], shape, device, dtype, generator)
        for p, q in zip(points[:-1], points[1:]):
            x = step(x, p, q)
        if denoise:
            x = model.denoise(x, points[-1])
    return _finish(x, name), model.score.nfe


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
    model = _Model(sde, CountingScore(score_fn, eps, sde.T))
    step = functools.partial(_ddim_step, model, eta=eta, generator=generator)
    return _run(model, points, step, shape, denoise=denoise, device=device, dtype=dtype,
                generator=generator, name="sample_ddim")


# --- DPM-Solver ---------------------------------------------------------------------------------

def _exp_step(x: torch.Tensor, p: _Point, q: _Point, derivs: Sequence[torch.Tensor],
              prediction: str, form: str = "taylor") -> torch.Tensor:
    """Exponential-integrator step from p to q with the model output m(lambda) replaced by its
    Taylor polynomial at lambda_p; derivs = [m, dm/dlambda, d2m/dlambda2] (as many as given).

    With h = lambda_q - lambda_p, the Taylor form (DPM-Solver Eq. 3.4 and its data-prediction
    twin, DPM-Solver++ Eq. 8) is
      noise: x_q = (alpha_q / alpha_p) x - sigma_q sum_k [e^h - sum_{j<=k} h^j / j!] m^(k)
      data:  x_q = (sigma_q / sigma_p) x + alpha_q sum_k [(-1)^(k+1) (e^-h - sum_{j<=k}
             (-h)^j / j!)] m^(k).
    The "dpmsolver" form changes one weight (see `DPM_SOLVER_TYPES`): with one derivative it
    is h / 2 times the weight of m, so the e^h - 1 - h of the Taylor form becomes
    h (e^h - 1) / 2 (DPM-Solver's Algorithm 1, DPM-Solver++(2M)); with two derivatives, the
    weight of m'' is halved, as in the third-order multistep update of the authors' code.
    """
    h = q.lam - p.lam
    if prediction == "noise":
        e = math.expm1(h)
        scale, weights = q.alpha / p.alpha, [-q.sigma * w for w in (e, e - h, e - h - h * h / 2)]
    else:
        e = math.expm1(-h)
        scale, weights = q.sigma / p.sigma, [q.alpha * w for w in (-e, h + e, h * h / 2 - h - e)]
    if form == "dpmsolver" and len(derivs) == 2:
        weights[1] = weights[0] * h / 2
    elif form == "dpmsolver" and len(derivs) == 3:
        weights[2] = weights[2] / 2
    # In place on one new tensor: these steps are most of a sampler's own cost.
    out = x * scale
    for w, d in zip(weights, derivs):
        out.add_(d, alpha=w)
    return out


def _backward_derivatives(nodes: Sequence[Tuple[float, torch.Tensor]]) -> List[torch.Tensor]:
    """[m, m', m''] at the newest of 1-3 nodes (lambda_i, m_i), newest first, from the
    derivatives of their interpolating polynomial (Newton divided differences)."""
    (l0, m0), rest = nodes[0], nodes[1:]
    if not rest:
        return [m0]
    l1, m1 = rest[0]
    f01 = torch.sub(m0, m1).div_(l0 - l1)
    if len(rest) == 1:
        return [m0, f01]
    l2, m2 = rest[1]
    f012 = torch.sub(m1, m2).div_(l1 - l2).neg_().add_(f01).div_(l0 - l2)
    return [m0, torch.add(f01, f012, alpha=l0 - l1), f012.mul_(2)]


def _singlestep_orders(num_steps: int, order: int) -> List[int]:
    """Orders of the singlestep steps spending exactly num_steps evaluations: full-order steps,
    then one lower-order step for the remainder."""
    orders = [order] * (num_steps // order)
    return orders + ([num_steps % order] if num_steps % order else [])


def _multistep(model: _Model, order: int, prediction: str, solver_type: str) -> Step:
    """Multistep DPM-Solver: each step evaluates the model once and takes the derivatives of
    its Taylor polynomial from the last `order` evaluations (fewer on the first steps)."""
    history = []  # (lambda, model output) of the latest evaluations, newest first

    def step(x, p, q):
        history.insert(0, (p.lam, model(x, p, prediction)))
        del history[order:]
        return _exp_step(x, p, q, _backward_derivatives(history), prediction, solver_type)

    return step


def _singlestep_update(model: _Model, x: torch.Tensor, p: _Point, q: _Point,
                       stages: Sequence[_Point], prediction: str,
                       solver_type: str) -> torch.Tensor:
    """One singlestep DPM-Solver step from p to q, of order k = len(stages) + 1, through
    intermediate stages at lambda_p + r h (`SINGLESTEP_FRACTIONS[k]`)."""
    k, h = len(stages) + 1, q.lam - p.lam
    m0 = model(x, p, prediction)
    derivs, nodes = [m0], [(p.lam, m0)]
    for r, u_point in zip(SINGLESTEP_FRACTIONS[k], stages):
        # Stage from the current estimate (Taylor form: the published forms share their
        # stages), then a slope through it.
        u = _exp_step(x, p, u_point, derivs, prediction)
        m_u = model(u, u_point, prediction)
        derivs, nodes = [m0, (m_u - m0) / (r * h)], nodes + [(u_point.lam, m_u)]
    if k == 3 and solver_type == "taylor":
        # The quadratic through the three stages (DPM-Solver's Taylor form).
        return _exp_step(x, p, q, _backward_derivatives(nodes), prediction)
    if k == 3:
        # DPM-Solver-3: the slope through the stage at r = 2/3 alone, Taylor weight.
        return _exp_step(x, p, q, derivs, prediction)
    return _exp_step(x, p, q, derivs, prediction, solver_type)


def _singlestep(model: _Model, sched: _Schedule, points: List[_Point], orders: List[int],
                prediction: str, solver_type: str) -> Step:
    """Singlestep DPM-Solver: step i has order orders[i]; the stages' times are all found by
    one bisection, before sampling."""
    stage_lams = [p.lam + r * (q.lam - p.lam)
                  for p, q, k in zip(points[:-1], points[1:], orders)
                  for r in SINGLESTEP_FRACTIONS[k]]
    stage_points = iter(sched.points(sched.time_of(torch.tensor(stage_lams,
                                                                 dtype=torch.float64))))
    stages = iter([[next(stage_points) for _ in SINGLESTEP_FRACTIONS[k]] for k in orders])

    def step(x, p, q):
        return _singlestep_update(model, x, p, q, next(stages), prediction, solver_type)

    return step


def _dpm_options(sde: SDE, order: int, method: str, prediction: str,
                 solver_type: Optional[str], time_grid: Optional[str],
                 eps: float) -> Tuple[str, str]:
    """Validates the options of `sample_dpm_solver`; returns (solver_type, time_grid) with
    their defaults filled in."""
    if not isinstance(order, int) or isinstance(order, bool) or order not in DPM_ORDERS:
        raise ValueError(f"order must be one of 1, 2, 3, got {order!r}")
    check_choice("method", method, DPM_METHODS)
    check_choice("prediction", prediction, DPM_PREDICTIONS)
    if solver_type is None:
        solver_type = DPM_DEFAULT_SOLVER_TYPES[method, order, prediction]
    check_choice("solver_type", solver_type, DPM_SOLVER_TYPES)
    if time_grid is None:
        time_grid = "edm" if (method, prediction) == ("multistep", "noise") else "logsnr"
    check_eps(eps, sde)
    check_choice("time_grid", time_grid, TIME_GRIDS)
    return solver_type, time_grid


@checks_times_on_host
def sample_dpm_solver(sde: SDE, score_fn: ScoreFn, shape, *, num_steps: int = 20,
                      order: int = 2, method: str = "multistep", prediction: str = "noise",
                      solver_type: Optional[str] = None,
                      eps: float = 1e-3, time_grid: Optional[str] = None, denoise: bool = False,
                      device=None, dtype: Optional[torch.dtype] = None,
                      generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, int]:
    """DPM-Solver / DPM-Solver++ sampling with the probability-flow ODE (Lu et al. 2022).

    In lambda = log(alpha / sigma) the ODE has the exact solution x_s = (alpha_s / alpha_t) x_t
    - alpha_s int e^-lambda eps_hat dlambda with the noise prediction eps_hat = -sigma score
    (DPM-Solver, Prop. 3.1), or x_s = (sigma_s / sigma_t) x_t + sigma_s int e^lambda x0_hat
    dlambda with the data prediction x0_hat (DPM-Solver++). The linear part is exact; the
    prediction is replaced by its Taylor polynomial of degree order - 1 in lambda, whose
    derivatives come from earlier evaluations (multistep: Newton divided differences of the
    last `order` grid points, lower orders for the first steps) or from intermediate stages
    (singlestep: stages at lambda_t + r h, r = 1/2 for order 2 and 1/3, 2/3 for order 3, as in
    DPM-Solver's Sec. 3.3). Order 1 is DDIM with eta = 0 on the same grid. Noise prediction
    is the default: with exact scores of a 64-d mixture it reached a given accuracy in fewer
    evaluations than data prediction on sub-VP, VE and cosine (tests/test_fast_sampling.py).

    Each higher-order update has two published forms (`DPM_SOLVER_TYPES`, the `solver_type`
    of the authors' code): "taylor" integrates the Taylor polynomial exactly; "dpmsolver"
    weights the derivative term of an order-2 update by h (e^h - 1) / 2 instead of
    e^h - 1 - h (noise prediction; the data-prediction twin alike), ends a singlestep order-3
    step with the slope through its r = 2/3 stage alone (DPM-Solver-3), and, for multistep
    order 3, uses the authors' update, whose second-derivative weight is half the Taylor one:
    its global order is 2 (measured in tests/test_fast_sampling.py), yet with data prediction
    at 10-20 evaluations it was the more accurate form. By default each (method, order,
    prediction) uses the form measured more accurate at 10-20 evaluations on a 64-d mixture
    under VP, sub-VP, VE and cosine VP (`DPM_DEFAULT_SOLVER_TYPES`, BENCHMARKS.md).

    The budget `num_steps` is the number of score evaluations for both methods. Multistep
    takes num_steps steps on the grid. Singlestep takes num_steps // order steps of `order`
    stages and, if order does not divide num_steps, one final step of order num_steps % order;
    its grid has that many steps.

    Time grid: by default multistep noise prediction steps on EDM's rho = 7 grid in the noise
    level sigma / alpha (its first step from T to sigma / alpha = 80 where the SDE starts
    higher), everything else uniformly in lambda. On a 64-d mixture under VP, sub-VP, VE and
    cosine VP (benchmarks/bench.py), multistep order 3 with noise prediction reached 1.5 x
    the Frechet floor in 9 evaluations on the EDM grid (10-15 on the logSNR grid), and order
    2 in 10 (15-20); data prediction and singlestep did worse on the EDM grid.

    Works for any SDE with closed-form marginals and strictly decreasing lambda(t) (VP,
    sub-VP, cosine VP and VE); t(lambda) is found by float64 bisection.

    Args:
        sde: forward SDE with closed-form marginals.
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        shape: sample shape [B, ...].
        num_steps: score evaluations, excluding the optional denoising (>= 1).
        order: 1, 2 or 3.
        method: "multistep" or "singlestep" (`DPM_METHODS`).
        prediction: "data" (DPM-Solver++) or "noise" (DPM-Solver) (`DPM_PREDICTIONS`).
        solver_type: "dpmsolver" or "taylor" (`DPM_SOLVER_TYPES`); None (default) takes
            `DPM_DEFAULT_SOLVER_TYPES[method, order, prediction]`. No effect at order 1.
        eps: final time, in (0, T).
        time_grid: a name in `TIME_GRIDS`; None (default) takes "edm" for multistep noise
            prediction and "logsnr" (uniform in lambda) otherwise (see above).
        denoise: replace the result at eps by Tweedie's E[x_0 | x_eps] (one more evaluation).
        device: device of the samples; defaults to the generator's device, else CPU.
        dtype: dtype of the samples (default: torch's default dtype).
        generator: torch.Generator for the prior draw (the only randomness).

    Returns:
        (x, nfe): samples of `shape` and the number of score evaluations (num_steps + denoise).

    Raises:
        ValueError: invalid arguments, or an SDE without marginals or without a strictly
            decreasing lambda(t).
        RuntimeError: the samples became non-finite.
    """
    shape = check_fast_inputs(sde, score_fn, shape, num_steps=num_steps)
    solver_type, time_grid = _dpm_options(sde, order, method, prediction, solver_type,
                                          time_grid, eps)
    sched = _Schedule(sde)
    sched.check(eps)
    model = _Model(sde, CountingScore(score_fn, eps, sde.T))
    if method == "multistep":
        points = sched.points(_time_grid(sched, time_grid, num_steps, eps))
        step = _multistep(model, order, prediction, solver_type)
    else:
        orders = _singlestep_orders(num_steps, order)
        points = sched.points(_time_grid(sched, time_grid, len(orders), eps))
        step = _singlestep(model, sched, points, orders, prediction, solver_type)
    return _run(model, points, step, shape, denoise=denoise, device=device, dtype=dtype,
                generator=generator, name="sample_dpm_solver")


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
    model = _Model(sde, CountingScore(score_fn, points[-1].t, sde.T))  # the end: eps

    with torch.no_grad():
        y = _prior(sde, points[0], shape, device, dtype, generator) / points[0].alpha
        for p, q in zip(points[:-1], points[1:]):
            y = _heun_step(model, y, p, q)
        # Euler step to s = 0: y - s eps_hat = x0_hat, the denoised sample.
        p = points[-1]
        y = y - math.exp(-p.lam) * model(p.alpha * y, p, "noise")
    return _finish(y, "sample_heun"), model.score.nfe
