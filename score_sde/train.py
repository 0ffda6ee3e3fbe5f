"""Train a score model by denoising score matching (Song et al. 2021, Eq. 7).

Examples:
    python -m score_sde.train --config fashion_mnist_cpu        # CPU quick start, ~30 min
    python -m score_sde.train --sde vp                          # Fashion-MNIST, small U-Net
    python -m score_sde.train --sde vp --dataset toy_8gaussians --n_iters 2000
    python -m score_sde.train --sde ve --dataset array --data_path train.npy --workdir runs/x
    python -m score_sde.train --config toy --dry_run            # print the resolved config
    python -m score_sde.train --class_conditional --label_dropout 0.1   # for CFG sampling
    torchrun --standalone --nproc_per_node=4 -m score_sde.train --batch_size 128  # 4 GPUs

--config takes a file or the name of a config shipped with the package (the repository's
configs/, installed as score_sde.configs). Everything goes to --workdir (default
runs/<sde>_<dataset>): config.json, log.txt, TensorBoard events (tb/: scalars and sample
grids), checkpoint.pt (the latest state, for resuming), snapshots/ and samples/. The console
(stderr) shows the log lines and, on a terminal, a progress bar with the smoothed loss,
images/s and the ETA; the first lines give the device, the model's size and the expected
duration (--quiet: only warnings, errors and the result).

Running again with the same --workdir resumes from checkpoint.pt. Every random draw of step k
(data order, dequantization, label dropout, t, noise, dropout) is seeded from (seed, k), so a
resumed run ends with exactly the weights of an uninterrupted one on the CPU. Checkpoints are
written atomically (`score_sde.checkpoint`): a run killed at any moment, even while writing
one, resumes from the last complete one; a damaged checkpoint.pt is reported and the newest
good snapshot is used instead.

Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, torchrun's shutdown) finishes the step
under way, writes checkpoint.pt and prints "stopped at step k (SIGINT); run the same command
to resume"; a sample grid or held-out loss under way is abandoned. Under torchrun every
process stops at the same step.

Exit status: 0 done; 2 bad input (flags, config, data, a checkpoint of another model in
--workdir, a batch or sample grid too large for the memory); 3 a non-finite loss or gradient
(without --skip_nonfinite); 4 the file system failed (disk full, no permission), e.g. while
writing a checkpoint: the files written before stay intact and the same command resumes once
that is fixed; 130 / 143 stopped by SIGINT / SIGTERM. Errors print one line on stderr (and,
once training has started, in log.txt).

Multi-process training (DistributedDataParallel) starts when torchrun's RANK, WORLD_SIZE and
LOCAL_RANK are set: backend "nccl" on CUDA (process LOCAL_RANK on cuda:LOCAL_RANK), "gloo" on
the CPU. --batch_size stays the global batch. Each process takes its contiguous shard of the
single-process batch (`BatchOrder`), and the per-sample draws (dequantization, label dropout,
t and z) are made for the whole global batch on every process from the step's generators, each
process keeping its slice; so the union of the shards is exactly the single-process batch with
exactly its noise, and, since DDP averages the gradients of equal-size shards, the run follows
the single-process one up to floating-point summation order. Only network dropout masks differ
(each process draws its own). Rank 0 alone writes logs, TensorBoard, samples and checkpoints and
computes the held-out loss; every process reads the checkpoint on resume, so --workdir must be
on a file system all of them see.
"""
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

STOPPED_BEFORE_TRAINING = "stopped by SIGINT before training started; nothing was written"

try:  # torch loads here, for a second or more: Ctrl-C meanwhile gets the command line's answer
    from . import datasets as data_lib
    from ._utils import stderr_line
    from .cli import EXIT_BAD_INPUT, EXIT_FILE_SYSTEM, EXIT_NUMERICAL, check_no_empty_flags
    from .config import (COMPILE_MODES, COMPILE_SCOPES, GRID_SAMPLERS, LR_DECAYS, MAX_SEED,
                         apply_overrides, check_config, find_config, load_config_file, to_dict)
    from .distributed import DistInfo, dist_from_env
    from .models import MODELS
    from .optim import EMA_RATES
    from .stopping import TrainingInterrupted
    from .trainer import (CheckpointWriteError, NonFiniteError, TrainingError, check_world_size,
                          train)
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise  # an import by other code: theirs to handle
    print(STOPPED_BEFORE_TRAINING, file=sys.stderr)
    sys.exit(128 + signal.SIGINT)

