"""Tests of score_sde/losses.py against closed forms derived here.

Ground truth. Data x ~ N(mu, S^2 I) in R^D (or a Gaussian mixture, tests/problems.py) perturbed
by a kernel x_t = a x + sigma z with a(t), v(t) = sigma(t)^2 from `tests/problems.KERNELS`:

- Minimum of the DSM loss (sigma2 weighting, reduction "sum") at the exact score s of p_t:
  E|sigma s + z|^2 = sigma^2 E|s|^2 + 2 sigma E[s.z] + D. Stein's lemma in z given x gives
  E[s(x_t).z] = sigma E[div s(x_t)], and integrating by parts against p_t,
  E[div s] = E[lap log p_t] = -E|grad log p_t|^2, so E[s.z] = -sigma E|s|^2 and
      E|sigma s + z|^2 = D - sigma^2 E|s|^2.
  For a single Gaussian, s = -(x_t - a mu) / c with c = a^2 S^2 + v, E|s|^2 = D / c and the
  minimum is D a^2 S^2 / c.
- Perturbing the score by delta(x_t): E|sigma (s + delta) + z|^2 - E|sigma s + z|^2 =
  sigma^2 E|delta|^2 + 2 sigma E[delta . (sigma s + z)], and the cross term vanishes because
  E[z | x_t] = -sigma s(x_t) (Tweedie). So the exact score is the minimiser and any delta costs
  exactly sigma^2 E|delta|^2 (lambda E|delta|^2 in general).
- The discrete chains are the same computation: DDPM's x_i = sqrt(abar) x + sqrt(1 - abar) z
  has E[z | x_i] = sqrt(1 - abar) (x_i - sqrt(abar) mu) / (abar S^2 + 1 - abar) and minimum
  abar S^2 / (abar S^2 + 1 - abar) per dimension; SMLD's x_i = x + sigma_i z has score
  -(x_i - mu) / (S^2 + sigma_i^2) and minimum S^2 / (S^2 + sigma_i^2) per dimension.
- Importance sampling: p(t) ~ h(t) = g(t)^2 / v(t) with g^2 from the paper's SDE definitions
  (`G2` below); its CDF comes from scipy.integrate.quad. (For linear SDEs h = d/dt log(v / a^2),
  the log inverse SNR, which the quad values also satisfy.)

Monte-Carlo checks are z-tests at significance level 1e-3 with fixed seeds.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from score_sde.discrete_losses import _discretized_gaussian_log_prob, _gaussian_kl
from score_sde.losses import (REDUCTIONS, WEIGHTINGS, DDPMLoss, HybridLoss, ScoreMatchingLoss,
                              SMLDLoss)
from score_sde.sde import SDE, CosineVPSDE, SubVPSDE, VESDE, VPSDE
from tests.problems import KERNELS, GaussianMixture, exact_score_fn, random_mixture

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
EPS = 1e-5
Z_CRIT = 3.29  # two-sided normal quantile for significance level 1e-3
S = 0.7  # data standard deviation
MU = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=F64)  # data mean, D = 4
D = MU.numel()


def _vp_beta(t):
    return 0.1 + t * (20.0 - 0.1)


def _expm1(t):
    return torch.expm1(t) if isinstance(t, torch.Tensor) else math.expm1(t)


def _vp_big_b(t):
    return 0.1 * t + 0.5 * (20.0 - 0.1) * t ** 2


# g(t)^2 from the paper's definitions (Song et al. 2021, Eqs. 9, 11, 12); works on floats and
# tensors. VE: g^2 = d sigma(t)^2 / dt with sigma(t) = 0.01 * 5000^t.
G2 = {
    "vp": _vp_beta,
    "subvp": lambda t: _vp_beta(t) * -_expm1(-2 * _vp_big_b(t)),
    "ve": lambda t: 2 * math.log(5000.0) * (0.01 * 5000.0 ** t) ** 2,
}


def _v(name, t):
    """Kernel variance v(t) for a float t, from tests/problems.py."""
    return KERNELS[name](torch.tensor(float(t), dtype=F64))[1].item()


def _a(name, t):
    return KERNELS[name](torch.tensor(float(t), dtype=F64))[0].item()


def _h(name, t):
    """g^2 / sigma^2 at a float t, accurate near 0 (v via expm1)."""
    if name == "vp":
        v = -math.expm1(-_vp_big_b(t))
    elif name == "subvp":
        v = math.expm1(-_vp_big_b(t)) ** 2
    else:
        v = 1e-4 * math.expm1(2 * math.log(5000.0) * t)
    return G2[name](t) / v


def _integral_log_t(f, lo, hi):
    """int_lo^hi f(t) dt in u = log t, where f ~ 1/t near 0 becomes smooth."""
    return integrate.quad(lambda u: f(math.exp(u)) * math.exp(u), math.log(lo), math.log(hi),
                          epsabs=0, epsrel=1e-10, limit=200)[0]


def _gaussian():
    """N(MU, S^2 I) as a one-component mixture."""
    return GaussianMixture(torch.ones(1, dtype=F64), MU[None].clone(), torch.tensor([S], dtype=F64))


def _data(n, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (MU + S * torch.randn(n, D, generator=g, dtype=F64)).to(dtype)


def _noise(n, seed, dtype=F64, dim=D):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _z(samples, expected):
    """z statistic of the sample mean of `samples` against `expected`."""
    samples = torch.as_tensor(samples, dtype=F64)
    return ((samples.mean() - expected) / (samples.std() / math.sqrt(samples.numel()))).item()


# --- 1. the minimum of denoising score matching -------------------------------------------------

@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("t0", [0.05, 0.3, 0.8])
def test_dsm_minimum_gaussian(name, t0):
    n, sde = 20000, SDES[name]()
    loss = ScoreMatchingLoss(sde, reduction="sum")
    score = exact_score_fn(_gaussian(), KERNELS[name])
    x, z, t = _data(n, 11), _noise(n, 12), torch.full((n,), t0, dtype=F64)
    a, v = _a(name, t0), _v(name, t0)
    c = a ** 2 * S ** 2 + v
    base = loss.per_sample(score, x, t, z)
    assert abs(_z(base, D * a ** 2 * S ** 2 / c)) < Z_CRIT

    # Scaling the score by 1.1 adds sigma^2 E|0.1 s|^2 = 0.01 v D / c (common noise).
    scaled = loss.per_sample(lambda y, s: 1.1 * score(y, s), x, t, z)
    assert abs(_z(scaled - base, 0.01 * v * D / c)) < Z_CRIT
    # A constant shift delta adds exactly sigma^2 |delta|^2 in expectation.
    delta = torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=F64)
    shifted = loss.per_sample(lambda y, s: score(y, s) + delta, x, t, z)
    assert abs(_z(shifted - base, v * float(delta @ delta))) < Z_CRIT


@pytest.mark.parametrize("name", list(SDES))
def test_dsm_minimum_mixture(name):
    # No closed form for E|s|^2 of a mixture: the Stein identity D - sigma^2 E|s|^2 is checked
    # with E|s|^2 from independent samples of p_t; a state-dependent delta costs sigma^2 |delta|^2.
    n, t0, dim = 20000, 0.2, 3
    mixture, kernel = random_mixture(dim, seed=3), KERNELS[name]
    loss = ScoreMatchingLoss(SDES[name](), reduction="sum")
    score = exact_score_fn(mixture, kernel)
    g = torch.Generator().manual_seed(4)
    x, _ = mixture.sample(n, g)
    z, t = _noise(n, 5, dim=dim), torch.full((n,), t0, dtype=F64)
    a, v = _a(name, t0), _v(name, t0)
    base = loss.per_sample(score, x, t, z)
    x_t_indep, _ = mixture.diffuse(a, v).sample(n, g)
    s2 = (score(x_t_indep, t) ** 2).sum(1)
    diff = base.mean() - (dim - v * s2.mean())
    se = math.sqrt(base.var() / n + v ** 2 * s2.var() / n)
    assert abs(diff.item() / se) < Z_CRIT

    def delta(y):
        return 0.4 * torch.sin(y) + 0.1

    perturbed = loss.per_sample(lambda y, s: score(y, s) + delta(y), x, t, z)
    x_t = a * x + math.sqrt(v) * z
    assert abs(_z(perturbed - base - v * (delta(x_t) ** 2).sum(1), 0.0)) < Z_CRIT


# --- 2. likelihood weighting ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (F64, 1e-9)])
def test_likelihood_weighting_is_g2_over_sigma2(name, dtype, rtol):
    n, sde = 64, SDES[name]()
    t = torch.cat([torch.tensor([1e-3, 1.0], dtype=F64),
                   torch.rand(n - 2, generator=torch.Generator().manual_seed(0), dtype=F64)])
    x, z = _data(n, 1, dtype), _noise(n, 2, dtype)

    def score(y, s):
        return -0.5 * y + torch.sin(y)

    plain = ScoreMatchingLoss(sde).per_sample(score, x, t, z)
    weighted = ScoreMatchingLoss(sde, weighting="likelihood").per_sample(score, x, t, z)
    a, v = KERNELS[name](t)
    expected = G2[name](t) / v * plain.double()
    assert plain.dtype == weighted.dtype == dtype
    torch.testing.assert_close(weighted.double(), expected, rtol=rtol, atol=0)
    # sigma2 weighting is the noise-prediction error |sigma s + z|^2, reduced by the mean.
    x_t = a[:, None] * x.double() + v.sqrt()[:, None] * z.double()
    direct = ((v.sqrt()[:, None] * score(x_t, t) + z.double()) ** 2).mean(1)
    torch.testing.assert_close(plain.double(), direct, rtol=100 * rtol, atol=0)


# --- 3. importance sampling -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SDES))
def test_importance_sampled_times_have_density_g2_over_sigma2(name):
    loss = ScoreMatchingLoss(SDES[name](), weighting="likelihood", importance_sampling=True,
                             eps=EPS)
    t, weight = loss.sample_time(2000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == weight.dtype == F64 and t.shape == weight.shape == (2000,)
    assert (t >= EPS).all() and (t <= 1.0).all()

    h = lambda s: _h(name, s)  # noqa: E731
    total = _integral_log_t(h, EPS, 1.0)

    def cdf(ts):
        return np.array([_integral_log_t(h, EPS, s) for s in np.atleast_1d(ts)]) / total

    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3
    # The weight is 1 / ((T - eps) p(t)) with p = h / total; the table's piecewise-constant
    # density matches p to ~1e-3 relative on a 10k-point log grid.
    expected = total / ((1.0 - EPS) * np.array([h(s) for s in t.tolist()]))
    np.testing.assert_allclose(weight.numpy(), expected, rtol=2e-3)
    # For a linear SDE h = d/dt log(v / a^2): check the quad total against it.
    log_isnr = [math.log(_v(name, s) / _a(name, s) ** 2) for s in (EPS, 1.0)]
    assert total == pytest.approx(log_isnr[1] - log_isnr[0], rel=1e-6)


def test_uniform_times_have_unit_weight():
    loss = ScoreMatchingLoss(VPSDE(), eps=1e-3)
    t, weight = loss.sample_time(4000, generator=torch.Generator().manual_seed(0))
    assert (weight == 1).all()
    assert stats.kstest(t.numpy(), stats.uniform(loc=1e-3, scale=1 - 1e-3).cdf).pvalue > 1e-3


def _linear_score_objective(name, weighting, c):
    """Uniform-t objective 1/(T - eps) int lambda/v E|sigma s + z|^2 dt for the score -c x on
    N(MU, S^2 I), reduction "sum": sigma s + z = -c sigma a x0 + (1 - c v) z, so
    E|.|^2 = c^2 v a^2 (|MU|^2 + D S^2) + D (1 - c v)^2."""
    m2 = float(MU @ MU) + D * S ** 2

    def integrand(t):
        a, v = _a(name, t), _v(name, t)
        factor = _h(name, t) if weighting == "likelihood" else 1.0
        return factor * (c ** 2 * v * a ** 2 * m2 + D * (1 - c * v) ** 2)

    return _integral_log_t(integrand, EPS, 1.0) / (1.0 - EPS)


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("weighting, importance_sampling, dtype",
                         [("sigma2", False, torch.float32), ("likelihood", True, torch.float32),
                          ("likelihood", True, torch.float16)])
def test_call_is_unbiased_for_the_uniform_time_objective(name, weighting, importance_sampling,
                                                         dtype):
    # Uniform t with likelihood weighting is unbiased too but has variance ~ 1/eps; it is
    # checked through per_sample in test_likelihood_weighting_is_g2_over_sigma2. In float16
    # the likelihood weight (about 1 / t, 1e5 at t = 1e-5) exceeds the dtype's range: the loss
    # must still be the float32 one, not inf.
    c, batches, batch = 0.5, 40, 2000
    loss = ScoreMatchingLoss(SDES[name](), weighting=weighting, reduction="sum", eps=EPS,
                             importance_sampling=importance_sampling)
    g = torch.Generator().manual_seed(7)
    values = [loss(lambda y, s: -c * y, _data(batch, 100 + k, dtype), generator=g).item()
              for k in range(batches)]
    assert abs(_z(values, _linear_score_objective(name, weighting, c))) < Z_CRIT


def test_importance_sampling_reduces_variance():
    sde, g = VPSDE(), torch.Generator().manual_seed(0)
    x, per_batch = _data(1, 0).expand(4000, D), {}
    for flag in (False, True):
        loss = ScoreMatchingLoss(sde, weighting="likelihood", importance_sampling=flag)
        t, w = loss.sample_time(4000, generator=g)
        per_batch[flag] = w * loss.per_sample(lambda y, s: -0.5 * y, x, t, _noise(4000, 1))
    assert per_batch[True].std() < 0.1 * per_batch[False].std()


# --- 4. DDPM ----------------------------------------------------------------------------------

def _ddpm_abar():
    """abar_i = prod_{j<=i} (1 - beta_j) with DDPM's betas linspace(1e-4, 0.02, 1000)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)


