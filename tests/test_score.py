"""Tests of score_sde/score.py (`make_score_fn`).

Ground truth: Gaussian data N(0, S^2 I) diffused by a linear SDE with kernel N(a x0, v I) has
x_t ~ N(0, (a^2 S^2 + v) I), so the exact score is -x / (a^2 S^2 + v), the exact noise
prediction E[eps | x_t] = -sqrt(v) score and the exact Tweedie mean E[x0 | x_t] = a S^2 x /
(a^2 S^2 + v). The kernels a(t), v(t) come from `tests/problems.py`, not from the library.
"""
import math

import pytest
import torch

from score_sde.score import PREDICTIONS, TIME_INPUTS, make_score_fn
from score_sde.sde import CosineVPSDE, SubVPSDE, VESDE, VPSDE
from tests.problems import KERNELS
from tests.test_sde import OrnsteinUhlenbeck, per_sample

F64 = torch.float64
S = 1.5  # data standard deviation

# The problems.KERNELS defaults (beta 0.1..20, sigma 0.01..50) with the library's defaults.
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
SHAPES = {2: (4, 3), 4: (4, 2, 3, 2)}
TIMES = (0.1, 0.4, 0.7, 1.0)

# Relative tolerances by (prediction, dtype). In float32 the x0 conversion (alpha x0 - x) /
# sigma^2 loses about (a^2 S^2 + v) / v ~ 5e3 (VE at t = 0.1) to cancellation.
RTOL = {
    ("noise", F64): 1e-12, ("score", F64): 1e-12, ("x0", F64): 1e-9,
    ("noise", torch.float32): 1e-5, ("score", torch.float32): 1e-5,
    ("x0", torch.float32): 1e-3,
}


def kernel(name, t64, ndim):
    a, v = KERNELS[name](t64)
    return per_sample(a, ndim), per_sample(v, ndim)


def exact_score(name, x, t):
    a, v = kernel(name, t.double(), x.ndim)
    return -x.double() / (a ** 2 * S ** 2 + v)


def exact_output(prediction, name, x, t):
    """What a perfectly trained network predicting `prediction` returns, in x's dtype."""
    a, v = kernel(name, t.double(), x.ndim)
    var = a ** 2 * S ** 2 + v
    x64 = x.double()
    out = {"score": -x64 / var, "noise": torch.sqrt(v) * x64 / var, "x0": a * S ** 2 * x64 / var}
    return out[prediction].to(x.dtype)


def exact_model(prediction, name):
    """A toy network reading time as t and predicting `prediction` exactly."""

    def model(x, t_in):
        return exact_output(prediction, name, x, t_in)

    return model


