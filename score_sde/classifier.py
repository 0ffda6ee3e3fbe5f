"""Image classifiers: noise-conditional ones for classifier guidance, clean ones for metrics.

- `NoiseConditionalClassifier` models p_t(y | x_t) on the perturbed data x_t = alpha(t) x +
  sigma(t) z of an SDE. Its gradient grad_x log p_t(y | x) added to the unconditional score is
  the conditional score of class-conditional sampling (Song et al. 2021, Sec. 5 and App. I.1,
  Eq. 48; Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Sec. 4).
  Song et al. use a Wide-ResNet conditioned on the noise level; this is a compact equivalent:
  the downsampling half of a DDPM-style U-Net (the blocks of `score_sde.models.layers`, time
  embedding added in every residual block), global average pooling and a linear head. It is
  trained by `noisy_classifier_loss`, cross-entropy on x_t at t ~ U(eps, T), and read through
  `classifier_log_prob_fn` with the same time-input conventions as the score networks
  (`score_sde.score.TIME_INPUTS`).
- `FeatureClassifier` is a small CNN for clean 28x28 / 32x32 images whose penultimate
  activations (`features`) define the "classifier Fréchet distance" of `score_sde.metrics`.
  That number is specific to the network and must not be called FID.

`save_classifier` / `load_classifier` store a classifier with its constructor arguments in
the atomic, checksummed format of `score_sde.checkpoint`, so it can be rebuilt by name.
"""
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import (append_dims, check_batch_time, check_choice, check_int, check_time_range,
                     float64_like)
from .checkpoint import read_checkpoint, save_checkpoint
from .checks import check_eps
from .models.layers import (EMBEDDINGS, Downsample, ResnetBlockDDPMpp, TimeEmbedding,
                            check_time_input, conv3x3, group_norm, linear)
from .score import time_input_fn
from .sde import SDE

__all__ = ["NoiseConditionalClassifier", "FeatureClassifier", "CLASSIFIERS",
           "classifier_log_prob_fn", "noisy_classifier_loss", "save_classifier",
           "load_classifier"]

LogProbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_FORMAT = "score_sde-classifier-v1"


def _check_sizes(ch_mult: Sequence[int]) -> Tuple[int, ...]:
    ch_mult = tuple(ch_mult)
    if not ch_mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                              for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got "
                         f"{ch_mult!r}")
    return ch_mult


