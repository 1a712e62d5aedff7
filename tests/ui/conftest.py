"""Browser tests of the Dataset panel: the standalone app on 127.0.0.1 driven by Playwright in a real headless
Chromium (Debian's /usr/bin/chromium, or CHROMIUM_PATH). Skipped, with the reason, when gradio, Playwright or
Chromium is missing (`bash dev/setup` installs them)."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Captions of the test dataset: 10_alice weighs 4 x 10 = 40, 2_bob 2 x 2 = 4 (a 10x imbalance).
CAPTIONS = {
    "10_alice/a1": "alice, 1girl, red hair, smile",
    "10_alice/a2": "alice, 1girl, red hair, outdoors",
    "10_alice/a3": "alice, 1girl, red hair, smile, hat",
    "10_alice/a4": "alice, 1girl, red hair",
    "2_bob/b1": "bob, 1boy, smile",
    "2_bob/b2": "bob, 1boy, hat",
}


def _chromium() -> str | None:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.path.exists(path) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dataset(root: Path, captions: dict[str, str] = CAPTIONS) -> Path:
    """Small PNGs with captions, one per key (``folder/name``), in a different colour each."""
    from PIL import Image

    for i, (key, caption) in enumerate(captions.items()):
        image = root / f"{key}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), (40 * i % 256, 90, 200 - 30 * i % 200)).save(image)
        if caption is not None:
            image.with_suffix(".txt").write_bytes(caption.encode("utf-8"))
    return root


@pytest.fixture(scope="session")
def chromium_path():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[ui]')")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (bash dev/setup)")
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set CHROMIUM_PATH)")
    return path


@pytest.fixture(scope="session")
def tagger_dir(tmp_path_factory):
    from lora_trainer.testing.tiny_tagger import build_tiny_tagger

    root = tmp_path_factory.mktemp("taggers")
    build_tiny_tagger(root / "tiny-tagger", size=64)
    build_tiny_tagger(root / "wide-tagger", size=448)
    return root


@pytest.fixture(scope="session")
def app_url(chromium_path, tagger_dir):
    """The standalone Dataset panel (`create_app`) served on 127.0.0.1 from a thread of this process."""
    from lora_trainer.ui import compat
    from lora_trainer.ui.dataset_panel import create_app

    app = create_app(None, str(tagger_dir))
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield f"http://127.0.0.1:{port}/"
    compat.close_now(app)


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh browser context (= a new gradio session) on the panel."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15000)
    page = context.new_page()
    page.goto(app_url)
    page.wait_for_selector("#lt-ds-load")
    yield page
    context.close()


@pytest.fixture
def make_dataset():
    """`write_dataset(root, captions)`: images + captions (None: no caption file) under root."""
    return write_dataset


@pytest.fixture
def dataset(tmp_path):
    """The CAPTIONS dataset: 10_alice (4 images) and 2_bob (2 images)."""
    return write_dataset(tmp_path / "train")