# Config file used when --config is not given, by dataset (a shipped config, `find_config`).
DEFAULT_CONFIGS = {"fashion_mnist": "fashion_mnist", "cifar10": "cifar10_ddpmpp_cont",
                   "array": "toy"}
TOY_CONFIG = "toy"
# The shipped config sized for a CPU, which the default Fashion-MNIST run points to there.
CPU_QUICK_START = "fashion_mnist_cpu"
# Exit status of the command line when the file system fails (disk full, no permission): the
# run can resume once that is fixed. 2 (bad input) and 3 (non-finite) are the tools' codes;
# a run stopped by a signal exits with 128 + its number (130 SIGINT, 143 SIGTERM).
EXIT_WRITE_FAILED = EXIT_FILE_SYSTEM


# VE runs of a dataset whose default config is a VP model: the paper's VE model, with noise
# levels for our data range (the VP config's would keep SDEConfig's 0.01 to 50).
DEFAULT_VE_CONFIGS = {"cifar10": "cifar10_ncsnpp_cont"}


def default_config_path(dataset: str, sde: str = "vp") -> Path:
    name = DEFAULT_VE_CONFIGS.get(dataset) if sde == "ve" else None
    return find_config(name or DEFAULT_CONFIGS.get(dataset, TOY_CONFIG))


