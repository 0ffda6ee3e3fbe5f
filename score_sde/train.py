"""Train a score model by denoising score matching (Song et al. 2021, Eq. 7).

Examples:
    python -m score_sde.train --sde vp                          # Fashion-MNIST, small U-Net
    python -m score_sde.train --sde vp --dataset toy_8gaussians --n_iters 2000
    python -m score_sde.train --sde ve --dataset array --data_path train.npy --workdir runs/x
    python -m score_sde.train --config configs/toy.py --dry_run   # print the resolved config

Everything goes to --workdir (default runs/<sde>_<dataset>): config.json, log.txt,
TensorBoard events (tb/), checkpoint.pt (the latest state, for resuming), snapshots/ and
samples/. Running again with the same --workdir resumes from checkpoint.pt. Every random draw of
step k (data order, dequantization, t, noise, dropout) is seeded from (seed, k), so a resumed run
ends with exactly the weights of an uninterrupted one on the CPU.
"""
import copy
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from . import datasets as data_lib
from .checkpoint import load_checkpoint, prune_snapshots, save_checkpoint
from .config import Config, from_dict, to_dict
from .losses import ScoreMatchingLoss
from .models import MODELS
from .sampling import sample_pc
from .score import make_score_fn
from .sde import SDE, CosineVPSDE, SubVPSDE, VESDE, VPSDE
from .visualize import save_samples_png

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Config file used when --config is not given, by dataset.
DEFAULT_CONFIGS = {"fashion_mnist": "fashion_mnist.py", "cifar10": "cifar10_ddpmpp_cont.py",
                   "array": "toy.py"}
TOY_CONFIG = "toy.py"
# The paper's EMA rates: 0.9999 for VP-type SDEs, 0.999 for VE.
EMA_RATES = {"vp": 0.9999, "subvp": 0.9999, "cosine": 0.9999, "ve": 0.999}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint, ...)."""


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
    """The network for data of per-sample shape `info.shape`."""
    if cfg.model.name not in MODELS:
        raise ValueError(f"unknown model {cfg.model.name!r}; accepted: {', '.join(MODELS)}")
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.name == "mlp":
        if len(info.shape) != 1:
            raise ValueError(f"model 'mlp' needs vector data [N, D], got per-sample shape "
                             f"{info.shape}; use an image model")
        kwargs.setdefault("dim", info.shape[0])
    else:
        if len(info.shape) != 3 or info.shape[1] != info.shape[2]:
            raise ValueError(f"model {cfg.model.name!r} needs square images [N, C, H, H], got "
                             f"per-sample shape {info.shape}")
        kwargs.setdefault("in_channels", info.shape[0])
        kwargs.setdefault("image_size", info.shape[1])
    return MODELS[cfg.model.name](**kwargs)


def load_train_eval(data_cfg, *, seed: int):
    """(train tensor, held-out tensor, DataInfo): the test split where the dataset has one,
    otherwise (array data) a seeded `eval_fraction` share held out of the file."""
    common = dict(data_dir=data_cfg.data_dir, data_path=data_cfg.data_path, seed=seed,
                  num_samples=data_cfg.num_samples)
    train_ds, info = data_lib.load_dataset(data_cfg.dataset, split="train", **common)
    x = train_ds.tensors[0]
    if data_cfg.dataset != "array":
        test_ds, _ = data_lib.load_dataset(data_cfg.dataset, split="test", **common)
        return x, test_ds.tensors[0], info
    if not 0 < data_cfg.eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {data_cfg.eval_fraction}")
    n_eval = max(1, round(len(x) * data_cfg.eval_fraction))
    if len(x) - n_eval < 1:
        raise ValueError(f"{data_cfg.data_path} holds {len(x)} samples: too few to hold out "
                         f"{data_cfg.eval_fraction:.0%} for evaluation and still train")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[n_eval:]], x[perm[:n_eval]], info


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.training.lr over cfg.training.warmup steps, then constant."""
    warmup = cfg.training.warmup
    return cfg.training.lr * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)


def step_seed(seed: int, step: int) -> int:
    """Seed of all random draws of one training step: a pure function of (seed, step)."""
    return (seed % (1 << 31)) * (1 << 32) + step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, parameters and floating buffers."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - rate)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


