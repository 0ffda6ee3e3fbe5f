"""Tests of score_sde/sde.py against closed forms and independent numerics.

Every expected value is derived here from the paper's definitions (Song et al. 2021, Eqs. 9, 11,
12; Ho et al. 2020, Eq. 2; Song & Ermon 2019; Nichol & Dhariwal 2021, Eq. 17) or from
`tests/problems.py`, never from the library's own output.
"""
import math
import re
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

import score_sde
from score_sde import make_score_fn
from score_sde._utils import append_dims
from score_sde.sde import SDE, CosineVPSDE, ReverseSDE, SubVPSDE, VESDE, VPSDE
from tests.problems import KERNELS

F64 = torch.float64
BETA_MIN, BETA_MAX = 0.1, 20.0
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0
COS_S, COS_MAX_BETA = 0.008, 0.999

# Relative tolerances, one table (float32 results are compared against float64 references).
RTOL = {
    "moment_ode": 1e-7,  # scipy DOP853 at rtol 1e-10, atol 1e-12
    "closed_form": 1e-12,  # float64 library vs float64 closed form
    "small_t": 1e-12,  # float64 sigma at t = 1e-5 (no cancellation allowed)
    "derivative": 1e-8,  # autograd d/dt of the marginal vs the moment ODE right-hand side
    torch.float64: 1e-12,
    torch.float32: 1e-6,
}
STAT_LEVEL = 1e-3  # significance level of the statistical tests on prior samples

SDE_NAMES = ["vp", "subvp", "ve", "cosine"]
# Shapes [B, ...] of the data ranks under test: vectors [B, D] and images [B, C, H, W].
SHAPES = {2: (3, 5), 4: (3, 2, 3, 2)}


def make_sde(name, num_steps=1000):
    if name == "vp":
        return VPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX, num_steps=num_steps)
    if name == "subvp":
        return SubVPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX, num_steps=num_steps)
    if name == "ve":
        return VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, num_steps=num_steps)
    return CosineVPSDE(s=COS_S, max_beta=COS_MAX_BETA, num_steps=num_steps)


# --- closed forms from the papers, written independently of the library ----------------------

def vp_beta(t):
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def vp_big_b(t):
    """B(t) = int_0^t beta."""
    return BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t ** 2


def cosine_u(t, s=COS_S):
    return (t + s) / (1 + s) * (math.pi / 2)


def cosine_abar(t, s=COS_S):
    """Nichol & Dhariwal's alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2)."""
    return np.cos(cosine_u(t, s)) ** 2 / math.cos(cosine_u(0.0, s)) ** 2


def cosine_beta_cap(num_steps=1000, max_beta=COS_MAX_BETA):
    """A step of length 1/N at rate beta_cap multiplies alpha^2 by 1 - max_beta."""
    return -num_steps * math.log(1 - max_beta)


def cosine_t_cap(num_steps=1000, max_beta=COS_MAX_BETA, s=COS_S):
    """Where the unclipped beta(t) = -d log alpha_bar / dt reaches the cap (root-found)."""
    cap = cosine_beta_cap(num_steps, max_beta)

    def excess(t):
        return math.pi / (1 + s) * math.tan(cosine_u(t, s)) - cap

    if excess(0.0) >= 0:
        return 0.0
    return optimize.brentq(excess, 0.0, 1.0 - 1e-15, xtol=1e-15, rtol=1e-15)


def cosine_beta(t):
    """beta(t) = -d log alpha_bar / dt = pi / (1 + s) tan(u(t)), clipped at the cap (for the
    default num_steps = 1000 and max_beta)."""
    unclipped = math.pi / (1 + COS_S) * torch.tan(cosine_u(t.clamp(max=1 - 1e-12)))
    return torch.clamp(unclipped, max=cosine_beta_cap())


def coefficients(name, t):
    """Linear drift coefficient f(t) (drift = f(t) x) and g(t)^2 of the paper's SDEs."""
    if name == "vp":
        return -0.5 * vp_beta(t), vp_beta(t)
    if name == "subvp":
        return -0.5 * vp_beta(t), vp_beta(t) * -torch.expm1(-2 * vp_big_b(t))
    if name == "ve":
        log_r = math.log(SIGMA_MAX / SIGMA_MIN)
        return torch.zeros_like(t), 2 * log_r * (SIGMA_MIN * torch.exp(t * log_r)) ** 2
    return -0.5 * cosine_beta(t), cosine_beta(t)


def kernel(name, t):
    """(alpha, sigma) of the perturbation kernel: problems.KERNELS, or N&D below the cap."""
    if name == "cosine":
        assert float(t.max()) < cosine_t_cap()
        alpha = torch.cos(cosine_u(t)) / math.cos(cosine_u(0.0))
        return alpha, torch.sqrt(1 - alpha ** 2)
    a, v = KERNELS[name](t)
    return a, torch.sqrt(v)


