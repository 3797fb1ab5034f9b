"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(autouse=True)
def fixed_peak_flops(monkeypatch):
    """MFU figures in logs depend on a measured matmul peak; tests fix it so no test pays for the measurement."""
    monkeypatch.setenv("TINYLM_PEAK_FLOPS", "1e11")


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run as fast on one thread, and a second one stalls when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
