"""Fixtures of the real-Forge tests (see host_harness.py for the environment): Forge started once per session on the
CPU with this extension and the full-size random SD1 checkpoint installed, the random SDXL checkpoint swapped in for
the SDXL tests (only with LORA_TRAINER_SDXL=1), and a tiny dataset."""
from __future__ import annotations

import pytest
from host_harness import STAMP, HostSetup, Installation, random_checkpoint, start_host, \
    write_box_dataset

FORGE = HostSetup.from_env("forge")
CHECKPOINT_TITLE = f"lt_test_sd1_{STAMP}"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return write_box_dataset(tmp_path_factory.mktemp("forge_data"))


@pytest.fixture(scope="session")
def forge(tmp_path_factory):
    if FORGE.skip_reason:
        pytest.skip(FORGE.skip_reason)
    checkpoint = random_checkpoint(tmp_path_factory.getbasetemp() / "random_models")
    install = Installation(FORGE.dir)
    server = None
    try:
        install.install_extension()
        install.link(checkpoint, FORGE.dir / "models" / "Stable-diffusion" / f"{CHECKPOINT_TITLE}.safetensors")
        log = tmp_path_factory.mktemp("forge_log") / "forge.log"
        server = start_host(FORGE, log)
        server.use_checkpoint(f"{CHECKPOINT_TITLE}.safetensors")
        server.lora_dir = FORGE.dir / "models" / "Lora"
        yield server
    finally:
        if server is not None:
            server.stop()
        for path in (FORGE.dir / "models" / "Lora").glob(f"lt_test_*_{STAMP}*"):
            path.unlink()
        install.remove()


@pytest.fixture(scope="module")
def forge_sdxl(forge, tmp_path_factory):
    """The same Forge with the random SDXL checkpoint selected (one host in memory at a time); SD1 again after."""
    title = f"lt_test_sdxl_{STAMP}"
    install = Installation(FORGE.dir)
    try:
        install.link(random_checkpoint(tmp_path_factory.getbasetemp() / "random_models", "sdxl"),
                     FORGE.dir / "models" / "Stable-diffusion" / f"{title}.safetensors")
        forge.call("/sdapi/v1/refresh-checkpoints", {})
        forge.use_checkpoint(f"{title}.safetensors")
        yield forge
    finally:
        try:  # the host may be gone (killed for memory): the link goes anyway
            forge.use_checkpoint(f"{CHECKPOINT_TITLE}.safetensors")
        finally:
            install.remove()