def per_sample(v, ndim):
    """[B] -> [B, 1, ..., 1] of rank ndim (written here so expectations do not reuse the
    library's append_dims)."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def times(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def batch_times(batch, dtype=F64):
    """Distinct times in (0, 1) below the cosine cap, one per sample."""
    return torch.linspace(0.05, 0.95, batch, dtype=dtype)


def randn(shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_close(actual, expected, rtol, atol=0.0):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


# --- 1. marginals -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SDE_NAMES)
def test_marginal_coeffs_solve_the_moment_odes(name):
    """alpha = a, sigma^2 = v with da/dt = f a, dv/dt = 2 f v + g^2, a(0) = 1, v(0) = 0, where f
    and g are read off the library's own `sde` (drift / x at x = 1, and the diffusion)."""
    sde = make_sde(name)
    ones = torch.ones(1, 1, dtype=F64)

    def rhs(t, y):
        drift, diffusion = sde.sde(ones, times(t))
        f, g = drift.item(), diffusion.item()
        return [f * y[0], 2 * f * y[1] + g ** 2]

    t_eval = [1e-3, 0.1, 0.37, 0.5, 0.9, 1.0]
    if name == "cosine":
        t_cap = cosine_t_cap()
        t_eval = sorted(t_eval[:-1] + [0.999, t_cap - 1e-5, t_cap + 1e-5, 1.0])
    sol = integrate.solve_ivp(rhs, (0.0, 1.0), [1.0, 0.0], method="DOP853", t_eval=t_eval,
                              rtol=1e-10, atol=1e-12)
    assert sol.success, sol.message
    alpha, sigma = sde.marginal_coeffs(times(*t_eval))
    assert alpha.dtype == sigma.dtype == F64
    assert_close(alpha, torch.from_numpy(sol.y[0]), rtol=RTOL["moment_ode"])
    assert_close(sigma, torch.from_numpy(np.sqrt(sol.y[1])), rtol=RTOL["moment_ode"])


@pytest.mark.parametrize("name", SDE_NAMES)
def test_marginal_coeffs_satisfy_the_moment_odes_pointwise(name):
    """d alpha/dt = f alpha and d sigma^2/dt = 2 f sigma^2 + g^2 with the paper's f and g."""
    t = times(1e-3, 0.2, 0.5, 0.8, 0.99, 1.0).requires_grad_()
    alpha, sigma = make_sde(name).marginal_coeffs(t)
    # VE's alpha = 1 is a constant with no graph; materialize_grads turns that into d/dt = 0.
    d_alpha, d_var = (torch.autograd.grad(c.sum(), t, retain_graph=True, allow_unused=True,
                                          materialize_grads=True)[0]
                      if c.requires_grad else torch.zeros_like(t) for c in (alpha, sigma ** 2))
    f, g2 = coefficients(name, t.detach())
    assert_close(d_alpha, f * alpha.detach(), rtol=RTOL["derivative"])
    assert_close(d_var, 2 * f * sigma.detach() ** 2 + g2, rtol=RTOL["derivative"])


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_marginal_coeffs_match_paper_kernels(name):
    t = times(1e-4, 1e-2, 0.25, 0.5, 0.75, 1.0)
    alpha, sigma = make_sde(name).marginal_coeffs(t)
    a, v = KERNELS[name](t)
    assert_close(alpha, a, rtol=RTOL["closed_form"])
    assert_close(sigma, torch.sqrt(v), rtol=1e-9)  # v = 1 - exp(-B) cancels in the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_marginal_coeffs_dtype_and_endpoints(name, dtype):
    alpha, sigma = make_sde(name).marginal_coeffs(times(0.0, 1.0, dtype=dtype))
    assert alpha.dtype == sigma.dtype == dtype
    assert alpha[0] == 1 and sigma[0] == 0
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()


@pytest.mark.parametrize("name", SDE_NAMES)
def test_round_off_outside_the_interval_reads_as_its_end(name):
    """Times within the allowed round-off below 0 or above T give the coefficients at 0 and T,
    not the NaN of sqrt(1 - alpha^2) or the negative std of sub-VP's 1 - alpha^2."""
    sde = make_sde(name)
    t = torch.tensor([-5e-7, 0.0, 1.0, 1.0 + 5e-7], dtype=F64)
    alpha, sigma = sde.marginal_coeffs(t)
    assert alpha[0] == alpha[1] == 1 and sigma[0] == sigma[1] == 0
    assert alpha[3] == alpha[2] and sigma[3] == sigma[2]
    _, g = sde.sde(torch.ones(4, 2, dtype=F64), t)
    assert torch.isfinite(g).all() and g[0] == g[1] and g[3] == g[2]


def test_cosine_alpha_matches_nichol_dhariwal_below_the_cap():
    sde = make_sde("cosine")
    t = torch.linspace(0.0, sde.t_cap, 101, dtype=F64)
    alpha, _ = sde.marginal_coeffs(t)
    assert_close(alpha ** 2, torch.from_numpy(cosine_abar(t.numpy())), rtol=RTOL["closed_form"])


def test_cosine_sigma_keeps_its_digits_at_tiny_t():
    # Near t = 0, 1 - alpha^2 = t beta(0) (1 + O(t)) with beta(0) = pi tan u(0) / (1 + s): the
    # marginal std must keep t's digits, not those of u(t) - u(0) (which lost 5 of them at
    # t = 1e-14), or lambda(t) and the fast samplers' t(lambda) are off there.
    sde = make_sde("cosine")
    t = times(1e-16, 1e-14, 1e-12)
    _, sigma = sde.marginal_coeffs(t)
    beta0 = math.pi * math.tan(cosine_u(0.0)) / (1 + COS_S)
    assert_close(sigma ** 2, t * beta0, rtol=1e-9, atol=0)


def test_cosine_beta_is_capped_and_finite_at_t1():
    sde = make_sde("cosine")
    assert sde.t_cap == pytest.approx(cosine_t_cap(), rel=1e-12)
    t = times(0.0, 0.5, sde.t_cap - 1e-6, sde.t_cap + 1e-6, 1.0)
    _, diffusion = sde.sde(torch.ones(5, 1, dtype=F64), t)
    beta = diffusion ** 2
    assert torch.isfinite(beta).all()
    assert_close(beta, cosine_beta(t), rtol=1e-9)
    assert beta[-1] == pytest.approx(cosine_beta_cap(), rel=1e-12)


