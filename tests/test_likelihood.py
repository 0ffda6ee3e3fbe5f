"""log_likelihood and bits_per_dim against closed forms (tests/problems.py)."""
import math

import numpy as np
import pytest
import torch

import score_sde
from score_sde import bits_per_dim, log_likelihood
from tests.problems import (KERNELS, GaussianMixture, exact_log_prob_t, exact_score_fn,
                            random_mixture, ring_mixture)

SDES = {"vp": score_sde.VPSDE, "subvp": score_sde.SubVPSDE, "ve": score_sde.VESDE}
EPS = 1e-5
BPD_TOL = 1e-3  # the required accuracy, bits/dim, at rtol = atol = 1e-5
Z_CRIT = 3.29  # two-sided normal quantile for significance level 1e-3


def _bpd_error(name, mixture, x, dtype, divergence="exact", **kwargs):
    """Largest |library - exact| log-density error at eps in bits/dim, with the prior term
    replaced by the exact density of the diffused data at T."""
    sde, kernel = SDES[name](), KERNELS[name]
    logp, z, nfe = log_likelihood(sde, exact_score_fn(mixture, kernel), x.to(dtype),
                                  divergence=divergence, eps=EPS, **kwargs)
    assert logp.dtype == dtype and z.dtype == dtype and z.shape == x.shape
    exact = exact_log_prob_t(mixture, kernel, x.double(), EPS)
    swap = exact_log_prob_t(mixture, kernel, z.double(), sde.T) - sde.prior_logp(z.double())
    d = x[0].numel()
    return ((logp.double() + swap - exact) / (d * math.log(2))).abs().max().item(), nfe


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("dim", [2, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_divergence_matches_closed_form(name, dim, dtype):
    mixture = random_mixture(dim, seed=dim)
    x, _ = mixture.sample(8, torch.Generator().manual_seed(1))
    err, nfe = _bpd_error(name, mixture, x, dtype)
    assert err < BPD_TOL
    assert nfe > 0


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("step_control", ["batch", "per_sample"])
def test_rms_error_norm_meets_the_accuracy_with_fewer_evaluations(name, step_control):
    mixture = random_mixture(256, seed=256)
    x, _ = mixture.sample(8, torch.Generator().manual_seed(1))
    err, nfe_rms = _bpd_error(name, mixture, x, torch.float32, error_norm="rms",
                              step_control=step_control)
    assert err < BPD_TOL
    _, nfe_max = _bpd_error(name, mixture, x, torch.float32, step_control=step_control)
    assert nfe_rms < nfe_max


@pytest.mark.parametrize("name", list(SDES))
def test_exact_divergence_matches_closed_form_3072_dims(name):
    # CIFAR-10 sized: one sample, two components keep the 3072 Jacobian products affordable.
    mixture = random_mixture(3072, num_modes=2, seed=3, scale=0.3, std_range=(0.1, 0.3))
    x, _ = mixture.sample(1, torch.Generator().manual_seed(2))
    err, _ = _bpd_error(name, mixture, x, torch.float32)
    assert err < BPD_TOL


def test_image_shaped_input_matches_flat_input():
    mixture = random_mixture(16, seed=4)
    x, _ = mixture.sample(4, torch.Generator().manual_seed(0))
    err, _ = _bpd_error("vp", mixture, x.reshape(4, 1, 4, 4), torch.float64)
    assert err < BPD_TOL


def test_ve_prior_gap_on_2d_data():
    # VE's prior N(0, sigma_max^2 I) is not the exact p_T of the diffused data; the per-sample
    # gap (a few 1e-3 bits/dim here) is a property of the SDE, predicted in closed form, not
    # solver error.
    mixture, sde, kernel = ring_mixture(), score_sde.VESDE(), KERNELS["ve"]
    x, _ = mixture.sample(64, torch.Generator().manual_seed(5))
    logp, z, _ = log_likelihood(sde, exact_score_fn(mixture, kernel), x, eps=EPS,
                                divergence="exact")
    to_bpd = 1 / (2 * math.log(2))
    measured = (logp - exact_log_prob_t(mixture, kernel, x, EPS)) * to_bpd
    predicted = (sde.prior_logp(z) - exact_log_prob_t(mixture, kernel, z, sde.T)) * to_bpd
    assert measured.abs().max() > 2 * BPD_TOL  # the gap is real ...
    assert (measured - predicted).abs().max() < BPD_TOL  # ... and explained by the prior


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(divergence):
    # 400 copies of 2 points, each copy with its own probe: the mean of the estimates must
    # match the exact-divergence value within its standard error (significance level 1e-3).
    mixture, sde, kernel = random_mixture(8, seed=6), score_sde.VPSDE(), KERNELS["vp"]
    score_fn = exact_score_fn(mixture, kernel)
    points, _ = mixture.sample(2, torch.Generator().manual_seed(7))
    exact, _, _ = log_likelihood(sde, score_fn, points, divergence="exact")
    copies = points.repeat_interleave(400, dim=0)
    est, _, _ = log_likelihood(sde, score_fn, copies, divergence=divergence,
                               generator=torch.Generator().manual_seed(8))
    est = est.reshape(2, 400)
    z = (est.mean(1) - exact) / (est.std(1) / math.sqrt(400))
    assert (z.abs() < Z_CRIT).all(), z
    assert (est.std(1) > 0).all()  # it really is a random estimate


def test_more_probes_reduce_variance():
    mixture, sde, kernel = random_mixture(8, seed=6), score_sde.VPSDE(), KERNELS["vp"]
    score_fn = exact_score_fn(mixture, kernel)
    point, _ = mixture.sample(1, torch.Generator().manual_seed(9))
    copies = point.repeat(300, 1)
    var = []
    for k in (1, 4):
        est, _, _ = log_likelihood(sde, score_fn, copies, divergence="gaussian", num_probes=k,
                                   generator=torch.Generator().manual_seed(10 + k))
        var.append(est.var().item())
    # Variance falls as 1/k; the ratio of two sample variances of 300 draws lies within
    # [0.15, 0.40] around 0.25 with probability > 0.999 (F distribution, 299 and 299 df).
    assert 0.15 < var[1] / var[0] < 0.40


def test_network_called_once_per_function_evaluation(monkeypatch):
    from score_sde import ode

    rhs_calls = []
    original = ode._ODEFunc.__call__

    def counted(self, t, y):
        rhs_calls.append(1)
        return original(self, t, y)

    monkeypatch.setattr(ode._ODEFunc, "__call__", counted)
    mixture, kernel = random_mixture(4, seed=1), KERNELS["vp"]
    inner = exact_score_fn(mixture, kernel)
    score_calls = []

    def score_fn(x, t):
        score_calls.append(1)
        return inner(x, t)

    x, _ = mixture.sample(3, torch.Generator().manual_seed(0))
    _, _, nfe = log_likelihood(score_sde.VPSDE(), score_fn, x, num_probes=3,
                               generator=torch.Generator().manual_seed(0))
    assert len(score_calls) == len(rhs_calls) == nfe


def test_probes_are_drawn_once_per_solve():
    # With probes fixed per solve the integrand is smooth, so the adaptive solver needs about
    # as many steps as with the exact divergence.
    mixture, sde, kernel = random_mixture(8, seed=2), score_sde.VPSDE(), KERNELS["vp"]
    score_fn = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(4, torch.Generator().manual_seed(0))
    _, _, nfe_exact = log_likelihood(sde, score_fn, x, divergence="exact")
    _, _, nfe_hutch = log_likelihood(sde, score_fn, x, generator=torch.Generator().manual_seed(1))
    assert nfe_hutch <= 1.5 * nfe_exact


def test_same_generator_same_result():
    mixture, sde, kernel = random_mixture(8, seed=2), score_sde.SubVPSDE(), KERNELS["subvp"]
    score_fn = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(4, torch.Generator().manual_seed(0))
    a = log_likelihood(sde, score_fn, x, generator=torch.Generator().manual_seed(3))[0]
    b = log_likelihood(sde, score_fn, x, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_basis_probes_give_the_exact_divergence():
    # Probes sqrt(D) e_1, ..., sqrt(D) e_D: the mean of p^T J p over them is exactly tr J, so
    # the estimate equals the exact divergence and so does the log-likelihood.
    mixture, sde, kernel = random_mixture(4, seed=3), score_sde.VPSDE(), KERNELS["vp"]
    score_fn = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(3, torch.Generator().manual_seed(4))
    d = x.shape[1]
    probes = math.sqrt(d) * torch.eye(d, dtype=x.dtype)[:, None, :].expand(d, 3, d)
    exact, _, _ = log_likelihood(sde, score_fn, x, divergence="exact")
    basis, _, _ = log_likelihood(sde, score_fn, x, probes=probes.contiguous())
    assert (basis - exact).abs().max() < 1e-6


def test_given_probes_make_per_sample_results_independent_of_the_batch():
    # With per-sample step control each result is the sample's own solve; with the probes
    # given, a sample's value is the same alone as in a batch.
    mixture, sde, kernel = random_mixture(8, seed=2), score_sde.VPSDE(), KERNELS["vp"]
    score_fn = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(4, torch.Generator().manual_seed(0))
    probes = torch.randn((2,) + tuple(x.shape), generator=torch.Generator().manual_seed(1),
                         dtype=x.dtype)
    batch, _, _ = log_likelihood(sde, score_fn, x, probes=probes, step_control="per_sample")
    for i in range(4):
        alone, _, _ = log_likelihood(sde, score_fn, x[i:i + 1], probes=probes[:, i:i + 1],
                                     step_control="per_sample")
        assert torch.allclose(alone, batch[i:i + 1], rtol=0, atol=1e-12)


def test_per_sample_control_names_a_score_bound_to_the_whole_batch():
    # A score with per-sample data bound in (labels [B]) cannot be called on the subset of
    # samples still integrating: one clear error, and the batch solve works.
    mixture, sde, kernel = random_mixture(8, seed=2), score_sde.VPSDE(), KERNELS["vp"]
    exact = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(4, torch.Generator().manual_seed(0))

    def labelled(y, t):
        if y.shape[0] != 4:
            raise ValueError(f"x has batch size {y.shape[0]} but labels has 4")
        return exact(y, t)

    log_likelihood(sde, labelled, x, divergence="exact")
    with pytest.raises(ValueError, match=(
            r"^step_control='per_sample' calls score_fn on the \d samples still integrating, "
            r"and it failed there \(x has batch size \d but labels has 4\); a score with "
            r"labels or other per-sample data bound in needs step_control='batch'$")):
        log_likelihood(sde, labelled, x, divergence="exact", step_control="per_sample")

    def short_of_memory(y, t):  # memory, not the score, fails: reported as such
        if y.shape[0] != 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return exact(y, t)

    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"^out of memory evaluating the "
                                                          r"likelihood of a batch of 4 on cpu"):
        log_likelihood(sde, short_of_memory, x, divergence="exact", step_control="per_sample")


@pytest.mark.parametrize("probes, divergence, match", [
    (torch.ones(1, 2, 2), "exact", "divergence='exact' uses none"),
    (torch.ones(2, 2), "rademacher", r"probes must be a tensor \[K, 2, 2\]"),
    (torch.ones(1, 3, 2), "rademacher", "got \\(1, 3, 2\\)"),
    (torch.full((1, 2, 2), float("nan")), "gaussian", "non-finite"),
])
def test_bad_probes_raise(probes, divergence, match):
    score_fn = exact_score_fn(ring_mixture(), KERNELS["vp"])
    with pytest.raises(ValueError, match=match):
        log_likelihood(score_sde.VPSDE(), score_fn, torch.zeros(2, 2), probes=probes,
                       divergence=divergence)


def test_bits_per_dim_hand_computed():
    # Uniform data on [-1, 1]^D has density 2^-D, so 8-bit data dequantized uniformly has
    # exactly 8 bits/dim; in [0, 1] (width 1) the density is 1 and the answer is again 8.
    d = 12
    uniform_logp = torch.tensor([-d * math.log(2.0)], dtype=torch.float64)
    assert bits_per_dim(uniform_logp, d).item() == pytest.approx(8.0, abs=1e-12)
    assert bits_per_dim(torch.zeros(1), d, data_width=1.0).item() == pytest.approx(8.0)
    # log p = -2 D ln 2 on [-1, 1]: 2 bits from the density, -1 for the width, +8 levels = 9.
    assert bits_per_dim(torch.tensor(-2 * d * math.log(2.0)), d).item() == pytest.approx(9.0)
    # 5-bit data on [0, 1]: offset log2(32) = 5.
    assert bits_per_dim(torch.tensor(0.0), d, data_width=1.0, num_levels=32).item() == \
        pytest.approx(5.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(divergence="hutchinson"), "divergence"),
    (dict(num_probes=0), "num_probes"),
    (dict(method="rk4"), "method"),
    (dict(rtol=0.0), "rtol"),
    (dict(rtol=1e-15), "rtol must be >= 2.22e-14"),
    (dict(atol=-1.0), "atol"),
    (dict(eps=0.0), "eps"),
    (dict(eps=1.0), "eps"),
])
def test_bad_arguments_raise(kwargs, match):
    score_fn = exact_score_fn(ring_mixture(), KERNELS["vp"])
    with pytest.raises(ValueError, match=match):
        log_likelihood(score_sde.VPSDE(), score_fn, torch.zeros(2, 2), **kwargs)