def test_ddpm_chain_of_vpsde_matches_ddpm():
    torch.testing.assert_close(DDPMLoss(VPSDE()).alphas_cumprod, _ddpm_abar(), rtol=1e-12, atol=0)
    # Behaviour, not the attribute: a noise_fn that inverts x_i with DDPM's abar recovers z.
    abar, x = _ddpm_abar(), _data(256, 0)

    def invert(x_i, i):
        return (x_i - abar[i, None].sqrt() * x) / (1 - abar[i, None]).sqrt()

    assert DDPMLoss(VPSDE())(invert, x, generator=torch.Generator().manual_seed(1)) < 1e-18


def test_ddpm_loss_minimum_is_analytic():
    abar = _ddpm_abar()
    mu = MU.to(torch.float32)

    def posterior_noise(x_i, i):
        ab = abar[i, None].to(x_i.dtype)
        return (1 - ab).sqrt() * (x_i - ab.sqrt() * mu) / (ab * S ** 2 + 1 - ab)

    loss, g = DDPMLoss(VPSDE()), torch.Generator().manual_seed(2)
    values = [loss(posterior_noise, _data(2000, 10 + k, torch.float32), generator=g).item()
              for k in range(40)]
    expected = (abar * S ** 2 / (abar * S ** 2 + 1 - abar)).mean().item()
    assert abs(_z(values, expected)) < Z_CRIT


