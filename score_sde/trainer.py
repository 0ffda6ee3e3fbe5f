"""The training loop of denoising score matching (Song et al. 2021, Eq. 7): `Trainer`, `train`.

Every random draw of step k (data order, dequantization, label dropout, t, noise, dropout) is
seeded from (seed, k) by `step_seed`, so a run resumed from a checkpoint ends with exactly the
weights of an uninterrupted one on the CPU. A step never waits for the device: batches go
through pinned memory, and with fused Adam a step whose loss or gradient norm is not finite is
skipped on the device; `Trainer.settle` reads those outcomes before anything is logged or
saved. `Trainer.run` is the loop: a step, then the periodic actions `due_after` names (log
line, held-out loss, sample grid, checkpoint). Adam, the learning rate and the EMA are
`score_sde.optim`'s. SIGINT and SIGTERM end a run after the step under way, with a checkpoint
(`score_sde.stopping`); what the run prints and logs is `score_sde.progress`'s. The command
line around it is `score_sde.train`.
"""
import copy
import dataclasses
import gc
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import datasets as data_lib
from ._utils import out_of_memory, stderr_line, tensors_sha256
from .build import (build_model, build_sde, compile_model, load_splits, model_score_fn,
                    with_labels)
from .checkpoint import (CheckpointError, FolderLock, load_checkpoint, prune_snapshots,
                         remove_stale_temporaries, save_checkpoint)
from .cli import write_json
from .config import (Config, TrainingConfig, as_stored, changed_settings, check_config,
                     from_dict, sde_settings, to_dict)
from .distributed import (PROCESS_GROUP_TIMEOUT, DistInfo, dist_from_env,
                          process_group_backend, resolve_device)
from .fast_sampling import sample_dpm_solver
from .losses import ScoreMatchingLoss
from .optim import EMA_RATES, ema_decay, ema_update, learning_rate, make_adam
from .progress import (Reporter, SmoothedLoss, SpeedProbe, format_duration, parameter_count,
                       peak_memory_mib)
from .sampling import sample_pc
from .stopping import Abandoned, SignalStop, TrainingInterrupted
from .visualize import has_picture, samples_picture

# Independent random streams (see `step_seed`): the loss's t and z; dequantization and label
# dropout; held-out loss noise and data; sample grids; network dropout (+ rank).
STREAM_NOISE, STREAM_DATA, STREAM_EVAL_NOISE, STREAM_EVAL_DATA, STREAM_SAMPLES = range(5)
STREAM_DROPOUT = 5
# Evaluations of the default sample-grid sampler (DPM-Solver, order 2 multistep).
GRID_DPM_STEPS = 20
FINAL_WORK = ("eval", "samples")  # the last step's work after its checkpoint, in order
# A CPU run whose steps take longer than this gets `slow_hint` after its expected duration.
SLOW_CPU_RUN_SECONDS = 2 * 3600


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint, ...)."""


class NonFiniteError(TrainingError):
    """A non-finite loss or gradient stopped training."""


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (disk full, no permission, ...)."""


def check_world_size(cfg: Config, dist: DistInfo) -> None:
    """Raises ValueError unless the global batch splits evenly over the processes."""
    if cfg.training.batch_size % dist.world_size:
        raise ValueError(f"--batch_size {cfg.training.batch_size} (the global batch) must be "
                         f"divisible by the number of processes WORLD_SIZE={dist.world_size}")


def step_seed(seed: int, step: int, stream: int = STREAM_NOISE) -> int:
    """Seed of one random stream of one training step: a pure function of (seed, step, stream).

    Distinct streams give unrelated generators (a CPU generator and a CUDA one seeded alike
    would otherwise draw correlated numbers on the CPU).
    """
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0])


@dataclasses.dataclass(frozen=True)
class Due:
    """What follows a training step besides the update (`due_after`)."""

    log: bool  # a log line and TensorBoard scalars
    evaluate: bool  # the EMA's held-out loss (rank 0)
    sample: bool  # a sample grid (rank 0)
    save: bool  # checkpoint.pt
    snapshot: bool  # ... and a snapshot that pruning keeps

    @property
    def any(self) -> bool:
        return self.log or self.evaluate or self.sample or self.save


def due_after(step: int, tc: TrainingConfig) -> Due:
    """The periodic actions once `step` updates are done: each at the multiples of its
    `*_every` setting and all after the last update (samples only if sample_every > 0). A
    function of the step alone, so every process does the same at the same steps."""
    last = step == tc.n_iters
    snapshot = step % tc.snapshot_every == 0 or last
    return Due(log=step % tc.log_every == 0 or last,
               evaluate=step % tc.eval_every == 0 or last,
               sample=tc.sample_every > 0 and (step % tc.sample_every == 0 or last),
               save=snapshot or step % tc.checkpoint_every == 0, snapshot=snapshot)