def inputs(rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = S * torch.randn(SHAPES[rank], generator=g, dtype=dtype)
    return x, torch.tensor(TIMES, dtype=F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("prediction", ["noise", "score", "x0"])
@pytest.mark.parametrize("name", list(SDES))
def test_exact_model_gives_exact_score(name, prediction, rank, dtype):
    score_fn = make_score_fn(exact_model(prediction, name), SDES[name](),
                             prediction=prediction, time_input="t")
    x, t = inputs(rank, dtype)
    score = score_fn(x, t)
    assert score.shape == x.shape and score.dtype == dtype
    torch.testing.assert_close(score, exact_score(name, x, t).to(dtype),
                               rtol=RTOL[prediction, dtype], atol=0.0)


@pytest.mark.parametrize("prediction", ["noise", "x0"])
@pytest.mark.parametrize("name", list(SDES))
def test_score_is_differentiable_in_x(name, prediction):
    """d score_i / d x_i = -1 / (a^2 S^2 + v) for the exact model (the Hessian is diagonal)."""
    score_fn = make_score_fn(exact_model(prediction, name), SDES[name](), prediction=prediction)
    x, t = inputs(2, F64)
    x.requires_grad_()
    grad, = torch.autograd.grad(score_fn(x, t).sum(), x)
    a, v = kernel(name, t, 2)
    expected = (-1 / (a ** 2 * S ** 2 + v)).expand_as(x)
    torch.testing.assert_close(grad, expected, rtol=RTOL[prediction, F64], atol=0.0)


class Recorder:
    """A model returning the exact score and recording the time input it was given."""

    def __init__(self, name):
        self.name, self.seen = name, []

    def __call__(self, x, t_in):
        self.seen.append(t_in)
        return exact_output("score", self.name, x, torch.tensor(TIMES, dtype=F64))


@pytest.mark.parametrize("num_steps", [50, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("time_input", ["t", "scaled_t", "index", "std", "noise_level"])
@pytest.mark.parametrize("name", list(SDES))
def test_time_input(name, time_input, dtype, num_steps):
    model = Recorder(name)
    score_fn = make_score_fn(model, SDES[name](num_steps=num_steps), prediction="score",
                             time_input=time_input)
    x, t = inputs(2, dtype)
    score_fn(x, t)
    t_in, = model.seen
    if time_input == "index":
        # The paper code's step of t: floor(t (N - 1) / T); TIMES are not step boundaries.
        expected = torch.tensor([math.floor(ti * (num_steps - 1)) for ti in TIMES])
        assert t_in.dtype == torch.long
        assert torch.equal(t_in, expected)
        return
    expected = {
        "t": t,
        "scaled_t": t * (num_steps - 1),
        "std": torch.sqrt(KERNELS[name](t)[1]),
        "noise_level": torch.sqrt(KERNELS[name](t)[1]) / KERNELS[name](t)[0],
    }[time_input]
    assert t_in.dtype == dtype and t_in.shape == t.shape
    torch.testing.assert_close(t_in, expected.to(dtype), rtol=RTOL["score", dtype], atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_time_input_is_the_ve_noise_scale(dtype):
    """"sigma" feeds sigma_min (sigma_max / sigma_min)^t, which exceeds the exact marginal std
    sqrt(sigma(t)^2 - sigma_min^2) ("std") and stays sigma_min > 0 at t = 0."""
    sde = VESDE(sigma_min=0.02, sigma_max=80.0)
    seen = []
    score_fn = make_score_fn(lambda x, t_in: seen.append(t_in) or -x, sde, prediction="score",
                             time_input="sigma")
    t = torch.tensor([0.0, 1e-4, 0.5, 1.0], dtype=dtype)
    score_fn(torch.zeros(4, 3, dtype=dtype), t)
    expected = 0.02 * (80.0 / 0.02) ** t.double()
    assert seen[0].dtype == dtype
    torch.testing.assert_close(seen[0], expected.to(dtype), rtol=RTOL["score", dtype], atol=0.0)
    assert torch.all(seen[0].double() > torch.sqrt(KERNELS["ve"](t.double(), 0.02, 80.0)[1]))


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), OrnsteinUhlenbeck()])
def test_sigma_time_input_needs_a_noise_scale(sde):
    with pytest.raises(ValueError, match=f"needs an SDE with a noise scale.*{type(sde).__name__}"):
        make_score_fn(lambda x, t_in: x, sde, prediction="score", time_input="sigma")


def test_score_prediction_is_passed_through_unchanged():
    x, t = inputs(4, torch.float32)
    out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    score_fn = make_score_fn(lambda x, t_in: out, VPSDE(), prediction="score")
    assert score_fn(x, t) is out


@pytest.mark.parametrize("bad,argument,accepted", [
    (dict(prediction="eps"), "prediction", ["noise", "score", "x0"]),
    (dict(time_input="noise_lvl"), "time_input", ["t", "scaled_t", "index", "std", "sigma",
                                                "noise_level"]),
])
def test_unknown_choice_raises_and_lists_accepted_values(bad, argument, accepted):
    assert sorted(accepted) == sorted({"prediction": PREDICTIONS,
                                       "time_input": TIME_INPUTS}[argument])
    with pytest.raises(ValueError, match=f"unknown {argument} {bad[argument]!r}") as info:
        make_score_fn(lambda x, t_in: x, VPSDE(), **bad)
    for value in accepted:
        assert repr(value) in str(info.value)


@pytest.mark.parametrize("prediction", ["noise", "score", "x0"])
@pytest.mark.parametrize("wrong", ["drop_dim", "transposed", "batch_only"])
def test_model_output_of_wrong_shape_raises(prediction, wrong):
    bad_output = {
        "drop_dim": lambda x: x[:, :1],
        "transposed": lambda x: x.transpose(0, 1),  # same numel, wrong shape
        "batch_only": lambda x: x[:, 0],
    }[wrong]
    score_fn = make_score_fn(lambda x, t_in: bad_output(x), VPSDE(), prediction=prediction)
    x, t = inputs(2, F64)
    with pytest.raises(ValueError, match=r"model output has shape .*expected .*\(4, 3\)"):
        score_fn(x, t)


@pytest.mark.parametrize("prediction,time_input", [
    ("noise", "t"), ("x0", "t"), ("noise", "index"), ("score", "std"), ("score", "noise_level"),
])
def test_sde_without_marginal_raises_when_marginal_needed(prediction, time_input):
    with pytest.raises(ValueError, match="OrnsteinUhlenbeck, which has none"):
        make_score_fn(lambda x, t_in: x, OrnsteinUhlenbeck(), prediction=prediction,
                      time_input=time_input)


@pytest.mark.parametrize("time_input", ["t", "scaled_t", "index"])
def test_sde_without_marginal_works_with_score_prediction(time_input):
    sde = OrnsteinUhlenbeck(num_steps=100)
    x, t = inputs(2, F64)
    score_fn = make_score_fn(lambda x, t_in: -x, sde, prediction="score", time_input=time_input)
    torch.testing.assert_close(score_fn(x, t), -x, rtol=0.0, atol=0.0)


class ModeRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(p=0.5)
        self.modes = []

    def forward(self, x, t_in):
        self.modes.append((self.training, self.dropout.training))
        return torch.zeros_like(x)


@pytest.mark.parametrize("training", [True, False])
def test_wrapper_does_not_change_train_or_eval_mode(training):
    model = ModeRecorder().train(training)
    score_fn = make_score_fn(model, VPSDE(), prediction="noise")
    x, t = inputs(2, F64)
    score_fn(x, t)
    score_fn(x, t)
    assert model.modes == [(training, training)] * 2
    assert model.training == model.dropout.training == training


@pytest.mark.parametrize("prediction", ["noise", "score", "x0"])
@pytest.mark.parametrize("name", list(SDES) + ["cosine"])
def test_input_scaling_feeds_x_over_the_marginal_scale(name, prediction):
    # input_scaling: the network sees x / sqrt(a^2 + v) (from the kernels of tests/problems.py,
    # cosine: a^2 + v = 1 by construction), and its output is still read against x itself, so
    # a network that undoes the scaling gives the exact score.
    sde = SDES[name]() if name in SDES else CosineVPSDE()
    x, t = inputs(2, F64)
    if name in SDES:
        a, v = kernel(name, t, 2)
        scale = torch.sqrt(a ** 2 + v)
    else:
        scale = torch.ones(len(t), 1, dtype=F64)
    seen = []

    def model(x_in, t_in):
        seen.append(x_in)
        return exact_output(prediction, name, x_in * scale, t_in) if name in SDES else x_in

    score_fn = make_score_fn(model, sde, prediction=prediction, input_scaling=True)
    score = score_fn(x, t)
    torch.testing.assert_close(seen[0], x / scale, rtol=1e-12, atol=0.0)
    if name in SDES:
        torch.testing.assert_close(score, exact_score(name, x, t), rtol=RTOL[prediction, F64],
                                   atol=0.0)
    if name in ("vp", "cosine"):  # variance preserving: the identity
        torch.testing.assert_close(seen[0], x, rtol=1e-12, atol=0.0)


def test_input_scaling_needs_the_marginal():
    with pytest.raises(ValueError, match="input_scaling=True need the marginal"):
        make_score_fn(lambda x, t_in: x, OrnsteinUhlenbeck(), prediction="score",
                      input_scaling=True)


def test_a_config_carries_the_time_input_and_input_scaling_to_the_network():
    # The shipped toy config (the default for 2-D data) and a checkpoint's config round trip
    # both reach the network through build.model_score_fn: under VE it must see
    # x / sqrt(1 + v) and the noise level sqrt(v) (kernel from tests/problems.py).
    from score_sde.build import model_score_fn
    from score_sde.config import apply_overrides, find_config, from_dict, load_config_file, \
        to_dict

    cfg = load_config_file(str(find_config("toy")))
    assert (cfg.model.time_input, cfg.model.input_scaling) == ("noise_level", True)
    cfg = from_dict(to_dict(apply_overrides(cfg, {"sde.name": "ve"})))
    seen = []

    def model(x_in, t_in):
        seen.append((x_in, t_in))
        return torch.zeros_like(x_in)

    x, t = inputs(2, F64)
    model_score_fn(model, VESDE(), cfg)(x, t)
    a, v = kernel("ve", t, 2)
    torch.testing.assert_close(seen[0][0], x / torch.sqrt(a ** 2 + v), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(seen[0][1], torch.sqrt(KERNELS["ve"](t)[1]), rtol=1e-12, atol=0.0)


def test_x0_prediction_and_denoise_in_float16_above_sigma_256():
    """VE with sigma_max = 348: sigma(1)^2 = 121104 overflows float16 (65504). The score of an
    x0-predicting network, -(x - x0_hat) / sigma^2, is about -0.0025 at x = 300 with
    x0_hat = 0 (representable), and Tweedie's denoiser with the exact score of N(0, 1) data,
    x + sigma^2 score = x / (1 + sigma^2), must come back finite."""
    sde = VESDE(sigma_max=348.0)
    t = torch.ones(1)
    sigma2 = (0.01 * 34800.0) ** 2 - 0.01 ** 2  # sigma(1)^2 of the marginal
    score_fn = make_score_fn(lambda x, t: torch.zeros_like(x), sde, prediction="x0",
                             time_input="sigma")
    x = torch.full((1, 3), 300.0)
    half = score_fn(x.half(), t)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), torch.full((1, 3), -300.0 / sigma2,
                                                         dtype=torch.float64), rtol=2e-3, atol=0)
    exact_score = -x / (1 + sigma2)
    denoised = sde.denoise(x.half(), t, exact_score.half())
    assert denoised.dtype == torch.float16 and torch.isfinite(denoised).all()
    # E[x0 | x] = x / (1 + sigma^2) = 0.0025; float16's rounding of the score (5e-4 of
    # 0.0025, times sigma^2) leaves up to 0.2 of x = 300.
    assert (denoised.double() - x.double() / (1 + sigma2)).abs().max() < 0.2
