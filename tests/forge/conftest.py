"""Fixtures of the real-Forge tests (see host_harness.py for the environment): Forge started once per session on the
CPU with this extension and the full-size random SD1 checkpoint installed, a random SD2 or SDXL checkpoint swapped in
for their tests (only with LORA_TRAINER_SD2=1 / LORA_TRAINER_SDXL=1), and a tiny dataset."""
from __future__ import annotations

import pytest
from host_harness import OTHER_ARCHITECTURES, STAMP, HostSetup, Installation, checkpoint_selected, \
    random_checkpoint, start_host, write_box_dataset

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


@pytest.fixture(scope="module", params=sorted(OTHER_ARCHITECTURES))
def forge_other(request, forge, tmp_path_factory):
    """(arch, Forge) with a random SD2 or SDXL checkpoint selected, when asked for; SD1 again after."""
    with checkpoint_selected(forge, FORGE, request.param, tmp_path_factory.getbasetemp() / "random_models",
                             f"lt_test_{request.param}_{STAMP}", f"{CHECKPOINT_TITLE}.safetensors") as host:
        yield request.param, host
