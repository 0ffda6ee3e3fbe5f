"""Checkpoints of the paper's public PyTorch code (score_sde_pytorch) as runs of this library.

The paper's code saves `{"model", "ema", "optimizer", "step"}`: `model` is the state dict of
its `NCSNpp` wrapped in `DataParallel` (keys `module.all_modules.N.<...>`, every layer in one
flat list in construction order), `ema` holds `shadow_params`, the EMA weights as a list in
the order of `model.parameters()` restricted to trainable ones. `convert_checkpoint` rebuilds
the network described by one of the paper code's config files (`REFERENCE_CONFIGS`, named by
the path under its `configs/`, e.g. "vp/cifar10_ddpmpp_continuous") as our `NCSNpp`, moves
every tensor to its place, and returns a checkpoint that `score_sde.runs.load_trained`,
tools/likelihood.py and tools/sample.py read (`write_run` saves it).

Conventions that differ, and how each is handled, so that the converted score function equals
the paper code's `get_score_fn(sde, model, continuous=True)` up to float32 round-off:

- Layout. The flat `all_modules` list is walked in the reference's construction order
  (`reference_layout`) and matched to our nested modules. Its parameter-free FIR
  resamplers of the progressive paths ("input_skip", "output_skip") are not in the list;
  the other resamplers are, with or without weights.
- NIN layers. The reference's 1x1 "NIN" layers (attention; the shortcut of DDPM++ blocks)
  store W [in, out] applied as x W by einsum; ours are 1x1 convolutions [out, in, 1, 1], so
  W is transposed. The attention's q, k and v layers become the three row blocks of our one
  `qkv` convolution.
- EMA. `shadow_params[i]` is the i-th trainable reference tensor. The Fourier frequencies W
  are fixed (not trainable), so both the raw and the EMA network take them from `model`.
- VP / sub-VP time input. The reference's continuous VP networks read 999 t: our
  `time_input="scaled_t"`, t (num_steps - 1), with num_steps = 1000 (all those configs).
- VP / sub-VP output. Noise prediction, score = -output / std(t) with the same marginal std
  (`prediction="noise"`). We evaluate std in float64; the reference's float32
  sqrt(1 - exp(...)) loses relative accuracy near t = 0 (0.6 % at t = 1e-5, 0.1 % at 1e-4),
  the only difference larger than round-off there.
- VE time input. The reference's VE networks read its `marginal_prob` std,
  sigma(t) = sigma_min (sigma_max / sigma_min)^t. Our `VESDE` reports the exact marginal std
  sqrt(sigma(t)^2 - sigma_min^2) instead, so the converted run uses `time_input="sigma"`
  (`VESDE.sigma(t)`), never "std".
- VE output. The reference divides the network output by sigma(t) inside the network
  (`scale_by_sigma`) and uses it as the score: `NCSNpp(scale_by_sigma=True)` with
  `prediction="score"`.
- Data range. The reference's VE models read images in [0, 1] (`data.centered = False`; the
  network maps x to 2 x - 1), its VP / sub-VP models [-1, 1]. The run stores the range in
  its `data_info` (`data_range`); the tools dequantize 8-bit data into it, and bits/dim take
  the offset 8 for [0, 1], 7 for [-1, 1].
- What is not converted: the optimizer state (a converted run can be evaluated and sampled,
  not resumed by the trainer, which refuses a checkpoint without one), and the reference's
  `sigmas` buffer (the geometric table of its discrete noise levels, present in some
  checkpoints), which is checked against the config and dropped.

Samplers of ours that use the VE marginal std (Tweedie denoising at the end, DDIM,
DPM-Solver) use the exact one, so their last steps differ slightly from the paper code's; the
probability-flow ODE, the likelihood and the Euler-Maruyama / reverse-diffusion / Langevin
steps use only the SDE's drift, diffusion and the score, and match.
"""
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .checkpoint import save_checkpoint
from .cli import check_path, write_json
from .config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig, to_dict
from .datasets import NUM_LEVELS, DataInfo
from .models.layers import (AttnBlockpp, Combine, Downsample, ResnetBlockBigGANpp,
                            ResnetBlockDDPMpp, TimeEmbedding, Upsample)
from .models.ncsnpp import NCSNpp, paper_config

__all__ = ["ReferenceConfig", "REFERENCE_CONFIGS", "reference_config", "TensorMap",
           "reference_layout", "convert_checkpoint", "from_reference", "to_reference",
           "load_reference_checkpoint", "write_run"]

