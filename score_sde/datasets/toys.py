"""2-D toy distributions after FFJORD (Grathwohl et al. 2019, `lib/toy_data.py`): 8 Gaussians,
checkerboard, swiss roll, two moons; the exact log-density of the first two (`toy_log_prob`)."""
import math

import torch
from torch.utils.data import TensorDataset

from .._utils import check_choice
from .common import SPLITS, DataInfo, mix_seed, reject_unused

TOY_NUM_SAMPLES = {"train": 100_000, "test": 10_000}
_TOY_STREAM = 1  # the random stream of the toys' points (see `mix_seed`)

_GAUSS_RADIUS = 2.0 * math.sqrt(2.0)  # FFJORD: unit-circle centres * 4 / 1.414
_GAUSS_STD = 0.5 / math.sqrt(2.0)  # FFJORD: 0.5 / 1.414
_LOG_CHECKER_DENSITY = -math.log(32.0)  # 8 cells of area 4, uniform


def _gaussian_centres(dtype, device=None) -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = _GAUSS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centres.to(dtype=dtype, device=device)


def _sample_8gaussians(n, g):
    k = torch.randint(8, (n,), generator=g)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float32)
    return _gaussian_centres(torch.float32)[k] + _GAUSS_STD * noise


def _checker_cells() -> torch.Tensor:
    # Cells [2i, 2i + 2) x [2j, 2j + 2) of [-4, 4)^2 with i + j even (FFJORD's checkerboard).
    ij = torch.cartesian_prod(torch.arange(-2, 2), torch.arange(-2, 2))
    return ij[ij.sum(dim=1) % 2 == 0]


def _sample_checkerboard(n, g):
    cells = _checker_cells()[torch.randint(8, (n,), generator=g)]
    return 2.0 * (cells + torch.rand(n, 2, generator=g, dtype=torch.float32))


def _sample_swissroll(n, g):
    # sklearn make_swiss_roll(noise=1.0), coordinates (x, z), divided by 5, as in FFJORD.
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float32))
    x = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    x = x + torch.randn(n, 2, generator=g, dtype=torch.float32)
    return x / 5


def _sample_moons(n, g):
    # sklearn make_moons(noise=0.1) with uniform random angles, then * 2 + (-1, -0.2) (FFJORD).
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float32)
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    x = torch.where(torch.rand(n, 1, generator=g) < 0.5, upper, lower)
    x = x + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float32)
    return 2 * x + torch.tensor([-1.0, -0.2], dtype=torch.float32)


TOY_SAMPLERS = {"toy_8gaussians": _sample_8gaussians, "toy_checkerboard": _sample_checkerboard,
                "toy_swissroll": _sample_swissroll, "toy_moons": _sample_moons}


def _log_prob_8gaussians(x):
    d2 = ((x[:, None, :] - _gaussian_centres(x.dtype, x.device)) ** 2).sum(dim=-1)  # [B, 8]
    return (torch.logsumexp(-0.5 * d2 / _GAUSS_STD ** 2, dim=1)
            - math.log(8) - math.log(2 * math.pi * _GAUSS_STD ** 2))


def _log_prob_checkerboard(x):
    cell = torch.floor(x / 2)
    inside = ((cell >= -2) & (cell <= 1)).all(dim=1) & (cell.sum(dim=1) % 2 == 0)
    return torch.full_like(x[:, 0], _LOG_CHECKER_DENSITY).masked_fill(~inside, -math.inf)


TOY_LOG_PROBS = {"toy_8gaussians": _log_prob_8gaussians,
                 "toy_checkerboard": _log_prob_checkerboard}


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of a 2-D toy whose density has a closed form.

    8 Gaussians: (1/8) sum_k N(x; c_k, s^2 I) with c_k = 2 sqrt(2) (cos k pi/4, sin k pi/4),
    s = 0.5 / sqrt(2) (differentiable). Checkerboard: 1/32 on the 8 cells [2i, 2i+2) x [2j, 2j+2)
    of [-4, 4)^2 with i + j even, -inf elsewhere. The swiss roll and moons have none.

    Args:
        name: a key of TOY_LOG_PROBS.
        x: points [B, 2], floating point.

    Returns:
        log p(x) in nats, shape [B], x's dtype and device.

    Raises:
        ValueError: unknown name or x not a floating tensor [B, 2].
    """
    check_choice("toy with an exact log-density", name, TOY_LOG_PROBS)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2 \
            or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor [B, 2], got {got}")
    return TOY_LOG_PROBS[name](x)


def load_toy(name, *, split, data_dir, data_path, seed, num_samples):
    reject_unused(name, data_dir=data_dir, data_path=data_path)
    n = TOY_NUM_SAMPLES[split] if num_samples is None else num_samples
    g = torch.Generator().manual_seed(mix_seed(seed, _TOY_STREAM, SPLITS.index(split)))
    x = TOY_SAMPLERS[name](n, g).to(torch.float32)
    return TensorDataset(x), DataInfo(name, (2,), False, None, None, None)
