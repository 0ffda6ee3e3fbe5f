"""Trained runs: the network, SDE and data description stored in a training checkpoint.

`load_trained` rebuilds what `python -m score_sde.train` saved (or what `export_weights` wrote
of it: the EMA weights alone, optionally in float16), for the tools and for research code that
samples from or evaluates a trained model:

    run = load_trained("runs/vp_fashion_mnist/checkpoint.pt", device="cuda")
    x, nfe = sample_pc(run.sde, run.score_fn(), (16, *run.info.shape), device="cuda")
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .checkpoint import read_checkpoint, save_checkpoint
from .config import Config, from_dict
from .datasets import DataInfo, load_dataset
from .sde import SDE, ScoreFn
from .build import build_model, build_sde, model_score_fn, with_labels

__all__ = ["TrainedModel", "load_trained", "export_weights"]

TRAINING_KEYS = ("model", "ema", "step", "config")
# Exported weights (`export_weights`): the EMA weights with what rebuilds the network.
WEIGHTS_KEYS = ("ema", "step", "config", "data_info", "weights_only")


@dataclass
class TrainedModel:
    """A trained network in eval mode with what is needed to use it."""

    cfg: Config
    sde: SDE
    model: torch.nn.Module
    info: DataInfo
    step: int
    use_ema: bool

    @property
    def num_classes(self) -> Optional[int]:
        """Number of class labels the network takes (None: unconditional)."""
        return self.info.num_classes if self.cfg.model.class_conditional else None

    def score_fn(self, labels: Optional[torch.Tensor] = None) -> ScoreFn:
        """The score function; a class-conditional network gets `labels` [B] (None: its null
        label num_classes, i.e. the unconditional model learned with label dropout)."""
        if labels is not None and self.num_classes is None:
            raise ValueError("labels given, but the checkpoint's model is not class-conditional")
        return model_score_fn(with_labels(self.model, labels), self.sde, self.cfg)


def data_source(cfg: Config, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                data_path: Optional[str] = None
                ) -> Tuple[str, Optional[str], Optional[str]]:
    """(dataset, data_dir, data_path) that a tool reads for a run: the ones given, else the
    run's; the run's folder and file count only for the run's own dataset."""
    dataset = dataset or cfg.data.dataset
    same = dataset == cfg.data.dataset
    return (dataset, data_dir or (cfg.data.data_dir if same else None),
            data_path or (cfg.data.data_path if same else None))


def data_info_of(state: Dict[str, Any], cfg: Config) -> DataInfo:
    """The DataInfo a checkpoint was trained with: stored in checkpoints written since it was
    added, else read from the training data named in the config (which must then exist)."""
    stored = state.get("data_info")
    if stored is not None:
        fields = dict(stored)
        fields["shape"] = tuple(fields["shape"])
        if fields.get("data_range") is not None:
            fields["data_range"] = tuple(fields["data_range"])
        return DataInfo(**fields)
    _, info = load_dataset(cfg.data.dataset, split="train", data_dir=cfg.data.data_dir,
                           data_path=cfg.data.data_path, seed=cfg.training.seed,
                           num_samples=1)
    return info


def with_trained_range(info: DataInfo, state: Dict[str, Any]) -> DataInfo:
    """`info` of evaluation data, with the data range of the checkpoint's network for 8-bit
    data: the interval it was trained to read, stored with the checkpoint ([0, 1] for the
    paper's VE models converted by `score_sde.convert`), else the loaders' [-1, 1]."""
    stored = state.get("data_info") or {}
    if not info.discrete or stored.get("data_range") is None:
        return info
    return dataclasses.replace(info, data_range=tuple(stored["data_range"]))


def check_trained_state(state: Any, path: Union[str, Path]) -> None:
    """Raises ValueError unless `state` (read from `path`) is a training checkpoint or weights
    exported by `export_weights`."""
    if isinstance(state, dict) and ("weights_only" in state and set(WEIGHTS_KEYS) <= set(state)
                                    or set(TRAINING_KEYS) <= set(state)):
        return
    raise ValueError(f"{path} is not a training checkpoint (needs {', '.join(TRAINING_KEYS)}) "
                     f"nor exported weights (tools/export_weights.py)")