def _check_images(x: torch.Tensor, in_channels: int, multiple: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != in_channels \
            or x.shape[2] % multiple or x.shape[3] % multiple or not x.is_floating_point():
        got = (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"x must be a floating tensor [B, {in_channels}, H, W] with H and W "
                         f"divisible by {multiple}, got {got}")


class NoiseConditionalClassifier(nn.Module):
    """Time-dependent classifier logits(x_t, time input) for classifier guidance.

    Input convolution, then per resolution `num_res_blocks` DDPM++ residual blocks that add
    the time embedding (sinusoidal or Fourier features -> Dense -> SiLU -> Dense, 4 nf wide,
    as `score_sde.models.NCSNpp`) and a stride-2 convolution between resolutions; then
    GroupNorm, SiLU, global average pooling and a linear layer. The GroupNorms absorb the
    growing scale of x_t, so inputs need no rescaling even for the VE SDE.

    Time input: as the score networks (see `NCSNpp`): "positional" embeds the value itself
    (feed 999 t, `time_input="scaled_t"`), "fourier" embeds log(value) (feed the noise level,
    `time_input="std"`). `classifier_log_prob_fn` does the conversion from t.

    Args:
        image_size: training resolution (checked to be divisible by 2^(len(ch_mult) - 1)).
        in_channels: image channels.
        num_classes: number of classes K.
        nf: base channel count; level i has nf ch_mult[i] channels.
        ch_mult: channel multipliers, one per resolution.
        num_res_blocks: residual blocks per resolution.
        dropout: dropout probability inside the residual blocks.
        embedding_type: "positional" or "fourier".
        fourier_scale: standard deviation of the Fourier frequencies.

    Attributes:
        config: the constructor's keyword arguments (used by `save_classifier`).

    Raises:
        ValueError: non-positive sizes, an unknown embedding, or an image size that the
            downsampling cannot halve.
    """

    def __init__(self, *, image_size: int = 28, in_channels: int = 1, num_classes: int = 10,
                 nf: int = 32, ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 dropout: float = 0.0, embedding_type: str = "positional",
                 fourier_scale: float = 16.0):
        super().__init__()
        check_int("image_size", image_size, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("nf", nf, minimum=4)
        check_int("num_res_blocks", num_res_blocks, minimum=1)
        ch_mult = _check_sizes(ch_mult)
        check_choice("embedding_type", embedding_type, EMBEDDINGS)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.size_multiple = 2 ** (len(ch_mult) - 1)
        if image_size % self.size_multiple:
            raise ValueError(f"image_size must be divisible by 2^(len(ch_mult) - 1) = "
                             f"{self.size_multiple}, got {image_size}")
        self.config = dict(image_size=image_size, in_channels=in_channels,
                           num_classes=num_classes, nf=nf, ch_mult=list(ch_mult),
                           num_res_blocks=num_res_blocks, dropout=dropout,
                           embedding_type=embedding_type, fourier_scale=fourier_scale)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.embedding_type = embedding_type
        temb_dim = 4 * nf
        self.time_embed = TimeEmbedding(embedding_type, nf, fourier_scale=fourier_scale)
        self.time_mlp = nn.Sequential(linear(self.time_embed.out_dim, temb_dim), nn.SiLU(),
                                      linear(temb_dim, temb_dim))
        self.conv_in = conv3x3(in_channels, nf)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = nf
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                # init_scale 1 (not the score nets' 0): every branch, and with it the time
                # conditioning, acts from the first step.
                self.blocks.append(ResnetBlockDDPMpp(ch, nf * mult, temb_dim=temb_dim,
                                                     dropout=dropout, init_scale=1.0))
                ch = nf * mult
            self.downs.append(Downsample(ch, with_conv=True) if i < len(ch_mult) - 1
                              else nn.Identity())
        self.num_res_blocks = num_res_blocks
        self.norm_out = group_norm(ch)
        self.head = linear(ch, num_classes)

    def forward(self, x: torch.Tensor, time_input: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] of images x [B, in_channels, H, W] at time input [B].

        Raises:
            ValueError: badly shaped x or time input.
        """
        _check_images(x, self.in_channels, self.size_multiple)
        check_time_input(x, time_input, self.embedding_type)
        temb = self.time_mlp(self.time_embed(time_input).to(self.head.weight.dtype))
        h = self.conv_in(x)
        for i, down in enumerate(self.downs):
            for block in self.blocks[i * self.num_res_blocks:(i + 1) * self.num_res_blocks]:
                h = block(h, temb)
            h = down(h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


class FeatureClassifier(nn.Module):
    """Small CNN for clean images in [-1, 1]; its penultimate layer is a feature space.

    Three stages of (3x3 conv, BatchNorm, SiLU) x 2 with width, 2 width and 4 width channels,
    2x average pooling after the first two (28 -> 14 -> 7, 32 -> 16 -> 8), global average
    pooling, Dense -> SiLU to `feature_dim` features, and a linear head. Use it in eval mode
    (running BatchNorm statistics) for features: then each image's features depend on that
    image only.

    Args:
        in_channels: image channels.
        num_classes: number of classes K.
        width: channels of the first stage.
        feature_dim: size of the feature layer.

    Attributes:
        config: the constructor's keyword arguments (used by `save_classifier`).

    Raises:
        ValueError: non-positive sizes.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 feature_dim: int = 128):
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("width", width, minimum=4)
        check_int("feature_dim", feature_dim, minimum=1)
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width,
                           feature_dim=feature_dim)
        self.in_channels, self.num_classes = in_channels, num_classes
        layers, ch = [], in_channels
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            for _ in range(2):
                # BatchNorm, not the score nets' GroupNorm: in eval mode it is a fixed affine
                # map, so the features keep the global brightness and contrast of each image
                # (per-sample normalisation would discard them, and a metric must see them).
                layers += [conv3x3(ch, out_ch), nn.BatchNorm2d(out_ch), nn.SiLU()]
                ch = out_ch
            if i < 2:
                layers.append(nn.AvgPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.feature_layer = linear(ch, feature_dim)
        self.head = linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim] of images x [B, in_channels, H, W].

        Raises:
            ValueError: x is not a floating tensor [B, in_channels, H, W] with H, W >= 4.
        """
        _check_images(x, self.in_channels, 1)
        if min(x.shape[2:]) < 4:
            raise ValueError(f"x must be at least 4x4 pixels, got {tuple(x.shape)}")
        h = self.trunk(x).mean(dim=(2, 3))
        return F.silu(self.feature_layer(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] of images x [B, in_channels, H, W] in [-1, 1]."""
        return self.head(self.features(x))


