"""The discrete-time ancestors of denoising score matching, on the chains of `VPSDE` /
`CosineVPSDE` (DDPM) and `VESDE` (SMLD):

- `DDPMLoss`: L_simple of Ho et al. 2020, Eq. (14).
- `SMLDLoss`: Song & Ermon 2019, Eqs. (5)-(6), with lambda(sigma) = sigma^2.
- `HybridLoss`: L_simple + lambda L_vlb with a learned reverse variance, Nichol & Dhariwal 2021,
  Eqs. (15)-(16).

Users import them from `score_sde.losses`, whose docstring states the conventions.
"""
import math
from typing import Callable, Optional

import torch

from ._utils import (append_dims, at_least_float32, cached_on, check_choice, check_positive,
                     checks_times_on_host)
from .checks import check_sde
from .score_matching import REDUCTIONS, _check_fn, _check_noise, _check_output, _check_x
from .sde import SDE

__all__ = ["DDPMLoss", "SMLDLoss", "HybridLoss"]


def _check_index(i, x: torch.Tensor, num_steps: int) -> None:
    if not isinstance(i, torch.Tensor) or i.dtype != torch.long or i.shape != (x.shape[0],):
        got = f"{i.dtype} {tuple(i.shape)}" if isinstance(i, torch.Tensor) else type(i).__name__
        raise ValueError(f"i must be a long tensor of shape [B]=({x.shape[0]},), got {got}")
    if i.numel() and (i.min() < 0 or i.max() >= num_steps):
        raise ValueError(f"i must lie in [0, {num_steps - 1}], got values in "
                         f"[{i.min().item()}, {i.max().item()}]")


def _discrete_attr(sde, attr: str, loss: str, sdes: str) -> torch.Tensor:
    check_sde(sde)
    values = getattr(sde, attr, None)
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{loss} needs an SDE with a discrete chain ({sdes}: `{attr}`), got "
                         f"{type(sde).__name__}")
    return values.to(torch.float64)