# DataParallel's prefix on the reference's state-dict keys.
PREFIX = "module."
# Keys of a checkpoint file of the paper's code that the conversion reads.
CHECKPOINT_KEYS = ("model", "ema", "step")


@dataclass(frozen=True)
class ReferenceConfig:
    """What one config file of the paper's code fixes about its checkpoints.

    The network keyword arguments use our `NCSNpp` names; the reference's `model.*` fields map
    one to one (`data.centered` -> `centered`, `data.image_size` -> `image_size`).
    """

    sde: str  # our SDE name: "vp", "subvp" or "ve" (its training.sde)
    dataset: str  # its data.dataset: "CIFAR10", "CelebAHQ", "FFHQ" or "LSUN"
    network: Dict[str, Any]  # NCSNpp keyword arguments
    num_scales: int = 1000  # model.num_scales: discretization steps N
    beta_min: float = 0.1  # VP / sub-VP
    beta_max: float = 20.0
    sigma_min: float = 0.01  # VE
    sigma_max: float = 50.0
    ema_rate: float = 0.9999  # model.ema_rate (recorded in the run config)

    @property
    def data_range(self) -> Tuple[float, float]:
        """Interval the network reads images in: [-1, 1] if centered, else [0, 1]."""
        return (-1.0, 1.0) if self.network["centered"] else (0.0, 1.0)

    def meta_network(self) -> NCSNpp:
        """The network on the "meta" device: structure and shapes, no memory, no init cost."""
        with torch.device("meta"):
            return NCSNpp(**self.network)

    def data_info(self) -> DataInfo:
        """The data description stored with a converted run (8-bit RGB images)."""
        size = self.network["image_size"]
        name = "cifar10" if self.dataset == "CIFAR10" else self.dataset.lower()
        return DataInfo(name=name, shape=(self.network["in_channels"], size, size),
                        discrete=True, num_levels=NUM_LEVELS, data_range=self.data_range,
                        num_classes=10 if self.dataset == "CIFAR10" else None)

    def run_config(self) -> Config:
        """Our run config: SDE, network and the score-function conventions of the reference.

        CIFAR-10 runs name our "cifar10" loader; the other datasets have no loader here, so
        their runs name "array" (evaluate them on an array of images with --data_path).
        """
        ve = self.sde == "ve"
        return Config(
            sde=SDEConfig(name=self.sde, beta_min=self.beta_min, beta_max=self.beta_max,
                          sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                          num_steps=self.num_scales),
            data=DataConfig(dataset="cifar10" if self.dataset == "CIFAR10" else "array"),
            model=ModelConfig(name="ncsnpp", kwargs=dict(self.network),
                              prediction="score" if ve else "noise",
                              time_input="sigma" if ve else "scaled_t"),
            training=TrainingConfig(ema_rate=self.ema_rate))


def _cifar10(sde: str, name: str) -> ReferenceConfig:
    # The VE models read [0, 1] and divide by sigma; the VP / sub-VP ones read [-1, 1] and
    # embed 999 t with sinusoids, whichever architecture (their NCSN++ too).
    ve = sde == "ve"
    net = paper_config(name)
    if ve:
        net.update(centered=False, embedding_type="fourier", scale_by_sigma=True)
    else:
        net.update(centered=True, embedding_type="positional")
    return ReferenceConfig(sde=sde, dataset="CIFAR10", network=net,
                           ema_rate=0.999 if ve else 0.9999)


# The 256 x 256 NCSN++ of configs/ve/*_256_ncsnpp_continuous.py, church and bedroom (LSUN
# defaults: dropout 0, 2000 noise scales), and the 1024 x 1024 one of celebahq / ffhq.
_NCSNPP_HIGH_RES = dict(in_channels=3, attn_resolutions=(16,), dropout=0.0,
                        resamp_with_conv=True, resblock_type="biggan", fir=True,
                        fir_kernel=(1, 3, 3, 1), skip_rescale=True, init_scale=0.0,
                        progressive="output_skip", progressive_input="input_skip",
                        progressive_combine="sum", embedding_type="fourier", fourier_scale=16.0,
                        conditional=True, centered=False, scale_by_sigma=True)
_NCSNPP_256 = dict(_NCSNPP_HIGH_RES, image_size=256, nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2),
                   num_res_blocks=2)
_NCSNPP_1024 = dict(_NCSNPP_HIGH_RES, image_size=1024, nf=16,
                    ch_mult=(1, 2, 4, 8, 16, 32, 32, 32), num_res_blocks=1)


