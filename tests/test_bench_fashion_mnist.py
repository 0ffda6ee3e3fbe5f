"""benchmarks/fashion_mnist.py: the whole pipeline in --tiny mode on the CPU, on small
synthetic Fashion-MNIST IDX files written here; its summary, resuming, the time budget, stage
failures and bad input; and configs/fashion_mnist_ddpmpp.py."""
import gzip
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from score_sde.models import NCSNpp
from score_sde.config import load_config_file
from tests.scripts import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "fashion_mnist.py"
bench = load_script("benchmarks/fashion_mnist.py")

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
NUM_SAMPLES = 24  # below the --tiny default, to check that the flag reaches every stage
STAGES = ["train_calibration", "train", "export_weights", "classifier", "fd_real_train",
          "sample_dpm10", "fd_dpm10", "sample_dpm20", "fd_dpm20", "sample_pc", "fd_pc",
          "likelihood"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _idx_gz(path: Path, arr: np.ndarray) -> None:
    """An IDX file (LeCun's MNIST page: 0x0000, type 0x08 uint8, rank, big-endian dims)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fashion_dir(root: Path, *, n_train: int = 96, n_test: int = 48) -> Path:
    """Images with a class-dependent bright square on noise, so the classifier learns."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 64, (n, 28, 28))
        for i, k in enumerate(labels):
            y, x = 2 + 2 * (k // 5) * 5, 2 + 5 * (k % 5)
            images[i, y:y + 6, x:x + 4] = 255
        _idx_gz(root / f"{stem}-images-idx3-ubyte.gz", images)
        _idx_gz(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One --tiny run on synthetic data: (arguments, workdir, its result)."""
    root = tmp_path_factory.mktemp("bench")
    data = _fashion_dir(root / "data")
    work = root / "work"
    args = ["--tiny", "--workdir", work, "--data_dir", data, "--device", "cpu",
            "--num_samples", NUM_SAMPLES, "--train_seconds", 12]
    result = _run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return args, work, result


def _summary(work: Path) -> dict:
    return json.loads((work / "results" / "summary.json").read_text())


def test_tiny_pipeline_summary(tiny):
    _, work, result = tiny
    results_dir = work / "results"
    s = _summary(work)
    assert s["complete"] and s["stopped"] is None
    assert s["environment"]["device_type"] == "cpu" and s["environment"]["torch"]
    assert list(s["stages"]) and set(s["stages"]) == set(STAGES)
    for name, stage in s["stages"].items():
        assert stage["seconds"] > 0 and stage["command"].startswith("python "), name
        assert (results_dir / stage["log"]).is_file(), name
    r = s["results"]
    plan = r["train"]["plan"]
    assert plan["how"] == "--train_seconds" and plan["calibration_iters"] == 20
    assert plan["n_iters"] >= 20 and plan["n_iters"] % 20 == 0
    assert r["train"]["n_iters"] == plan["n_iters"] and math.isfinite(r["train"]["final_loss"])
    nll = r["likelihood"]
    assert nll["step"] == plan["n_iters"] and nll["num_data"] == 4 and nll["use_ema"]
    assert nll["dequantization"] == "uniform" and nll["eps"] == 1e-5
    assert math.isfinite(nll["bpd"]) and nll["bpd"] > 0 and nll["bpd_stderr"] > 0
    assert nll["nfe_mean"] > 0
    samples = r["samples"]
    assert set(samples) == {"dpm10", "dpm20", "pc", "real_train"}
    for steps in (10, 20):
        e = samples[f"dpm{steps}"]
        assert e["sampler"] == "dpm_solver" and e["nfe"] == [steps] and e["nfe_mean"] == steps
    assert samples["pc"]["nfe"] == [2 * 30]  # 30 predictor + 30 corrector steps
    for name, e in samples.items():
        assert e["fd_num_samples"] == NUM_SAMPLES and e["fd_split"] == "test", name
        assert math.isfinite(e["classifier_fd"]) and e["classifier_fd"] > -1e-9, name
        assert e["fd_num_ref"] == 48, name  # the whole synthetic test split (< --num_ref 500)
        if name != "real_train":
            assert e["num_samples"] == NUM_SAMPLES and e["step"] == plan["n_iters"], name
            assert (results_dir / e["grid"]).is_file(), name
            with np.load(work / "samples" / name / "samples.npz") as f:
                assert f["samples"].shape == (NUM_SAMPLES, 1, 28, 28), name
    assert 0 <= r["classifier"]["test_accuracy"] <= 1
    # The exported float16 EMA weights rebuild the trained network.
    from score_sde.runs import load_trained
    exported = load_trained(results_dir / "ema_weights_fp16.pt")
    assert exported.step == plan["n_iters"] and exported.use_ema
    md = (results_dir / "summary.md").read_text()
    assert "| test bits/dim" in md and md.count("| classifier FD,") == 4
    assert s["command"] in md
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["complete"] and out["bpd"] == nll["bpd"]


def test_rerun_skips_finished_stages(tiny):
    args, work, _ = tiny
    before = _summary(work)["stages"]
    fd_dpm10 = _summary(work)["results"]["samples"]["dpm10"]["classifier_fd"]
    logs = {p.name: p.read_text() for p in (work / "results" / "logs").iterdir()}
    again = _run(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    for name in STAGES:
        assert f"{name}: done already" in again.stdout, name
    assert _summary(work)["stages"] == before
    assert {p.name: p.read_text() for p in (work / "results" / "logs").iterdir()} == logs

    # A missing output reruns its stage alone.
    (work / "results" / "raw" / "fd_dpm10.json").unlink()
    partly = _run(*args)
    assert partly.returncode == 0, partly.stdout + partly.stderr
    assert "fd_dpm10: done in" in partly.stdout
    assert all(f"{name}: done already" in partly.stdout for name in STAGES if name != "fd_dpm10")
    after = _summary(work)
    assert after["complete"]
    assert after["results"]["samples"]["dpm10"]["classifier_fd"] == pytest.approx(fd_dpm10)


def test_time_budget_stops_a_stage_and_a_rerun_continues(tiny):
    args, work, _ = tiny
    # A tolerance of 1e-7 makes the likelihood far slower than the few seconds left.
    stopped = _run(*args, "--nll_tol", "1e-7", "--time_budget", 12)
    assert stopped.returncode == bench.EXIT_INCOMPLETE, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().count("\n") == 0
    assert stopped.stderr.startswith("incomplete: stage likelihood was stopped at --time_budget")
    s = _summary(work)
    assert not s["complete"] and "likelihood" in s["stopped"] and "likelihood" not in s["stages"]
    assert "terminated at --time_budget" in (work / "results" / "logs" / "likelihood.log"
                                             ).read_text()
    assert "**Incomplete**" in (work / "results" / "summary.md").read_text()
    # Back to the first settings: the recorded likelihood is gone, so only it runs again.
    resumed = _run(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "likelihood: done in" in resumed.stdout and _summary(work)["complete"]


def test_failed_stage_is_one_line_with_status_and_log(tiny):
    args, work, _ = tiny
    # A training checkpoint is no feature classifier: tools/fid.py exits with 2.
    failed = _run(*args, "--classifier", work / "run" / "checkpoint.pt")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    log = work / "results" / "logs" / "fd_real_train.log"
    assert failed.stderr == f"error: stage fd_real_train failed with exit status 2; see {log}\n"
    assert "fd_real_train" in _summary(work)["stopped"]


@pytest.mark.parametrize("extra, match", [
    (["--data_dir", "/nonexistent/fashion"], "Fashion-MNIST not found"),
    (["--num_test", "1000"], "--num_test 1000 exceeds the 48 images of the test split"),
    (["--dpm_steps", "10,x"], "--dpm_steps must be integers"),
    (["--dpm_steps", "1,10"], "--dpm_steps must be integers >= 2 (evaluations, the last one "
                              "denoising)"),
    (["--fp32"], "--fp32 applies to CUDA training only"),
    (["--n_iters", "0"], "n_iters"),
    (["--time_budget", "nan"], "--time_budget must be a finite number of seconds >= 0"),
    (["--results", "{tmp}/file"], "is a file; give a folder"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, extra, match):
    (tmp_path / "file").write_text("x")
    extra = [a.format(tmp=tmp_path) for a in extra]
    data = _fashion_dir(tmp_path / "data")
    result = _run("--tiny", "--workdir", tmp_path / "work", "--data_dir", data, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert match in result.stderr
    assert not (tmp_path / "work" / "results").exists()


def test_plan_fills_the_training_time():
    # 100 steps of batch 100 at 1000 images/s = 10 s; the run took 16 s, so 6 s are fixed.
    n = bench.plan_n_iters(calibration_iters=100, calibration_seconds=16.0, images_per_s=1000.0,
                           batch_size=100, train_seconds=100.0)
    steps = bench.CALIBRATION_SAFETY * (100 - 16 - 6) / 0.1
    assert n == 100 * (1 + int(steps) // 100) and n % 100 == 0
    assert bench.plan_n_iters(calibration_iters=100, calibration_seconds=16.0,
                              images_per_s=1000.0, batch_size=100, train_seconds=10.0) == 100


def test_logged_rates_leave_out_each_first_interval(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("start at step 0 of 30 on cpu\n"
                   "step 10 loss=1 samples_per_s=5\nstep 20 loss=1 samples_per_s=50\n"
                   "step 20 eval_loss_ema=1\ndone at step 20\n"
                   "resuming from step 20 of 40 on cpu: mlp with 1,250 parameters\n"
                   "step 30 loss=1 samples_per_s=7\nstep 40 loss=1 samples_per_s=60\n")
    assert bench.logged_rates(log) == [50.0, 60.0]
    assert bench.logged_rates(log, up_to=20) == [50.0]


def test_ddpmpp_config_fits_fashion_mnist():
    cfg = load_config_file(str(REPO / "configs" / "fashion_mnist_ddpmpp.py"))
    assert cfg.model.name == "ncsnpp" and cfg.sde.name == "vp" and cfg.training.reduce_mean
    model = NCSNpp(**cfg.model.kwargs)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(6.99e6, rel=1e-3)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([0.0, 999.0]))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    dry = subprocess.run([sys.executable, "-m", "score_sde.train", "--config",
                          "configs/fashion_mnist_ddpmpp.py", "--dry_run"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["model"]["kwargs"]["attn_resolutions"] == [14]