# --- 5. SMLD ----------------------------------------------------------------------------------

def _smld_sigmas():
    return 0.01 * (50.0 / 0.01) ** torch.linspace(0, 1, 1000, dtype=F64)


def test_smld_noise_levels_match_geometric_sequence():
    x, sigmas = _data(256, 0), _smld_sigmas()

    def invert(x_i, i):  # the conditional score -(x_i - x) / sigma_i^2, exactly
        return -(x_i - x) / sigmas[i, None] ** 2

    assert SMLDLoss(VESDE())(invert, x, generator=torch.Generator().manual_seed(1)) < 1e-18


def test_smld_loss_minimum_is_analytic():
    sigmas = _smld_sigmas()

    def exact_score(x_i, i):
        return -(x_i - MU) / (S ** 2 + sigmas[i, None] ** 2)

    loss, g = SMLDLoss(VESDE()), torch.Generator().manual_seed(3)
    values = [loss(exact_score, _data(2000, 20 + k), generator=g).item() for k in range(40)]
    expected = (S ** 2 / (S ** 2 + sigmas ** 2)).mean().item()
    assert abs(_z(values, expected)) < Z_CRIT


# --- reductions, shapes, dtypes ---------------------------------------------------------------

def _all_per_sample(reduction, x, noise):
    """Per-sample values of every loss on the same inputs."""
    n, t = x.shape[0], torch.linspace(0.1, 0.9, x.shape[0], dtype=F64)
    i = torch.arange(n) * 37 % 1000

    def score(y, s):
        return -0.3 * y + 0.1 * torch.cos(y)

    return [
        ScoreMatchingLoss(VPSDE(), reduction=reduction).per_sample(score, x, t, noise),
        ScoreMatchingLoss(VESDE(), weighting="likelihood", reduction=reduction)
        .per_sample(score, x, t, noise),
        DDPMLoss(VPSDE(), reduction=reduction).per_sample(score, x, i, noise),
        SMLDLoss(VESDE(), reduction=reduction).per_sample(score, x, i, noise),
        HybridLoss(VPSDE(), reduction=reduction)
        .per_sample(lambda y, j: (score(y, j), torch.sigmoid(y)), x, i, noise),
    ]


