"""Train an image classifier: noise-conditional (classifier guidance) or clean (metrics).

Examples:
    python tools/train_classifier.py --kind clean --dataset fashion_mnist \\
        --output runs/classifiers/fashion_clean.pt
    python tools/train_classifier.py --kind noisy --sde vp --dataset fashion_mnist \\
        --output runs/classifiers/fashion_vp.pt
    python tools/train_classifier.py --kind noisy --sde ve --dataset cifar10 \\
        --data_dir ~/data/cifar10 --n_iters 50000 --output runs/classifiers/cifar10_ve.pt

Run it from an install of the package (`pip install -e .`) or with PYTHONPATH set to the
repository root.

Kinds.
- clean: a `score_sde.classifier.FeatureClassifier` on the 8-bit images mapped to [-1, 1]
  at the bin centres (`to_model_range(..., dequantize=False)`, as tools/fid.py reads them),
  cross-entropy. Its penultimate layer is the feature space of tools/fid.py --classifier.
- noisy: a `NoiseConditionalClassifier` for classifier guidance, trained by
  `noisy_classifier_loss`: uniformly dequantized images (as the score models see them), then
  x_t = alpha(t) x + sigma(t) z with t ~ U(--eps, 1) under the --sde with its default
  parameters (those of `score_sde.config.SDEConfig`), or under the SDE of the run folder
  --sde_of with its parameters and the interval its model reads images in (what
  tools/sample.py needs to guide that run: [0, 1] for the paper's converted VE models,
  stored with the run's checkpoint; else [-1, 1]), cross-entropy of the classifier at x_t.
  --time_input is the conversion of t fed to the network: "scaled_t" (999 t, sinusoidal
  embedding; default for vp, subvp and cosine) or "std" (sigma(t), Fourier embedding; default
  for ve), the conventions of the paper's score models. Read it back with
  `score_sde.classifier.classifier_log_prob_fn(model, sde, time_input=meta["time_input"])`.

Training. Adam at a constant --lr for --n_iters steps of --batch_size images drawn by
`score_sde.datasets.BatchOrder` (seeded epochs); the noise of step k is seeded from (--seed, k)
and the weights are initialised from --seed. A progress bar shows the running loss.

Evaluation. On the test split (first --num_test images): the accuracy of the clean classifier;
for the noisy one, the accuracy and loss at each of the fixed --eval_times, from bin-centred
images with noise seeded from (--seed, time, batch), and their mean.

Output. The classifier checkpoint --output (atomic and checksummed, `save_classifier`, with
meta: kind, dataset, image_shape, num_classes, sde, sde_config, time_input, eps, data_range,
n_iters, seed and the test accuracies), and a JSON summary: one line on stdout and the same
object in --summary (default: --output with the suffix .json): every setting, num_params,
num_train, num_test, train_loss (mean of the last 100 steps), test_accuracy (clean: the
accuracy; noisy: the mean over --eval_times), test_accuracy_at_t and test_loss_at_t (noisy
only), seconds.

Exit status: 0 done; 2 bad input (flags, missing or malformed data), one line on stderr; 3 a
non-finite training loss (one line naming the step) or test loss after the last step (nothing is
written); 4 a file that cannot be read or written (no permission, a full disk), one line; 130
Ctrl-C, one line.
"""
import sys

try:  # Ctrl-C while torch loads (seconds) gives the one line it gives during the work
    import dataclasses
    import json
    import math
    import time
    from pathlib import Path
    from typing import Dict, List, Optional, Sequence, Tuple

    import torch
    import torch.nn.functional as F

    from score_sde._utils import stderr_line
    from score_sde.cli import (EXIT_INTERRUPTED, InputError, check_distinct, check_not_data,
                               check_path, run_tool, write_json)
    from score_sde.classifier import (FeatureClassifier, NoiseConditionalClassifier,
                                      noisy_classifier_loss, save_classifier)
    from score_sde.config import MAX_SEED, Config, SDEConfig, from_dict
    from score_sde.datasets import BatchOrder, DataInfo, load_dataset, mix_seed, to_model_range
    from score_sde.distributed import resolve_device
    from score_sde.sde import SDE
    from score_sde.build import build_sde
    from score_sde.checkpoint import read_checkpoint
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    sys.stderr.write("interrupted (SIGINT)\n")
    sys.exit(130)

