"""Reliability of training runs: kills, damaged or unwritable checkpoints, and bad input.

- A real training process SIGKILLed at seeded random moments, once while it is inside a
  checkpoint write, and restarted each time with the same --workdir ends with exactly the state
  and final losses of an uninterrupted run; the temporary file of the interrupted write is
  removed on resume.
- A damaged checkpoint.pt (and snapshot) is reported in one line and the newest good snapshot is
  used; a checkpoint that cannot be written (disk full, no permission) stops training with one
  line (exit status 4 on the command line) and leaves the previous checkpoint loadable; pruning
  never deletes the newest good snapshot.
- `BAD_INPUTS`: one table of command lines that must exit with status 2, one line on stderr and
  no traceback.
- A non-finite loss exits with status 3, a failed checkpoint write with 4 (under torchrun on
  every process), each with one line.
- tools/likelihood.py with --divergence exact: per-sample values agree across --batch_size
  within the solver tolerance (not bitwise: adaptive steps are shared by a batch).

Covered elsewhere and not repeated: checkpoint round trip, detection of truncated, flipped,
empty and foreign files, fallback order, pruning to the newest K (tests/test_checkpoint.py);
resume from a finished run and appended logs, a first kill test, non-finite steps stopping or
being skipped and counted, same seed same weights (tests/test_train.py); the array loader's
errors in-process and the .npz key choice (tests/test_datasets.py).
"""
import errno
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import score_sde.checkpoint as checkpoint_lib
from score_sde.checkpoint import (is_intact, prune_snapshots, read_checkpoint,
                                  remove_stale_temporaries, save_checkpoint, snapshots)
from score_sde.config import to_dict
from score_sde.config import apply_overrides, load_config_file
from score_sde.trainer import CheckpointWriteError, train
from tests.scripts import load_script
from tests.test_train import ENV, _toy_cfg

REPO = Path(__file__).resolve().parent.parent
TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # what save_checkpoint writes before its rename

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b, where="state"):
    """Asserts that two checkpoint payloads are equal, tensors bitwise; of the saved metrics,
    the measured speed and memory are left out (they are timings, not results)."""
    if where.endswith("['metrics']"):
        a, b = ({k: v for k, v in m.items() if k not in ("samples_per_s", "peak_mem_mib")}
                for m in (a, b))
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _temporaries(workdir):
    folders = [Path(workdir), Path(workdir) / "snapshots"]
    return sorted(p for f in folders if f.is_dir() for p in f.iterdir() if TEMPORARY.match(p.name))


# --- 1. SIGKILL at random moments -------------------------------------------------------------

# The command line (what `python -m score_sde.train` runs) after the code `patch`.
_PATCHED_CLI = "{patch}\nfrom score_sde.train import run\nrun()\n"
# A very slow disk: the fsync of the k-th checkpoint temporary file hangs (after creating the
# file `marker`), so the process sits inside save_checkpoint, written but not renamed, until
# it is killed.
_STALL_FSYNC = """
import os, re, time
_fsync, _calls = os.fsync, [0]
def _stalling_fsync(fd):
    if re.match(r"^\\..+\\.tmp\\d+$", os.path.basename(os.readlink("/proc/self/fd/%d" % fd))):
        _calls[0] += 1
        if _calls[0] == {k}:
            open({marker!r}, "w").close()
            time.sleep(600)
    return _fsync(fd)
os.fsync = _stalling_fsync
"""
KILL_SEED = 20240601


def _checkpoint_step(workdir) -> int:
    try:  # the file is replaced by a rename, so an open handle always sees a whole file
        return read_checkpoint(Path(workdir) / "checkpoint.pt")["step"]
    except FileNotFoundError:
        return 0


