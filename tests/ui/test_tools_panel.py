"""The Tools panel in a real headless Chromium: `python -m lora_trainer ui` with a Lora and a checkpoint folder
(tiny SD1 model, two tiny LoRAs). A preset is previewed and applied, two files are merged with ratios, the merged
file is picked from the refreshed list and inspected, a LoRA is baked into the checkpoint, and a bad request is
shown as an error in the page with nothing written."""
from __future__ import annotations

import os
import re
import shutil

import pytest

from lora_trainer.testing.lora_files import random_lora, tiny_targets
from lora_trainer.tools import inspect_lora

from ui_server import choose, fill, open_panel, serve_ui

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect


@pytest.fixture(scope="module")
def server(chromium_path, tiny_sd1, tmp_path_factory):
    """`python -m lora_trainer ui --lora-dir L --models-dir C` over two LoRAs and the tiny SD1 checkpoint."""
    work = tmp_path_factory.mktemp("tools_panel")
    loras, checkpoints = work / "Lora", work / "Stable-diffusion"
    loras.mkdir()
    checkpoints.mkdir()
    targets = tiny_targets(tiny_sd1)
    random_lora(targets, loras / "a.safetensors", seed=1)
    random_lora(targets, loras / "b.safetensors", seed=2, dim=2)
    shutil.copy(tiny_sd1.checkpoint, checkpoints / "base.safetensors")
    log = work / "server.log"
    with serve_ui(["--lora-dir", str(loras), "--models-dir", str(checkpoints)], log) as url:
        yield url, loras, checkpoints, log


@pytest.fixture
def page(browser, server):
    with open_panel(browser, server[0], "Tools", "#lt-tl-lbw-preview") as page:
        yield page


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def _section(page, title: str) -> None:
    page.locator("#lt-tl-tabs button", has_text=re.compile(rf"^\s*{title}\s*$")).first.click()


def _result(page):
    return page.locator("#lt-tl-result").first


def test_preset_merge_and_inspect(page, server):
    _, loras, _, _ = server
    choose(page, "lt-tl-lbw-file", "a.safetensors")
    choose(page, "lt-tl-lbw-preset", "OUTD")
    expect(page.locator("#lt-tl-lbw-weights textarea, #lt-tl-lbw-weights input").first).to_have_value("OUTD")
    page.click("#lt-tl-lbw-preview")
    expect(_result(page)).to_contain_text("preview, nothing written")
    table = _result(page).inner_text()
    assert re.search(r"OUT03\s+12\s+1", table) and re.search(r"IN01\s+12\s+0", table), table
    assert not (loras / "a_outd.safetensors").exists()
    fill(page, "lt-tl-lbw-out", "a_outd.safetensors")
    page.click("#lt-tl-lbw-run")
    expect(_result(page)).to_contain_text(": written", timeout=30_000)
    assert inspect_lora(loras / "a_outd.safetensors").keys_ok

    _section(page, "Merge")
    choose(page, "lt-tl-merge-add-file", "a.safetensors")
    fill(page, "lt-tl-merge-add-ratio", "0.7")
    page.click("#lt-tl-merge-add")
    expect(page.locator("#lt-tl-merge-list textarea")).to_have_value("a.safetensors:0.7")
    choose(page, "lt-tl-merge-add-file", "b.safetensors")
    fill(page, "lt-tl-merge-add-ratio", "-0.4")
    page.click("#lt-tl-merge-add")
    expect(page.locator("#lt-tl-merge-list textarea")).to_have_value("a.safetensors:0.7\nb.safetensors:-0.4")
    page.click("#lt-tl-merge-preview")
    expect(_result(page)).to_contain_text("exact merge of 2 sd1 LoRAs")
    assert re.search(r"Retained Frobenius norm: 1\.0000", _result(page).inner_text())
    fill(page, "lt-tl-merge-out", "merged.safetensors")
    page.click("#lt-tl-merge-run")
    expect(_result(page)).to_contain_text(": written", timeout=30_000)
    assert sorted(set(inspect_lora(loras / "merged.safetensors").ranks.values())) == [6]

    _section(page, "Inspect")   # the merged file is in the list: refreshed after the run
    choose(page, "lt-tl-inspect-file", "merged.safetensors")
    page.click("#lt-tl-inspect-run")
    expect(_result(page)).to_contain_text("sd1 lora, 264 modules", timeout=60_000)
    expect(_result(page)).to_contain_text("every key maps onto the architecture")
    shots = os.environ.get("LT_SCREENSHOT_DIR")
    if shots:
        page.screenshot(path=os.path.join(shots, "tools_panel.png"), full_page=True)


def test_bake_writes_a_checkpoint_and_errors_show_in_the_page(page, server):
    _, loras, checkpoints, _ = server
    _section(page, "Bake")
    choose(page, "lt-tl-bake-checkpoint", "base.safetensors")
    choose(page, "lt-tl-bake-add-file", "a.safetensors")
    page.click("#lt-tl-bake-add")
    # the preview reads the list as shown: wait for the added line (gradio 4 answers the add a moment later)
    expect(page.locator("#lt-tl-bake-list textarea")).to_have_value("a.safetensors:1")
    page.click("#lt-tl-bake-preview")
    expect(_result(page)).to_contain_text("(sd1, 1131 tensors")
    page.click("#lt-tl-bake-run")                       # no name for the new file
    expect(_result(page)).to_contain_text("Error: new file: no name given")
    fill(page, "lt-tl-bake-out", "baked.safetensors")
    page.click("#lt-tl-bake-run")
    expect(_result(page)).to_contain_text("weights in", timeout=60_000)
    assert (checkpoints / "baked.safetensors").is_file()
    page.click("#lt-tl-bake-run")                       # the same name again: refused, the file kept
    expect(_result(page)).to_contain_text("the file exists")
    _section(page, "Prune")
    choose(page, "lt-tl-prune-checkpoint", "baked.safetensors")  # listed after the run
    page.click("#lt-tl-prune-preview")
    expect(_result(page)).to_contain_text("keeps 1131 tensors, drops 0")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["baked.safetensors", "base.safetensors"]
