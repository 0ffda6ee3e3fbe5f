"""Probability-flow ODE solves: latent maps, time bounds, stiffness and failure reporting."""
import math

import pytest
import torch

import score_sde
from score_sde import (SubVPSDE, data_to_latent, latent_to_data, log_likelihood, sample_ode,
                       sample_pc)
from tests.problems import (KERNELS, GaussianMixture, exact_log_prob_t, exact_score_fn,
                            ring_mixture, ve_kernel)

SDES = {"vp": score_sde.VPSDE, "subvp": score_sde.SubVPSDE, "ve": score_sde.VESDE}


def _gaussian(mean, std):
    mean = torch.as_tensor(mean, dtype=torch.float64)
    return GaussianMixture(torch.ones(1, dtype=torch.float64), mean[None],
                           torch.tensor([std], dtype=torch.float64))


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("shape", [(6, 2), (3, 1, 2, 2)])
def test_latent_map_of_gaussian_data_is_the_closed_form_affine_map(name, shape):
    # For data N(mu, s^2 I) the probability-flow ODE maps x_eps to
    # x_T = a_T mu + (sd_T / sd_eps) (x_eps - a_eps mu), sd_t^2 = a_t^2 s^2 + v_t.
    dim = math.prod(shape[1:])
    mu, s, eps = torch.linspace(-1, 2, dim, dtype=torch.float64), 0.7, 1e-5
    kernel = KERNELS[name]
    score_fn = exact_score_fn(_gaussian(mu, s), kernel)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z, nfe = data_to_latent(SDES[name](), score_fn, x, eps=eps)
    (a0, v0), (a1, v1) = (kernel(torch.tensor(t, dtype=torch.float64)) for t in (eps, 1.0))
    sd0, sd1 = torch.sqrt(a0 ** 2 * s ** 2 + v0), torch.sqrt(a1 ** 2 * s ** 2 + v1)
    m = mu.reshape(shape[1:])
    expected = a1 * m + (sd1 / sd0) * (x - a0 * m)
    assert z.shape == x.shape and nfe > 0
    assert torch.allclose(z, expected, rtol=1e-4, atol=1e-4 * float(sd1))


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ode_samples_and_latents_follow_the_closed_form(name, dtype):
    # Data N(1, 0.5^2 I); VE with the paper's sigma_max = 348, where g(T)^2 = 2.5e6 overflows
    # float16 (65504) if the drift is formed in the samples' dtype. The score, exact in float64,
    # sees the half-precision input as a network would.
    sigma_max, s, eps = 348.0, 0.5, 1e-5
    kernel = KERNELS["vp"] if name == "vp" else (lambda t: ve_kernel(t, sigma_max=sigma_max))
    sde = score_sde.VPSDE() if name == "vp" else score_sde.VESDE(sigma_max=sigma_max)
    exact = exact_score_fn(_gaussian([1.0, 1.0], s), kernel)
    seen = set()

    def score_fn(x, t):
        seen.add(x.dtype)
        return exact(x.double(), t).to(x.dtype)

    tol = 1e-3 if dtype == torch.bfloat16 else 1e-5  # bfloat16 scores: 3 digits
    n = 1000
    x, _ = sample_ode(sde, score_fn, (n, 2), eps=eps, dtype=dtype, rtol=tol, atol=tol,
                      generator=torch.Generator().manual_seed(0))
    assert x.dtype == dtype and seen == {dtype}
    x = x.double()
    # 5 standard errors of 2n values, plus the rounding of the output to dtype.
    assert abs(float(x.mean()) - 1.0) < 5 * s / math.sqrt(2 * n) + 0.01
    assert abs(float(x.var()) - s ** 2) < 5 * s ** 2 * math.sqrt(2 / (2 * n)) + 0.01
    if dtype == torch.bfloat16:
        return  # a latent 700 sigma_min out, from 3-digit scores: a few percent off
    # The latent of data points: the affine map of the Gaussian case (see the test above).
    data = torch.tensor([[0.0, 0.5], [1.0, 2.0]], dtype=dtype)
    z, _ = data_to_latent(sde, score_fn, data, eps=eps, rtol=tol, atol=tol)
    (a0, v0), (a1, v1) = (kernel(torch.tensor(t, dtype=torch.float64)) for t in (eps, 1.0))
    sd0, sd1 = torch.sqrt(a0 ** 2 * s ** 2 + v0), torch.sqrt(a1 ** 2 * s ** 2 + v1)
    expected = a1 + (sd1 / sd0) * (data.double() - a0)
    assert z.dtype == dtype
    assert torch.allclose(z.double(), expected, rtol=5e-3, atol=5e-3 * float(sd1))


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_data_latent_data(name, dtype):
    mixture = ring_mixture()
    score_fn = exact_score_fn(mixture, KERNELS[name])
    x, _ = mixture.sample(32, torch.Generator().manual_seed(1), dtype=dtype)
    z, _ = data_to_latent(SDES[name](), score_fn, x)
    back, _ = latent_to_data(SDES[name](), score_fn, z)
    assert z.dtype == back.dtype == dtype
    # tolerance 1e-5 per step; the map is well conditioned at these modes (std 0.25).
    assert (back - x).abs().max() < 1e-3