def _high_res(dataset: str, network: Dict[str, Any], sigma_max: float,
              ema_rate: float) -> ReferenceConfig:
    return ReferenceConfig(sde="ve", dataset=dataset, network=dict(network), num_scales=2000,
                           sigma_max=sigma_max, ema_rate=ema_rate)


# The paper code's continuous-time configs, by their path under its configs/ folder.
REFERENCE_CONFIGS: Dict[str, ReferenceConfig] = {
    **{f"{sde}/cifar10_{arch}{deep}_continuous": _cifar10(sde, arch + (deep or "_cont"))
       for sde in ("vp", "subvp") for arch in ("ddpmpp", "ncsnpp") for deep in ("", "_deep")},
    "ve/cifar10_ncsnpp_continuous": _cifar10("ve", "ncsnpp_cont"),
    "ve/cifar10_ncsnpp_deep_continuous": _cifar10("ve", "ncsnpp_deep"),
    "ve/celebahq_256_ncsnpp_continuous": _high_res("CelebAHQ", _NCSNPP_256, 348.0, 0.999),
    "ve/ffhq_256_ncsnpp_continuous": _high_res("FFHQ", _NCSNPP_256, 348.0, 0.999),
    "ve/church_ncsnpp_continuous": _high_res("LSUN", _NCSNPP_256, 380.0, 0.999),
    "ve/bedroom_ncsnpp_continuous": _high_res("LSUN", _NCSNPP_256, 378.0, 0.999),
    "ve/celebahq_ncsnpp_continuous": _high_res("CelebAHQ", _NCSNPP_1024, 1348.0, 0.9999),
    "ve/ffhq_ncsnpp_continuous": _high_res("FFHQ", _NCSNPP_1024, 1348.0, 0.9999),
}


def reference_config(config: Union[str, ReferenceConfig]) -> ReferenceConfig:
    """A `REFERENCE_CONFIGS` entry by name (a ReferenceConfig passes through). A leading
    "configs/" and a trailing ".py" are ignored, so the file's path works too.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if isinstance(config, ReferenceConfig):
        return config
    name = _config_name(config)
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"unknown --config {config!r} (a path under the paper code's configs/ "
                         f"without .py); supported: {', '.join(REFERENCE_CONFIGS)}")
    return REFERENCE_CONFIGS[name]


def _config_name(config: str) -> str:
    return str(config).removeprefix("configs/").removesuffix(".py")


# --- layout: reference tensors <-> our state dict ---------------------------------------------

@dataclass(frozen=True)
class TensorMap:
    """Where one tensor of the reference's state dict goes in ours."""

    ref_key: str  # key in the reference's state dict, without DataParallel's "module."
    ours: str  # key in NCSNpp.state_dict()
    shape: Tuple[int, ...]  # shape in the reference
    nin: bool = False  # NIN weight W [in, out]; ours is W^T as a 1x1 convolution
    chunk: Optional[int] = None  # q, k, v (0, 1, 2): a row block of our fused qkv tensor
    trainable: bool = True  # in the reference's EMA shadow_params

    def to_ours(self, tensor: torch.Tensor) -> torch.Tensor:
        """The reference tensor in our orientation (for a chunk: its row block)."""
        return tensor.t()[:, :, None, None] if self.nin else tensor

    def to_reference(self, tensor: torch.Tensor) -> torch.Tensor:
        """Our tensor (for a chunk: the whole fused tensor) in the reference's form."""
        if self.chunk is not None:
            tensor = tensor.chunk(3)[self.chunk]
        return tensor[:, :, 0, 0].t() if self.nin else tensor


def _reference_modules(net: NCSNpp) -> List[Tuple[str, nn.Module]]:
    """Our submodules (state-dict prefix, module) in the order of the reference's all_modules."""
    if not net.conditional:
        raise ValueError("only noise-conditional networks (conditional=True) are converted")
    names = (["time_embed"] if net.embedding_type == "fourier" else []) + \
        ["time_mlp.0", "time_mlp.2", "conv_in"]
    for i, level in enumerate(net.down_levels):
        for j, attn in enumerate(level["attns"]):
            names.append(f"down_levels.{i}.blocks.{j}")
            if not isinstance(attn, nn.Identity):
                names.append(f"down_levels.{i}.attns.{j}")
        if "down" in level:
            names.append(f"down_levels.{i}.down")
            # The parameter-free FIR pyramid resampler of "input_skip" is not in the list.
            pyramid = {"input_skip": "combine", "residual": "pyramid_down"}
            if net.progressive_input in pyramid:
                names.append(f"down_levels.{i}.{pyramid[net.progressive_input]}")
    names += ["mid.0", "mid.1", "mid.2"]
    for i, level in enumerate(net.up_levels):
        names += [f"up_levels.{i}.blocks.{j}" for j in range(len(level["blocks"]))]
        names += [f"up_levels.{i}.{key}" for key in ("attn", "pyramid_norm", "pyramid_conv")
                  if key in level]
        if net.progressive == "residual" and "pyramid_up" in level:
            names.append(f"up_levels.{i}.pyramid_up")  # "output_skip": parameter-free, absent
        if "up" in level:
            names.append(f"up_levels.{i}.up")
    if net.conv_out is not None:
        names += ["norm_out", "conv_out"]
    return [(name, net.get_submodule(name)) for name in names]


