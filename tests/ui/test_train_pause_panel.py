"""The Train panel's Pause and Continue buttons in a real headless Chromium (`python -m lora_trainer ui`, tiny SD1):
a running job pauses after its step, stays there, goes on with Continue, and Stop ends it."""
from __future__ import annotations

import re
import time

import pytest
from PIL import Image

from ui_server import choose, fill, open_panel, serve_ui

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect


@pytest.fixture(scope="module")
def server(chromium_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("pause_panel_server")
    with serve_ui(["--lora-dir", str(work / "loras")], work / "server.log") as url:
        yield url, work / "loras"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pause_panel_data") / "2_square"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (30 + 90 * i, 60, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"square, item{i}", encoding="utf-8")
    return folder.parent


def _step(page) -> int:
    return int(re.search(r"step (\d+)/300", page.locator("#lt-tr-status").first.inner_text()).group(1))


def test_pause_continue_and_stop_from_the_buttons(browser, server, tiny_sd1, dataset):
    with open_panel(browser, server[0], "Train", "#lt-tr-start") as page:
        status, message = page.locator("#lt-tr-status").first, page.locator("#lt-tr-message").first
        for elem_id, value in (("lt-tr-folder", dataset), ("lt-tr-pretrained-model-name-or-path", tiny_sd1.checkpoint),
                               ("lt-tr-output-name", "paused_lora"), ("lt-tr-network-dim", 2),
                               ("lt-tr-network-alpha", 2), ("lt-tr-max-train-steps", 300), ("lt-tr-resolution", 64),
                               ("lt-tr-train-batch-size", 1)):
            fill(page, elem_id, value)
        page.get_by_text("Model files", exact=True).first.click()
        fill(page, "lt-tr-diffusers-config-dir", tiny_sd1.config_dir)
        fill(page, "lt-tr-tokenizer-dir", tiny_sd1.tokenizer_dir)
        page.get_by_text("Precision and memory", exact=True).first.click()
        choose(page, "lt-tr-mixed-precision", "no")

        page.click("#lt-tr-pause")                                      # nothing runs yet: said so
        expect(message).to_contain_text("No training is running")
        page.click("#lt-tr-start")
        expect(status).to_contain_text(re.compile(r"running \| step [1-9]\d*/300"), timeout=45_000)
        page.click("#lt-tr-pause")
        expect(message).to_contain_text("Pausing after this step")
        expect(status).to_contain_text("paused after step", timeout=30_000)
        held = _step(page)
        time.sleep(2.5)                                                  # two more polls: still there
        assert _step(page) == held
        expect(status).to_contain_text(f"paused | step {held}/300")

        page.click("#lt-tr-continue")
        expect(message).to_contain_text("Continuing")
        expect(status).to_contain_text(re.compile(rf"running \| step (?!{held}/)\d+/300"), timeout=30_000)
        page.click("#lt-tr-stop")
        expect(status).to_contain_text("stopped", timeout=30_000)
        page.click("#lt-tr-continue")
        expect(message).to_contain_text("No training is paused")