DATASETS = ("fashion_mnist", "cifar10")
SDES = ("vp", "subvp", "ve", "cosine")
TIME_INPUTS = ("scaled_t", "std")
DEFAULT_TIME_INPUT = {"vp": "scaled_t", "subvp": "scaled_t", "ve": "std", "cosine": "scaled_t"}
# The time input decides the embedding: sinusoidal features of 999 t, Fourier of log sigma.
EMBEDDINGS = {"scaled_t": "positional", "std": "fourier"}
NOISY_ONLY = ("sde", "sde_of", "time_input", "eps", "eval_times")
CLEAN_ONLY = ("feature_dim",)
DATA_RANGE = (-1.0, 1.0)  # the loaders' interval for 8-bit images (`to_model_range`)
LOSS_WINDOW = 100  # steps averaged for the reported training loss
# Independent random streams derived from --seed.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1
# Adam keeps lr in float32: a larger value overflows there.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Adam's first step moves a weight by up to lr / (1 - beta1) = 10 lr, which must stay finite.
MAX_LR = FLOAT32_MAX / 10


class TrainingError(RuntimeError):
    """A non-finite loss: exit status 3."""


def build_classifier(kind: str, info: DataInfo, *, width: int, feature_dim: int,
                     time_input: Optional[str]) -> torch.nn.Module:
    """The classifier of `kind` for images of `info.shape` with `info.num_classes` classes."""
    channels, size = info.shape[0], info.shape[1]
    if kind == "clean":
        return FeatureClassifier(in_channels=channels, num_classes=info.num_classes,
                                 width=width, feature_dim=feature_dim)
    return NoiseConditionalClassifier(image_size=size, in_channels=channels,
                                      num_classes=info.num_classes, nf=width,
                                      embedding_type=EMBEDDINGS[time_input])


def batch_loss(kind: str, model: torch.nn.Module, sde: Optional[SDE], images: torch.Tensor,
               labels: torch.Tensor, *, time_input: Optional[str], eps: float,
               generator: torch.Generator, t: Optional[torch.Tensor] = None,
               dequantize: bool = True, data_range: Tuple[float, float] = DATA_RANGE):
    """(loss, log-probabilities [B, K]) of one batch of uint8 images on the model's device,
    scaled to `data_range` (noisy: the interval the guided run's model reads)."""
    if kind == "clean":
        x = to_model_range(images, dequantize=False)
        log_probs = F.log_softmax(model(x), dim=1)
        return F.nll_loss(log_probs, labels), log_probs
    x = to_model_range(images, generator=generator, dequantize=dequantize,
                       data_range=data_range)
    return noisy_classifier_loss(model, sde, x, labels, time_input=time_input, eps=eps, t=t,
                                 generator=generator)


@torch.no_grad()
def evaluate(kind: str, model: torch.nn.Module, sde: Optional[SDE], images: torch.Tensor,
             labels: torch.Tensor, *, batch_size: int, device: torch.device, seed: int,
             time_input: Optional[str], eps: float, eval_times: Sequence[float],
             data_range: Tuple[float, float] = DATA_RANGE) -> Dict[str, object]:
    """Test accuracy (clean) or accuracy and loss at each of `eval_times` (noisy)."""
    model.eval()
    times = [None] if kind == "clean" else list(eval_times)
    accuracy, losses = {}, {}
    for i, t_value in enumerate(times):
        correct, loss_sum = 0, 0.0
        for b, start in enumerate(range(0, len(images), batch_size)):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            gen = torch.Generator(device=device).manual_seed(mix_seed(seed, _EVAL_STREAM, i, b))
            t = None if t_value is None else torch.full((len(x),), t_value, dtype=torch.float64,
                                                        device=device)
            loss, log_probs = batch_loss(kind, model, sde, x, y, time_input=time_input, eps=eps,
                                         generator=gen, t=t, dequantize=False,
                                         data_range=data_range)
            correct += int((log_probs.argmax(dim=1) == y).sum())
            loss_sum += loss.item() * len(x)
        accuracy[t_value], losses[t_value] = correct / len(images), loss_sum / len(images)
    if kind == "clean":
        return {"test_accuracy": accuracy[None], "test_loss": losses[None],
                "test_accuracy_at_t": None, "test_loss_at_t": None}
    return {"test_accuracy": sum(accuracy.values()) / len(accuracy),
            "test_loss": sum(losses.values()) / len(losses),
            "test_accuracy_at_t": {f"{t:g}": a for t, a in accuracy.items()},
            "test_loss_at_t": {f"{t:g}": v for t, v in losses.items()}}


# --- command line -------------------------------------------------------------------------------

