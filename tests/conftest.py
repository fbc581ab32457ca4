"""Test-wide settings: never reach a model hub (the variable must be set before huggingface_hub is imported)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of two workers sharing the cores (pytest.ini): one thread each, for torch here (set before it is
    # imported) and for the subprocesses the tests start; two threads each would spin on each other's core.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train several times faster on one thread (two spin on OpenMP barriers), and in-process runs then
    use the same thread count as the subprocesses (OMP_NUM_THREADS=1), which bit-exact comparisons need."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
