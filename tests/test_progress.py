"""What a training run prints (score_sde/progress.py and the command line's console output).

- `SmoothedLoss` against the exponential average written out in the test, read every step or
  every k steps, non-finite losses left out; `SpeedProbe` on a fake clock; `format_duration`.
- The command line: log lines on stderr (start line with device and model size, speed and
  expected duration, log steps, done), the result alone on stdout; --quiet prints nothing;
  on a terminal, a progress bar with step / total, loss and images/s.
- The CPU quick-start hint follows the expected duration only for the default config.
- Sample grids reach TensorBoard beside the scalars.
"""
import fcntl
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import score_sde.progress as progress
from score_sde.config import find_config, load_config_file
from score_sde.models import MODELS
from score_sde.progress import Reporter, SmoothedLoss, SpeedProbe, format_duration
from score_sde.train import CPU_QUICK_START, slow_hint
from score_sde.trainer import SLOW_CPU_RUN_SECONDS, Trainer, train
from tests.test_train import ENV, _toy_cfg

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seconds, text", [(0.0, "under 1 s"), (0.99, "under 1 s"),
                                           (1.0, "1 s"), (45, "45 s"), (89.4, "89 s"),
                                           (120, "2 min"), (27 * 60, "27 min"), (3 * 3600, "3.0 h"),
                                           (7.9 * 86400, "7.9 days")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_smoothed_loss_is_an_exponential_average_however_often_it_is_read():
    beta = 0.9
    losses = [1.0, 3.0, float("nan"), 2.0, 5.0, 4.0, float("inf"), 0.5]
    every_step = SmoothedLoss(beta)
    expected, finite = None, [v for v in losses if math.isfinite(v)]
    for v in losses:
        every_step.add(torch.tensor(v))
        got = every_step.read()
        if math.isfinite(v):
            expected = v if expected is None else beta * expected + (1 - beta) * v
        assert got == pytest.approx(expected)
    # Read every 3 steps: each block's mean of finite losses, with weight 1 - beta^3.
    blocks = SmoothedLoss(beta)
    expected = None
    for start in range(0, len(losses), 3):
        block = losses[start:start + 3]
        for v in block:
            blocks.add(torch.tensor(v))
        mean = np.mean([v for v in block if math.isfinite(v)])
        w = beta ** len(block)
        expected = mean if expected is None else w * expected + (1 - w) * mean
        assert blocks.read() == pytest.approx(expected)
    assert SmoothedLoss().read() is None
    assert len(finite) == 6


def test_speed_probe_times_the_steps_after_the_first(monkeypatch):
    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock.now)
    probe = SpeedProbe(torch.device("cpu"), steps=5, seconds=20.0)
    assert probe.tick(11) is None  # the launch's first step (warm-up) ends at t = 100
    for step in range(12, 16):
        clock.now += 0.5
        assert probe.tick(step) is None
    clock.now += 0.5
    assert probe.tick(16) == pytest.approx(5 / 2.5)
    clock.now += 0.5
    assert probe.tick(17) is None  # once only
    slow = SpeedProbe(torch.device("cpu"), steps=5, seconds=20.0)
    slow.tick(0)
    clock.now += 25.0  # one step longer than `seconds`: measured at once
    assert slow.tick(1) == pytest.approx(1 / 25.0)


def test_reporter_lines_go_to_log_and_console_unless_quiet(tmp_path, capsys):
    for quiet in (False, True):
        workdir = tmp_path / f"quiet{quiet}"
        workdir.mkdir()
        report = Reporter(workdir, enabled=True, total=10, initial=0, batch_size=4, quiet=quiet)
        report.line("routine")
        report.line("log only", console=False)
        report.warn("warning")
        report.close()
        assert (workdir / "log.txt").read_text() == "routine\nlog only\nwarning\n"
        err = capsys.readouterr().err.splitlines()
        assert err == (["warning"] if quiet else ["routine", "warning"])
    off = Reporter(tmp_path / "missing", enabled=False, total=10, initial=0, batch_size=4)
    off.line("x")
    off.warn("y")
    off.close()
    assert not (tmp_path / "missing").exists() and capsys.readouterr().err == ""


def _cli(*args, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "score_sde.train", *args], cwd=cwd, env=ENV,
                          **kwargs)


TOY_RUN = ["--sde", "vp", "--dataset", "toy_8gaussians", "--n_iters", "30", "--batch_size",
           "32", "--log_every", "10", "--eval_every", "30", "--sample_every", "0",
           "--device", "cpu"]


