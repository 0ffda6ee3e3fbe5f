"""Multi-process training (torchrun, DistributedDataParallel on gloo) against one process.

Two CPU processes on the global batch must follow the single-process run step for step: their
data shards and noise slices are the single-process ones and DDP averages the shards'
gradients, so the final weights agree up to the order of floating-point sums.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from score_sde.checkpoint import read_checkpoint
from score_sde.config import to_dict
from score_sde.datasets import BatchOrder
from score_sde.config import apply_overrides
from score_sde.distributed import DistInfo, dist_from_env, process_group_backend, resolve_device
from score_sde.models import MLPScoreNet
from score_sde.trainer import train
from tests.test_train import _fashion_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
# One thread per process: two processes share the CPU, and a fixed thread count keeps each
# process's reductions in a fixed order.
ENV = dict(os.environ, PYTHONPATH=str(REPO), MKL_DYNAMIC="FALSE", OMP_DYNAMIC="FALSE",
           OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU tests
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
    ENV.pop(_name, None)
# Weights after 30 Adam steps: agreement up to summation order.
RTOL, ATOL = 1e-5, 1e-6

CONFIG = '''
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig


def get_config():
    return Config(sde=SDEConfig(name="vp"), data=DataConfig(dataset="array"),
                  model=ModelConfig(name="mlp", kwargs=dict(hidden=32, num_layers=2)),
                  training=TrainingConfig(lr=1e-3, warmup=5, ema_rate=0.9,
                                          num_samples=16, eval_batches=2))
'''


def _args(tmp_path, n_iters):
    return ["--config", str(tmp_path / "cfg.py"), "--data_path", str(tmp_path / "train.npy"),
            "--n_iters", str(n_iters), "--batch_size", "64", "--checkpoint_every", "10",
            "--snapshot_every", "20", "--sample_every", "0", "--eval_every", "15",
            "--log_every", "5", "--device", "cpu"]


def _run(cmd, env=ENV):
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _single(*args):
    return _run([sys.executable, "-m", "score_sde.train", *args])


def _torchrun(*args, nproc=2):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "score_sde.train", *args])


def _assert_close_states(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{part}.{k}: {m}")
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][p][k], v, rtol=RTOL, atol=ATOL)
    assert a["step"] == b["step"]


def test_two_processes_match_one_and_resume(tmp_path):
    (tmp_path / "cfg.py").write_text(CONFIG)
    data = np.random.default_rng(0).normal(size=(600, 2)).astype(np.float32) * [1.0, 3.0]
    np.save(tmp_path / "train.npy", data.astype(np.float32))
    one, two = tmp_path / "one", tmp_path / "two"

    out = _single(*_args(tmp_path, 30), "--workdir", str(one))
    assert out.returncode == 0, out.stderr
    # Two processes from scratch to step 20, then a second launch resumes to step 30.
    for n_iters in (20, 30):
        out = _torchrun(*_args(tmp_path, n_iters), "--workdir", str(two))
        assert out.returncode == 0, out.stderr
        results = [line for line in out.stdout.splitlines() if line.startswith("{")]
        assert len(results) == 1, out.stdout  # rank 0 alone reports

    _assert_close_states(read_checkpoint(one / "checkpoint.pt"),
                         read_checkpoint(two / "checkpoint.pt"))
    _assert_close_states(read_checkpoint(one / "snapshots" / "snapshot_00000020.pt"),
                         read_checkpoint(two / "snapshots" / "snapshot_00000020.pt"))

    # Rank 0 alone writes: one copy of every log line, one TensorBoard file, no stray files.
    log = (two / "log.txt").read_text().splitlines()
    n = sum(p.numel() for p in MLPScoreNet(dim=2, hidden=32, num_layers=2).parameters())
    size = f"mlp with {n:,} parameters, batch 64"
    for line in (f"start at step 0 of 20 on cpu x 2 processes: {size}",
                 f"resuming from step 20 of 30 on cpu x 2 processes: {size}", "done at step 30"):
        assert log.count(line) == 1, log
    steps = [line.split()[1] for line in log if line.startswith("step ") and "loss=" in line]
    assert steps == [str(s) for s in range(5, 31, 5)], log
    assert sum("eval_loss_ema" in line for line in log) == 3  # steps 15, 20 and 30
    assert len(list((two / "tb").iterdir())) == 2  # one events file per launch
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (two / "snapshots").iterdir()) == [
        "snapshot_00000020.pt", "snapshot_00000030.pt"]


def test_two_processes_match_one_class_conditional_images(tmp_path):
    # 8-bit images (dequantization), label dropout and importance-sampled t: every per-sample
    # draw of the global batch must land on the same sample as in one process.
    cfg = _fashion_cfg(tmp_path, n_iters=4, batch_size=16, sample_every=0, eval_every=4,
                       checkpoint_every=2, snapshot_every=4, label_dropout=0.3)
    cfg = apply_overrides(cfg, {"training.likelihood_weighting": True,
                                "training.importance_sampling": True})
    (tmp_path / "cfg.py").write_text(
        "import json\nfrom score_sde.config import from_dict\n\n\ndef get_config():\n"
        f"    return from_dict(json.loads({json.dumps(to_dict(cfg))!r}))\n")
    train(cfg, str(tmp_path / "one"))
    out = _torchrun("--config", str(tmp_path / "cfg.py"), "--workdir", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr
    _assert_close_states(read_checkpoint(tmp_path / "one" / "checkpoint.pt"),
                         read_checkpoint(tmp_path / "two" / "checkpoint.pt"))


def test_global_batch_must_split_over_processes(tmp_path):
    env = dict(ENV, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    out = _run([sys.executable, "-m", "score_sde.train", "--dataset", "toy_moons",
                "--batch_size", "63", "--workdir", str(tmp_path / "w")], env=env)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--batch_size 63" in lines[0] and "WORLD_SIZE=2" in lines[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "only RANK is set"),
    ({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "0 <= RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK >= 0"),
])
def test_bad_torchrun_environment(env, message):
    with pytest.raises(ValueError, match=message):
        dist_from_env(env)


def test_torchrun_environment():
    assert dist_from_env({}) == DistInfo()
    dist = dist_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "OTHER": "x"})
    assert dist == DistInfo(rank=3, local_rank=1, world_size=4) and not dist.is_main


def test_shards_are_the_batch_order_shards():
    for world_size in (1, 2, 4):
        full = BatchOrder(100, 16, seed=3).global_indices(7)
        parts = []
        for rank in range(world_size):
            dist = DistInfo(rank=rank, world_size=world_size)
            order = BatchOrder(100, 16, seed=3, rank=rank, world_size=world_size)
            assert torch.equal(full[dist.shard(16)], order.indices(7))
            parts.append(full[dist.shard(16)])
        assert torch.equal(torch.cat(parts), full)


def test_devices_and_backends():
    two = DistInfo(rank=1, local_rank=1, world_size=2)
    assert resolve_device("cpu", two) == torch.device("cpu")
    assert process_group_backend(torch.device("cpu")) == "gloo"
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("meta", two)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="every torchrun process on one GPU"):
            resolve_device("cuda:0", two)
        if torch.cuda.device_count() >= 2:
            assert resolve_device("cuda", two) == torch.device("cuda", 1)
    else:
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="CUDA is not available"):
                resolve_device(name, two)
        assert resolve_device("auto", two) == torch.device("cpu")


def test_train_refuses_an_uneven_split_before_starting_processes(tmp_path):
    from score_sde.config import apply_overrides, load_config_file

    cfg = load_config_file(str(REPO / "configs" / "toy.py"))
    cfg = apply_overrides(cfg, {"training.batch_size": 10, "training.device": "cpu"})
    with pytest.raises(ValueError, match="divisible by the number of processes WORLD_SIZE=4"):
        train(cfg, str(tmp_path), dist=DistInfo(rank=0, world_size=4))
    assert not torch.distributed.is_initialized()