@pytest.mark.parametrize("num_steps,max_beta", [(1000, 0.999), (10, 0.999), (10, 0.5)])
def test_cosine_discrete_betas_match_nichol_dhariwal(num_steps, max_beta):
    """beta_i = min(1 - abar(i / N) / abar((i - 1) / N), max_beta) for i = 1..N, except at the
    single step straddling the cap, where the library's continuous clipping differs."""
    sde = CosineVPSDE(s=COS_S, max_beta=max_beta, num_steps=num_steps)
    grid = np.arange(num_steps + 1) / num_steps
    abar = cosine_abar(grid)
    expected = np.minimum(1 - abar[1:] / abar[:-1], max_beta)
    betas = sde.discrete_betas
    assert betas.shape == (num_steps,) and betas.dtype == F64
    straddle = int(math.floor(cosine_t_cap(num_steps, max_beta) * num_steps))
    keep = np.arange(num_steps) != straddle
    np.testing.assert_allclose(betas.numpy()[keep], expected[keep], rtol=1e-9, atol=1e-12)
    assert 0 < betas[straddle] <= max_beta * (1 + 1e-12)


def cosine_chain(num_steps, max_beta=COS_MAX_BETA):
    """The N betas of the clipped cosine chain, from the closed form: log alpha_bar is Nichol &
    Dhariwal's below t_cap (where beta(t) reaches the cap of N steps) and falls at the rate
    beta_cap beyond it; beta_i = 1 - alpha_bar((i + 1) / N) / alpha_bar(i / N)."""
    cap, t_cap = cosine_beta_cap(num_steps, max_beta), cosine_t_cap(num_steps, max_beta)
    grid = np.arange(num_steps + 1) / num_steps
    log_abar = np.where(grid <= t_cap, np.log(cosine_abar(np.minimum(grid, t_cap))),
                        math.log(cosine_abar(t_cap)) - cap * (grid - t_cap))
    return torch.from_numpy(-np.expm1(np.diff(log_abar)))


@pytest.mark.parametrize("num_steps", [10, 100, 1000])
def test_cosine_with_num_steps_rebuilds_the_cap(num_steps):
    # The cap -N log(1 - max_beta) depends on N; a copy for another N that kept the old cap
    # had a largest beta of 0.999999 at N = 10 and 0.99989 at N = 100 (from N = 1000), above
    # the 0.999 of Nichol & Dhariwal. Every derived table must follow N, whichever N the SDE
    # was built with.
    expected = cosine_chain(num_steps)
    for start in (1000, 10, num_steps):
        sde = make_sde("cosine", start).with_num_steps(num_steps)
        assert sde.num_steps == num_steps
        assert sde.beta_cap == pytest.approx(cosine_beta_cap(num_steps), rel=1e-12)
        assert sde.t_cap == pytest.approx(cosine_t_cap(num_steps), rel=1e-12)
        assert_close(sde.discrete_betas, expected, rtol=1e-9)
        assert float(sde.discrete_betas.max()) <= COS_MAX_BETA
        # The continuous SDE has the same cap: beta(1) = beta_cap, and the chain's marginals
        # are the SDE's at the chain times i / N.
        _, diffusion = sde.sde(torch.ones(1, 1, dtype=F64), times(1.0))
        assert float(diffusion[0]) ** 2 == pytest.approx(cosine_beta_cap(num_steps), rel=1e-12)
        alpha, _ = sde.marginal_coeffs(torch.linspace(0, 1, num_steps + 1, dtype=F64))
        assert_close(alpha[1:] ** 2, torch.cumprod(1 - expected, 0), rtol=1e-9)
    # The original is left unchanged.
    original = make_sde("cosine", 1000)
    original.with_num_steps(num_steps)
    assert original.beta_cap == pytest.approx(cosine_beta_cap(1000), rel=1e-12)


def test_cosine_cap_below_beta_at_t0():
    """max_beta = 1e-5, N = 1000: beta_cap ~ 0.01 < beta(0) ~ 0.039, so beta = beta_cap on all
    of [0, 1] and alpha(t) = exp(-beta_cap t / 2)."""
    sde = CosineVPSDE(s=COS_S, max_beta=1e-5, num_steps=1000)
    t = times(0.0, 0.5, 1.0)
    alpha, sigma = sde.marginal_coeffs(t)
    expected = torch.exp(-0.5 * cosine_beta_cap(1000, 1e-5) * t)
    assert_close(alpha, expected, rtol=1e-12)
    assert_close(sigma, torch.sqrt(-torch.expm1(-cosine_beta_cap(1000, 1e-5) * t)), rtol=1e-9)


# --- 9. float64 precision at small t ----------------------------------------------------------

def small_t_sigma(name, t):
    """sigma(t) at small t, written without cancellation."""
    if name == "vp":
        return torch.sqrt(-torch.expm1(-vp_big_b(t)))
    if name == "subvp":
        return -torch.expm1(-vp_big_b(t))
    if name == "ve":
        return SIGMA_MIN * torch.sqrt(torch.expm1(2 * t * math.log(SIGMA_MAX / SIGMA_MIN)))
    # cos^2(u0) - cos^2(u) = sin(u - u0) sin(u + u0).
    u, u0 = cosine_u(t), cosine_u(0.0)
    return torch.sqrt(torch.sin(u - u0) * torch.sin(u + u0)) / math.cos(u0)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine"])
def test_small_t_sigma_has_full_float64_precision(name):
    t = times(1e-5, 1e-7)
    _, sigma = make_sde(name).marginal_coeffs(t)
    assert_close(sigma, small_t_sigma(name, t), rtol=RTOL["small_t"])