# Classifier classes by the name stored in their checkpoints.
CLASSIFIERS = {"noise_conditional": NoiseConditionalClassifier, "feature": FeatureClassifier}


def classifier_log_prob_fn(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           sde: SDE, time_input: str = "scaled_t") -> LogProbFn:
    """Wraps a time-dependent classifier `model(x, time input) -> logits` as log p_t(y | x).

    The time input is computed from t exactly as `score_sde.make_score_fn` does (float64 time,
    "t", "scaled_t" = t (num_steps - 1), "index", "std" = marginal std or "sigma" = VESDE's
    sigma(t)), so a classifier and a score network trained with the same convention see the
    same numbers. The result is differentiable in x: classifier guidance adds
    `torch.autograd.grad(fn(x, t)[range(B), y].sum(), x)[0]` = grad_x log p_t(y | x) (times a
    scale) to the score. The model's mode and `requires_grad` flags are left as they are.

    Args:
        model: network taking (x [B, ...], time input [B]) and returning logits [B, K].
        sde: the SDE the classifier was trained with; "scaled_t" and "index" also depend on
            its `num_steps` (tools/train_classifier.py stores it in meta["sde_config"]).
        time_input: a name in `score_sde.score.TIME_INPUTS`.

    Returns:
        fn(x [B, ...], t [B]) -> log-softmax [B, K] in the logits' dtype (at least float32).

    Raises:
        ValueError: unknown `time_input`, "std" / "noise_level" for an SDE without
            closed-form marginals, or "sigma" for one without sigma(t). The returned fn raises
            ValueError for mismatched x / t, t outside [0, T] ((0, T] for "std" and
            "noise_level", whose embedding takes log sigma(t)) or logits not [B, K].
    """
    to_time = time_input_fn(sde, time_input)
    divides = time_input in ("std", "noise_level")  # log sigma(0) = -inf: (0, T] then
    why = f" for time_input={time_input!r}: sigma(0) = 0" if divides else ""

    def log_prob_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_batch_time(x, t)
        check_time_range(t, 0.0, sde.T, open_lo=divides, why=why)
        t_in = to_time(t.to(float64_like(t)))
        if t_in.is_floating_point():
            t_in = t_in.to(x.dtype)
        logits = model(x, t_in)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 \
                or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(f"the classifier must return logits [B={x.shape[0]}, K], got {got}")
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)

    log_prob_fn.takes_float64_time = True  # casts its time input itself
    return log_prob_fn


