"""The trained result on Fashion-MNIST in one command: train a DDPM++ VP model, then its test
bits/dim, samples of three samplers and their classifier Fréchet distances.

    python benchmarks/fashion_mnist.py --workdir /tmp/fm         # GPU: /tmp/fm/results
    python benchmarks/fashion_mnist.py --tiny --workdir /tmp/fm_tiny         # CPU smoke test

Every stage runs the project's own command line in a subprocess (`sys.executable`), so the
numbers are exactly what users get; each stage's output goes to RESULTS/logs/<stage>.log.

1. train: `python -m score_sde.train --config configs/fashion_mnist_ddpmpp.py --sde vp
   --dataset fashion_mnist --n_iters N --batch_size B` (on CUDA with --bf16 --channels_last
   unless --fp32). Without --n_iters, N fills --train_seconds: a first run to
   --calibration_iters steps measures images/s (the median of its logged intervals after the
   first, so CUDA warm-up is left out) and its fixed costs (start-up, held-out loss, sample
   grid and checkpoint at the end), then the same command with --n_iters N resumes it.
   Resuming is exact (all randomness of step k is seeded from (seed, k)), so the result is
   that of the one command. N is a multiple of --calibration_iters; the plan is stored in
   summary.json and reused by reruns.
2. classifier: `tools/train_classifier.py --kind clean` (skipped with --classifier PATH).
3. fd_real_train: `tools/fid.py --classifier ... --split test` of the first --num_samples
   training images (written as a samples .npz): the distance real data reach at this sample
   count, against which the samplers' distances read.
4. samples and distances: `tools/sample.py` with DPM-Solver (multistep, --dpm_order) at each
   of --dpm_steps score evaluations (one of them the final denoising), then the
   predictor-corrector sampler (reverse diffusion + one Langevin corrector step, snr 0.16,
   --pc_steps steps: 2 pc_steps evaluations), each --num_samples samples, and
   `tools/fid.py` of each set as in 3.
5. likelihood: `tools/likelihood.py` on the first --num_test test images with the paper's
   protocol (uniform dequantization, dopri5 at rtol = atol = --nll_tol (1e-5) from eps = 1e-5,
   one Rademacher probe, EMA weights) in --nll_repeats passes (the tool's default is 5; one
   pass over more images gives the smaller error bar for the same time). It runs last because
   it resumes batch by batch when stopped.

Results. RESULTS/summary.json (every number, the commands, seconds per stage, device, torch
version, date) and RESULTS/summary.md (a table for BENCHMARKS.md) are rewritten after every
stage; RESULTS/raw/ keeps each tool's JSON, RESULTS/grid_<name>.png the sample grids, and
RESULTS/ema_weights_fp16.pt the trained EMA weights in float16 (`tools/export_weights.py`,
right after training), which tools/likelihood.py and tools/sample.py read with --checkpoint.

Resume and time budget. A stage is skipped when summary.json records it as done with the same
command, upstream stages and input files and its outputs exist, so rerunning the same command
continues where it stopped (training and the likelihood also resume inside a stage; keep
--results where the workdir is, since its summary.json is the record). With --time_budget
(default 540 s on CUDA, for a 600 s job limit) no stage runs past it: a running one is
terminated at the budget (checkpoints and per-batch likelihood records are written atomically,
so nothing finished is lost), and the PC stage, projected from the two DPM-Solver runs'
timings, is left for a rerun when it would not fit; the script then exits with status 5.

Defaults (CUDA) are not measured yet: training is sized by time (--train_seconds 240) instead
of steps, and 1,000 samples and 1,000 test images are chosen to fit a 600 s job on one GPU
together with training. Sampling and the likelihood run in fp32 (TF32 convolutions, PyTorch's
default). Compare with the seconds per stage the script prints and adjust.

--tiny: a CPU smoke test of the whole pipeline in about a minute: a tiny network (nf 8, two
resolutions, one block each, written to WORKDIR/tiny_config.py), a few dozen steps, 4 test
images at tolerance 1e-3, 32 samples, 30 PC steps (the DDPM chain needs more than beta_max =
20), one thread per process. Its numbers mean nothing.

Exit status: 0 done; 2 bad input (flags, missing data, a missing Python package), one line on
stderr; a failing stage stops the pipeline with one line naming it, its exit status and its
log, and the script exits with that status (1 if it was killed by a signal); 5 stopped by
--time_budget (rerun the same command to continue).
"""
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from score_sde._utils import stderr_line  # noqa: E402
from score_sde.cli import InputError, check_path, run_tool, sha256_file, write_json  # noqa: E402
from score_sde.config import apply_overrides, load_config_file, to_dict  # noqa: E402
from score_sde.datasets import FASHION_MNIST_DIR, load_dataset  # noqa: E402
from score_sde.models import MODELS  # noqa: E402

_START = time.time()  # --time_budget counts from here (after the imports)