def define_flags(fv) -> None:
    """Defines the tool's flags on the absl FlagValues `fv`."""
    from absl import flags

    f, kw = flags, dict(flag_values=fv)
    f.DEFINE_enum("kind", None, ["noisy", "clean"], "noisy: time-dependent classifier for "
                  "guidance; clean: feature classifier for tools/fid.py.", **kw)
    f.DEFINE_enum("dataset", "fashion_mnist", list(DATASETS), "Labelled image dataset.", **kw)
    f.DEFINE_string("data_dir", None, "Dataset folder; default: the loader's.", **kw)
    f.DEFINE_enum("sde", "vp", list(SDES), "Forward SDE of the noisy data (noisy), with its "
                  "default parameters.", **kw)
    f.DEFINE_string("sde_of", None, "A run folder (its config.json) whose SDE, parameters "
                    "included, the classifier takes instead of --sde (noisy): the one "
                    "tools/sample.py needs to guide that run.", **kw)
    f.DEFINE_enum("time_input", None, list(TIME_INPUTS), "Network time input (noisy); "
                  "default scaled_t for vp/subvp, std for ve.", **kw)
    f.DEFINE_float("eps", 1e-5, "Smallest training time, in (0, 1) (noisy).", **kw)
    f.DEFINE_list("eval_times", ["0.001", "0.1", "0.25", "0.5", "1.0"],
                  "Times in (0, 1] of the test accuracies (noisy).", **kw)
    f.DEFINE_integer("n_iters", 2000, "Training steps.", lower_bound=1, **kw)
    f.DEFINE_integer("batch_size", 128, "Batch size (training and evaluation).",
                     lower_bound=1, **kw)
    f.DEFINE_float("lr", 1e-3, "Adam learning rate (> 0, within float32's range).", **kw)
    f.DEFINE_integer("width", 32, "Base channel count (the noisy network's nf).",
                     lower_bound=4, **kw)
    f.DEFINE_integer("feature_dim", 128, "Size of the feature layer (clean).", lower_bound=1,
                     **kw)
    f.DEFINE_integer("num_test", None, "Evaluate on the first N test images; default all.",
                     lower_bound=1, **kw)
    f.DEFINE_integer("seed", 0, "Seeds initialisation, data order and noise.", lower_bound=0,
                     upper_bound=MAX_SEED, **kw)
    f.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "auto: CUDA if available.", **kw)
    f.DEFINE_string("output", None, "Classifier checkpoint to write.", **kw)
    f.DEFINE_string("summary", None, "JSON summary; default: --output with suffix .json.", **kw)
    flags.register_validator("lr", lambda v: 0 < v <= MAX_LR,
                             message=f"--lr must be a number in (0, {MAX_LR:.3g}] (Adam's first "
                                     f"step, 10 lr, must fit in float32)", flag_values=fv)
    flags.register_validator("eps", lambda v: 0 < v < 1, message="--eps must lie in (0, 1)",
                             flag_values=fv)
    flags.mark_flags_as_required(["kind", "output"], flag_values=fv)


def _sde_of(fv) -> SDEConfig:
    """The SDE settings of the run folder --sde_of (its config.json)."""
    if fv["sde"].present:
        raise InputError("give --sde or --sde_of, not both")
    path = Path(fv.sde_of) / "config.json"
    if not path.is_file():
        raise InputError(f"--sde_of {fv.sde_of} is not a run folder (it has no config.json)")
    try:
        sde_cfg = from_dict(json.loads(path.read_text())).sde
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise InputError(f"--sde_of {path} is not a run's config ({err})") from None
    if sde_cfg.name not in SDES:
        raise InputError(f"--sde_of {fv.sde_of} uses the SDE {sde_cfg.name!r}; classifiers "
                         f"train for {', '.join(SDES)}")
    return sde_cfg


def _data_range_of(run: Path) -> Tuple[float, float]:
    """The interval the run's model reads 8-bit images in: stored with its checkpoint ([0, 1]
    for the paper's VE models converted by `score_sde.convert`), else the loaders' default."""
    path = Path(run) / "checkpoint.pt"
    if not path.is_file():
        return DATA_RANGE
    stored = (read_checkpoint(path).get("data_info") or {}).get("data_range")
    return DATA_RANGE if stored is None else (float(stored[0]), float(stored[1]))


def _eval_times(values: List[str]) -> List[float]:
    try:
        times = [float(v) for v in values]
    except ValueError:
        raise InputError(f"--eval_times must be comma-separated numbers, got "
                         f"{','.join(values)!r}") from None
    if not times or not all(0 < t <= 1 for t in times):
        raise InputError(f"--eval_times must be numbers in (0, 1], got {times}")
    return times


