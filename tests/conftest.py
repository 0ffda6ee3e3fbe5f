"""Shared test set-up: skips tests marked `gpu` without CUDA; a one-thread fixture; a tiny
trained toy checkpoint for the tools' tests."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module single-threaded and restores the setting after: the tensors in these tests
    are small, so intra-op thread hand-offs cost more than they save, most of all when the
    cores are shared. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A workdir with a tiny toy checkpoint (MLP, 8 Gaussians, 10 steps, on the CPU)."""
    from score_sde.config import apply_overrides, load_config_file
    from score_sde.trainer import train

    workdir = tmp_path_factory.mktemp("toy_run")
    cfg = load_config_file(str(REPO / "configs" / "toy.py"))
    training = dict(n_iters=10, batch_size=64, log_every=10, eval_every=10, eval_batches=1,
                    sample_every=0, checkpoint_every=10, snapshot_every=10, device="cpu")
    cfg = apply_overrides(cfg, {f"training.{k}": v for k, v in training.items()})
    cfg = apply_overrides(cfg, {"data.num_samples": 256,
                                "model.kwargs": dict(hidden=16, num_layers=2)})
    train(cfg, str(workdir))
    return workdir