def _module_tensors(ref: str, ours: str, module: nn.Module) -> List[TensorMap]:
    """The TensorMaps of one reference module `all_modules.<index>` = `ref`, in the order of
    its parameters, mapped to our module at prefix `ours`."""
    def plain(ref_name, our_name, layer):
        return [TensorMap(f"{ref}.{ref_name}.{p}" if ref_name else f"{ref}.{p}",
                          f"{ours}.{our_name}.{p}" if our_name else f"{ours}.{p}",
                          tuple(getattr(layer, p).shape)) for p in ("weight", "bias")]

    def nin(ref_name, our_name, conv, chunk=None):
        out_ch, in_ch = conv.weight.shape[:2]
        if chunk is not None:
            out_ch //= 3
        return [TensorMap(f"{ref}.{ref_name}.W", f"{ours}.{our_name}.weight", (in_ch, out_ch),
                          nin=True, chunk=chunk),
                TensorMap(f"{ref}.{ref_name}.b", f"{ours}.{our_name}.bias", (out_ch,),
                          chunk=chunk)]

    if isinstance(module, TimeEmbedding):
        return [TensorMap(f"{ref}.W", f"{ours}.freqs", tuple(module.freqs.shape),
                          trainable=False)]
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm)):
        return plain("", "", module)
    if isinstance(module, ResnetBlockDDPMpp):  # also BigGAN++, a subclass
        out = plain("GroupNorm_0", "norm_0", module.norm_0) + \
            plain("Conv_0", "conv_0", module.conv_0)
        if module.dense is not None:
            out += plain("Dense_0", "dense", module.dense)
        out += plain("GroupNorm_1", "norm_1", module.norm_1) + \
            plain("Conv_1", "conv_1", module.conv_1)
        if isinstance(module.shortcut, nn.Conv2d):
            out += (plain("Conv_2", "shortcut", module.shortcut)
                    if isinstance(module, ResnetBlockBigGANpp)
                    else nin("NIN_0", "shortcut", module.shortcut))
        return out
    if isinstance(module, AttnBlockpp):
        out = plain("GroupNorm_0", "norm", module.norm)
        for j in range(3):
            out += nin(f"NIN_{j}", "qkv", module.qkv, chunk=j)
        return out + nin("NIN_3", "proj", module.proj)
    if isinstance(module, (Upsample, Downsample)):
        return plain("Conv2d_0" if module.fir else "Conv_0", "conv", module.conv) \
            if module.conv is not None else []
    if isinstance(module, Combine):
        return plain("Conv_0", "conv", module.conv)
    raise TypeError(f"no reference layout for {type(module).__name__} at {ours}")


def reference_layout(net: NCSNpp) -> List[TensorMap]:
    """Every tensor of the reference's state dict for the network `net` describes, in the order
    of the reference's `model.parameters()` (the order of the EMA's shadow_params).

    `net` may live on the "meta" device: only its structure and shapes are read.

    Raises:
        ValueError: an unconditional network (the reference's layout differs; not converted).
    """
    layout = []
    for index, (ours, module) in enumerate(_reference_modules(net)):
        layout += _module_tensors(f"all_modules.{index}", ours, module)
    return layout


def _geometric_sigmas(config: ReferenceConfig) -> torch.Tensor:
    """The reference's `sigmas` buffer: exp(linspace(log sigma_max, log sigma_min, N))."""
    return torch.exp(torch.linspace(math.log(config.sigma_max), math.log(config.sigma_min),
                                    config.num_scales, dtype=torch.float64))