# --- 2. marginal_prob, denoise ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_marginal_prob(name, rank, dtype):
    x = randn(SHAPES[rank], dtype=dtype)
    t = batch_times(x.shape[0], dtype=dtype)
    mean, std = make_sde(name).marginal_prob(x, t)
    alpha, sigma = kernel(name, t.double())
    assert mean.dtype == std.dtype == dtype
    assert mean.shape == x.shape and std.shape == t.shape
    assert_close(mean, per_sample(alpha, rank) * x.double(), rtol=RTOL[dtype])
    assert_close(std, sigma, rtol=RTOL[dtype])


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_denoise_is_tweedie_for_gaussian_data(name, rank):
    """Data N(0, s^2 I): with the exact score -x / (alpha^2 s^2 + sigma^2), Tweedie gives
    E[x0 | x_t = x] = alpha s^2 x / (alpha^2 s^2 + sigma^2)."""
    s = 1.7
    x = randn(SHAPES[rank])
    t = batch_times(x.shape[0])
    alpha, sigma = (per_sample(c, rank) for c in kernel(name, t))
    var = alpha ** 2 * s ** 2 + sigma ** 2
    x0 = make_sde(name).denoise(x, t, -x / var)
    assert_close(x0, alpha * s ** 2 * x / var, rtol=1e-10)


# --- 3. prior ---------------------------------------------------------------------------------

