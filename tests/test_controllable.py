"""Controllable generation (score_sde/controllable.py) against closed forms.

Data are Gaussians N(m, C) with a full covariance, or Gaussian mixtures (tests/problems.py),
diffused by VP and VE. Gaussian data give x_t ~ N(a m, a^2 C + v I) with the kernel (a, v)
derived in tests/problems.py, so the exact score is -(a^2 C + v I)^-1 (x - a m); the
conditional of the unknown coordinates u given the known ones k is
N(m_u + C_uk C_kk^-1 (x_k - m_k), C_uu - C_uk C_kk^-1 C_ku). Inpainting and colorization with
that score must reproduce it within Monte-Carlo error plus the stated bias of the replacement
method at the chosen step count; guidance with the exact time-dependent classifier (the
posterior responsibility of each mixture component) must give that component. Statistical
tests state their significance level.
"""
import math

import pytest
import torch

import score_sde
from score_sde import (classifier_free_score, classifier_guided_score, colorize, inpaint,
                       interpolate, log_likelihood, sample_pc)
from score_sde.controllable import slerp
from tests.problems import KERNELS, GaussianMixture, exact_score_fn, ring_mixture
from tests.test_sde import OrnsteinUhlenbeck

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SDES = {"vp": score_sde.VPSDE, "ve": score_sde.VESDE}
EPS = {"vp": 1e-3, "ve": 1e-5}  # the paper's sampling eps
FEW_STEPS = 25  # smallest tidy count above VP's DDPM-chain limit of 20


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Counter:
    """Wraps a score function and counts its calls."""

    def __init__(self, score_fn):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score_fn(x, t)


class Gaussian:
    """N(mean, cov) over the flattened non-batch dimensions, float64."""

    def __init__(self, mean, cov):
        self.mean, self.cov = mean, cov
        self.lam, self.q = torch.linalg.eigh(cov)

    def score_fn(self, kernel):
        """Exact score of the diffused data N(a m, a^2 C + v I):
        -(a^2 C + v I)^-1 (x - a m) = -Q diag(1 / (a^2 lam + v)) Q^T (x - a m), C = Q lam Q^T."""

        def score_fn(x, t):
            a, v = kernel(t.double())
            xf = x.reshape(x.shape[0], -1).double()
            y = (xf - a[:, None] * self.mean) @ self.q
            score = -(y / (a[:, None] ** 2 * self.lam + v[:, None])) @ self.q.T
            return score.reshape(x.shape).to(x.dtype)

        return score_fn

    def conditional(self, known, value):
        """Mean and covariance of the coordinates where `known` [D] is False given the others
        equal `value` [D] there (Schur complement)."""
        k, u = known, ~known
        c_kk, c_uk = self.cov[k][:, k], self.cov[u][:, k]
        gain = torch.linalg.solve(c_kk, c_uk.T).T  # C_uk C_kk^-1
        mean = self.mean[u] + gain @ (value[k] - self.mean[k])
        return mean, self.cov[u][:, u] - gain @ c_uk.T


def correlated_gaussian():
    # D = 4, a dense covariance with correlations up to 0.6 and a non-zero mean.
    lower = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [0.3, -0.5, 0.7, 0.0],
                          [-0.4, 0.2, 0.3, 0.5]], dtype=F64)
    return Gaussian(torch.tensor([0.5, -1.0, 1.0, 0.0], dtype=F64), lower @ lower.T)


def check_moments(x, mean, cov, bias, z_crit):
    """Sample mean and covariance of x [n, d] against N(mean, cov): z-scores below z_crit plus
    an allowed bias, in units of the standard deviations (sqrt(C_ii), sqrt(C_ii C_jj)).
    sd of the sample mean is sqrt(C_ii / n) and of the sample covariance
    sqrt((C_ii C_jj + C_ij^2) / n) (Wishart)."""
    n = len(x)
    sd = cov.diag().sqrt()
    mean_err = (x.mean(0) - mean).abs()
    assert (mean_err < z_crit * sd / math.sqrt(n) + bias["mean"] * sd).all(), (
        f"mean {x.mean(0)} vs closed form {mean} (allowed bias {bias['mean']} sd)")
    scale = torch.outer(sd, sd)
    cov_sd = torch.sqrt((scale ** 2 + cov ** 2) / n)
    cov_err = (torch.cov(x.T) - cov).abs()
    assert (cov_err < z_crit * cov_sd + bias["cov"] * scale).all(), (
        f"covariance {torch.cov(x.T)} vs closed form {cov} (allowed bias {bias['cov']})")


# --- 1. inpainting ------------------------------------------------------------------------------

