"""Shared test set-up: skips tests marked `gpu` without CUDA; a one-thread fixture."""
import pytest
import torch


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
