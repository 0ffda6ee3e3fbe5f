"""DPM-Solver (Lu et al. 2022, "DPM-Solver", Prop. 3.1 and Sec. 3.3) with noise prediction and
DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Sec. 4) with data prediction: orders 1-3,
singlestep or multistep, each higher-order update in both published forms ("dpmsolver" and
"taylor", `DPM_SOLVER_TYPES`).

Users import `sample_dpm_solver` and its option tuples from `score_sde.fast_sampling` (or
`score_sde`); the schedule, grids and loop it runs on are `score_sde._fast_common`'s.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch

from ._fast_common import TIME_GRIDS, Step, _Model, _Point, _run, _Schedule, _time_grid
from ._utils import check_choice, checks_times_on_host
from .checks import check_eps, check_fast_inputs, sample_dtype
from .score import CountingScore
from .sde import SDE, ScoreFn

__all__ = ["sample_dpm_solver", "DPM_METHODS", "DPM_ORDERS", "DPM_PREDICTIONS",
           "DPM_SOLVER_TYPES", "DPM_DEFAULT_SOLVER_TYPES"]

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
    level sigma / alpha, everything else uniformly in lambda. Where the SDE starts above EDM's
    sigma / alpha = 80 (VP, sub-VP, cosine VP), the span from T to 80 takes a quarter of the
    steps a uniform lambda grid would put there (at least one: one up to 19 steps on cosine VP
    and 89 on VP), so that the error still falls at the update's order at many steps. On a
    64-d mixture under VP, sub-VP, VE and cosine VP (benchmarks/bench.py, BENCHMARKS.md),
    multistep noise prediction reached 1.5 x the Frechet floor in 8-9 evaluations at order 3
    on the EDM grid (8-15 on the logSNR grid) and in 8-10 at order 2; data prediction and
    singlestep did worse on the EDM grid.

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
    model = _Model(sde, CountingScore(score_fn, eps, sde.T, model_dtype=sample_dtype(dtype)))
    if method == "multistep":
        points = sched.points(_time_grid(sched, time_grid, num_steps, eps))
        step = _multistep(model, order, prediction, solver_type)
    else:
        orders = _singlestep_orders(num_steps, order)
        points = sched.points(_time_grid(sched, time_grid, len(orders), eps))
        step = _singlestep(model, sched, points, orders, prediction, solver_type)
    return _run(model, points, step, shape, denoise=denoise, device=device, dtype=dtype,
                generator=generator, name="sample_dpm_solver")