def _wait_until(condition, proc, what, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training exited (status {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _kill(proc):
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
    rng = random.Random(KILL_SEED)
    np.save(tmp_path / "train.npy", np.random.default_rng(0).normal(size=(3000, 2))
            .astype(np.float32))
    args = ["--sde", "vp", "--dataset", "array", "--data_path", str(tmp_path / "train.npy"),
            "--n_iters", "300", "--batch_size", "64", "--checkpoint_every", "5",
            "--snapshot_every", "50", "--sample_every", "0", "--eval_every", "100",
            "--log_every", "50", "--device", "cpu"]
    cli = [sys.executable, "-m", "score_sde.train", *args]
    workdir = tmp_path / "killed"
    straight = subprocess.Popen(cli + ["--workdir", str(tmp_path / "straight")], cwd=tmp_path,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # meanwhile, uninterrupted
    try:
        steps = _kill_three_times(rng, args, workdir, tmp_path / "stalled")
        final = subprocess.run(cli + ["--workdir", str(workdir)], capture_output=True,
                               text=True, timeout=300, cwd=tmp_path, env=ENV)
        out, err = straight.communicate(timeout=300)
    finally:
        straight.kill()
        straight.wait()
    assert final.returncode == 0, final.stderr
    assert straight.returncode == 0, err

    # Weights, EMA, optimizer state, step counters, config: all of it bitwise.
    _same(read_checkpoint(tmp_path / "straight" / "checkpoint.pt"),
          read_checkpoint(workdir / "checkpoint.pt"))
    _same(read_checkpoint(tmp_path / "straight" / "snapshots" / "snapshot_00000300.pt"),
          read_checkpoint(workdir / "snapshots" / "snapshot_00000300.pt"))
    a, b = json.loads(out.splitlines()[-1]), json.loads(final.stdout.splitlines()[-1])
    for key in ("step", "loss", "eval_loss", "grad_norm", "lr", "skipped_steps"):
        assert a[key] == b[key], (key, a[key], b[key])
    assert _temporaries(workdir) == []  # the interrupted write's file was removed on resume
    log = (workdir / "log.txt").read_text()
    assert "by an interrupted checkpoint write" in log
    launches = re.findall(r"(?:start at|resuming from) step (\d+) ", log)
    assert [int(s) for s in launches] == steps  # appended


def _kill_three_times(rng, args, workdir, marker):
    """Starts training with `args` in `workdir` and SIGKILLs it, three times; returns the
    checkpoint step before each start (0 first) and after the last kill."""
    quiet = dict(cwd=workdir.parent, env=ENV, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    steps = [0]
    for attempt in ("random", "inside a checkpoint write", "random"):
        if attempt == "random":
            # A random step ahead of the last checkpoint, then a random delay: the kill lands
            # anywhere in a step, an evaluation or a checkpoint write.
            target = steps[-1] + rng.randrange(10, 60)
            proc = subprocess.Popen([sys.executable, "-m", "score_sde.train", *args,
                                     "--workdir", str(workdir)], **quiet)
            _wait_until(lambda: _checkpoint_step(workdir) >= target, proc, f"step {target}")
            time.sleep(rng.uniform(0.0, 0.05))
            _kill(proc)
        else:
            stall = _STALL_FSYNC.format(k=rng.randrange(2, 6), marker=str(marker))
            proc = subprocess.Popen([sys.executable, "-c", _PATCHED_CLI.format(patch=stall),
                                     *args, "--workdir", str(workdir)], **quiet)
            _wait_until(marker.exists, proc, "the stalled checkpoint write")
            _kill(proc)
            left = [p for p in _temporaries(workdir) if p.name.endswith(f".tmp{proc.pid}")]
            assert len(left) == 1, "the kill did not interrupt a checkpoint write"
        steps.append(_checkpoint_step(workdir))
    assert steps[1] > 0 and steps[-1] < 300 and steps == sorted(steps), steps
    return steps


# --- 2. damaged and unwritable checkpoints ----------------------------------------------------

FAST = dict(n_iters=40, sample_every=0, eval_every=20, log_every=10, checkpoint_every=5,
            snapshot_every=10, keep_snapshots=5)  # steps < warm-up: lr does not see n_iters


@pytest.fixture(scope="module")
def straight_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    train(_toy_cfg(**FAST), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def straight_run(straight_workdir):
    return read_checkpoint(straight_workdir / "checkpoint.pt")


def test_damaged_checkpoint_falls_back_to_newest_good_snapshot(tmp_path, capsys, straight_run):
    train(_toy_cfg(**dict(FAST, n_iters=25)), str(tmp_path))  # snapshots 10, 20, 25
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])  # truncated
    snap = tmp_path / "snapshots" / "snapshot_00000025.pt"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    snap.write_bytes(bytes(data))
    capsys.readouterr()
    train(_toy_cfg(**FAST), str(tmp_path), quiet=True)  # quiet: warnings only
    _same(straight_run, read_checkpoint(ckpt))  # resumed from step 20, exactly
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2, warnings  # one line per damaged file
    assert "checkpoint.pt" in warnings[0] and "snapshot_00000025.pt" in warnings[1]
    log = (tmp_path / "log.txt").read_text()
    assert warnings[0] in log and warnings[1] in log and "resuming from step 20 " in log


def test_a_foreign_checkpoint_with_no_snapshot_is_refused_and_kept(tmp_path):
    # Training afresh would replace it at the first save: exit 2, the file untouched.
    workdir = tmp_path / "w"
    workdir.mkdir()
    torch.save({"model": {}, "step": 12345}, workdir / "checkpoint.pt")
    before = (workdir / "checkpoint.pt").read_bytes()
    out = subprocess.run([sys.executable, "-m", "score_sde.train", "--dataset", "toy_moons",
                          "--n_iters", "5", "--device", "cpu", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: no usable checkpoint to resume from: {workdir / 'checkpoint.pt'} is left as it "
        f"is ({workdir / 'checkpoint.pt'} is not a score_sde checkpoint or is truncated); move "
        f"it away to start afresh, or use a new --workdir"]
    assert (workdir / "checkpoint.pt").read_bytes() == before
    assert not (workdir / "snapshots").exists()


class _FailingOS:
    """`os` as seen by score_sde.checkpoint, with call number `fail_on` (1-based) of the
    function `name` raising OSError(`code`)."""

    def __init__(self, name, code, fail_on):
        self.name, self.code, self.fail_on, self.calls = name, code, fail_on, 0

    def __getattr__(self, attr):
        real = getattr(os, attr)
        if attr != self.name:
            return real

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_on:
                raise OSError(self.code, os.strerror(self.code))
            return real(*args, **kwargs)
        return failing


# Files written: checkpoint.pt at 5, 10, snapshot 10, checkpoint.pt at 15, 20, snapshot 20, ...;
# each save_checkpoint calls os.fsync twice (file, folder) and os.replace once.
WRITE_FAILURES = [  # (what fails, call that fails, errno, file named, step kept)
    ("fsync", 7, errno.ENOSPC, "checkpoint.pt at step 15", 10),  # disk full
    ("replace", 4, errno.EACCES, "checkpoint.pt at step 15", 10),  # no permission
    ("replace", 6, errno.ENOSPC, "snapshot_00000020.pt at step 20", 20),
]


@pytest.mark.parametrize("name, fail_on, code, named, kept", WRITE_FAILURES)
def test_failed_checkpoint_write_stops_cleanly(tmp_path, monkeypatch, straight_run, name,
                                               fail_on, code, named, kept):
    monkeypatch.setattr(checkpoint_lib, "os", _FailingOS(name, code, fail_on))
    with pytest.raises(CheckpointWriteError) as info:
        train(_toy_cfg(**FAST), str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and named in message and os.strerror(code) in message
    assert f"the last good checkpoint (step {kept}) is kept" in message
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == kept
    assert _temporaries(tmp_path) == []
    assert (tmp_path / "log.txt").read_text().splitlines()[-1].startswith("stopped at step ")
    train(_toy_cfg(**FAST), str(tmp_path))  # the same command again resumes
    _same(straight_run, read_checkpoint(tmp_path / "checkpoint.pt"))


def _state(step):
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_pruning_keeps_the_newest_good_snapshot(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(_state(step), tmp_path / f"snapshot_{step:08d}.pt")
    for step in (3, 4):  # the two newest are damaged
        path = tmp_path / f"snapshot_{step:08d}.pt"
        path.write_bytes(path.read_bytes()[:-1])
    assert [is_intact(p) for p in snapshots(tmp_path)] == [False, False, True, True]
    prune_snapshots(tmp_path, keep=2)
    assert [p.name for p in snapshots(tmp_path)] == [
        "snapshot_00000004.pt", "snapshot_00000003.pt", "snapshot_00000002.pt"]
    save_checkpoint(_state(5), tmp_path / "snapshot_00000005.pt")
    prune_snapshots(tmp_path, keep=2)
    assert [p.name for p in snapshots(tmp_path)] == ["snapshot_00000005.pt",
                                                      "snapshot_00000004.pt"]


def test_stale_temporaries_are_removed_unless_their_writer_lives(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = tmp_path / f".checkpoint.pt.tmp{dead.pid}"
    stale_json = tmp_path / f".config.tmp{dead.pid}.json"  # cli.write_atomic's, config.json's
    live = tmp_path / f".checkpoint.pt.tmp{os.getppid()}"
    other = tmp_path / "notes.tmp1"
    for path in (stale, stale_json, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale, stale_json]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


# --- 4. bad input: exit status 2, one line on stderr, no traceback ------------------------------

# Runs `score_sde.train.run()` (the body of `python -m score_sde.train`) in a fork of one
# process that imported the package once, so each case costs milliseconds, not a fresh
# interpreter's seconds. Each case: optional code to run first, its argv, its own stdout and
# stderr files; the reply is the exit status.
_ZYGOTE = r"""
import json, os, sys, traceback
import score_sde.train
import torch._dynamo, torch.utils.tensorboard  # imported lazily by Adam and by the logger

for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            for fd, name in ((1, case["stdout"]), (2, case["stderr"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = ["score_sde.train", *case["args"]]
            exec(case["patch"], {})
            score_sde.train.run()
            status = 0
        except SystemExit as e:  # what the interpreter would do with it
            if e.code is None or isinstance(e.code, int):
                status = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)
"""


class _ForkedCli:
    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], cwd=folder, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)

    def __call__(self, *args, patch="", timeout=120) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = (self.folder / f"case{self.count}.{s}" for s in ("out", "err"))
        self.proc.stdin.write(json.dumps({"args": [str(a) for a in args], "patch": patch,
                                          "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"no answer within {timeout} s for {args}")
        status = json.loads(self.proc.stdout.readline())
        return subprocess.CompletedProcess(args, status, out.read_text(), err.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    forked = _ForkedCli(tmp_path_factory.mktemp("cli"))
    yield forked
    forked.close()


def _one_error_line(out):
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error"), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def _save(path, array, **kwargs):
    np.save(path, array, **kwargs)


def _truncated(path):
    np.save(path, np.ones((100, 2), np.float32))
    path.write_bytes(path.read_bytes()[:-40])


# Malformed and mismatched data files, by name ("{data}/NAME" in BAD_INPUTS).
DATA_FILES = {
    "points.npy": lambda p: _save(p, np.random.default_rng(0).normal(size=(200, 2))
                                  .astype(np.float32)),
    "points3d.npy": lambda p: _save(p, np.zeros((200, 3), np.float32)),
    "int.npy": lambda p: _save(p, np.arange(400).reshape(200, 2)),
    "bool.npy": lambda p: _save(p, np.ones((200, 2), bool)),
    "complex.npy": lambda p: _save(p, np.ones((200, 2), np.complex64)),
    "strings.npy": lambda p: _save(p, np.full((200, 2), "ab")),
    "object.npy": lambda p: _save(p, np.full((200, 2), None, dtype=object), allow_pickle=True),
    "scalar.npy": lambda p: _save(p, np.float32(1.0)),
    "vector.npy": lambda p: _save(p, np.ones(200, np.float32)),
    "nan.npy": lambda p: _save(p, np.where(np.eye(200, 2), np.nan, 0.0).astype(np.float32)),
    "inf.npy": lambda p: _save(p, np.full((200, 2), np.inf, np.float32)),
    "no_rows.npy": lambda p: _save(p, np.zeros((0, 2), np.float32)),
    "no_columns.npy": lambda p: _save(p, np.zeros((200, 0), np.float32)),
    "one_row.npy": lambda p: _save(p, np.zeros((1, 2), np.float32)),
    "truncated.npy": _truncated,
    "garbage.npy": lambda p: p.write_bytes(b"not a numpy file"),
    "no_arrays.npz": lambda p: np.savez(p),
    "object.npz": lambda p: np.savez(p, x=np.full((200, 2), None, dtype=object)),
    "points.txt": lambda p: p.write_text("0 0\n1 1\n"),
    "rgb28.npy": lambda p: _save(p, np.zeros((20, 3, 28, 28), np.float32)),
    "gray32.npy": lambda p: _save(p, np.zeros((20, 1, 32, 32), np.float32)),
    "gray28x32.npy": lambda p: _save(p, np.zeros((20, 1, 28, 32), np.float32)),
}

# Config files derived from configs/toy.py, by name ("{configs}/NAME.py" in BAD_INPUTS).
RUN = {"data.dataset": "array", "data.data_path": "{data}/points.npy",
       "model.kwargs": dict(hidden=16, num_layers=2), "training.n_iters": 4,
       "training.batch_size": 16, "training.device": "cpu", "training.sample_every": 0}
CONFIGS = {
    "run": RUN,  # the config of the run in "{run}"
    "other_model": dict(RUN, **{"model.kwargs": dict(hidden=8, num_layers=2)}),
    "sde_vpx": {"sde.name": "vpx"},
    "model_unet3d": {"model.name": "unet3d"},
    "dataset_mnist": {"data.dataset": "mnist"},
    "kwarg_typo": {"model.kwargs": dict(hiden=16)},
    "prediction_velocity": {"model.prediction": "velocity"},
    "ema_rate_1": {"training.ema_rate": 1.0},
    "ema_rate_0": {"training.ema_rate": 0.0},
    "eps_0": {"training.eps": 0.0},
    "eps_1.5": {"training.eps": 1.5},
    "lr_final_1.5": {"training.lr_final": 1.5},
    "lr_final_neg": {"training.lr_final": -0.5},
    "warmup_neg": {"training.warmup": -1},
    "keep_snapshots_0": {"training.keep_snapshots": 0},
    "eval_fraction_1": dict(RUN, **{"data.eval_fraction": 1.0}),
    "beta_max_small": {"sde.beta_min": 1.0, "sde.beta_max": 0.5},
    "sde_num_steps_0": {"sde.num_steps": 0},
    "adam_eps_0": {"training.adam_eps": 0.0},
    "adam_beta1_1": {"training.adam_beta1": 1.0},
    "weight_decay_neg": {"training.weight_decay": -0.1},
    "mlp_dim_5": dict(RUN, **{"model.kwargs": dict(hidden=16, dim=5)}),
    "small_unet": {"model.name": "small_unet", "model.kwargs": dict(nf=8, ch_mult=(1,))},
}

CIFAR = "{repo}/configs/cifar10_ddpmpp_cont.py"
TOY = ["--dataset", "toy_moons"]
SMALL_BATCH = ["--batch_size", "4"]  # the image files hold 20 images


def _array(name):
    return ["--dataset", "array", "--data_path", "{data}/" + name]


# (what is wrong, command-line arguments, fragment of the one-line message). Every case also
# gets its own --workdir ("{run}": a copy of a trained run's folder; "{foreign}": a folder whose
# checkpoint.pt is not a training checkpoint).
BAD_INPUTS = [
    # unknown names
    ("unknown SDE", TOY + ["--sde", "vpp"], "--sde=vpp: value should be one of <vp|"),
    ("unknown model", TOY + ["--model", "unet3d"], "--model=unet3d: value should be one of"),
    ("unknown dataset", ["--dataset", "imagenet"], "--dataset=imagenet: value should be one of"),
    ("unknown SDE in the config", ["--config", "{configs}/sde_vpx.py"], "unknown sde 'vpx'"),
    ("unknown model in the config", ["--config", "{configs}/model_unet3d.py"],
     "unknown model 'unet3d'; accepted: ncsnpp, mlp, small_unet"),
    ("unknown dataset in the config", ["--config", "{configs}/dataset_mnist.py"],
     "unknown dataset 'mnist'"),
    ("unknown model kwarg", ["--config", "{configs}/kwarg_typo.py"],
     "model.kwargs do not fit model 'mlp': got an unexpected keyword argument 'hiden'"),
    ("unknown prediction", ["--config", "{configs}/prediction_velocity.py"],
     "prediction 'velocity'"),
    ("unknown flag", TOY + ["--n_iter", "3"], "Unknown command line flag 'n_iter'"),
    ("positional argument", TOY + ["extra"], "unexpected arguments ['extra']"),
    # missing files
    ("missing data file", _array("missing.npy"), "missing.npy' does not exist"),
    ("missing config file", ["--config", "{data}/missing.py"], "missing.py does not exist"),
    ("config file not Python", ["--config", "{data}/points.txt"], "must be a Python file (.py)"),
    ("config file with a syntax error", ["--config", "{configs}/syntax_error.py"],
     "syntax_error.py failed: SyntaxError: "),
    ("config file that raises", ["--config", "{configs}/raises.py"],
     "raises.py failed: KeyError: 'training'"),
    ("workdir is a file", TOY + ["--workdir", "{data}/points.npy"],
     "points.npy exists and is not a folder"),
    ("missing Fashion-MNIST", ["--dataset", "fashion_mnist", "--data_dir", "{data}/none"],
     "dataset-fashion-mnist"),
    ("CIFAR-10 without --data_dir", ["--config", CIFAR], "CIFAR-10 has no default location"),
    # malformed array files
    ("integer array", _array("int.npy"), "array dtype int64 is not supported; expected float16"),
    ("boolean array", _array("bool.npy"), "array dtype bool is not supported"),
    ("complex array", _array("complex.npy"), "array dtype complex64 is not supported"),
    ("string array", _array("strings.npy"), "array dtype <U2 is not supported"),
    ("object array", _array("object.npy"), "Object arrays cannot be loaded"),
    ("object array in .npz", _array("object.npz"), "Object arrays cannot be loaded"),
    ("0-d array", _array("scalar.npy"), "shape () must be [N, D, ...] with rank >= 2"),
    ("1-d array", _array("vector.npy"), "(reshape 1-D data to [N, 1])"),
    ("NaN values", _array("nan.npy"), "array has 2 NaN and 0 inf values; first at index (0, 0)"),
    ("inf values", _array("inf.npy"), "array has 0 NaN and 400 inf values"),
    ("no samples", _array("no_rows.npy"), "shape (0, 2) must be [N, D, ...]"),
    ("empty sample", _array("no_columns.npy"), "no empty dimension"),
    ("one sample", _array("one_row.npy"), "too few to hold out"),
    ("truncated .npy", _array("truncated.npy"), "could not read"),
    ("not an .npy", _array("garbage.npy"), "could not read"),
    (".npz without arrays", _array("no_arrays.npz"), "the archive holds no arrays"),
    ("wrong extension", _array("points.txt"), "must end in .npy or .npz"),
    ("batch larger than the data", _array("points.npy") + ["--batch_size", "500"],
     "batch_size must be <= num_items=180"),
    # data that do not fit the config's model
    ("CIFAR-10 model on 28x28 images", ["--config", CIFAR] + _array("rgb28.npy") + SMALL_BATCH,
     "image_size=32 does not fit the data 'array' of per-sample shape (3, 28, 28)"),
    ("CIFAR-10 model on gray images", ["--config", CIFAR] + _array("gray32.npy") + SMALL_BATCH,
     "in_channels=3 does not fit the data 'array' of per-sample shape (1, 32, 32)"),
    ("U-Net on non-square images", ["--config", "{configs}/small_unet.py"]
     + _array("gray28x32.npy") + SMALL_BATCH,
     "needs square images [N, C, H, H], got per-sample shape (1, 28, 32)"),
    ("U-Net on points", ["--config", "{configs}/small_unet.py"] + _array("points.npy")
     + SMALL_BATCH,
     "needs square images [N, C, H, H], got per-sample shape (2,)"),
    ("MLP on images", _array("gray32.npy") + SMALL_BATCH, "model 'mlp' needs vector data"),
    ("MLP dim disagrees with the data", ["--config", "{configs}/mlp_dim_5.py"],
     "model.kwargs dim=5 does not fit the data 'array' of per-sample shape (2,)"),
    # a workdir holding another run's checkpoint
    ("checkpoint of another model", ["--config", "{configs}/other_model.py",
                                     "--workdir", "{run}"],
     "was written for a different model or SDE configuration"),
    ("checkpoint of another SDE", ["--config", "{configs}/run.py", "--sde", "ve",
                                   "--workdir", "{run}"],
     "was written for a different model or SDE configuration (sde.name 'vp' -> 've'); use a "
     "new --workdir"),
    ("checkpoint for other data", ["--config", "{configs}/run.py", "--workdir", "{run}"]
     + _array("points3d.npy"), "was written for data of per-sample shape (2,), this run's"),
    ("not a training checkpoint", TOY + ["--workdir", "{foreign}"],
     "is not a training checkpoint (it lacks ema, optimizer, config)"),
    # conflicting flags
    ("importance sampling without likelihood weighting", TOY + ["--importance_sampling"],
     "--importance_sampling needs --likelihood_weighting"),
    ("label dropout without class conditioning", TOY + ["--label_dropout", "0.2"],
     "--label_dropout needs --class_conditional"),
    ("max_nonfinite without skip_nonfinite", TOY + ["--max_nonfinite", "3"],
     "--max_nonfinite needs --skip_nonfinite"),
    ("bf16 on the CPU", TOY + ["--bf16", "--device", "cpu"], "--bf16 autocast is for CUDA"),
    ("compile mode without --compile", TOY + ["--compile_mode", "reduce-overhead"],
     "--compile_mode reduce-overhead needs --compile"),
    ("array without --data_path", ["--dataset", "array"], "--dataset array needs --data_path"),
    ("--data_path for a toy", TOY + ["--data_path", "{data}/points.npy"],
     "dataset 'toy_moons' does not use data_path"),
    ("--data_dir for an array", _array("points.npy") + ["--data_dir", "{data}"],
     "dataset 'array' does not use data_dir"),
    ("class conditioning without labels", TOY + ["--class_conditional"],
     "--class_conditional needs a labelled dataset; 'toy_moons' has no labels"),
    # out-of-range values
    ("unknown device", TOY + ["--device", "tpu"], "device must be auto or a torch device"),
    ("n_iters 0", TOY + ["--n_iters", "0"], "--n_iters=0: 0 is not a positive integer"),
    ("batch_size 0", TOY + ["--batch_size", "0"], "--batch_size=0: 0 is not a positive integer"),
    ("negative lr", TOY + ["--lr", "-1e-3"], "--lr=-1e-3: -0.001 is not a non-negative number"),
    ("lr 0", TOY + ["--lr", "0"], "lr must be > 0, got 0.0"),
    ("negative seed", TOY + ["--seed", "-1"], "--seed=-1: -1 is not an integer in the range [0, "),
    ("seed beyond 64 bits", TOY + ["--seed", str(2 ** 64)], "--seed=18446744073709551616"),
    ("checkpoint_every 0", TOY + ["--checkpoint_every", "0"], "--checkpoint_every=0"),
    ("label dropout above 1", TOY + ["--class_conditional", "--label_dropout", "1.5"],
     "--label_dropout=1.5"),
    ("ema_rate 1", ["--config", "{configs}/ema_rate_1.py"], "ema_rate must lie in (0, 1)"),
    ("ema_rate 0", ["--config", "{configs}/ema_rate_0.py"], "ema_rate must lie in (0, 1)"),
    ("eps 0", ["--config", "{configs}/eps_0.py"], "eps (the smallest training time) must lie"),
    ("eps 1.5", ["--config", "{configs}/eps_1.5.py"], "eps (the smallest training time) must"),
    ("lr_final 1.5", ["--config", "{configs}/lr_final_1.5.py"], "lr_final must lie in [0, 1]"),
    ("lr_final -0.5", ["--config", "{configs}/lr_final_neg.py"], "lr_final must lie in [0, 1]"),
    ("negative warmup", ["--config", "{configs}/warmup_neg.py"], "warmup must be >= 0, got -1"),
    ("keep_snapshots 0", ["--config", "{configs}/keep_snapshots_0.py"],
     "keep_snapshots must be >= 1, got 0"),
    ("eval_fraction 1", ["--config", "{configs}/eval_fraction_1.py"],
     "eval_fraction must lie in (0, 1), got 1.0"),
    ("beta_max < beta_min", ["--config", "{configs}/beta_max_small.py"],
     "beta_max must be >= beta_min"),
    ("SDE with 0 steps", ["--config", "{configs}/sde_num_steps_0.py"], "num_steps"),
    ("adam_eps 0", ["--config", "{configs}/adam_eps_0.py"], "adam_eps must be > 0, got 0.0"),
    ("adam_beta1 1", ["--config", "{configs}/adam_beta1_1.py"],
     "adam_beta1 must lie in [0, 1), got 1.0"),
    ("negative weight_decay", ["--config", "{configs}/weight_decay_neg.py"],
     "weight_decay must be >= 0, got -0.1"),
]


@pytest.fixture(scope="module")
def bad_input_files(tmp_path_factory):
    """The files BAD_INPUTS refers to: data, config files, a trained run, a foreign one."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "data").mkdir()
    (root / "configs").mkdir()
    for name, write in DATA_FILES.items():
        write(root / "data" / name)
    toy = load_config_file(str(REPO / "configs" / "toy.py"))
    for name, overrides in CONFIGS.items():
        overrides = {k: v.format(data=root / "data") if isinstance(v, str) else v
                     for k, v in overrides.items()}
        cfg = to_dict(apply_overrides(toy, overrides))
        (root / "configs" / f"{name}.py").write_text(
            "import json\nfrom score_sde.config import from_dict\n\n\ndef get_config():\n"
            f"    return from_dict(json.loads({json.dumps(cfg)!r}))\n")
    (root / "configs" / "syntax_error.py").write_text("def get_config(:\n")
    (root / "configs" / "raises.py").write_text("def get_config():\n    return {}['training']\n")
    run_cfg = load_config_file(str(root / "configs" / "run.py"))
    train(run_cfg, str(root / "run"))
    save_checkpoint({"step": 3, "model": {}}, root / "foreign" / "checkpoint.pt")
    return root


@pytest.mark.parametrize("what, args, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(cli, bad_input_files, tmp_path, what, args, message):
    root = bad_input_files
    for name in ("run", "foreign"):  # a private copy: a failing case must not write into it
        shutil.copytree(root / name, tmp_path / name)
    fill = dict(data=root / "data", configs=root / "configs", repo=REPO,
                run=tmp_path / "run", foreign=tmp_path / "foreign")
    argv = [a.format(**fill) for a in args]
    if "--workdir" not in argv:
        argv += ["--workdir", str(tmp_path / "w")]
    out = cli(*argv)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert message in _one_error_line(out), out.stderr
    if "{run}" in args:  # refused before anything was written
        _same(read_checkpoint(root / "run" / "checkpoint.pt"),
              read_checkpoint(tmp_path / "run" / "checkpoint.pt"))
        assert (root / "run" / "log.txt").read_text() == (tmp_path / "run" / "log.txt") \
            .read_text()


# --- exit statuses 3 and 4 of the command line -------------------------------------------------

_NAN_LOSS_IN_UPDATE_4 = """
from score_sde.trainer import Trainer
_loss = Trainer.train_loss
Trainer.train_loss = lambda self, *a: _loss(self, *a) * (float("nan") if self.step == 3 else 1)
"""
_DISK_FULL_AT_3RD_WRITE = """
import errno, os
import score_sde.checkpoint
class _FullDisk:
    calls = 0
    def __getattr__(self, name):
        return self.fsync if name == "fsync" else getattr(os, name)
    def fsync(self, fd):
        type(self).calls += 1
        if self.calls == 5:  # the file of the third save (each save: file, then folder)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
score_sde.checkpoint.os = _FullDisk()
"""


@pytest.mark.parametrize("patch, status, message", [
    (_NAN_LOSS_IN_UPDATE_4, 3, "non-finite loss at step 4; the last good checkpoint (step 2) is "
                             "kept"),
    (_DISK_FULL_AT_3RD_WRITE, 4, "checkpoint.pt at step 6: [Errno 28] No space left on device; "
                                 "the last good checkpoint (step 4) is kept"),
], ids=["non-finite loss", "disk full"])
def test_training_failures_exit_3_or_4_with_one_line(cli, tmp_path, patch, status, message):
    out = cli(*TOY, "--n_iters", "8", "--batch_size", "16", "--checkpoint_every", "2",
              "--sample_every", "0", "--device", "cpu", "--workdir", tmp_path, "--quiet",
              patch=patch)
    assert out.returncode == status, (out.returncode, out.stderr)
    line = _one_error_line(out)
    assert message in line, line
    last = (tmp_path / "log.txt").read_text().splitlines()[-1]
    assert last.startswith("stopped at step ") and last.endswith(line[len("error: "):])
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] in (2, 4)
    assert _temporaries(tmp_path) == []


def test_failed_write_stops_every_torchrun_process(tmp_path):
    # Rank 0 alone writes; the others must stop too (not wait in a barrier until the process
    # group times out).
    script = tmp_path / "train_full_disk.py"
    script.write_text(_PATCHED_CLI.format(patch=_DISK_FULL_AT_3RD_WRITE))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), *TOY, "--n_iters", "8",
                          "--batch_size", "16", "--checkpoint_every", "2", "--sample_every",
                          "0", "--device", "cpu", "--workdir", str(tmp_path / "w")],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "(exitcode: 4)" in out.stderr  # the first rank to exit
    errors = sorted(line for line in out.stderr.splitlines() if line.startswith("error ("))
    assert len(errors) == 2, out.stderr
    assert errors[0].startswith("error (rank 0): could not write ") and "step 6" in errors[0]
    assert errors[1] == "error (rank 1): rank 0 could not write the checkpoint of step 6"
    assert read_checkpoint(tmp_path / "w" / "checkpoint.pt")["step"] == 4

# --- 5. determinism of the tools across --batch_size ----------------------------------------

# tools/sample.py is not covered: its noise is drawn batch by batch from one generator, so the
# samples of one --seed change with --batch_size (README, "Sampling"). Same seed and batch size
# give the same samples (tests/test_tool_sample.py).
LIKELIHOOD_TOL = 1e-7  # the solver's rtol = atol here
# dopri5 takes about 6 evaluations per accepted step (FSAL) and holds each step's local error
# in -log p to rtol |log p| + atol. Two solves of the same sample (different batch-mates, so
# different step sizes) are compared against the sum of those local tolerances over both
# solves: an estimate of their global errors, not a guarantee.
DOPRI5_EVALS_PER_STEP = 6

likelihood_tool = load_script("tools/likelihood.py")


def test_exact_likelihood_barely_depends_on_batch_size(straight_workdir, tmp_path):
    # No random numbers are involved (continuous data, exact divergence), but dopri5 picks one
    # step size for a whole batch, so the per-sample values agree only within the tolerance.
    per_sample, nfe = {}, {}
    for batch_size in (16, 5, 1):
        partial = tmp_path / f"partial{batch_size}"
        assert likelihood_tool.main([
            "likelihood.py", "--workdir", str(straight_workdir), "--divergence", "exact",
            "--num_samples", "16", "--batch_size", str(batch_size), "--device", "cpu",
            "--rtol", str(LIKELIHOOD_TOL), "--atol", str(LIKELIHOOD_TOL),
            "--partial_dir", str(partial)]) == 0
        records = [json.loads(line) for f in partial.glob("*.jsonl")
                   for line in f.read_text().splitlines()]
        records = sorted((r for r in records if "batch" in r), key=lambda r: r["batch"])
        per_sample[batch_size] = np.array([v for r in records for v in r["nll"]])
        nfe[batch_size] = max(r["nfe"] for r in records)
    assert all(len(v) == 16 and np.isfinite(v).all() for v in per_sample.values())
    for batch_size in (5, 1):
        steps = (nfe[batch_size] + nfe[16]) / DOPRI5_EVALS_PER_STEP
        bound = steps * (LIKELIHOOD_TOL * np.abs(per_sample[16]).max() + LIKELIHOOD_TOL)
        # The bound (about 2e-4 nats here) is far below the spread of the per-sample values
        # (about 0.02), so a sample scored in another's place would fail it.
        assert np.ptp(per_sample[16]) > 10 * bound
        assert np.abs(per_sample[batch_size] - per_sample[16]).max() < bound
