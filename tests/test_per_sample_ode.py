"""Per-sample adaptive Dormand–Prince: accuracy against closed-form solutions, steps that follow
each sample's own difficulty, results independent of the batch-mates, and the likelihood with
`step_control="per_sample"` against closed-form mixture densities."""
import math

import pytest
import torch

from score_sde import VESDE, VPSDE, log_likelihood
from score_sde.per_sample_ode import odeint_per_sample
from tests.problems import KERNELS, exact_log_prob_t, exact_score_fn, random_mixture

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _decay(k):
    def rhs(t, y, idx):  # dy/dt = -k_b y: y(t) = y0 exp(-k_b (t - t0))
        return (-k[idx].reshape(-1, 1) * y[0],)
    return rhs


def test_linear_decay_matches_closed_form_and_steps_follow_stiffness():
    k = torch.tensor([0.5, 2.0, 8.0, 40.0], dtype=F64)
    y0 = torch.linspace(0.5, 2.0, 12, dtype=F64).reshape(4, 3)
    (y,), steps, calls = odeint_per_sample(_decay(k), (y0,), 0.0, 1.0, rtol=1e-7, atol=1e-10)
    exact = y0 * torch.exp(-k)[:, None]
    assert float(((y - exact).abs() / (1e-10 + 1e-7 * y0.abs())).max()) < 50
    # Harder samples take more steps; the easiest does not pay for the hardest.
    assert steps.tolist() == sorted(steps.tolist()) and steps[0] < steps[-1] / 3
    # Batched calls: 2 to start, then 6 stages per step of the slowest sample.
    assert calls == 2 + 6 * int(steps.max())


def test_time_dependent_backward_solve():
    def rhs(t, y, idx):  # dy/dt = cos(t) y: y(t1) = y(t0) exp(sin t1 - sin t0)
        return (torch.cos(t)[:, None] * y[0],)

    y0 = torch.tensor([[1.0], [-3.0]], dtype=F64)
    (y,), _, _ = odeint_per_sample(rhs, (y0,), 1.0, 1e-3, rtol=1e-9, atol=1e-12)
    exact = y0 * math.exp(math.sin(1e-3) - math.sin(1.0))
    torch.testing.assert_close(y, exact, rtol=1e-7, atol=0)


def test_each_sample_gets_the_result_it_would_get_alone():
    k = torch.tensor([0.3, 25.0, 1.0], dtype=F64)
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.1]], dtype=F64)
    (together,), steps, _ = odeint_per_sample(_decay(k), (y0,), 0.0, 1.0, rtol=1e-6, atol=1e-9)
    for b in range(3):
        (alone,), s, _ = odeint_per_sample(_decay(k[b:b + 1]), (y0[b:b + 1],), 0.0, 1.0,
                                           rtol=1e-6, atol=1e-9)
        assert torch.equal(alone[0], together[b]) and int(s) == int(steps[b])


def test_non_finite_state_and_step_limit_raise():
    def blows_up_after(start):
        def rhs(t, y, idx):
            out = y[0].clone()
            out[(idx == 1) & (t >= start)] = float("nan")
            return (out,)
        return rhs

    y0 = (torch.ones(3, 2, dtype=F64),)
    with pytest.raises(RuntimeError, match=r"sample 1's state became non-finite after t=0\.\d+;"):
        odeint_per_sample(blows_up_after(0.25), y0, 0.0, 1.0, rtol=1e-5, atol=1e-5)
    # Non-finite from the start: named as such, not as a NaN time or first step.
    with pytest.raises(RuntimeError, match="sample 1's derivative is non-finite at t=0;"):
        odeint_per_sample(blows_up_after(0.0), y0, 0.0, 1.0, rtol=1e-5, atol=1e-5)
    # ... or just after it, at the first step's probe evaluation.
    with pytest.raises(RuntimeError, match="sample 1's derivative is non-finite at t=0;"):
        odeint_per_sample(blows_up_after(1e-12), y0, 0.0, 1.0, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="took 3 steps"):
        odeint_per_sample(_decay(torch.tensor([1e4], dtype=F64)), (torch.ones(1, 1, dtype=F64),),
                          0.0, 1.0, rtol=1e-8, atol=1e-12, max_steps=3)


def _closed_form_error(sde, kernel, mixture, x, **kwargs):
    logp, z, nfe = log_likelihood(sde, exact_score_fn(mixture, kernel), x, divergence="exact",
                                  eps=1e-5, step_control="per_sample", **kwargs)
    swap = exact_log_prob_t(mixture, kernel, z.double(), sde.T) - sde.prior_logp(z.double())
    exact = exact_log_prob_t(mixture, kernel, x.double(), 1e-5)
    d = x[0].numel()
    return float(((logp.double() + swap - exact) / (d * math.log(2))).abs().max()), nfe


