"""Building blocks of the DDPM++ / NCSN++ score networks (Song et al. 2021, App. H).

Time embeddings (sinusoidal, Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B;
Gaussian Fourier features, Tancik et al. 2020, as used by NCSN++), the DDPM weight
initialisation, the two residual blocks (DDPM++ and BigGAN++, Brock et al. 2019), self-attention,
nearest/average-pool or FIR resampling (`fir.py`), and a label embedding for class-conditional
models. Every block takes and returns [B, C, H, W] tensors; conditioned blocks also take the
time embedding `temb` [B, temb_dim] (or None for unconditional networks).

Conventions shared by every network in `score_sde.models`:
- GroupNorm with min(C // 4, 32) groups and eps 1e-6; SiLU ("swish") activations.
- With `skip_rescale`, residual sums are divided by sqrt(2) (Song et al. 2021, App. H).
- `init_scale` = 0 gives exactly zero weights: residual branches and the output layer start
  switched off. The reference replaces 0 by 1e-10 (its JAX-style initialiser rejects 0),
  which only changes weights of order 1e-5 that the first optimiser step overwrites.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import check_choice, value_checks_wanted
from . import fir as fir_ops

__all__ = ["default_init_", "conv3x3", "conv1x1", "linear", "group_norm", "TimeEmbedding",
           "LabelEmbedding", "residual_sum", "Upsample", "Downsample", "ResnetBlockDDPMpp",
           "ResnetBlockBigGANpp", "AttnBlockpp", "Combine", "EMBEDDINGS", "check_time_input"]

EMBEDDINGS = ("positional", "fourier")
_SQRT_HALF = 1.0 / math.sqrt(2.0)


def default_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM initialisation, in place: variance scaling with fan_avg and a uniform distribution.

    Weights are U(-a, a) with a = sqrt(3 scale / fan_avg), fan_avg = (fan_in + fan_out) / 2 for
    PyTorch's [out, in, *kernel] layout; `scale` = 0 gives zeros (see the module docstring).
    """
    if scale == 0:
        return nn.init.zeros_(weight)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2))
    return nn.init.uniform_(weight, -bound, bound)


def _conv(in_ch, out_ch, kernel_size, *, stride=1, padding=0, bias=True, init_scale=1.0):
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, padding: int = 1, bias: bool = True,
            init_scale: float = 1.0) -> nn.Conv2d:
    """3x3 convolution with the DDPM initialisation and zero bias."""
    return _conv(in_ch, out_ch, 3, stride=stride, padding=padding, bias=bias,
                 init_scale=init_scale)


