"""What a run is built from: the SDE, the network and the data splits of a config.

Shared by the training loop (`score_sde.trainer`), the command line (`score_sde.train`) and
everything that rebuilds a trained model from its checkpoint (`score_sde.runs`, tools/).
"""
import functools
import inspect
from typing import NamedTuple, Optional

import torch

from . import datasets as data_lib
from ._utils import check_choice
from .config import COMPILE_SCOPES, Config
from .models import MODELS, REPEATED_BLOCKS
from .score import make_score_fn
from .sde import SDE, CosineVPSDE, SubVPSDE, VESDE, VPSDE, ScoreFn


def build_sde(cfg: Config) -> SDE:
    s = cfg.sde
    builders = {
        "vp": lambda: VPSDE(beta_min=s.beta_min, beta_max=s.beta_max, num_steps=s.num_steps),
        "subvp": lambda: SubVPSDE(beta_min=s.beta_min, beta_max=s.beta_max,
                                  num_steps=s.num_steps),
        "ve": lambda: VESDE(sigma_min=s.sigma_min, sigma_max=s.sigma_max, num_steps=s.num_steps),
        "cosine": lambda: CosineVPSDE(num_steps=s.num_steps),
    }
    if s.name not in builders:
        raise ValueError(f"unknown sde {s.name!r}; accepted: {', '.join(builders)}")
    return builders[s.name]()


def build_model(cfg: Config, info: "data_lib.DataInfo") -> torch.nn.Module:
    """The network for data of per-sample shape `info.shape`; with `cfg.model.class_conditional`
    it embeds `info.num_classes` labels plus the null label.

    Raises:
        ValueError: unknown model, data of the wrong rank, model kwargs that disagree with the
            data's shape or that the model does not take, num_classes in the model kwargs, or
            class conditioning on data without labels.
    """
    if cfg.model.name not in MODELS:
        raise ValueError(f"unknown model {cfg.model.name!r}; accepted: {', '.join(MODELS)}")
    kwargs = dict(cfg.model.kwargs)
    if "num_classes" in kwargs:
        raise ValueError("model.kwargs must not set num_classes; use --class_conditional (the "
                         "number of classes comes from the dataset)")
    if cfg.model.class_conditional:
        if info.num_classes is None:
            raise ValueError(f"--class_conditional needs a labelled dataset; {info.name!r} has "
                             f"no labels")
        kwargs["num_classes"] = info.num_classes
    if cfg.model.name == "mlp":
        if len(info.shape) != 1:
            raise ValueError(f"model 'mlp' needs vector data [N, D], got per-sample shape "
                             f"{info.shape}; use an image model")
        from_data = {"dim": info.shape[0]}
    else:
        if len(info.shape) != 3 or info.shape[1] != info.shape[2]:
            raise ValueError(f"model {cfg.model.name!r} needs square images [N, C, H, H], got "
                             f"per-sample shape {info.shape}")
        from_data = {"in_channels": info.shape[0], "image_size": info.shape[1]}
    for key, value in from_data.items():
        if kwargs.setdefault(key, value) != value:
            raise ValueError(f"model.kwargs {key}={kwargs[key]!r} does not fit the data "
                             f"{info.name!r} of per-sample shape {info.shape}, which needs "
                             f"{key}={value}; drop {key} from model.kwargs or use such data")
    cls = MODELS[cfg.model.name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"model.kwargs do not fit model {cfg.model.name!r}: {err}") from None
    return cls(**kwargs)