CONFIG = REPO / "configs" / "fashion_mnist_ddpmpp.py"
DATA_ENV = "FASHION_MNIST_DIR"  # overrides the default --data_dir
EXIT_INCOMPLETE = 5
# Packages the stages import; checked before anything runs.
REQUIRED = ("absl", "scipy", "torchdiffeq", "tqdm", "tensorboard")
CALIBRATION_SAFETY = 0.9  # share of the remaining training time that is planned for
PC_CORRECTOR_STEPS = 1  # tools/sample.py's default: one Langevin step per predictor step
FD_ALLOWANCE_S = 20.0  # time kept free after the PC stage for its Fréchet distance
MIN_STAGE_S = 5.0  # a stage is not started with less of the budget left
TERMINATE_WAIT_S = 30.0  # after SIGTERM at the budget, wait this long before SIGKILL

# Defaults per mode; a flag given on the command line always wins.
DEFAULTS = {
    "full": dict(train_seconds=240.0, calibration_iters=500, batch_size=128, num_test=1000,
                 nll_batch_size=250, nll_repeats=1, nll_tol=1e-5, num_samples=1000,
                 sample_batch_size=1000, pc_steps=1000, classifier_iters=2000, num_ref=None),
    "tiny": dict(train_seconds=25.0, calibration_iters=20, batch_size=16, num_test=4,
                 nll_batch_size=4, nll_repeats=1, nll_tol=1e-3, num_samples=32,
                 sample_batch_size=32, pc_steps=30, classifier_iters=30, num_ref=500),
}
# Flags without mode-dependent defaults.
WEIGHTS_FILE = "ema_weights_fp16.pt"  # in the results folder
OPTIONS = ("data_dir", "workdir", "results", "device", "tiny", "fp32", "n_iters", "dpm_steps",
           "dpm_order", "classifier", "time_budget", "seed")
TINY_MODEL = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,))
TINY_TRAINING = dict(warmup=10, log_every=10, eval_every=1000, eval_batches=1, sample_every=0,
                     checkpoint_every=1000, snapshot_every=1000, keep_snapshots=1)
TINY_CLASSIFIER = ["--width", "8", "--feature_dim", "16", "--batch_size", "32",
                   "--num_test", "200"]
_LOG_RATE = re.compile(r"^step (\d+) .*\bsamples_per_s=([0-9.eE+-]+)")


class StageFailed(RuntimeError):
    """A stage's command exited with a non-zero status."""

    def __init__(self, name: str, status: int, log: Path):
        super().__init__(f"stage {name} failed with exit status {status}; see {log}")
        self.status = status if status > 0 else 1


class OutOfTime(RuntimeError):
    """--time_budget is spent (or the next stage would not fit): rerun to continue."""


# --- small pure helpers -------------------------------------------------------------------------

