"""Forward SDEs dx = f(x, t) dt + g(t) dw and their reverses.

Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
(ICLR): the forward SDE is Eq. (5), the reverse-time SDE Eq. (6), the probability-flow ODE
Eq. (13); VE, VP and sub-VP are Eqs. (9), (11) and (12). The DDPM (Ho et al. 2020) and SMLD
(Song & Ermon 2019) discretizations are Eqs. (8) and (10) / Appendix E. The cosine schedule is
Nichol & Dhariwal 2021, Eq. (17).

Conventions: `x` has shape [B, ...] (any rank), `t` has shape [B]. Schedule coefficients are
computed in float64 and returned in the dtype of `x` (or of `t` where there is no `x`).
"""
import abc
import copy
import math
from typing import Callable, Optional, Tuple

import torch

from ._utils import (append_dims, at_least_float32, cached_on, check_batch_time, check_int,
                     check_positive, check_time, check_time_range, flat_sum, float64_like,
                     value_checks_wanted, warn_caller)

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Round-off allowance of `SDE.step_index`, in steps.
STEP_INDEX_SLACK = 1e-9

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "ReverseSDE"]


def _t64(t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """t checked for shape, dtype and range [0, T] (see `check_time_range`), in float64 and
    clamped to [0, T]: the check allows round-off just outside, where sqrt(1 - alpha^2) and
    similar forms would give NaN."""
    check_time(t)
    check_time_range(t, 0.0, T)
    return t.to(float64_like(t)).clamp(0.0, T)


def _gaussian_logp(z: torch.Tensor, std: float) -> torch.Tensor:
    """log N(z; 0, std^2 I) per sample, accumulated in float64; returned in z's dtype, or
    float32 for half-precision z (whose range ends at 65504, below a large image's value)."""
    if not isinstance(z, torch.Tensor) or z.ndim < 1 or z.shape[0] == 0:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a tensor [B, ...] with B >= 1 samples, got {got}")
    z64 = z.to(float64_like(z))
    d = z[0].numel()
    logp = -0.5 * d * math.log(2 * math.pi * std ** 2) - flat_sum(z64 ** 2) / (2 * std ** 2)
    return logp.to(torch.promote_types(z.dtype, torch.float32))


class SDE(abc.ABC):
    """Base class of forward SDEs dx = f(x, t) dt + g(t) dw on [0, T] with scalar diffusion.

    Subclasses implement `sde` (a drift differentiable in x: the likelihood takes its
    divergence), `prior_sampling` and `prior_logp`; linear SDEs also implement
    `marginal_coeffs` (needed by denoising, the ancestral predictor, annealed Langevin, the
    training losses, the fast samplers, controllable generation and network outputs other
    than the score). A subclass whose `discretize` or `langevin_scale` reads tables of its
    discrete chain builds them in `build_chain`. The predictor-corrector and ODE samplers and
    the likelihood work with any subclass.

    Args:
        num_steps: number of discretization steps of [0, T] used by `discretize` and as the
            default step count of the samplers.
    """

    # True when `discretize` or `langevin_scale` look up the chain's step of t (`step_index`)
    # rather than stepping by dt.
    indexes_chain = False
    # The time at which samplers conventionally stop: 1e-3 for the VP family, 1e-5 for VE
    # (the sampling eps of the paper's public code). The tools and the trainer's sample
    # grids use it when no eps is given.
    sampling_eps = 1e-3

    def __init__(self, num_steps: int = 1000):
        check_int("num_steps", num_steps, minimum=1)
        self.num_steps = num_steps

    @property
    def T(self) -> float:
        """End time of the forward process."""
        return 1.0

    def with_num_steps(self, num_steps: int) -> "SDE":
        """A copy of this SDE whose discrete chain (`discretize`) has `num_steps` steps, with
        every table derived from the step count rebuilt (`build_chain`). The continuous SDE
        is unchanged, except for `CosineVPSDE`, whose beta cap follows the step count.

        Raises:
            ValueError: `num_steps` is invalid for this SDE's chain.
        """
        check_int("num_steps", num_steps, minimum=1)
        new = copy.copy(self)
        new.num_steps = num_steps
        new.__dict__.pop("_device_tables", None)  # device copies of the old chain's tables
        cls = type(self)
        if (num_steps != self.num_steps and cls.build_chain is SDE.build_chain
                and (cls.discretize is not SDE.discretize
                     or cls.langevin_scale is not SDE.langevin_scale)):
            warn_caller(f"{cls.__name__} overrides discretize or langevin_scale but not "
                        f"build_chain: tables of its chain built for {self.num_steps} steps "
                        f"are not rebuilt for {num_steps}; build them in build_chain (a no-op "
                        f"override says there are none)")
        new.build_chain()
        return new

    def build_chain(self) -> None:
        """Builds the tables of the discrete chain for `self.num_steps` (none by default).
        `with_num_steps` calls it on its copy (`sample_pc` with its own `num_steps`): a
        subclass whose `discretize` or `langevin_scale` reads tables of the chain (its
        discrete betas, say) builds them here, and calls it from `__init__`."""

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) shaped like x and diffusion g(t) of shape [B]."""

    @abc.abstractmethod
    def prior_sampling(self, shape, *, generator: Optional[torch.Generator] = None,
                       device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Draws `shape` = [B, ...] samples from the prior p_T."""

    @abc.abstractmethod
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at z [B, ...], in nats, shape [B] (z's dtype, at least
        float32)."""

    @property
    def has_marginal(self) -> bool:
        """Whether this SDE provides closed-form Gaussian marginals (`marginal_coeffs`)."""
        return type(self).marginal_coeffs is not SDE.marginal_coeffs

    def marginal_coeffs(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Coefficients of the perturbation kernel p_t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I).

        Args:
            t: times, shape [B].

        Returns:
            (alpha, sigma), each of shape [B] in the dtype of `t` (computed in float64).

        Raises:
            NotImplementedError: for SDEs without closed-form marginals (see `has_marginal`).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form marginal; implement marginal_coeffs(t)")

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean [B, ...] and std [B] of p_t(x_t | x_0 = x)."""
        check_batch_time(x, t)
        alpha, sigma = self.marginal_coeffs(_t64(t, self.T))
        return append_dims(alpha.to(x.dtype), x.ndim) * x, sigma.to(x.dtype)

    def discretize(self, x: torch.Tensor, t: torch.Tensor,
                   dt: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One step x_{i+1} = x_i + f_i + G_i z of the forward process.

        The default is Euler–Maruyama with step `dt` ([B], default T / num_steps); VP uses the
        DDPM form and VE the SMLD form, whose steps are those of their `num_steps` chain and
        ignore `dt`.

        Returns:
            f shaped like x and G of shape [B].
        """
        drift, diffusion = _checked_terms(self, "sde", x, self.sde(x, t))
        if dt is None:
            dt = torch.full_like(diffusion, self.T / self.num_steps)
        dt = dt.to(x.dtype)
        return drift * append_dims(dt, x.ndim), diffusion * torch.sqrt(dt)

    def langevin_scale(self, t: torch.Tensor) -> torch.Tensor:
        """Factor alpha_i of the Langevin step 2 alpha_i (snr |z| / |score|)^2; 1 by default."""
        check_time(t)
        return torch.ones_like(t)

    def step_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index i = floor(t (num_steps - 1) / T) in [0, num_steps - 1] of the discrete step at
        time t, as in the paper's code.

        Step i belongs to the chain time i T / (num_steps - 1), so the sampler grid
        linspace(T, eps, num_steps) meets every step exactly once, noisiest first, whenever
        eps < T / (num_steps - 1); rounding to the nearest step instead would skip some steps
        and use others twice. A time within 1e-9 steps below i T / (num_steps - 1) counts as
        step i, so round-off in computing that time does not move it to step i - 1.

        Args:
            t: times [B] in [0, T].

        Returns:
            int64 tensor [B].
        """
        i = torch.floor(_t64(t, self.T) * ((self.num_steps - 1) / self.T) + STEP_INDEX_SLACK)
        return i.long().clamp(0, self.num_steps - 1)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Tweedie's formula E[x_0 | x_t = x] = (x + sigma(t)^2 score) / alpha(t).

        Raises:
            ValueError: t outside [0, T], or alpha(t) = 0 (nothing of x_0 is left to recover).
        """
        check_batch_time(x, t)
        alpha, sigma = self.marginal_coeffs(_t64(t, self.T))
        # In at least float32 (sigma^2 overflows float16 above sigma = 256): test alpha there.
        work = at_least_float32(x.dtype)
        alpha = alpha.to(work)
        if value_checks_wanted(alpha) and bool((alpha <= 0).any()):
            raise ValueError(f"denoise needs alpha(t) > 0; alpha underflows to 0 in {work} "
                             f"at t = {float(t[alpha <= 0][0]):g} for this "
                             f"{type(self).__name__}")
        alpha, sigma = append_dims(alpha, x.ndim), append_dims(sigma, x.ndim)
        return ((x.to(work) + (sigma ** 2).to(work) * score.to(work)) / alpha).to(x.dtype)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (Eq. 6) or, with `probability_flow`, the probability-flow ODE."""
        return ReverseSDE(self, score_fn, probability_flow=probability_flow)


class _VPFamily(SDE):
    """SDEs with drift -beta(t) x / 2 and prior N(0, I), whose marginal mean coefficient is
    alpha(t) = exp(-1/2 int_0^t beta(s) ds) (Song et al. 2021, Eqs. 11-12, Appendix B).

    As written here they are VP SDEs: diffusion sqrt(beta(t)), sigma(t)^2 = 1 - alpha(t)^2, and
    the DDPM chain of `discrete_betas` (built by `build_chain`). Subclasses give beta(t) and
    log alpha(t); sub-VP overrides the diffusion, sigma and the chain.
    """

    discrete_betas: torch.Tensor  # [num_steps] float64
    indexes_chain = True

    @abc.abstractmethod
    def _beta(self, t64: torch.Tensor) -> torch.Tensor:
        """beta(t) in float64."""

    @abc.abstractmethod
    def _log_alpha(self, t64: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -1/2 int_0^t beta(s) ds in float64."""

    def _g2(self, beta: torch.Tensor, t64: torch.Tensor) -> torch.Tensor:
        """g(t)^2 in float64 from beta(t): beta itself for VP."""
        return beta

    def _sigma(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The marginal std from log alpha(t), float64: sigma^2 = 1 - alpha^2 for VP (expm1
        keeps it accurate for small t)."""
        return torch.sqrt(-torch.expm1(2 * log_alpha))

    def sde(self, x, t):
        check_batch_time(x, t)
        t64 = _t64(t)
        beta = self._beta(t64)
        drift = -0.5 * append_dims(beta.to(x.dtype), x.ndim) * x
        return drift, torch.sqrt(self._g2(beta, t64)).to(x.dtype)

    def marginal_coeffs(self, t):
        log_alpha = self._log_alpha(_t64(t))
        return torch.exp(log_alpha).to(t.dtype), self._sigma(log_alpha).to(t.dtype)

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return _gaussian_logp(z, 1.0)

    def _beta_i(self, t):
        return cached_on(self, self.discrete_betas, t.device)[self.step_index(t)]

    def discretize(self, x, t, dt=None):
        """DDPM step x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z (Ho et al. 2020, Eq. 2)."""
        check_batch_time(x, t)
        beta = self._beta_i(t)
        f = append_dims((torch.sqrt(1 - beta) - 1).to(x.dtype), x.ndim) * x
        return f, torch.sqrt(beta).to(x.dtype)

    def langevin_scale(self, t):
        return (1 - self._beta_i(t)).to(t.dtype)


class _LinearBeta(_VPFamily):
    """The linear schedule beta(t) = beta_min + t (beta_max - beta_min) on [0, 1] of VP and
    sub-VP (Song et al. 2021, Eqs. 11-12), with log alpha(t) = -t^2 (beta_max - beta_min) / 4
    - t beta_min / 2.

    Args:
        beta_min: beta(0).
        beta_max: beta(1).
        num_steps: discretization steps.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, num_steps: int = 1000):
        super().__init__(num_steps)
        check_positive("beta_min", beta_min)
        check_positive("beta_max", beta_max)
        if beta_max < beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got {beta_max} < {beta_min}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.build_chain()

    def _beta(self, t64):
        return self.beta_min + t64 * (self.beta_max - self.beta_min)

    def _log_alpha(self, t64):
        return -0.25 * t64 ** 2 * (self.beta_max - self.beta_min) - 0.5 * t64 * self.beta_min


class VPSDE(_LinearBeta):
    """Variance-preserving SDE, the continuous limit of DDPM (Song et al. 2021, Eq. 11).

    beta(t) = beta_min + t (beta_max - beta_min) on [0, 1]; alpha(t) = exp(-t^2 (beta_max -
    beta_min) / 4 - t beta_min / 2), sigma(t)^2 = 1 - alpha(t)^2; prior N(0, I).

    Args:
        beta_min: beta(0).
        beta_max: beta(1).
        num_steps: discretization steps (>= 2); the DDPM chain uses betas beta_min/N ... beta_max/N.
    """

    def build_chain(self):
        n = self.num_steps
        if self.beta_max / n >= 1:
            raise ValueError(f"beta_max / num_steps must be < 1 for the DDPM chain, got "
                             f"{self.beta_max} / {n}")
        if n < 2:  # linspace(beta_min, beta_max, 1) would be beta_min alone
            raise ValueError(f"the DDPM chain needs num_steps >= 2 (its betas run from "
                             f"beta_min / N to beta_max / N), got {n}")
        self.discrete_betas = torch.linspace(self.beta_min / n, self.beta_max / n, n,
                                             dtype=torch.float64)


class SubVPSDE(_LinearBeta):
    """Sub-VP SDE (Song et al. 2021, Eq. 12): the VP drift with a smaller diffusion.

    g(t)^2 = beta(t) (1 - exp(-2 beta_min t - (beta_max - beta_min) t^2)), so the marginal std is
    sigma(t) = 1 - alpha(t)^2 (not its square root) with the VP alpha(t); prior N(0, I).
    Discretized by Euler–Maruyama: sub-VP has no DDPM chain.

    Args:
        beta_min: beta(0).
        beta_max: beta(1).
        num_steps: discretization steps.
    """

    indexes_chain = False
    discretize = SDE.discretize
    langevin_scale = SDE.langevin_scale

    def _g2(self, beta, t64):
        # 1 - exp(-2 beta_min t - (beta_max - beta_min) t^2) = 1 - alpha^4.
        return beta * -torch.expm1(4 * self._log_alpha(t64))

    def _sigma(self, log_alpha):
        return -torch.expm1(2 * log_alpha)


class CosineVPSDE(_VPFamily):
    """VP SDE with the cosine schedule of improved DDPM (Nichol & Dhariwal 2021, Eq. 17).

    alpha(t)^2 = f(t) / f(0) with f(t) = cos^2((t + s) / (1 + s) * pi / 2), so
    beta(t) = pi / (1 + s) * tan((t + s) / (1 + s) * pi / 2). As in the paper, beta is clipped
    near t = 1: a discrete beta_i may not exceed `max_beta`, which in continuous time caps
    beta(t) at -num_steps * log(1 - max_beta); alpha(t) integrates the clipped beta, so the
    discrete chain and the continuous SDE share their marginals exactly. The cap therefore
    depends on `num_steps`: `with_num_steps` (which `sample_pc` calls) rebuilds it with the
    chain, so every chain keeps its betas <= max_beta. The schedules of different step counts
    differ only where beta(t) exceeds the smaller cap: at 10 steps for t > 0.971, where
    alpha(t) < 0.046; at 1000 steps for t > 0.9997.

    Args:
        s: offset that keeps beta small near t = 0.
        max_beta: largest discrete beta (0.999 in the paper).
        num_steps: discretization steps.
    """

    def __init__(self, s: float = 0.008, max_beta: float = 0.999, num_steps: int = 1000):
        super().__init__(num_steps)
        check_positive("s", s)
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta must lie in (0, 1), got {max_beta!r}")
        self.s, self.max_beta = float(s), float(max_beta)
        self.build_chain()

    def build_chain(self):
        # Continuous cap: a step of length 1/N at rate beta_cap multiplies alpha^2 by
        # 1 - max_beta. It changes with N, so it is rebuilt with the chain.
        self.beta_cap = -self.num_steps * math.log1p(-self.max_beta)
        u_cap = math.atan(self.beta_cap * (1 + self.s) / math.pi)
        self.t_cap = min(max(u_cap * 2 / math.pi * (1 + self.s) - self.s, 0.0), 1.0)
        # The chain's betas are exact for the continuous schedule on the grid i / num_steps.
        grid = torch.linspace(0, 1, self.num_steps + 1, dtype=torch.float64)
        log_alpha = self._log_alpha(grid)
        self.discrete_betas = -torch.expm1(2 * (log_alpha[1:] - log_alpha[:-1]))

    def _u(self, t64):
        return (t64 + self.s) / (1 + self.s) * (math.pi / 2)

    def _beta(self, t64):
        beta = math.pi / (1 + self.s) * torch.tan(self._u(t64.clamp(max=self.t_cap)))
        return torch.where(t64 < self.t_cap, beta, torch.full_like(t64, self.beta_cap))

    def _log_alpha(self, t64):
        t_in = t64.clamp(max=self.t_cap)
        u = self._u(t_in)
        u0 = self.s / (1 + self.s) * math.pi / 2
        # log(cos u / cos u0) without cancellation: cos u - cos u0 = -2 sin((u+u0)/2) sin((u-u0)/2),
        # with u - u0 = t pi / (2 (1 + s)) from t itself (u - u0 loses t's digits at tiny t).
        half_gap = t_in / (1 + self.s) * (math.pi / 4)
        log_f = torch.log1p(-2 * torch.sin((u + u0) / 2) * torch.sin(half_gap) / math.cos(u0))
        return log_f - 0.5 * self.beta_cap * (t64 - self.t_cap).clamp(min=0)


class VESDE(SDE):
    """Variance-exploding SDE, the continuous limit of SMLD/NCSN (Song et al. 2021, Eq. 9).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t, drift 0, diffusion
    g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)); prior N(0, sigma_max^2 I).

    The marginal std is the exact one of this SDE started at t = 0,
    sqrt(sigma(t)^2 - sigma_min^2); some implementations use sigma(t), which treats the data as
    already perturbed with noise sigma_min.

    Args:
        sigma_min: noise scale at t = 0.
        sigma_max: noise scale at t = 1.
        num_steps: discretization steps (>= 2); the SMLD chain uses geometric sigmas.
    """

    indexes_chain = True
    sampling_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, num_steps: int = 1000):
        super().__init__(num_steps)
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_max", sigma_max)
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min, got {sigma_max} <= {sigma_min}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max / sigma_min)
        self.build_chain()

    def build_chain(self):
        if self.num_steps < 2:  # one level would be sigma_min alone
            raise ValueError(f"the SMLD chain needs num_steps >= 2 (its noise levels run from "
                             f"sigma_min to sigma_max), got {self.num_steps}")
        self.discrete_sigmas = torch.exp(torch.linspace(
            math.log(self.sigma_min), math.log(self.sigma_max), self.num_steps,
            dtype=torch.float64))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise scale sigma(t) = sigma_min (sigma_max / sigma_min)^t, in t's dtype."""
        return (self.sigma_min * torch.exp(_t64(t) * self._log_ratio)).to(t.dtype)

    def sde(self, x, t):
        check_batch_time(x, t)
        diffusion = self.sigma_min * torch.exp(_t64(t) * self._log_ratio) \
            * math.sqrt(2 * self._log_ratio)
        return torch.zeros_like(x), diffusion.to(x.dtype)

    def marginal_coeffs(self, t):
        t64 = _t64(t)
        sigma = self.sigma_min * torch.sqrt(torch.expm1(2 * self._log_ratio * t64))
        return torch.ones_like(t), sigma.to(t.dtype)

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        return torch.randn(tuple(shape), generator=generator, device=device,
                           dtype=dtype) * self.sigma_max

    def prior_logp(self, z):
        return _gaussian_logp(z, self.sigma_max)

    def discretize(self, x, t, dt=None):
        """SMLD step x_{i+1} = x_i + sqrt(sigma_{i+1}^2 - sigma_i^2) z, with sigma_{-1} = 0."""
        check_batch_time(x, t)
        i = self.step_index(t)
        sigmas = cached_on(self, self.discrete_sigmas, t.device)
        sigma = sigmas[i]
        prev = torch.where(i > 0, sigmas[(i - 1).clamp(min=0)], torch.zeros_like(sigma))
        return torch.zeros_like(x), torch.sqrt(sigma ** 2 - prev ** 2).to(x.dtype)


