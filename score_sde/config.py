"""Configuration schema of the training script: plain dataclasses, values only.

Files in `configs/` (installed with the package as `score_sde.configs`) build and return a
`Config` (`get_config()`, run by `load_config_file`; `find_config` resolves a name or a path);
command-line flags override fields (`apply_overrides`); `check_config` checks ranges and
conflicts; the trainer turns the result into explicit constructor arguments. Units and meanings
are in the trailing comments.
"""
import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ._utils import check_choice
from .datasets import DATASETS
from .datasets.common import IMAGE_DATASETS, reject_unused
from .datasets.images import default_data_dir


@dataclass
class SDEConfig:
    name: str = "vp"  # "vp", "subvp", "ve" or "cosine"
    beta_min: float = 0.1  # VP / sub-VP: beta(0)
    beta_max: float = 20.0  # VP / sub-VP: beta(1)
    sigma_min: float = 0.01  # VE: noise scale at t = 0
    sigma_max: float = 50.0  # VE: noise scale at t = 1
    num_steps: int = 1000  # discretization steps (discrete losses, default sampler steps)


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # a name in score_sde.datasets.DATASETS
    data_dir: Optional[str] = None  # folder of image datasets; None: the dataset's default
    data_path: Optional[str] = None  # .npy / .npz file for dataset "array"
    eval_fraction: float = 0.1  # held-out share of "array" data (other datasets: test split)
    num_samples: Optional[int] = None  # size of synthetic toy datasets; None: their default


@dataclass
class ModelConfig:
    name: str = "small_unet"  # a name in score_sde.models.MODELS
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    prediction: str = "noise"  # network output: "noise", "score" or "x0" (make_score_fn)
    time_input: str = "scaled_t"  # network time input: a name in score_sde.score.TIME_INPUTS
    input_scaling: bool = False  # network sees x / sqrt(alpha^2 + sigma^2) (make_score_fn)
    class_conditional: bool = False  # embed the dataset's class labels (+ a null label)


@dataclass
class TrainingConfig:
    n_iters: int = 100_000  # optimizer steps
    batch_size: int = 128  # global batch size
    lr: float = 2e-4  # Adam learning rate after warm-up
    warmup: int = 5000  # linear learning-rate warm-up, steps
    lr_decay: str = "none"  # after warm-up: "none" (constant) or "cosine" (to lr_final * lr)
    lr_final: float = 0.0  # cosine decay: final learning rate as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; <= 0 or inf disables clipping
    adam_beta1: float = 0.9
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    ema_rate: Optional[float] = None  # None: 0.9999 for VP / sub-VP / cosine, 0.999 for VE
    ema_warmup: bool = True  # decay min(ema_rate, (1 + n) / (10 + n)) at update n
    eps: float = 1e-5  # smallest training time
    likelihood_weighting: bool = False  # weight the loss by g(t)^2 instead of sigma(t)^2
    importance_sampling: bool = False  # sample t prop. to g^2 / sigma^2 (likelihood weighting)
    reduce_mean: bool = True  # average the per-sample loss over dimensions (else sum)
    seed: int = 0  # seeds initialisation, data order and all noise
    log_every: int = 50  # steps between log lines / TensorBoard scalars
    eval_every: int = 1000  # steps between held-out losses with the EMA weights
    eval_batches: int = 4  # batches per held-out evaluation
    sample_every: int = 5000  # steps between sample grids (PNG, TensorBoard); 0 disables
    num_samples: int = 64  # samples per grid
    # sample grids: "dpm_solver" (DPM-Solver, order 2 multistep) or "pc" (Euler-Maruyama)
    sampler: str = "dpm_solver"
    sample_steps: Optional[int] = None  # grid sampler steps; None: 20 (dpm_solver) or the SDE's
    checkpoint_every: int = 500  # steps between preemption checkpoints
    snapshot_every: int = 10_000  # steps between numbered snapshots
    keep_snapshots: int = 5  # numbered snapshots kept (oldest pruned)
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:N"
    bf16: bool = False  # bf16 autocast for the forward pass (CUDA)
    channels_last: bool = False  # channels-last memory format for image models (CUDA)
    compile: bool = False  # torch.compile the model
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune", ...
    compile_mode: str = "default"
    # what torch.compile compiles: "model" (the whole network) or "blocks" (each repeated U-Net
    # block on its own, the glue eager: identical blocks share compiled code, a shorter warm-up)
    compile_scope: str = "model"
    label_dropout: float = 0.1  # class-conditional: P(label -> null label), for CFG sampling
    skip_nonfinite: bool = False  # skip steps with a non-finite loss / gradient, don't stop
    max_nonfinite: int = 10  # with skip_nonfinite: stop after more skipped steps in a row