def plan_n_iters(*, calibration_iters: int, calibration_seconds: float, images_per_s: float,
                 batch_size: int, train_seconds: float) -> int:
    """Training steps that fill `train_seconds`, given a calibration run of `calibration_iters`
    steps that took `calibration_seconds` at `images_per_s`: a multiple of calibration_iters,
    at least calibration_iters. The calibration run's fixed costs (its time beyond the steps)
    are assumed to recur once in the second run."""
    step_s = batch_size / images_per_s
    fixed = max(0.0, calibration_seconds - calibration_iters * step_s)
    left = train_seconds - calibration_seconds - fixed
    extra = int(CALIBRATION_SAFETY * left / step_s) if left > 0 else 0
    return calibration_iters * (1 + extra // calibration_iters)


def logged_rates(log_txt: Path, *, up_to: Optional[int] = None) -> List[float]:
    """samples_per_s of the intervals logged in a run's log.txt up to step `up_to`, without
    the first interval after each start (CUDA warm-up)."""
    rates, first = [], True
    for line in log_txt.read_text().splitlines() if log_txt.is_file() else []:
        if line.startswith(("start at step", "resuming from step")):  # a launch
            first = True
            continue
        m = _LOG_RATE.match(line)
        if m and (up_to is None or int(m.group(1)) <= up_to):
            if not first:
                rates.append(float(m.group(2)))
            first = False
    return rates


def last_json_line(path: Path) -> Dict[str, Any]:
    """The last line of a log that is a JSON object (a command's result), or {}."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {}


def shown(command: Sequence[str]) -> str:
    """A command as a shell line, with the interpreter shown as `python`."""
    return shlex.join(["python" if c == sys.executable else c for c in command])


def stage_key(command: Sequence[str], upstream: Sequence[str]) -> str:
    text = json.dumps([list(command), list(upstream)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _samples(npz: Path) -> Optional[np.ndarray]:
    with np.load(npz) as archive:
        return archive["samples"] if "samples" in archive.files else None


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --- the pipeline -------------------------------------------------------------------------------

class Pipeline:
    """The stages, their records in RESULTS/summary.json, and the summary files."""

    def __init__(self, opts: Dict[str, Any], *, argv: Sequence[str]):
        self.o = opts
        self.work, self.results = opts["workdir"], opts["results"]
        self.run_dir = self.work / "run"
        self.raw, self.logs = self.results / "raw", self.results / "logs"
        for folder in (self.work, self.raw, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        old = _read_json(self.results / "summary.json") or {}
        self.stages: Dict[str, Dict[str, Any]] = old.get("stages", {})
        self.train_plan: Optional[Dict[str, Any]] = old.get("train_plan")
        self.argv = list(argv)
        self.stopped: Optional[str] = None
        self.deferred: List[str] = []
        paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                               if p]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(paths))
        if opts["tiny"]:  # tiny tensors on shared cores: thread hand-offs cost more than they save
            self.env.setdefault("OMP_NUM_THREADS", "1")

    def say(self, text: str) -> None:
        print(f"[{time.time() - _START:6.0f} s] {text}", flush=True)

    def remaining(self) -> Optional[float]:
        budget = self.o["time_budget"]
        return budget - (time.time() - _START) if budget else None

    # --- running stages ---

    def stage(self, name: str, command: List[str], *, upstream: Sequence[str] = (),
              inputs: Sequence[Path] = (), outputs: Sequence[Path] = ()) -> bool:
        """Runs `command` as stage `name` unless it is recorded as done with the same command,
        upstream stages and `inputs` (file contents) and its outputs exist; returns True if it
        ran.

        Raises:
            StageFailed: the command failed.
            OutOfTime: the budget ran out before or during the stage.
        """
        key = stage_key(command, [self.stages[u]["key"] for u in upstream]
                        + [sha256_file(Path(p)) for p in inputs])
        done = self.stages.get(name)
        if done and done.get("key") == key and all(Path(p).exists() for p in outputs):
            self.say(f"{name}: done already ({done['seconds']:.1f} s), skipped")
            return False
        self.forget(name)
        left = self.remaining()
        if left is not None and left < MIN_STAGE_S:
            raise OutOfTime(f"--time_budget {self.o['time_budget']:g} s is spent before stage "
                            f"{name}; rerun the same command to continue")
        log = self.logs / f"{name}.log"
        self.say(f"{name}: {shown(command)}")
        start = time.time()
        with open(log, "a") as f:
            f.write(f"=== {_now()}\n$ {shlex.join(command)}\n")
            f.flush()
            proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT)
            try:
                status = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=TERMINATE_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                f.write(f"=== terminated at --time_budget after {time.time() - start:.0f} s\n")
                raise OutOfTime(f"stage {name} was stopped at --time_budget "
                                f"{self.o['time_budget']:g} s after {time.time() - start:.0f} s "
                                f"(its finished work is kept); rerun the same command to "
                                f"continue") from None
        seconds = time.time() - start
        if status != 0:
            tail = log.read_text(errors="replace").splitlines()[-12:]
            print("\n".join(f"  | {line}" for line in tail), flush=True)
            raise StageFailed(name, status, log)
        self.stages[name] = {"command": shown(command), "key": key, "seconds": seconds,
                             "finished": _now(), "log": str(log.relative_to(self.results)),
                             "upstream": list(upstream)}
        self.say(f"{name}: done in {seconds:.1f} s")
        return True

    def forget(self, name: str) -> None:
        """Drops the record of `name` and of every stage downstream of it."""
        self.stages.pop(name, None)
        for other, record in list(self.stages.items()):
            if name in record.get("upstream", ()):
                self.forget(other)

    # --- the stages ---

    def device_flags(self) -> List[str]:
        return ["--device", self.o["device"]]

    def train_command(self, n_iters: int) -> List[str]:
        o = self.o
        cmd = [sys.executable, "-m", "score_sde.train", "--config", str(o["config"]),
               "--sde", "vp", "--dataset", "fashion_mnist", "--data_dir", str(o["data_dir"]),
               "--workdir", str(self.run_dir), "--n_iters", str(n_iters), "--batch_size",
               str(o["batch_size"]), "--seed", str(o["seed"]), *self.device_flags()]
        if o["device"] == "cuda" and not o["fp32"]:
            cmd += ["--bf16", "--channels_last"]
        return cmd

    def run_training(self) -> None:
        o = self.o
        checkpoint = [self.run_dir / "checkpoint.pt"]
        if o["n_iters"] is not None:
            self.train_plan = {"n_iters": o["n_iters"], "how": "--n_iters"}
            self.stage("train", self.train_command(o["n_iters"]), outputs=checkpoint)
        else:
            calib = o["calibration_iters"]
            ran = self.stage("train_calibration", self.train_command(calib), outputs=checkpoint)
            key = self.stages["train_calibration"]["key"]
            plan = self.train_plan or {}
            if ran or plan.get("calibration_key") != key \
                    or plan.get("train_seconds") != o["train_seconds"]:
                self.train_plan = self.plan(calib, key)
            self.stage("train", self.train_command(self.train_plan["n_iters"]),
                       upstream=["train_calibration"], outputs=checkpoint)
        done = [line for line in (self.run_dir / "log.txt").read_text().splitlines()
                if line.startswith("done at step ")]
        step = int(done[-1].split()[-1]) if done else None
        if step != self.train_plan["n_iters"]:
            raise InputError(f"the checkpoint in {self.run_dir} is at step {step}, not at the "
                             f"planned {self.train_plan['n_iters']}; use a new --workdir")
        result = last_json_line(self.logs / "train.log")
        calibration = self.logs / "train_calibration.log"
        if "loss" not in result and calibration.is_file():
            # The plan asked for no more steps than calibration ran (a slow machine): the
            # training command had nothing left to do, and calibration's result is the run's.
            earlier = last_json_line(calibration)
            if earlier.get("step") == result.get("step"):
                result = earlier
        if result:
            write_json(self.raw / "train.json", result)
        grid = self.run_dir / "samples" / f"samples_{self.train_plan['n_iters']:08d}.png"
        if grid.is_file():
            shutil.copyfile(grid, self.results / "grid_train.png")
        self.write_summary()

    def plan(self, calib: int, key: str) -> Dict[str, Any]:
        o = self.o
        rates = logged_rates(self.run_dir / "log.txt", up_to=calib)
        if not rates:
            raise InputError(f"--calibration_iters {calib} gave no timed interval in "
                             f"{self.run_dir / 'log.txt'}; it needs two logging intervals")
        rate = statistics.median(rates)
        seconds = self.stages["train_calibration"]["seconds"]
        n_iters = plan_n_iters(calibration_iters=calib, calibration_seconds=seconds,
                               images_per_s=rate, batch_size=o["batch_size"],
                               train_seconds=o["train_seconds"])
        self.say(f"train: {rate:.0f} images/s in calibration ({seconds:.0f} s for {calib} "
                 f"steps); planning {n_iters} steps for --train_seconds {o['train_seconds']:g}")
        return {"n_iters": n_iters, "how": "--train_seconds", "train_seconds": o["train_seconds"],
                "calibration_iters": calib, "calibration_seconds": seconds,
                "calibration_images_per_s": rate, "safety": CALIBRATION_SAFETY,
                "calibration_key": key}

    def run_classifier(self) -> Path:
        o = self.o
        if o["classifier"] is not None:
            return o["classifier"]
        path = self.work / "classifier" / "fashion_clean.pt"
        cmd = [sys.executable, "tools/train_classifier.py", "--kind", "clean", "--dataset",
               "fashion_mnist", "--data_dir", str(o["data_dir"]), "--n_iters",
               str(o["classifier_iters"]), "--seed", str(o["seed"]), "--output", str(path),
               "--summary", str(self.raw / "classifier.json"), *self.device_flags(),
               *(TINY_CLASSIFIER if o["tiny"] else [])]
        self.stage("classifier", cmd, outputs=[path, self.raw / "classifier.json"])
        self.write_summary()
        return path

    def sample(self, name: str, sampler_flags: List[str]) -> None:
        o = self.o
        out = self.work / "samples" / name
        cmd = [sys.executable, "tools/sample.py", "--workdir", str(self.run_dir),
               "--num_samples", str(o["num_samples"]), "--batch_size",
               str(o["sample_batch_size"]), "--seed", str(o["seed"]), "--output_dir", str(out),
               "--noprogress", *sampler_flags, *self.device_flags()]
        self.stage(f"sample_{name}", cmd, upstream=["train"],
                   outputs=[out / "samples.npz", out / "summary.json"])
        shutil.copyfile(out / "summary.json", self.raw / f"sample_{name}.json")
        if (out / "samples.png").is_file():
            shutil.copyfile(out / "samples.png", self.results / f"grid_{name}.png")
        self.write_summary()

    def fd(self, name: str, samples: Path, upstream: List[str], classifier: Path) -> None:
        o = self.o
        output = self.raw / f"fd_{name}.json"
        cmd = [sys.executable, "tools/fid.py", "--samples", str(samples), "--classifier",
               str(classifier), "--dataset", "fashion_mnist", "--data_dir", str(o["data_dir"]),
               "--split", "test", "--num_samples", str(o["num_samples"]), "--ref_stats",
               str(self.work / "fd_ref_stats.npz"), "--output", str(output),
               *self.device_flags()]
        if o["num_ref"] is not None:
            cmd += ["--num_ref", str(o["num_ref"])]
        if o["classifier"] is None:
            upstream = ["classifier", *upstream]
        self.stage(f"fd_{name}", cmd, upstream=upstream, inputs=[samples, classifier],
                   outputs=[output])
        self.write_summary()

    def pc_fits(self, pc_evals: int) -> bool:
        """Whether the PC stage fits the budget, projected from the DPM-Solver runs (their
        difference in evaluations cancels start-up and loading)."""
        runs = sorted((s["nfe_mean"], s["seconds"]) for s in (
            _read_json(self.raw / f"sample_dpm{k}.json") for k in self.o["dpm_steps"]) if s)
        left = self.remaining()
        if len(runs) < 2 or runs[-1][0] <= runs[0][0]:
            return True
        (n0, s0), (n1, s1) = runs[0], runs[-1]
        projected = s0 + (pc_evals - n0) * max(0.0, (s1 - s0) / (n1 - n0))
        self.say(f"sample_pc: projected {projected:.0f} s from the DPM-Solver timings"
                 + (f"; {left:.0f} s of the budget left" if left is not None else ""))
        return left is None or projected + FD_ALLOWANCE_S < left

    def run_all(self) -> None:
        o = self.o
        self.run_training()
        # The EMA weights alone in float16, small enough to carry away from a GPU machine
        # and evaluate later (tools/likelihood.py --checkpoint, tools/sample.py --checkpoint).
        weights = self.results / WEIGHTS_FILE
        self.stage("export_weights", [
            sys.executable, "tools/export_weights.py", "--workdir", str(self.run_dir),
            "--output", str(weights), "--fp16", "--overwrite"], upstream=["train"],
            outputs=[weights])
        classifier = self.run_classifier()

        real = self.work / "real_train" / "samples.npz"
        images = load_dataset("fashion_mnist", split="train", data_dir=str(o["data_dir"]),
                              num_samples=o["num_samples"])[0].tensors[0].numpy()
        if not real.is_file() or not np.array_equal(_samples(real), images):
            real.parent.mkdir(parents=True, exist_ok=True)
            np.savez(real, samples=images)
        self.fd("real_train", real, [], classifier)

        for steps in o["dpm_steps"]:
            name = f"dpm{steps}"
            # tools/sample.py ends with Tweedie's denoiser: one evaluation of the `steps`.
            self.sample(name, ["--sampler", "dpm_solver", "--num_steps", str(steps - 1), "--order",
                               str(o["dpm_order"]), "--dpm_method", "multistep"])
            self.fd(name, self.work / "samples" / name / "samples.npz", [f"sample_{name}"],
                    classifier)

        pc_evals = o["pc_steps"] * (1 + PC_CORRECTOR_STEPS)
        pc_done = self.stages.get("sample_pc") and self.stages.get("fd_pc")
        if pc_done or self.pc_fits(pc_evals):
            self.sample("pc", ["--sampler", "pc", "--predictor", "reverse_diffusion",
                               "--corrector", "langevin", "--snr", "0.16", "--corrector_steps",
                               str(PC_CORRECTOR_STEPS), "--num_steps", str(o["pc_steps"])])
            self.fd("pc", self.work / "samples" / "pc" / "samples.npz", ["sample_pc"],
                    classifier)
        else:
            self.deferred.append("sample_pc and fd_pc were left for a rerun: projected not to "
                                 "fit --time_budget")

        nll = self.raw / "likelihood.json"
        tol = f"{o['nll_tol']:g}"
        self.stage("likelihood", [
            sys.executable, "tools/likelihood.py", "--workdir", str(self.run_dir),
            "--data_dir", str(o["data_dir"]), "--split", "test", "--num_samples",
            str(o["num_test"]), "--batch_size", str(o["nll_batch_size"]), "--num_repeats",
            str(o["nll_repeats"]), "--rtol", tol, "--atol", tol, "--eps", "1e-5",
            "--divergence", "rademacher", "--seed", str(o["seed"]), "--output", str(nll),
            *self.device_flags()], upstream=["train"], outputs=[nll])
        if self.deferred:
            raise OutOfTime("; ".join(self.deferred) + "; rerun the same command to continue")

    # --- summaries ---

    def collect(self) -> Dict[str, Any]:
        """The numbers of every finished stage, read back from RESULTS/raw."""
        o, raw = self.o, self.raw
        out: Dict[str, Any] = {}
        plan = self.train_plan or {}
        if "train" in self.stages and plan:
            train = _read_json(raw / "train.json") or {}
            rates = logged_rates(self.run_dir / "log.txt", up_to=plan["n_iters"])
            out["train"] = {
                "n_iters": plan["n_iters"], "batch_size": o["batch_size"],
                "seconds": sum(self.stages[s]["seconds"] for s in ("train_calibration", "train")
                               if s in self.stages),
                "images_per_s_median": statistics.median(rates) if rates else None,
                "precision": ("bf16 autocast + channels-last" if o["device"] == "cuda"
                              and not o["fp32"] else "fp32"),
                "final_loss": train.get("loss"), "eval_loss_ema": train.get("eval_loss"),
                "plan": plan}
        nll = _read_json(raw / "likelihood.json")
        if nll and "likelihood" in self.stages:
            keys = ("bpd", "bpd_stderr", "nll_nats", "stderr", "stderr_samples", "num_data",
                    "num_repeats", "nfe_mean", "seconds", "solve_seconds", "step", "batch_size",
                    "rtol", "atol", "eps", "divergence", "dequantization", "use_ema")
            out["likelihood"] = {k: nll.get(k) for k in keys}
        clf = _read_json(raw / "classifier.json")
        if clf and "classifier" in self.stages:
            out["classifier"] = {k: clf.get(k) for k in ("test_accuracy", "n_iters",
                                                         "num_params", "seconds", "output")}
        elif o["classifier"] is not None:
            out["classifier"] = {"output": str(o["classifier"]), "trained_here": False}
        samples = {}
        for name in [f"dpm{k}" for k in o["dpm_steps"]] + ["pc", "real_train"]:
            entry: Dict[str, Any] = {}
            summ = _read_json(raw / f"sample_{name}.json")
            if summ and f"sample_{name}" in self.stages:
                entry.update({k: summ.get(k) for k in (
                    "sampler", "num_steps", "order", "dpm_method", "predictor", "corrector",
                    "snr", "eps", "nfe_mean", "nfe", "num_samples", "batch_size", "seconds",
                    "step")})
                if (self.results / f"grid_{name}.png").is_file():
                    entry["grid"] = f"grid_{name}.png"
            fd = _read_json(raw / f"fd_{name}.json") if f"fd_{name}" in self.stages else None
            if fd:
                space = fd.get("feature_spaces", {}).get("classifier", {})
                entry.update({"classifier_fd": fd.get("classifier_fd"),
                              "fd_feature_dim": space.get("dim"),
                              "fd_num_samples": fd.get("num_samples"),
                              "fd_num_ref": fd.get("num_ref"), "fd_split": fd.get("split"),
                              "fd_notes": fd.get("notes"), "fd_seconds": fd.get("seconds")})
                if name == "real_train":
                    entry.update({"source": "first training images",
                                  "num_samples": fd.get("num_samples")})
            if entry:
                samples[name] = entry
        out["samples"] = samples
        return out

    def write_summary(self, *, complete: bool = False) -> Dict[str, Any]:
        o = self.o
        summary = {
            "benchmark": "fashion_mnist", "complete": complete, "stopped": self.stopped,
            "date": _now(), "command": shlex.join(["python", "benchmarks/fashion_mnist.py",
                                                   *self.argv[1:]]),
            "environment": environment(o["device"]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in o.items()
                         if k != "model"},
            "model": o["model"], "train_plan": self.train_plan,
            "results": self.collect(), "stages": self.stages,
            "seconds_this_run": time.time() - _START}
        write_json(self.results / "summary.json", summary)
        tmp = self.results / f".summary.md.tmp{os.getpid()}"
        tmp.write_text(summary_markdown(summary))
        os.replace(tmp, self.results / "summary.md")
        return summary


@functools.lru_cache(maxsize=None)
def environment(device: str) -> Dict[str, Any]:
    """Versions and the device's name."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "python_executable": sys.executable,
           "device_type": device,
           "cpu_count": os.cpu_count()}
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name(0)
    else:
        name = platform.processor()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env["device_name"] = name or "cpu"
    return env