def test_bad_data_raise():
    sde, score_fn = score_sde.VPSDE(), exact_score_fn(ring_mixture(), KERNELS["vp"])
    with pytest.raises(ValueError, match="x must be"):
        log_likelihood(sde, score_fn, torch.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        log_likelihood(sde, score_fn, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="x must be"):
        log_likelihood(sde, score_fn, torch.zeros(2, 2, dtype=torch.long))
    for empty in ((0, 2), (2, 0)):  # no samples, or samples of no elements
        for control in ("batch", "per_sample"):
            with pytest.raises(ValueError,
                               match=r"x must hold at least one sample .*shape \(%d, %d\)" % empty):
                log_likelihood(sde, score_fn, torch.zeros(empty), step_control=control)


def test_detached_score_raises():
    sde = score_sde.VPSDE()
    with pytest.raises(ValueError, match="differentiable"):
        log_likelihood(sde, lambda x, t: (-x).detach(), torch.zeros(2, 2))
    # Under inference mode the message names it, not the (differentiable) score.
    with torch.inference_mode(), pytest.raises(ValueError, match=r"torch.inference_mode\(\) "
                                                                   r"forbids"):
        log_likelihood(sde, lambda x, t: -x, torch.zeros(2, 2))
    with torch.no_grad():
        assert torch.isfinite(log_likelihood(sde, lambda x, t: -x, torch.zeros(2, 2))[0]).all()


def test_bits_per_dim_bad_arguments():
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(torch.zeros(1), 0)
    with pytest.raises(ValueError, match="data_width"):
        bits_per_dim(torch.zeros(1), 3, data_width=0.0)
    with pytest.raises(ValueError, match="num_levels"):
        bits_per_dim(torch.zeros(1), 3, num_levels=1)


class _ConstantRateOU(score_sde.SDE):
    """A user SDE implementing only the required methods: dx = -b x / 2 dt + sqrt(b) dw."""

    def __init__(self, b=6.0):
        super().__init__(num_steps=100)
        self.b = b

    def sde(self, x, t):
        return -0.5 * self.b * x, torch.full_like(t, math.sqrt(self.b)).to(x.dtype)

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)