@pytest.mark.parametrize("name, dim", [("vp", 2), ("vp", 16), ("ve", 2), ("ve", 16)])
def test_likelihood_matches_closed_form(name, dim):
    sde = VPSDE() if name == "vp" else VESDE()
    mixture = random_mixture(dim, seed=dim)
    x = mixture.sample(24, torch.Generator().manual_seed(1))[0]
    err, nfe = _closed_form_error(sde, KERNELS[name], mixture, x)
    assert err < 1e-3 and nfe > 0  # bits/dim, the accuracy of the batched solver's test


def test_likelihood_independent_of_batch_mates_and_agrees_with_batch_control():
    sde = VPSDE()
    mixture = random_mixture(2, seed=3)
    score = exact_score_fn(mixture, KERNELS["vp"])
    x = mixture.sample(6, torch.Generator().manual_seed(2))[0]
    outliers = 25 * torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    alone, _, _ = log_likelihood(sde, score, x, divergence="exact", step_control="per_sample")
    mixed, _, _ = log_likelihood(sde, score, torch.cat([x, outliers]), divergence="exact",
                                 step_control="per_sample")
    assert torch.equal(alone, mixed[:6])
    # Batch control: the same numbers up to the solver tolerance, but they move with the mates.
    batch, _, _ = log_likelihood(sde, score, x, divergence="exact")
    torch.testing.assert_close(alone, batch, rtol=0, atol=1e-3)
    # Hutchinson probes follow their samples through the shrinking active set.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, _, _ = log_likelihood(sde, score, x, divergence="rademacher", generator=g1,
                             step_control="per_sample")
    b, _, _ = log_likelihood(sde, score, x, divergence="rademacher", generator=g2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_rms_control_is_still_per_sample():
    # With the rms norm too, a sample's result does not depend on its batch-mates.
    sde = VPSDE()
    mixture = random_mixture(16, seed=4)
    score = exact_score_fn(mixture, KERNELS["vp"])
    x = mixture.sample(5, torch.Generator().manual_seed(2))[0]
    outliers = 20 * torch.randn(2, 16, generator=torch.Generator().manual_seed(3), dtype=F64)
    kw = dict(divergence="exact", step_control="per_sample", error_norm="rms")
    alone, _, _ = log_likelihood(sde, score, x, **kw)
    mixed, _, _ = log_likelihood(sde, score, torch.cat([x, outliers]), **kw)
    assert torch.equal(alone, mixed[:5])


def test_bad_step_control_arguments():
    x = torch.zeros(2, 2)
    score = lambda x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="unknown step_control 'sample'"):
        log_likelihood(VPSDE(), score, x, step_control="sample")
    with pytest.raises(ValueError, match="integrates with dopri5"):
        log_likelihood(VPSDE(), score, x, step_control="per_sample", method="bosh3")


def test_an_empty_interval_returns_the_start():
    """t_start == t_end: no step, the start state back (Hairer's first-step guess divided by
    the zero first step, which once read as a non-finite derivative)."""
    k = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    y0 = torch.tensor([[1.0], [-2.0], [3.0]], dtype=F64)
    (y,), steps, calls = odeint_per_sample(_decay(k), (y0,), 0.5, 0.5, rtol=1e-7, atol=1e-10)
    assert torch.equal(y, y0) and steps.tolist() == [0, 0, 0] and calls == 2


@pytest.mark.parametrize("amplitude", [3.0, 30.0, 300.0])
def test_a_rejected_final_step_is_never_retried_unchanged(amplitude):
    # dy/dt = a (1 - cos(a (t - 0.95))) y for t > 0.95, 0 before: y(1) = y0 exp(0.05 a -
    # sin(0.05 a)). The step grows over the flat part and is cut to the rest of the interval
    # when it reaches it; the last steps are rejected there. A retry that still covers the
    # rest would take the same cut step again (same stages, same error): the solver must never
    # evaluate it twice.
    attempts = []

    def rhs(t, y, idx):
        attempts.append(t.clone())
        rate = amplitude * (1 - torch.cos(amplitude * (t - 0.95))) * (t > 0.95)
        return (rate[:, None] * y[0],)

    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    (y,), steps, calls = odeint_per_sample(rhs, (y0,), 0.0, 1.0, rtol=1e-6, atol=1e-9)
    exact = y0 * math.exp(0.05 * amplitude - math.sin(0.05 * amplitude))
    torch.testing.assert_close(y, exact, rtol=1e-4, atol=0)
    # Each step is 6 calls after the first two; a step's stage times identify its (t, h).
    stage_times = [torch.stack(attempts[2 + 6 * i: 8 + 6 * i], 1)
                   for i in range(int(steps.max()))]
    for before, after in zip(stage_times, stage_times[1:]):
        assert not torch.equal(before, after), "a rejected step was evaluated again unchanged"
    assert calls == 2 + 6 * int(steps.max())