def stage_order(dpm_steps: Sequence[int]) -> List[str]:
    """The stages in the order they run."""
    sampled = [f"{kind}_{name}" for name in [f"dpm{k}" for k in dpm_steps] + ["pc"]
               for kind in ("sample", "fd")]
    return ["train_calibration", "train", "export_weights", "classifier", "fd_real_train",
            *sampled, "likelihood"]


def summary_markdown(s: Dict[str, Any]) -> str:
    """The summary as markdown: a heading, device and command, training, one table."""
    r, env, model, opts = s["results"], s["environment"], s["model"], s["settings"]
    lines = [f"## Fashion-MNIST, {model['description']} ({s['date'][:10]})", ""]
    if not s["complete"]:
        lines += ["**Incomplete**: " + (s["stopped"] or "stages are still missing") + ".", ""]
    lines += [f"Device: {env['device_name']}, PyTorch {env['torch']}. Command:", "",
              f"    {s['command']}", ""]
    train = r.get("train")
    if train:
        rate, loss = train.get("images_per_s_median"), train.get("final_loss")
        lines += [f"Training: {train['n_iters']} steps at batch {train['batch_size']} "
                  f"({train['precision']}) in {train['seconds']:.0f} s"
                  + (f", {rate:.0f} images/s" if rate else "")
                  + (f", final loss {loss:.4g}" if loss is not None else "")
                  + f"; `{model['config']}`.", ""]
    rows = ["| quantity | value | NFE | seconds |", "| --- | ---: | ---: | ---: |"]
    nll = r.get("likelihood")
    if nll:
        passes = "pass" if nll["num_repeats"] == 1 else "passes"
        rows.append(f"| test bits/dim ({nll['num_data']} test images, {nll['num_repeats']} "
                    f"{passes}, dopri5 rtol = atol = {nll['rtol']:g}) | "
                    f"{_fmt(nll['bpd'], 4)} ± {_fmt(nll['bpd_stderr'], 4)} | "
                    f"{_fmt(nll['nfe_mean'], 1)} | {_fmt(nll['seconds'], 0)} |")
    samples = r.get("samples", {})
    titles = {"pc": f"PC ({opts['pc_steps']} steps, reverse diffusion + Langevin)",
              "real_train": "real training images (reference)"}
    for name in [f"dpm{k}" for k in opts["dpm_steps"]] + ["pc", "real_train"]:
        e = samples.get(name)
        if not e or e.get("classifier_fd") is None:
            continue
        title = titles.get(name) or (f"DPM-Solver ({e.get('num_steps')} steps + denoising, "
                                     f"order {e.get('order')} {e.get('dpm_method')})")
        seconds = (e.get("seconds") or 0.0) + (e.get("fd_seconds") or 0.0)
        rows.append(f"| classifier FD, {title}, {e['fd_num_samples']} vs {e['fd_num_ref']} "
                    f"test images | {e['classifier_fd']:.3f} | {_fmt(e.get('nfe_mean'), 0)} | "
                    f"{seconds:.0f} |")
    lines += rows
    clf = r.get("classifier", {})
    dims = sorted({e.get("fd_feature_dim") for e in samples.values()} - {None})
    if clf.get("test_accuracy") is not None:
        lines += ["", f"Feature classifier (`tools/train_classifier.py --kind clean`, "
                  f"{clf['n_iters']} steps): test accuracy {clf['test_accuracy']:.4f}. The "
                  f"distances are Fréchet distances in its {'/'.join(map(str, dims)) or '?'}-d "
                  f"features, not FID; compare them only at equal sample counts."]
    stages = s["stages"]
    lines += ["", "Stage commands and seconds:", ""]
    lines += [f"- {name} ({stages[name]['seconds']:.0f} s): `{stages[name]['command']}`"
              for name in stage_order(opts["dpm_steps"]) if name in stages]
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------