def test_known_region_is_kept_bit_for_bit_and_nfe_is_honest():
    mixture = ring_mixture()
    counter = Counter(exact_score_fn(mixture, KERNELS["vp"]))
    x_known = torch.randn((6, 2), generator=gen(0), dtype=torch.float32) * 3
    mask = torch.tensor([[1.0, 0.0]])
    x, nfe = inpaint(score_sde.VPSDE(), counter, x_known, mask, num_steps=FEW_STEPS,
                     corrector_steps=2, generator=gen(1))
    assert x.shape == x_known.shape and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x_known[:, 0])
    assert not torch.equal(x[:, 1], x_known[:, 1])
    # (corrector_steps + 1) evaluations per time point; the last step denoises at no cost.
    assert nfe == counter.calls == FEW_STEPS * 3


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("predictor, corrector, probability_flow", [
    ("reverse_diffusion", "langevin", False), ("euler_maruyama", "ald", False),
    ("ancestral_sampling", "none", True), ("none", "langevin", False)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_inpaint_images_keeps_known_pixels(name, predictor, corrector, probability_flow, dtype):
    mixture = GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64),
                              torch.randn((2, 12), generator=gen(2), dtype=F64),
                              torch.tensor([0.2, 0.5], dtype=F64))
    x_known, _ = mixture.sample(5, gen(3), dtype=dtype)
    x_known = x_known.reshape(5, 3, 2, 2)
    mask = (torch.rand((5, 1, 2, 2), generator=gen(4)) < 0.5).to(dtype)  # per pixel
    x, nfe = inpaint(SDES[name](), exact_score_fn(mixture, KERNELS[name]), x_known, mask,
                     num_steps=FEW_STEPS, predictor=predictor, corrector=corrector,
                     probability_flow=probability_flow, eps=EPS[name], generator=gen(5))
    known = mask.bool().expand_as(x)
    assert x.dtype == dtype and torch.isfinite(x).all() and nfe >= FEW_STEPS
    assert torch.equal(x[known], x_known[known])
    assert (x[~known] != x_known[~known]).all()


def test_inpaint_reproducible_and_bool_mask_equals_float_mask():
    mixture = ring_mixture()
    score_fn = exact_score_fn(mixture, KERNELS["ve"])
    x_known = torch.randn((8, 2), generator=gen(0), dtype=F64)
    runs = [inpaint(score_sde.VESDE(), score_fn, x_known, mask, num_steps=FEW_STEPS,
                    eps=EPS["ve"], generator=gen(7))[0]
            for mask in (torch.tensor([0.0, 1.0]), torch.tensor([False, True]),
                         torch.tensor([0, 1]))]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # Only the known region is read: NaN or anything else in the rest changes nothing.
    for fill in (float("nan"), 1e30):
        x_filled = x_known.clone()
        x_filled[:, 0] = fill
        filled, _ = inpaint(score_sde.VESDE(), score_fn, x_filled, torch.tensor([0.0, 1.0]),
                            num_steps=FEW_STEPS, eps=EPS["ve"], generator=gen(7))
        assert torch.equal(filled, runs[0])


def test_inpaint_rediscretizes_the_chain_to_num_steps():
    # Reverse diffusion and Langevin follow the SDE's discrete chain: with num_steps != the
    # SDE's own count the chain must be rebuilt, as sample_pc does.
    mixture, steps = ring_mixture(), 30
    score_fn = exact_score_fn(mixture, KERNELS["vp"])
    x_known, mask = torch.randn((4, 2), generator=gen(0), dtype=F64), torch.tensor([1, 0])
    a, _ = inpaint(score_sde.VPSDE(num_steps=1000), score_fn, x_known, mask, num_steps=steps,
                   generator=gen(1))
    b, _ = inpaint(score_sde.VPSDE(num_steps=steps), score_fn, x_known, mask, generator=gen(1))
    assert torch.equal(a, b)


# Inpainting a 4-d Gaussian with a dense covariance, coordinates 0 and 2 known: name ->
# (num_steps, corrector_steps, allowed bias of the mean in units of sd, of the covariance in
# units of sqrt(C_ii C_jj)). The replacement method of Song et al. (Appendix I.2) runs the
# unknown coordinates on the score of p_t(x_u | x_k,t), whose mean lags the true conditional's
# at large t; only the Langevin corrector pulls them back, so its bias falls with the number
# of corrector steps (test_replacement_bias_falls_with_more_steps). Measured with 20000
# samples, two seeds each (sd of the mean 0.007 sd): means within 0.02 sd for VP and VE at
# these settings (at 200 x 1 steps VP is off by 0.27 sd), covariance entries within +0.035
# (the Langevin corrector's over-dispersion at snr 0.16, about snr^2).
GAUSS_N = 4000
GAUSS_PC = {"vp": (300, 5, 0.03, 0.04), "ve": (300, 2, 0.03, 0.04)}