def run(fv) -> Dict[str, object]:
    """Trains and evaluates with parsed flags; returns the summary.

    Raises:
        InputError, ValueError, FileNotFoundError: bad input.
        TrainingError: a non-finite loss.
    """
    from tqdm.auto import tqdm

    wall = time.time()
    kind = fv.kind
    wrong = NOISY_ONLY if kind == "clean" else CLEAN_ONLY
    given = [f"--{name}" for name in wrong if fv[name].present]
    if given:
        raise InputError(f"{', '.join(given)} do not apply to --kind {kind}")
    output = check_path("output", Path(fv.output))  # checked now, not after training
    summary_path = check_path("summary", Path(fv.summary) if fv.summary
                              else output.with_suffix(".json"))
    for read in ("config.json", "checkpoint.pt"):  # what --sde_of reads of the run
        check_distinct({"output": output, "summary": summary_path,
                        "sde_of": Path(fv.sde_of) / read if fv.sde_of else None})
    check_not_data({"output": output, "summary": summary_path}, fv.dataset,
                   data_dir=fv.data_dir)
    device = resolve_device(fv.device)

    train_ds, info = load_dataset(fv.dataset, split="train", data_dir=fv.data_dir)
    test_ds, _ = load_dataset(fv.dataset, split="test", data_dir=fv.data_dir,
                              num_samples=fv.num_test)
    images, labels = train_ds.tensors
    test_images, test_labels = test_ds.tensors

    sde = sde_config = time_input = None
    eval_times: List[float] = []
    data_range = DATA_RANGE
    if kind == "noisy":
        sde_cfg = _sde_of(fv) if fv.sde_of else SDEConfig(name=fv.sde)
        data_range = _data_range_of(fv.sde_of) if fv.sde_of else DATA_RANGE
        sde_config = dataclasses.asdict(sde_cfg)
        sde = build_sde(Config(sde=sde_cfg))
        time_input = fv.time_input or DEFAULT_TIME_INPUT[sde_cfg.name]
        eval_times = _eval_times(fv.eval_times)
    torch.manual_seed(fv.seed)  # the weight initialisation
    model = build_classifier(kind, info, width=fv.width, feature_dim=fv.feature_dim,
                             time_input=time_input).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=fv.lr)
    order = BatchOrder(len(images), min(fv.batch_size, len(images)), seed=fv.seed)

    model.train()
    recent: List[float] = []
    bar = tqdm(range(fv.n_iters), desc=f"classifier ({kind})", unit="step", disable=None)
    for step in bar:
        idx = order.indices(step)
        gen = torch.Generator(device=device).manual_seed(mix_seed(fv.seed, _TRAIN_STREAM, step))
        loss, _ = batch_loss(kind, model, sde, images[idx].to(device), labels[idx].to(device),
                             time_input=time_input, eps=fv.eps, generator=gen,
                             data_range=data_range)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite training loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-LOSS_WINDOW:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    bar.close()

    metrics = evaluate(kind, model, sde, test_images, test_labels, batch_size=fv.batch_size,
                       device=device, seed=fv.seed, time_input=time_input, eps=fv.eps,
                       eval_times=eval_times, data_range=data_range)
    if not math.isfinite(metrics["test_loss"]):  # the last step's update blew up
        raise TrainingError(f"non-finite test loss {metrics['test_loss']} after step "
                            f"{fv.n_iters}; nothing was written (lower --lr)")
    meta = {"kind": kind, "dataset": fv.dataset, "image_shape": list(info.shape),
            "num_classes": info.num_classes, "sde": sde_config["name"] if sde else None,
            "sde_config": sde_config, "time_input": time_input,
            "eps": fv.eps if sde else None, "data_range": list(data_range) if sde else None,
            "n_iters": fv.n_iters, "seed": fv.seed,
            "test_accuracy": metrics["test_accuracy"],
            "test_accuracy_at_t": metrics["test_accuracy_at_t"]}
    save_classifier(output, model, meta)
    summary = {
        **meta, "data_dir": fv.data_dir, "model": type(model).__name__,
        "model_config": model.config, "num_params": sum(p.numel() for p in model.parameters()),
        "batch_size": order.batch_size, "lr": fv.lr, "eval_times": eval_times or None,
        "num_train": len(images), "num_test": len(test_images),
        "train_loss": sum(recent) / len(recent), **metrics, "device": str(device),
        "output": str(output), "seconds": time.time() - wall}
    write_json(summary_path, summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    try:
        return run_tool(argv, __doc__, define_flags, run, numerical=(TrainingError,))
    except KeyboardInterrupt:  # while the flags are defined, before run_tool's own guard
        stderr_line("interrupted (SIGINT)")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