def prior_std(name):
    return SIGMA_MAX if name == "ve" else 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prior_logp_of_half_precision_latents_is_returned_in_float32(dtype):
    """A 3x64x64 VE latent's log-density (about -6.6e4 nats) lies beyond float16's range."""
    z = (SIGMA_MAX * randn((2, 3, 64, 64))).to(dtype)
    d, z64 = 3 * 64 * 64, z.double()
    expected = (-0.5 * d * math.log(2 * math.pi * SIGMA_MAX ** 2)
                - (z64 ** 2).flatten(1).sum(1) / (2 * SIGMA_MAX ** 2))
    logp = make_sde("ve").prior_logp(z)
    assert logp.dtype == torch.float32
    assert_close(logp, expected, rtol=1e-7)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior_logp_of_an_empty_batch_raises(name):
    with pytest.raises(ValueError, match=r"B >= 1 samples, got \(0, 3\)"):
        make_sde(name).prior_logp(torch.zeros(0, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior_logp(name, rank, dtype):
    z = prior_std(name) * randn(SHAPES[rank], dtype=dtype)
    logp = make_sde(name).prior_logp(z)
    normal = torch.distributions.Normal(torch.zeros((), dtype=F64), prior_std(name))
    expected = normal.log_prob(z.double()).flatten(1).sum(1)
    assert logp.shape == (z.shape[0],) and logp.dtype == dtype
    assert_close(logp, expected, rtol=RTOL[dtype])


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # conftest skips gpu without CUDA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior_sampling_shape_dtype_device(name, dtype, device):
    for shape in ([7, 3], (2, 3, 4, 5)):
        z = make_sde(name).prior_sampling(shape, device=device, dtype=dtype)
        assert z.shape == tuple(shape) and z.dtype == dtype and z.device.type == device


@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior_sampling_moments(name):
    """Two-sided chi-square test of the variance, z-test of the mean, at level STAT_LEVEL."""
    z = make_sde(name).prior_sampling((2000, 3, 2, 2), dtype=F64,
                                      generator=torch.Generator().manual_seed(1))
    z = z.flatten() / prior_std(name)
    n = z.numel()
    chi2 = float((z ** 2).sum())
    p_var = 2 * min(stats.chi2.cdf(chi2, n), stats.chi2.sf(chi2, n))
    p_mean = 2 * stats.norm.sf(abs(float(z.sum())) / math.sqrt(n))
    assert p_var > STAT_LEVEL, f"sample variance {chi2 / n:.4f} (std units), p = {p_var:.2e}"
    assert p_mean > STAT_LEVEL, f"sample mean {float(z.mean()):.4f} (std units), p = {p_mean:.2e}"


@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior_sampling_is_reproducible_with_a_generator(name):
    sde = make_sde(name)

    def draw(seed):
        return sde.prior_sampling((4, 3), generator=torch.Generator().manual_seed(seed),
                                  dtype=F64)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


# --- 4. discretize ----------------------------------------------------------------------------

# Times chosen away from the step boundaries i / (N - 1) for N in {50, 1000} (except the ends);
# N = 50 is the smallest step count of the tests (VP needs beta_max / N < 1).
DISC_T = (0.0, 0.137, 0.61, 0.999, 1.0)


def step_indices(t, num_steps):
    """The paper code's step of time t: floor(t (N - 1) / T), with T = 1."""
    return [math.floor(float(ti) * (num_steps - 1)) for ti in t]


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("num_steps", [50, 1000])
def test_discretize_vp_is_ddpm(num_steps, rank):
    sde = make_sde("vp", num_steps)
    t = times(*DISC_T)
    x = randn((len(t),) + SHAPES[rank][1:])
    beta = torch.tensor([BETA_MIN / num_steps + i / (num_steps - 1) * (BETA_MAX - BETA_MIN)
                         / num_steps for i in step_indices(t, num_steps)], dtype=F64)
    f, G = sde.discretize(x, t)
    assert f.shape == x.shape and G.shape == t.shape
    assert_close(f, per_sample(torch.sqrt(1 - beta) - 1, rank) * x, rtol=1e-12)
    assert_close(G, torch.sqrt(beta), rtol=1e-12)


@pytest.mark.parametrize("num_steps", [50, 1000])
def test_discretize_cosine_is_ddpm_with_nichol_dhariwal_betas(num_steps):
    sde = make_sde("cosine", num_steps)
    t = times(0.0, 0.137, 0.61, 0.88)  # all steps below the cap
    x = randn((len(t), 4))
    i = np.array(step_indices(t, num_steps))
    beta = torch.from_numpy(1 - cosine_abar((i + 1) / num_steps) / cosine_abar(i / num_steps))
    f, G = sde.discretize(x, t)
    assert_close(f, per_sample(torch.sqrt(1 - beta) - 1, 2) * x, rtol=1e-9)
    assert_close(G, torch.sqrt(beta), rtol=1e-9)
    assert_close(sde.langevin_scale(t), 1 - beta, rtol=1e-9)


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("num_steps", [50, 1000])
def test_discretize_ve_is_smld(num_steps, rank):
    sde = make_sde("ve", num_steps)
    t = times(*DISC_T)
    x = randn((len(t),) + SHAPES[rank][1:])

    def sigma_i(i):  # geometric sigmas from sigma_min to sigma_max, sigma_{-1} = 0
        return 0.0 if i < 0 else SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** (i / (num_steps - 1))

    G_expected = torch.tensor([math.sqrt(sigma_i(i) ** 2 - sigma_i(i - 1) ** 2)
                               for i in step_indices(t, num_steps)], dtype=F64)
    f, G = sde.discretize(x, t)
    assert torch.equal(f, torch.zeros_like(x))
    assert_close(G, G_expected, rtol=1e-10)
    assert G[0] == pytest.approx(SIGMA_MIN, rel=1e-12)


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("num_steps", [50, 1000])
def test_discretize_subvp_is_euler_maruyama(num_steps, rank):
    sde = make_sde("subvp", num_steps)
    t = times(*DISC_T)
    x = randn((len(t),) + SHAPES[rank][1:])
    f_coef, g2 = coefficients("subvp", t)
    f, G = sde.discretize(x, t)
    assert_close(f, per_sample(f_coef, rank) * x / num_steps, rtol=1e-12)
    assert_close(G, torch.sqrt(g2 / num_steps), rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-3])
@pytest.mark.parametrize("num_steps", [21, 100, 999, 1000])  # VP needs N > 20
@pytest.mark.parametrize("name", SDE_NAMES)
def test_step_index_meets_each_step_once_on_the_sampler_grid(name, num_steps, eps):
    # The paper code's grid linspace(T, eps, N) holds t_k = eps + k (T - eps) / (N - 1), and
    # t_k (N - 1) / T = k + eps (N - 1 - k) / T lies in [k, k + 1) when eps (N - 1) < T.
    t = torch.linspace(1.0, eps, num_steps, dtype=F64)
    assert make_sde(name, num_steps).step_index(t).tolist() == list(range(num_steps))[::-1]
    # The chain times i T / (N - 1) themselves, whatever their round-off, give step i.
    t = torch.tensor([i / (num_steps - 1) for i in range(num_steps)], dtype=F64)
    assert make_sde(name, num_steps).step_index(t).tolist() == list(range(num_steps))


@pytest.mark.parametrize("num_steps", [50, 1000])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_step_index_and_langevin_scale(name, num_steps):
    sde = make_sde(name, num_steps)
    t = times(*DISC_T)
    i = sde.step_index(t)
    assert i.dtype == torch.long
    assert i.tolist() == step_indices(t, num_steps)
    scale = sde.langevin_scale(t)
    if name == "vp":
        beta = BETA_MIN / num_steps + i.double() / (num_steps - 1) * (BETA_MAX - BETA_MIN) \
            / num_steps
        assert_close(scale, 1 - beta, rtol=1e-12)
    elif name in ("subvp", "ve"):
        assert torch.equal(scale, torch.ones_like(t))
    # cosine: checked against Nichol & Dhariwal's betas in its discretize test.


# --- 5. reverse SDE and probability-flow ODE --------------------------------------------------

def analytic_score(x, t):
    """A simple t-dependent score, -x / (1 + t)."""
    return -x / per_sample(1 + t.to(x.dtype), x.ndim)


def expected_forward_discretization(name, x, t, num_steps):
    """(f, G) of each SDE's discretization, written from its paper."""
    i = torch.tensor(step_indices(t, num_steps))
    if name == "vp":
        beta = BETA_MIN / num_steps + i.double() / (num_steps - 1) * (BETA_MAX - BETA_MIN) \
            / num_steps
    elif name == "cosine":
        beta = torch.from_numpy(1 - cosine_abar((i.numpy() + 1) / num_steps)
                                / cosine_abar(i.numpy() / num_steps))
    elif name == "ve":
        sig = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** (i.double() / (num_steps - 1))
        prev = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** ((i.double() - 1) / (num_steps - 1))
        prev = torch.where(i > 0, prev, torch.zeros_like(prev))
        return torch.zeros_like(x), torch.sqrt(sig ** 2 - prev ** 2)
    else:
        f_coef, g2 = coefficients(name, t)
        return per_sample(f_coef, x.ndim) * x / num_steps, torch.sqrt(g2 / num_steps)
    return per_sample(torch.sqrt(1 - beta) - 1, x.ndim) * x, torch.sqrt(beta)


@pytest.mark.parametrize("probability_flow", [False, True])
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_reverse_sde(name, rank, probability_flow):
    sde = make_sde(name)
    x = randn(SHAPES[rank])
    t = batch_times(x.shape[0])
    rev = sde.reverse(analytic_score, probability_flow=probability_flow)
    assert isinstance(rev, ReverseSDE)
    assert rev.T == 1.0 and rev.num_steps == 1000
    c = 0.5 if probability_flow else 1.0
    f_coef, g2 = coefficients(name, t)
    drift, diffusion = rev.sde(x, t)
    expected = per_sample(f_coef, rank) * x - c * per_sample(g2, rank) * analytic_score(x, t)
    assert drift.shape == x.shape and diffusion.shape == t.shape
    assert_close(drift, expected, rtol=1e-10)
    assert_close(diffusion, torch.zeros_like(t) if probability_flow else torch.sqrt(g2),
                 rtol=1e-10)


@pytest.mark.parametrize("probability_flow", [False, True])
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_reverse_discretize(name, rank, probability_flow):
    num_steps = 50
    sde = make_sde(name, num_steps)
    t = times(0.0, 0.137, 0.61)  # below the cosine cap
    x = randn((len(t),) + SHAPES[rank][1:])
    rev = sde.reverse(analytic_score, probability_flow=probability_flow)
    f, G = expected_forward_discretization(name, x, t, num_steps)
    c = 0.5 if probability_flow else 1.0
    rev_f, rev_G = rev.discretize(x, t)
    assert_close(rev_f, f - c * per_sample(G ** 2, rank) * analytic_score(x, t), rtol=1e-9)
    assert_close(rev_G, torch.zeros_like(G) if probability_flow else G, rtol=1e-9)


@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_uses_a_given_score_without_calling_score_fn(probability_flow):
    def forbidden(x, t):
        raise AssertionError("score_fn called although the score was given")

    sde = make_sde("vp")
    x = randn((3, 2))
    t = batch_times(3)
    rev = sde.reverse(forbidden, probability_flow=probability_flow)
    given = analytic_score(x, t)
    reference = sde.reverse(analytic_score, probability_flow=probability_flow)
    for method in ("sde", "discretize"):
        actual = getattr(rev, method)(x, t, score=given)
        expected = getattr(reference, method)(x, t)
        for a, e in zip(actual, expected):
            assert torch.equal(a, e)


def test_reverse_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sde must be an instance"):
        ReverseSDE(object(), analytic_score)
    with pytest.raises(ValueError, match="score_fn must be callable"):
        ReverseSDE(make_sde("vp"), None)


# --- 6. a user-defined SDE --------------------------------------------------------------------

class OrnsteinUhlenbeck(SDE):
    """dx = -beta x / 2 dt + sqrt(beta) dw with constant beta; prior N(0, I)."""

    def __init__(self, beta=2.0, num_steps=100):
        super().__init__(num_steps)
        self.beta = beta

    def sde(self, x, t):
        return -0.5 * self.beta * x, torch.full(t.shape, math.sqrt(self.beta), dtype=x.dtype)

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)