class Trainer:
    """Holds the state of one training run; `run()` executes the loop."""

    def __init__(self, cfg: Config, workdir: str):
        self.cfg, self.workdir = cfg, Path(workdir)
        tc = cfg.training
        self.device = resolve_device(tc.device)
        self.sde = build_sde(cfg)
        self.train_x, self.eval_x, self.info = load_train_eval(cfg.data, seed=tc.seed)
        self.order = data_lib.BatchOrder(len(self.train_x), tc.batch_size, seed=tc.seed)
        torch.manual_seed(tc.seed)
        self.model = build_model(cfg, self.info).to(self.device)
        if tc.channels_last and len(self.info.shape) == 3:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema_rate = tc.ema_rate if tc.ema_rate is not None else EMA_RATES[cfg.sde.name]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr,
                                          betas=(tc.adam_beta1, 0.999), eps=tc.adam_eps,
                                          weight_decay=tc.weight_decay)
        self.loss_fn = ScoreMatchingLoss(
            self.sde, weighting="likelihood" if tc.likelihood_weighting else "sigma2",
            reduction="mean" if tc.reduce_mean else "sum", eps=tc.eps,
            importance_sampling=tc.importance_sampling)
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.step = 0

    # --- data -----------------------------------------------------------------------------

    def batch(self, x_all: torch.Tensor, indices: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
        """Model-ready batch: dequantized to [-1, 1] for 8-bit images, as is otherwise."""
        x = x_all[indices]
        if self.info.discrete:
            x = data_lib.to_model_range(x, generator=generator)
        else:
            x = x.float()
        x = x.to(self.device, non_blocking=True)
        if self.cfg.training.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def score_fn(self, model: torch.nn.Module):
        return make_score_fn(model, self.sde, prediction=self.cfg.model.prediction,
                             time_input=self.cfg.model.time_input)

    def loss(self, model, x, generator):
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.cfg.training.bf16):
            return self.loss_fn(self.score_fn(model), x, generator=generator)

    # --- checkpoints ----------------------------------------------------------------------

    def state(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step,
                "config": to_dict(self.cfg)}

    def restore(self, state: Dict[str, Any]) -> None:
        saved = from_dict(state["config"])
        if saved.model != self.cfg.model or saved.sde != self.cfg.sde:
            raise TrainingError(
                f"{self.workdir / 'checkpoint.pt'} was written for a different model or SDE "
                f"configuration ({saved.model.name}, {saved.sde.name}); use a new --workdir")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> Dict[str, float]:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        tc = self.cfg.training
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(self.workdir / "checkpoint.pt", self.workdir / "snapshots")
        if state is not None:
            self.restore(state)
        (self.workdir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        log = open(self.workdir / "log.txt", "a", buffering=1)
        writer = SummaryWriter(str(self.workdir / "tb"))
        log.write(f"start at step {self.step} of {tc.n_iters} on {self.device}\n")
        bar = tqdm(total=tc.n_iters, initial=self.step, desc="train", disable=None)
        last_time, last_step, metrics = time.time(), self.step, {}
        self.model.train()
        while self.step < tc.n_iters:
            step = self.step
            seed = step_seed(tc.seed, step)
            torch.manual_seed(seed)  # dropout and any other global draws of this step
            gen = torch.Generator(device=self.device).manual_seed(seed)
            data_gen = torch.Generator().manual_seed(seed)
            x = self.batch(self.train_x, self.order.indices(step), data_gen)
            lr = learning_rate(step, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.loss(self.forward, x, gen)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss {loss.item()} at step {step}; the last "
                                    f"good checkpoint is kept in {self.workdir}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if not torch.isfinite(grad_norm):
                raise TrainingError(f"non-finite gradient norm at step {step}; the last good "
                                    f"checkpoint is kept in {self.workdir}")
            self.optimizer.step()
            ema_update(self.ema, self.model, self.ema_rate)
            self.step += 1
            bar.update(1)

            if self.step % tc.log_every == 0 or self.step == tc.n_iters:
                now = time.time()
                rate = (self.step - last_step) * tc.batch_size / max(now - last_time, 1e-9)
                last_time, last_step = now, self.step
                metrics = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                           "samples_per_s": rate}
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, self.step)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", per_s=f"{rate:.0f}")
                log.write(f"step {self.step} " + " ".join(f"{k}={v:.6g}"
                                                          for k, v in metrics.items()) + "\n")
            if self.step % tc.eval_every == 0 or self.step == tc.n_iters:
                metrics["eval_loss"] = self.eval_loss()
                writer.add_scalar("eval/loss_ema", metrics["eval_loss"], self.step)
                log.write(f"step {self.step} eval_loss_ema={metrics['eval_loss']:.6g}\n")
            if tc.sample_every > 0 and (self.step % tc.sample_every == 0
                                        or self.step == tc.n_iters):
                self.write_samples()
            snapshot = self.step % tc.snapshot_every == 0 or self.step == tc.n_iters
            if snapshot or self.step % tc.checkpoint_every == 0:
                state = self.state()
                save_checkpoint(state, self.workdir / "checkpoint.pt")
                if snapshot:
                    snaps = self.workdir / "snapshots"
                    save_checkpoint(state, snaps / f"snapshot_{self.step:08d}.pt")
                    prune_snapshots(snaps, keep=tc.keep_snapshots)
        bar.close()
        writer.close()
        log.write(f"done at step {self.step}\n")
        log.close()
        return metrics

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Held-out loss of the EMA weights on fixed batches with fixed noise."""
        tc = self.cfg.training
        gen = torch.Generator(device=self.device).manual_seed(step_seed(tc.seed + 1, 0))
        data_gen = torch.Generator().manual_seed(step_seed(tc.seed + 1, 0))
        n = len(self.eval_x)
        size = min(tc.batch_size, n)
        total = 0.0
        for b in range(tc.eval_batches):
            idx = (torch.arange(size) + b * size) % n
            total += self.loss(self.ema, self.batch(self.eval_x, idx, data_gen), gen).item()
        return total / tc.eval_batches

    @torch.no_grad()
    def write_samples(self) -> Optional[Path]:
        """Samples of the EMA model (Euler–Maruyama, the SDE's steps) written as a PNG."""
        tc = self.cfg.training
        gen = torch.Generator(device=self.device).manual_seed(step_seed(tc.seed + 2, 0))
        eps = 1e-5 if self.cfg.sde.name == "ve" else 1e-3
        x, _ = sample_pc(self.sde, self.score_fn(self.ema), (tc.num_samples,) + self.info.shape,
                         predictor="euler_maruyama", corrector="none", eps=eps,
                         device=self.device, generator=gen)
        return save_samples_png(x.cpu(), self.workdir / "samples" / f"samples_{self.step:08d}.png")


def train(cfg: Config, workdir: str) -> Dict[str, float]:
    """Trains (or resumes) with `cfg`, writing into `workdir`; returns the last metrics."""
    return Trainer(cfg, workdir).run()


# --- command line ---------------------------------------------------------------------------

def load_config_file(path: str) -> Config:
    """Runs `get_config()` of a config file and checks that it returns a Config."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_score_sde_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config file {path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ValueError(f"get_config() in {path} must return score_sde.config.Config, got "
                         f"{type(cfg).__name__}")
    return cfg


def default_config_path(dataset: str) -> Path:
    return CONFIG_DIR / DEFAULT_CONFIGS.get(dataset, TOY_CONFIG)


def apply_overrides(cfg: Config, overrides: Dict[str, Any]) -> Config:
    """Returns cfg with "section.field" -> value overrides applied."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        section, name = key.split(".")
        sections[section] = dataclasses.replace(sections[section], **{name: value})
    return Config(**sections)


def check_config(cfg: Config) -> None:
    """Cross-field checks whose failure names both settings."""
    tc = cfg.training
    if tc.importance_sampling and not tc.likelihood_weighting:
        raise ValueError("--importance_sampling needs --likelihood_weighting (it samples t for "
                         "the likelihood-weighted loss)")
    if cfg.data.dataset == "array" and not cfg.data.data_path:
        raise ValueError("--dataset array needs --data_path FILE.npy or FILE.npz")
    if tc.bf16 and tc.device == "cpu":
        raise ValueError("--bf16 autocast is for CUDA; drop --bf16 or use --device cuda")
    for name in ("n_iters", "batch_size", "log_every", "eval_every", "checkpoint_every",
                 "snapshot_every", "keep_snapshots", "eval_batches", "num_samples"):
        if getattr(tc, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(tc, name)}")
    if not tc.lr > 0:
        raise ValueError(f"lr must be > 0, got {tc.lr}")


def _define_flags():
    from absl import flags

    flags.DEFINE_enum("sde", "vp", list(EMA_RATES), "Forward SDE.")
    flags.DEFINE_string("config", None, "Config file in configs/ defining get_config(); "
                        "default: chosen by --dataset.")
    flags.DEFINE_enum("dataset", "fashion_mnist", list(data_lib.DATASETS), "Training data.")
    flags.DEFINE_string("data_dir", None, "Folder of the image dataset files.")
    flags.DEFINE_string("data_path", None, ".npy/.npz float array [N, ...] for --dataset array.")
    flags.DEFINE_enum("model", None, list(MODELS), "Network; default: the config's.")
    flags.DEFINE_string("workdir", None, "Run folder; default runs/<sde>_<dataset>.")
    flags.DEFINE_integer("n_iters", None, "Training steps.", lower_bound=1)
    flags.DEFINE_integer("batch_size", None, "Global batch size.", lower_bound=1)
    flags.DEFINE_float("lr", None, "Adam learning rate.", lower_bound=0.0)
    flags.DEFINE_integer("seed", None, "Random seed.", lower_bound=0)
    flags.DEFINE_string("device", None, "auto, cpu, cuda or cuda:N.")
    flags.DEFINE_boolean("likelihood_weighting", None, "Weight the loss by g(t)^2.")
    flags.DEFINE_boolean("importance_sampling", None, "Sample t by g^2/sigma^2 "
                         "(with --likelihood_weighting).")
    flags.DEFINE_boolean("bf16", None, "bf16 autocast (CUDA).")
    flags.DEFINE_boolean("channels_last", None, "Channels-last memory format (CUDA).")
    flags.DEFINE_boolean("compile", None, "torch.compile the model.")
    flags.DEFINE_integer("log_every", None, "Steps between log lines.", lower_bound=1)
    flags.DEFINE_integer("eval_every", None, "Steps between held-out losses.", lower_bound=1)
    flags.DEFINE_integer("sample_every", None, "Steps between sample grids (0: never).",
                         lower_bound=0)
    flags.DEFINE_integer("checkpoint_every", None, "Steps between preemption checkpoints.",
                         lower_bound=1)
    flags.DEFINE_integer("snapshot_every", None, "Steps between numbered snapshots.",
                         lower_bound=1)
    flags.DEFINE_boolean("dry_run", False, "Print the resolved config and exit.")


# flag name -> config field it overrides
FLAG_FIELDS = {
    "sde": "sde.name", "dataset": "data.dataset", "data_dir": "data.data_dir",
    "data_path": "data.data_path", "model": "model.name", "n_iters": "training.n_iters",
    "batch_size": "training.batch_size", "lr": "training.lr", "seed": "training.seed",
    "device": "training.device", "likelihood_weighting": "training.likelihood_weighting",
    "importance_sampling": "training.importance_sampling", "bf16": "training.bf16",
    "channels_last": "training.channels_last", "compile": "training.compile",
    "log_every": "training.log_every", "eval_every": "training.eval_every",
    "sample_every": "training.sample_every", "checkpoint_every": "training.checkpoint_every",
    "snapshot_every": "training.snapshot_every",
}


def resolve(flag_values) -> tuple:
    """(config, workdir) from parsed flags: config file, then explicitly given flags."""
    path = flag_values.config or default_config_path(flag_values.dataset)
    cfg = load_config_file(str(path))
    overrides = {field: getattr(flag_values, name) for name, field in FLAG_FIELDS.items()
                 if flag_values[name].present or (name in ("sde", "dataset")
                                                  and not flag_values.config)}
    cfg = apply_overrides(cfg, overrides)
    check_config(cfg)
    workdir = flag_values.workdir or os.path.join("runs", f"{cfg.sde.name}_{cfg.data.dataset}")
    return cfg, workdir


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]}")
    try:
        cfg, workdir = resolve(flags.FLAGS)
        if flags.FLAGS.dry_run:
            print(json.dumps({"workdir": workdir, **to_dict(cfg)}, indent=2))
            return
        metrics = train(cfg, workdir)
    except (ValueError, FileNotFoundError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"workdir": workdir, "step": cfg.training.n_iters, **metrics}))


def _parse_flags(argv):
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