def define_flags(fv) -> None:
    """Defines the script's flags on the absl FlagValues `fv`."""
    from absl import flags

    f, kw = flags, dict(flag_values=fv)
    f.DEFINE_string("data_dir", None, f"Fashion-MNIST IDX folder; default ${DATA_ENV} or "
                    f"{FASHION_MNIST_DIR}.", **kw)
    f.DEFINE_string("workdir", "runs/fashion_mnist_bench", "Folder of the run, samples and "
                    "classifier.", **kw)
    f.DEFINE_string("results", None, "Results folder; default WORKDIR/results.", **kw)
    f.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "auto: CUDA if available.", **kw)
    f.DEFINE_boolean("tiny", False, "CPU smoke test: tiny model, few steps and samples.", **kw)
    f.DEFINE_boolean("fp32", False, "Train in fp32 on CUDA (default: bf16 + channels-last).",
                     **kw)
    f.DEFINE_integer("n_iters", None, "Training steps; default: as many as fit "
                     "--train_seconds.", lower_bound=1, **kw)
    f.DEFINE_float("train_seconds", None, "Training time to fill without --n_iters "
                   "(default 240; --tiny 25).", lower_bound=1.0, **kw)
    f.DEFINE_integer("calibration_iters", None, "Steps of the timing run that plans the "
                     "training (default 500; --tiny 20).", lower_bound=2, **kw)
    f.DEFINE_integer("batch_size", None, "Training batch (default 128; --tiny 16).",
                     lower_bound=1, **kw)
    f.DEFINE_integer("num_test", None, "Test images for bits/dim (default 1000; --tiny 4).",
                     lower_bound=1, **kw)
    f.DEFINE_integer("nll_batch_size", None, "Images per likelihood solve (default 250).",
                     lower_bound=1, **kw)
    f.DEFINE_integer("nll_repeats", None, "Dequantization passes (default 1).", lower_bound=1,
                     **kw)
    f.DEFINE_float("nll_tol", None, "rtol = atol of the likelihood solves (default 1e-5, the "
                   "paper's; --tiny 1e-3).", lower_bound=0.0, **kw)
    f.DEFINE_integer("num_samples", None, "Samples per sampler, and real images of the "
                     "reference distance (default 1000; --tiny 32).", lower_bound=2, **kw)
    f.DEFINE_integer("sample_batch_size", None, "Samples per batch (default 1000).",
                     lower_bound=1, **kw)
    f.DEFINE_integer("pc_steps", None, "Predictor steps of the PC sampler (default 1000, the "
                     "SDE's; --tiny 30).", lower_bound=1, **kw)
    f.DEFINE_list("dpm_steps", ["10", "20"], "DPM-Solver runs: score evaluations of each.", **kw)
    f.DEFINE_integer("dpm_order", 2, "DPM-Solver order (multistep).", lower_bound=1,
                     upper_bound=3, **kw)
    f.DEFINE_string("classifier", None, "An existing clean classifier (train_classifier.py "
                    "--kind clean) to use instead of training one.", **kw)
    f.DEFINE_integer("classifier_iters", None, "Classifier training steps (default 2000).",
                     lower_bound=1, **kw)
    f.DEFINE_integer("num_ref", None, "Reference test images of the distances (default all; "
                     "--tiny 500).", lower_bound=2, **kw)
    f.DEFINE_float("time_budget", None, "Seconds this call may take; 0: no limit (default "
                   "540 on CUDA, else 0).", lower_bound=0.0, **kw)
    f.DEFINE_integer("seed", 0, "Seeds training, likelihood and sampling.", lower_bound=0,
                     **kw)