def model_from_state(cfg: Config, state: Dict[str, Any], info: DataInfo, *, use_ema: bool,
                     device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """The checkpoint's network (EMA or raw weights) in eval mode on `device`, gradients off,
    in float32 whatever the stored precision.

    Raises:
        ValueError: the weights do not fit the network built from the config and `info`, or
            raw weights asked of exported weights (which hold the EMA weights only).
    """
    if not use_ema and "weights_only" in state:
        raise ValueError("exported weights hold the EMA weights only; the raw weights "
                         "(use_ema=False, --nouse_ema) need the training checkpoint")
    model = build_model(cfg, info)
    which = "ema" if use_ema else "model"
    try:
        model.load_state_dict(state[which])
    except RuntimeError:
        raise ValueError(f"the {which} weights do not fit a {cfg.model.name} for data of shape "
                         f"{info.shape}") from None
    return model.to(device).eval().requires_grad_(False)


def _read_trained(checkpoint: Union[str, Path]):
    """(state, path) of a training checkpoint or exported weights; see `load_trained`."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = read_checkpoint(path)
    check_trained_state(state, path)
    return state, path


def load_trained(checkpoint: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                 use_ema: bool = True) -> TrainedModel:
    """Loads a training checkpoint (`checkpoint.pt` or a snapshot) or exported weights.

    Raises:
        FileNotFoundError: no such file.
        score_sde.checkpoint.CheckpointError: the file is corrupt.
        ValueError: not a training checkpoint nor exported weights, or weights that do not fit
            its config.
    """
    state, path = _read_trained(checkpoint)
    cfg = from_dict(state["config"])
    info = data_info_of(state, cfg)
    model = model_from_state(cfg, state, info, use_ema=use_ema, device=device)
    return TrainedModel(cfg=cfg, sde=build_sde(cfg), model=model, info=info,
                        step=int(state["step"]), use_ema=use_ema)



def _buffer_keys(cfg: Config, state: Dict[str, Any]) -> set:
    """Names of the network's buffers (state-dict keys that are not parameters), from a copy
    built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = build_model(cfg, data_info_of(state, cfg))
    return {name for name, _ in model.named_buffers()}


def export_weights(checkpoint: Union[str, Path], output: Union[str, Path], *,
                   half: bool = False) -> Dict[str, Any]:
    """Writes a training checkpoint's EMA weights alone, with the config, step and data
    description that rebuild the network, to `output` (atomic and checksummed, like a
    checkpoint): a file a fraction of the checkpoint's size (no raw weights, no optimizer
    state) that `load_trained`, `tools/likelihood.py --checkpoint` and `tools/sample.py
    --checkpoint` read. With `half`, floating-point parameters are stored in float16 (half
    again the size; they are loaded back into float32); buffers, such as fixed Fourier
    frequencies, stay float32.

    Returns:
        {"output", "bytes", "step", "dtype", "parameters"}.

    Raises:
        FileNotFoundError, CheckpointError: no such file, or a corrupt one.
        ValueError: not a training checkpoint, a weight beyond float16's range with `half`, or
            `output` the checkpoint itself.
    """
    if Path(output).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"output {output} is the checkpoint itself; exporting over it would "
                         f"lose the raw weights and optimizer state the run resumes from")
    state, path = _read_trained(checkpoint)
    cfg = from_dict(state["config"])
    dtype = torch.float16 if half else torch.float32
    # Buffers stay float32: NCSN++'s Fourier frequencies (std 16) enter as a phase
    # 2 pi w log(sigma), which float16's rounding of w would shift by up to 0.4 rad.
    buffers = _buffer_keys(cfg, state)
    ema = {}
    for key, value in state["ema"].items():
        if value.is_floating_point():
            value = value.detach().to("cpu", torch.float32 if key in buffers else dtype)
            if half and not torch.isfinite(value).all():
                raise ValueError(f"EMA weight {key} does not fit in float16 (largest magnitude "
                                 f"{float(state['ema'][key].abs().max()):g}); export without "
                                 f"half precision")
        ema[key] = value
    out = {"ema": ema, "step": int(state["step"]), "config": state["config"],
           "data_info": dataclasses.asdict(data_info_of(state, cfg)),
           "weights_only": {"dtype": str(dtype).replace("torch.", ""),
                            "exported_from": str(path.resolve())}}
    save_checkpoint(out, Path(output))
    return dict(output=str(Path(output).resolve()), bytes=Path(output).stat().st_size,
                step=out["step"], dtype=out["weights_only"]["dtype"],
                parameters=sum(v.numel() for v in ema.values() if v.is_floating_point()))