def _define_flags():
    from absl import flags

    flags.DEFINE_enum("sde", "vp", list(EMA_RATES), "Forward SDE.")
    flags.DEFINE_string("config", None, "Config file defining get_config(), or the name of a "
                        "shipped one (toy, fashion_mnist, fashion_mnist_cpu, cifar10_ddpmpp_cont, "
                        "...); default: chosen by --dataset (with --sde ve for cifar10: "
                        "cifar10_ncsnpp_cont).")
    flags.DEFINE_enum("dataset", "fashion_mnist", list(data_lib.DATASETS), "Training data.")
    flags.DEFINE_string("data_dir", None, "Folder of the image dataset files.")
    flags.DEFINE_string("data_path", None, ".npy/.npz float array [N, ...] for --dataset array.")
    flags.DEFINE_enum("model", None, list(MODELS), "Network; default: the config's (another "
                      "network gets its default sizes, not the config's model kwargs).")
    flags.DEFINE_string("workdir", None, "Run folder; default runs/<sde>_<dataset>.")
    flags.DEFINE_integer("n_iters", None, "Training steps.", lower_bound=1)
    flags.DEFINE_integer("batch_size", None, "Global batch size.", lower_bound=1)
    flags.DEFINE_float("lr", None, "Adam learning rate.", lower_bound=0.0)
    flags.DEFINE_enum("lr_decay", None, list(LR_DECAYS), "Learning-rate decay after warm-up.")
    flags.DEFINE_integer("seed", None, "Random seed.", lower_bound=0, upper_bound=MAX_SEED)
    flags.DEFINE_string("device", None, "auto, cpu, cuda or cuda:N.")
    flags.DEFINE_boolean("likelihood_weighting", None, "Weight the loss by g(t)^2.")
    flags.DEFINE_boolean("importance_sampling", None, "Sample t by g^2/sigma^2 "
                         "(with --likelihood_weighting).")
    flags.DEFINE_boolean("bf16", None, "bf16 autocast (CUDA).")
    flags.DEFINE_boolean("channels_last", None, "Channels-last memory format (CUDA).")
    flags.DEFINE_boolean("compile", None, "torch.compile the model.")
    flags.DEFINE_enum("compile_mode", None, list(COMPILE_MODES), "torch.compile mode; "
                      "reduce-overhead replays CUDA graphs.")
    flags.DEFINE_enum("compile_scope", None, list(COMPILE_SCOPES), "What --compile compiles: "
                      "model (the whole network) or blocks (each repeated U-Net block on its "
                      "own; a shorter warm-up).")
    flags.DEFINE_integer("log_every", None, "Steps between log lines.", lower_bound=1)
    flags.DEFINE_integer("eval_every", None, "Steps between held-out losses.", lower_bound=1)
    flags.DEFINE_integer("sample_every", None, "Steps between sample grids (0: never).",
                         lower_bound=0)
    flags.DEFINE_enum("sampler", None, list(GRID_SAMPLERS), "Sampler of the sample grids: "
                      "dpm_solver (fast, 20 evaluations) or pc (Euler-Maruyama, the SDE's steps).")
    flags.DEFINE_integer("sample_steps", None, "Steps of the sample-grid sampler; default 20 "
                         "(dpm_solver) or the SDE's (pc).", lower_bound=1)
    flags.DEFINE_integer("checkpoint_every", None, "Steps between preemption checkpoints.",
                         lower_bound=1)
    flags.DEFINE_integer("snapshot_every", None, "Steps between numbered snapshots.",
                         lower_bound=1)
    flags.DEFINE_boolean("class_conditional", None, "Condition on the dataset's class labels "
                         "(with label dropout, for classifier-free guidance).")
    flags.DEFINE_float("label_dropout", None, "Probability of replacing a label by the null "
                       "label (with --class_conditional).", lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_boolean("skip_nonfinite", None, "Skip steps whose loss or gradient is not "
                         "finite instead of stopping.")
    flags.DEFINE_integer("max_nonfinite", None, "With --skip_nonfinite: stop after more than "
                         "this many skipped steps in a row.", lower_bound=0)
    flags.DEFINE_boolean("dry_run", False, "Print the resolved config and exit.")
    flags.DEFINE_boolean("quiet", False, "No progress bar and no log lines on the console (they "
                         "still go to log.txt); warnings, errors and the result still appear.")


# flag name -> config field it overrides
FLAG_FIELDS = {
    "sde": "sde.name", "dataset": "data.dataset", "data_dir": "data.data_dir",
    "data_path": "data.data_path", "model": "model.name", "n_iters": "training.n_iters",
    "batch_size": "training.batch_size", "lr": "training.lr", "seed": "training.seed",
    "lr_decay": "training.lr_decay",
    "device": "training.device", "likelihood_weighting": "training.likelihood_weighting",
    "importance_sampling": "training.importance_sampling", "bf16": "training.bf16",
    "channels_last": "training.channels_last", "compile": "training.compile",
    "compile_mode": "training.compile_mode", "compile_scope": "training.compile_scope",
    "log_every": "training.log_every", "eval_every": "training.eval_every",
    "sample_every": "training.sample_every", "sampler": "training.sampler",
    "sample_steps": "training.sample_steps", "checkpoint_every": "training.checkpoint_every",
    "snapshot_every": "training.snapshot_every", "class_conditional": "model.class_conditional",
    "label_dropout": "training.label_dropout", "skip_nonfinite": "training.skip_nonfinite",
    "max_nonfinite": "training.max_nonfinite",
}


def resolve(flag_values) -> tuple:
    """(config, workdir) from parsed flags: config file, then explicitly given flags."""
    check_no_empty_flags(flag_values)
    path = find_config(flag_values.config) if flag_values.config else \
        default_config_path(flag_values.dataset, flag_values.sde)
    cfg = load_config_file(str(path))
    overrides = {field: getattr(flag_values, name) for name, field in FLAG_FIELDS.items()
                 if flag_values[name].present or (name in ("sde", "dataset")
                                                  and not flag_values.config)}
    if "model.name" in overrides and overrides["model.name"] != cfg.model.name:
        # The config's constructor arguments belong to its own model, not to this one.
        overrides["model.kwargs"] = {}
    cfg = apply_overrides(cfg, overrides)
    check_config(cfg)
    # Absolute, so that the tools reading config.json find the same files from any folder.
    cfg = apply_overrides(cfg, {f"data.{name}": os.path.abspath(getattr(cfg.data, name))
                                for name in ("data_dir", "data_path")
                                if getattr(cfg.data, name) is not None})
    if flag_values["label_dropout"].present and not cfg.model.class_conditional:
        raise ValueError("--label_dropout needs --class_conditional")
    if flag_values["max_nonfinite"].present and not cfg.training.skip_nonfinite:
        raise ValueError("--max_nonfinite needs --skip_nonfinite")
    for name in ("sampler", "sample_steps"):
        if flag_values[name].present and cfg.training.sample_every == 0:
            raise ValueError(f"--{name} sets the sampler of the sample grids, which "
                             f"--sample_every 0 turns off: give --sample_every > 0 or drop "
                             f"--{name}")
    workdir = flag_values.workdir or os.path.join("runs", f"{cfg.sde.name}_{cfg.data.dataset}")
    for path in [Path(workdir).absolute()] + list(Path(workdir).absolute().parents):
        if path.is_symlink() and not path.exists():
            where = "is" if path == Path(workdir).absolute() else f"lies under {path},"
            raise ValueError(f"--workdir {workdir} {where} a link to {os.readlink(path)}, "
                             f"which does not exist")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} exists and is not a folder")
    for parent in Path(workdir).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--workdir {workdir} lies under {parent}, which is a file, "
                                 f"not a folder")
            break
    return cfg, workdir