def test_sum_reduction_is_dim_times_mean():
    x = torch.rand(6, 2, 3, 4, dtype=F64) * 2 - 1
    z = torch.randn(6, 2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    for s, m in zip(_all_per_sample("sum", x, z), _all_per_sample("mean", x, z)):
        torch.testing.assert_close(s, 24 * m, rtol=1e-12, atol=0)


def test_image_shaped_input_matches_flat_input():
    x = torch.rand(5, 1, 2, 3, dtype=F64) * 2 - 1
    z = torch.randn(5, 1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for img, flat in zip(_all_per_sample("mean", x, z),
                         _all_per_sample("mean", x.reshape(5, 6), z.reshape(5, 6))):
        assert img.shape == (5,)
        torch.testing.assert_close(img, flat, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
def test_call_returns_a_scalar_and_passes_t_in_x_dtype(dtype):
    seen = []

    def score(y, s):
        seen.append(s)
        return -y

    for loss in (ScoreMatchingLoss(VPSDE(), eps=EPS),
                 ScoreMatchingLoss(VESDE(), weighting="likelihood", importance_sampling=True,
                                   eps=EPS)):
        out = loss(score, torch.randn(300, 3, dtype=dtype),
                   generator=torch.Generator().manual_seed(0))
        # Half-precision data give a float32 loss (the likelihood weight exceeds float16).
        wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        assert out.shape == () and out.dtype == wide and torch.isfinite(out)
        s = seen[-1]
        assert s.dtype == dtype and s.shape == (300,)
        assert (s.double() >= EPS).all() and (s.double() <= 1).all()
    for loss in (DDPMLoss(VPSDE()), SMLDLoss(VESDE())):
        out = loss(score, torch.randn(8, 3, dtype=dtype), generator=torch.Generator())
        # Summed in at least float32, as above (a float16 sum overflows from 65504 on).
        assert out.dtype == wide and seen[-1].dtype == torch.long and seen[-1].shape == (8,)


def test_same_generator_same_loss():
    x = _data(16, 0, torch.float32)
    loss = ScoreMatchingLoss(SubVPSDE(), weighting="likelihood", importance_sampling=True)
    a = loss(lambda y, s: -y, x, generator=torch.Generator().manual_seed(3))
    b = loss(lambda y, s: -y, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# --- 6. error branches ------------------------------------------------------------------------

class _DriftOnlySDE(SDE):
    """An SDE without closed-form marginals (Ornstein–Uhlenbeck written without them)."""

    def sde(self, x, t):
        return -x, torch.ones_like(t)

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return torch.zeros(z.shape[0], dtype=z.dtype)


@pytest.mark.parametrize("make, match", [
    (lambda: ScoreMatchingLoss(VPSDE(), weighting="uniform"), "weighting.*'sigma2'"),
    (lambda: ScoreMatchingLoss(VPSDE(), reduction="max"), "reduction.*'mean', 'sum'"),
    (lambda: ScoreMatchingLoss(VPSDE(), importance_sampling=True), "weighting='likelihood'"),
    (lambda: ScoreMatchingLoss(VPSDE(), importance_sampling=1), "importance_sampling"),
    (lambda: ScoreMatchingLoss(VPSDE(), eps=0.0), "eps"),
    (lambda: ScoreMatchingLoss(VPSDE(), eps=1.0), "eps"),
    (lambda: ScoreMatchingLoss(_DriftOnlySDE()), "marginal"),
    (lambda: ScoreMatchingLoss("vp"), "sde must be"),
    (lambda: DDPMLoss(VESDE()), "discrete_betas"),
    (lambda: DDPMLoss(SubVPSDE()), "discrete_betas"),
    (lambda: DDPMLoss(VPSDE(), reduction="none"), "reduction"),
    (lambda: SMLDLoss(VPSDE()), "discrete_sigmas"),
    (lambda: SMLDLoss(VESDE(), reduction="none"), "reduction"),
    (lambda: HybridLoss(VESDE()), "discrete_betas"),
    (lambda: HybridLoss(CosineVPSDE(num_steps=1)), "2 steps"),
    (lambda: HybridLoss(VPSDE(num_steps=1, beta_max=0.5)), "chain needs num_steps >= 2"),
    (lambda: HybridLoss(VPSDE(), lambda_vlb=-1.0), "lambda_vlb"),
])
def test_bad_construction_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_calls_raise():
    sm, ddpm, smld = ScoreMatchingLoss(VPSDE()), DDPMLoss(VPSDE()), SMLDLoss(VESDE())
    hybrid = HybridLoss(VPSDE())
    x, t, i, z = torch.zeros(4, 3), torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long), \
        torch.zeros(4, 3)
    good = lambda y, s: -y  # noqa: E731
    for loss in (sm, ddpm, smld, hybrid):
        with pytest.raises(ValueError, match="x must be"):
            loss(good, torch.zeros(4))
        with pytest.raises(ValueError, match="x must be"):
            loss(good, torch.zeros(4, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="must be callable"):
            loss(None, x)
        for empty in ((0, 3), (4, 0), (4, 3, 0)):  # no samples, or samples of no elements
            with pytest.raises(ValueError, match=(
                    r"B >= 1 and at least one element per sample, got dtype torch.float32 and "
                    rf"shape \({', '.join(map(str, empty))}\)")):
                loss(good, torch.zeros(empty))
    for shard in (2, (0, 1, 2), [0], (1, 1), (0, 0)):
        with pytest.raises(ValueError, match=r"shard must be \(rank, world_size\)"):
            sm(good, x, shard=shard)
    for loss in (sm, ddpm, smld):
        with pytest.raises(ValueError, match="shaped like x"):
            loss(lambda y, s: y[:, :2], x)
        with pytest.raises(ValueError, match="shaped like x"):
            loss(lambda y, s: y.sum(), x)
    with pytest.raises(ValueError, match="pair"):
        hybrid(good, x)
    with pytest.raises(ValueError, match="v must return"):
        hybrid(lambda y, s: (y, y[:, :1]), x)
    with pytest.raises(ValueError, match="t must be"):
        sm.per_sample(good, x, t[:3], z)
    with pytest.raises(ValueError, match="t must be"):
        sm.per_sample(good, x, i, z)
    with pytest.raises(ValueError, match="noise must be"):
        sm.per_sample(good, x, t, z[:, :2])
    # sigma(0) = 0: the target z / sigma and the likelihood weight g^2 / sigma^2 divide by it.
    for weighting in WEIGHTINGS:
        with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got 0"):
            ScoreMatchingLoss(VPSDE(), weighting=weighting).per_sample(good, x, 0 * t, z)
    with pytest.raises(ValueError, match="i must be a long"):
        ddpm.per_sample(good, x, t, z)
    with pytest.raises(ValueError, match=r"i must lie in \[0, 999\]"):
        smld.per_sample(good, x, i + 1000, z)
    with pytest.raises(ValueError, match="batch"):
        sm.sample_time(0)


def test_importance_sampling_rejects_degenerate_density():
    class Frozen(VPSDE):  # g = 0 on [eps, T]: nothing to importance-sample
        def sde(self, x, t):
            drift, g = super().sde(x, t)
            return drift, torch.zeros_like(g)

    with pytest.raises(ValueError, match="finite and > 0"):
        ScoreMatchingLoss(Frozen(), weighting="likelihood", importance_sampling=True)


def test_public_tables():
    assert set(WEIGHTINGS) == {"sigma2", "likelihood"}
    assert set(REDUCTIONS) == {"mean", "sum"}


# --- 7. gradients -----------------------------------------------------------------------------

def _linear_model(dim, out_mult=1):
    torch.manual_seed(0)  # parameters only; data noise comes from local generators
    return torch.nn.Linear(dim + 1, out_mult * dim)


@pytest.mark.parametrize("kind", ["sigma2", "likelihood_is", "ddpm", "smld", "hybrid"])
def test_gradients_flow_to_a_linear_model(kind):
    model = _linear_model(3, 2 if kind == "hybrid" else 1)

    def net(y, s):
        return model(torch.cat([y, s.to(y.dtype)[:, None] / 1000], dim=1))

    x = torch.rand(16, 3) * 2 - 1
    g = torch.Generator().manual_seed(0)
    if kind == "sigma2":
        value = ScoreMatchingLoss(VPSDE())(net, x, generator=g)
    elif kind == "likelihood_is":
        value = ScoreMatchingLoss(VESDE(), weighting="likelihood",
                                  importance_sampling=True)(net, x, generator=g)
    elif kind == "ddpm":
        value = DDPMLoss(CosineVPSDE())(net, x, generator=g)
    elif kind == "smld":
        value = SMLDLoss(VESDE())(net, x, generator=g)
    else:
        value = HybridLoss(VPSDE())(lambda y, s: net(y, s).chunk(2, dim=1), x, generator=g)
    value.backward()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# --- hybrid loss (Nichol & Dhariwal 2021) ------------------------------------------------------

def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 50, generator=g, dtype=F64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(_gaussian_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-14)


def test_discretized_gaussian_log_prob_by_hand():
    # Bins of width 2/255 around the 256 levels of [-1, 1]; the edge bins reach infinity.
    half = 1 / 255
    x = torch.tensor([0, 1, 153, 255, 204, 76], dtype=F64) / 127.5 - 1  # 8-bit levels
    # Edge bins, a narrow interior bin, and bins 15 and 17 scales out in both tails.
    mean = torch.tensor([-0.9, -1.0, 0.21, 0.95, 0.3, 0.1], dtype=F64)
    scale = torch.tensor([0.1, 0.01, 0.02, 0.3, 0.02, 0.03], dtype=F64)
    xs, ms, ss = x.numpy(), mean.numpy(), scale.numpy()
    hand = []
    for xv, mv, sv in zip(xs, ms, ss):
        lo, hi = (xv - half - mv) / sv, (xv + half - mv) / sv
        if xv <= -1 + 1e-9:
            hand.append(stats.norm.logcdf(hi))
        elif xv >= 1 - 1e-9:
            hand.append(stats.norm.logsf(lo))
        else:  # in the upper tail use the survival function, which keeps its digits there
            hand.append(math.log(stats.norm.sf(lo) - stats.norm.sf(hi)) if lo > 0
                        else math.log(stats.norm.cdf(hi) - stats.norm.cdf(lo)))
    got = _discretized_gaussian_log_prob(x, mean, scale.log())
    np.testing.assert_allclose(got.numpy(), hand, rtol=1e-10)
    # Probabilities of all 256 levels sum to 1.
    grid = torch.linspace(-1, 1, 256, dtype=F64)
    total = _discretized_gaussian_log_prob(grid, torch.full_like(grid, 0.3),
                                           torch.full_like(grid, math.log(0.2))).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)


def _ddpm_posterior_var():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    return betas, betas * (1 - abar_prev) / (1 - abar)


def test_hybrid_loss_closed_forms():
    # eps_hat = z exactly (inverting x_i with DDPM's abar) makes L_simple = 0 and the model
    # mean equal to the posterior mean, so L_vlb reduces to a variance mismatch:
    # v = 0 (Sigma = beta~) gives KL = 0, v = 1 (Sigma = beta) gives per dimension
    # KL = (log beta - log beta~ - 1 + beta~ / beta) / 2; at i = 0 the model mean is x itself.
    abar, (betas, post_var) = _ddpm_abar(), _ddpm_posterior_var()
    n = 8
    x = torch.round((torch.rand(n, 3, generator=torch.Generator().manual_seed(0),
                                dtype=F64) * 2 - 1) * 127.5) / 127.5
    z = _noise(n, 1, dim=3)
    i = torch.tensor([1, 2, 10, 100, 500, 998, 999, 0])
    loss = HybridLoss(VPSDE(), lambda_vlb=0.001)
    to_units = 0.001 * 1000 / math.log(2)

    def model(v_value, x0):
        def fn(x_i, j):
            eps = (x_i - abar[j, None].sqrt() * x0) / (1 - abar[j, None]).sqrt()
            return eps, torch.full_like(x_i, v_value)
        return fn

    zero = loss.per_sample(model(0.0, x[:-1]), x[:-1], i[:-1], z[:-1])
    assert zero.abs().max() < 1e-9
    one = loss.per_sample(model(1.0, x), x, i, z)
    kl = 0.5 * (betas.log() - post_var.log() - 1 + post_var / betas)[i[:-1]]
    torch.testing.assert_close(one[:-1], to_units * kl, rtol=1e-8, atol=1e-12)
    # i = 0: N(x, Sigma) discretized at x, interior and edge dimensions by hand; Sigma = beta_0
    # for v = 1 and, for v = 0, beta~_1 (beta~_0 = 0 is clipped to it).
    clipped = loss.per_sample(model(0.0, x[-1:]), x[-1:], i[-1:], z[-1:])
    for value, var in ((one[-1], betas[0].item()), (clipped[0], post_var[1].item())):
        r = (1 / 255) / math.sqrt(var)
        nll = [-(stats.norm.logcdf(r) if abs(abs(xv) - 1) < 1e-12
                 else math.log(stats.norm.cdf(r) - stats.norm.cdf(-r))) for xv in x[-1].tolist()]
        assert value.item() == pytest.approx(to_units * np.mean(nll), rel=1e-9)


def test_hybrid_vlb_does_not_train_the_mean():
    # Eq. 16: stop-gradient on mu in L_vlb, so eps_hat's gradient comes from L_simple alone.
    x = torch.round((torch.rand(32, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1)
                    * 127.5) / 127.5
    grads = {}
    for lam in (0.0, 1.0):
        eps_head, v_head = _linear_model(3), _linear_model(3)
        loss = HybridLoss(VPSDE(), lambda_vlb=lam)
        value = loss(lambda y, s: (eps_head(torch.cat([y, s[:, None] / 1000.0], 1)),
                                   torch.sigmoid(v_head(torch.cat([y, s[:, None] / 1000.0], 1)))),
                     x, generator=torch.Generator().manual_seed(1))
        value.backward()
        grads[lam] = (eps_head.weight.grad, v_head.weight.grad)
    torch.testing.assert_close(grads[0.0][0], grads[1.0][0])
    assert grads[0.0][1].abs().sum() == 0 and grads[1.0][1].abs().sum() > 0


def test_likelihood_weighting_checks_the_user_sdes_diffusion():
    # g(t) is read from sde.sde at a zero standing in for x: a diffusion shaped like x (not
    # the contract's [B]) would broadcast the weight to [B, B] and average it silently; a
    # drift written for the data's shape works without importance sampling, and its table
    # (built before any data) names the problem.
    class OU(SDE):
        def sde(self, x, t):
            return -x, torch.full(t.shape, math.sqrt(2.0), dtype=x.dtype, device=x.device)

        def marginal_coeffs(self, t):
            return torch.exp(-t), torch.sqrt(-torch.expm1(-2 * t))

        def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
            return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

        def prior_logp(self, z):
            return -0.5 * (z ** 2).flatten(1).sum(1) - 0.5 * z[0].numel() * math.log(2 * math.pi)

    class XShapedG(OU):
        def sde(self, x, t):
            return -x, torch.full_like(x, math.sqrt(2.0))

    class MatrixDrift(OU):
        def sde(self, x, t):
            return -x @ torch.eye(4, dtype=x.dtype).T, super().sde(x, t)[1]

    x = _data(8, 0, torch.float32)
    score = lambda y, s: -y  # noqa: E731
    with pytest.raises(ValueError, match=r"XShapedG\.sde must return \(drift shaped like x "
                                         r"\(8, 4\), diffusion of shape \[B\] = \(8,\)\)"):
        ScoreMatchingLoss(XShapedG(), weighting="likelihood", eps=EPS)(score, x)
    loss = ScoreMatchingLoss(MatrixDrift(), weighting="likelihood", eps=EPS)
    same = ScoreMatchingLoss(OU(), weighting="likelihood", eps=EPS)
    assert loss(score, x, generator=torch.Generator().manual_seed(0)) == \
        same(score, x, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"importance sampling tabulates g\(t\) with "
                                         r"MatrixDrift\.sde on a \[n, 1\] stand-in for x"):
        ScoreMatchingLoss(MatrixDrift(), weighting="likelihood", importance_sampling=True)


@pytest.mark.parametrize("loss_cls", [DDPMLoss, SMLDLoss, HybridLoss])
def test_discrete_losses_of_float16_images_are_summed_in_float32(loss_cls):
    """A 3x256x256 float16 image with a zero network output: with "sum" each sample's loss is
    the sum of 196608 squared noise draws (about 196608), beyond float16's 65504. It must
    equal the float32 image's loss with the same draws, not inf; HybridLoss also evaluates
    its decoder's log_ndtr, which the CPU has only from float32 on."""
    sde = VESDE() if loss_cls is SMLDLoss else VPSDE()
    x = torch.zeros(2, 3, 256, 256)

    def zero(y, i):
        out = torch.zeros_like(y)
        return (out, out) if loss_cls is HybridLoss else out

    losses = [loss_cls(sde, reduction="sum")(zero, x.to(dtype),
                                             generator=torch.Generator().manual_seed(0))
              for dtype in (torch.float16, torch.float32)]
    assert losses[0].dtype == torch.float32 and torch.isfinite(losses[0])
    # The same noise; the float16 image differs only by rounding x_i for the network.
    assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-3)
    assert float(losses[1]) > 65504
