"""The Train panel's checkpoint dropdown in a real headless Chromium: `python -m lora_trainer ui --models-dir DIR`
lists the checkpoints of a WebUI-style models folder (subfolders too) with their architecture; picking the tiny SD1
model (no config or tokenizer folder anywhere) trains a few steps to a file."""
from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image

from ui_server import choose, fill, serve_ui

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect


@pytest.fixture(scope="module")
def models_server(chromium_path, tiny_sd1, tmp_path_factory):
    """`ui --models-dir` over a models folder: the tiny SD1 model (with its yaml) in a subfolder, and a file that is
    no model at all."""
    work = tmp_path_factory.mktemp("model_picker")
    models = work / "Stable-diffusion"
    (models / "tiny").mkdir(parents=True)
    shutil.copyfile(tiny_sd1.checkpoint, models / "tiny" / tiny_sd1.checkpoint.name)
    shutil.copyfile(tiny_sd1.yaml, models / "tiny" / tiny_sd1.yaml.name)
    (models / "notes.safetensors").write_bytes(b"not a model")
    lora_dir, log = work / "loras", work / "server.log"
    with serve_ui(["--lora-dir", str(lora_dir), "--models-dir", str(models)], log) as url:
        yield url, models, lora_dir, log


def test_pick_a_checkpoint_from_the_models_folder_and_train(browser, models_server, tmp_path):
    url, models, lora_dir, log = models_server
    data = tmp_path / "train" / "2_square"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 + 80 * i, 60, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"square, item{i}", encoding="utf-8")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15000)
    page = context.new_page()
    try:
        page.goto(url)
        page.locator("#lt-tabs button", has_text=re.compile(r"^\s*Train\s*$")).first.click()
        field = "lt-tr-pretrained-model-name-or-path"
        expect(page.locator(f"#{field}-note").first).to_contain_text("2 checkpoint(s)")
        page.locator(f"#{field} input").first.click()
        expect(page.locator("ul.options li", has_text="notes.safetensors [?]").first).to_be_visible()
        assert page.locator("ul.options li", has_text="later.safetensors").count() == 0
        page.keyboard.press("Escape")
        shutil.copyfile(models / "tiny" / "tiny_sd1.safetensors", models / "tiny" / "later.safetensors")
        page.click(f"#{field}-refresh")                              # a model added while the app runs
        expect(page.locator(f"#{field}-note").first).to_contain_text("3 checkpoint(s)")
        choose(page, field, "tiny/tiny_sd1.safetensors [SD1]")
        expect(page.locator(f"#{field}-note").first).to_contain_text("SD1")
        expect(page.locator(f"#{field}-note").first).to_contain_text("tiny_sd1.yaml")
        expect(page.locator(f"#{field} input").first).to_have_value(str(models / "tiny" / "tiny_sd1.safetensors"))

        fill(page, "lt-tr-folder", str(tmp_path / "train"))
        for key, value in (("output-name", "picked"), ("network-dim", "4"), ("max-train-steps", "3"),
                           ("resolution", "64"), ("train-batch-size", "1"), ("seed", "1")):
            fill(page, f"lt-tr-{key}", value)
        page.get_by_text("Precision and memory", exact=True).first.click()
        choose(page, "lt-tr-mixed-precision", "no")
        page.click("#lt-tr-start")
        expect(page.locator("#lt-tr-message").first).to_contain_text("Started")
        try:
            expect(page.locator("#lt-tr-status").first).to_contain_text("finished", timeout=75_000)
        except AssertionError:
            status = page.locator("#lt-tr-status").first.inner_text()
            pytest.fail(f"{status}\n{log.read_text(errors='replace')[-3000:]}")
        assert (lora_dir / "picked.safetensors").is_file()
    finally:
        context.close()
