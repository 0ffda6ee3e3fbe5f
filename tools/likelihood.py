"""Negative log-likelihood (nats, bits/dim) of a trained checkpoint on held-out data.

Example (the paper's protocol, Song et al. 2021, Sec. 4.3 and App. D.2):
    python tools/likelihood.py --workdir runs/vp_cifar10 --data_dir ~/data/cifar10 \\
        --output runs/vp_cifar10/likelihood_test.json
    torchrun --standalone --nproc_per_node 8 tools/likelihood.py --workdir runs/vp_cifar10 \\
        --data_dir ~/data/cifar10 --output runs/vp_cifar10/likelihood_test.json

Run it from an install of the package (`pip install -e .`) or with PYTHONPATH set to the
repository root.

Protocol. The checkpoint (default WORKDIR/checkpoint.pt) is rebuilt from its saved config and
its EMA weights are evaluated (--nouse_ema: the raw weights). Defaults follow the paper: RK45
(dopri5) at rtol = atol = 1e-5 from eps = 1e-5, one Rademacher probe per solve, and for 8-bit
images uniform dequantization with fresh noise in each of 5 passes over the test set
(continuous data: 1 pass). The dequantization noise and the probes of batch b in pass r are
seeded from (--seed, r, b) only, so an interrupted run that is resumed, a single process and
a torchrun job all give the same numbers on the same kind of device.

Data. The dataset of the saved config, split "test", unless --dataset / --split say otherwise.
- Images (fashion_mnist, cifar10): the split from --data_dir (default: the saved config's).
- 2-D toys: the split drawn with the training seed, --num_samples points (default 10000).
- "array": --data_path FILE is evaluated whole (--split does not apply). Without it, the saved
  config's training file is split exactly as training did (`score_sde.build.load_train_eval`:
  the seeded `eval_fraction` share) and --split test selects that held-out part.
--num_samples N keeps the first N samples (2-D toys: the split is drawn with N points).
Batches are consecutive blocks of --batch_size. Each sample's dequantization noise and probes
are seeded by (--seed, pass, its index in the data), whatever batch it is in, so with
--step_control per_sample its result does not depend on its batch-mates nor on --batch_size
(up to the batched network's floating-point dependence on the batch).

Statistics. Each (sample, pass) gives one value -log p in nats. nll_nats is their mean over all
n = num_data * num_repeats values; stderr is their sample standard deviation (ddof 1) divided by
sqrt(n), which treats the passes of one sample as independent; stderr_samples is the standard
deviation over samples of each sample's mean over passes divided by sqrt(num_data), the
appropriate error bar for the test-set mean. For 8-bit images, bpd = bits_per_dim(-nll, D) with
the data range's width (2 for [-1, 1]): bpd = nll / (D ln 2) - log2(2) + log2(256) (offset 7).
8-bit images are dequantized into the range the checkpoint's network was trained on: [-1, 1],
or [0, 1] (width 1, offset 8) for the paper's VE models converted by
tools/convert_checkpoint.py. Continuous data has no bits/dim (null).

Output. A progress bar over batches (on a terminal) and one line on stderr for people,
"NLL M ± SE nats, B ± SE bits/dim, n = N (D samples x R passes), mean NFE F, S s" (no bits/dim
for continuous data); one JSON line on stdout and, with --output, the same object in a file:
nll_nats, stderr, stderr_samples, bpd, bpd_stderr, n, num_data, nfe_mean (score evaluations
per solve), nfe_total, seconds (wall time of this run), solve_seconds (summed per-batch solve
times, resumed batches included), complete, and every setting (checkpoint, step, use_ema,
sde, model, dataset, split, data_source, data_sha256 (of the evaluated data, so that resumed
batches come from the same data wherever they were read), num_dims, batch_size, divergence,
num_probes, method, step_control, error_norm, cuda_graph, rtol, atol, eps, num_repeats, seed,
dequantization, data_width, num_levels, class_labels, world_size, device).
A class-conditional checkpoint is evaluated with the null label (the unconditional model;
class_labels is "null"), which is meaningful only if it was trained with label dropout.

Resume. Each finished batch is appended to PARTIAL_DIR/<key>.rank<R>.jsonl (default
PARTIAL_DIR = WORKDIR/likelihood_partial), where <key> hashes every setting that changes a
batch's numbers (all but --num_repeats, --device, --output and the number of processes).
Rerunning with the same settings skips finished batches; the files are kept, so a rerun of a
finished evaluation only re-reads them (delete them to recompute). --max_batches K stops after
K new batches per process (for time-limited jobs), printing "complete": false.

Multiple GPUs. Under torchrun, batch b is evaluated by rank b mod WORLD_SIZE on cuda:LOCAL_RANK
(the model is never wrapped in DDP: adaptive solves take different numbers of steps, so ranks
must not synchronise per step); the only collective is one gloo all-gather of the per-batch
results at the end, and rank 0 writes the output.

Exit status: 0 done (or stopped by --max_batches); 2 bad input (flags, missing workdir,
checkpoint or data, weights that do not fit the data, memory that runs out: the line names
--batch_size and --num_samples), one line on stderr; 3 numerical failure
(a non-finite log-likelihood or a solve that cannot meet its tolerance), one line naming the
pass and batch. 3 rather than 1 so that it is not mistaken for a crash (Python exits with 1 on
an uncaught exception). 4: a file that cannot be read or written (no permission, a full
disk), one line. 130: stopped by Ctrl-C (one line; the finished batches are kept, and
the same command resumes).
"""
import sys

