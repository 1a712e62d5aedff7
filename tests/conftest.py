"""Shared fixtures. Tiny real-architecture models are built once per session (see lora_trainer/testing)."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def single_thread():
    """One torch thread: bit-exact comparisons need it (oneDNN's conv backward is not deterministic with two), and
    on a shared 2-core machine two OpenMP threads make tiny models slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


def _tiny(arch, root):
    from lora_trainer.testing.tiny_models import build_tiny_model

    return build_tiny_model(arch, root / arch, seed=0)


@pytest.fixture(scope="session")
def tiny_sd1(tiny_models_dir):
    return _tiny("sd1", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_sd2(tiny_models_dir):
    return _tiny("sd2", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models_dir):
    return _tiny("sdxl", tiny_models_dir)