def resolve_options(fv) -> Dict[str, Any]:
    """Flags plus the defaults of the mode, checked, with the data and packages checked.

    Raises:
        InputError: bad flags, data or environment.
    """
    defaults = DEFAULTS["tiny" if fv.tiny else "full"]
    o: Dict[str, Any] = {name: getattr(fv, name) for name in OPTIONS}
    o.update({name: getattr(fv, name) if fv[name].present else value
              for name, value in defaults.items()})
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"missing Python package(s) {', '.join(missing)}, which the stages "
                         f"need; install them (pip install -e '.[test]')")
    if o["device"] == "auto":
        o["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif o["device"] == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but CUDA is not available")
    if o["fp32"] and o["device"] != "cuda":
        raise InputError("--fp32 applies to CUDA training only (the CPU trains in fp32)")
    if o["time_budget"] is None:
        o["time_budget"] = 540.0 if o["device"] == "cuda" else 0.0
    if not math.isfinite(o["time_budget"]):  # NaN passes the flag's lower bound
        raise InputError(f"--time_budget must be a finite number of seconds >= 0 (0: no "
                         f"limit), got {o['time_budget']}")
    if not o["nll_tol"] > 0:
        raise InputError(f"--nll_tol must be > 0, got {o['nll_tol']}")
    try:
        o["dpm_steps"] = sorted({int(v) for v in o["dpm_steps"]})
    except ValueError:
        raise InputError(f"--dpm_steps must be integers, got {','.join(fv.dpm_steps)}") from None
    if not o["dpm_steps"] or min(o["dpm_steps"]) < 2:
        raise InputError(f"--dpm_steps must be integers >= 2 (evaluations, the last one "
                         f"denoising), got {fv.dpm_steps}")
    data_dir = o["data_dir"] or os.environ.get(DATA_ENV) or FASHION_MNIST_DIR
    o["data_dir"] = Path(data_dir).expanduser().resolve()
    try:
        test, _ = load_dataset("fashion_mnist", split="test", data_dir=str(o["data_dir"]))
        train, _ = load_dataset("fashion_mnist", split="train", data_dir=str(o["data_dir"]))
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    for flag, have, split in (("num_test", len(test), "test"),
                              ("num_samples", len(train), "training")):
        if o[flag] > have:
            raise InputError(f"--{flag} {o[flag]} exceeds the {have} images of the {split} "
                             f"split in {o['data_dir']}")
    o["workdir"] = check_path("workdir", Path(o["workdir"]).expanduser().resolve(),
                              folder=True)
    o["results"] = check_path("results", Path(o["results"]).expanduser().resolve(),
                              folder=True) if o["results"] else o["workdir"] / "results"
    if o["classifier"] is not None:
        o["classifier"] = Path(o["classifier"]).expanduser().resolve()
        if not o["classifier"].is_file():
            raise InputError(f"--classifier {o['classifier']} does not exist")
    o["config"], o["model"] = model_config(o)
    return o


