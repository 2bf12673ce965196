import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by bench/run_gpu.sh on the GPU machine)")
    config.addinivalue_line("markers", "tensorrt: needs TensorRT (or TensorRT for RTX) installed")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _few_threads():
    # One torch thread per test: on a shared 2-core machine more threads spin-wait and run 10x slower.
    torch.set_num_threads(int(os.environ.get("OSTNET_TEST_THREADS", "1")))
    yield


def requires_triton_run():
    """Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1."""
    from ostnet_fast.kernels._dispatch import interpreting, triton_available
    ok = triton_available() and (torch.cuda.is_available() or interpreting())
    return pytest.mark.skipif(not ok, reason="Triton needs CUDA or TRITON_INTERPRET=1")