def check_sde(sde) -> None:
    """Raises ValueError unless `sde` is an `SDE` instance (`score_sde.checks` re-exports it
    beside the other argument checks; it lives here so that `ReverseSDE` can use it)."""
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be an instance of score_sde.SDE, got {type(sde).__name__}")


def _checked_terms(sde: SDE, method: str, x: torch.Tensor, terms) -> Tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """(drift, diffusion) returned by `sde.<method>(x, ...)`, checked against the contract
    (drift shaped like x, diffusion a tensor [B]) so that a user SDE that breaks it gets a
    clear error rather than a broadcasting failure, or wrong steps, further on."""
    ok = isinstance(terms, tuple) and len(terms) == 2
    drift, diffusion = terms if ok else (None, None)
    if not (ok and isinstance(drift, torch.Tensor) and drift.shape == x.shape
            and isinstance(diffusion, torch.Tensor) and diffusion.shape == x.shape[:1]):
        got = (", ".join(str(tuple(v.shape)) if isinstance(v, torch.Tensor)
                         else type(v).__name__ for v in terms) if ok else type(terms).__name__)
        raise ValueError(f"{type(sde).__name__}.{method} must return (drift shaped like x "
                         f"{tuple(x.shape)}, diffusion of shape [B] = ({x.shape[0]},)), got "
                         f"({got})")
    return drift, diffusion


