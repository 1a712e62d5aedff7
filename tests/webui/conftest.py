"""Fixtures of the real-WebUI tests (see webui_harness.py for the environment): the tiny SD1 and SDXL checkpoints, a
tiny dataset, and one WebUI for the whole session with both checkpoints and this extension installed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from webui_harness import STAMP, Installation, WebUI, install_requirements, start_webui, webui_python

A1111_DIR = os.environ.get("A1111_DIR")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from lora_trainer.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("webui_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("sd1", "sdxl")}


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("webui_data") / "2_box"
    folder.mkdir()
    for i in range(3):
        image = Image.new("RGB", (64, 64), (20, 90, 180))
        ImageDraw.Draw(image).rectangle([8 * i, 8, 8 * i + 30, 38], fill=(230, 40, 20))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"box, red, item{i}", encoding="utf-8")
    return folder.parent


@pytest.fixture(scope="session")
def webui(tiny, tmp_path_factory):
    a1111 = Path(A1111_DIR)
    python = webui_python(a1111)
    install = Installation(a1111)
    titles = {}
    try:
        install.install_extension()
        titles = {arch: install.install_checkpoint(model, f"lt_test_{arch}_{STAMP}") for arch, model in tiny.items()}
        install.install_openclip_preload(Path(tiny["sdxl"].yaml).parent)
        print(install_requirements(python))
        if os.environ.get("A1111_URL"):
            server = WebUI(os.environ["A1111_URL"], Path(os.environ["A1111_LOG"]))
            server.call("/sdapi/v1/refresh-checkpoints", {})
        else:
            log = tmp_path_factory.mktemp("webui_log") / "webui.log"
            server = start_webui(a1111, python, log, titles["sd1"])
        server.titles = titles
        server.installation = install
        yield server
        server.stop()
    finally:
        for path in (a1111 / "models" / "Lora").glob(f"lt_test_*_{STAMP}*"):  # every run's files (LoHa, LoKr too)
            path.unlink()
        install.remove()