def test_user_defined_sde_without_marginals():
    # Gaussian data N(mu, s^2 I) under the OU process: p_t = N(a mu, (a^2 s^2 + 1 - a^2) I) with
    # a = exp(-b t / 2), derived here; the library only sees drift, diffusion and prior.
    sde, mu, s, eps = _ConstantRateOU(), torch.tensor([1.5, -0.5], dtype=torch.float64), 0.4, 1e-5
    assert not sde.has_marginal

    def kernel(t):
        a = torch.exp(-0.5 * sde.b * t)
        return a, 1 - a ** 2

    mixture = GaussianMixture(torch.ones(1, dtype=torch.float64), mu[None],
                              torch.tensor([s], dtype=torch.float64))
    x, _ = mixture.sample(6, torch.Generator().manual_seed(0))
    logp, z, _ = log_likelihood(sde, exact_score_fn(mixture, kernel), x, divergence="exact",
                                eps=eps)
    exact = exact_log_prob_t(mixture, kernel, x, eps)
    swap = exact_log_prob_t(mixture, kernel, z, sde.T) - sde.prior_logp(z)
    assert ((logp + swap - exact) / (2 * math.log(2))).abs().max() < BPD_TOL


@pytest.mark.parametrize("error_norm", ["max", "rms"])
def test_float32_data_are_integrated_in_float64(error_norm):
    # The ODE state and the log-density accumulator are float64 whatever the data's dtype; only
    # the score sees float32. With tolerances far below float32 resolution the float32 and
    # float64 results then differ by the float32 evaluation noise alone: ~1e-7 relative per
    # evaluation of a divergence of order D / sigma^2, measured below 1e-6 bits/dim on a
    # 784-d mixture solved at rtol = atol = 1e-7; here 1e-5 bits/dim allows
    # for the sharper 32-d components (std >= 0.05) and the two runs' own solver errors.
    mixture = random_mixture(32, seed=2, std_range=(0.05, 0.2))
    x, _ = mixture.sample(4, torch.Generator().manual_seed(1))
    x = x.float().double()  # the same values in both dtypes
    sde, score_fn = score_sde.VPSDE(), exact_score_fn(mixture, KERNELS["vp"])
    probes = torch.sign(torch.randn((1,) + tuple(x.shape), generator=torch.Generator()
                                    .manual_seed(2), dtype=torch.float64))
    results = {}
    for dtype in (torch.float32, torch.float64):
        logp, _, _ = log_likelihood(sde, score_fn, x.to(dtype), probes=probes.to(dtype),
                                    rtol=1e-7, atol=1e-7, eps=EPS, error_norm=error_norm)
        assert logp.dtype == dtype
        results[dtype] = bits_per_dim(logp.double(), 32, data_width=1.0, num_levels=1 << 30)
    assert (results[torch.float32] - results[torch.float64]).abs().max() < 1e-5


