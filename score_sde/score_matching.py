"""Continuous-time denoising score matching: `ScoreMatchingLoss` (Song et al. 2021, Eq. 7)
with lambda(t) = sigma(t)^2 or the likelihood weighting lambda(t) = g(t)^2 of Song, Durkan,
Murray & Ermon 2021 ("Maximum Likelihood Training of Score-Based Diffusion Models",
Theorem 1), optionally with their importance sampling of t; its weightings (`WEIGHTINGS`) and
the reductions of per-element errors every loss shares (`REDUCTIONS`).

Users import the losses from `score_sde.losses`, whose docstring states the conventions.
"""
import math
from typing import Optional, Tuple

import torch

from ._utils import (append_dims, at_least_float32, cached_on, check_choice, check_int,
                     check_time_range, checks_times_on_host, flat_sum, float64_like)
from .checks import check_eps, check_sde, sample_device
from .score import _time_in_interval
from .sde import SDE, ScoreFn, _checked_terms

__all__ = ["ScoreMatchingLoss", "WEIGHTINGS", "REDUCTIONS"]


def _mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


# Reduction of per-element squared errors [B, ...] -> [B].
REDUCTIONS = {"mean": _mean_over_dims, "sum": flat_sum}


def _sigma2_factor(sde: SDE, t64: torch.Tensor, sigma64: torch.Tensor,
                   like: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ones_like(t64)


def _likelihood_factor(sde: SDE, t64: torch.Tensor, sigma64: torch.Tensor,
                       like: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _diffusion(sde, t64, like) ** 2 / sigma64 ** 2


def _diffusion(sde: SDE, t64: torch.Tensor, like: Optional[torch.Tensor]) -> torch.Tensor:
    """g(t) [n] in float64 from `sde.sde` at a float64 zero standing in for x: shaped like the
    samples of `like`, or [n, 1] without data (the importance table), where a drift written
    for the data's shape may fail; the diffusion must not depend on x."""
    x = torch.zeros((t64.shape[0],) + (tuple(like.shape[1:]) if like is not None else (1,)),
                    dtype=t64.dtype, device=t64.device)
    try:
        terms = sde.sde(x, t64)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        if like is not None:
            raise
        raise ValueError(f"importance sampling tabulates g(t) with {type(sde).__name__}.sde on "
                         f"a [n, 1] stand-in for x, which failed ({str(err)[:120]}); its drift "
                         f"must accept any sample shape there, and g must not depend on x"
                         ) from None
    return _checked_terms(sde, "sde", x, terms)[1]


# Weighting name -> lambda(t) / sigma(t)^2 in float64, as a function of (sde, t, sigma(t),
# a tensor shaped like the data, or None).
WEIGHTINGS = {"sigma2": _sigma2_factor, "likelihood": _likelihood_factor}

# Points of the float64 table that inverts the importance-sampling CDF.
_TABLE_POINTS = 10_000


def _check_fn(name: str, fn) -> None:
    if not callable(fn):
        raise ValueError(f"{name} must be callable, got {type(fn).__name__}")


def _check_x(x) -> None:
    if (not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point()
            or x.numel() == 0):
        got = (f"dtype {x.dtype} and shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"x must be a floating tensor of shape [B, ...] with rank >= 2, B >= 1 "
                         f"and at least one element per sample, got {got}")


def _check_noise(noise, x: torch.Tensor) -> None:
    if not isinstance(noise, torch.Tensor) or noise.shape != x.shape or noise.dtype != x.dtype:
        got = (f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, torch.Tensor)
               else type(noise).__name__)
        raise ValueError(f"noise must be a tensor shaped like x ({x.dtype} {tuple(x.shape)}), "
                         f"got {got}")


def _check_output(name: str, out, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must return a tensor shaped like x {tuple(x.shape)}, got {got}")


class ScoreMatchingLoss:
    """Continuous-time denoising score matching (Song et al. 2021, Eq. 7).

    For t ~ U(eps, T), z ~ N(0, I) and x_t = alpha(t) x + sigma(t) z (the perturbation kernel
    of `sde.marginal_coeffs`), the conditional score is -z / sigma(t) and the per-sample loss is

        lambda(t) * reduce((s(x_t, t) + z / sigma(t))^2)  =  lambda(t) / sigma(t)^2 *
        reduce((sigma(t) s(x_t, t) + z)^2),

    with no factor 1/2 (Eq. 7 has none). Weightings:

    - "sigma2": lambda = sigma(t)^2, the loss is the noise-prediction error |sigma s + z|^2
      (the reference implementation's default);
    - "likelihood": lambda = g(t)^2 from `sde.sde` (Song, Durkan, Murray & Ermon 2021). With
      reduction="sum", (T - eps) / 2 times this loss is their J_DSM(theta; g^2) on [eps, T],
      which bounds the negative log-likelihood up to terms free of theta (Theorem 1).

    With `importance_sampling` (likelihood weighting only), t is drawn with density
    p(t) = g(t)^2 / sigma(t)^2 / Z on [eps, T] and each sample's loss is multiplied by the
    importance weight 1 / ((T - eps) p(t)), so the expectation is unchanged while the
    variance drops (the weighted loss is Z / (T - eps) |sigma s + z|^2). p's CDF is tabulated
    once in float64 by the trapezoid rule on a grid log-spaced from eps (g^2 / sigma^2 ~ 1/t
    there) and inverted by linear interpolation; the weight uses the density of exactly that
    piecewise-linear CDF, so the estimator is unbiased whatever the table's resolution.

    Args:
        sde: a forward SDE with closed-form marginals (`sde.has_marginal`).
        weighting: "sigma2" or "likelihood" (see `WEIGHTINGS`).
        reduction: "mean" or "sum" over the non-batch dimensions (see `REDUCTIONS`).
        eps: smallest training time, in (0, T) (1e-5 in the paper).
        importance_sampling: sample t from p(t) above (needs weighting="likelihood").

    Raises:
        ValueError: an unknown weighting or reduction, an SDE without marginals, an invalid
            eps, importance sampling with weighting="sigma2", or g^2 / sigma^2 not finite and
            positive on [eps, T].
    """

    def __init__(self, sde: SDE, *, weighting: str = "sigma2", reduction: str = "mean",
                 eps: float = 1e-5, importance_sampling: bool = False):
        check_sde(sde)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("reduction", reduction, REDUCTIONS)
        check_eps(eps, sde)
        if not sde.has_marginal:
            raise ValueError(f"ScoreMatchingLoss needs the closed-form marginal of "
                             f"{type(sde).__name__} (marginal_coeffs), which it lacks")
        if not isinstance(importance_sampling, bool):
            raise ValueError(f"importance_sampling must be a bool, got {importance_sampling!r}")
        if importance_sampling and weighting != "likelihood":
            raise ValueError(f"importance_sampling=True needs weighting='likelihood', got "
                             f"weighting={weighting!r}")
        self.sde, self.weighting, self.reduction = sde, weighting, reduction
        self.eps, self.importance_sampling = float(eps), importance_sampling
        self._factor, self._reduce = WEIGHTINGS[weighting], REDUCTIONS[reduction]
        if importance_sampling:
            self._t_grid, self._cdf = self._importance_table()

    def _importance_table(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Grid [n] and normalized CDF [n] of p(t) ~ g^2 / sigma^2, float64 on the CPU."""
        t = torch.logspace(math.log10(self.eps), math.log10(self.sde.T), _TABLE_POINTS,
                           dtype=torch.float64)
        t[0], t[-1] = self.eps, self.sde.T  # exact ends despite log/exp round-off
        _, sigma = self.sde.marginal_coeffs(t)
        density = _likelihood_factor(self.sde, t, sigma.to(torch.float64))
        if not (torch.isfinite(density).all() and (density > 0).all()):
            raise ValueError(f"importance sampling needs g(t)^2 / sigma(t)^2 finite and > 0 on "
                             f"[eps, T] for {type(self.sde).__name__}; raise eps={self.eps}")
        cells = 0.5 * (density[1:] + density[:-1]) * torch.diff(t)
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(cells, 0)])
        return t, cdf / cdf[-1]

    def sample_time(self, batch: int, *, generator: Optional[torch.Generator] = None,
                    device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draws training times and their importance weights.

        Args:
            batch: number of times B.
            generator: torch.Generator for the draw.
            device: device of the result; defaults to the generator's device, else the CPU.

        Returns:
            (t, weight), each [B] in float64 (float32 on MPS): t ~ U(eps, T) with weight 1, or,
            with importance sampling, t ~ p(t) with weight 1 / ((T - eps) p(t)).
        """
        check_int("batch", batch, minimum=1)
        device = sample_device(device, generator)
        wide = float64_like(torch.empty(0, device=device))
        u = torch.rand(batch, generator=generator, device=device, dtype=wide)
        if not self.importance_sampling:
            return self.eps + (self.sde.T - self.eps) * u, torch.ones_like(u)
        grid, cdf = cached_on(self, self._t_grid, device, wide), cached_on(self, self._cdf, device,
                                                                          wide)
        k = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, grid.shape[0] - 2)
        dt, dcdf = grid[k + 1] - grid[k], cdf[k + 1] - cdf[k]
        t = (grid[k] + (u - cdf[k]) / dcdf * dt).clamp(self.eps, self.sde.T)
        # The sampled density is piecewise constant, dcdf / dt on cell k.
        return t, dt / (dcdf * (self.sde.T - self.eps))

    def _per_sample(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
        t64 = t.to(float64_like(t))
        alpha64, sigma64 = self.sde.marginal_coeffs(t64)
        alpha = append_dims(alpha64.to(x.dtype), x.ndim)
        sigma = append_dims(sigma64.to(x.dtype), x.ndim)
        x_t = alpha * x + sigma * noise
        score = score_fn(x_t, t.to(x.dtype))
        _check_output("score_fn", score, x)
        score = score.to(x.dtype)  # the residual is in x's dtype, whatever the network returns
        # The weights and the sums are at least float32: the likelihood weight g^2 / sigma^2 is
        # about 1 / t, 1e5 at t = 1e-5, beyond float16's 65504.
        acc = at_least_float32(x.dtype)
        factor = self._factor(self.sde, t64, sigma64, x).to(acc)
        return factor * self._reduce((sigma * score + noise).to(acc) ** 2)

    def per_sample(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss for given times and noise (deterministic; no importance weight).

        Args:
            score_fn: score function (x_t [B, ...], t [B] in x's dtype) -> score shaped like x.
            x: clean data [B, ...] (rank >= 2), floating.
            t: times [B], floating; coefficients are computed in float64 from them.
            noise: z shaped like x, in x's dtype.

        Returns:
            lambda(t) reduce((s(x_t, t) + z / sigma(t))^2), shape [B], in x's dtype or float32
            for half-precision x (whose range the weight can exceed).

        Raises:
            ValueError: malformed x, t or noise, or a score of the wrong shape.
        """
        _check_fn("score_fn", score_fn)
        _check_x(x)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() \
                or t.shape != (x.shape[0],):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be a floating tensor of shape [B]=({x.shape[0]},), got {got}")
        # sigma(0) = 0: the target z / sigma(t) and the likelihood weight divide by it.
        check_time_range(t, 0.0, self.sde.T, open_lo=True)
        _check_noise(noise, x)
        return self._per_sample(score_fn, x, t, noise)

    @checks_times_on_host
    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None,
                 shard: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Monte-Carlo estimate of the loss on a batch: one (t, z) draw per sample.

        Args:
            score_fn: score function (x_t [B, ...], t [B] in x's dtype, in [eps, T]) -> score
                shaped like x; wrap a network with `score_sde.make_score_fn`.
            x: clean data [B, ...] (rank >= 2), floating.
            generator: torch.Generator on x's device for t and z.
            shard: (rank, world_size) when x is the rank-th contiguous shard of a global batch
                of world_size * B samples: t and z are drawn for the whole global batch and
                this shard's slice is kept, so every process sees the draws one process would.

        Returns:
            Scalar in x's dtype (float32 for half-precision x): the batch mean of (importance
            weight x) per-sample loss.

        Raises:
            ValueError: malformed x or shard, or a score of the wrong shape.
        """
        _check_fn("score_fn", score_fn)
        _check_x(x)
        rank = world = None  # stays so for a malformed shard
        if shard is None:
            rank, world = 0, 1
        elif isinstance(shard, (tuple, list)) and len(shard) == 2:
            rank, world = shard
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int)
                and 0 <= rank < world):
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, "
                             f"got {shard!r}")
        b = x.shape[0]
        keep = slice(rank * b, (rank + 1) * b)
        t64, weight = self.sample_time(world * b, generator=generator, device=x.device)
        noise = torch.randn((world * b,) + x.shape[1:], generator=generator, device=x.device,
                            dtype=x.dtype)[keep]
        # The network sees t in x's dtype; keep a float32 eps from rounding below eps.
        t = _time_in_interval(t64[keep], self.eps, self.sde.T, x.dtype)
        losses = self._per_sample(score_fn, x, t, noise)
        if self.importance_sampling:
            losses = weight[keep].to(losses.dtype) * losses
        return losses.mean()

