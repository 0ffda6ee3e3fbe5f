"""Probability-flow ODE solves with torchdiffeq: sampling and the data <-> latent maps.

The probability-flow ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al. 2021, Eq. 13)
shares the marginals p_t of the forward SDE, so integrating it from T to eps turns prior
samples into data and integrating from eps to T encodes data as latents (Sec. 4.3).

Solver facts that shape this module (torchdiffeq 0.2):
- Adaptive Runge–Kutta stages may overshoot the end time and the first-step heuristic probes a
  trial time that can lie outside the interval. The end time is passed as a grid point
  (`step_t`) so no step crosses it, and `CountingScore` keeps round-off inside [eps, T]: the
  score is never evaluated outside [eps, T].
- torchdiffeq casts time to the state's dtype. The state is integrated in float64, so steps
  near eps never underflow in float32 time; the score still sees x and t in the caller's dtype.
- A solve that cannot meet its tolerance is stopped after `MAX_SOLVER_STEPS` accepted or
  rejected steps with an error naming the time reached.
"""
from typing import Callable, Optional, Tuple, Union

import torch
import torchdiffeq

from ._utils import check_shape, checks_times_on_host, float64_like
from .checks import check_data, check_solve_inputs, sample_device, sample_dtype, state_dtype
from .score import CountingScore
from .sde import SDE, ReverseSDE, ScoreFn

__all__ = ["sample_ode", "data_to_latent", "latent_to_data", "ADAPTIVE_METHODS", "ERROR_NORMS"]

# torchdiffeq's adaptive Runge–Kutta methods (they accept step_t and max_num_steps).
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
MAX_SOLVER_STEPS = 100_000
# How a step's scaled error |err| / (atol + rtol |y|) is reduced to one number (step accepted
# when <= 1): "max" over every element, or "rms", the root mean square over each sample's own
# elements (SciPy's norm for one sample), then the largest over the batch. Both hold each
# sample to its own tolerance whatever its batch-mates; "rms" is looser on high-dimensional
# samples and takes fewer steps.
ERROR_NORMS = ("max", "rms")

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


class _ODEFunc:
    """torchdiffeq right-hand side (t, y) wrapping a batched rhs(t [B], y); records the last
    accepted time so failures can say how far the solve got.

    A state that turns non-finite makes the solver's time non-finite. On the CPU that is
    checked at every evaluation (a host read costs nothing there); on an accelerator an
    evaluation never waits for the device, and torchdiffeq's own per-step checks stop the solve,
    which `odeint_interval` reports with the time reached."""

    def __init__(self, rhs: Callable[[torch.Tensor, State], State], batch: int, t_start: float,
                 t_end: float):
        self.rhs = rhs
        self.batch = batch
        self.t_reached = t_start
        self.t_min, self.t_max = min(t_start, t_end), max(t_start, t_end)
        # Integrating backward, torchdiffeq reports the true t0 but a positive step.
        self.direction = 1.0 if t_end >= t_start else -1.0

    def __call__(self, t: torch.Tensor, y: State) -> State:
        if t.device.type == "cpu" and not bool(torch.isfinite(t)):
            raise RuntimeError(f"the solver's time became {float(t)} after t={self.t_reached:g}:"
                               f" the ODE state is non-finite; check that score_fn is finite on "
                               f"[eps, T]")
        # The first-step heuristic may probe a time outside the interval (module docstring):
        # evaluate the right-hand side at the nearest time inside instead.
        t = t.clamp(self.t_min, self.t_max)
        return self.rhs(t.reshape(1).expand(self.batch), y)

    def callback_accept_step(self, t0, y0, dt):
        self.t_reached = float(t0 + self.direction * dt)


def _max_norm(y: State) -> torch.Tensor:
    # Every element must meet its own tolerance: with torchdiffeq's default RMS norm one sharp
    # sample's error is averaged away by its batch-mates, so accuracy would depend on the batch.
    if isinstance(y, torch.Tensor):
        return y.abs().max()
    return torch.stack([v.abs().max() for v in y]).max()