@pytest.mark.parametrize("name", list(SDES))
def test_inpaint_gaussian_conditional_moments(name):
    data = correlated_gaussian()
    known = torch.tensor([True, False, True, False])
    value = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)  # x_k = (1, 0), 1.1 sd from m_k
    num_steps, corrector_steps, mean_bias, cov_bias = GAUSS_PC[name]
    x, _ = inpaint(SDES[name](), data.score_fn(KERNELS[name]), value.expand(GAUSS_N, 4),
                   known.to(F64), num_steps=num_steps, corrector_steps=corrector_steps,
                   eps=EPS[name], generator=gen(0))
    assert torch.equal(x[:, known], value[known].expand(GAUSS_N, 2))
    mean, cov = data.conditional(known, value)
    # 5 statistics (2 means, 3 covariance entries): |z| < 3.72 is a family-wise two-sided
    # significance level of 1e-3.
    check_moments(x[:, ~known], mean, cov, dict(mean=mean_bias, cov=cov_bias), 3.72)


def test_replacement_bias_falls_with_more_steps():
    # The bias of the replacement method allowed for above is a discretization effect: the
    # Langevin corrector gets more steps to correct the lag as num_steps grows. Measured
    # (20000 samples) mean error of the first unknown coordinate under VP with one corrector
    # step: -0.27 sd at 200 steps, -0.10 sd at 500, -0.04 sd at 1000.
    data, n = correlated_gaussian(), 2000
    known = torch.tensor([True, False, True, False])
    value = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    mean, cov = data.conditional(known, value)
    errors = []
    for num_steps in (100, 400):
        x, _ = inpaint(SDES["vp"](), data.score_fn(KERNELS["vp"]), value.expand(n, 4),
                       known.to(F64), num_steps=num_steps, eps=EPS["vp"], generator=gen(1))
        errors.append(abs(x[:, 1].mean().item() - mean[0].item()) / cov[0, 0].sqrt().item())
    assert errors[1] < errors[0] / 2, f"mean errors (in sd) at 100 and 400 steps: {errors}"


# No noise left: data N(m, s^2 I) with s = 0.003, far below the marginal std at eps (0.0105
# for VP at eps = 1e-3). Pixels are independent, so the conditional is the data itself and an
# exact sampler followed by Tweedie's E[x_0 | x_eps] returns N(m, a^2 s^4 / (a^2 s^2 + v))
# at eps: std 0.00083 for VP, where returning the noisy state would give
# sqrt(a^2 s^2 + v) = 0.0109. name -> (predictor, num_steps, allowed relative std bias).
# Ancestral sampling steps through the Gaussian posterior, its last step being Tweedie's
# formula at eps, so it suits such tiny scales (measured ratio 0.977 at 300 steps, 4000
# coordinates). Under VE, sigma(eps = 1e-5) = 1.3e-4 is far below s, so the test only checks
# the closed form: Euler-Maruyama at 1000 steps measures 1.046. Reverse diffusion does not
# suit data narrower than the chains' first noise level: its last step is the chain's step 0,
# which removes variance beta_0 = 1e-4 (VP, 1000 steps) or sigma_min^2 = 1e-4 (VE) where the
# marginal at eps holds 1e-4 (VP) or 1.7e-8 (VE); measured ratios 2.8 (VP) and 10.6 (VE).
TINY_STD, TINY_B = 0.003, 500
TINY_PC = {"vp": ("ancestral_sampling", 300, 0.03), "ve": ("euler_maruyama", 1000, 0.07)}


@pytest.mark.parametrize("name", list(SDES))
def test_no_noise_left_in_the_generated_region(name):
    predictor, num_steps, bias = TINY_PC[name]
    m = torch.linspace(-1, 1, 16, dtype=F64)
    data = Gaussian(m, TINY_STD ** 2 * torch.eye(16, dtype=F64))
    mask = (torch.arange(16) % 2 == 0).reshape(1, 1, 4, 4)  # a checkerboard of columns
    x_known = m.reshape(1, 1, 4, 4).expand(TINY_B, 1, 4, 4)
    x, _ = inpaint(SDES[name](), data.score_fn(KERNELS[name]), x_known, mask,
                   num_steps=num_steps, predictor=predictor, eps=EPS[name], generator=gen(0))
    residual = (x - x_known)[~mask.expand_as(x)]
    a, v = KERNELS[name](torch.tensor(EPS[name], dtype=F64))
    expected = (a * TINY_STD ** 2 / torch.sqrt(a ** 2 * TINY_STD ** 2 + v)).item()
    # sd of a std estimate from n normal values is std / sqrt(2n); 3.29 is a two-sided level
    # of 1e-3.
    n = residual.numel()
    ratio = residual.std().item() / expected
    assert abs(ratio - 1) < 3.29 / math.sqrt(2 * n) + bias, (
        f"std {residual.std().item():.3g}, closed form {expected:.3g}, sigma(eps) "
        f"{math.sqrt(v.item()):.3g}")
    assert abs(residual.mean().item()) < 3.29 * expected / math.sqrt(n)


# --- 2. colorization ----------------------------------------------------------------------------