@dataclass
class Config:
    sde: SDEConfig = field(default_factory=SDEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


def to_dict(cfg: Config) -> Dict[str, Any]:
    """The config as nested plain dicts (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def as_stored(value: Any) -> Any:
    """`value` (a config, section or setting) as config.json stores it: tuples become lists.
    A config rebuilt from a run's config.json then compares equal to the one it came from."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: as_stored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_stored(v) for v in value]
    return value


def from_dict(d: Dict[str, Any]) -> Config:
    """Rebuilds a Config from `to_dict` output; unknown keys raise ValueError."""
    parts = {}
    for name, cls in (("sde", SDEConfig), ("data", DataConfig), ("model", ModelConfig),
                      ("training", TrainingConfig)):
        values = dict(d.get(name, {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown {name} config fields {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        parts[name] = cls(**values)
    unknown = set(d) - set(parts)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; known: {sorted(parts)}")
    return Config(**parts)


LR_DECAYS = ("none", "cosine")
MAX_SEED = 2 ** 64 - 1  # the largest seed torch's generators take
# Samplers of the sample grids written during training.
GRID_SAMPLERS = ("dpm_solver", "pc")
# torch.compile's modes; "reduce-overhead" replays CUDA graphs, cutting per-kernel launch cost.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What torch.compile compiles (`build.compile_model`).
COMPILE_SCOPES = ("model", "blocks")


def config_dir() -> Path:
    """The folder of the shipped config files: `score_sde/configs` in an installed package
    (setup.py installs the repository's `configs/` there), else `configs/` of the checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


def shipped_configs() -> List[str]:
    """Names of the shipped config files, usable as `--config NAME`."""
    folder = config_dir()
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))


def find_config(spec: str) -> Path:
    """The config file `spec` names: a path, or the name of a shipped config ("toy",
    "fashion_mnist_cpu.py"), which works from any folder and from an installed package.

    Raises:
        ValueError: neither an existing file nor a shipped config; the message lists those.
    """
    path = Path(spec)
    if path.is_file():
        return path
    if path.name == spec:
        shipped = config_dir() / (spec if spec.endswith(".py") else f"{spec}.py")
        if shipped.is_file():
            return shipped
    raise ValueError(f"--config file {spec} does not exist (shipped configs, usable by name: "
                     f"{', '.join(shipped_configs())})")


def load_config_file(path: str) -> Config:
    """Runs `get_config()` of a config file and checks that it returns a Config.

    Raises:
        ValueError: a missing file, one that is not Python or fails to run (one line naming the
            exception), no get_config(), or a result that is not a Config.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_score_sde_config_{file.stem}", file)
    if spec is None:
        raise ValueError(f"--config file {path} must be a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"--config file {path} defines no get_config()")
        cfg = module.get_config()
    except ValueError:
        raise
    except Exception as err:  # the file is user input: one line, not a traceback
        raise ValueError(f"--config file {path} failed: {type(err).__name__}: {err}") from None
    if not isinstance(cfg, Config):
        raise ValueError(f"get_config() in {path} must return score_sde.config.Config, got "
                         f"{type(cfg).__name__}")
    return cfg


def apply_overrides(cfg: Config, overrides: Dict[str, Any]) -> Config:
    """Returns cfg with "section.field" -> value overrides applied."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        section, name = key.split(".")
        sections[section] = dataclasses.replace(sections[section], **{name: value})
    return Config(**sections)


# Settings for which +inf is a meaning, not an overflow.
INFINITY_ALLOWED = {"training.grad_clip"}  # no clipping, as clip_grad_norm_ reads it


def _type_error(hint, value, *, allow_inf: bool = False) -> Optional[str]:
    """Why `value` does not fit the field's annotation (int, float, bool, str, dict, each
    possibly Optional), or None. Floats must be finite (or +inf, with `allow_inf`); bools are
    not numbers here."""
    optional = type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind = typing.get_origin(hint) or hint
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value) and not (allow_inf and value == math.inf):
            return f"a finite number{' or inf' if allow_inf else ''}, got {value!r}"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    want = {float: "a number", int: "an integer", bool: "True or False", str: "a string",
            dict: "a dict"}.get(kind, kind.__name__)
    return f"{want}{' or None' if optional else ''}, got {type(value).__name__} {value!r}"


def check_config(cfg: Config) -> None:
    """Type checks of every setting, range checks of single settings and cross-field checks
    whose failure names both.

    Raises:
        ValueError: a setting of the wrong type or outside its range (the message names it
            and what it accepts) or two settings that conflict.
    """
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            problem = _type_error(hints[f.name], getattr(values, f.name),
                                  allow_inf=f"{section.name}.{f.name}" in INFINITY_ALLOWED)
            if problem:
                raise ValueError(f"{section.name}.{f.name} must be {problem}")
    tc = cfg.training
    if tc.importance_sampling and not tc.likelihood_weighting:
        raise ValueError("--importance_sampling needs --likelihood_weighting (it samples t for "
                         "the likelihood-weighted loss)")
    if cfg.data.dataset == "array" and not cfg.data.data_path:
        raise ValueError("--dataset array needs --data_path FILE.npy or FILE.npz")
    # Caught here, not only when the data loads, so that --dry_run refuses it too.
    check_choice("dataset", cfg.data.dataset, DATASETS)
    reject_unused(cfg.data.dataset,
                  data_dir=None if cfg.data.dataset in IMAGE_DATASETS else cfg.data.data_dir,
                  data_path=None if cfg.data.dataset == "array" else cfg.data.data_path)
    if tc.bf16 and tc.device == "cpu":
        raise ValueError("--bf16 autocast is for CUDA; drop --bf16 or use --device cuda")
    for name in ("n_iters", "batch_size", "log_every", "eval_every", "checkpoint_every",
                 "snapshot_every", "keep_snapshots", "eval_batches", "num_samples"):
        if getattr(tc, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(tc, name)}")
    if not 0 <= tc.seed <= MAX_SEED:
        raise ValueError(f"seed must lie in [0, 2^64 - 1] (torch's generators), got {tc.seed}")
    if not tc.lr > 0:
        raise ValueError(f"lr must be > 0, got {tc.lr}")
    if not tc.adam_eps > 0:  # Adam divides by sqrt(v) + eps, 0 where a gradient is 0
        raise ValueError(f"adam_eps must be > 0, got {tc.adam_eps}")
    if not 0 <= tc.adam_beta1 < 1:
        raise ValueError(f"adam_beta1 must lie in [0, 1), got {tc.adam_beta1}")
    if not tc.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {tc.weight_decay}")
    if tc.warmup < 0 or tc.sample_every < 0:
        name = "warmup" if tc.warmup < 0 else "sample_every"
        raise ValueError(f"{name} must be >= 0, got {getattr(tc, name)}")
    if tc.ema_rate is not None and not 0 < tc.ema_rate < 1:
        raise ValueError(f"ema_rate must lie in (0, 1) or be None (the SDE's default), got "
                         f"{tc.ema_rate}")
    if not 0 < tc.eps < 1:
        raise ValueError(f"eps (the smallest training time) must lie in (0, 1), got {tc.eps}")
    if tc.device != "auto":
        try:
            torch.device(tc.device)
        except RuntimeError:
            raise ValueError(f"device must be auto or a torch device such as cpu, cuda or "
                             f"cuda:1, got {tc.device!r}") from None
    check_choice("lr_decay", tc.lr_decay, LR_DECAYS)
    check_choice("sampler", tc.sampler, GRID_SAMPLERS)
    if tc.sample_steps is not None and tc.sample_steps < 1:
        raise ValueError(f"sample_steps must be >= 1 or None (the sampler's default), got "
                         f"{tc.sample_steps}")
    check_choice("compile_mode", tc.compile_mode, COMPILE_MODES)
    if tc.compile_mode != "default" and not tc.compile:
        raise ValueError(f"--compile_mode {tc.compile_mode} needs --compile")
    check_choice("compile_scope", tc.compile_scope, COMPILE_SCOPES)
    if tc.compile_scope != "model" and not tc.compile:
        raise ValueError(f"--compile_scope {tc.compile_scope} needs --compile")
    if not 0 <= tc.lr_final <= 1:
        raise ValueError(f"lr_final must lie in [0, 1] (a fraction of lr), got {tc.lr_final}")
    if not 0 <= tc.label_dropout <= 1:
        raise ValueError(f"label_dropout must lie in [0, 1], got {tc.label_dropout}")
    if cfg.model.class_conditional and tc.label_dropout == 1:
        raise ValueError("label_dropout 1 replaces every label by the null label, so the class "
                         "labels would never be trained; use a value below 1 (e.g. 0.1)")
    if tc.max_nonfinite < 0:
        raise ValueError(f"max_nonfinite must be >= 0, got {tc.max_nonfinite}")


# The SDEConfig fields each SDE reads (`build_sde`); the others are inert for it.
SDE_FIELDS = {"vp": ("beta_min", "beta_max", "num_steps"),
              "subvp": ("beta_min", "beta_max", "num_steps"),
              "ve": ("sigma_min", "sigma_max", "num_steps"),
              "cosine": ("num_steps",)}


def sde_settings(sde_config) -> Dict[str, Any]:
    """The name and the settings an SDEConfig's SDE reads: equal exactly for equal SDEs."""
    fields = SDE_FIELDS.get(sde_config.name, tuple(
        f.name for f in dataclasses.fields(sde_config) if f.name != "name"))
    return {"name": sde_config.name, **{f: getattr(sde_config, f) for f in fields}}


# --- resuming with changed settings --------------------------------------------------------------

# Settings a run may change when it resumes without changing what it computes: reporting,
# checkpointing, the length of the run (unless the learning rate decays over it, see
# `changed_settings`), where and how fast it runs.
RESUME_NEUTRAL = {f"training.{name}" for name in (
    "n_iters", "log_every", "eval_every", "eval_batches", "sample_every", "num_samples",
    "sampler", "sample_steps", "checkpoint_every", "snapshot_every", "keep_snapshots", "device",
    "compile", "compile_mode", "compile_scope", "channels_last", "skip_nonfinite",
    "max_nonfinite")}


def _data_location(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """`cfg` (a `to_dict` config) with data_dir and data_path as the folders they lead to:
    the dataset's default folder for data_dir None, real absolute paths."""
    data = dict(cfg.get("data", {}))
    data["data_dir"] = default_data_dir(data.get("dataset"), data.get("data_dir"))
    for key in ("data_dir", "data_path"):
        if isinstance(data.get(key), str):
            data[key] = os.path.realpath(os.path.expanduser(data[key]))
    return {**cfg, "data": data}


def changed_settings(saved: Dict[str, Any], current: Dict[str, Any], *,
                     step: Optional[int] = None) -> List[str]:
    """"section.field old -> new" for each setting of the `to_dict` configs that differs,
    except those in `RESUME_NEUTRAL`. n_iters counts where either config decays the learning
    rate (the cosine spans the run) and some of the `step` steps done (None: any) came after
    the warm-up, whose rates do not depend on it; data folders are compared where they
    lead."""
    neutral = set(RESUME_NEUTRAL)
    decays = {c.get("training", {}).get("lr_decay", "none") for c in (saved, current)}
    warmup = saved.get("training", {}).get("warmup", 0)
    if decays != {"none"} and (step is None or step > warmup):
        neutral.discard("training.n_iters")
    where_saved, where_now = _data_location(saved), _data_location(current)
    changes = []
    for section, fields in current.items():
        for name, value in fields.items():
            key, old = f"{section}.{name}", saved.get(section, {}).get(name, value)
            if section == "data" and name in ("data_dir", "data_path"):
                if where_saved["data"].get(name) == where_now["data"].get(name):
                    continue
            if (section == "sde" and name != "name"
                    and saved.get("sde", {}).get("name") == current["sde"].get("name")
                    and name not in SDE_FIELDS.get(current["sde"].get("name"), (name,))):
                continue  # a setting this SDE does not read
            if key not in neutral and as_stored(old) != as_stored(value):
                changes.append(f"{key} {old!r} -> {value!r}")
    return changes
