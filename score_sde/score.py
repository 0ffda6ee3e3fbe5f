"""Score functions: build one from a network, and count honest evaluations.

A score function is any callable `score_fn(x, t) -> tensor shaped like x` with x of shape
[B, ...] and t of shape [B]. `make_score_fn` adapts a network's own conventions (what it
predicts, how it reads time) to that contract, so samplers and likelihoods never need to know
them.
"""
import functools
from typing import Callable, Optional

import torch

from ._utils import (append_dims, at_least_float32, check_batch_time, check_choice,
                     check_time_range, float64_like)
from .sde import SDE, ScoreFn

__all__ = ["make_score_fn", "time_input_fn", "PREDICTIONS", "TIME_INPUTS"]


def _noise_to_score(out, x, alpha, sigma):
    return -out / sigma


def _score_to_score(out, x, alpha, sigma):
    return out


def _x0_to_score(out, x, alpha, sigma):
    # Gaussian kernel: score = -(x - alpha x0) / sigma^2.
    return (alpha * out - x) / sigma ** 2


# What the network predicts -> how to turn its output into the score.
PREDICTIONS = {"noise": _noise_to_score, "score": _score_to_score, "x0": _x0_to_score}


def _noise_level(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """EDM's noise level sigma / alpha = e^-lambda."""
    alpha, sigma = sde.marginal_coeffs(t)
    return sigma / alpha


# How the network reads time: a function of (sde, t [B] float64) -> network time input.
TIME_INPUTS = {
    "t": lambda sde, t: t,
    "scaled_t": lambda sde, t: t * (sde.num_steps - 1),
    "index": lambda sde, t: sde.step_index(t),
    "std": lambda sde, t: sde.marginal_coeffs(t)[1],
    # The SDE's noise scale, e.g. VESDE.sigma(t) = sigma_min (sigma_max / sigma_min)^t, which
    # the reference's VE networks read; it differs from the exact marginal std ("std") of
    # VESDE by the noise sigma_min that it assumes to be already in the data at t = 0.
    "sigma": lambda sde, t: sde.sigma(t),
    "noise_level": _noise_level,
}


def time_input_fn(sde: SDE, time_input: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from times t [B] (float64) to the network time input named `time_input`.

    Raises:
        ValueError: an unknown name, "std" or "noise_level" for an SDE without closed-form
            marginals, or "sigma" for an SDE without a noise scale `sigma(t)` (only VESDE
            has one).
    """
    check_choice("time_input", time_input, TIME_INPUTS)
    if time_input in ("std", "noise_level") and not sde.has_marginal:
        raise ValueError(f"time_input={time_input!r} needs the marginal of "
                         f"{type(sde).__name__}, which has none")
    if time_input == "sigma" and not callable(getattr(sde, "sigma", None)):
        raise ValueError(f"time_input='sigma' needs an SDE with a noise scale sigma(t) "
                         f"(VESDE), got {type(sde).__name__}")
    return functools.partial(TIME_INPUTS[time_input], sde)


def make_score_fn(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sde: SDE, *,
                  prediction: str = "noise", time_input: str = "t",
                  input_scaling: bool = False) -> ScoreFn:
    """Wraps a network `model(x, time_input) -> output` as a score function.

    Continuous-time models read t itself (`"t"`, or `"scaled_t"` = t (num_steps - 1) as in
    the DDPM++ continuous checkpoints) or the noise level (`"std"`, the marginal std, NCSN
    style; `"sigma"`, VESDE's noise scale sigma(t), as the reference's VE networks;
    `"noise_level"`, EDM's sigma / alpha = e^-lambda, which keeps resolving time where the std
    of a VP schedule saturates at 1). Discrete-time models (DDPM, SMLD) read the integer step
    index (`"index"`, `sde.step_index(t)` = floor(t (num_steps - 1) / T) as in the paper's
    code). The model's train/eval mode is the caller's business and is never changed here.

    Args:
        model: network taking (x [B, ...], time input [B]) and returning a tensor shaped like x.
        sde: the SDE the model was trained with (gives alpha(t), sigma(t) and the step grid).
        prediction: what the model outputs: "noise" (epsilon; score = -eps / sigma),
            "score", or "x0" (the denoised data; score = (alpha x0 - x) / sigma^2).
        time_input: "t", "scaled_t", "index", "std", "sigma" or "noise_level" (see above).
        input_scaling: feed the network x / sqrt(alpha(t)^2 + sigma(t)^2) instead of x (its
            output is still read against x). That is the identity for VP and cosine VP,
            whose alpha^2 + sigma^2 = 1, and keeps a VE network's input at the data's scale
            instead of sigma (up to 50): EDM's c_in (Karras et al. 2022, Table 1) for data
            of unit variance. Needs closed-form marginals.

    Returns:
        score_fn(x, t) -> score shaped like x, in x's dtype; it raises ValueError unless t is
        a floating tensor [B] of times in [0, T] (or (0, T] where sigma(t) divides).

    Raises:
        ValueError: for unknown `prediction` or `time_input`, an SDE without closed-form
            marginals when they are needed, or "sigma" for an SDE without sigma(t).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("time_input", time_input, TIME_INPUTS)
    needs_marginal = (prediction != "score" or time_input in ("std", "noise_level")
                      or input_scaling)
    if needs_marginal and not sde.has_marginal:
        raise ValueError(f"prediction={prediction!r} / time_input={time_input!r} / "
                         f"input_scaling={input_scaling!r} need the marginal of "
                         f"{type(sde).__name__}, which has none; use prediction='score' with "
                         f"time_input='t'")
    to_score = PREDICTIONS[prediction]
    to_time = time_input_fn(sde, time_input)

    needs_coeffs = input_scaling or prediction != "score"
    divides = prediction != "score" or time_input in ("std", "noise_level")
    why = (f" for prediction={prediction!r}, time_input={time_input!r}: sigma(0) = 0 would be "
           f"divided by (samplers stop at eps > 0)")

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_batch_time(x, t)  # integer step indices would pass as times otherwise
        check_time_range(t, 0.0, sde.T, open_lo=divides, why=why if divides else "")
        t64 = t.double() if t.device.type != "mps" else t
        t_in = to_time(t64)
        if t_in.is_floating_point():
            t_in = t_in.to(x.dtype)
        x_in = x
        if needs_coeffs:  # once per call: input scaling and the output conversion share them
            alpha, sigma = sde.marginal_coeffs(t64)
        if input_scaling:
            x_in = x * append_dims(torch.rsqrt(alpha ** 2 + sigma ** 2).to(x.dtype), x.ndim)
        out = model(x_in, t_in)
        if out.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected the input "
                             f"shape {tuple(x.shape)}")
        if prediction == "score":
            return out
        # In at least float32: sigma^2 overflows float16 above sigma = 256 (VE).
        work = at_least_float32(x.dtype)
        return to_score(out.to(work), x.to(work), append_dims(alpha.to(work), x.ndim),
                        append_dims(sigma.to(work), x.ndim)).to(x.dtype)

    score_fn.takes_float64_time = True  # see CountingScore
    return score_fn


class CountingScore:
    """Internal wrapper: calls the user's score with x in `model_dtype` (default: x's own)
    and t in the same dtype, clamps t into the integration interval against round-off, checks
    the output shape, returns the score in x's dtype and counts calls (NFE).

    A score function marked `takes_float64_time` (`make_score_fn`'s, and the guided ones built
    only from such) gets t in float64 instead and casts its time input itself: a discrete
    network's step index floor(t (N - 1) / T) lies i eps / T above an integer near T, below
    a float32 rounding of t."""

    def __init__(self, score_fn: ScoreFn, t_lo: float, t_hi: float, *,
                 model_dtype: Optional[torch.dtype] = None):
        self.score_fn = score_fn
        self.t_lo, self.t_hi = t_lo, t_hi
        self.model_dtype = model_dtype
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = x if self.model_dtype is None else x.to(self.model_dtype)
        wide = getattr(self.score_fn, "takes_float64_time", False)
        t = _time_in_interval(t, self.t_lo, self.t_hi, float64_like(t) if wide else x_in.dtype)
        self.nfe += 1
        score = self.score_fn(x_in, t)
        if not isinstance(score, torch.Tensor) or score.shape != x.shape:
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"score_fn must return a tensor shaped like x {tuple(x.shape)}, "
                             f"got {got}")
        return score.to(x.dtype)


def _time_in_interval(t: torch.Tensor, lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor:
    """Clamps t to [lo, hi] and casts it to `dtype` so that the cast value still lies in
    [lo, hi] when compared in float64 (a float32 eps may round to just below eps)."""
    wide = torch.float32 if t.device.type == "mps" else torch.float64
    t = t.to(wide).clamp(lo, hi)
    tc = t.to(dtype)
    back = tc.to(wide)
    tc = torch.where(back < lo, torch.nextafter(tc, torch.full_like(tc, hi)), tc)
    return torch.where(back > hi, torch.nextafter(tc, torch.full_like(tc, lo)), tc)
