"""Property-based tests (hypothesis) of the public SDE, prior and ODE API.

Hypothesis draws schedule parameters, times, batch sizes, data ranks and dtypes; every expected
value is derived here from the papers' definitions (Song et al. 2021, Eqs. 9, 11, 12; Nichol &
Dhariwal 2021, Eq. 17), from torch.distributions or from `tests/problems.py`, never from the
library's own output. Examples are derandomized so CI runs are reproducible.
"""
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from score_sde import (CosineVPSDE, SubVPSDE, VESDE, VPSDE, data_to_latent, latent_to_data,
                       sample_ode, sample_pc)
from tests.problems import KERNELS, exact_score_fn, random_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SDE_NAMES = ["vp", "subvp", "ve", "cosine"]
COS_S = 0.008  # CosineVPSDE defaults (s, max_beta, num_steps)
COS_MAX_BETA, COS_NUM_STEPS = 0.999, 1000
# Below this time the cosine beta(t) stays under its clip -N log(1 - max_beta) ~ 6908 (beta(0.999)
# ~ 2000), so the unclipped closed form applies.
COS_UNCLIPPED_T = 0.999

# Tolerances, one table: results in their dtype against float64 references.
RTOL = {F64: 1e-9, torch.float32: 2e-6}
ATOL = {F64: 1e-12, torch.float32: 1e-6}
ROUND_TRIP_TOL = 1e-3  # data -> latent -> data at solver rtol = atol = 1e-5
LOGP_RTOL = {F64: 1e-12, torch.float32: 1e-5}

CHEAP = settings(max_examples=20, deadline=None, derandomize=True, database=None)
SOLVES = settings(max_examples=10, deadline=None, derandomize=True, database=None)

dtypes = st.sampled_from([torch.float32, F64])
# Per-sample data shapes of rank 1 to 4 (x has rank 2 to 5 with the batch).
data_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=4).map(tuple)
batch_sizes = st.integers(1, 5)
seeds = st.integers(0, 2 ** 31 - 1)


@st.composite
def sde_params(draw, name):
    """Constructor arguments of SDE `name` in the ranges under test."""
    if name in ("vp", "subvp"):
        beta_min = draw(st.floats(0.01, 1.0))
        return dict(beta_min=beta_min, beta_max=draw(st.floats(beta_min + 1.0, 30.0)))
    if name == "ve":
        return dict(sigma_min=draw(st.floats(1e-3, 0.1)), sigma_max=draw(st.floats(1.0, 100.0)))
    return {}


def make_sde(name, params):
    cls = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine": CosineVPSDE}[name]
    return cls(**params)


def draw_times(data, batch, dtype):
    ts = data.draw(st.lists(st.floats(1e-5, 1.0), min_size=batch, max_size=batch), label="t")
    return torch.tensor(ts, dtype=dtype)