def model_config(o: Dict[str, Any]):
    """(config file for training, description of the model); --tiny writes a small variant of
    configs/fashion_mnist_ddpmpp.py into the workdir."""
    cfg = load_config_file(str(CONFIG))
    path = CONFIG
    if o["tiny"]:
        cfg = apply_overrides(cfg, {"model.kwargs": dict(cfg.model.kwargs, **TINY_MODEL),
                                    **{f"training.{k}": v for k, v in TINY_TRAINING.items()}})
        path = o["workdir"] / "tiny_config.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('"""configs/fashion_mnist_ddpmpp.py shrunk for the CPU smoke test '
                        '(benchmarks/fashion_mnist.py --tiny)."""\n'
                        'from score_sde.config import from_dict\n\n\n'
                        f'def get_config():\n    return from_dict({to_dict(cfg)!r})\n')
    kwargs = dict(cfg.model.kwargs)
    params = sum(p.numel() for p in MODELS[cfg.model.name](**kwargs).parameters())
    label = "tiny DDPM++ (smoke test)" if o["tiny"] else "DDPM++ cont. (VP)"
    shown = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    return path, {"config": shown, "name": cfg.model.name, "kwargs": kwargs,
                  "parameters": params,
                  "description": f"{label}, {params / 1e6:.2f}M parameters"}