def test_console_shows_the_log_and_stdout_only_the_result(tmp_path):
    out = _cli(*TOY_RUN, "--workdir", str(tmp_path / "w"), cwd=tmp_path, capture_output=True,
               text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    err = out.stderr.splitlines()
    model = MODELS["mlp"](dim=2, **load_config_file(str(find_config("toy"))).model.kwargs)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    assert err[0] == f"start at step 0 of 30 on cpu: mlp with {size:.2f}M parameters, batch 32"
    assert err[1].startswith("speed ") and " images/s (" in err[1] and \
        re.search(r"s/step\): the \d+ steps left take (about \d|under 1 s$)", err[1]), err
    assert [line.split()[1] for line in err if " loss=" in line] == ["10", "20", "30"]
    assert err[-1] == "done at step 30"
    assert (tmp_path / "w" / "log.txt").read_text().splitlines() == err
    assert out.stdout.count("\n") == 1 and out.stdout.startswith('{"workdir"')

    quiet = _cli(*TOY_RUN, "--workdir", str(tmp_path / "q"), "--quiet", cwd=tmp_path,
                 capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout.startswith('{"workdir"')


def test_progress_bar_on_a_terminal(tmp_path):
    master, slave = pty.openpty()
    # A terminal of 40 x 120 characters (a new pseudo-terminal has size 0 x 0: no room to draw).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "score_sde.train", *TOY_RUN, "--workdir",
                             str(tmp_path / "w")], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            pytest.fail("no output from the training process")
        try:
            data = os.read(master, 4096)
        except OSError:  # the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "train: 100%" in screen and "30/30" in screen, screen
    assert "loss=" in screen and "img/s=" in screen
    assert "start at step 0 of 30 on cpu" in screen and "done at step 30" in screen


def test_the_cpu_quick_start_hint_follows_a_long_expected_duration(tmp_path):
    default = types.SimpleNamespace(config=None, dataset="fashion_mnist")
    hint = slow_hint(default)
    # Its own workdir: the default one may hold the slow run's checkpoint, of another model.
    assert f"--config {CPU_QUICK_START} --workdir runs/vp_{CPU_QUICK_START}`" in hint
    find_config(CPU_QUICK_START)  # the config it names is shipped
    assert slow_hint(types.SimpleNamespace(config="toy", dataset="fashion_mnist")) is None
    assert slow_hint(types.SimpleNamespace(config=None, dataset="cifar10")) is None

    class Lines:
        def __init__(self):
            self.lines = []

        def line(self, text):
            self.lines.append(text)

    trainer = Trainer(_toy_cfg(n_iters=4000), str(tmp_path), slow_hint=hint)
    for steps_per_s, shown in ((4000 / (SLOW_CPU_RUN_SECONDS * 1.01), True),
                               (4000 / (SLOW_CPU_RUN_SECONDS * 0.99), False)):
        report = Lines()
        trainer.report_speed(steps_per_s, report)
        assert report.lines[0].startswith(f"speed {steps_per_s * 64:.0f} images/s")
        assert report.lines[1:] == ([hint] if shown else [])
    report = Lines()
    trainer.report_speed(4000 / 0.5, report)  # all the steps left in half a second
    assert report.lines == ["speed 512000 images/s (0.000125 s/step): the 4000 steps left take "
                            "under 1 s"]


def test_sample_grids_go_to_tensorboard(tmp_path):
    train(_toy_cfg(n_iters=20, sample_every=10, num_samples=50), str(tmp_path), quiet=True)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples")
    assert [e.step for e in images] == [10, 20]
    assert images[0].width > 500 and images[0].height > 500  # the 2-D plot with its axes
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "samples_00000010.png", "samples_00000020.png"]


def test_a_resumed_run_replaces_the_tensorboard_steps_a_killed_one_logged(tmp_path):
    # A run killed after its step-20 checkpoint had logged steps 25 and 30: the resume logs
    # them again, and TensorBoard must show each step once (purge_step).
    import shutil

    cfg = _toy_cfg(n_iters=30, log_every=5, checkpoint_every=10, snapshot_every=10,
                   keep_snapshots=5, eval_every=30, sample_every=0)
    train(cfg, str(tmp_path), quiet=True)
    # As if killed after step 20's save: its snapshot is the newest state.
    (snapshot,) = [p for p in (tmp_path / "snapshots").iterdir() if "00000020" in p.name]
    shutil.copy(snapshot, tmp_path / "checkpoint.pt")
    for later in (tmp_path / "snapshots").iterdir():
        if later.name > snapshot.name:
            later.unlink()
    train(cfg, str(tmp_path), quiet=True)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]
    assert [e.step for e in events.Scalars("eval/loss_ema")] == [30]


def test_logged_throughput_leaves_out_held_out_losses_samples_and_saves(tmp_path, monkeypatch):
    # 10 steps of batch 64 in 5 s, of which 3 s went to the periodic actions: 320 images/s.
    trainer = Trainer(_toy_cfg(n_iters=40), str(tmp_path))
    trainer.last_log, trainer.periodic_seconds, trainer.step = (100.0, 0), 3.0, 10
    import score_sde.trainer as trainer_module
    monkeypatch.setattr(trainer_module.time, "time", lambda: 105.0)

    class Report:
        def scalars(self, *args):
            pass

        def line(self, text):
            pass

    metrics = trainer.log_step(torch.tensor(1.0), 1e-3, torch.tensor(1.0), Report())
    assert metrics["samples_per_s"] == pytest.approx(10 * 64 / 2.0)
    assert trainer.periodic_seconds == 0.0 and trainer.last_log == (105.0, 10)


def test_data_without_a_picture_draw_no_sample_grids(tmp_path, monkeypatch):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32))
    from score_sde.config import apply_overrides

    def no_sampling(self):
        raise AssertionError("sampled a grid that has no picture")

    monkeypatch.setattr(Trainer, "sample_grid", no_sampling)
    cfg = apply_overrides(_toy_cfg(n_iters=10, sample_every=5), {
        "data.dataset": "array", "data.data_path": str(tmp_path / "v.npy"),
        "data.num_samples": None})
    train(cfg, str(tmp_path / "run"), quiet=True)
    assert "no sample grids: samples of shape (5,) have no picture" in \
        (tmp_path / "run" / "log.txt").read_text()
