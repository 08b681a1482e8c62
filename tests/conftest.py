import os

import pytest
import torch

from upcycle import arch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (and in what they start), so the
    # workers do not oversubscribe the cores and spin in each other's OpenMP barriers
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private UPCYCLE_CACHE for tests that write token caches or models."""
    path = tmp_path / "cache"
    monkeypatch.setenv("UPCYCLE_CACHE", str(path))
    return path


@pytest.fixture
def text_folder(tmp_path):
    """Ten small documents of distinct text."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " + " ".join(f"word{i}_{j}" for j in range(200)) + "\n")
    return folder


def tokens_for(model, n=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, length), generator=g)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


ALL_FAMILIES = list(arch.FAMILIES)
