"""Fixtures shared by the test modules."""

import hashlib
import os
from pathlib import Path

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


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face hub cache under tmp_path, read offline (HF_HUB_OFFLINE=1), in the layout huggingface_hub
    writes: refs/main names a commit whose snapshot links each file to a blob. Returns add(repo_type, repo_id, files)
    to fill it; it returns the snapshot directory."""
    home = tmp_path / "hf"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def add(repo_type: str, repo_id: str, files: dict[str, bytes]) -> Path:
        repo = home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        for name, data in files.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
        return snapshot

    return add
