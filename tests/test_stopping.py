"""Stopping a training run with SIGINT or SIGTERM (score_sde/stopping.py and the training loop).

- A real `python -m score_sde.train` process sent SIGINT or SIGTERM mid-run exits with 130 or
  143, one line and no traceback, leaving the checkpoint of the step it reached; the same
  command resumes from it ("resuming from step k") and ends with exactly the weights of an
  uninterrupted run.
- Under torchrun a Ctrl-C (SIGINT to the whole process group, which torchrun passes on again)
  stops every worker at the same step with status 130; rank 0 writes the checkpoint.
- In-process: a signal during a step lets the step finish (the checkpoint equals a run that
  stopped there); one during a sample grid or held-out loss abandons that work; one before the
  loop writes nothing; the previous handlers are restored afterwards.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import score_sde.trainer as trainer_module
from score_sde.checkpoint import read_checkpoint, save_checkpoint
from score_sde.stopping import SignalStop, TrainingInterrupted
from score_sde.trainer import Trainer, train
from tests.test_reliability import _same, _temporaries, _wait_until
from tests.test_train import ENV, _toy_cfg

REPO = Path(__file__).resolve().parent.parent
STOPPED = re.compile(r"^stopped at step (\d+) \((SIGINT|SIGTERM)\); run the same command to "
                     r"resume$")

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tmp_path, n_iters=150):
    # No periodic checkpoint before the signal: the only one is the signal's.
    return ["--sde", "vp", "--dataset", "array", "--data_path", str(tmp_path / "train.npy"),
            "--n_iters", str(n_iters), "--batch_size", "64", "--checkpoint_every", "1000",
            "--snapshot_every", "1000", "--sample_every", "0", "--eval_every", "1000",
            "--log_every", "10", "--device", "cpu"]


def _wait_for_log(workdir, text, proc):
    log = Path(workdir) / "log.txt"
    _wait_until(lambda: log.exists() and text in log.read_text(), proc, f"{text!r} in {log}")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stop_data")
    np.save(folder / "train.npy",
            np.random.default_rng(0).normal(size=(3000, 2)).astype(np.float32))
    return folder


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_stops_with_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path, toy_data, sig,
                                                                      status):
    cli = [sys.executable, "-m", "score_sde.train", *_args(toy_data)]
    straight = subprocess.Popen(cli + ["--workdir", str(tmp_path / "straight"), "--quiet"],
                                cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # meanwhile, uninterrupted
    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(cli + ["--workdir", str(workdir)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_log(workdir, "step 30 ", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    m = STOPPED.match(last)
    assert m and m.group(2) == sig.name, err
    step = int(m.group(1))
    assert 30 <= step < 150
    assert read_checkpoint(workdir / "checkpoint.pt")["step"] == step
    assert (workdir / "log.txt").read_text().splitlines()[-1] == last
    assert _temporaries(workdir) == []

    resumed = subprocess.run(cli + ["--workdir", str(workdir)], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step} of 150 on cpu" in resumed.stderr
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0 and err == "", err  # --quiet: nothing on the console
    _same(read_checkpoint(tmp_path / "straight" / "checkpoint.pt"),
          read_checkpoint(workdir / "checkpoint.pt"))


_RECORD_EXIT = """
import os
from score_sde.train import run
try:
    run()
except SystemExit as e:
    with open(os.path.join({folder!r}, "exit_rank" + os.environ["RANK"]), "w") as f:
        f.write(str(e.code))
    raise