@pytest.mark.parametrize("name", list(SDES))
def test_round_trip_with_the_rms_error_norm(name):
    # A looser norm, the same maps: the round trip still closes within the tolerance's reach.
    mixture = ring_mixture()
    score_fn = exact_score_fn(mixture, KERNELS[name])
    x, _ = mixture.sample(32, torch.Generator().manual_seed(1), dtype=torch.float64)
    z, nfe_rms = data_to_latent(SDES[name](), score_fn, x, error_norm="rms")
    back, _ = latent_to_data(SDES[name](), score_fn, z, error_norm="rms")
    assert (back - x).abs().max() < 1e-3
    _, nfe_max = data_to_latent(SDES[name](), score_fn, x)
    assert nfe_rms <= nfe_max


def test_per_sample_rms_by_hand():
    from score_sde.ode import per_sample_rms

    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # with delta: sample 0 has 3, 4, 0 -> sqrt(25/3)
    delta = torch.tensor([0.0, 6.0])  # sample 1: 0, 0, 6 -> sqrt(36/3)
    torch.testing.assert_close(per_sample_rms((x, delta)),
                               torch.tensor([math.sqrt(25 / 3), math.sqrt(12.0)]))
    torch.testing.assert_close(per_sample_rms(x), torch.tensor([math.sqrt(12.5), 0.0]))


class _TimeRecorder:
    def __init__(self, score_fn):
        self.score_fn, self.times = score_fn, []

    def __call__(self, x, t):
        self.times.append(t.detach().double())
        return self.score_fn(x, t)

    def bounds(self):
        t = torch.cat(self.times)
        return t.min().item(), t.max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", ["sample_ode", "data_to_latent", "latent_to_data",
                                   "log_likelihood", "sample_pc"])
