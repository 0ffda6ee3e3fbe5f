"""NCSN++ and DDPM++, the U-Net score networks of Song et al. 2021, App. H.

One class covers both: DDPM++ is NCSNpp with BigGAN residual blocks, no FIR, no progressive
paths and the sinusoidal time embedding; NCSN++ adds FIR resampling (StyleGAN2), a progressive
input path and Gaussian Fourier features of the noise level. `paper_config` returns the
arguments of the four CIFAR-10 models of the paper, whose parameter counts the tests check.

The network is a plain function of (x, time input, class labels): it never converts its
output into a score. Which time input and output convention a model was trained with is the
caller's choice, stated once in `score_sde.make_score_fn` (see `NCSNpp`).
"""
import copy
import math
import numbers
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import append_dims, check_choice, check_int
from .layers import (AttnBlockpp, Combine, Downsample, LabelEmbedding, ResnetBlockBigGANpp,
                     ResnetBlockDDPMpp, TimeEmbedding, Upsample, EMBEDDINGS, check_time_input,
                     conv3x3, group_norm, linear, residual_sum)

__all__ = ["NCSNpp", "paper_config", "PAPER_CONFIGS", "RESBLOCKS", "PROGRESSIVE",
           "PROGRESSIVE_INPUT"]

RESBLOCKS = {"ddpm": ResnetBlockDDPMpp, "biggan": ResnetBlockBigGANpp}
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net (Song et al. 2021, App. H), with optional class conditioning.

    Encoder: a 3x3 input convolution, then per resolution `num_res_blocks` residual blocks
    (self-attention after each at `attn_resolutions`) and a downsampling step (a BigGAN block
    with down=True, or a `Downsample` for DDPM blocks). Middle: block, attention, block.
    Decoder: per resolution `num_res_blocks + 1` blocks, each reading a concatenated encoder
    activation, attention once at `attn_resolutions`, then upsampling. Output: GroupNorm,
    SiLU, 3x3 convolution initialised with `init_scale` (with init_scale = 0 the output is
    exactly zero at initialisation).

    Progressive paths (NCSN++): `progressive_input` feeds downsampled copies of the input to
    every resolution ("input_skip": FIR/avg-pool and a 1x1 conv combined by `progressive_combine`;
    "residual": a resampling convolution and a residual sum); `progressive` builds the output
    as a sum over resolutions ("output_skip") or a residual upsampling path ("residual").

    Time input. The network embeds `time_input` [B] as given:
    - embedding_type="positional": sinusoidal features of the value itself, designed for
      t (num_steps - 1) = 999 t (the reference's continuous VP/sub-VP models) or a step index;
    - embedding_type="fourier": Fourier features of log(time_input), so the input must be a
      positive noise level sigma (the reference's VE models). Zero gives NaN.

    Output. Whatever the loss trained it to be; the reference conventions are, with
    `score_sde.make_score_fn`:
    - VP / sub-VP (DDPM++): noise prediction, `prediction="noise", time_input="scaled_t"`,
      score = -output / sigma(t);
    - VE (NCSN++): the reference divides the output by sigma inside the network
      (`scale_by_sigma`) and calls it the score. By default this class does not: train it
      with `prediction="noise", time_input="std"`, which gives score = -output / sigma, the
      same model up to the sign of the output layer. With `scale_by_sigma=True` it divides
      its output by its time input, as the reference does; use it with
      `prediction="score", time_input="sigma"` (how `score_sde.convert` loads the
      reference's VE checkpoints).

    Args:
        image_size: training resolution; places attention (`attn_resolutions`). Inputs of
            other sizes work when divisible by 2^(len(ch_mult) - 1).
        in_channels: image channels (also output channels).
        nf: base channel count; level i has nf ch_mult[i] channels, the time embedding 4 nf.
        ch_mult: channel multipliers, one per resolution.
        num_res_blocks: residual blocks per resolution in the encoder (decoder: one more).
        attn_resolutions: resolutions (image side) with self-attention.
        dropout: dropout probability inside the residual blocks.
        resamp_with_conv: learned convolution in `Upsample`/`Downsample` (DDPM blocks only).
        resblock_type: "biggan" (resampling inside the blocks) or "ddpm".
        fir: FIR resampling with `fir_kernel` instead of nearest/average pooling.
        fir_kernel: one-dimensional FIR taps.
        skip_rescale: divide residual sums by sqrt(2).
        init_scale: initialisation scale of the last convolution of every residual branch
            and of the output layer (0 = zero initialisation, as the reference configs).
        progressive: "none", "output_skip" or "residual".
        progressive_input: "none", "input_skip" or "residual".
        progressive_combine: "sum" or "cat" (for "input_skip").
        embedding_type: "positional" or "fourier" (see Time input).
        fourier_scale: standard deviation of the Fourier frequencies.
        conditional: use the time input; False gives an unconditional denoiser.
        num_classes: number of classes K for class conditioning (a learned embedding added to
            the time embedding); label K, or `class_labels=None`, is the null label.
        centered: True for data in [-1, 1]; False for data in [0, 1], which the network maps
            to 2 x - 1 first (the reference's VE CIFAR-10 models).
        scale_by_sigma: divide the output by the time input, the noise level sigma (the
            reference's VE models); needs the "fourier" embedding, whose input is sigma.

    Raises:
        ValueError: for unknown option names, non-positive sizes, an image size not divisible
            by 2^(len(ch_mult) - 1), num_classes without conditional, or scale_by_sigma
            without the fourier embedding.
    """

    def __init__(self, *, image_size: int = 32, in_channels: int = 3, nf: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 resamp_with_conv: bool = True, resblock_type: str = "biggan", fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0, progressive: str = "none",
                 progressive_input: str = "none", progressive_combine: str = "sum",
                 embedding_type: str = "positional", fourier_scale: float = 16.0,
                 conditional: bool = True, num_classes: Optional[int] = None,
                 centered: bool = True, scale_by_sigma: bool = False):
        super().__init__()
        check_int("image_size", image_size, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        check_int("nf", nf, minimum=4)
        check_int("num_res_blocks", num_res_blocks, minimum=1)
        # NumPy scalars and arrays are welcome; the network keeps Python numbers.
        ch_mult = tuple(ch_mult)
        if not ch_mult or not all(_is_int(m) and m >= 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, "
                             f"got {ch_mult!r}")
        ch_mult = tuple(int(m) for m in ch_mult)
        if not (_is_real(dropout) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if (isinstance(attn_resolutions, (str, bytes)) or not hasattr(attn_resolutions, "__iter__")
                or not all(_is_int(r) for r in attn_resolutions)):
            raise ValueError(f"attn_resolutions must be a sequence of ints (image sides), e.g. "
                             f"(16,), got {attn_resolutions!r}")
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if not (_is_real(init_scale) and 0 <= init_scale < math.inf):
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale!r}")
        if not (_is_real(fourier_scale) and 0 < fourier_scale < math.inf):
            raise ValueError(f"fourier_scale must be a finite number > 0, got {fourier_scale!r}")
        dropout, init_scale, fourier_scale = float(dropout), float(init_scale), float(fourier_scale)
        check_choice("resblock_type", resblock_type, RESBLOCKS)
        check_choice("progressive", progressive, PROGRESSIVE)
        check_choice("progressive_input", progressive_input, PROGRESSIVE_INPUT)
        check_choice("progressive_combine", progressive_combine, ("sum", "cat"))
        check_choice("embedding_type", embedding_type, EMBEDDINGS)
        self.num_levels = num_levels = len(ch_mult)
        self.size_multiple = 2 ** (num_levels - 1)
        if image_size % self.size_multiple:
            raise ValueError(f"image_size must be divisible by 2^(len(ch_mult) - 1) = "
                             f"{self.size_multiple}, got {image_size}")
        if num_classes is not None:
            check_int("num_classes", num_classes, minimum=1)
            if not conditional:
                raise ValueError("num_classes needs conditional=True (the label embedding is "
                                 "added to the time embedding)")
        if scale_by_sigma and not (conditional and embedding_type == "fourier"):
            raise ValueError(f"scale_by_sigma divides by the noise level, the time input of the "
                             f"fourier embedding; it needs conditional=True and "
                             f"embedding_type='fourier', got conditional={conditional}, "
                             f"embedding_type={embedding_type!r}")
        self.in_channels = in_channels
        self.scale_by_sigma = scale_by_sigma
        self.embedding_type = embedding_type
        self.conditional = conditional
        self.centered = centered
        self.skip_rescale = skip_rescale
        self.resblock_type = resblock_type
        self.progressive = progressive
        self.progressive_input = progressive_input
        resolutions = [image_size // 2 ** i for i in range(num_levels)]
        temb_dim = 4 * nf if conditional else None
        resample_opts = dict(fir=fir, fir_kernel=tuple(fir_kernel))

        # Time (and label) embedding: features -> Dense -> SiLU -> Dense, 4 nf wide.
        self.time_embed = self.time_mlp = self.label_embed = None
        if conditional:
            self.time_embed = TimeEmbedding(embedding_type, nf, fourier_scale=fourier_scale)
            self.time_mlp = nn.Sequential(linear(self.time_embed.out_dim, temb_dim), nn.SiLU(),
                                          linear(temb_dim, temb_dim))
            if num_classes is not None:
                self.label_embed = LabelEmbedding(num_classes, temb_dim)

        def resblock(in_ch, out_ch=None, **resample):
            opts = dict(temb_dim=temb_dim, dropout=dropout, skip_rescale=skip_rescale,
                        init_scale=init_scale)
            if resblock_type == "biggan":
                opts.update(resample_opts, **resample)
            return RESBLOCKS[resblock_type](in_ch, out_ch, **opts)

        def attention(ch):
            return AttnBlockpp(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        def resample(ch, direction):
            if resblock_type == "biggan":
                return resblock(ch, **{direction: True})
            layer = Upsample if direction == "up" else Downsample
            return layer(ch, with_conv=resamp_with_conv, **resample_opts)

        # Encoder.
        self.conv_in = conv3x3(in_channels, nf)
        skip_chs = [nf]
        ch, pyramid_ch = nf, in_channels
        self.down_levels = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.ModuleDict({"blocks": nn.ModuleList(), "attns": nn.ModuleList()})
            for _ in range(num_res_blocks):
                level["blocks"].append(resblock(ch, nf * mult))
                ch = nf * mult
                level["attns"].append(attention(ch) if resolutions[i] in attn_resolutions
                                      else nn.Identity())
                skip_chs.append(ch)
            if i < num_levels - 1:
                level["down"] = resample(ch, "down")
                if progressive_input == "input_skip":
                    level["pyramid_down"] = Downsample(in_channels, **resample_opts)
                    level["combine"] = Combine(in_channels, ch, method=progressive_combine)
                    ch = 2 * ch if progressive_combine == "cat" else ch
                elif progressive_input == "residual":
                    level["pyramid_down"] = Downsample(pyramid_ch, ch, with_conv=True,
                                                       **resample_opts)
                    pyramid_ch = ch
                skip_chs.append(ch)
            self.down_levels.append(level)

        self.mid = nn.ModuleList([resblock(ch), attention(ch), resblock(ch)])

        # Decoder, lowest resolution first.
        self.up_levels = nn.ModuleList()
        for i in reversed(range(num_levels)):
            level = nn.ModuleDict({"blocks": nn.ModuleList()})
            for _ in range(num_res_blocks + 1):
                level["blocks"].append(resblock(ch + skip_chs.pop(), nf * ch_mult[i]))
                ch = nf * ch_mult[i]
            if resolutions[i] in attn_resolutions:
                level["attn"] = attention(ch)
            top = i == num_levels - 1
            if progressive == "output_skip":
                if not top:
                    level["pyramid_up"] = Upsample(in_channels, **resample_opts)
                level["pyramid_norm"] = group_norm(ch)
                level["pyramid_conv"] = conv3x3(ch, in_channels, init_scale=init_scale)
            elif progressive == "residual":
                if top:
                    level["pyramid_norm"] = group_norm(ch)
                    level["pyramid_conv"] = conv3x3(ch, ch)
                else:
                    level["pyramid_up"] = Upsample(pyramid_ch, ch, with_conv=True,
                                                   **resample_opts)
                pyramid_ch = ch
            if i > 0:
                level["up"] = resample(ch, "up")
            self.up_levels.append(level)
        assert not skip_chs

        self.norm_out = self.conv_out = None
        if progressive != "output_skip":
            self.norm_out = group_norm(ch)
            self.conv_out = conv3x3(ch, in_channels, init_scale=init_scale)

    def _resample(self, layer: nn.Module, h: torch.Tensor, temb) -> torch.Tensor:
        return layer(h, temb) if self.resblock_type == "biggan" else layer(h)

    def forward(self, x: torch.Tensor, time_input: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Evaluates the network.

        Args:
            x: images [B, in_channels, H, W], H and W divisible by 2^(len(ch_mult) - 1).
            time_input: [B] time or noise level (see the class docstring); integer step
                indices are accepted by the positional embedding.
            class_labels: integer labels [B] in [0, num_classes] (num_classes = null label),
                or None (all null). Only for models built with `num_classes`.

        Returns:
            Tensor shaped like x, in the parameters' dtype (the autocast dtype under autocast).

        Raises:
            ValueError: for badly shaped inputs, or labels given to a model without classes.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels \
                or x.shape[2] % self.size_multiple or x.shape[3] % self.size_multiple:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W] with H and W "
                             f"divisible by {self.size_multiple}, got {tuple(x.shape)}")
        if class_labels is not None and self.label_embed is None:
            raise ValueError("class_labels given, but the model was built without num_classes")
        temb = None
        if self.conditional:
            check_time_input(x, time_input, self.embedding_type)
            emb = self.time_embed(time_input).to(self.time_mlp[0].weight.dtype)
            temb = self.time_mlp(emb)
            if self.label_embed is not None:
                temb = temb + self.label_embed(class_labels, x.shape[0])
        if not self.centered:
            x = 2 * x - 1

        # Encoder; `hs` keeps every activation the decoder reads back.
        pyramid = x
        hs = [self.conv_in(x)]
        for level in self.down_levels:
            h = hs[-1]
            for block, attn in zip(level["blocks"], level["attns"]):
                h = attn(block(h, temb))
                hs.append(h)
            if "down" not in level:
                continue
            h = self._resample(level["down"], h, temb)
            if self.progressive_input == "input_skip":
                pyramid = level["pyramid_down"](pyramid)
                h = level["combine"](pyramid, h)
            elif self.progressive_input == "residual":
                pyramid = residual_sum(level["pyramid_down"](pyramid), h,
                                       skip_rescale=self.skip_rescale)
                h = pyramid
            hs.append(h)

        block_0, attn, block_1 = self.mid
        h = block_1(attn(block_0(h, temb)), temb)

        # Decoder.
        pyramid = None
        for level in self.up_levels:
            for block in level["blocks"]:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if "attn" in level:
                h = level["attn"](h)
            if self.progressive == "output_skip":
                out = level["pyramid_conv"](F.silu(level["pyramid_norm"](h)))
                pyramid = out if pyramid is None else level["pyramid_up"](pyramid) + out
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = level["pyramid_conv"](F.silu(level["pyramid_norm"](h)))
                else:
                    pyramid = residual_sum(level["pyramid_up"](pyramid), h,
                                           skip_rescale=self.skip_rescale)
                    h = pyramid
            if "up" in level:
                h = self._resample(level["up"], h, temb)

        out = pyramid if self.progressive == "output_skip" \
            else self.conv_out(F.silu(self.norm_out(h)))
        if self.scale_by_sigma:
            out = (out / append_dims(time_input, out.ndim)).to(out.dtype)
        return out


_CIFAR10 = dict(image_size=32, in_channels=3, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,
                attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
                resblock_type="biggan", fir_kernel=(1, 3, 3, 1), skip_rescale=True,
                init_scale=0.0, progressive="none", progressive_combine="sum",
                fourier_scale=16.0, conditional=True)
# DDPM++ cont.: score_sde_pytorch configs/vp/cifar10_ddpmpp_continuous.py (data in [-1, 1]).
_DDPMPP = dict(_CIFAR10, fir=False, progressive_input="none", embedding_type="positional",
               centered=True)
# NCSN++ cont.: configs/ve/cifar10_ncsnpp_continuous.py; the VE models read data in [0, 1]
# (the default data.centered=False), for which sigma_max = 50 was chosen.
_NCSNPP = dict(_CIFAR10, fir=True, progressive_input="residual", embedding_type="fourier",
               centered=False)

# Keyword arguments of the CIFAR-10 models of Song et al. 2021 (Table 3 / App. H), with the
# parameter counts the paper reports.
PAPER_CONFIGS: Dict[str, Dict[str, Any]] = {
    "ddpmpp_cont": _DDPMPP,                                # 61.8M
    "ncsnpp_cont": _NCSNPP,                                # 62.8M
    "ddpmpp_deep": dict(_DDPMPP, num_res_blocks=8),        # 106.6M
    "ncsnpp_deep": dict(_NCSNPP, num_res_blocks=8),        # 107.6M
}


def paper_config(name: str) -> Dict[str, Any]:
    """Keyword arguments of `NCSNpp` for one of the paper's CIFAR-10 models.

    Args:
        name: "ddpmpp_cont" (VP / sub-VP, 61.8M parameters), "ncsnpp_cont" (VE, 62.8M),
            "ddpmpp_deep" (106.6M) or "ncsnpp_deep" (107.6M).

    Returns:
        A fresh dict; `NCSNpp(**paper_config(name))` builds the model.

    Raises:
        ValueError: for an unknown name.
    """
    check_choice("paper config", name, PAPER_CONFIGS)
    return copy.deepcopy(PAPER_CONFIGS[name])