def colour_gaussian(pixels):
    """Colour data with the same correlated RGB Gaussian N(m_c, C_c) at each of `pixels`
    independent pixels; flattened in [3, pixels] order, so the covariance is C_c (x) I."""
    m_c = torch.tensor([0.3, 0.0, -0.4], dtype=F64)
    c_c = torch.tensor([[0.50, 0.30, 0.10], [0.30, 0.40, 0.25], [0.10, 0.25, 0.30]], dtype=F64)
    eye = torch.eye(pixels, dtype=F64)
    return m_c, c_c, Gaussian(m_c.repeat_interleave(pixels), torch.kron(c_c, eye))


def colour_conditional(m_c, c_c, gray):
    """Moments of x ~ N(m_c, C_c) given w^T x = gray with w = (1, 1, 1) / 3: mean
    m + C w (gray - w^T m) / (w^T C w) (per gray value) and covariance C - C w w^T C / w^T C w."""
    w = torch.full((3,), 1 / 3, dtype=F64)
    cw = c_c @ w
    mean = m_c + cw * ((gray[..., None] - w @ m_c) / (w @ cw))
    return mean, c_c - torch.outer(cw, cw) / (w @ cw)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_colorize_keeps_the_channel_mean(dtype):
    mixture = GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64),
                              torch.randn((2, 12), generator=gen(0), dtype=F64),
                              torch.tensor([0.3, 0.6], dtype=F64))
    gray = torch.rand((4, 1, 2, 2), generator=gen(1), dtype=dtype) * 2 - 1
    x, nfe = colorize(SDES["ve"](), exact_score_fn(mixture, KERNELS["ve"]), gray,
                      num_steps=FEW_STEPS, eps=EPS["ve"], generator=gen(2))
    assert x.shape == (4, 3, 2, 2) and x.dtype == dtype and nfe == 2 * FEW_STEPS
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (x.mean(1, keepdim=True) - gray).abs().max() < tol
    assert x.std(1).min() > 1e-3  # the channels differ: colour was generated
    # A 3-channel gray image with equal channels is the same input.
    x3, _ = colorize(SDES["ve"](), exact_score_fn(mixture, KERNELS["ve"]),
                     gray.expand(4, 3, 2, 2), num_steps=FEW_STEPS, eps=EPS["ve"],
                     generator=gen(2))
    assert torch.equal(x, x3)


# name -> (num_steps, corrector_steps, allowed mean bias in sd, covariance bias). Here the
# replacement method's lag is small: measured with 20000 pixels, means within 0.02 sd at
# 200 x 1 steps (VP and VE). The Langevin corrector at snr 0.16 widens the narrower chroma
# direction (variance 0.08) by about 5 % of the variance (measured +0.045 to +0.054; +0.02 at
# snr 0.05, and within 0.02 without a corrector).
COLOUR_PC = {"vp": (200, 1, 0.03, 0.07), "ve": (200, 1, 0.03, 0.07)}
COLOUR_B = 1000  # 4 pixels each


@pytest.mark.parametrize("name", list(SDES))
def test_colorize_gaussian_conditional_moments(name):
    m_c, c_c, data = colour_gaussian(4)
    gray = torch.tensor([0.5, -0.3, 0.0, -0.9], dtype=F64).reshape(1, 1, 2, 2)
    num_steps, corrector_steps, mean_bias, cov_bias = COLOUR_PC[name]
    x, _ = colorize(SDES[name](), data.score_fn(KERNELS[name]), gray.expand(COLOUR_B, 1, 2, 2),
                    num_steps=num_steps, corrector_steps=corrector_steps, eps=EPS[name],
                    generator=gen(0))
    assert (x.mean(1, keepdim=True) - gray).abs().max() < 1e-12
    mean, cov = colour_conditional(m_c, c_c, gray.reshape(4))  # [4, 3], [3, 3]
    # Residuals of the 4 independent pixels pooled: [4 B, 3] draws of N(0, cov).
    residual = (x.reshape(COLOUR_B, 3, 4).transpose(1, 2) - mean).reshape(-1, 3)
    # The covariance is singular along (1, 1, 1), where the residual is exactly 0; test the two
    # chroma directions of the decoupled basis: 2 means and 3 covariance entries, |z| < 3.72
    # at a family-wise level of 1e-3.
    basis = torch.tensor([[2, -1, -1], [0, 1, -1]], dtype=F64) / torch.tensor(
        [[math.sqrt(6)], [math.sqrt(2)]], dtype=F64)
    check_moments(residual @ basis.T, torch.zeros(2, dtype=F64), basis @ cov @ basis.T,
                  dict(mean=mean_bias, cov=cov_bias), 3.72)


# --- 3. guidance --------------------------------------------------------------------------------

def three_blobs():
    """2-D mixture of three components with distinct weights, means and stds."""
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64),
                           torch.tensor([[-3.0, 0.0], [2.0, 2.0], [1.0, -3.0]], dtype=F64),
                           torch.tensor([0.4, 0.6, 0.3], dtype=F64))