def _draw_index(batch: int, num_steps: int, generator, device) -> torch.Tensor:
    return torch.randint(0, num_steps, (batch,), generator=generator, device=device)


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _at(owner, table: torch.Tensor, i: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[i] in x's dtype, shaped to broadcast against x (the table copied to i's device
    once and kept on `owner`)."""
    return append_dims(cached_on(owner, table, i.device)[i].to(x.dtype), x.ndim)


class _DiscreteLoss:
    """Shared entry points of the discrete-time losses: the network is called as
    fn(x_i [B, ...], i [B] long) and `_per_sample(fn, x, i, noise)` gives the loss [B]."""

    fn_name = "fn"  # what the network callable is called in error messages
    num_steps: int

    def _per_sample(self, fn, x, i, noise):
        raise NotImplementedError  # abstract: each loss defines its per-sample term

    def per_sample(self, fn: Callable, x: torch.Tensor, i: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss for given step indices and noise (deterministic).

        Args:
            fn: the network callable (see the class docstring for what it returns).
            x: clean data [B, ...] (rank >= 2), floating.
            i: step indices [B], long, in [0, N - 1].
            noise: z shaped like x, in x's dtype.

        Returns:
            The loss of each sample, shape [B], in x's dtype (float32 for half precision).

        Raises:
            ValueError: malformed inputs or network outputs.
        """
        _check_fn(self.fn_name, fn)
        _check_x(x)
        _check_index(i, x, self.num_steps)
        _check_noise(noise, x)
        return self._per_sample(fn, x, i, noise)

    @checks_times_on_host
    def __call__(self, fn: Callable, x: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Batch mean of the per-sample loss with i ~ U{0..N-1} and z ~ N(0, I).

        Args:
            fn: the network callable.
            x: clean data [B, ...] (rank >= 2), floating.
            generator: torch.Generator on x's device for i and z.

        Returns:
            Scalar in x's dtype (float32 for half precision).
        """
        _check_fn(self.fn_name, fn)
        _check_x(x)
        i = _draw_index(x.shape[0], self.num_steps, generator, x.device)
        return self._per_sample(fn, x, i, _noise_like(x, generator)).mean()


class DDPMLoss(_DiscreteLoss):
    """L_simple of DDPM (Ho et al. 2020, Eq. 14): E_{i, x, z} |z - eps_hat(x_i, i)|^2.

    With abar_i = prod_{j <= i} (1 - beta_j) from the SDE's `discrete_betas` (VPSDE,
    CosineVPSDE), x_i = sqrt(abar_i) x + sqrt(1 - abar_i) z and i ~ U{0, ..., N - 1}; index i
    here is step t = i + 1 of Ho et al. No factor 1/2.

    Args:
        sde: an SDE with a DDPM chain (`discrete_betas`).
        reduction: "mean" or "sum" over the non-batch dimensions.

    Attributes:
        alphas_cumprod: abar_i, float64 [N].

    Raises:
        ValueError: an SDE without `discrete_betas` or an unknown reduction.
    """

    fn_name = "noise_fn"

    def __init__(self, sde: SDE, *, reduction: str = "mean"):
        betas = _discrete_attr(sde, "discrete_betas", "DDPMLoss", "VPSDE, CosineVPSDE")
        check_choice("reduction", reduction, REDUCTIONS)
        self.sde, self.reduction, self._reduce = sde, reduction, REDUCTIONS[reduction]
        self.num_steps = betas.shape[0]
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        self.alphas_cumprod = torch.exp(log_abar)
        # sqrt(1 - abar) via expm1: abar_0 = 1 - 1e-4 would lose digits as 1 - abar.
        self._signal, self._noise = torch.exp(0.5 * log_abar), torch.sqrt(-torch.expm1(log_abar))

    def _per_sample(self, noise_fn, x, i, noise):
        x_i = _at(self, self._signal, i, x) * x + _at(self, self._noise, i, x) * noise
        eps_hat = noise_fn(x_i, i)
        _check_output("noise_fn", eps_hat, x)
        # Squares and sums in at least float32, as ScoreMatchingLoss: a "sum" over a half-
        # precision image of 65504 elements or more overflows float16.
        return self._reduce((eps_hat - noise).to(at_least_float32(x.dtype)) ** 2)


class SMLDLoss(_DiscreteLoss):
    """Denoising score matching over the SMLD noise levels (Song & Ermon 2019, Eqs. 5-6).

    sigma_i from the SDE's `discrete_sigmas` (VESDE), x_i = x + sigma_i z with i ~ U{0..N-1},
    per-sample loss sigma_i^2 reduce((s(x_i, i) + z / sigma_i)^2) = reduce((sigma_i s + z)^2):
    lambda(sigma) = sigma^2 as in the paper, without its factor 1/2.

    Args:
        sde: an SDE with a SMLD chain (`discrete_sigmas`).
        reduction: "mean" or "sum" over the non-batch dimensions.

    Attributes:
        sigmas: sigma_i, float64 [N], increasing from sigma_min (i = 0) to sigma_max, the
            order of `sde.discrete_sigmas` and of `make_score_fn(..., time_input="index")`.

    Raises:
        ValueError: an SDE without `discrete_sigmas` or an unknown reduction.
    """

    fn_name = "score_fn"

    def __init__(self, sde: SDE, *, reduction: str = "mean"):
        self.sigmas = _discrete_attr(sde, "discrete_sigmas", "SMLDLoss", "VESDE")
        check_choice("reduction", reduction, REDUCTIONS)
        self.sde, self.reduction, self._reduce = sde, reduction, REDUCTIONS[reduction]
        self.num_steps = self.sigmas.shape[0]

    def _per_sample(self, score_fn, x, i, noise):
        sigma = _at(self, self.sigmas, i, x)
        score = score_fn(x + sigma * noise, i)
        _check_output("score_fn", score, x)
        return self._reduce((sigma * score + noise).to(at_least_float32(x.dtype)) ** 2)


def _gaussian_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_ndtr_diff(lo, hi):
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails."""
    # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi); work in the tail where both CDFs are small.
    flip = lo > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def _discretized_gaussian_log_prob(x, mean, log_scale, num_levels=256):
    """Elementwise log P(x) of data in [-1, 1] on `num_levels` levels under N(mean, scale^2)
    discretized into bins of width 2 / (num_levels - 1), the edge bins extended to infinity
    (Ho et al. 2020, Eq. 13)."""
    half_bin = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scale)
    lo = (x - mean - half_bin) * inv_scale
    hi = (x - mean + half_bin) * inv_scale
    edge = 1 - half_bin  # midway between the top (or bottom) two levels
    inner = _log_ndtr_diff(lo, hi)
    return torch.where(x < -edge, torch.special.log_ndtr(hi),
                       torch.where(x > edge, torch.special.log_ndtr(-lo), inner))


