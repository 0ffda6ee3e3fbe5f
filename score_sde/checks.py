"""Argument checks of the samplers, the probability-flow ODE solves and the likelihood.

Each public entry point validates its arguments here, once, before any work, and then trusts
them (torchsde's `check_contract`, torchdiffeq's `_check_inputs`, which is also handed the
table of solver names). Every check raises ValueError with a one-line message naming the
argument, what was expected and what arrived. The checks of single values (`check_int`,
`check_positive`, `check_choice`, `check_shape`) live in `_utils`, shared package-wide.
"""
from typing import Iterable, Optional, Tuple

import torch

from ._utils import check_choice, check_int, check_positive, check_shape
from .sde import SDE, ScoreFn, check_sde

# What a family of samplers says when the SDE has no closed-form marginals ({name}: its class).
MARGINALS_NEEDED_BY = {
    "fast": "the fast samplers need closed-form marginals (marginal_coeffs), which {name} does "
            "not provide; use sample_pc or sample_ode",
    "conditional": "conditional sampling draws the known region from the forward marginal, "
                   "which {name} does not provide (marginal_coeffs); use a linear SDE such as "
                   "VPSDE or VESDE",
}


def check_sde_and_score(sde: SDE, score_fn: ScoreFn, *, marginals_for: Optional[str] = None
                        ) -> None:
    """An `SDE` instance (with closed-form marginals where `marginals_for`, a key of
    `MARGINALS_NEEDED_BY`, says a sampler family needs them) and a callable score function."""
    check_sde(sde)
    if marginals_for is not None and not sde.has_marginal:
        raise ValueError(MARGINALS_NEEDED_BY[marginals_for].format(name=type(sde).__name__))
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable, got {type(score_fn).__name__}")


def check_eps(eps: float, sde: SDE) -> None:
    """The smallest time of a sampler or solve: a number in (0, T)."""
    check_positive("eps", eps)
    if eps >= sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")


def check_data(x: torch.Tensor, name: str) -> None:
    """Data handed to a sampler or solve: a finite floating tensor [B, ...] of rank >= 2."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor of shape [B, ...] with rank >= 2, "
                         f"got {got}")
    if x.numel() == 0:
        raise ValueError(f"{name} must hold at least one sample of at least one element, got "
                         f"shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")


def sample_device(device, generator: Optional[torch.Generator]) -> torch.device:
    """The device to sample on: `device`, else the generator's, else the CPU.

    Raises:
        ValueError: a device torch cannot parse, a generator that is not a torch.Generator,
            or one on another kind of device than the samples."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got "
                         f"{type(generator).__name__}")
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the samples on {device}: create "
                         f"it with torch.Generator(device={str(device)!r})")
    return device


def sample_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """The floating dtype to sample in: `dtype`, else torch's default.

    Raises:
        ValueError: anything but a floating torch.dtype or None."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32) or None, "
                         f"got {dtype!r}")
    return dtype


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sampler keeps its state in for samples of `dtype`: at least float32, since
    half-precision updates round away the small increments of many steps (see
    tests/test_sampling.py's bfloat16 test); the score still sees `dtype`."""
    return torch.promote_types(dtype, torch.float32)


def check_pc_inputs(sde: SDE, score_fn: ScoreFn, shape=None, *, snr: float,
                    corrector_steps: int, num_steps: Optional[int], eps: float,
                    marginals_for: Optional[str] = None) -> Tuple[Optional[Tuple[int, ...]], int]:
    """The common arguments of the predictor-corrector samplers (`sample_pc`, `inpaint`,
    `colorize`); returns (the shape as a tuple, or None when not given, and num_steps, which
    defaults to `sde.num_steps`)."""
    check_sde_and_score(sde, score_fn, marginals_for=marginals_for)
    if shape is not None:
        shape = check_shape(shape)
    check_positive("snr", snr)
    check_int("corrector_steps", corrector_steps, minimum=0)
    num_steps = sde.num_steps if num_steps is None else num_steps
    check_int("num_steps", num_steps, minimum=1)
    check_eps(eps, sde)
    return shape, num_steps


# The smallest relative tolerance of the float64 ODE solves, as SciPy's solve_ivp has it: below
# it a step's rounding alone exceeds the tolerance and the solver shrinks steps until it stops.
MIN_RTOL = 100 * torch.finfo(torch.float64).eps


def check_solve_inputs(sde: SDE, score_fn: ScoreFn, *, rtol: float, atol: float, method: str,
                       eps: float, error_norm: str, methods: Iterable[str],
                       error_norms: Iterable[str]) -> None:
    """The common arguments of the adaptive probability-flow ODE solves (`sample_ode`,
    `data_to_latent`, `latent_to_data`, `log_likelihood`); `methods` and `error_norms` are the
    accepted names (`ode.ADAPTIVE_METHODS`, `ode.ERROR_NORMS`)."""
    check_sde_and_score(sde, score_fn)
    check_positive("rtol", rtol)
    if rtol < MIN_RTOL:
        raise ValueError(f"rtol must be >= {MIN_RTOL:.3g} (100 float64 epsilons: the solver "
                         f"state cannot resolve less and would never meet it), got {rtol:g}")
    check_positive("atol", atol)
    check_choice("method", method, methods)
    check_choice("error_norm", error_norm, error_norms)
    check_eps(eps, sde)


def check_fast_inputs(sde: SDE, score_fn: ScoreFn, shape, *, num_steps: int
                      ) -> Tuple[int, ...]:
    """The common arguments of the fast samplers (`sample_ddim`, `sample_dpm_solver`,
    `sample_heun`), which need closed-form marginals; returns the shape as a tuple. eps is
    checked by each sampler (`sample_heun` may derive it)."""
    check_sde_and_score(sde, score_fn, marginals_for="fast")
    check_int("num_steps", num_steps, minimum=1)
    return check_shape(shape)