def compile_model(net: torch.nn.Module, *, mode: str, scope: str) -> torch.nn.Module:
    """`net` under torch.compile: the whole of it, or each of its repeated blocks.

    Args:
        net: the network (possibly wrapped, e.g. in DistributedDataParallel).
        mode: torch.compile mode (`config.COMPILE_MODES`).
        scope: "model" wraps the whole network in one compiled module; "blocks" compiles every
            submodule of a class in `models.REPEATED_BLOCKS` in place and leaves the glue
            between them eager. Blocks of one class share their compiled code wherever their
            shapes agree, so each distinct block is compiled once, not each block. It raises
            torch._dynamo's process-wide `recompile_limit` to two graphs per block.

    Returns:
        The module to call: a compiled wrapper of `net` ("model") or `net` itself ("blocks";
        its parameter names and state dict are unchanged).

    Raises:
        ValueError: unknown scope, or scope "blocks" and `net` holds no repeated block.
    """
    check_choice("compile_scope", scope, COMPILE_SCOPES)
    if scope == "model":
        return torch.compile(net, mode=mode)
    blocks = [m for m in net.modules() if isinstance(m, REPEATED_BLOCKS)]
    if not blocks:
        names = ", ".join(c.__name__ for c in REPEATED_BLOCKS)
        raise ValueError(f"compile_scope 'blocks' needs a network with repeated blocks ({names}); "
                         f"{type(net).__name__} has none, use compile_scope 'model'")
    # All blocks of a class run one forward function, and torch.compile keeps at most
    # `recompile_limit` (default 8) graphs per function before it falls back to eager: allow
    # one graph per block, in training and in eval mode. Shapes stay static, one graph per
    # block shape: with the dynamic shapes torch.compile switches to after a recompilation,
    # inductor (torch 2.13, CPU) fails on these blocks ("cannot determine truth value of
    # Relational").
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(blocks))
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    return net


class Splits(NamedTuple):
    """Training and held-out data; labels are None for unlabelled datasets."""

    train_x: torch.Tensor
    train_y: Optional[torch.Tensor]
    eval_x: torch.Tensor
    eval_y: Optional[torch.Tensor]
    info: "data_lib.DataInfo"


def load_splits(data_cfg, *, seed: int) -> Splits:
    """The test split as held-out data where the dataset has one, otherwise (array data) a
    seeded `eval_fraction` share held out of the file."""
    common = dict(data_dir=data_cfg.data_dir, data_path=data_cfg.data_path, seed=seed,
                  num_samples=data_cfg.num_samples)
    train_ds, info = data_lib.load_dataset(data_cfg.dataset, split="train", **common)
    x, y = train_ds.tensors[0], _labels(train_ds)
    if data_cfg.dataset != "array":
        test_ds, _ = data_lib.load_dataset(data_cfg.dataset, split="test", **common)
        return Splits(x, y, test_ds.tensors[0], _labels(test_ds), info)
    if not 0 < data_cfg.eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {data_cfg.eval_fraction}")
    n_eval = max(1, round(len(x) * data_cfg.eval_fraction))
    if len(x) - n_eval < 1:
        raise ValueError(f"{data_cfg.data_path} holds {len(x)} samples: too few to hold out "
                         f"{data_cfg.eval_fraction:.0%} for evaluation and still train")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, held = perm[n_eval:], perm[:n_eval]
    return Splits(x[train], None if y is None else y[train], x[held],
                  None if y is None else y[held], info)


def _labels(ds) -> Optional[torch.Tensor]:
    return ds.tensors[1] if len(ds.tensors) > 1 else None


def load_train_eval(data_cfg, *, seed: int):
    """(train tensor, held-out tensor, DataInfo) of `load_splits`, without labels."""
    s = load_splits(data_cfg, seed=seed)
    return s.train_x, s.eval_x, s.info


def model_score_fn(model, sde: SDE, cfg: Config) -> ScoreFn:
    """The score function of a network built from `cfg` (`make_score_fn` with the config's
    prediction, time input and input scaling)."""
    m = cfg.model
    return make_score_fn(model, sde, prediction=m.prediction, time_input=m.time_input,
                         input_scaling=m.input_scaling)


def with_labels(model, labels: Optional[torch.Tensor]):
    """`model` with `class_labels=labels` bound (unchanged for None), so code calling
    model(x, time_input), such as `make_score_fn`, feeds the labels."""
    return model if labels is None else functools.partial(model, class_labels=labels)