@pytest.mark.parametrize("diffusion, got", [
    (lambda x, t: 1.0, "float"), (lambda x, t: torch.ones_like(x), "(3, 2)"),
    (lambda x, t: torch.ones(x.shape[0], 1, dtype=x.dtype), "(3, 1)")])
def test_user_sde_breaking_the_contract_gets_one_clear_error(diffusion, got):
    # g(t) must be a tensor [B]; other shapes broadcast in some samplers and not in others.
    class Broken(OrnsteinUhlenbeck):
        def sde(self, x, t):
            return -x, diffusion(x, t)

    score = lambda x, t: -x  # noqa: E731
    for kwargs in (dict(predictor="euler_maruyama"), dict(predictor="reverse_diffusion")):
        with pytest.raises(ValueError, match=rf"Broken\.sde must return \(drift shaped like x "
                                             rf"\(3, 2\), diffusion of shape \[B\] = \(3,\)\), "
                                             rf"got \(\(3, 2\), {re.escape(got)}\)"):
            score_sde.sample_pc(Broken(), score, (3, 2), corrector="none", num_steps=4,
                                denoise=False, **kwargs)
    with pytest.raises(ValueError, match=r"Broken\.sde must return"):
        score_sde.sample_ode(Broken(), score, (3, 2), denoise=False)


def test_user_chain_tables_are_rebuilt_by_build_chain_or_a_warning_says_so():
    # A user SDE written the paper code's way: a table of discrete betas read by its own
    # discretize. sample_pc(num_steps=N) re-discretizes through with_num_steps, which rebuilds
    # tables only in build_chain: without it the old table would be indexed as N steps.
    class TableVP(OrnsteinUhlenbeck):
        def __init__(self, num_steps=1000):
            super().__init__(num_steps=num_steps)
            self.tables_built = 0
            self.build_chain()

        def build_chain(self):
            self.betas = torch.linspace(1e-4, 0.02 * 1000 / self.num_steps, self.num_steps)
            self.tables_built += 1

        def discretize(self, x, t, dt=None):
            beta = self.betas[self.step_index(t)].to(x.dtype)
            return -0.5 * beta[:, None] * x, beta.sqrt()

    new = TableVP().with_num_steps(100)
    assert new.betas.shape == (100,) and new.tables_built == 2
    score = lambda x, t: -x  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_sde.sample_pc(TableVP(), score, (2, 3), corrector="none", num_steps=100)

    class Forgetful(TableVP):
        build_chain = SDE.build_chain  # tables built in __init__ only

        def __init__(self, num_steps=1000):
            super().__init__(num_steps)
            TableVP.build_chain(self)

    with pytest.warns(UserWarning, match=r"Forgetful overrides discretize or langevin_scale "
                                         r"but not build_chain: tables of its chain built for "
                                         r"1000 steps are not rebuilt for 100") as caught:
        score_sde.sample_pc(Forgetful(), score, (2, 3), corrector="none", num_steps=100)
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("make", [lambda: VPSDE(num_steps=1, beta_max=0.5),
                                  lambda: VESDE(num_steps=1), lambda: VESDE().with_num_steps(1)])
def test_one_step_chains_are_refused(make):
    # linspace(a, b, 1) = [a]: one DDPM beta of beta_min, one SMLD level of sigma_min.
    with pytest.raises(ValueError, match=r"chain needs num_steps >= 2"):
        make()


