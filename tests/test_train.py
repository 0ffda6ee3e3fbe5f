"""The training script: configuration, command line, checkpoints and exact resumption."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from score_sde.checkpoint import read_checkpoint
from score_sde.config import from_dict, to_dict
from score_sde.train import apply_overrides, load_config_file, train

REPO = Path(__file__).resolve().parent.parent


def _toy_cfg(**training):
    cfg = load_config_file(str(REPO / "configs" / "toy.py"))
    base = dict(n_iters=40, batch_size=64, log_every=10, eval_every=20, eval_batches=2,
                sample_every=40, num_samples=200, checkpoint_every=10, snapshot_every=20,
                keep_snapshots=2, device="cpu")
    base.update(training)
    cfg = apply_overrides(cfg, {f"training.{k}": v for k, v in base.items()})
    return apply_overrides(cfg, {"data.num_samples": 2000,
                                 "model.kwargs": dict(hidden=32, num_layers=2)})


# Bitwise-identical CPU runs need a fixed thread count: MKL and OpenMP may otherwise drop
# threads under load, which changes the order of floating-point reductions.
ENV = dict(os.environ, PYTHONPATH=str(REPO), MKL_DYNAMIC="FALSE", OMP_DYNAMIC="FALSE")


def _cli(*args, timeout=120):
    env = ENV
    return subprocess.run([sys.executable, "-m", "score_sde.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_config_round_trips_through_dict():
    cfg = _toy_cfg()
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == dataclasses.replace(cfg)
    with pytest.raises(ValueError, match="unknown training config fields"):
        from_dict({"training": {"n_iter": 3}})


def test_every_config_file_builds():
    for path in sorted((REPO / "configs").glob("*.py")):
        cfg = load_config_file(str(path))
        assert cfg.training.n_iters > 0, path


def test_train_writes_run_folder_and_is_finite(tmp_path):
    metrics = train(_toy_cfg(), str(tmp_path))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_loss"])
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "log.txt", "checkpoint.pt", "snapshots", "samples", "tb"} <= names
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["samples_00000040.png"]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        "snapshot_00000020.pt", "snapshot_00000040.pt"]
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 40 and from_dict(state["config"]) == _toy_cfg()


def _final_weights(workdir):
    state = read_checkpoint(Path(workdir) / "checkpoint.pt")
    return state["model"], state["ema"], state["optimizer"]["state"]


def _assert_same_state(a, b):
    for da, db in zip(a, b):
        flat_a = torch.nn.utils.parameters_to_vector([v.float().flatten() for v in _tensors(da)])
        flat_b = torch.nn.utils.parameters_to_vector([v.float().flatten() for v in _tensors(db)])
        assert torch.equal(flat_a, flat_b)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    return []


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    train(_toy_cfg(n_iters=40), str(tmp_path / "straight"))
    train(_toy_cfg(n_iters=20), str(tmp_path / "resumed"))
    train(_toy_cfg(n_iters=40), str(tmp_path / "resumed"))
    _assert_same_state(_final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed"))
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "start at step 0 " in log and "start at step 20 " in log  # appended, not truncated


def test_killed_process_resumes_exactly(tmp_path):
    # A real training process killed with SIGKILL after its first checkpoints, then restarted
    # with the same workdir, must end with the weights of an uninterrupted run.
    data = np.random.default_rng(0).normal(size=(3000, 2)).astype(np.float32)
    np.save(tmp_path / "train.npy", data)
    args = ["--sde", "vp", "--dataset", "array", "--data_path", str(tmp_path / "train.npy"),
            "--n_iters", "400", "--batch_size", "64", "--checkpoint_every", "25",
            "--snapshot_every", "100", "--sample_every", "0", "--eval_every", "200",
            "--log_every", "50", "--device", "cpu"]
    straight = _cli(*args, "--workdir", str(tmp_path / "straight"), timeout=300)
    assert straight.returncode == 0, straight.stderr
    env = ENV
    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "score_sde.train", *args, "--workdir",
                             str(workdir)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ckpt = workdir / "checkpoint.pt"
        if ckpt.exists() and read_checkpoint(ckpt)["step"] >= 50:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(workdir / "checkpoint.pt")["step"]
    assert 50 <= killed_at < 400
    resumed = _cli(*args, "--workdir", str(workdir), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(_final_weights(tmp_path / "straight"), _final_weights(workdir))


def test_resume_with_a_different_model_is_refused(tmp_path):
    train(_toy_cfg(n_iters=10), str(tmp_path))
    other = apply_overrides(_toy_cfg(n_iters=20), {"model.kwargs": dict(hidden=16, num_layers=2)})
    with pytest.raises(RuntimeError, match="different model or SDE configuration"):
        train(other, str(tmp_path))


def test_dry_run_prints_resolved_config(tmp_path):
    out = _cli("--dataset", "toy_moons", "--sde", "ve", "--n_iters", "7", "--dry_run")
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["sde"]["name"] == "ve" and resolved["data"]["dataset"] == "toy_moons"
    assert resolved["training"]["n_iters"] == 7 and resolved["model"]["name"] == "mlp"
    assert resolved["workdir"] == os.path.join("runs", "ve_toy_moons")


@pytest.mark.parametrize("args, message", [
    (["--importance_sampling"], "--importance_sampling needs --likelihood_weighting"),
    (["--dataset", "array"], "--dataset array needs --data_path"),
    (["--dataset", "array", "--data_path", "/nonexistent/x.npy"], "/nonexistent/x.npy"),
    (["--sde", "vpp"], "sde"),
    (["--n_iters", "0"], "n_iters"),
    (["--config", "/nonexistent/cfg.py"], "does not exist"),
    (["--dataset", "fashion_mnist", "--data_dir", "/nonexistent"], "dataset-fashion-mnist"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--model", "nope"], "cuda"),
])
def test_bad_command_lines_exit_2_with_one_line(args, message, tmp_path):
    out = _cli("--workdir", str(tmp_path / "w"), "--dataset", "toy_moons", *args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