def test_score_never_evaluated_outside_eps_T(entry, dtype):
    # eps = 1e-5 is not representable in float32 (it rounds down); sharp modes make the
    # first-step probe large and adaptive stages reach the interval's ends.
    mixture, sde, eps = ring_mixture(std=0.01), score_sde.VPSDE(), 1e-5
    rec = _TimeRecorder(exact_score_fn(mixture, KERNELS["vp"]))
    x, _ = mixture.sample(8, torch.Generator().manual_seed(0), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    if entry == "sample_ode":
        sample_ode(sde, rec, (8, 2), eps=eps, dtype=dtype, generator=gen)
    elif entry == "data_to_latent":
        data_to_latent(sde, rec, x, eps=eps)
    elif entry == "latent_to_data":
        latent_to_data(sde, rec, torch.randn(8, 2, generator=gen, dtype=dtype), eps=eps)
    elif entry == "log_likelihood":
        log_likelihood(sde, rec, x, eps=eps, generator=gen)
    else:
        sample_pc(sde, rec, (8, 2), predictor="euler_maruyama", num_steps=40, eps=eps,
                  dtype=dtype, generator=gen)
    lo, hi = rec.bounds()
    assert eps <= lo and hi <= sde.T
    assert all(t.dtype == torch.float64 for t in rec.times)  # recorder widened them itself


@pytest.mark.parametrize("name", list(SDES))
def test_stiff_float32_target_is_solved_accurately(name):
    # Modes of std 1e-3 on a circle of radius 4: the drift's Jacobian near eps is ~1e5-1e6.
    mixture, sde, kernel = ring_mixture(std=1e-3), SDES[name](), KERNELS[name]
    score_fn = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(16, torch.Generator().manual_seed(0), dtype=torch.float32)
    logp, z, _ = log_likelihood(sde, score_fn, x, divergence="exact", rtol=1e-5, atol=1e-5)
    exact = exact_log_prob_t(mixture, kernel, x.double(), 1e-5)
    swap = exact_log_prob_t(mixture, kernel, z.double(), 1.0) - sde.prior_logp(z.double())
    assert ((logp.double() + swap - exact) / (2 * math.log(2))).abs().max() < 1e-3
    eps = 1e-5 if name == "ve" else 1e-3
    samples, _ = sample_ode(sde, score_fn, (256, 2), eps=eps,
                            generator=torch.Generator().manual_seed(1))
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
    nearest = ((samples.double()[:, None] - mixture.means[None]) ** 2).sum(-1).min(1).values
    # Denoised samples sit on the modes: the exact diffused std at eps is below 0.02 for all
    # three SDEs; 0.1 leaves a margin while any sample off its mode fails.
    assert nearest.sqrt().max() < 0.1


def test_unmeetable_tolerance_names_the_time_reached(monkeypatch):
    from score_sde import ode

    monkeypatch.setattr(ode, "MAX_SOLVER_STEPS", 3)
    score_fn = exact_score_fn(ring_mixture(std=0.01), KERNELS["vp"])
    with pytest.raises(RuntimeError, match=r"stopped at t=.*loosen rtol/atol"):
        sample_ode(score_sde.VPSDE(), score_fn, (4, 2), generator=torch.Generator().manual_seed(0))


def test_score_non_finite_below_some_time_is_reported():
    inner = exact_score_fn(ring_mixture(), KERNELS["vp"])

    def score_fn(x, t):
        s = inner(x, t)
        return torch.where((t < 0.5)[:, None], torch.full_like(s, float("nan")), s)

    with pytest.raises(RuntimeError, match=r"stopped at t=0\.[5-9]"):
        sample_ode(score_sde.VPSDE(), score_fn, (4, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="stopped at t="):
        log_likelihood(score_sde.VPSDE(), score_fn, torch.zeros(2, 2))


@pytest.mark.parametrize("call", [sample_ode, data_to_latent, latent_to_data])
@pytest.mark.parametrize("kwargs, match", [
    (dict(method="euler"), "method"), (dict(rtol=0), "rtol"), (dict(atol=float("nan")), "atol"),
    (dict(eps=-1e-3), "eps"), (dict(eps=2.0), "eps"),
    (dict(error_norm="l2"), "unknown error_norm 'l2'; accepted: 'max', 'rms'"),
    # Below float64's reach the solve would shrink its steps until MAX_SOLVER_STEPS (minutes).
    (dict(rtol=1e-20, atol=1e-20), r"rtol must be >= 2.22e-14 \(100 float64 epsilons"),
    (dict(rtol=2e-14), r"rtol must be >= 2.22e-14"),
])
def test_bad_solver_arguments_raise(call, kwargs, match):
    sde, score_fn = score_sde.VPSDE(), (lambda x, t: -x)
    arg = (4, 2) if call is sample_ode else torch.zeros(4, 2)
    with pytest.raises(ValueError, match=match):
        call(sde, score_fn, arg, **kwargs)


def test_bad_latent_inputs_raise():
    sde, score_fn = score_sde.VPSDE(), (lambda x, t: -x)
    with pytest.raises(ValueError, match="x must be"):
        data_to_latent(sde, score_fn, torch.zeros(3))
    with pytest.raises(ValueError, match="z contains non-finite"):
        latent_to_data(sde, score_fn, torch.full((2, 2), float("inf")))
    with pytest.raises(ValueError, match=r"x must hold at least one sample .*got shape \(0, 2\)"):
        data_to_latent(sde, score_fn, torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"z must hold at least one sample .*got shape \(2, 0\)"):
        latent_to_data(sde, score_fn, torch.zeros(2, 0))
    with pytest.raises(ValueError, match="sde must be"):
        data_to_latent("vp", score_fn, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="score_fn must be callable"):
        data_to_latent(sde, None, torch.zeros(2, 2))


def test_drift_is_never_evaluated_outside_the_interval():
    # torchdiffeq's first-step heuristic probes a trial time that can lie outside [eps, T];
    # the solver's right-hand side is evaluated at the nearest time inside instead.
    seen = []

    class Recording(SubVPSDE):
        def sde(self, x, t):
            seen.append(t.detach().clone())
            return super().sde(x, t)

    sde = Recording()
    score = lambda x, t: -x  # noqa: E731
    x, _ = sample_ode(sde, score, (4, 3), eps=1e-3, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    times = torch.cat(seen)
    assert float(times.min()) >= 1e-3 and float(times.max()) <= 1.0
    assert torch.isfinite(x).all()