def per_sample_rms(y: State) -> torch.Tensor:
    """[B] root mean square over each sample's elements of all state tensors ([B, ...])."""
    parts = (y,) if isinstance(y, torch.Tensor) else y
    squares = sum(v.reshape(v.shape[0], -1).pow(2).sum(1) for v in parts)
    count = sum(v[0].numel() for v in parts)
    return (squares / count).sqrt()


def _rms_norm(y: State) -> torch.Tensor:
    return per_sample_rms(y).max()


_NORMS = {"max": _max_norm, "rms": _rms_norm}


def odeint_interval(rhs: Callable[[torch.Tensor, State], State], y0: State, t_start: float,
                    t_end: float, *, batch: int, rtol: float, atol: float,
                    method: str, error_norm: str = "max") -> State:
    """Integrates dy/dt = rhs(t [B], y) from t_start to t_end (either direction) and returns
    y(t_end); the state should be float64 (see the module docstring).

    Raises:
        RuntimeError: the solver could not meet its tolerance (names the time reached).
    """
    ref = y0[0] if isinstance(y0, tuple) else y0
    tdt = float64_like(ref)
    func = _ODEFunc(rhs, batch, t_start, t_end)
    times = torch.tensor([t_start, t_end], dtype=tdt, device=ref.device)
    options = dict(step_t=torch.tensor([t_end], dtype=tdt, device=ref.device),
                   max_num_steps=MAX_SOLVER_STEPS, norm=_NORMS[error_norm])
    try:
        out = torchdiffeq.odeint(func, y0, times, rtol=rtol, atol=atol, method=method,
                                 options=options)
    except AssertionError as err:
        # torchdiffeq's messages can hold a whole tensor; its first words say enough.
        why = str(err).split("\n")[0].split(": tensor")[0][:120]
        raise RuntimeError(
            f"the {method} solve from t={t_start:g} to t={t_end:g} stopped at "
            f"t={func.t_reached:.6g} ({why}); the state or the score may be non-finite there, "
            f"or the tolerance unmeetable: loosen rtol/atol (now {rtol:g}/{atol:g}), raise "
            f"eps, or check that the score is finite and smooth there") from None
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise RuntimeError(f"{what} is non-finite; check that score_fn is finite on [eps, T]")


def pf_ode_solve(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t_start: float, t_end: float, *,
                 rtol: float, atol: float, method: str, eps: float,
                 error_norm: str = "max",
                 dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, int]:
    """Solves the probability-flow ODE for x [B, ...] from t_start to t_end; returns the state
    at t_end in `dtype` (default x's) and the number of score evaluations. The score sees
    `dtype`; the drift is formed in at least float32 (g^2 overflows float16 under VE, and
    bfloat16 drifts make the step control see noise)."""
    dtype = dtype or x.dtype
    counting = CountingScore(score_fn, eps, sde.T, model_dtype=dtype)
    rsde = ReverseSDE(sde, counting, probability_flow=True)
    work = state_dtype(dtype)

    def rhs(t, y):
        drift, _ = rsde.sde(y.to(work), t)
        return drift.to(y.dtype)

    with torch.no_grad():
        y0 = x.to(float64_like(x))
        y1 = odeint_interval(rhs, y0, t_start, t_end, batch=x.shape[0], rtol=rtol, atol=atol,
                             method=method, error_norm=error_norm)
    y1 = y1.to(dtype)
    _check_finite(y1, "the probability-flow ODE solution")
    return y1, counting.nfe


@checks_times_on_host
def data_to_latent(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, *, rtol: float = 1e-5,
                   atol: float = 1e-5, method: str = "dopri5", eps: float = 1e-5,
                   error_norm: str = "max") -> Tuple[torch.Tensor, int]:
    """Encodes data x at time eps into latents z at time T with the probability-flow ODE.

    Args:
        sde: the forward SDE.
        score_fn: score function.
        x: data [B, ...] (rank >= 2), floating.
        rtol, atol: solver tolerances.
        method: a torchdiffeq adaptive method, one of `ADAPTIVE_METHODS`.
        eps: start time (> 0).
        error_norm: "max" or "rms" (see `ERROR_NORMS`).

    Returns:
        (z, nfe): latents shaped like x in x's dtype, and the number of score evaluations.

    Raises:
        ValueError: invalid arguments. RuntimeError: the solve failed (see `odeint_interval`).
    """
    check_solve_inputs(sde, score_fn, rtol=rtol, atol=atol, method=method, eps=eps,
                       error_norm=error_norm, methods=ADAPTIVE_METHODS, error_norms=ERROR_NORMS)
    check_data(x, "x")
    return pf_ode_solve(sde, score_fn, x, eps, sde.T, rtol=rtol, atol=atol, method=method, eps=eps,
                        error_norm=error_norm)