def final_parts(due: Due) -> List[str]:
    """The parts of `FINAL_WORK` that `due` asks for, in order."""
    return [part for part, is_due in zip(FINAL_WORK, (due.evaluate, due.sample)) if is_due]


class Trainer:
    """Holds the state of one training run; `run()` executes the loop.

    Args:
        cfg: the resolved configuration.
        workdir: run folder (written by rank 0 only).
        dist: this process's place in a torchrun launch; with world_size > 1 the default
            process group must be initialised (see `train`).
        stop: signal handlers whose requests `run` obeys between steps (see
            `score_sde.stopping`); None: signals keep their usual effect.
        quiet: no progress bar and no routine log lines on the console.
        slow_hint: a line printed after the expected duration when a run on the CPU would
            take longer than `SLOW_CPU_RUN_SECONDS` (e.g. a pointer to a smaller config).
    """

    def __init__(self, cfg: Config, workdir: str, *, dist: DistInfo = DistInfo(),
                 stop: Optional[SignalStop] = None, quiet: bool = False,
                 slow_hint: Optional[str] = None):
        self.cfg, self.workdir, self.dist = cfg, Path(workdir), dist
        self.stop = stop if stop is not None else SignalStop()  # never installed: no signals
        self.quiet, self.slow_hint = quiet, slow_hint
        tc = cfg.training
        check_config(cfg)
        check_world_size(cfg, dist)
        self.device = resolve_device(tc.device, dist)
        if tc.bf16 and self.device.type != "cuda":
            raise ValueError(f"--bf16 autocast is for CUDA; --device {tc.device} runs on "
                             f"{self.device} here: drop --bf16")
        self.sde = build_sde(cfg)
        data = load_splits(cfg.data, seed=tc.seed)
        self.train_x, self.train_y, self.eval_x, self.eval_y, self.info = data
        self.data_sha256 = tensors_sha256(self.train_x, self.train_y)
        self.num_classes = self.info.num_classes if cfg.model.class_conditional else None
        self.order = data_lib.BatchOrder(len(self.train_x), tc.batch_size, seed=tc.seed,
                                         rank=dist.rank, world_size=dist.world_size)
        torch.manual_seed(tc.seed)
        self.model = build_model(cfg, self.info).to(self.device)
        if tc.channels_last and len(self.info.shape) == 3:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema_rate = tc.ema_rate if tc.ema_rate is not None else EMA_RATES[cfg.sde.name]
        self.optimizer, self.fused_adam = make_adam(
            self.model.parameters(), lr=tc.lr, betas=(tc.adam_beta1, 0.999), eps=tc.adam_eps,
            weight_decay=tc.weight_decay)
        self.loss_fn = ScoreMatchingLoss(
            self.sde, weighting="likelihood" if tc.likelihood_weighting else "sigma2",
            reduction="mean" if tc.reduce_mean else "sum", eps=tc.eps,
            importance_sampling=tc.importance_sampling)
        net = self.model
        if dist.world_size > 1:
            # The EMA stays unwrapped: it is updated locally from identical weights.
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = (compile_model(net, mode=tc.compile_mode, scope=tc.compile_scope)
                        if tc.compile else net)
        self.score_fn(self.model)  # checks prediction / time_input before anything is written
        # Collectives that agree on stopping: gloo on CPU tensors, so that polling every step
        # never waits for a GPU (NCCL runs get a gloo group of their own).
        self.control_group = None
        if dist.world_size > 1 and self.device.type == "cuda":
            self.control_group = torch.distributed.new_group(backend="gloo",
                                                             timeout=PROCESS_GROUP_TIMEOUT)
        self.step = 0
        self.saved_step: Optional[int] = None  # step of the last checkpoint written or loaded
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.nonfinite_streak = 0  # ... of which the latest, in a row
        # The work of the last step (n_iters) a stop abandoned: "eval" (the held-out loss)
        # and/or "samples" (the grid); a resume at that step does it before it reports done.
        # Rank 0's list is the one saved (it alone does that work).
        self.final_work_pending: List[str] = []
        # The last log step's metrics and the last held-out loss: saved, so that a resumed or
        # rerun finished run reports what an uninterrupted one does.
        self.metrics: Dict[str, float] = {}
        # (step, [loss finite, gradient finite]) on the device, not yet read by `settle`.
        self.unsettled: List[Tuple[int, torch.Tensor]] = []
        self.lock = FolderLock(self.workdir)  # held by rank 0 while it runs (`lock_workdir`)
        self.last_log = (time.time(), 0)  # (time, step) of the last log line, for its speed
        self.periodic_seconds = 0.0  # spent since then on held-out losses, samples, saves

    # --- data -----------------------------------------------------------------------------

    def model_input(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Model-ready data on the CPU: dequantized to [-1, 1) for 8-bit images, else float."""
        if self.info.discrete:
            return data_lib.to_model_range(x, generator=generator)
        return x.float()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # From pageable memory the copy would first wait for all queued device work.
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if self.cfg.training.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def step_batch(self, step: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This process's shard of the batch of `step`: (x, labels or None) on the device.

        Dequantization and label dropout are drawn for the whole global batch from the step's
        data generator and then sliced, so the shards of all processes are exactly the
        single-process batch. A dropped label becomes the null label num_classes.
        """
        tc = self.cfg.training
        gen = torch.Generator().manual_seed(step_seed(tc.seed, step, STREAM_DATA))
        idx = self.order.global_indices(step)
        shard = self.dist.shard(len(idx))
        x = self.to_device(self.model_input(self.train_x[idx], gen)[shard])
        if self.num_classes is None:
            return x, None
        drop = torch.rand(len(idx), generator=gen) < tc.label_dropout
        labels = self.train_y[idx].masked_fill(drop, self.num_classes)
        return x, self.to_device(labels[shard])

    # --- losses ---------------------------------------------------------------------------

    def score_fn(self, model, labels: Optional[torch.Tensor] = None):
        return model_score_fn(with_labels(model, labels), self.sde, self.cfg)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.training.bf16)

    def train_loss(self, x: torch.Tensor, labels: Optional[torch.Tensor],
                   generator: torch.Generator) -> torch.Tensor:
        """Mean loss over this process's shard x of the step's global batch, with the t and z
        one process would draw for those samples (`ScoreMatchingLoss`'s `shard`)."""
        with self.autocast():
            return self.loss_fn(self.score_fn(self.forward, labels), x, generator=generator,
                                shard=(self.dist.rank, self.dist.world_size))

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size == 1:
            return value
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value / self.dist.world_size

    # --- checkpoints ----------------------------------------------------------------------

    def state(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step,
                "skipped": self.skipped, "nonfinite_streak": self.nonfinite_streak,
                "final_work_pending": self.final_work_pending, "metrics": self.metrics,
                "config": to_dict(self.cfg), "data_info": dataclasses.asdict(self.info),
                "data_sha256": self.data_sha256}

    def restore(self, state: Dict[str, Any]) -> None:
        """Loads a checkpoint's state.

        Raises:
            TrainingError: the checkpoint was written for another model, SDE or data shape.
        """
        where = f"the checkpoint in {self.workdir}"
        missing = [k for k in ("model", "ema", "optimizer", "step", "config") if k not in state]
        if missing:
            raise TrainingError(f"{where} is not a training checkpoint (it lacks "
                                f"{', '.join(missing)}); use a new --workdir")
        saved = from_dict(state["config"])
        differ = []
        for section in ("model", "sde"):
            # Of the SDE, the settings it reads (a VP run ignores sigma_min, ...).
            old, new = ((sde_settings(c.sde) if section == "sde"
                         else dataclasses.asdict(c.model)) for c in (saved, self.cfg))
            names = ["name"] if section == "sde" and old["name"] != new["name"] else old
            differ += [f"{section}.{name} {old[name]!r} -> {new[name]!r}" for name in names
                       if as_stored(old[name]) != as_stored(new[name])]
        if differ:
            shown = "; ".join(differ)
            raise TrainingError(
                f"{where} was written for a different model or SDE configuration "
                f"({shown if len(shown) <= 300 else shown[:300] + '...'}); use a new "
                f"--workdir")
        saved_shape = tuple(state.get("data_info", {}).get("shape", self.info.shape))
        if saved_shape != self.info.shape:
            raise TrainingError(f"{where} was written for data of per-sample shape "
                                f"{saved_shape}, this run's data have shape {self.info.shape}; "
                                f"use a new --workdir")
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise TrainingError(f"{where} does not fit this run's model "
                                f"({str(err).strip().splitlines()[0]}); use a new --workdir"
                                ) from None
        self.step = int(state["step"])
        self.saved_step = self.step
        self.skipped = int(state.get("skipped", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        pending = state.get("final_work_pending", [])
        if isinstance(pending, bool):  # checkpoints that kept one flag for the step's work
            pending = list(FINAL_WORK) if pending else []  # `finish_final_work` keeps the due
        self.final_work_pending = [part for part in FINAL_WORK if part in pending]
        self.metrics = {name: float(value) for name, value in state.get("metrics", {}).items()}

    def save(self, *, snapshot: bool) -> None:
        """Rank 0 writes checkpoint.pt (and a snapshot); every process waits for it.

        Raises:
            CheckpointWriteError: on every process, when rank 0 could not write (disk full, no
                permission). Each file is replaced atomically, so the files written before
                stay intact and loadable.
        """
        failure = None
        if self.dist.is_main:
            state = self.state()
            path = self.workdir / "checkpoint.pt"
            try:
                save_checkpoint(state, path)
                self.saved_step = self.step
                if snapshot:
                    snaps = self.workdir / "snapshots"
                    path = snaps / f"snapshot_{self.step:08d}.pt"
                    save_checkpoint(state, path)
                    prune_snapshots(snaps, keep=self.cfg.training.keep_snapshots)
            except OSError as err:
                failure = (f"could not write {path} at step {self.step}: {err}; "
                           f"{self.kept_checkpoint()}; free "
                           f"disk space or fix permissions, then rerun the same command to "
                           f"resume")
        # Doubles as the barrier, so the other processes stop too instead of waiting.
        failure = self.main_problem(failure, f"rank 0 could not write the checkpoint of step "
                                             f"{self.step}")
        if failure is not None:
            raise CheckpointWriteError(failure)

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> Dict[str, float]:
        """Trains from the checkpoint in workdir (if any) to step n_iters; returns the metrics
        of the last log step (and the last held-out loss).

        Raises:
            TrainingError: see `train`.
            TrainingInterrupted: a SIGINT or SIGTERM reached `stop`: the step under way was
                finished and its checkpoint written (on every process: they agree on the step).
        """
        tc = self.cfg.training
        main = self.dist.is_main
        self.stop.defer()  # from here on a signal ends the run after a checkpoint
        try:
            report = self.start()
        except BaseException:
            self.unlock_workdir()
            raise
        smoothed, probe = SmoothedLoss(), SpeedProbe(self.device)
        self.model.train()
        try:
            try:
                if self.final_work_pending:
                    self.finish_final_work(report)
                while self.step < tc.n_iters:
                    signum = self.stop_requested()
                    if signum is not None:
                        self.interrupt(signum, report)
                    loss, lr, grad_norm = self.train_step(report)
                    if report.shows_bar:
                        smoothed.add(loss)
                    due = due_after(self.step, tc)
                    if due.any:  # the same steps on every process
                        self.settle(report)
                    if due.log:
                        self.metrics = self.log_step(loss, lr, grad_norm, report)
                    # On a GPU reading the loss waits for the device: only where settle did.
                    refresh = report.shows_bar and (due.log or self.device.type != "cuda")
                    report.advance(smoothed.read() if refresh else None)
                    if main:
                        self.report_speed(probe.tick(self.step), report)
                    # The step's checkpoint comes before its held-out loss and samples, so a
                    # failure there keeps it; at the last step it says that they are still
                    # to do (a run killed during them redoes them when resumed) until they
                    # are done.
                    started = time.time()  # not training: kept out of samples_per_s
                    final = False  # the last step's checkpoint lists work to do: every process
                    if due.save:
                        final = self.step >= tc.n_iters and (due.evaluate or due.sample)
                        self.final_work_pending = final_parts(due) if final else []
                        self.save(snapshot=due.snapshot)
                    if main and due.evaluate:
                        self.metrics.update(self.log_eval_loss(report))
                        self.mark_done("eval")
                    if main and due.sample:
                        self.write_samples(report)
                        self.mark_done("samples")
                    if final and self.stop_requested() is None:
                        self.final_work_pending = []
                        self.save(snapshot=False)
                    self.periodic_seconds += time.time() - started
                signum = self.stop_requested()  # one that abandoned the last step's work
                if signum is not None:
                    self.save(snapshot=False)  # the work left, for the resume to do
                    self.interrupt(signum, report)
                report.line(f"done at step {self.step}")
            except RuntimeError as err:
                if isinstance(err, TrainingError) or not out_of_memory(err):
                    raise
                raise TrainingError(
                    f"out of memory on {self.device} after step {self.step} ("
                    f"{str(err).strip().splitlines()[0][:160]}): lower --batch_size (now "
                    f"{tc.batch_size}) or the config's num_samples (now {tc.num_samples}); "
                    f"{self.kept_checkpoint()}") from None
        except TrainingError as err:
            try:  # the command line prints the error itself
                report.line(f"stopped at step {self.step}: {err}", console=False)
            except OSError:  # the disk may be full
                pass
            raise
        finally:
            report.close()
            self.unlock_workdir()
        return dict(self.metrics)

    def start(self) -> Reporter:
        """Resumes from the checkpoint in workdir, if any, and opens the run's reporter with
        its first lines: notes on checkpoint writes a killed process left behind, warnings from
        loading the checkpoint, and where the run starts. Rank 0 writes config.json."""
        tc = self.cfg.training
        main = self.dist.is_main
        self.lock_workdir()
        notes = self.prepare_workdir() if main else []
        warnings: List[str] = []  # for log.txt, which is opened after resuming

        def warn(message: str) -> None:
            if main:
                warnings.append(message)  # printed by the reporter, which also logs it
            else:
                stderr_line(message)

        try:
            state = load_checkpoint(self.workdir / "checkpoint.pt", self.workdir / "snapshots",
                                    warn=warn)
        except CheckpointError as err:  # files there, none usable: never overwritten
            raise TrainingError(str(err)) from None
        if state is not None:
            self.restore(state)
            changed = changed_settings(state["config"], to_dict(self.cfg), step=self.step)
            saved_data = state.get("data_sha256")
            if (saved_data not in (None, self.data_sha256)
                    and not any(c.startswith(("data.", "training.seed ")) for c in changed)):
                # The same data settings (the seed draws toy data and array data's held-out
                # split), other data: files replaced under the same path.
                changed.append(f"the training data: same settings, other contents "
                               f"({len(self.train_x)} items now)")
            if changed:
                warn(f"warning: resuming with settings changed since the checkpoint ("
                     f"{'; '.join(changed)}): the run will differ from an uninterrupted one")
            if self.step > tc.n_iters:
                raise TrainingError(f"the checkpoint in {self.workdir} is at step {self.step}, "
                                    f"past --n_iters {tc.n_iters}; pass --n_iters "
                                    f"{self.step} or more to train on, or use a new --workdir")
        if main:
            config_json = self.workdir / "config.json"
            try:  # whole or not at all: tools read it (train_classifier.py --sde_of)
                write_json(config_json, to_dict(self.cfg))
            except OSError as err:
                raise OSError(err.errno, f"cannot write {config_json}: "
                                         f"{err.strerror or err}") from None
        report = Reporter(self.workdir, enabled=main, total=tc.n_iters, initial=self.step,
                          batch_size=tc.batch_size, quiet=self.quiet)
        for message in warnings:
            report.warn(message)
        for note in notes:
            report.line(note)
        if tc.sample_every > 0 and not has_picture(self.info.shape):
            report.line(f"no sample grids: samples of shape {self.info.shape} have no picture "
                        f"(images [C, H, W] with 1 or 3 channels, or 2-D points)")
        procs = f" x {self.dist.world_size} processes" if self.dist.world_size > 1 else ""
        verb = "start at" if state is None else "resuming from"
        report.line(f"{verb} step {self.step} of {tc.n_iters} on {self.device}{procs}: "
                    f"{self.cfg.model.name} with {parameter_count(self.model.parameters())} "
                    f"parameters, batch {tc.batch_size}")
        self.last_log, self.periodic_seconds = (time.time(), self.step), 0.0
        return report

    def mark_done(self, part: str) -> None:
        """Takes `part` of the last step's work off the list unless a stop request arrived
        while it ran (which abandons it)."""
        if self.stop.signum is None and part in self.final_work_pending:
            self.final_work_pending.remove(part)

    def finish_final_work(self, report: Reporter) -> None:
        """The held-out loss and/or sample grid due at step n_iters that a stop abandoned, done
        on resuming there (a longer run makes its own)."""
        if self.step != self.cfg.training.n_iters:  # a longer run: its own last step does it
            self.final_work_pending = []
            return
        # The parts still due under this run's settings (a resume may turn sample grids off).
        self.final_work_pending = [part for part in final_parts(due_after(self.step,
                                                                          self.cfg.training))
                                   if part in self.final_work_pending]
        pending = self.final_work_pending
        if not pending:
            self.save(snapshot=False)  # the checkpoint no longer asks for the work
            return
        names = " and ".join({"eval": "held-out loss", "samples": "samples"}[p] for p in pending)
        report.line(f"step {self.step}: the {names} a stop abandoned")
        if self.dist.is_main and "eval" in pending:
            self.metrics.update(self.log_eval_loss(report))
            self.mark_done("eval")
        if self.dist.is_main and "samples" in pending:
            self.write_samples(report)
            self.mark_done("samples")
        signum = self.stop_requested()
        if signum is not None:  # stopped again: what is left stays on the list
            self.save(snapshot=False)
            self.interrupt(signum, report)
        self.final_work_pending = []
        self.save(snapshot=False)  # the checkpoint no longer asks for the work

    def lock_workdir(self) -> None:
        """Rank 0 takes the run folder's lock (`FolderLock`, on train.lock) for the whole run,
        so that a second run started on the same folder stops before it touches the first
        one's files (both would append to log.txt and the TensorBoard events, and overwrite
        each other's checkpoints). The processes of a torchrun launch agree on the outcome.

        Raises:
            TrainingError: another process holds the lock (the message names its PID).
        """
        problem = None
        if self.dist.is_main:
            holder = self.lock.acquire()
            if holder is not None:
                problem = (f"{self.workdir} is in use by another training run (process "
                           f"{holder}); wait for it to end, stop it, or pass another "
                           f"--workdir")
        problem = self.main_problem(problem, f"rank 0 could not take the lock of "
                                             f"{self.workdir}")
        if problem is not None:
            raise TrainingError(problem)

    def main_problem(self, problem: Optional[str], elsewhere: str) -> Optional[str]:
        """Rank 0's `problem` (None: none) made known to every process, which then stop
        together: rank 0 keeps its message, the others get `elsewhere`. A collective on the
        control group, so it is also a barrier that never waits for a GPU."""
        if self.dist.world_size > 1:
            flag = torch.tensor([int(problem is not None)], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                         group=self.control_group)
            if flag.item() and problem is None:
                problem = elsewhere
        return problem

    def unlock_workdir(self) -> None:
        self.lock.release()

    def prepare_workdir(self) -> List[str]:
        """Creates workdir and removes the temporaries of checkpoint writes a killed process
        left in it; returns a note for each."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        notes = []
        for folder in (self.workdir, self.workdir / "snapshots"):
            notes += [f"removed {path.name}, left in {folder} by an interrupted checkpoint "
                      f"write" for path in remove_stale_temporaries(folder)]
        return notes

    def stop_requested(self) -> Optional[int]:
        """The signal that stops the run, or None: with several processes the largest signal
        number any of them received, so that all stop at the same step (one CPU all-reduce
        per step, which never waits for a GPU)."""
        signum = self.stop.signum or 0
        if self.dist.world_size > 1:
            flag = torch.tensor([signum], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                         group=self.control_group)
            signum = int(flag.item())
        return signum or None

    def interrupt(self, signum: int, report: Reporter) -> None:
        """Writes the checkpoint of the step reached (unless written already) and raises
        TrainingInterrupted; called by every process at the same step."""
        self.settle(report)
        if self.step != self.saved_step:
            self.save(snapshot=False)
        stop = TrainingInterrupted(signum, self.step)
        report.line(str(stop), console=False)  # the command line prints it
        raise stop

    def report_speed(self, steps_per_s: Optional[float], report: Reporter) -> None:
        """The line with the measured speed and the expected duration of the steps left, and
        `slow_hint` after it when that is long on a CPU."""
        tc = self.cfg.training
        left = tc.n_iters - self.step
        if steps_per_s is None or left <= 0:
            return
        seconds = left / steps_per_s
        images = steps_per_s * tc.batch_size
        duration = format_duration(seconds)
        if not duration.startswith("under"):
            duration = "about " + duration
        report.line(f"speed {images:.0f} images/s ({1 / steps_per_s:.3g} s/step): the {left} "
                    f"steps left take {duration}")
        if self.slow_hint and self.device.type == "cpu" and seconds > SLOW_CPU_RUN_SECONDS:
            report.line(self.slow_hint)

    def train_step(self, report: Reporter) -> Tuple[torch.Tensor, float, torch.Tensor]:
        """One optimizer step (or a skipped one); returns (loss over all processes, lr,
        gradient norm).

        A step whose loss or gradient norm is not finite changes neither the weights, the EMA
        nor the optimizer state. With fused Adam that is decided on the device (`found_inf`)
        and the host reads the outcome later, in `settle`, so it never waits for the device
        here; otherwise it is decided, and settled, at once.
        """
        tc = self.cfg.training
        step = self.step
        # Network dropout: a stream of its own, different on every process.
        torch.manual_seed(step_seed(tc.seed, step, STREAM_DROPOUT + self.dist.rank))
        gen = torch.Generator(device=self.device).manual_seed(step_seed(tc.seed, step))
        x, labels = self.step_batch(step)
        lr = learning_rate(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.train_loss(x, labels, gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients of the processes here
        # Finiteness is decided on values equal on all processes, so they all agree.
        loss = self.mean_over_processes(loss.detach())
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm)])
        decay = ema_decay(step, self.ema_rate, tc.ema_warmup)
        self.unsettled.append((step, finite))
        if self.fused_adam:
            ok = finite.all()
            self.optimizer.found_inf = (~ok).float()  # the fused kernel skips the update
            self.optimizer.step()
            ema_update(self.ema, self.model, decay, apply=ok)
        else:
            if bool(finite.all()):
                self.optimizer.step()
                ema_update(self.ema, self.model, decay)
            self.settle(report)
        self.step += 1
        return loss, lr, grad_norm

    def settle(self, report: Reporter) -> None:
        """Reads the finiteness of the steps run since the last call (one wait for the device)
        and accounts for their skips in order; raises TrainingError as `skip_nonfinite` does.
        Called before anything that reports or saves the training state."""
        if not self.unsettled:
            return
        steps = [step for step, _ in self.unsettled]
        flags = torch.stack([f for _, f in self.unsettled]).cpu().tolist()
        self.unsettled = []
        for step, (loss_ok, grad_ok) in zip(steps, flags):
            if loss_ok and grad_ok:
                self.nonfinite_streak = 0
            else:
                self.skip_nonfinite(step, "loss" if not loss_ok else "gradient norm", report)

    def kept_checkpoint(self) -> str:
        """What a failure leaves to resume from, for its message."""
        if self.saved_step is None:
            return "no checkpoint was written before"
        return f"the last good checkpoint (step {self.saved_step}) is kept in {self.workdir}"

    def skip_nonfinite(self, step: int, what: str, report: Reporter) -> None:
        """Skips the update of `step` (0-based; with skip_nonfinite) or raises TrainingError.
        Messages count updates from 1, as the log lines do ("step k": after k updates)."""
        tc = self.cfg.training
        problem = f"non-finite {what} at step {step + 1}"
        keep = self.kept_checkpoint()
        if not tc.skip_nonfinite:
            raise NonFiniteError(f"{problem}; {keep} (--skip_nonfinite skips such steps)")
        self.skipped += 1
        self.nonfinite_streak += 1
        report.line(f"step {step + 1} skipped: {problem} ({self.nonfinite_streak} in a row, "
                    f"{self.skipped} in all)")
        if self.nonfinite_streak > tc.max_nonfinite:
            raise NonFiniteError(f"{problem}: {self.nonfinite_streak} skipped steps in a row, "
                                 f"more than max_nonfinite={tc.max_nonfinite}; {keep}")

    # --- periodic actions (see `due_after`) ------------------------------------------------

    def log_step(self, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor,
                 report: Reporter) -> Dict[str, float]:
        """Logs the metrics of the step just taken (after `settle`) and returns them; the
        throughput is that since the previous log step."""
        now = time.time()
        last_time, last_step = self.last_log
        rate = ((self.step - last_step) * self.cfg.training.batch_size
                / max(now - last_time - self.periodic_seconds, 1e-9))
        self.last_log, self.periodic_seconds = (now, self.step), 0.0
        metrics = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "samples_per_s": rate, "peak_mem_mib": peak_memory_mib(self.device),
                   "skipped_steps": float(self.skipped)}
        report.scalars("train", metrics, self.step)
        report.line(f"step {self.step} " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
        return metrics

    def log_eval_loss(self, report: Reporter) -> Dict[str, float]:
        """Logs the EMA's held-out loss and returns {"eval_loss": loss}, or {} when a stop
        request abandoned it (the stop is honoured before the next step). Rank 0 only, with
        no collectives inside; the other processes wait in the next one."""
        try:
            with self.stop.abandonable():
                loss = self.eval_loss()
        except Abandoned:
            return {}
        report.scalars("eval", {"loss_ema": loss}, self.step)
        report.line(f"step {self.step} eval_loss_ema={loss:.6g}")
        return {"eval_loss": loss}

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Held-out loss of the EMA weights on fixed batches with fixed noise (true labels)."""
        tc = self.cfg.training
        gen = torch.Generator(device=self.device).manual_seed(
            step_seed(tc.seed, 0, STREAM_EVAL_NOISE))
        data_gen = torch.Generator().manual_seed(step_seed(tc.seed, 0, STREAM_EVAL_DATA))
        n = len(self.eval_x)
        size = min(tc.batch_size, n)
        total = 0.0
        for b in range(tc.eval_batches):
            idx = (torch.arange(size) + b * size) % n
            x = self.to_device(self.model_input(self.eval_x[idx], data_gen))
            labels = None if self.num_classes is None else self.eval_y[idx].to(self.device)
            with self.autocast():
                total += self.loss_fn(self.score_fn(self.ema, labels), x, generator=gen).item()
        return total / tc.eval_batches

    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """Samples of the EMA model for the grid: DPM-Solver (order 2, multistep) with
        `sample_steps` evaluations (default 20), or with `sampler` "pc" Euler–Maruyama with
        the SDE's steps; a class-conditional model gets labels 0, 1, ..., K - 1, 0, 1, ... in
        grid order."""
        tc = self.cfg.training
        gen = torch.Generator(device=self.device).manual_seed(
            step_seed(tc.seed, 0, STREAM_SAMPLES))
        eps = self.sde.sampling_eps
        labels = None
        if self.num_classes is not None:
            labels = torch.arange(tc.num_samples, device=self.device) % self.num_classes
        score_fn = self.score_fn(self.ema, labels)
        shape = (tc.num_samples,) + self.info.shape
        if tc.sampler == "dpm_solver":
            x, _ = sample_dpm_solver(self.sde, score_fn, shape,
                                     num_steps=tc.sample_steps or GRID_DPM_STEPS, eps=eps,
                                     device=self.device, generator=gen)
        else:
            x, _ = sample_pc(self.sde, score_fn, shape, predictor="euler_maruyama",
                             corrector="none", num_steps=tc.sample_steps, eps=eps,
                             device=self.device, generator=gen)
        return x

    def picture_range(self) -> Tuple[float, float]:
        """The values shown black to white in sample grids: the range the model reads for
        8-bit images, else (arrays of images) the training data's own."""
        if self.info.data_range is not None:
            return tuple(self.info.data_range)
        lo, hi = float(self.train_x.min()), float(self.train_x.max())
        return (lo, hi) if lo < hi else (lo - 1.0, lo + 1.0)

    def write_samples(self, report: Optional[Reporter] = None) -> Optional[Path]:
        """Writes `sample_grid` as samples/samples_STEP.png (and to TensorBoard through
        `report`); returns the path, or None for data without a picture (drawing no samples)
        or when a stop request abandoned the sampling."""
        if not has_picture(self.info.shape):
            return None
        try:
            with self.stop.abandonable():
                x = self.sample_grid().cpu()
        except Abandoned:
            return None
        picture = samples_picture(x, title=f"step {self.step}", value_range=self.picture_range())
        if picture is None:
            return None
        path = self.workdir / "samples" / f"samples_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        if report is not None:
            report.image("samples", picture, self.step)
        return path


def train(cfg: Config, workdir: str, *, dist: Optional[DistInfo] = None, quiet: bool = False,
          slow_hint: Optional[str] = None) -> Dict[str, float]:
    """Trains (or resumes) with `cfg`, writing into `workdir`; returns the last metrics.

    SIGINT and SIGTERM are handled while it runs (in the main thread; `score_sde.stopping`):
    the step under way is finished, its checkpoint written and TrainingInterrupted raised.

    Args:
        cfg: the resolved configuration.
        workdir: run folder.
        dist: process layout; None reads torchrun's environment variables (`dist_from_env`).
            With several processes this initialises the default process group (NCCL on
            CUDA, gloo on the CPU) and destroys it on return or error.
        quiet: no progress bar and no routine log lines on stderr (log.txt gets them all).
        slow_hint: printed after the expected duration when a CPU run would take longer
            than `SLOW_CPU_RUN_SECONDS`.

    Raises:
        ValueError, FileNotFoundError: bad configuration or data.
        TrainingError: an incompatible checkpoint; its subclasses NonFiniteError (non-finite
            loss or gradient) and CheckpointWriteError (disk full, no permission).
        TrainingInterrupted: a SIGINT or SIGTERM (a KeyboardInterrupt); `step` is that of
            the checkpoint written, None if it came before training started.
    """
    dist = dist_from_env(os.environ) if dist is None else dist
    options = dict(quiet=quiet, slow_hint=slow_hint)
    with SignalStop() as stop:
        if dist.world_size == 1:
            return Trainer(cfg, workdir, dist=dist, stop=stop, **options).run()
        check_world_size(cfg, dist)
        device = resolve_device(cfg.training.device, dist)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(process_group_backend(device), rank=dist.rank,
                                             world_size=dist.world_size,
                                             timeout=PROCESS_GROUP_TIMEOUT)
        trainer = None
        try:
            trainer = Trainer(cfg, workdir, dist=dist, stop=stop, **options)
            return trainer.run()
        finally:
            # DistributedDataParallel's reducer keeps gloo work (and tensors) alive through
            # reference cycles; collected during interpreter shutdown, it aborted the process
            # (SIGABRT after "done"). Free it while the interpreter is whole.
            trainer = None
            gc.collect()
            torch.distributed.destroy_process_group()