def _strip_prefix(state: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    keys = list(state)
    if keys and all(k.startswith(PREFIX) for k in keys):
        return PREFIX, {k[len(PREFIX):]: v for k, v in state.items()}
    return "", dict(state)


def _check_tensor(value: Any, shape: Tuple[int, ...], what: str, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} {name} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != shape:
        raise ValueError(f"{what} {name} has shape {tuple(value.shape)}, the config expects "
                         f"{shape}")
    return value


def _assemble(layout: Sequence[TensorMap], values: Sequence[torch.Tensor],
              dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Our state dict from the reference tensors `values` (one per layout entry)."""
    state: Dict[str, torch.Tensor] = {}
    chunks: Dict[str, List[torch.Tensor]] = {}
    for entry, value in zip(layout, values):
        value = entry.to_ours(value.detach().to("cpu", dtype))
        if entry.chunk is None:
            state[entry.ours] = value.contiguous()
        else:
            chunks.setdefault(entry.ours, []).append(value)
            if len(chunks[entry.ours]) == 3:
                state[entry.ours] = torch.cat(chunks.pop(entry.ours))
    assert not chunks, f"incomplete qkv blocks: {sorted(chunks)}"
    return state


def from_reference(model_state: Mapping[str, Any], net: NCSNpp, *,
                   shadow_params: Optional[Sequence[torch.Tensor]] = None,
                   config: Optional[ReferenceConfig] = None, what: str = "model",
                   dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Our state dict for `net` from the reference's model state dict, or from its EMA.

    Args:
        model_state: the reference's `model` state dict (keys with or without "module.").
        net: the matching NCSNpp (any device, "meta" included; only its layout is read).
        shadow_params: the EMA's tensors in parameter order; given, they replace the trainable
            tensors of `model_state` (the fixed Fourier frequencies still come from it).
        config: checks the reference's optional `sigmas` buffer against its noise levels.
        what: the name used for `model_state` in error messages.
        dtype: floating dtype of the result.

    Returns:
        a state dict that `net.load_state_dict` accepts (strict).

    Raises:
        ValueError: one line naming the first key (in the reference's order) that is missing,
            has the wrong shape or is not a tensor, then the first unexpected key, a
            `sigmas` buffer that does not fit `config`, or a shadow_params list of the wrong
            length or with a tensor of the wrong shape.
    """
    layout = reference_layout(net)
    prefix, state = _strip_prefix(model_state)
    values = []
    for entry in layout:
        if entry.ref_key not in state:
            raise ValueError(f"the checkpoint's {what} has no key {prefix}{entry.ref_key} "
                             f"(shape {entry.shape}), which the config's network has; is it "
                             f"the right --config?")
        values.append(_check_tensor(state[entry.ref_key], entry.shape, f"{what} key",
                                    prefix + entry.ref_key))
    expected = {entry.ref_key for entry in layout} | {"sigmas"}
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"the checkpoint's {what} has key {prefix}{extra[0]}, which the "
                         f"config's network does not have; is it the right --config?")
    if "sigmas" in state and config is not None:
        sigmas = _geometric_sigmas(config)
        found = _check_tensor(state["sigmas"], tuple(sigmas.shape), f"{what} key",
                              prefix + "sigmas")
        # Up to the rounding of the buffer's own dtype (float32: 1e-5; half precision more).
        rtol = max(1e-5, 4 * torch.finfo(found.dtype).eps)
        if not torch.allclose(found.double(), sigmas, rtol=rtol, atol=0.0):
            raise ValueError(f"{what} key {prefix}sigmas holds noise levels from "
                             f"{float(found[0]):g} to {float(found[-1]):g}; the config has "
                             f"sigma_max={config.sigma_max:g}, sigma_min={config.sigma_min:g}; "
                             f"is it the right --config?")
    if shadow_params is not None:
        trainable = [i for i, entry in enumerate(layout) if entry.trainable]
        if not isinstance(shadow_params, (list, tuple)) or len(shadow_params) != len(trainable):
            got = len(shadow_params) if isinstance(shadow_params, (list, tuple)) else \
                type(shadow_params).__name__
            raise ValueError(f"ema shadow_params must be a list of {len(trainable)} tensors "
                             f"(the trainable parameters of the config's network), got {got}")
        for n, (i, value) in enumerate(zip(trainable, shadow_params)):
            values[i] = _check_tensor(value, layout[i].shape, "ema shadow_params",
                                      f"[{n}] ({prefix}{layout[i].ref_key})")
    return _assemble(layout, values, dtype)


def to_reference(state: Mapping[str, torch.Tensor], net: NCSNpp, *,
                 prefix: str = PREFIX) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
    """The inverse of `from_reference`: our state dict in the reference's form.

    Returns:
        (model state dict with keys `prefix + all_modules.N...`, EMA shadow_params list: the
        trainable tensors in parameter order). Tensors may share memory with `state` and
        with each other, as `state_dict()` shares memory with the parameters.
    """
    layout = reference_layout(net)
    model = {prefix + e.ref_key: e.to_reference(state[e.ours]).contiguous() for e in layout}
    shadow = [model[prefix + e.ref_key] for e in layout if e.trainable]
    return model, shadow


# --- checkpoints and run folders --------------------------------------------------------------

def load_reference_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Reads a checkpoint file of the paper's code onto the CPU, without running pickled code
    (`torch.load(weights_only=True)`: tensors, numbers, lists and dicts only).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable PyTorch checkpoint, or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is bad input: one line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                         f"({type(err).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not the paper code's "
                         f"checkpoint dict ({', '.join(CHECKPOINT_KEYS)}, optimizer)")
    return state