"""


def test_ctrl_c_stops_every_torchrun_process_at_one_step(tmp_path, toy_data):
    script = tmp_path / "train_recording_exit.py"
    script.write_text(_RECORD_EXIT.format(folder=str(tmp_path)))
    workdir = tmp_path / "w"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node=2", str(script), *_args(toy_data, n_iters=200), "--workdir",
              str(workdir)]
    # A terminal's Ctrl-C: SIGINT to the launcher and its workers, which torchrun then
    # sends the workers once more.
    proc = subprocess.Popen(launch, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_log(workdir, "step 20 ", proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert sorted(p.name for p in tmp_path.glob("exit_rank*")) == ["exit_rank0", "exit_rank1"]
    assert all(p.read_text() == "130" for p in tmp_path.glob("exit_rank*"))
    stopped = [line for line in err.splitlines() if STOPPED.match(line)]
    assert len(stopped) == 1, err  # rank 0 reports for all
    step = int(STOPPED.match(stopped[0]).group(1))
    assert read_checkpoint(workdir / "checkpoint.pt")["step"] == step >= 20
    assert _temporaries(workdir) == []
    # torchrun's launcher reports the signal with a traceback of its own; no worker does.
    assert str(REPO / "score_sde") not in err and "KeyboardInterrupt" not in err, err

    resumed = subprocess.run(launch[:5] + ["-m", "score_sde.train"] + launch[6:], cwd=tmp_path,
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step} of 200 on cpu x 2 processes" in resumed.stderr
    assert read_checkpoint(workdir / "checkpoint.pt")["step"] == 200


# --- in-process: where the signal arrives ---------------------------------------------------

FAST = dict(n_iters=8, log_every=4, eval_every=4, sample_every=4, num_samples=20,
            checkpoint_every=100, snapshot_every=100)


def test_a_signal_during_a_step_lets_it_finish(tmp_path, monkeypatch):
    train(_toy_cfg(**dict(FAST, n_iters=4)), str(tmp_path / "four"), quiet=True)
    loss = Trainer.train_loss

    def signalled(self, *args):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # inside step 3, before its backward pass
        return loss(self, *args)

    monkeypatch.setattr(Trainer, "train_loss", signalled)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the shell started us in background
    with pytest.raises(TrainingInterrupted) as info:
        train(_toy_cfg(**FAST), str(tmp_path / "stopped"), quiet=True)
    assert info.value.step == 4 and info.value.exit_status == 130
    assert str(info.value) == "stopped at step 4 (SIGINT); run the same command to resume"
    four, stopped = (read_checkpoint(tmp_path / name / "checkpoint.pt")
                     for name in ("four", "stopped"))
    for part in ("model", "ema", "optimizer", "step"):
        _same(four[part], stopped[part], part)
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.parametrize("where", ["sample_grid", "eval_loss"])
def test_a_signal_abandons_a_sample_grid_or_held_out_loss(tmp_path, monkeypatch, where):
    def interrupted(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the work would go on; the signal ends it
        raise AssertionError(f"{where} was not abandoned")

    monkeypatch.setattr(Trainer, where, interrupted)
    start = time.time()
    with pytest.raises(TrainingInterrupted) as info:
        train(_toy_cfg(**FAST), str(tmp_path), quiet=True)
    assert time.time() - start < 25
    assert info.value.step == 4 and info.value.exit_status == 143
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert not (tmp_path / "samples").exists()  # abandoned, or skipped as the stop is due
    log = (tmp_path / "log.txt").read_text()
    assert ("step 4 eval_loss_ema=" in log) == (where == "sample_grid")
    assert log.splitlines()[-1] == "stopped at step 4 (SIGTERM); run the same command to resume"


@pytest.mark.parametrize("where", ["sample_grid", "eval_loss"])
def test_a_signal_during_the_last_steps_work_is_still_a_stop(tmp_path, monkeypatch, where):
    # At step n_iters there is no next step to honour the stop before: the run must still
    # end as stopped (exit 130, the stop line), not as done with the work silently dropped.
    work = getattr(Trainer, where)

    def interrupted(self):
        if self.step == FAST["n_iters"]:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
            raise AssertionError(f"{where} was not abandoned")
        return work(self)

    monkeypatch.setattr(Trainer, where, interrupted)
    with pytest.raises(TrainingInterrupted) as info:
        train(_toy_cfg(**FAST), str(tmp_path), quiet=True)
    assert info.value.step == 8 and info.value.exit_status == 130
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 8
    log = (tmp_path / "log.txt").read_text()
    assert "done at step" not in log
    assert log.splitlines()[-1] == "stopped at step 8 (SIGINT); run the same command to resume"
    # The checkpoint lists the work left: a held-out loss that was finished is not redone.
    left = ["eval", "samples"] if where == "eval_loss" else ["samples"]
    assert read_checkpoint(tmp_path / "checkpoint.pt")["final_work_pending"] == left
    # Running the same command again does the abandoned work, then reports done.
    monkeypatch.setattr(Trainer, where, work)
    metrics = train(_toy_cfg(**FAST), str(tmp_path), quiet=True)
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert log[-1] == "done at step 8"
    evals = [line for line in log if line.startswith("step 8 eval_loss_ema=")]
    assert len(evals) == 1  # done once, by the stopped run or by the resume
    # The same metrics as an uninterrupted run reports: the last step's and its held-out loss.
    assert f"{metrics['eval_loss']:.6g}" == evals[0].split("=")[1]
    assert {"loss", "lr", "grad_norm"} <= set(metrics)
    names = "held-out loss and samples" if where == "eval_loss" else "samples"
    assert f"step 8: the {names} a stop abandoned" in log
    assert (tmp_path / "samples" / "samples_00000008.png").exists()
    assert read_checkpoint(tmp_path / "checkpoint.pt")["final_work_pending"] == []
    again = train(_toy_cfg(**FAST), str(tmp_path), quiet=True)  # nothing left to do
    assert again == metrics
    rerun = (tmp_path / "log.txt").read_text().splitlines()[len(log):]
    assert len(rerun) == 2 and rerun[0].startswith("resuming from step 8 of 8 on cpu: ")
    assert rerun[1] == "done at step 8"


def test_a_resume_stopped_again_keeps_only_the_work_still_left(tmp_path, monkeypatch):
    work = Trainer.sample_grid

    def interrupted(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        raise AssertionError("sample_grid was not abandoned")

    cfg = _toy_cfg(**FAST)
    train(cfg, str(tmp_path), quiet=True)
    # A checkpoint that kept one flag for the step's work (True: all of it still to do).
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    state["final_work_pending"] = True
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(Trainer, "sample_grid", interrupted)
    with pytest.raises(TrainingInterrupted):
        train(cfg, str(tmp_path), quiet=True)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["final_work_pending"] == ["samples"]
    monkeypatch.setattr(Trainer, "sample_grid", work)
    metrics = train(cfg, str(tmp_path), quiet=True)
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert log[-2:] == ["step 8: the samples a stop abandoned", "done at step 8"]
    evals = [line for line in log if line.startswith("step 8 eval_loss_ema=")]
    assert len(evals) == 2  # the first run's and the stopped resume's, none after
    assert f"{metrics['eval_loss']:.6g}" == evals[1].split("=")[1]
    assert read_checkpoint(tmp_path / "checkpoint.pt")["final_work_pending"] == []


def test_a_resume_without_sample_grids_drops_an_abandoned_grid(tmp_path, monkeypatch):
    def interrupted(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        raise AssertionError("sample_grid was not abandoned")

    work = Trainer.sample_grid
    monkeypatch.setattr(Trainer, "sample_grid", lambda self: (
        interrupted(self) if self.step == FAST["n_iters"] else work(self)))
    with pytest.raises(TrainingInterrupted):
        train(_toy_cfg(**FAST), str(tmp_path), quiet=True)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["final_work_pending"] == ["samples"]
    monkeypatch.setattr(Trainer, "sample_grid", work)
    train(_toy_cfg(**dict(FAST, sample_every=0)), str(tmp_path), quiet=True)  # grids off now
    assert not (tmp_path / "samples" / "samples_00000008.png").exists()
    assert (tmp_path / "log.txt").read_text().splitlines()[-1] == "done at step 8"
    assert read_checkpoint(tmp_path / "checkpoint.pt")["final_work_pending"] == []


def test_a_signal_before_training_writes_nothing(tmp_path, monkeypatch):
    load = trainer_module.load_splits

    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        return load(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_splits", slow_load)
    with pytest.raises(TrainingInterrupted) as info:
        train(_toy_cfg(**FAST), str(tmp_path / "w"))
    assert info.value.step is None and info.value.exit_status == 130
    assert "before training started; nothing was written" in str(info.value)
    assert not (tmp_path / "w").exists()


# Sends this process SIGINT when `torch` is first imported, then lets the import go on: a
# Ctrl-C while the command line loads its modules, at a moment the test controls.
_INTERRUPT_TORCH_IMPORT = """
import os, signal, sys

class _Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, _Interrupt())
# A shell that starts a job in the background ignores SIGINT for it; a terminal's Ctrl-C
# reaches a foreground process with the default handler, which this restores.
signal.signal(signal.SIGINT, signal.default_int_handler)
"""


def test_ctrl_c_while_the_command_line_loads_torch_prints_one_line(tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_INTERRUPT_TORCH_IMPORT)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path / "hook"), ENV["PYTHONPATH"]]))
    out = subprocess.run([sys.executable, "-m", "score_sde.train", "--dataset", "toy_moons",
                          "--workdir", str(tmp_path / "w")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out.stderr
    assert out.stderr.splitlines() == [
        "stopped by SIGINT before training started; nothing was written"]
    assert not (tmp_path / "w").exists()
    # The library itself loads torch only when a name that needs it is used.
    out = subprocess.run([sys.executable, "-c", "import sys, score_sde; "
                          "print('torch' in sys.modules, score_sde.VPSDE.__name__, "
                          "'torch' in sys.modules)"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "VPSDE", "True"], out.stderr


def test_signal_stop_records_only_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with SignalStop() as stop:
        stop.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # e.g. torchrun passing a Ctrl-C on
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
