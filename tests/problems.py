"""Closed-form ground truth for the tests: isotropic Gaussian mixtures under linear SDEs.

If x_0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t | x_0 ~ N(a(t) x_0, v(t) I), then
x_t ~ sum_k w_k N(a mu_k, (a^2 s_k^2 + v) I): exact densities, scores and moments at every t.
The kernel coefficients a(t), v(t) below are derived here from each SDE's definition in the
paper (integrating da/dt = f(t) a, dv/dt = 2 f(t) v + g(t)^2), not taken from the library.
"""
import math
from dataclasses import dataclass

import torch


# --- perturbation kernels of the paper's SDEs, derived independently --------------------------

def vp_kernel(t, beta_min=0.1, beta_max=20.0):
    """VP: f = -beta/2, g^2 = beta -> a = exp(-B(t)/2), v = 1 - a^2 with B = int beta."""
    big_b = beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2
    a = torch.exp(-0.5 * big_b)
    return a, 1 - torch.exp(-big_b)


def subvp_kernel(t, beta_min=0.1, beta_max=20.0):
    """sub-VP: g^2 = beta (1 - e^{-2B}) -> v = (1 - e^{-B})^2."""
    big_b = beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2
    return torch.exp(-0.5 * big_b), (1 - torch.exp(-big_b)) ** 2


def ve_kernel(t, sigma_min=0.01, sigma_max=50.0):
    """VE: f = 0, g^2 = d sigma(t)^2 / dt -> v = sigma(t)^2 - sigma(0)^2."""
    sigma = sigma_min * (sigma_max / sigma_min) ** t
    return torch.ones_like(t), sigma ** 2 - sigma_min ** 2


KERNELS = {"vp": vp_kernel, "subvp": subvp_kernel, "ve": ve_kernel}


@dataclass
class GaussianMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I) in R^D; all tensors float64."""

    weights: torch.Tensor  # [K]
    means: torch.Tensor  # [K, D]
    stds: torch.Tensor  # [K]

    @property
    def dim(self):
        return self.means.shape[1]

    def diffuse(self, a, v):
        """The mixture of a x + sqrt(v) z for scalar kernel coefficients a, v."""
        a, v = float(a), float(v)
        stds = torch.sqrt(a ** 2 * self.stds ** 2 + v)
        return GaussianMixture(self.weights, a * self.means, stds)

    def log_prob(self, x):
        """log p(x) for x [B, ...] flattened to [B, D]; differentiable, in x's dtype."""
        xf = x.reshape(x.shape[0], -1)
        means = self.means.to(xf)
        var = (self.stds ** 2).to(xf)
        d2 = ((xf[:, None, :] - means[None]) ** 2).sum(-1)  # [B, K]
        comp = -0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(comp + torch.log(self.weights.to(xf)), dim=1)

    def score(self, x):
        """grad_x log p(x), shaped like x; differentiable."""
        xf = x.reshape(x.shape[0], -1)
        means = self.means.to(xf)
        var = (self.stds ** 2).to(xf)
        d2 = ((xf[:, None, :] - means[None]) ** 2).sum(-1)
        comp = -0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        resp = torch.softmax(comp + torch.log(self.weights.to(xf)), dim=1)  # [B, K]
        grads = -(xf[:, None, :] - means[None]) / var[None, :, None]
        return (resp[:, :, None] * grads).sum(1).reshape(x.shape)

    def sample(self, n, generator, dtype=torch.float64):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).to(dtype), k

    def mean(self):
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self):
        m = self.mean()
        centred = self.means - m
        outer = torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        within = float((self.weights * self.stds ** 2).sum())
        return outer + within * torch.eye(self.dim, dtype=torch.float64)


def exact_score_fn(mixture, kernel):
    """Score function (x, t) -> grad log p_t(x) of the diffused mixture, for a batch of times."""

    def score_fn(x, t):
        t64 = t.double()
        a, v = kernel(t64)
        xf = x.reshape(x.shape[0], -1)
        means = mixture.means.to(xf)  # [K, D]
        stds = mixture.stds.to(a)
        var = (a[:, None] ** 2 * stds[None] ** 2 + v[:, None]).to(xf)  # [B, K]
        mu = a[:, None, None].to(xf) * means[None]  # [B, K, D]
        diff = xf[:, None, :] - mu
        comp = -0.5 * (diff ** 2).sum(-1) / var - 0.5 * mixture.dim * torch.log(2 * math.pi * var)
        resp = torch.softmax(comp + torch.log(mixture.weights.to(xf)), dim=1)
        return (resp[:, :, None] * (-diff / var[:, :, None])).sum(1).reshape(x.shape)

    return score_fn


def exact_log_prob_t(mixture, kernel, x, t):
    """log p_t(x) of the diffused mixture at a scalar time t."""
    a, v = kernel(torch.tensor(float(t), dtype=torch.float64))
    return mixture.diffuse(a, v).log_prob(x)


def ring_mixture(num_modes=8, radius=4.0, std=0.25):
    """2-D mixture of `num_modes` modes on a circle with distinct weights."""
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    weights = torch.arange(1, num_modes + 1, dtype=torch.float64)
    return GaussianMixture(weights / weights.sum(), means, torch.full((num_modes,), std,
                                                                     dtype=torch.float64))


def random_mixture(dim, num_modes=4, seed=0, scale=1.0, std_range=(0.3, 0.8)):
    """A random mixture in R^dim with well-spread means and varied component stds."""
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(num_modes, dim, generator=g, dtype=torch.float64)
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(num_modes, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(num_modes, generator=g, dtype=torch.float64)
    return GaussianMixture(weights / weights.sum(), means, stds)