def conv1x1(in_ch: int, out_ch: int, *, bias: bool = True, init_scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution (DDPM's "NIN" layer) with the DDPM initialisation and zero bias."""
    return _conv(in_ch, out_ch, 1, bias=bias, init_scale=init_scale)


def linear(in_dim: int, out_dim: int, *, init_scale: float = 1.0) -> nn.Linear:
    """Dense layer with the DDPM initialisation and zero bias."""
    layer = nn.Linear(in_dim, out_dim)
    default_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(channels // 4, 32) groups, eps 1e-6 (Song et al. 2021)."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups:
        # Every width a network normalises is a sum of multiples of its base width nf (levels
        # and the skips concatenated to them); multiples of 32 always divide.
        raise ValueError(f"a layer of {channels} channels cannot take GroupNorm's "
                         f"min(channels // 4, 32) = {groups} groups: the base width nf times "
                         f"ch_mult (and the skip concatenations) must give widths those groups "
                         f"divide; choose nf a multiple of 32 (e.g. 64 or 128)")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


def residual_sum(x: torch.Tensor, h: torch.Tensor, *, skip_rescale: bool) -> torch.Tensor:
    """x + h, divided by sqrt(2) when `skip_rescale` (keeps the variance of two unit signals)."""
    return (x + h) * _SQRT_HALF if skip_rescale else x + h


def check_time_input(x: torch.Tensor, time_input: torch.Tensor, embedding: str) -> None:
    """Raises ValueError unless `time_input` is a [B] tensor usable by the `embedding`."""
    if not isinstance(time_input, torch.Tensor) or time_input.shape != (x.shape[0],):
        got = (tuple(time_input.shape) if isinstance(time_input, torch.Tensor)
               else type(time_input).__name__)
        raise ValueError(f"time_input must have shape [B]=({x.shape[0]},) to match x of shape "
                         f"{tuple(x.shape)}, got {got}")
    if embedding == "fourier" and not time_input.is_floating_point():
        raise ValueError(f"the fourier embedding needs a positive floating-point time_input "
                         f"(a noise level), got dtype {time_input.dtype}")


class TimeEmbedding(nn.Module):
    """Features of the network's time input c [B] (the conditioning value the caller chose).

    - "positional": the Transformer/DDPM sinusoidal embedding of c itself (Ho et al. 2020),
      frequencies 10000^(-i / (dim/2 - 1)); meant for t scaled to [0, 999] or step indices.
    - "fourier": Gaussian Fourier features of log(c) (NCSN++, Song et al. 2021, App. H), with
      `dim` fixed random frequencies w ~ N(0, fourier_scale^2): [sin(2 pi w log c),
      cos(2 pi w log c)]. Meant for the noise level c = sigma > 0; c <= 0 gives NaN/inf.

    Features are computed in at least float32, even under autocast.

    Args:
        embedding: "positional" or "fourier".
        dim: number of sinusoidal features, or of random frequencies for "fourier".
        fourier_scale: standard deviation of the Fourier frequencies.

    Attributes:
        out_dim: feature size, `dim` for "positional" and 2 `dim` for "fourier".
    """

    def __init__(self, embedding: str, dim: int, *, fourier_scale: float = 16.0):
        super().__init__()
        check_choice("embedding_type", embedding, EMBEDDINGS)
        self.embedding = embedding
        self.dim = dim
        if embedding == "fourier":
            # Fixed, not trained: a buffer, so optimisers and parameter counts ignore it.
            self.register_buffer("freqs", torch.randn(dim) * fourier_scale)
            self.out_dim = 2 * dim
        else:
            half = dim // 2
            exponent = torch.arange(half, dtype=torch.float64) / max(half - 1, 1)
            self.register_buffer("freqs", torch.exp(-math.log(10000.0) * exponent).float(),
                                 persistent=False)
            self.out_dim = dim

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """Maps c [B] to features [B, out_dim] (float32, or float64 for float64 input)."""
        c = c.to(torch.promote_types(c.dtype, torch.float32)) if c.is_floating_point() \
            else c.float()
        if self.embedding == "fourier":
            arg = torch.log(c)[:, None] * (2 * math.pi) * self.freqs.to(c.dtype)
        elif c.dtype == torch.float64:  # the float32 buffer's rounding would show (1e-5)
            half = self.freqs.numel()
            exponent = torch.arange(half, device=c.device, dtype=c.dtype) / max(half - 1, 1)
            arg = c[:, None] * torch.exp(-math.log(10000.0) * exponent)
        else:
            arg = c[:, None] * self.freqs.to(c.dtype)
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
        return F.pad(emb, (0, self.out_dim - emb.shape[1]))


class LabelEmbedding(nn.Module):
    """Learned class embedding with a null label for classifier-free guidance (Ho & Salimans
    2022): labels 0 .. num_classes - 1 are classes, label `num_classes` means "no label".

    Args:
        num_classes: number of classes K; the table has K + 1 rows.
        dim: embedding size (that of the time embedding it is added to).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """Embeds integer labels [B] (None: all null) as [B, dim].

        Raises:
            ValueError: for labels that are not an integer tensor of shape [batch].
        """
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long,
                                device=self.table.weight.device)
        elif (not isinstance(labels, torch.Tensor) or labels.shape != (batch,)
              or labels.is_floating_point() or labels.dtype == torch.bool):
            got = (f"dtype {labels.dtype} and shape {tuple(labels.shape)}"
                   if isinstance(labels, torch.Tensor) else type(labels).__name__)
            raise ValueError(f"class_labels must be an integer tensor of shape [B]=({batch},) "
                             f"with values in [0, {self.num_classes}], got {got}")
        elif (not torch.compiler.is_compiling() and value_checks_wanted(labels)
              and bool(((labels < 0) | (labels > self.num_classes)).any())):
            # Out of range, the lookup fails without naming the labels (on CUDA, as a device
            # assert that ends the process's use of the GPU).
            bad = labels[(labels < 0) | (labels > self.num_classes)][0]
            raise ValueError(f"class_labels must lie in [0, {self.num_classes}] (num_classes "
                             f"is the null label), got {int(bad)}")
        return self.table(labels)


class _Resample(nn.Module):
    """Shared constructor of `Upsample` and `Downsample`; `up` is set by the subclass."""

    up: bool

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, *, with_conv: bool = False,
                 fir: bool = False, fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if out_ch != in_ch and not with_conv:
            raise ValueError(f"out_ch={out_ch} != in_ch={in_ch} needs with_conv=True")
        self.fir = fir
        self.conv = None
        if fir:
            # Zero insertion divides the mean by 4, so the upsampling kernel sums to 4.
            self.register_buffer("kernel", fir_ops.fir_kernel(fir_kernel, gain=4.0 if self.up
                                                              else 1.0), persistent=False)
            if with_conv:
                # Holds the weight and bias only; the fused FIR operation applies them.
                self.conv = _conv(in_ch, out_ch, 3)
        elif with_conv:
            self.conv = (conv3x3(in_ch, out_ch) if self.up
                         else conv3x3(in_ch, out_ch, stride=2, padding=0))

    def _fused(self, op, x: torch.Tensor) -> torch.Tensor:
        x = op(x, self.conv.weight, self.kernel)
        return x + self.conv.bias.to(x.dtype)[:, None, None]


class Upsample(_Resample):
    """2x upsampling [B, in_ch, H, W] -> [B, out_ch, 2H, 2W].

    Nearest neighbour (then an optional 3x3 convolution, DDPM), or FIR upsampling with
    `fir_kernel` (with a convolution: StyleGAN2's fused upsample-convolution).

    Args:
        in_ch: input channels.
        out_ch: output channels (default in_ch; may differ only with `with_conv`).
        with_conv: apply a learned convolution.
        fir: use the FIR filter instead of nearest neighbour.
        fir_kernel: one-dimensional FIR taps.
    """

    up = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            return x if self.conv is None else self.conv(x)
        if self.conv is None:
            return fir_ops.upsample_2d(x, self.kernel)
        return self._fused(fir_ops.upsample_conv_2d, x)


class Downsample(_Resample):
    """2x downsampling [B, in_ch, H, W] -> [B, out_ch, H // 2, W // 2] (H, W even).

    Average pooling or a stride-2 3x3 convolution (DDPM, padding only bottom/right, as
    TensorFlow's 'SAME'), or FIR downsampling with `fir_kernel` (with a convolution: blur then
    stride-2 convolution, StyleGAN2).

    Args:
        in_ch: input channels.
        out_ch: output channels (default in_ch; may differ only with `with_conv`).
        with_conv: apply a learned convolution.
        fir: use the FIR filter instead of average pooling.
        fir_kernel: one-dimensional FIR taps.
    """

    up = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            if self.conv is None:
                return F.avg_pool2d(x, 2)
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        if self.conv is None:
            return fir_ops.downsample_2d(x, self.kernel)
        return self._fused(fir_ops.conv_downsample_2d, x)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block with the DDPM++ changes (Song et al. 2021, App. H).

    GroupNorm, SiLU, 3x3 conv, + Dense(SiLU(temb)), GroupNorm, SiLU, dropout, 3x3 conv
    (initialised with `init_scale`), added to the input (through a 1x1 conv when the channel
    count changes) and rescaled by 1/sqrt(2) when `skip_rescale`.

    Args:
        in_ch: input channels.
        out_ch: output channels (default in_ch).
        temb_dim: time-embedding size, or None for an unconditional block.
        dropout: dropout probability.
        skip_rescale: divide the residual sum by sqrt(2).
        init_scale: initialisation scale of the last convolution.
    """

    # The DDPM "NIN" shortcut uses init scale 0.1; BigGAN++ uses a plain 1x1 convolution.
    shortcut_init_scale = 0.1

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, *,
                 temb_dim: Optional[int] = None, dropout: float = 0.1,
                 skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.skip_rescale = skip_rescale
        self.norm_0 = group_norm(in_ch)
        self.conv_0 = conv3x3(in_ch, out_ch)
        self.dense = linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm_1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.shortcut = (conv1x1(in_ch, out_ch, init_scale=self.shortcut_init_scale)
                         if in_ch != out_ch else nn.Identity())

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, in_ch, H, W], temb [B, temb_dim] or None -> [B, out_ch, H', W']."""
        h = F.silu(self.norm_0(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv_0(h)
        if self.dense is not None:
            h = h + self.dense(F.silu(temb))[:, :, None, None]
        h = self.conv_1(self.dropout(F.silu(self.norm_1(h))))
        return residual_sum(self.shortcut(x), h, skip_rescale=self.skip_rescale)


class ResnetBlockBigGANpp(ResnetBlockDDPMpp):
    """BigGAN-style residual block (Brock et al. 2019) as in NCSN++/DDPM++ (Song et al. 2021).

    The DDPM++ block, but 2x up- or downsampling (nearest/average pool, or FIR) happens inside
    the block on both branches, right after the first activation, and the shortcut is a 1x1
    convolution whenever the shape changes.

    Args:
        in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale: as `ResnetBlockDDPMpp`.
        up: upsample by 2.
        down: downsample by 2.
        fir: resample with the FIR filter `fir_kernel`.
        fir_kernel: one-dimensional FIR taps.
    """

    shortcut_init_scale = 1.0

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, *,
                 temb_dim: Optional[int] = None, dropout: float = 0.1,
                 skip_rescale: bool = True, init_scale: float = 0.0, up: bool = False,
                 down: bool = False, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        if up and down:
            raise ValueError("a block cannot both upsample and downsample (up=down=True)")
        super().__init__(in_ch, out_ch, temb_dim=temb_dim, dropout=dropout,
                         skip_rescale=skip_rescale, init_scale=init_scale)
        if up or down:
            resample = Upsample if up else Downsample
            self.resample = resample(in_ch, fir=fir, fir_kernel=fir_kernel)
            if isinstance(self.shortcut, nn.Identity):
                self.shortcut = conv1x1(in_ch, in_ch, init_scale=self.shortcut_init_scale)
        else:
            self.resample = nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all pixels, DDPM's block with the DDPM++ skip rescale.

    GroupNorm, 1x1 projections to q, k, v, softmax(q k^T / sqrt(C)) v, a 1x1 output projection
    initialised with `init_scale`, added to the input (and divided by sqrt(2)).

    Args:
        channels: C.
        skip_rescale: divide the residual sum by sqrt(2).
        init_scale: initialisation scale of the output projection.
    """

    def __init__(self, channels: int, *, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = group_norm(channels)
        # q, k and v in one convolution, each initialised as its own C x C layer (scale 0.1,
        # DDPM's NIN default).
        self.qkv = conv1x1(channels, 3 * channels)
        for w in self.qkv.weight.data.chunk(3):
            default_init_(w, 0.1)
        self.proj = conv1x1(channels, channels, init_scale=init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, height * width).transpose(2, 3)
        q, k, v = qkv.unbind(1)  # each [B, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.transpose(1, 2).reshape(b, c, height, width))
        return residual_sum(x, h, skip_rescale=self.skip_rescale)


class Combine(nn.Module):
    """Merges a skip input y [B, dim1, H, W] into h [B, dim2, H, W] (NCSN++ "input_skip").

    y goes through a 1x1 convolution to dim2 channels and is then added to h ("sum") or
    concatenated with it ("cat": [conv(y), h], 2 dim2 channels).
    """

    def __init__(self, dim1: int, dim2: int, *, method: str = "sum"):
        super().__init__()
        check_choice("progressive_combine", method, ("sum", "cat"))
        self.method = method
        self.conv = conv1x1(dim1, dim2)

    def forward(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        y = self.conv(y)
        return y + h if self.method == "sum" else torch.cat([y, h], dim=1)