def exact_classifier(mixture, kernel):
    """The exact time-dependent classifier log p_t(y = k | x): the posterior responsibility
    of component k of the diffused mixture, log w_k + log N(x; a mu_k, (a^2 s_k^2 + v) I)
    minus its log-sum-exp over k; differentiable in x."""

    def log_prob_fn(x, t):
        a, v = kernel(t.double())
        var = (a[:, None] ** 2 * mixture.stds ** 2 + v[:, None]).to(x.dtype)  # [B, K]
        diff = x[:, None, :] - (a[:, None, None] * mixture.means).to(x.dtype)  # [B, K, D]
        comp = (-0.5 * (diff ** 2).sum(-1) / var - 0.5 * mixture.dim * torch.log(var)
                + torch.log(mixture.weights).to(x.dtype))
        return torch.log_softmax(comp, dim=1)

    return log_prob_fn


def component_score(mixture, kernel, labels):
    """Score of component labels[b] diffused: -(x - a mu_k) / (a^2 s_k^2 + v)."""

    def score_fn(x, t):
        a, v = kernel(t.double())
        var = a ** 2 * mixture.stds[labels] ** 2 + v
        return (-(x - a[:, None] * mixture.means[labels]) / var[:, None]).to(x.dtype)

    return score_fn


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("logits", [False, True])
def test_classifier_guided_score_with_scale_one_is_the_class_score(name, logits):
    # p_t(x | y) = p_t(x) p_t(y | x) / p(y): with the exact classifier, s + grad log p_t(y | x)
    # is the score of component y; with scale w it is s + w (s_y - s).
    mixture, kernel = three_blobs(), KERNELS[name]
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    x = torch.randn((6, 2), generator=gen(0), dtype=F64) * 3
    t = torch.tensor([1e-3, 0.05, 0.2, 0.5, 0.8, 1.0], dtype=F64)
    log_posterior = exact_classifier(mixture, kernel)

    def classifier(x, t):
        # Logits (log-probabilities shifted per sample) must give the same guidance: it
        # applies log_softmax.
        return log_posterior(x, t) + (3.0 + t[:, None] if logits else 0.0)

    score = exact_score_fn(mixture, kernel)
    expected = component_score(mixture, kernel, labels)(x, t)
    with torch.no_grad():  # samplers call the score without gradients
        guided = classifier_guided_score(score, classifier, labels)(x, t)
        guided2 = classifier_guided_score(score, classifier, labels, scale=2.0)(x, t)
    torch.testing.assert_close(guided, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(guided2, score(x, t) + 2 * (expected - score(x, t)),
                               rtol=1e-9, atol=1e-9)
    assert torch.equal(classifier_guided_score(score, classifier, labels, 0.0)(x, t),
                       score(x, t))
    assert not x.requires_grad and not guided.requires_grad


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_guided_log_likelihood_is_the_class_density(name):
    # With scale 1 and the exact classifier the guided score is component y's score, so the
    # likelihood's divergence of it must be that component's: log p_eps(x | y) = log N(x;
    # a mu_y, (a^2 s_y^2 + v) I). Differentiating the guided score must keep the classifier's
    # Hessian.
    mixture, kernel, eps = three_blobs(), KERNELS[name], 1e-5
    labels = torch.tensor([0, 1, 2])
    x = mixture.means + torch.tensor([0.1, -0.2], dtype=F64)
    guided = classifier_guided_score(exact_score_fn(mixture, kernel),
                                     exact_classifier(mixture, kernel), labels)
    sde = SDES[name]()
    logp, z, _ = log_likelihood(sde, guided, x, divergence="exact", eps=eps, rtol=1e-9,
                                atol=1e-9)

    def log_density(y, t):  # log N(y; a mu_label, (a^2 s_label^2 + v) I) at time t
        a, v = kernel(torch.tensor(t, dtype=F64))
        var = a ** 2 * mixture.stds[labels] ** 2 + v
        return (-0.5 * ((y - a * mixture.means[labels]) ** 2).sum(1) / var
                - torch.log(2 * math.pi * var))

    # The flow carries p_eps(. | y) to p_T(. | y); the likelihood starts from the prior instead.
    flow = logp - sde.prior_logp(z) + log_density(z, sde.T)
    torch.testing.assert_close(flow, log_density(x, eps), rtol=0, atol=1e-5)


GUIDE_N = 3000  # 1000 per class


@pytest.mark.parametrize("name", list(SDES))
def test_classifier_guided_sampling_draws_the_class(name):
    # Euler-Maruyama at 200 steps: closed-form variance bias +0.8 % (VP), +0.06 % (VE)
    # (test_sampling.py), below the statistical tolerance here.
    mixture, kernel = three_blobs(), KERNELS[name]
    labels = torch.arange(GUIDE_N) % 3
    guided = classifier_guided_score(exact_score_fn(mixture, kernel),
                                     exact_classifier(mixture, kernel), labels)
    x, _ = sample_pc(SDES[name](num_steps=200), guided, (GUIDE_N, 2),
                     predictor="euler_maruyama", corrector="none", eps=EPS[name], dtype=F64,
                     generator=gen(0))
    a, v = KERNELS[name](torch.tensor(EPS[name], dtype=F64))
    for k in range(3):
        xk = x[labels == k]
        n = xk.numel()  # 2 coordinates per sample, all N(mu_k, s_k^2) after denoising
        std = (a * mixture.stds[k] ** 2 / torch.sqrt(a ** 2 * mixture.stds[k] ** 2 + v)).item()
        # 3 classes x (2 means + 1 variance): |z| < 3.82 is a family-wise level of 1e-3.
        z_mean = (xk.mean(0) - mixture.means[k]) / (std / math.sqrt(len(xk)))
        z_var = ((xk - mixture.means[k]).pow(2).mean() / std ** 2 - 1) / math.sqrt(2 / n)
        assert z_mean.abs().max() < 3.82 and abs(z_var) < 3.82, (
            f"class {k}: mean {xk.mean(0)} vs {mixture.means[k]}, std "
            f"{(xk - mixture.means[k]).pow(2).mean().sqrt():.4f} vs {std:.4f}")


def test_classifier_free_score_formula():
    # Two Gaussian scores in closed form: s_c = -(x - 1) / 2, s_u = -x.
    def cond(x, t):
        return -(x - 1.0) / 2.0

    def uncond(x, t):
        return -x

    x = torch.randn((5, 3), generator=gen(0), dtype=F64)
    t = torch.full((5,), 0.5, dtype=F64)
    for w in (0.5, 3.0):
        expected = (1 + w) * (-(x - 1.0) / 2.0) - w * (-x)
        torch.testing.assert_close(classifier_free_score(cond, uncond, w)(x, t), expected,
                                   rtol=1e-15, atol=1e-15)
    assert torch.equal(classifier_free_score(cond, uncond, 0.0)(x, t), cond(x, t))
    assert torch.equal(classifier_free_score(cond, uncond, 0)(x, t), cond(x, t))


# --- 4. interpolation ---------------------------------------------------------------------------

def angle(u, v):
    """Angle between the rows of u and v (acos of the cosine; fine away from 0 and pi)."""
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    return torch.acos(cos.clamp(-1, 1))


def test_slerp_on_a_quarter_circle():
    z0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    z1 = torch.tensor([[0.0, 1.0]], dtype=F64)
    alphas = torch.linspace(0, 1, 7, dtype=F64)
    out = slerp(z0, z1, alphas)
    expected = torch.stack([torch.cos(alphas * math.pi / 2),
                            torch.sin(alphas * math.pi / 2)], dim=1)[:, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_slerp_endpoints_norms_and_angles(dtype):
    shape = (4, 3, 2, 2)
    z0 = torch.randn(shape, generator=gen(0), dtype=dtype)
    z1 = torch.randn(shape, generator=gen(1), dtype=dtype)
    z1 = z1 * (z0.flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1)).reshape(4, 1, 1, 1)
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    out = slerp(z0, z1, alphas)
    assert out.shape == (5,) + shape and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(out[0], z0, rtol=tol, atol=tol)
    torch.testing.assert_close(out[-1], z1, rtol=tol, atol=tol)
    # Equal norms stay equal, and the angle from z0 grows linearly: alpha theta.
    flat, f0, f1 = out.flatten(2).double(), z0.flatten(1).double(), z1.flatten(1).double()
    torch.testing.assert_close(flat.norm(dim=2), f0.norm(dim=1).expand(5, 4), rtol=tol,
                               atol=0)
    theta = angle(f0, f1)
    for i, a in enumerate(alphas[1:-1], start=1):
        torch.testing.assert_close(angle(f0, flat[i]), a * theta, rtol=1e-5, atol=0)


def test_slerp_falls_back_to_linear_for_parallel_antiparallel_and_zero():
    z0 = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [1.0, 0.0]], dtype=F64)
    z1 = torch.tensor([[2.0, 4.0], [-1.0, -2.0], [3.0, 1.0], [1.0, 1e-9]], dtype=F64)
    alphas = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    out = slerp(z0, z1, alphas)
    linear = (1 - alphas)[:, None, None] * z0 + alphas[:, None, None] * z1
    torch.testing.assert_close(out, linear, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()


def test_interpolate_endpoints_reproduce_the_data():
    mixture = ring_mixture()
    x, _ = mixture.sample(6, gen(0))
    frames, nfe = interpolate(SDES["vp"](), exact_score_fn(mixture, KERNELS["vp"]), x[:3], x[3:],
                              num=5)
    assert frames.shape == (5, 3, 2) and frames.dtype == F64 and nfe > 0
    # rtol = atol = 1e-5 per step on a well-conditioned map (as in test_ode.py's round trip).
    assert (frames[0] - x[:3]).abs().max() < 1e-3
    assert (frames[-1] - x[3:]).abs().max() < 1e-3


@pytest.mark.parametrize("name", list(SDES))
def test_interpolate_gaussian_is_slerp_in_data_space(name):
    # For data N(0, s^2 I) the probability-flow ODE maps x_eps to c x_eps with
    # c = sd_T / sd_eps (sd_t^2 = a^2 s^2 + v): a scaling, which commutes with slerp. So the
    # frames are slerp(x0, x1) in data space, written here from its definition.
    s, eps = 0.7, 1e-3
    data = Gaussian(torch.zeros(4, dtype=F64), s ** 2 * torch.eye(4, dtype=F64))
    x0 = torch.randn((2, 1, 2, 2), generator=gen(0), dtype=F64)
    x1 = torch.randn((2, 1, 2, 2), generator=gen(1), dtype=F64)
    frames, _ = interpolate(SDES[name](), data.score_fn(KERNELS[name]), x0, x1, num=4, eps=eps)
    f0, f1 = x0.flatten(1), x1.flatten(1)
    theta = angle(f0, f1)[:, None]
    expected = torch.stack([(torch.sin((1 - a) * theta) * f0 + torch.sin(a * theta) * f1)
                            / torch.sin(theta) for a in (0, 1 / 3, 2 / 3, 1)])
    torch.testing.assert_close(frames.flatten(2), expected, rtol=1e-3, atol=1e-3)


# --- 5. argument validation ---------------------------------------------------------------------

def small_problem():
    mixture = ring_mixture()
    return (score_sde.VPSDE(), exact_score_fn(mixture, KERNELS["vp"]),
            torch.zeros((3, 2), dtype=F64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask=torch.tensor([0.5, 1.0])), r"mask must contain only 0 \(unknown\) and 1"),
    (dict(mask=torch.tensor([2, 0])), r"mask must contain only 0 \(unknown\) and 1"),
    (dict(mask=torch.ones(3)), r"mask of shape \(3,\) does not broadcast to x_known of shape "
                               r"\(3, 2\)"),
    (dict(mask=torch.ones(1, 3, 2)), r"mask of shape \(1, 3, 2\) does not broadcast"),
    (dict(mask=[1, 0]), "mask must be a tensor of 0s and 1s"),
    (dict(x_known=torch.zeros(3)), r"x_known must be a floating tensor of shape \[B, ...\] "
                                  r"with rank >= 2, got \(3,\)"),
    (dict(x_known=torch.zeros((3, 2), dtype=torch.long)), "x_known must be a floating tensor"),
    (dict(x_known=torch.full((3, 2), float("nan"))), "x_known contains non-finite values"),
    (dict(x_known=torch.tensor([[0.0, 1.0], [float("inf"), 1.0], [0.0, 1.0]], dtype=F64)),
     "x_known contains non-finite values"),  # in the known region (mask [1, 0])
    (dict(generator=0), "generator must be a torch.Generator or None, got int"),
    (dict(sde=OrnsteinUhlenbeck()), "forward marginal, which OrnsteinUhlenbeck does not"),
    (dict(sde="vp"), "sde must be an instance of score_sde.SDE"),
    (dict(score_fn=None), "score_fn must be callable"),
    (dict(predictor="heun"), r"unknown predictor 'heun'; accepted: 'euler_maruyama'"),
    (dict(corrector="mala"), r"unknown corrector 'mala'; accepted: 'langevin'"),
    (dict(snr=0.0), "snr must be a finite number > 0"),
    (dict(corrector_steps=-1), "corrector_steps must be an integer >= 0"),
    (dict(num_steps=0), "num_steps must be an integer >= 1"),
    (dict(num_steps=10), "cannot have num_steps=10"),  # VP's DDPM chain needs > 20 steps
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(eps=1.0), r"eps must lie in \(0, T=1.0\)"),
])
def test_inpaint_bad_arguments_raise(kwargs, match):
    sde, score_fn, x_known = small_problem()
    args = dict(sde=sde, score_fn=score_fn, x_known=x_known, mask=torch.tensor([1.0, 0.0]),
                num_steps=FEW_STEPS)
    args.update(kwargs)
    counter = Counter(args["score_fn"]) if callable(args["score_fn"]) else None
    if counter is not None:
        args["score_fn"] = counter
    with pytest.raises(ValueError, match=match):
        inpaint(args.pop("sde"), args.pop("score_fn"), args.pop("x_known"), args.pop("mask"),
                **args)
    assert counter is None or counter.calls == 0  # refused before sampling