@checks_times_on_host
def latent_to_data(sde: SDE, score_fn: ScoreFn, z: torch.Tensor, *, rtol: float = 1e-5,
                   atol: float = 1e-5, method: str = "dopri5", eps: float = 1e-5,
                   error_norm: str = "max") -> Tuple[torch.Tensor, int]:
    """Decodes latents z at time T into data at time eps (the inverse of `data_to_latent`).

    Arguments as in `data_to_latent`; no denoising is applied, so the two maps are inverses up
    to the solver tolerance.

    Returns:
        (x, nfe): data shaped like z at time eps, and the number of score evaluations.
    """
    check_solve_inputs(sde, score_fn, rtol=rtol, atol=atol, method=method, eps=eps,
                       error_norm=error_norm, methods=ADAPTIVE_METHODS, error_norms=ERROR_NORMS)
    check_data(z, "z")
    return pf_ode_solve(sde, score_fn, z, sde.T, eps, rtol=rtol, atol=atol, method=method, eps=eps,
                        error_norm=error_norm)


@checks_times_on_host
def sample_ode(sde: SDE, score_fn: ScoreFn, shape, *, rtol: float = 1e-5, atol: float = 1e-5,
               method: str = "dopri5", eps: float = 1e-3, denoise: bool = True, device=None,
               dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None,
               error_norm: str = "max") -> Tuple[torch.Tensor, int]:
    """Samples by integrating the probability-flow ODE from a prior draw at T to eps
    (Song et al. 2021, Sec. 4.3), with an adaptive torchdiffeq solver on the device.

    Args:
        sde: the forward SDE.
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        shape: sample shape [B, ...].
        rtol, atol: solver tolerances.
        method: a torchdiffeq adaptive method, one of `ADAPTIVE_METHODS`.
        eps: final time.
        denoise: replace the result by Tweedie's E[x_0 | x_eps] (one more evaluation).
        device: device of the samples; defaults to the generator's device, else CPU.
        dtype: dtype of the samples and of the score's input (default: torch's default
            dtype). The prior draw and the drift are at least float32 and the state float64.
            A half-precision score is rounded to 3 or 4 digits, which the step control sees:
            with bfloat16 loosen rtol/atol to about 1e-3, or expect many more evaluations.
        generator: torch.Generator for the prior draw.
        error_norm: "max" or "rms" (see `ERROR_NORMS`).

    Returns:
        (x, nfe): samples of `shape` and the number of score evaluations.

    Raises:
        ValueError: invalid arguments. RuntimeError: the solve failed or went non-finite.
    """
    check_solve_inputs(sde, score_fn, rtol=rtol, atol=atol, method=method, eps=eps,
                       error_norm=error_norm, methods=ADAPTIVE_METHODS, error_norms=ERROR_NORMS)
    shape = check_shape(shape)
    if denoise and not sde.has_marginal:
        raise ValueError(f"denoise=True needs the marginal of {type(sde).__name__}, which has "
                         f"none; pass denoise=False")
    device = sample_device(device, generator)
    dtype = sample_dtype(dtype)
    with torch.no_grad():
        z = sde.prior_sampling(shape, generator=generator, device=device,
                              dtype=state_dtype(dtype))
    x, nfe = pf_ode_solve(sde, score_fn, z, sde.T, eps, rtol=rtol, atol=atol, method=method,
                          eps=eps, error_norm=error_norm, dtype=dtype)
    if denoise:
        counting = CountingScore(score_fn, eps, sde.T)
        with torch.no_grad():
            t = torch.full((shape[0],), eps, dtype=torch.float64, device=device)
            x = sde.denoise(x, t, counting(x, t))
        nfe += counting.nfe
        _check_finite(x, "the denoised sample")
    return x, nfe