def noisy_classifier_loss(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          sde: SDE, x: torch.Tensor, labels: torch.Tensor, *,
                          time_input: str = "scaled_t", eps: float = 1e-5,
                          t: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a time-dependent classifier on perturbed data.

    x_t = alpha(t) x + sigma(t) z with z ~ N(0, I) (the kernel of `sde.marginal_prob`) and
    t ~ U(eps, T) unless given; the loss is the batch mean of -log p_t(labels | x_t).

    Args:
        model: classifier `model(x, time input) -> logits [B, K]`.
        sde: an SDE with closed-form marginals.
        x: clean data [B, ...] (floating, in the model's range, e.g. `to_model_range`).
        labels: integer classes [B] in [0, K).
        time_input: as `classifier_log_prob_fn`.
        eps: smallest time, in (0, T) (1e-5 as the score training).
        t: fixed times [B] (e.g. for evaluation at one noise level); None: drawn.
        generator: source of t and z (on x's device).

    Returns:
        (loss: scalar tensor, log_probs: log p_t(y | x_t) [B, K], for accuracies).

    Raises:
        ValueError: an SDE without marginals, bad eps, mismatched shapes, or labels that are
            not integer classes in [0, K).
    """
    if not isinstance(sde, SDE) or not sde.has_marginal:
        raise ValueError(f"sde must be a score_sde.SDE with closed-form marginals, got "
                         f"{type(sde).__name__}")
    check_eps(eps, sde)
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor [B, ...], got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != x.shape[:1] \
            or labels.is_floating_point() or labels.dtype == torch.bool:
        got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise ValueError(f"labels must be an integer tensor [B]=({x.shape[0]},), got {got}")
    if t is None:
        u = torch.rand(x.shape[0], generator=generator, device=x.device,
                       dtype=float64_like(x))
        t = eps + (sde.T - eps) * u
    mean, std = sde.marginal_prob(x, t)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_t = mean + append_dims(std, x.ndim) * z
    log_probs = classifier_log_prob_fn(model, sde, time_input=time_input)(x_t, t)
    # One host read per call (the range check), and the details only when it fails.
    if bool(((labels < 0) | (labels >= log_probs.shape[1])).any()):
        raise ValueError(f"labels must lie in [0, {log_probs.shape[1] - 1}], got "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    return F.nll_loss(log_probs, labels.long()), log_probs


def save_classifier(path: Union[str, Path], model: nn.Module,
                    meta: Optional[Dict[str, Any]] = None) -> None:
    """Writes a classifier, its constructor arguments and `meta` atomically with a checksum.

    Args:
        path: target file (folders are created).
        model: a `NoiseConditionalClassifier` or `FeatureClassifier` (any device).
        meta: plain data to keep with it (dataset, SDE, time input, accuracy, ...).

    Raises:
        ValueError: a model of another class.
        OSError: the file cannot be written (`path` is left as it was).
    """
    kinds = [name for name, cls in CLASSIFIERS.items() if type(model) is cls]
    if not kinds:
        names = ", ".join(cls.__name__ for cls in CLASSIFIERS.values())
        raise ValueError(f"model must be one of {names}, got {type(model).__name__}")
    state = {"format": _FORMAT, "kind": kinds[0], "config": dict(model.config),
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "meta": dict(meta or {})}
    save_checkpoint(state, Path(path))


def load_classifier(path: Union[str, Path], device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuilds a classifier written by `save_classifier`.

    Args:
        path: the file.
        device: where to put the model.

    Returns:
        (model in eval mode on `device`, meta dict).

    Raises:
        FileNotFoundError: no such file.
        score_sde.checkpoint.CheckpointError: not a checkpoint, truncated or corrupted.
        ValueError: a checkpoint that is not a classifier, or weights that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a classifier checkpoint (written by save_classifier)")
    if state.get("kind") not in CLASSIFIERS:
        raise ValueError(f"{path}: unknown classifier kind {state.get('kind')!r}; accepted: "
                         f"{', '.join(CLASSIFIERS)}")
    model = CLASSIFIERS[state["kind"]](**state["config"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit a {type(model).__name__}"
                         f"({state['config']}): {str(err).splitlines()[0]}") from None
    return model.to(device).eval(), dict(state.get("meta", {}))