@pytest.mark.parametrize("gray, match", [
    (torch.zeros((2, 2, 2, 2)), r"gray must have 1 channel \(or 3 equal ones\) in dim 1, got "
                                r"shape \(2, 2, 2, 2\)"),
    (torch.rand((2, 3, 2, 2), generator=gen(0)), "gray with 3 channels must have equal "
                                                 "channels"),
    (torch.zeros(4), "gray must be a floating tensor"),
    (torch.zeros((2, 1, 2), dtype=torch.int32), "gray must be a floating tensor"),
])
def test_colorize_bad_gray_raises(gray, match):
    with pytest.raises(ValueError, match=match):
        colorize(score_sde.VESDE(), lambda x, t: -x, gray, num_steps=FEW_STEPS)


def test_colorize_generator_that_is_not_a_generator_raises():
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got int"):
        colorize(score_sde.VESDE(), lambda x, t: -x, torch.zeros((2, 1, 2, 2)),
                 num_steps=FEW_STEPS, generator=0)


def test_colorize_gives_the_score_contiguous_input_and_names_itself_in_errors():
    # A score written for a network's contiguous input (it calls .view), as every sampler
    # passes it; and a score gone non-finite is reported as colorization's.
    seen = []

    def viewing_score(x, t):
        seen.append(x.is_contiguous())
        return -x.view(x.shape[0], -1).view_as(x)

    gray = torch.zeros((2, 1, 2, 2))
    x, _ = colorize(score_sde.VESDE(), viewing_score, gray, num_steps=FEW_STEPS)
    assert x.shape == (2, 3, 2, 2) and seen and all(seen)
    with pytest.raises(RuntimeError, match=r"^colorization produced non-finite samples"):
        colorize(score_sde.VESDE(), lambda x, t: x * float("nan"), gray, num_steps=FEW_STEPS)