def convert_checkpoint(checkpoint: Mapping[str, Any], config: Union[str, ReferenceConfig], *,
                       source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Our run checkpoint from the paper code's checkpoint dict.

    Args:
        checkpoint: {"model": state dict, "ema": {"shadow_params": [...], ...}, "step": int,
            "optimizer": ... (ignored)}.
        config: a `REFERENCE_CONFIGS` name, or a ReferenceConfig (e.g. a smaller variant).
        source: provenance stored under "converted_from" (e.g. the file and its SHA-256).

    Returns:
        {"model", "ema", "step", "config", "data_info", "converted_from"}: the raw and EMA
        weights, which `score_sde.runs.load_trained` reads (EMA by default).

    Raises:
        ValueError: an unknown config, a missing checkpoint key, or weights that do not fit
            the config (one line naming the first mismatching key).
    """
    ref = reference_config(config)
    for key in CHECKPOINT_KEYS:
        if key not in checkpoint:
            raise ValueError(f"the checkpoint has no key {key!r}; the paper code's checkpoints "
                             f"hold {', '.join(CHECKPOINT_KEYS)} and optimizer")
    ema = checkpoint["ema"]
    if not isinstance(ema, Mapping) or "shadow_params" not in ema:
        raise ValueError("the checkpoint's ema has no key 'shadow_params' (the EMA weights)")
    if not isinstance(checkpoint["model"], Mapping):
        raise ValueError(f"the checkpoint's model is a {type(checkpoint['model']).__name__}, "
                         f"not a state dict")
    step = checkpoint["step"]
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"the checkpoint's step must be an integer >= 0, got {step!r}")
    net = ref.meta_network()
    # The EMA first: it checks the model dict and the shadow params before anything is copied.
    ema_state = from_reference(checkpoint["model"], net, config=ref,
                               shadow_params=ema["shadow_params"])
    model = from_reference(checkpoint["model"], net, config=ref)
    # A last structural check against the network itself (no memory is allocated on meta).
    net.load_state_dict(ema_state, strict=True, assign=True)
    name = _config_name(config) if isinstance(config, str) else None
    return {"model": model, "ema": ema_state, "step": step, "config": to_dict(ref.run_config()),
            "data_info": dataclasses.asdict(ref.data_info()),
            "converted_from": {"reference_config": name, **(source or {})}}


def check_run_folder(workdir: Union[str, Path], *, overwrite: bool = False) -> Path:
    """WORKDIR/checkpoint.pt, after checking that `write_run` may write it.

    Raises:
        ValueError: WORKDIR is a file or lies under one, or already holds a checkpoint.pt and
            not `overwrite`.
    """
    workdir = check_path("workdir", Path(workdir), folder=True)
    path = workdir / "checkpoint.pt"
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; choose a new --workdir or pass --overwrite")
    return path


def write_run(state: Dict[str, Any], workdir: Union[str, Path], *,
              overwrite: bool = False) -> Path:
    """Writes a converted checkpoint as WORKDIR/checkpoint.pt (atomically) and its config as
    WORKDIR/config.json; returns the checkpoint path.

    Raises:
        ValueError: WORKDIR is a file, or already holds a checkpoint.pt and not `overwrite`
            (a training run's checkpoint is never replaced by accident).
    """
    workdir = Path(workdir)
    path = check_run_folder(workdir, overwrite=overwrite)
    save_checkpoint(state, path)
    write_json(workdir / "config.json", state["config"])
    return path