def test_user_defined_sde():
    sde = OrnsteinUhlenbeck(beta=2.0, num_steps=100)
    assert sde.T == 1.0 and sde.num_steps == 100
    assert not sde.has_marginal
    assert all(make_sde(name).has_marginal for name in SDE_NAMES)
    t = batch_times(3)
    x = randn((3, 2, 2))
    with pytest.raises(NotImplementedError, match="OrnsteinUhlenbeck"):
        sde.marginal_coeffs(t)
    with pytest.raises(NotImplementedError, match="OrnsteinUhlenbeck"):
        sde.marginal_prob(x, t)
    # Default discretization: Euler–Maruyama with dt = 1 / num_steps.
    f, G = sde.discretize(x, t)
    assert_close(f, -0.5 * 2.0 * x / 100, rtol=1e-12)
    assert_close(G, torch.full((3,), math.sqrt(2.0 / 100), dtype=F64), rtol=1e-12)
    assert torch.equal(sde.langevin_scale(t), torch.ones_like(t))
    rev_drift, rev_diffusion = sde.reverse(analytic_score).sde(x, t)
    assert_close(rev_drift, -x - 2.0 * analytic_score(x, t), rtol=1e-12)
    assert_close(rev_diffusion, torch.full((3,), math.sqrt(2.0), dtype=F64), rtol=1e-12)


def test_sampling_eps_follows_the_paper_code_per_sde():
    # Samplers conventionally stop at 1e-3 for the VP family and 1e-5 for VE; a user's SDE
    # inherits 1e-3 and may override it.
    assert [make_sde(name).sampling_eps for name in ("vp", "subvp", "cosine", "ve")] == \
        [1e-3, 1e-3, 1e-3, 1e-5]
    assert OrnsteinUhlenbeck().sampling_eps == 1e-3


def test_subclass_with_marginal_reports_it():
    class ConstantOU(OrnsteinUhlenbeck):
        def marginal_coeffs(self, t):
            alpha = torch.exp(-0.5 * self.beta * t)
            return alpha, torch.sqrt(1 - alpha ** 2)

    assert ConstantOU().has_marginal


def test_incomplete_subclass_cannot_be_instantiated():
    class NoPrior(SDE):
        def sde(self, x, t):
            return -x, torch.ones_like(t)

    with pytest.raises(TypeError, match="abstract"):
        NoPrior()


# --- 7. validation and rank handling ----------------------------------------------------------

def call(method, sde, x, t):
    if method == "marginal_prob":
        return sde.marginal_prob(x, t)
    if method.startswith("reverse."):
        return getattr(sde.reverse(analytic_score), method.split(".")[1])(x, t)
    return getattr(sde, method)(x, t)


METHODS = ["sde", "marginal_prob", "discretize", "reverse.sde", "reverse.discretize"]
B = 4
BAD_TIMES = {
    "column": (torch.full((B, 1), 0.5, dtype=F64), "shape"),
    "scalar": (torch.tensor(0.5, dtype=F64), "shape"),
    "wrong_batch": (torch.full((B + 1,), 0.5, dtype=F64), "shape"),
    "batch_one": (torch.full((1,), 0.5, dtype=F64), "shape"),
    "integer": (torch.zeros(B, dtype=torch.long), "floating-point"),
    "python_float": (0.5, "tensor"),
}


@pytest.mark.parametrize("bad", list(BAD_TIMES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SDE_NAMES)
def test_bad_time_raises(name, method, bad):
    t, what = BAD_TIMES[bad]
    with pytest.raises(ValueError, match=f"^t must .*{what}"):
        call(method, make_sde(name), randn((B, 3)), t)


@pytest.mark.parametrize("method", METHODS)
def test_bad_x_raises(method):
    t = batch_times(B)
    with pytest.raises(ValueError, match="^x must be a tensor"):
        call(method, make_sde("vp"), np.zeros((B, 3)), t)
    with pytest.raises(ValueError, match="^x must be a tensor"):
        call(method, make_sde("vp"), torch.tensor(1.0, dtype=F64), t)


@pytest.mark.parametrize("bad", list(BAD_TIMES))
def test_denoise_rejects_bad_time(bad):
    t, what = BAD_TIMES[bad]
    x = randn((B, 3))
    with pytest.raises(ValueError, match=f"^t must .*{what}"):
        make_sde("vp").denoise(x, t, -x)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_marginal_coeffs_rejects_integer_time(name):
    with pytest.raises(ValueError, match="^t must .*floating-point"):
        make_sde(name).marginal_coeffs(torch.tensor([0, 1]))


@pytest.mark.parametrize("shape", [(3,), (3, 3), (3, 3, 3), (3, 3, 3, 3)])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_drift_keeps_the_shape_of_x_and_pairs_sample_i_with_t_i(name, shape):
    """B equals every other dimension, so pairing t with the wrong axis would go unnoticed by a
    shape check alone; the values are checked sample by sample."""
    x = randn(shape)
    t = times(0.1, 0.5, 0.9)
    drift, diffusion = make_sde(name).sde(x, t)
    assert drift.shape == x.shape and diffusion.shape == (3,)
    f_coef, g2 = coefficients(name, t)
    for i in range(3):
        assert_close(drift[i], f_coef[i] * x[i], rtol=1e-12)
    assert_close(diffusion, torch.sqrt(g2), rtol=1e-10)


def test_append_dims_rejects_higher_rank():
    assert append_dims(torch.zeros(3), 4).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match="rank 2 to data of rank 1"):
        append_dims(torch.zeros(3, 1), 1)