def test_colorize_without_marginal_raises():
    with pytest.raises(ValueError, match="OrnsteinUhlenbeck"):
        colorize(OrnsteinUhlenbeck(), lambda x, t: -x, torch.zeros((2, 1, 2, 2)))


def test_guidance_bad_arguments_raise():
    score, classifier = (lambda x, t: -x), (lambda x, t: x[:, :2])
    for labels, match in [(torch.tensor([0.0, 1.0]), r"labels must be an integer tensor \[B\]"),
                          (torch.tensor([[0, 1]]), r"labels must be an integer tensor \[B\]"),
                          ([0, 1], r"labels must be an integer tensor \[B\]"),
                          (torch.tensor([0, -1]), "labels must be >= 0, got -1")]:
        with pytest.raises(ValueError, match=match):
            classifier_guided_score(score, classifier, labels)
    labels = torch.tensor([0, 1])
    for scale in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            classifier_guided_score(score, classifier, labels, scale)
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            classifier_free_score(score, score, scale)
    with pytest.raises(ValueError, match="log_prob_fn must be callable"):
        classifier_guided_score(score, None, labels)
    with pytest.raises(ValueError, match="uncond_score_fn must be callable"):
        classifier_free_score(score, None, 1.0)
    x, t = torch.randn((2, 3), generator=gen(0), dtype=F64), torch.full((2,), 0.5, dtype=F64)
    calls = [(torch.randn((3, 3), dtype=F64), torch.full((3,), 0.5, dtype=F64), classifier,
              "x has batch size 3 but labels has 2"),
             (x, t, lambda x, t: x[:, 0], r"log_prob_fn must return \[B, K\] = \[2, K\]"),
             (x, t, lambda x, t: x[:, :1], r"labels must be < K = 1"),
             (x, t, lambda x, t: x[:, :2].detach(), "does not depend differentiably on x")]
    for x_, t_, fn, match in calls:
        with pytest.raises(ValueError, match=match):
            classifier_guided_score(score, fn, labels)(x_, t_)
    # Inference mode forbids the gradient guidance needs: said as such, not blamed on the
    # (differentiable) classifier; torch.no_grad() is fine.
    with torch.no_grad():
        assert classifier_guided_score(score, classifier, labels)(x, t).shape == x.shape
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        classifier_guided_score(score, classifier, labels)(x, t)


def test_slerp_and_interpolate_bad_arguments_raise():
    z = torch.zeros((2, 3))
    with pytest.raises(ValueError, match=r"z0 and z1 must have the same shape, got \(2, 3\)"):
        slerp(z, torch.zeros((2, 4)), [0.5])
    with pytest.raises(ValueError, match="z1 must be a floating tensor"):
        slerp(z, torch.zeros((2, 3), dtype=torch.long), [0.5])
    for alphas in ([[0.5]], [float("nan")], "a"):
        with pytest.raises(ValueError, match="alphas must be a"):
            slerp(z, z, alphas)
    sde, score_fn = score_sde.VPSDE(), lambda x, t: -x
    with pytest.raises(ValueError, match="num must be an integer >= 2"):
        interpolate(sde, score_fn, z, z, num=1)
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        interpolate(sde, score_fn, z, torch.zeros((3, 3)))
    with pytest.raises(ValueError, match="x1 must be a floating tensor"):
        interpolate(sde, score_fn, z, torch.zeros(3))