def test_a_user_sde_whose_prior_holds_float32_tensors():
    # prior_logp gets z in the data's dtype (at least float32), not the solver's float64.
    class Rotated(score_sde.VPSDE):
        rotation = torch.eye(2)  # float32

        def prior_logp(self, z):
            return super().prior_logp(z @ self.rotation)

    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    logp, _, _ = log_likelihood(Rotated(), lambda y, t: -y, x, divergence="exact")
    plain, _, _ = log_likelihood(score_sde.VPSDE(), lambda y, t: -y, x, divergence="exact")
    torch.testing.assert_close(logp, plain)


def test_numpy_numbers_and_bad_generators():
    # np.prod(shape) is an np.int64: the counts and widths take NumPy numbers (not bools).
    logp = torch.tensor([-1000.0])
    expected = bits_per_dim(logp, 784, data_width=2.0)
    assert torch.equal(bits_per_dim(logp, np.prod((1, 28, 28)), data_width=np.float32(2)),
                       expected)
    with pytest.raises(ValueError, match="data_width must be a finite number > 0, got True"):
        bits_per_dim(logp, 784, data_width=True)
    sde, x = score_sde.VPSDE(), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got int"):
        log_likelihood(sde, lambda y, t: -y, x, generator=123)


@pytest.mark.parametrize("divergence", ["rademacher", "exact"])
def test_half_precision_divergence_is_summed_in_float32(divergence):
    """Data N(0, 0.02^2 I) of 3x16x16 under VP: near eps each of the 768 terms of the
    divergence is about 125, their sum about 96000, beyond float16's 65504, which summed in
    float16 stopped the solve. The log-density of float16 data must match float32 data's with
    the same probes, up to the network's float16 rounding."""
    dtype = torch.float16
    std, shape = 0.02, (2, 3, 16, 16)
    sde = score_sde.VPSDE()

    def score_fn(y, t):
        alpha, sigma = sde.marginal_coeffs(t)
        var = (alpha ** 2 * std ** 2 + sigma ** 2).float().reshape(-1, 1, 1, 1)
        return (-y.float() / var).to(y.dtype)

    x = (std * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(dtype)
    probes = None if divergence == "exact" else torch.randint(
        0, 2, (1,) + shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    kw = dict(eps=1e-3, rtol=1e-5, atol=1e-5, divergence=divergence)
    low, _, _ = log_likelihood(sde, score_fn, x, **kw,
                               probes=None if probes is None else probes.to(dtype))
    full, _, _ = log_likelihood(sde, score_fn, x.float(), **kw, probes=probes)
    assert low.dtype == torch.float32
    assert ((low - full).abs() / (768 * math.log(2))).max() < 2e-4


@pytest.mark.parametrize("divergence", ["rademacher", "exact"])
def test_float16_ve_likelihood_with_the_papers_sigma_max_is_the_closed_form(divergence):
    """Data N(0, 0.5^2 I) under VE with sigma_max = 348: g(t)^2 exceeds float16's 65504 from
    t = 0.85 on, in the drift and in the products that flow back through the network for the
    divergence; both must stay out of float16. log p is the Gaussian's, known exactly."""
    s, sigma_min, sigma_max = 0.5, 0.01, 348.0
    sde = score_sde.VESDE(sigma_min=sigma_min, sigma_max=sigma_max)

    def score_fn(y, t):  # exact, in float64; the network's output in y's dtype
        var = s ** 2 + sigma_min ** 2 * ((sigma_max / sigma_min) ** (2 * t.double()) - 1)
        return (-y.double() / var.reshape(-1, 1, 1, 1)).to(y.dtype)

    x = (s * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    x = x.to(torch.float16)
    logp, _, _ = log_likelihood(sde, score_fn, x, eps=1e-5, divergence=divergence,
                                generator=torch.Generator().manual_seed(1))
    exact = (-0.5 * x.double().pow(2).flatten(1).sum(1) / s ** 2
             - 8 * math.log(2 * math.pi * s ** 2))
    assert logp.dtype == torch.float32
    # The network's float16 rounding (relative 5e-4) is the error: the divergence integrates
    # to 16 * ln(sd_T / sd_eps) = 105 nats here, so up to 0.05 nats (measured 0.013).
    assert (logp.double() - exact).abs().max() < 5e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_data_get_a_float32_log_density(dtype):
    """With the score 0 under VE the probability flow stands still (drift -g^2 s / 2 = 0, in
    any precision), so log p at eps is the prior's, log N(x; 0, 50^2 I): below float16's range
    (-65504) for a 3x128x128 image. It comes back in float32 instead of overflowing to -inf
    after the finiteness check."""
    d, sigma_max = 3 * 128 * 128, 50.0
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    logp, z, _ = log_likelihood(score_sde.VESDE(sigma_max=sigma_max), lambda y, t: 0 * y, x,
                                eps=EPS)
    exact = (-0.5 * d * math.log(2 * math.pi * sigma_max ** 2)
             - x.double().pow(2).sum() / (2 * sigma_max ** 2))
    assert exact < -65504 and logp.dtype == torch.float32 and z.dtype == dtype
    assert torch.equal(z, x)
    assert float(logp) == pytest.approx(float(exact), rel=1e-6)


def test_user_sde_contract_breaks_are_named_not_folded_into_the_result():
    # An Ornstein-Uhlenbeck SDE dx = -x dt + sqrt(2) dw: N(0, I) is its stationary law, so
    # with the score -x the model density of x is N(0, I)'s whatever the time.
    from tests.test_sde import OrnsteinUhlenbeck

    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = -0.5 * (x ** 2).sum(1) - math.log(2 * math.pi)

    def ll(sde):
        return log_likelihood(sde, lambda y, t: -y, x, divergence="exact")[0]

    torch.testing.assert_close(ll(OrnsteinUhlenbeck()), exact, rtol=0, atol=1e-6)

    class NoGradDrift(OrnsteinUhlenbeck):  # its divergence, -D per unit time, would drop out
        @torch.no_grad()
        def sde(self, x, t):
            return super().sde(x, t)

    with pytest.raises(ValueError, match=r"NoGradDrift\.sde returns a drift that depends on x "
                                         r"but has no gradient"):
        ll(NoGradDrift())

    class ConstantDrift(OrnsteinUhlenbeck):  # no x in it: no divergence, nothing missing
        def sde(self, x, t):
            return torch.zeros_like(x), super().sde(x, t)[1]

    assert torch.isfinite(ll(ConstantDrift())).all()

    class KeptDim(OrnsteinUhlenbeck):  # Normal.log_prob(z).sum(1, keepdim=True)
        def prior_logp(self, z):
            return super().prior_logp(z)[:, None]

    with pytest.raises(ValueError, match=r"KeptDim\.prior_logp must return one log-density "
                                         r"per sample, shape \[B\] = \(3,\), got \(3, 1\)"):
        ll(KeptDim())