def per_sample(v, ndim):
    """[B] -> [B, 1, ..., 1] of rank ndim, written here independently of the library."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


# --- closed forms from the papers, written independently of the library ----------------------

def big_b(t, p):
    """B(t) = int_0^t beta for beta(t) = beta_min + t (beta_max - beta_min) (Eq. 11)."""
    return p["beta_min"] * t + 0.5 * (p["beta_max"] - p["beta_min"]) * t ** 2


def cosine_u(t):
    return (t + COS_S) / (1 + COS_S) * (math.pi / 2)


def closed_form(name, p, t):
    """(alpha, sigma, beta-or-None, diffusion) at float64 times t, from each SDE's definition.

    For the cosine SDE alpha, beta and diffusion are only valid below COS_UNCLIPPED_T.
    """
    if name in ("vp", "subvp"):
        b = big_b(t, p)
        alpha = torch.exp(-0.5 * b)
        beta = p["beta_min"] + t * (p["beta_max"] - p["beta_min"])
        if name == "vp":  # dv/dt = -beta v + beta, v(0) = 0 -> v = 1 - e^{-B}
            return alpha, torch.sqrt(-torch.expm1(-b)), beta, torch.sqrt(beta)
        # dv/dt = -beta v + beta (1 - e^{-2B}), v(0) = 0 -> v = (1 - e^{-B})^2
        return alpha, -torch.expm1(-b), beta, torch.sqrt(beta * -torch.expm1(-2 * b))
    if name == "ve":  # v = sigma(t)^2 - sigma(0)^2 with sigma(t) = s_min (s_max / s_min)^t
        s_min, s_max = p["sigma_min"], p["sigma_max"]
        sigma_t = s_min * (s_max / s_min) ** t
        diffusion = sigma_t * math.sqrt(2 * math.log(s_max / s_min))
        return torch.ones_like(t), torch.sqrt(sigma_t ** 2 - s_min ** 2), None, diffusion
    # Cosine: alpha(t)^2 = f(t) / f(0), f = cos^2(u(t)); beta = -d log alpha^2 / dt.
    alpha = torch.cos(cosine_u(t)) / math.cos(cosine_u(0.0))
    beta = math.pi / (1 + COS_S) * torch.tan(cosine_u(t))
    return alpha, torch.sqrt(1 - alpha ** 2), beta, torch.sqrt(beta)


def assert_close(actual, expected, dtype, mask=None):
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=RTOL[dtype],
                               atol=ATOL[dtype])


# --- 1. marginals and SDE coefficients ---------------------------------------------------------

@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(data=st.data(), batch=batch_sizes, t_dtype=dtypes)
def test_marginal_coeffs_match_closed_form(name, data, batch, t_dtype):
    params = data.draw(sde_params(name), label="params")
    sde = make_sde(name, params)
    t = draw_times(data, batch, t_dtype)

    alpha, sigma = sde.marginal_coeffs(t)

    assert alpha.shape == sigma.shape == (batch,)
    assert alpha.dtype == sigma.dtype == t_dtype
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    assert (alpha > 0).all() and (alpha <= 1).all() and (sigma > 0).all()
    # References at the times actually passed (t rounded to its dtype).
    alpha_ref, sigma_ref, _, _ = closed_form(name, params, t.to(F64))
    unclipped = t.to(F64) <= COS_UNCLIPPED_T if name == "cosine" else None
    assert_close(alpha, alpha_ref, t_dtype, unclipped)
    assert_close(sigma, sigma_ref, t_dtype, unclipped)
    a64, s64 = alpha.to(F64), sigma.to(F64)
    if name in ("vp", "cosine"):  # variance preserving at every t, clipped or not
        assert_close(a64 ** 2 + s64 ** 2, torch.ones_like(a64), t_dtype)
    elif name == "subvp":
        assert_close(s64, 1 - a64 ** 2, t_dtype)
        assert (s64 <= 1 - a64 ** 2 + ATOL[t_dtype]).all()
    else:
        assert (alpha == 1).all()


@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(data=st.data(), batch=batch_sizes, shape=data_shapes, t_dtype=dtypes, x_dtype=dtypes,
       seed=seeds)
def test_marginal_prob_broadcasts_over_data_rank(name, data, batch, shape, t_dtype, x_dtype,
                                                 seed):
    params = data.draw(sde_params(name), label="params")
    sde = make_sde(name, params)
    t = draw_times(data, batch, t_dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + shape, generator=g, dtype=x_dtype)

    mean, std = sde.marginal_prob(x, t)

    assert mean.shape == x.shape and std.shape == (batch,)
    assert mean.dtype == std.dtype == x_dtype
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()
    alpha_ref, sigma_ref, _, _ = closed_form(name, params, t.to(F64))
    # Past the cosine clip only the VP identity is checked (in the coefficients test).
    keep = t.to(F64) <= COS_UNCLIPPED_T if name == "cosine" else torch.ones(batch, dtype=bool)
    assert_close(mean[keep], (per_sample(alpha_ref, x.ndim) * x.to(F64))[keep], x_dtype)
    assert_close(std, sigma_ref, x_dtype, keep)


@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(data=st.data(), batch=batch_sizes, shape=data_shapes, dtype=dtypes, seed=seeds)
def test_sde_coefficients_match_closed_form(name, data, batch, shape, dtype, seed):
    params = data.draw(sde_params(name), label="params")
    sde = make_sde(name, params)
    t = draw_times(data, batch, dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + shape, generator=g, dtype=dtype)

    drift, diffusion = sde.sde(x, t)

    assert drift.shape == x.shape and diffusion.shape == (batch,)
    assert drift.dtype == diffusion.dtype == dtype
    assert torch.isfinite(drift).all() and torch.isfinite(diffusion).all()
    assert (diffusion >= 0).all()
    _, _, beta, diffusion_ref = closed_form(name, params, t.to(F64))
    drift_ref = (torch.zeros_like(x, dtype=F64) if beta is None
                 else -0.5 * per_sample(beta, x.ndim) * x.to(F64))
    if name == "cosine":
        keep = t.to(F64) <= COS_UNCLIPPED_T
        assert_close(diffusion, diffusion_ref, dtype, keep)
        assert_close(drift[keep], drift_ref[keep], dtype)
    else:
        assert_close(diffusion, diffusion_ref, dtype)
        assert_close(drift, drift_ref, dtype)


# --- 2. prior log-density and samples ----------------------------------------------------------

@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(data=st.data(), batch=batch_sizes, shape=data_shapes, dtype=dtypes, seed=seeds,
       scale=st.floats(0.1, 3.0))
def test_prior_logp_matches_torch_distributions(name, data, batch, shape, dtype, seed, scale):
    params = data.draw(sde_params(name), label="params")
    sde = make_sde(name, params)
    prior_std = params["sigma_max"] if name == "ve" else 1.0
    g = torch.Generator().manual_seed(seed)
    z = (scale * prior_std * torch.randn((batch,) + shape, generator=g, dtype=F64)).to(dtype)

    logp = sde.prior_logp(z)

    assert logp.shape == (batch,) and logp.dtype == dtype
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64),
                                        torch.tensor(prior_std, dtype=F64))
    expected = normal.log_prob(z.to(F64)).reshape(batch, -1).sum(dim=1)
    torch.testing.assert_close(logp.to(F64), expected, rtol=LOGP_RTOL[dtype], atol=0.0)


@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(data=st.data(), batch=batch_sizes, shape=data_shapes, dtype=dtypes, seed=seeds)
def test_prior_sampling_shape_dtype_and_generator(name, data, batch, shape, dtype, seed):
    sde = make_sde(name, data.draw(sde_params(name), label="params"))
    full = (batch,) + shape

    z1 = sde.prior_sampling(full, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    z2 = sde.prior_sampling(list(full), generator=torch.Generator().manual_seed(seed),
                            dtype=dtype)

    assert z1.shape == full and z1.dtype == dtype
    assert torch.isfinite(z1).all()
    assert torch.equal(z1, z2)


# --- 3. probability-flow ODE round trip --------------------------------------------------------

@SOLVES
@given(dim=st.integers(1, 4), num_modes=st.integers(1, 4), batch=st.integers(1, 16),
       seed=seeds, beta_min=st.floats(0.05, 0.5), beta_max=st.floats(5.0, 20.0))
def test_ode_round_trip_recovers_data(dim, num_modes, batch, seed, beta_min, beta_max):
    mixture = random_mixture(dim, num_modes=num_modes, seed=seed % 10_000)
    kernel = functools.partial(KERNELS["vp"], beta_min=beta_min, beta_max=beta_max)
    score_fn = exact_score_fn(mixture, kernel)
    sde = VPSDE(beta_min=beta_min, beta_max=beta_max)
    x, _ = mixture.sample(batch, torch.Generator().manual_seed(seed))

    z, nfe_forward = data_to_latent(sde, score_fn, x, rtol=1e-5, atol=1e-5)
    x_back, nfe_backward = latent_to_data(sde, score_fn, z, rtol=1e-5, atol=1e-5)

    assert z.shape == x_back.shape == x.shape and z.dtype == x_back.dtype == F64
    assert torch.isfinite(z).all() and nfe_forward > 0 and nfe_backward > 0
    torch.testing.assert_close(x_back, x, rtol=ROUND_TRIP_TOL, atol=ROUND_TRIP_TOL)


# --- 4. invalid arguments raise ValueError naming the argument ---------------------------------

SDE_CLASSES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine": CosineVPSDE}
POSITIVE_ARGS = [("vp", "beta_min"), ("vp", "beta_max"), ("subvp", "beta_min"),
                 ("subvp", "beta_max"), ("ve", "sigma_min"), ("ve", "sigma_max"),
                 ("cosine", "s")]
not_positive = st.floats(max_value=0.0) | st.sampled_from([math.nan, math.inf, -math.inf])


@pytest.mark.parametrize("name,arg", POSITIVE_ARGS)
@CHEAP
@given(value=not_positive)
def test_constructor_rejects_nonpositive_or_nonfinite(name, arg, value):
    with pytest.raises(ValueError, match=f"{arg} must be a finite number > 0"):
        SDE_CLASSES[name](**{arg: value})


@pytest.mark.parametrize("name", ["vp", "subvp"])
@CHEAP
@given(beta_min=st.floats(0.02, 30.0), frac=st.floats(1e-3, 1.0, exclude_max=True))
def test_beta_max_below_beta_min_raises(name, beta_min, frac):
    with pytest.raises(ValueError, match="beta_max must be >= beta_min"):
        SDE_CLASSES[name](beta_min=beta_min, beta_max=frac * beta_min)


@CHEAP
@given(sigma_max=st.floats(1e-3, 100.0), factor=st.floats(1.0, 100.0))
def test_sigma_max_not_above_sigma_min_raises(sigma_max, factor):
    with pytest.raises(ValueError, match="sigma_max must be > sigma_min"):
        VESDE(sigma_min=sigma_max * factor, sigma_max=sigma_max)


@CHEAP
@given(max_beta=st.floats(max_value=0.0) | st.floats(min_value=1.0)
       | st.sampled_from([math.nan]))
def test_cosine_max_beta_outside_unit_interval_raises(max_beta):
    with pytest.raises(ValueError, match="max_beta must lie in"):
        CosineVPSDE(max_beta=max_beta)


@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(num_steps=st.integers(max_value=0) | st.sampled_from([1.5, 10.0, True, "10"]))
def test_bad_num_steps_raises(name, num_steps):
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        SDE_CLASSES[name](num_steps=num_steps)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        SDE_CLASSES[name]().with_num_steps(num_steps)


@CHEAP
@given(num_steps=st.integers(1, 50), excess=st.floats(1.0, 10.0))
def test_vp_chain_with_beta_max_over_num_steps_at_least_one_raises(num_steps, excess):
    # The DDPM chain's largest beta_i = beta_max / num_steps must be < 1 (Ho et al. 2020).
    with pytest.raises(ValueError, match="beta_max / num_steps must be < 1"):
        VPSDE(beta_min=0.1, beta_max=excess * num_steps, num_steps=num_steps)
    with pytest.raises(ValueError, match="beta_max / num_steps must be < 1"):
        VPSDE(beta_min=0.1, beta_max=excess * num_steps,
              num_steps=num_steps + 1000).with_num_steps(num_steps)


bad_eps = (st.floats(max_value=0.0) | st.floats(min_value=1.0)
           | st.sampled_from([math.nan, math.inf]))


@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(eps=bad_eps)
def test_eps_outside_open_unit_interval_raises(name, eps):
    # Every public solver starts or ends at eps, and t = 0 is excluded because scores (and
    # -noise / sigma) blow up there; the check happens before any score evaluation.
    sde = SDE_CLASSES[name]()
    x = torch.zeros(2, 3, dtype=F64)

    def score_fn(y, t):
        raise AssertionError("score evaluated despite invalid eps")

    for call in (lambda: data_to_latent(sde, score_fn, x, eps=eps),
                 lambda: latent_to_data(sde, score_fn, x, eps=eps),
                 lambda: sample_ode(sde, score_fn, (2, 3), eps=eps),
                 lambda: sample_pc(sde, score_fn, (2, 3), eps=eps)):
        with pytest.raises(ValueError, match="eps"):
            call()


@pytest.mark.parametrize("name", SDE_NAMES)
@CHEAP
@given(batch=batch_sizes, shape=data_shapes, wrong=st.integers(0, 6),
       bad_kind=st.sampled_from(["length", "rank", "integer"]))
def test_time_of_wrong_shape_or_dtype_raises(name, batch, shape, wrong, bad_kind):
    sde = SDE_CLASSES[name]()
    x = torch.zeros((batch,) + shape, dtype=F64)
    if bad_kind == "length":
        t = torch.full((wrong if wrong != batch else batch + 1,), 0.5, dtype=F64)
    elif bad_kind == "rank":
        t = torch.full((batch, 1), 0.5, dtype=F64)
    else:
        t = torch.ones(batch, dtype=torch.int64)
    with pytest.raises(ValueError, match="t must"):
        sde.marginal_prob(x, t)
    with pytest.raises(ValueError, match="t must"):
        sde.sde(x, t)
    if bad_kind != "length":  # marginal_coeffs sees no x, so any length is valid
        with pytest.raises(ValueError, match="t must"):
            sde.marginal_coeffs(t)


@CHEAP
@given(rtol=st.floats(max_value=0.0) | st.sampled_from([math.nan, math.inf]),
       which=st.sampled_from(["rtol", "atol"]))
def test_nonpositive_solver_tolerance_raises(rtol, which):
    sde = VPSDE()
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=f"{which} must be a finite number > 0"):
        data_to_latent(sde, lambda y, t: -y, x, **{which: rtol})