class HybridLoss(_DiscreteLoss):
    """L_hybrid = L_simple + lambda L_vlb with a learned reverse variance (Nichol & Dhariwal
    2021, Sec. 3.1, Eqs. 15-16).

    The model returns (eps_hat, v), both shaped like x. The reverse step is
    p(x_{i-1} | x_i) = N(mu, Sigma) with mu = (x_i - beta_i / sqrt(1 - abar_i) eps_hat) /
    sqrt(1 - beta_i) (Ho et al. 2020, Eq. 11) and Sigma = exp(v log beta_i + (1 - v) log
    beta~_i) (Eq. 15): v = 1 gives beta_i, v = 0 the posterior variance beta~_i = beta_i
    (1 - abar_{i-1}) / (1 - abar_i). v is used as given; a network with outputs in [-1, 1]
    should pass (out + 1) / 2. beta~_0 = 0, so log beta~_0 is clipped to log beta~_1.

    L_simple = reduce((eps_hat - z)^2) as in `DDPMLoss`. The L_vlb term at the sampled index i
    is KL(q(x_{i-1} | x_i, x) || p(x_{i-1} | x_i)) for i >= 1 and the discretized Gaussian
    decoder NLL -log p(x | x_0) for i = 0 (data on 256 levels scaled to [-1, 1]; Ho et al.
    Eq. 13). mu enters L_vlb through a stop-gradient (Eq. 16), so L_vlb trains only v. L_vlb
    is reduced like L_simple, converted to bits and multiplied by N, an unbiased estimate of
    the sum over the N terms (the prior term has no parameters); in these units
    lambda = 0.001 balances the terms as in the paper for N = 1000. Index i here is step i + 1
    of the papers.

    Args:
        sde: an SDE with a DDPM chain (`discrete_betas`) of at least 2 steps.
        lambda_vlb: weight of L_vlb (>= 0; 0.001 in the paper).
        reduction: "mean" or "sum" over the non-batch dimensions.

    Raises:
        ValueError: an SDE without `discrete_betas` or with one step, a negative lambda_vlb,
            or an unknown reduction.
    """

    fn_name = "model_fn"

    def __init__(self, sde: SDE, *, lambda_vlb: float = 0.001, reduction: str = "mean"):
        betas = _discrete_attr(sde, "discrete_betas", "HybridLoss", "VPSDE, CosineVPSDE")
        if betas.shape[0] < 2:
            raise ValueError(f"HybridLoss needs at least 2 steps, got {betas.shape[0]}")
        check_positive("lambda_vlb", lambda_vlb, allow_zero=True)
        check_choice("reduction", reduction, REDUCTIONS)
        self.sde, self.lambda_vlb, self.reduction = sde, float(lambda_vlb), reduction
        self._reduce = REDUCTIONS[reduction]
        self.num_steps = betas.shape[0]
        self._ddpm = DDPMLoss(sde, reduction=reduction)
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        log_abar_prev = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar[:-1]])
        one_minus_abar = -torch.expm1(log_abar)
        one_minus_abar_prev = -torch.expm1(log_abar_prev)
        post_var = betas * one_minus_abar_prev / one_minus_abar
        self._log_beta = torch.log(betas)
        self._log_post_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        # Posterior mean coefficients (Ho et al. Eq. 7) and model mean coefficients (Eq. 11).
        self._post_coef_x0 = torch.exp(0.5 * log_abar_prev) * betas / one_minus_abar
        self._post_coef_xi = torch.sqrt(1 - betas) * one_minus_abar_prev / one_minus_abar
        self._mean_coef_xi = 1 / torch.sqrt(1 - betas)
        self._mean_coef_eps = betas / torch.sqrt(one_minus_abar) / torch.sqrt(1 - betas)

    def _vlb_term(self, x, x_i, i, eps_hat, v):
        """L_vlb term at index i in nats, [B] (reduced over dimensions)."""
        mean = (_at(self, self._mean_coef_xi, i, x) * x_i
                - _at(self, self._mean_coef_eps, i, x) * eps_hat)
        log_post_var = _at(self, self._log_post_var, i, x)
        log_var = v * _at(self, self._log_beta, i, x) + (1 - v) * log_post_var
        post_mean = (_at(self, self._post_coef_x0, i, x) * x
                     + _at(self, self._post_coef_xi, i, x) * x_i)
        # In at least float32: float16 sums overflow, and the CPU has no float16 log_ndtr.
        acc = at_least_float32(x.dtype)
        post_mean, log_post_var, mean, log_var = (
            v.to(acc) for v in (post_mean, log_post_var, mean, log_var))
        kl = self._reduce(_gaussian_kl(post_mean, log_post_var, mean, log_var))
        nll = -self._reduce(_discretized_gaussian_log_prob(x.to(acc), mean, 0.5 * log_var))
        return torch.where(i == 0, nll, kl)

    def _per_sample(self, model_fn, x, i, noise):
        ddpm = self._ddpm
        x_i = _at(ddpm, ddpm._signal, i, x) * x + _at(ddpm, ddpm._noise, i, x) * noise
        out = model_fn(x_i, i)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"model_fn must return a pair (eps_hat, v), got "
                             f"{type(out).__name__}")
        eps_hat, v = out
        _check_output("model_fn's eps_hat", eps_hat, x)
        _check_output("model_fn's v", v, x)
        simple = self._reduce((eps_hat - noise).to(at_least_float32(x.dtype)) ** 2)
        vlb = self._vlb_term(x, x_i, i, eps_hat.detach(), v)
        return simple + self.lambda_vlb * (self.num_steps / math.log(2)) * vlb