class ReverseSDE:
    """The reverse-time SDE of `sde` (Eq. 6) or its probability-flow ODE (Eq. 13).

    Drift in forward-time notation, dx = [f - c g^2 score] dt + [g dw_bar if not an ODE] with
    c = 1 for the SDE and 1/2 for the ODE; integrate it from T down to 0.

    Args:
        sde: the forward SDE.
        score_fn: callable (x [B, ...], t [B]) -> score shaped like x.
        probability_flow: use the probability-flow ODE (zero diffusion).
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        check_sde(sde)
        if not callable(score_fn):
            raise ValueError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.forward_sde = sde
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self._c = 0.5 if self.probability_flow else 1.0

    @property
    def T(self) -> float:
        return self.forward_sde.T

    @property
    def num_steps(self) -> int:
        return self.forward_sde.num_steps

    def sde(self, x: torch.Tensor, t: torch.Tensor,
            score: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reverse drift shaped like x and diffusion [B] (zeros for the ODE).

        Args:
            x: states [B, ...].
            t: times [B].
            score: the score at (x, t) if already computed; otherwise `score_fn` is called.
        """
        drift, diffusion = _checked_terms(self.forward_sde, "sde", x,
                                          self.forward_sde.sde(x, t))
        if score is None:
            score = self.score_fn(x, t)
        g2 = append_dims(diffusion ** 2, x.ndim)
        drift = drift - self._c * g2 * score
        if self.probability_flow:
            diffusion = torch.zeros_like(diffusion)
        return drift, diffusion

    def discretize(self, x: torch.Tensor, t: torch.Tensor, score: Optional[torch.Tensor] = None,
                   dt: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reverse step x_{i-1} = x_i - rev_f + rev_G z built from the forward discretization
        (`dt` as in `SDE.discretize`)."""
        f, G = _checked_terms(self.forward_sde, "discretize", x,
                              self.forward_sde.discretize(x, t, dt=dt))
        if score is None:
            score = self.score_fn(x, t)
        rev_f = f - self._c * append_dims(G ** 2, x.ndim) * score
        rev_G = torch.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G
