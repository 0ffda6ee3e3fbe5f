"""8-bit data <-> the interval a model reads: uniform dequantization (`to_model_range`) and its
inverse (`from_model_range`)."""
import math
import warnings
from typing import Optional, Tuple

import torch

from .common import NUM_LEVELS


# Largest dequantization offset u: below 1 by more than the round-off of k + u (k < 256) in
# float32, of its scaling to [lo, hi) and of `from_model_range`'s inverse (each < 2^-16 bins).
U_MAX = 1.0 - 2.0 ** -14


def to_model_range(x: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                   dequantize: bool = True, dtype: torch.dtype = torch.float32,
                   data_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Maps 8-bit data k in {0, ..., 255} to [lo, hi): y = lo + (k + u) / 256 (hi - lo).

    With `dequantize`, u ~ Uniform[0, 1) independently per element (uniform dequantization, the
    continuous density of y bounds the discrete likelihood), held below `U_MAX` so that
    float32 round-off never carries y into the next bin; otherwise u = 0.5, the bin centre.
    The default interval [-1, 1] has width 2, so bits/dim of y take the offset 8 - 1 = 7 bits
    of `score_sde.likelihood.bits_per_dim(logp, D, data_width=2.0, num_levels=256)`; the
    paper's VE models read [0, 1] (width 1, offset 8).

    Args:
        x: uint8 tensor of any shape.
        generator: source of the dequantization noise (on x's device); None: global RNG.
        dequantize: add uniform noise (training, likelihood) or use bin centres (display).
        dtype: floating dtype of the result.
        data_range: the interval (lo, hi) the model reads, `DataInfo.data_range`.

    Returns:
        tensor of x's shape in `dtype`, values in [lo, hi).

    Raises:
        ValueError: x is not a uint8 tensor, dtype is not floating point, or lo >= hi.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a uint8 tensor of 8-bit data, got {got}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    lo, hi = _check_range(data_range)
    work = torch.promote_types(dtype, torch.float32)  # 255 + u needs float32's mantissa
    if dequantize:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=work)
        # k + u for u within a few ulps of 1 rounds (here or in the scaling below, or in
        # `from_model_range`) onto the next bin's lower edge, which reads back as k + 1;
        # u >= 1 - 2^-14 (probability 6e-5) is held at that value, which stays in bin k.
        u.clamp_(max=U_MAX)
    else:
        u = torch.full(x.shape, 0.5, device=x.device, dtype=work)
    y = ((x.to(work) + u) * ((hi - lo) / NUM_LEVELS) + lo).to(dtype)
    # 255 + u rounds up to 256 for u within half an ulp of 1; keep the documented [lo, hi).
    below_hi = torch.nextafter(torch.tensor(hi, dtype=dtype), torch.tensor(lo, dtype=dtype))
    return y.clamp_(max=below_hi.item())


def _check_range(data_range) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi), got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must be finite with lo < hi, got {data_range!r}")
    return lo, hi


def from_model_range(x: torch.Tensor,
                     data_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Inverse of `to_model_range`: k = floor((x - lo) / (hi - lo) * 256) clamped to
    {0, ..., 255}.

    Each dequantization bin lo + [k, k + 1) (hi - lo) / 256 maps back to k, so bin centres and
    dequantized values round-trip exactly in float32 and float64 (in float16 or bfloat16 the
    rounding of y itself can cross a bin's edge); values outside [lo, hi) saturate. NaN maps to
    0 with a warning.

    Args:
        x: floating tensor of any shape (e.g. model samples [B, C, H, W]).
        data_range: the interval (lo, hi) the model reads, `DataInfo.data_range`.

    Returns:
        uint8 tensor of x's shape, for saving images.

    Raises:
        ValueError: x is not a floating-point tensor, or lo >= hi.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    lo, hi = _check_range(data_range)
    num_nan = int(torch.isnan(x).sum())
    if num_nan:
        warnings.warn(f"from_model_range: {num_nan} NaN values mapped to 0")
        x = torch.nan_to_num(x, nan=lo)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    k = torch.floor((x - lo) * (NUM_LEVELS / (hi - lo)))
    return k.clamp_(0, NUM_LEVELS - 1).to(torch.uint8)