try:  # Ctrl-C while torch loads (seconds) gives the one line it gives during the work
    import datetime
    import functools
    import hashlib
    import json
    import os
    import time
    from pathlib import Path
    from typing import Callable, Dict, List, Optional, Sequence, Tuple

    import torch

    from score_sde._utils import out_of_memory, stderr_line, tensors_sha256
    from score_sde.checkpoint import read_checkpoint
    from score_sde.cli import (EXIT_INTERRUPTED, InputError, check_distinct, check_not_data,
                               check_path, run_tool, write_json)
    from score_sde.config import MAX_SEED, Config, from_dict
    from score_sde.datasets import (DATASETS, SPLITS, DataInfo, load_dataset, mix_seed,
                                    to_model_range)
    from score_sde.distributed import dist_from_env, resolve_device
    from score_sde.likelihood import DIVERGENCES, bits_per_dim, draw_probes, log_likelihood
    from score_sde.ode import ERROR_NORMS
    from score_sde.runs import (check_trained_state, data_source, model_from_state,
                                with_trained_range)
    from score_sde.sde import SDE, ScoreFn
    from score_sde.build import build_sde, load_train_eval, model_score_fn
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    sys.stderr.write("interrupted (SIGINT)\n")
    sys.exit(130)

METHOD = "dopri5"  # RK45, the paper's solver
IMAGE_REPEATS, CONTINUOUS_REPEATS = 5, 1  # default passes over the data
# Independent random streams of one (pass, batch).
_DEQUANT_STREAM, _PROBE_STREAM = 0, 1
# Ranks finish their adaptive solves at different times before the one final all-gather.
GATHER_TIMEOUT = datetime.timedelta(days=1)
# Settings that do not change any batch's numbers, left out of the resume key.
_NOT_IN_KEY = ("num_repeats", "world_size", "device", "cuda_graph")

Record = Dict[str, object]  # {"repeat", "batch", "nll": [floats], "nfe", "seconds"}


class BatchError(RuntimeError):
    """A batch's log-likelihood is non-finite or its solve failed: exit status 3."""

    def __init__(self, repeat: int, batch: int, cause: Exception):
        super().__init__(f"pass {repeat}, batch {batch}: {cause}")
        self.repeat, self.batch = repeat, batch


# --- resumable per-batch log --------------------------------------------------------------------

