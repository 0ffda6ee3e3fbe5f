"""FIR up- and down-sampling of images in plain PyTorch (StyleGAN2's `upfirdn2d`).

Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2), resample
with a separable low-pass FIR filter, [1, 3, 3, 1] by default, instead of nearest-neighbour
upsampling and average pooling; NCSN++ (Song et al. 2021, App. H) adopts this. The reference
implementation needs a custom CUDA operator with no bfloat16 kernel. Here every operation is a
depthwise `conv2d` or `conv_transpose2d` with `F.pad`, so it runs on any device and dtype,
including under `torch.autocast`.

`upfirdn2d(x, kernel, up=u, down=d, pad=(p0, p1))` means, along each spatial axis: insert u - 1
zeros after every sample, pad p0 zeros before and p1 after (negative values crop), convolve with
`kernel` keeping only fully overlapping positions, and keep every d-th sample.

All kernels are 2-D tensors [K, K] built by `fir_kernel`; the caller builds them once (a module
buffer), so no tensor is created on every call.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["fir_kernel", "upfirdn2d", "upsample_2d", "downsample_2d", "upsample_conv_2d",
           "conv_downsample_2d"]


def fir_kernel(taps: Sequence[float], *, gain: float = 1.0) -> torch.Tensor:
    """The separable kernel outer(taps, taps), normalised to sum to `gain`.

    Args:
        taps: one-dimensional filter taps, e.g. (1, 3, 3, 1).
        gain: sum of the 2-D kernel: 1 for downsampling, factor**2 for upsampling (zero
            insertion divides the mean by factor**2).

    Returns:
        float32 tensor [K, K] on the default device.

    Raises:
        ValueError: for fewer than one tap or taps summing to zero.
    """
    try:
        taps = [float(v) for v in taps]
    except (TypeError, ValueError):
        raise ValueError(f"taps must be a sequence of numbers, got {taps!r}") from None
    if not taps or sum(taps) == 0:
        raise ValueError(f"taps must be a non-empty sequence with non-zero sum, got {taps!r}")
    # Normalised in Python floats, so the kernel can be built on any device (also "meta").
    norm = gain / sum(taps) ** 2
    return torch.tensor([[a * b * norm for b in taps] for a in taps], dtype=torch.float32)


def _depthwise_weight(kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # One copy of the kernel per channel, in x's dtype (autocast casts it again if needed).
    return kernel.to(device=x.device, dtype=x.dtype).expand(x.shape[1], 1, *kernel.shape)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, down: int = 1,
              pad: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with `kernel`, downsample (see module docstring).

    Args:
        x: images [B, C, H, W].
        kernel: filter [K, K], applied as a true convolution (flipped, as in StyleGAN2).
        up: integer upsampling factor >= 1.
        down: integer downsampling factor >= 1.
        pad: (before, after) padding applied to both spatial axes after zero insertion.

    Returns:
        [B, C, H', W'] with H' = (H up + p0 + p1 - K) // down + 1, in x's dtype (the
        autocast dtype under autocast).
    """
    size = kernel.shape[0]
    p0, p1 = pad
    weight = _depthwise_weight(kernel, x)
    if up == 1:
        x = F.pad(x, (p0, p1, p0, p1))
        return F.conv2d(x, weight.flip(2, 3), stride=down, groups=x.shape[1])
    # The transposed convolution gives the full convolution of the zero-inserted signal,
    # (H - 1) up + K samples; the window the padding asks for starts K - 1 - p0 samples in.
    x = F.conv_transpose2d(x, weight, stride=up, groups=x.shape[1])
    lo, hi = p0 - (size - 1), up + p1 - size
    x = F.pad(x, (lo, hi, lo, hi))
    return x[:, :, ::down, ::down] if down > 1 else x


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, *, factor: int = 2) -> torch.Tensor:
    """FIR upsampling [B, C, H, W] -> [B, C, H factor, W factor].

    `kernel` must sum to factor**2 (`fir_kernel(taps, gain=factor ** 2)`) so that a constant
    image stays constant. With taps [1] * factor this is nearest-neighbour upsampling.
    """
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: torch.Tensor, *, factor: int = 2) -> torch.Tensor:
    """FIR downsampling [B, C, H, W] -> [B, C, H // factor, W // factor] (H, W even).

    `kernel` must sum to 1. With taps [1] * factor this is average pooling.
    """
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, *,
                     factor: int = 2) -> torch.Tensor:
    """Upsampling and a convolution fused into one transposed convolution and one FIR pass.

    Equals, along each axis: zero insertion (no trailing zeros), full cross-correlation with
    `weight`, then the FIR filter with the padding that restores H factor samples. Away from
    the border this is FIR upsampling followed by a 'same' convolution with `weight`.

    Args:
        x: images [B, C_in, H, W].
        weight: convolution weight [C_out, C_in, k, k], k odd.
        kernel: FIR kernel [K, K] summing to factor**2.
        factor: upsampling factor.

    Returns:
        [B, C_out, H factor, W factor] (no bias added).
    """
    k = weight.shape[-1]
    # conv_transpose2d convolves; flipping and swapping in/out turns it into a correlation.
    x = F.conv_transpose2d(x, weight.transpose(0, 1).flip(2, 3), stride=factor)
    p = (kernel.shape[0] - factor) - (k - 1)
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, *,
                       factor: int = 2) -> torch.Tensor:
    """FIR blur at full resolution followed by a strided convolution (StyleGAN2's fused op).

    Args:
        x: images [B, C_in, H, W], H and W even.
        weight: convolution weight [C_out, C_in, k, k], k odd.
        kernel: FIR kernel [K, K] summing to 1.
        factor: downsampling factor.

    Returns:
        [B, C_out, H // factor, W // factor] (no bias added).
    """
    p = (kernel.shape[0] - factor) + (weight.shape[-1] - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)