def run(fv, argv: Sequence[str]) -> Dict[str, Any]:
    """Runs the pipeline with parsed flags; returns the headline numbers.

    Raises:
        InputError: bad flags, data or environment.
        StageFailed: a stage's command failed.
        OutOfTime: --time_budget is spent; a rerun continues.
    """
    opts = resolve_options(fv)
    pipe = Pipeline(opts, argv=argv)
    pipe.say(f"device {opts['device']} ({environment(opts['device'])['device_name']}), "
             f"torch {torch.__version__}; results in {opts['results']}")
    try:
        pipe.run_all()
    except (OutOfTime, StageFailed) as err:
        pipe.stopped = str(err)
        pipe.write_summary()
        raise
    summary = pipe.write_summary(complete=True)
    pipe.say(f"done; {opts['results'] / 'summary.md'}")
    results = summary["results"]
    return {"complete": True, "results": str(opts["results"]),
            "bpd": results.get("likelihood", {}).get("bpd"),
            "classifier_fd": {k: e.get("classifier_fd") for k, e in results["samples"].items()}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        return run_tool(argv, __doc__, define_flags, lambda fv: run(fv, argv))
    except StageFailed as err:
        stderr_line(f"error: {err}")
        return err.status
    except OutOfTime as err:
        stderr_line(f"incomplete: {err}")
        return EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