class PartialLog:
    """Per-batch results in append-only JSON-lines files, one per rank, named by a settings key.

    Every line is one finished (pass, batch) written with flush and fsync, so a kill leaves at
    most a torn last line, which is dropped when the log is reopened.
    """

    def __init__(self, folder: Path, settings: Dict[str, object], *, rank: int = 0):
        self.folder = Path(folder)
        text = json.dumps(settings, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.settings = settings
        self.path = self.folder / f"{self.key}.rank{rank}.jsonl"

    def load(self) -> Dict[Tuple[int, int], Record]:
        """All finished (pass, batch) records of these settings, from every rank's file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        done = {}
        for path in sorted(self.folder.glob(f"{self.key}.rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line another rank is still writing
                if "batch" in record:
                    done.setdefault((record["repeat"], record["batch"]), record)
        return done

    def append(self, record: Record) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a") as f:
            if new:
                f.write(json.dumps({"settings": self.settings}, sort_keys=True) + "\n")
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


# --- the evaluation -----------------------------------------------------------------------------

def batch_slices(num_items: int, batch_size: int) -> List[slice]:
    """Consecutive blocks [b B, (b + 1) B) covering num_items; the last may be shorter."""
    return [slice(s, min(s + batch_size, num_items)) for s in range(0, num_items, batch_size)]


def unit_inputs(data: torch.Tensor, rows: slice, prepare, *, seed: int, repeat: int,
                divergence: str, num_probes: int, device: torch.device
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(model-ready samples [b, ...] on `device`, Hutchinson probes [K, b, ...] or None for
    the exact divergence) of the data rows `rows` in pass `repeat`. Each sample's
    dequantization noise and probes come from generators seeded by (seed, repeat, its index
    in the data) alone, so they do not depend on the batch it is evaluated in."""
    xs, probes = [], []
    for i in range(rows.start, rows.stop):
        noise = torch.Generator().manual_seed(mix_seed(seed, repeat, i, _DEQUANT_STREAM))
        x = prepare(data[i:i + 1], noise).to(device)
        xs.append(x)
        if divergence != "exact":
            gen = torch.Generator(device=device)
            gen.manual_seed(mix_seed(seed, repeat, i, _PROBE_STREAM))
            probes.append(draw_probes(divergence, (num_probes,) + tuple(x.shape), generator=gen,
                                      device=device, dtype=x.dtype))
    return torch.cat(xs), torch.cat(probes, dim=1) if probes else None


def evaluate(sde: SDE, score_fn: ScoreFn, data: torch.Tensor, *,
             prepare: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
             batch_size: int, num_repeats: int, seed: int = 0,
             device: torch.device = torch.device("cpu"), divergence: str = "rademacher",
             num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
             step_control: str = "batch", error_norm: str = "max", cuda_graph: bool = False,
             partial: Optional[PartialLog] = None,
             rank: int = 0, world_size: int = 1,
             max_batches: Optional[int] = None, progress: bool = False,
             to_report: Optional[Callable[[float], Dict[str, str]]] = None) -> List[Record]:
    """Per-sample NLLs of this rank's (pass, batch) units, resuming from `partial`.

    Pass r of batch b is evaluated by rank b mod world_size, passes in order, and appended to
    `partial` as soon as it is done.

    Args:
        sde, score_fn: the model (see `score_sde.log_likelihood`).
        data: raw samples [N, ...] on the CPU (uint8 images or floats).
        prepare: (raw batch, CPU generator) -> model-ready batch, e.g. dequantization.
        batch_size, num_repeats: batch size and number of passes over the data.
        seed: seeds every (pass, sample) through `unit_inputs`.
        device: where the solves run.
        divergence, num_probes, rtol, atol, eps, step_control, error_norm, cuda_graph:
            forwarded to
            `score_sde.log_likelihood`.
        partial: log of finished units to resume from and append to; None: no resume.
        rank, world_size: this process's share of the batches.
        max_batches: stop after this many newly evaluated units (None: all).
        progress: show a tqdm bar with the running mean.
        to_report: running mean NLL -> bar postfix (default: the NLL in nats).

    Returns:
        Records of this rank's finished units sorted by (pass, batch): "repeat", "batch",
        "nll" (list of per-sample -log p in nats, float), "nfe", "seconds".

    Raises:
        BatchError: a batch's solve failed or its log-likelihood is non-finite.
        ValueError: arguments rejected by `score_sde.log_likelihood`.
    """
    from tqdm.auto import tqdm

    slices = batch_slices(len(data), batch_size)
    mine = [(r, b) for r in range(num_repeats) for b in range(len(slices))
            if b % world_size == rank]
    done = partial.load() if partial is not None else {}
    records = {u: done[u] for u in mine if u in done}
    todo = [u for u in mine if u not in records]
    if max_batches is not None:
        todo = todo[:max_batches]
    total = sum(len(rec["nll"]) for rec in records.values())
    nll_sum = sum(sum(rec["nll"]) for rec in records.values())
    report = to_report or (lambda nll: {"nll": f"{nll:.4f}"})
    bar = tqdm(total=len(mine), initial=len(records), desc="likelihood", unit="batch",
               disable=None if progress else True)
    for repeat, batch in todo:
        x, probes = unit_inputs(data, slices[batch], prepare, seed=seed, repeat=repeat,
                                divergence=divergence, num_probes=num_probes, device=device)
        start = time.time()
        try:
            logp, _, nfe = log_likelihood(sde, score_fn, x, rtol=rtol, atol=atol, method=METHOD,
                                          eps=eps, divergence=divergence, probes=probes,
                                          step_control=step_control, error_norm=error_norm,
                                          cuda_graph=cuda_graph)
        except RuntimeError as err:
            if out_of_memory(err):
                raise InputError(f"out of memory ({str(err).strip().splitlines()[0]}): rerun "
                                 f"with a smaller --batch_size (now {batch_size})") from None
            raise BatchError(repeat, batch, err) from None
        nll = (-logp).double().cpu().tolist()
        record = {"repeat": repeat, "batch": batch, "nll": nll, "nfe": nfe,
                  "seconds": time.time() - start}
        if partial is not None:
            partial.append(record)
        records[(repeat, batch)] = record
        total, nll_sum = total + len(nll), nll_sum + sum(nll)
        bar.set_postfix(report(nll_sum / total))
        bar.update(1)
    bar.close()
    return [records[u] for u in sorted(records)]


def summarize(records: Sequence[Record], *, num_data: int, num_repeats: int,
              info: DataInfo) -> Dict[str, object]:
    """Mean NLL, its standard errors, bits/dim for 8-bit data and NFE of complete records.

    The statistics helpers are the tool's own until the package offers them (see the module
    docstring for the two standard errors).
    """
    records = sorted(records, key=lambda rec: (rec["repeat"], rec["batch"]))
    nll = torch.tensor([v for rec in records for v in rec["nll"]], dtype=torch.float64)
    per_sample = nll.reshape(num_repeats, num_data).mean(0)
    nll_mean, stderr = _mean_stderr(nll)
    bpd = bpd_stderr = None
    if info.discrete:
        width = info.data_range[1] - info.data_range[0]
        bpd_values = bits_per_dim(-nll, info.num_dims, data_width=width,
                                  num_levels=info.num_levels)
        bpd, bpd_stderr = _mean_stderr(bpd_values)
    nfe = [rec["nfe"] for rec in records]
    return {"nll_nats": nll_mean, "stderr": stderr, "stderr_samples": _mean_stderr(per_sample)[1],
            "bpd": bpd, "bpd_stderr": bpd_stderr, "n": nll.numel(), "num_data": num_data,
            "nfe_mean": sum(nfe) / len(nfe), "nfe_total": sum(nfe),
            "solve_seconds": sum(rec["seconds"] for rec in records)}


def _mean_stderr(values: torch.Tensor) -> Tuple[float, Optional[float]]:
    """Mean and standard error (sample std with ddof 1 over sqrt(n); None for n = 1)."""
    n = values.numel()
    stderr = (values.std() / n ** 0.5).item() if n > 1 else None
    return values.mean().item(), stderr


# --- data and model -----------------------------------------------------------------------------

def load_eval_data(cfg: Config, *, dataset: str, split: str, data_dir: Optional[str],
                   data_path: Optional[str], num_samples: Optional[int]
                   ) -> Tuple[torch.Tensor, DataInfo, str]:
    """(raw samples [N, ...], DataInfo, description of the source); see the module docstring.

    Raises:
        ValueError, FileNotFoundError: from the loaders (missing or malformed data).
    """
    same = dataset == cfg.data.dataset
    if dataset == "array" and data_path is None:
        if not same or cfg.data.data_path is None:
            raise InputError("--dataset array needs --data_path FILE (the checkpoint was not "
                             "trained on an array whose held-out part could be used)")
        train_x, eval_x, info = load_train_eval(cfg.data, seed=cfg.training.seed)
        x = eval_x if split == "test" else train_x
        part = "held-out" if split == "test" else "training"
        source = (f"{part} part (eval_fraction={cfg.data.eval_fraction}, "
                  f"seed={cfg.training.seed}) of {cfg.data.data_path}")
    else:
        if data_dir is None and same:
            data_dir = cfg.data.data_dir
        ds, info = load_dataset(dataset, split=split, data_dir=data_dir, data_path=data_path,
                                seed=cfg.training.seed, num_samples=num_samples)
        x = ds.tensors[0]
        source = data_path or (f"{split} split of {data_dir}" if data_dir else
                               f"{split} split (seed {cfg.training.seed})")
    if num_samples is not None:
        x = x[:num_samples]
    return x, info, source


def load_model(cfg: Config, state: Dict[str, object], info: DataInfo, *, use_ema: bool,
               device: torch.device, checkpoint: Path) -> ScoreFn:
    """The checkpoint's network in eval mode on `device`, as a score function."""
    try:
        model = model_from_state(cfg, state, info, use_ema=use_ema, device=device)
    except ValueError as err:
        raise InputError(f"{err} (in {checkpoint})") from None
    return model_score_fn(model, build_sde(cfg), cfg)


def _prepare_discrete(x: torch.Tensor, generator: torch.Generator, *,
                      data_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    return to_model_range(x, generator=generator, data_range=data_range)


def _prepare_continuous(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x.float()


# --- command line -------------------------------------------------------------------------------

def define_flags(fv) -> None:
    """Defines the tool's flags on the absl FlagValues `fv`."""
    from absl import flags

    f, kw = flags, dict(flag_values=fv)
    f.DEFINE_string("workdir", None, "Run folder of the training script.", **kw)
    f.DEFINE_string("checkpoint", None, "Checkpoint file; default WORKDIR/checkpoint.pt.", **kw)
    f.DEFINE_enum("dataset", None, list(DATASETS), "Data; default: the checkpoint's.", **kw)
    f.DEFINE_string("data_dir", None, "Image dataset folder; default: the checkpoint's.", **kw)
    f.DEFINE_string("data_path", None, ".npy/.npz evaluation array (--dataset array).", **kw)
    f.DEFINE_enum("split", "test", list(SPLITS),
                  "Split (array data: the held-out or the training part).", **kw)
    f.DEFINE_integer("num_samples", None, "Evaluate the first N samples (2-D toys: a split "
                     "of N points); default all.", lower_bound=1, **kw)
    f.DEFINE_integer("batch_size", 128, "Samples per ODE solve.", lower_bound=1, **kw)
    f.DEFINE_enum("divergence", "rademacher", list(DIVERGENCES), "Divergence estimator.", **kw)
    f.DEFINE_integer("num_probes", 1, "Hutchinson probes per solve.", lower_bound=1, **kw)
    f.DEFINE_enum("step_control", "batch", ["batch", "per_sample"], "batch: one step size per "
                  "batch (the paper); per_sample: each sample its own (its result independent "
                  "of its batch-mates and of --batch_size).", **kw)
    f.DEFINE_boolean("cuda_graph", False, "Replay each function evaluation (network and "
                     "divergence) from a CUDA graph (CUDA; no effect on the CPU).", **kw)
    f.DEFINE_enum("error_norm", "max", list(ERROR_NORMS), "Step error per sample: max over its "
                  "elements, or rms (SciPy's RK45 norm, as in the paper's code; fewer steps).",
                  **kw)
    f.DEFINE_float("rtol", 1e-5, "Relative tolerance of dopri5 (> 0).", **kw)
    f.DEFINE_float("atol", 1e-5, "Absolute tolerance of dopri5 (> 0).", **kw)
    f.DEFINE_float("eps", 1e-5, "Start time of the probability-flow ODE, in (0, 1).", **kw)
    f.DEFINE_integer("num_repeats", None, "Passes over the data (fresh dequantization and "
                     f"probes); default {IMAGE_REPEATS} for 8-bit images, "
                     f"{CONTINUOUS_REPEATS} otherwise.", lower_bound=1, **kw)
    f.DEFINE_boolean("use_ema", True, "EMA weights (--nouse_ema: the raw weights).", **kw)
    f.DEFINE_integer("seed", 0, "Seeds dequantization noise and probes.", lower_bound=0,
                     upper_bound=MAX_SEED, **kw)
    f.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "auto: CUDA if available.", **kw)
    f.DEFINE_string("output", None, "Also write the result JSON to this file.", **kw)
    f.DEFINE_string("partial_dir", None, "Per-batch results for resuming; default "
                    "WORKDIR/likelihood_partial.", **kw)
    f.DEFINE_integer("max_batches", None, "Stop after this many new batches per process.",
                     lower_bound=1, **kw)
    for name in ("rtol", "atol"):
        flags.register_validator(name, lambda v: v > 0, message=f"--{name} must be > 0",
                                 flag_values=fv)
    flags.register_validator("eps", lambda v: 0 < v < 1, message="--eps must lie in (0, 1)",
                             flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["data_dir", "data_path"], flag_values=fv)


def run(fv) -> Dict[str, object]:
    """Evaluates with parsed flags; returns the result (rank 0: complete, others: {}).

    Raises:
        InputError, ValueError, FileNotFoundError, CheckpointError: bad input.
        BatchError: numerical failure.
    """
    wall = time.time()
    workdir = Path(fv.workdir)
    if fv.checkpoint:  # the workdir only holds this evaluation's files: made if need be
        check_path("workdir", workdir, folder=True)
    elif not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is not a directory (a training run folder; or "
                         f"pass --checkpoint PATH)")
    if fv.output:  # checked now, not after the whole evaluation
        check_path("output", Path(fv.output))
    checkpoint = Path(fv.checkpoint) if fv.checkpoint else workdir / "checkpoint.pt"
    if checkpoint.is_dir():
        raise InputError(f"checkpoint {checkpoint} is a folder; pass --checkpoint FILE")
    if not checkpoint.is_file():
        raise InputError(f"checkpoint {checkpoint} does not exist (pass --checkpoint PATH)")
    check_path("partial_dir", Path(fv.partial_dir or workdir / "likelihood_partial"), folder=True)
    check_distinct({"output": fv.output, "checkpoint": checkpoint, "data_path": fv.data_path})
    if fv.data_path is not None and fv["split"].present:
        raise InputError("--split does not apply to --data_path (the file is evaluated whole)")
    layout = dist_from_env(os.environ)
    rank, world_size = layout.rank, layout.world_size
    device = resolve_device(fv.device, layout)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    state = read_checkpoint(checkpoint)
    check_trained_state(state, checkpoint)
    cfg = from_dict(state["config"])
    if cfg.model.class_conditional and cfg.training.label_dropout == 0:
        raise InputError(f"{checkpoint} is class-conditional and was trained with label_dropout "
                         f"0: the null label it is evaluated with (the unconditional model) "
                         f"was never trained; train with --label_dropout > 0 (e.g. 0.1)")
    dataset, data_dir, data_path = data_source(cfg, fv.dataset, fv.data_dir, fv.data_path)
    check_not_data({"output": fv.output}, dataset, data_dir=data_dir, data_path=data_path)
    data, info, source = load_eval_data(cfg, dataset=dataset, split=fv.split,
                                        data_dir=fv.data_dir, data_path=fv.data_path,
                                        num_samples=fv.num_samples)
    info = with_trained_range(info, state)
    score_fn = load_model(cfg, state, info, use_ema=fv.use_ema, device=device,
                          checkpoint=checkpoint)
    num_repeats = fv.num_repeats or (IMAGE_REPEATS if info.discrete else CONTINUOUS_REPEATS)
    settings = {
        "checkpoint": str(checkpoint.resolve()), "step": int(state["step"]),
        "use_ema": fv.use_ema, "sde": cfg.sde.name, "model": cfg.model.name,
        "dataset": dataset, "split": None if fv.data_path else fv.split,
        "data_source": source, "num_data": len(data), "num_dims": info.num_dims,
        # What the data are, not where they were read from: a relative path run from another
        # folder, or a file rewritten in place, must not reuse another data set's batches.
        "data_sha256": hashlib.sha256(data.contiguous().numpy().tobytes()).hexdigest(),
        # Likewise the weights evaluated: a checkpoint replaced under the same path and step
        # (exported again, converted again) must not reuse the old weights' batches.
        "weights_sha256": tensors_sha256(*(v for _, v in sorted(
            state["ema" if fv.use_ema else "model"].items()))),
        "batch_size": fv.batch_size, "divergence": fv.divergence,
        "num_probes": fv.num_probes, "method": METHOD, "step_control": fv.step_control,
        "error_norm": fv.error_norm, "cuda_graph": fv.cuda_graph,
        "rtol": fv.rtol, "atol": fv.atol,
        "eps": fv.eps, "num_repeats": num_repeats, "seed": fv.seed,
        "dequantization": "uniform" if info.discrete else None,
        "noise_seeding": "per_sample",  # (seed, pass, sample index); see `unit_inputs`
        "data_width": (info.data_range[1] - info.data_range[0]) if info.discrete else None,
        "num_levels": info.num_levels,
        # A class-conditional network is called without labels: its null label, i.e. the
        # unconditional model (meaningful when it was trained with label dropout).
        "class_labels": "null" if getattr(cfg.model, "class_conditional", False) else None,
        "world_size": world_size, "device": str(device)}
    key = {k: v for k, v in settings.items() if k not in _NOT_IN_KEY}
    partial = PartialLog(Path(fv.partial_dir or workdir / "likelihood_partial"),
                         {**key, "config": state["config"]}, rank=rank)

    def report(nll):
        shown = {"nll": f"{nll:.4f}"}
        if info.discrete:
            width = info.data_range[1] - info.data_range[0]
            bpd = bits_per_dim(torch.tensor(-nll), info.num_dims, data_width=width,
                               num_levels=info.num_levels)
            shown["bpd"] = f"{bpd.item():.4f}"
        return shown

    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    try:
        records = evaluate(
            build_sde(cfg), score_fn, data,
            prepare=(functools.partial(_prepare_discrete, data_range=info.data_range)
                     if info.discrete else _prepare_continuous),
            batch_size=fv.batch_size, num_repeats=num_repeats, seed=fv.seed, device=device,
            divergence=fv.divergence, num_probes=fv.num_probes, rtol=fv.rtol, atol=fv.atol,
            step_control=fv.step_control, error_norm=fv.error_norm, cuda_graph=fv.cuda_graph,
            eps=fv.eps, partial=partial, rank=rank, world_size=world_size,
            max_batches=fv.max_batches, progress=rank == 0, to_report=report)
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, records)
            records = [rec for part in gathered for rec in part]
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    if rank != 0:
        return {}
    expected = num_repeats * len(batch_slices(len(data), fv.batch_size))
    if len(records) < expected:
        stderr_line(f"{len(records)} of {expected} batches done (--max_batches); rerun the "
                    f"same command to continue")
        return {"complete": False, "batches_done": len(records), "batches_total": expected,
                "partial_dir": str(partial.folder)}
    result = {**summarize(records, num_data=len(data), num_repeats=num_repeats, info=info),
              "seconds": time.time() - wall, "complete": True, **settings}
    if fv.output:
        write_json(Path(fv.output), result)
    stderr_line(summary_line(result))
    return result


def summary_line(result: Dict[str, object]) -> str:
    """The result for people, one line: NLL and bits/dim with their standard errors, the
    number of values, the mean NFE and the wall time (the JSON line carries everything)."""
    def mean_pm(mean, stderr, digits):
        return f"{mean:.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}")

    parts = [f"NLL {mean_pm(result['nll_nats'], result['stderr'], 2)} nats"]
    if result.get("bpd") is not None:
        parts.append(f"{mean_pm(result['bpd'], result['bpd_stderr'], 4)} bits/dim")
    parts.append(f"n = {result['n']} ({result['num_data']} samples x {result['num_repeats']} "
                 f"passes)")
    parts.append(f"mean NFE {result['nfe_mean']:.1f}")
    parts.append(f"{result['seconds']:.1f} s")
    return ", ".join(parts)


def _checked_run(fv) -> Dict[str, object]:
    try:
        return run(fv)
    except (RuntimeError, MemoryError) as err:
        # The data (--num_samples of a toy set are drawn at once), or a batch's inputs.
        if isinstance(err, MemoryError) or out_of_memory(err):
            raise InputError(f"out of memory ({str(err).strip().splitlines()[0]}): lower "
                             f"--batch_size (now {fv.batch_size}) or --num_samples (now "
                             f"{fv.num_samples or 'all'})") from None
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    try:
        return run_tool(argv, __doc__, define_flags, _checked_run, numerical=(BatchError,),
                        numerical_prefix="non-finite or failed likelihood solve at ")
    except KeyboardInterrupt:  # while the flags are defined, before run_tool's own guard
        stderr_line("interrupted (SIGINT)")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
