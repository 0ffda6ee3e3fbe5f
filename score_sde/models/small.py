"""Small score networks for toy problems: an MLP for vectors and a compact U-Net for images.

Both follow the conventions of `NCSNpp` (time input, null class label, zero-initialised output,
see `score_sde.models.layers`): forward(x, time_input, class_labels=None) returns a tensor shaped
like x that `score_sde.make_score_fn` turns into a score.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import check_int
from .layers import LabelEmbedding, TimeEmbedding, check_time_input, linear
from .ncsnpp import NCSNpp

__all__ = ["MLPScoreNet", "SmallUNet"]


class MLPScoreNet(nn.Module):
    """SiLU MLP for vector data [B, D], conditioned on time (and optionally a class label).

    The time features (`TimeEmbedding`) pass through Dense -> SiLU -> Dense; the result (plus
    the label embedding) is added, through its own Dense layer, to the pre-activation of every
    hidden layer, so the time dependence does not fade with depth. The output layer is zero at
    initialisation.

    Time input: "positional" embeds the value itself, so feed t scaled to [0, 999]
    (`make_score_fn(..., time_input="scaled_t")`) rather than t in [0, 1]; "fourier" embeds
    log(time_input), so feed a positive noise level (`time_input="std"`) or t > 0.

    Args:
        dim: data dimension D.
        hidden: width of the hidden layers and of the time embedding.
        num_layers: number of hidden layers (>= 1).
        time_embed_dim: number of sinusoidal features (random frequencies for "fourier").
        embedding_type: "positional" or "fourier".
        fourier_scale: standard deviation of the Fourier frequencies.
        num_classes: number of classes K for class conditioning; label K (or None) is null.
        linear_skip: add s(t) * x to the output, a time-dependent diagonal linear map of the
            input (zero at initialisation), so that the Gaussian-like part of a score (linear
            in x) need not pass through the hidden layers.

    Raises:
        ValueError: for non-positive sizes or an unknown embedding type.
    """

    def __init__(self, *, dim: int, hidden: int = 256, num_layers: int = 3,
                 time_embed_dim: int = 64, embedding_type: str = "positional",
                 fourier_scale: float = 16.0, num_classes: Optional[int] = None,
                 linear_skip: bool = True):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("hidden", hidden, minimum=1)
        check_int("num_layers", num_layers, minimum=1)
        check_int("time_embed_dim", time_embed_dim, minimum=2)
        if num_classes is not None:
            check_int("num_classes", num_classes, minimum=1)
        self.dim = dim
        self.embedding_type = embedding_type
        self.time_embed = TimeEmbedding(embedding_type, time_embed_dim,
                                        fourier_scale=fourier_scale)
        self.time_mlp = nn.Sequential(linear(self.time_embed.out_dim, hidden), nn.SiLU(),
                                      linear(hidden, hidden))
        self.label_embed = LabelEmbedding(num_classes, hidden) if num_classes else None
        self.layers = nn.ModuleList([linear(dim if i == 0 else hidden, hidden)
                                     for i in range(num_layers)])
        self.temb_proj = nn.ModuleList([linear(hidden, hidden) for _ in range(num_layers)])
        self.output = linear(hidden, dim, init_scale=0.0)
        # A time-dependent diagonal linear map of the input, zero at initialisation.
        self.skip = linear(hidden, dim, init_scale=0.0) if linear_skip else None

    def forward(self, x: torch.Tensor, time_input: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Evaluates the network.

        Args:
            x: vectors [B, D].
            time_input: [B] time or noise level (see the class docstring).
            class_labels: integer labels [B] in [0, num_classes], or None (null label).

        Returns:
            [B, D] in the parameters' dtype (the autocast dtype under autocast).

        Raises:
            ValueError: for badly shaped inputs, or labels given to a model without classes.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        if class_labels is not None and self.label_embed is None:
            raise ValueError("class_labels given, but the model was built without num_classes")
        check_time_input(x, time_input, self.embedding_type)
        temb = self.time_mlp(self.time_embed(time_input).to(self.output.weight.dtype))
        if self.label_embed is not None:
            temb = temb + self.label_embed(class_labels, x.shape[0])
        temb = F.silu(temb)
        h = x
        for layer, proj in zip(self.layers, self.temb_proj):
            h = F.silu(layer(h) + proj(temb))
        out = self.output(h)
        if self.skip is not None:
            out = out + self.skip(temb) * x
        return out


class SmallUNet(NCSNpp):
    """A compact DDPM-style U-Net for 28x28 or 32x32 images (MNIST-like data).

    `NCSNpp` with DDPM residual blocks, nearest/average-pool resampling with convolutions, no
    progressive paths and few channels: 28 -> 14 -> 7 with the default ch_mult (1, 2, 2).
    Conventions (time input, output, labels) are those of `NCSNpp`.

    Args:
        image_size: 28 or 32 (any size divisible by 2^(len(ch_mult) - 1)).
        in_channels: image channels.
        nf: base channel count (32 to 64 is typical).
        ch_mult: channel multipliers per resolution.
        num_res_blocks: residual blocks per resolution (1 or 2).
        attn_resolutions: resolutions with self-attention; None means the lowest one
            (7 for 28x28, 8 for 32x32).
        dropout: dropout probability.
        embedding_type: "positional" or "fourier" (see `NCSNpp`).
        fourier_scale: standard deviation of the Fourier frequencies.
        num_classes: number of classes for class conditioning (label K = null).
        centered: True for data in [-1, 1], False for [0, 1].
    """

    def __init__(self, *, image_size: int = 28, in_channels: int = 1, nf: int = 32,
                 ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Optional[Sequence[int]] = None, dropout: float = 0.1,
                 embedding_type: str = "positional", fourier_scale: float = 16.0,
                 num_classes: Optional[int] = None, centered: bool = True):
        if attn_resolutions is None:
            attn_resolutions = (image_size // 2 ** (len(tuple(ch_mult)) - 1),)
        super().__init__(image_size=image_size, in_channels=in_channels, nf=nf,
                         ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         attn_resolutions=attn_resolutions, dropout=dropout,
                         resamp_with_conv=True, resblock_type="ddpm", fir=False,
                         skip_rescale=True, init_scale=0.0, progressive="none",
                         progressive_input="none", embedding_type=embedding_type,
                         fourier_scale=fourier_scale, conditional=True,
                         num_classes=num_classes, centered=centered)