CONSTRUCTOR_ERRORS = [
    (VPSDE, dict(beta_min=-0.1), "beta_min"),
    (VPSDE, dict(beta_min=0.0), "beta_min"),
    (VPSDE, dict(beta_max=-1.0), "beta_max"),
    (VPSDE, dict(beta_min=float("nan")), "beta_min"),
    (VPSDE, dict(beta_max=float("inf")), "beta_max"),
    (VPSDE, dict(beta_min=5.0, beta_max=1.0), "beta_max must be >= beta_min"),
    (VPSDE, dict(num_steps=10), "beta_max / num_steps"),
    (VPSDE, dict(num_steps=0), "num_steps"),
    (VPSDE, dict(num_steps=100.0), "num_steps"),
    (VPSDE, dict(num_steps=True), "num_steps"),
    (SubVPSDE, dict(beta_min=-0.1), "beta_min"),
    (SubVPSDE, dict(beta_max=0.0), "beta_max"),
    (SubVPSDE, dict(beta_min=5.0, beta_max=1.0), "beta_max must be >= beta_min"),
    (SubVPSDE, dict(num_steps=0), "num_steps"),
    (VESDE, dict(sigma_min=-0.01), "sigma_min"),
    (VESDE, dict(sigma_max=0.0), "sigma_max"),
    (VESDE, dict(sigma_min=1.0, sigma_max=1.0), "sigma_max must be > sigma_min"),
    (VESDE, dict(sigma_min=2.0, sigma_max=1.0), "sigma_max must be > sigma_min"),
    (VESDE, dict(num_steps=-3), "num_steps"),
    (VESDE, dict(num_steps=2.5), "num_steps"),
    (CosineVPSDE, dict(s=0.0), "s must"),
    (CosineVPSDE, dict(s=-0.008), "s must"),
    (CosineVPSDE, dict(max_beta=0.0), "max_beta"),
    (CosineVPSDE, dict(max_beta=1.0), "max_beta"),
    (CosineVPSDE, dict(max_beta=1.5), "max_beta"),
    (CosineVPSDE, dict(max_beta=float("nan")), "max_beta"),
    (CosineVPSDE, dict(num_steps=0), "num_steps"),
]


@pytest.mark.parametrize("cls,kwargs,match", CONSTRUCTOR_ERRORS,
                         ids=[f"{c.__name__}-{k}" for c, k, _ in CONSTRUCTOR_ERRORS])
def test_constructor_rejects_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls,arg", [(VPSDE, "beta_min"), (VESDE, "sigma_max"),
                                     (CosineVPSDE, "s")])
def test_constructor_rejects_non_numbers(cls, arg):
    with pytest.raises(ValueError, match=arg):
        cls(**{arg: None})


# --- 8. gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("name", SDE_NAMES)
def test_gradcheck_mean_and_drift_wrt_x(name, rank):
    sde = make_sde(name)
    x = randn(SHAPES[rank]).requires_grad_()
    t = batch_times(x.shape[0])
    assert torch.autograd.gradcheck(lambda x: sde.marginal_prob(x, t)[0], (x,))
    assert torch.autograd.gradcheck(lambda x: sde.sde(x, t)[0], (x,))


# --- times outside the domain are rejected where they would divide by zero or give NaN -------

@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), CosineVPSDE()],
                         ids=["vp", "subvp", "ve", "cosine"])
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_times_outside_zero_to_T_are_rejected(sde, bad):
    x = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.5, bad], dtype=torch.float64)
    for call in (lambda: sde.marginal_prob(x, t), lambda: sde.sde(x, t),
                 lambda: sde.marginal_coeffs(t)):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            call()
    # The ends themselves are fine (t = 0: alpha = 1, sigma = 0).
    alpha, sigma = sde.marginal_coeffs(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert float(alpha[0]) == 1.0 and float(sigma[0]) == 0.0


def test_score_from_noise_prediction_rejects_t_zero():
    x = torch.ones(3, 2, dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    net = lambda x, t: torch.ones_like(x)  # noqa: E731
    for prediction in ("noise", "x0"):
        f = make_score_fn(net, VESDE(), prediction=prediction, time_input="t")
        with pytest.raises(ValueError, match=r"t must lie in \(0, 1\].*sigma\(0\) = 0"):
            f(x, t0)
        assert torch.isfinite(f(x, t0 + 1e-3)).all()
    # A score-predicting network read at t has no division: t = 0 is allowed.
    f = make_score_fn(net, VPSDE(), prediction="score", time_input="t")
    assert torch.equal(f(x, t0), torch.ones_like(x))


@pytest.mark.parametrize("t, match", [
    (torch.zeros(3, dtype=torch.long), "floating-point tensor, got dtype torch.int64"),
    (0.5, "tensor of shape"),
    (torch.full((2,), 0.5), r"shape \[B\]=\(3,\)"),
])
def test_score_fn_rejects_times_that_are_not_a_float_tensor_per_sample(t, match):
    """Integer step indices would otherwise pass as times (and t = 0 as sigma = 0)."""
    f = make_score_fn(lambda x, t: torch.ones_like(x), VPSDE(), prediction="noise")
    with pytest.raises(ValueError, match=match):
        f(torch.ones(3, 2), t)


def test_denoise_rejects_vanishing_alpha():
    sde = VPSDE(beta_max=1e5, num_steps=10 ** 6)  # alpha(1) = exp(-25000) underflows to 0
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha"):
        sde.denoise(torch.ones(1, 2, dtype=torch.float64), one, torch.zeros(1, 2,
                                                                             dtype=torch.float64))


def test_denoise_rejects_alpha_that_vanishes_only_in_the_data_dtype():
    """alpha(1) = exp(-110.025) is about 1.6e-48: positive in float64, 0 in float32."""
    sde = VPSDE(beta_max=440.0, num_steps=1000)
    one = torch.ones(1, dtype=torch.float32)
    with pytest.raises(ValueError, match="alpha underflows to 0 in torch.float32"):
        sde.denoise(torch.ones(1, 2), one, torch.zeros(1, 2))
    x0 = sde.denoise(torch.ones(1, 2, dtype=F64), one.double(), torch.zeros(1, 2, dtype=F64))
    assert_close(x0, torch.full((1, 2), math.exp(0.25 * (440.0 - 0.1) + 0.05), dtype=F64),
                 rtol=1e-12)
