"""Configuration schema of the training script: plain dataclasses, values only.

Files in `configs/` build and return a `Config` (`get_config()`); command-line flags override
fields; `score_sde.train` turns the result into explicit constructor arguments. Units and
meanings are in the trailing comments.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


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
    time_input: str = "scaled_t"  # network time input: "t", "scaled_t", "index" or "std"
    class_conditional: bool = False  # embed the dataset's class labels (+ a null label)


@dataclass
class TrainingConfig:
    n_iters: int = 100_000  # optimizer steps
    batch_size: int = 128  # global batch size
    lr: float = 2e-4  # Adam learning rate after warm-up
    warmup: int = 5000  # linear learning-rate warm-up, steps
    lr_decay: str = "none"  # after warm-up: "none" (constant) or "cosine" (to lr_final * lr)
    lr_final: float = 0.0  # cosine decay: final learning rate as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping
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
    sample_every: int = 5000  # steps between sample grids (PNG); 0 disables
    num_samples: int = 64  # samples per grid
    checkpoint_every: int = 500  # steps between preemption checkpoints
    snapshot_every: int = 10_000  # steps between numbered snapshots
    keep_snapshots: int = 5  # numbered snapshots kept (oldest pruned)
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:N"
    bf16: bool = False  # bf16 autocast for the forward pass (CUDA)
    channels_last: bool = False  # channels-last memory format for image models (CUDA)
    compile: bool = False  # torch.compile the model
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune", ...
    compile_mode: str = "default"
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