def slow_hint(flag_values) -> Optional[str]:
    """The pointer to the CPU quick start, for the default Fashion-MNIST config only."""
    if flag_values.config or flag_values.dataset != "fashion_mnist":
        return None
    # Its own workdir: the default one may hold this run's checkpoint, of another model.
    return (f"that is long for a CPU: `python -m score_sde.train --config {CPU_QUICK_START} "
            f"--workdir runs/vp_{CPU_QUICK_START}` trains a 1.1M-parameter model sized for two "
            f"CPU cores (about half an hour; BENCHMARKS.md)")


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        stderr_line(f"error: unexpected arguments {argv[1:]}")
        sys.exit(EXIT_BAD_INPUT)
    dist = DistInfo()
    try:
        dist = dist_from_env(os.environ)
        cfg, workdir = resolve(flags.FLAGS)
        check_world_size(cfg, dist)
        if flags.FLAGS.dry_run:
            if dist.is_main:
                print(json.dumps({"workdir": workdir, **to_dict(cfg)}, indent=2))
            return
        metrics = train(cfg, workdir, dist=dist, quiet=flags.FLAGS.quiet,
                        slow_hint=slow_hint(flags.FLAGS))
    except (ValueError, OSError, TrainingError) as err:
        where = f" (rank {dist.rank})" if dist.world_size > 1 else ""
        stderr_line(f"error{where}: {err}")
        sys.exit(_exit_status(err))
    except TrainingInterrupted as stop:
        if dist.is_main:
            stderr_line(str(stop))
        sys.exit(stop.exit_status)
    if dist.is_main:
        print(json.dumps({"workdir": workdir, "step": cfg.training.n_iters, **metrics}))


def _exit_status(err: BaseException) -> int:
    if isinstance(err, NonFiniteError):
        return EXIT_NUMERICAL
    if isinstance(err, CheckpointWriteError) or (isinstance(err, OSError)
                                                 and not isinstance(err, FileNotFoundError)):
        return EXIT_WRITE_FAILED
    return EXIT_BAD_INPUT


def _parse_flags(argv):
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        stderr_line(f"error: {err}")
        sys.exit(EXIT_BAD_INPUT)


def run() -> None:
    from absl import app

    _define_flags()
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:  # Ctrl-C outside `train`: while parsing flags, say
        stderr_line(STOPPED_BEFORE_TRAINING)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    run()
