"""The Test panel in a real headless Chromium: `python -m lora_trainer ui` trains the tiny SD1 model through the Train
panel, then the Test panel loads the run (default prompt from the dataset's tags, the saved file and the LoRA in
memory as snapshots), refuses bad input with a message, estimates, renders a labelled grid with its cells, saves it
beside the LoRA and offers `<lora:NAME:S>` for txt2img."""
from __future__ import annotations

import re

import pytest
from PIL import Image
from test_train_panel import _fill_run, _status, page, server, train_dataset  # noqa: F401 (fixtures)
from ui_server import fill

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect


def _message(page):
    return page.locator("#lt-te-message").first


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def test_grid_of_the_last_run_with_bad_input_estimate_and_tag(page, server, tiny_sd1, train_dataset):  # noqa: F811
    _, lora_dir, log = server
    _fill_run(page, tiny_sd1, train_dataset, name="te_lora", steps=2, samples=False)
    page.click("#lt-tr-start")
    try:
        expect(_status(page)).to_contain_text("finished", timeout=75_000)
    except AssertionError:
        pytest.fail(f"status: {_status(page).inner_text()}\n{log.read_text(errors='replace')[-3000:]}")

    page.locator("#lt-tabs button", has_text=re.compile(r"^\s*Test\s*$")).first.click()
    page.click("#lt-te-load")
    expect(_message(page)).to_contain_text("Last run te_lora: 2 snapshots")
    assert _value(page, "lt-te-prompt").startswith("square, red")      # the dataset's most frequent tags
    expect(page.locator("#lt-te-snapshots label", has_text="in memory")).to_be_visible()
    expect(page.locator("#lt-te-snapshots label", has_text="te_lora")).to_be_visible()
    expect(page.locator("#lt-te-send")).to_be_hidden()                 # no txt2img outside the WebUI
    for elem_id, text in (("lt-te-width", "32"), ("lt-te-height", "32"), ("lt-te-steps", "2")):
        fill(page, elem_id, text)

    fill(page, "lt-te-strengths", "0-1 [9]")
    fill(page, "lt-te-seeds", "1, 2, 3, 4")
    page.click("#lt-te-render")
    expect(_message(page)).to_contain_text("72 cells exceed the limit of 64")
    fill(page, "lt-te-width", "36")
    page.click("#lt-te-render")
    expect(_message(page)).to_contain_text("width: 36 is not a positive multiple of 8")
    fill(page, "lt-te-width", "32")
    fill(page, "lt-te-prompt", " ")
    page.click("#lt-te-render")
    expect(_message(page)).to_contain_text("prompt: empty")

    fill(page, "lt-te-prompt", "square, red")
    fill(page, "lt-te-strengths", "0, 1")
    fill(page, "lt-te-seeds", "5")
    page.click("#lt-te-estimate")
    expect(_message(page)).to_contain_text("Estimate: 4 cells (3 renders)", timeout=30_000)
    page.click("#lt-te-render")
    expect(_message(page)).to_contain_text("Done: 4 cells", timeout=60_000)
    expect(page.locator("#lt-te-gallery img")).to_have_count(4)
    expect(page.locator("#lt-te-grid img").first).to_be_visible()
    saved = lora_dir / "te_lora-grid-0001.png"
    assert saved.is_file() and str(saved) in _message(page).inner_text()
    assert "Strength: 1" in Image.open(saved).text["lora_trainer_grid"]
    expect(page.locator("#lt-te-tag textarea, #lt-te-tag input").first).to_have_value("<lora:te_lora:1>")

    fill(page, "lt-te-weights", "UNet only")                           # one module-weights value: every cell
    page.click("#lt-te-render")
    expect(_message(page)).to_contain_text("Done: 4 cells", timeout=60_000)
    expect(page.locator("#lt-te-gallery .caption-label", has_text="strength 1, UNet only, seed 5")).to_have_count(2)
