"""The Train panel in a real headless Chromium: `python -m lora_trainer ui` (standalone host) trains the tiny SD1
model on a tiny dataset from a preset and a few edited fields, shows live status, loss and samples, writes the LoRA,
exports the fields as kohya TOML, and shows a bad dataset folder as an error in the page."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from ui_server import choose, fill, open_panel, serve_ui

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect

FINISH_TIMEOUT_MS = 75_000


@pytest.fixture(scope="module")
def train_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_panel_data")
    folder = root / "2_square"
    folder.mkdir()
    for i in range(3):
        image = Image.new("RGB", (64, 64), (30, 60, 200))
        ImageDraw.Draw(image).rectangle([5 * i, 5 * i, 30 + 5 * i, 30], fill=(220, 30, 30))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"square, red, item{i}", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def server(chromium_path, tmp_path_factory):
    """`python -m lora_trainer ui` with LoRAs going to a temp folder; one torch thread (the CI machine is small)."""
    work = tmp_path_factory.mktemp("train_panel_server")
    lora_dir, log = work / "loras", work / "server.log"
    with serve_ui(["--lora-dir", str(lora_dir)], log) as url:
        yield url, lora_dir, log


@pytest.fixture
def page(browser, server):
    with open_panel(browser, server[0], "Train", "#lt-tr-start") as page:
        yield page


# --- page helpers ------------------------------------------------------------------------------------------------

def _open(page, title: str) -> None:
    """Unfold an Accordion by its title."""
    page.get_by_text(title, exact=True).first.click()


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def _status(page):
    return page.locator("#lt-tr-status").first


def _message(page):
    return page.locator("#lt-tr-message").first


def _fill_run(page, tiny, dataset: Path, name: str = "ui_lora", steps: int = 6, samples: bool = True) -> None:
    fill(page, "lt-tr-folder", str(dataset))
    fill(page, "lt-tr-pretrained-model-name-or-path", str(tiny.checkpoint))
    fill(page, "lt-tr-output-name", name)
    fill(page, "lt-tr-network-dim", "4")
    fill(page, "lt-tr-network-alpha", "4")
    fill(page, "lt-tr-max-train-steps", str(steps))
    fill(page, "lt-tr-resolution", "64")
    fill(page, "lt-tr-train-batch-size", "1")
    fill(page, "lt-tr-seed", "3")
    _open(page, "Model files")
    fill(page, "lt-tr-diffusers-config-dir", str(tiny.config_dir))
    fill(page, "lt-tr-tokenizer-dir", str(tiny.tokenizer_dir))
    _open(page, "Precision and memory")
    choose(page, "lt-tr-mixed-precision", "no")
    _open(page, "Saving and samples")
    if samples:
        fill(page, "lt-tr-sample-every-n-steps", "3")
        fill(page, "lt-tr-sample-prompts", "square, red --w 64 --h 64 --s 3 --d 1")


def _plot_svg(page, elem_id: str) -> str | None:
    """The plot's SVG text from its own "Save as SVG" action (the page draws it on a canvas); None where the plot
    has no such action (gradio 4.38+ draws its own plots on a canvas with no action menu)."""
    if page.locator(f"#{elem_id} .vega-actions").count() == 0:
        return None
    page.locator(f"#{elem_id} details summary").first.click()
    with page.expect_download() as download:
        page.locator(f"#{elem_id} .vega-actions a", has_text="Save as SVG").first.click()
    return Path(download.value.path()).read_text(encoding="utf-8")


# --- tests -------------------------------------------------------------------------------------------------------

def test_preset_fields_export_and_train_to_a_file(page, server, tiny_sd1, train_dataset):
    _, lora_dir, log = server
    choose(page, "lt-tr-preset", "sd1_character_lora")
    expect(_message(page)).to_contain_text("sd1_character_lora")
    assert _value(page, "lt-tr-network-dim") == "32"            # the preset filled the fields
    assert _value(page, "lt-tr-optimizer-type") == "AdamW8bit"
    _fill_run(page, tiny_sd1, train_dataset)
    _open(page, "Validation")                  # one of the three images held out, validated every 3 steps
    fill(page, "lt-tr-validation-split", "0.34")
    fill(page, "lt-tr-validate-every-n-steps", "3")

    _open(page, "Import / export kohya TOML")
    page.click("#lt-tr-export")
    expect(_message(page)).to_contain_text("Exported")
    text = _value(page, "lt-tr-toml-text")
    for line in ("network_dim = 4", "max_train_steps = 6", 'output_name = "ui_lora"', "resolution = \"64,64\"",
                 'optimizer_type = "AdamW8bit"', 'mixed_precision = "no"', "sample_every_n_steps = 3",
                 f'train_data_dir = "{train_dataset}"'):
        assert line in text, f"{line!r} not in the exported TOML:\n{text}"

    page.click("#lt-tr-start")
    expect(_message(page)).to_contain_text("Started")
    try:
        expect(_status(page)).to_contain_text("finished", timeout=FINISH_TIMEOUT_MS)
    except AssertionError:
        pytest.fail(f"status: {_status(page).inner_text()}\n{log.read_text(errors='replace')[-3000:]}")
    status = _status(page).inner_text()
    assert "step 6/6" in status and re.search(r"loss \d+\.\d{4}", status), status
    assert (lora_dir / "ui_lora.safetensors").is_file()
    assert str(lora_dir / "ui_lora.safetensors") in status
    expect(page.locator("#lt-tr-samples img").first).to_be_visible()   # samples at steps 3 and 6
    expect(page.locator("#lt-tr-loss canvas, #lt-tr-loss svg").first).to_be_visible()
    legend = _plot_svg(page, "lt-tr-loss")                              # the plot as drawn, saved as SVG
    for series in (">training<", ">training (average)<", ">validation<") if legend is not None else ():
        assert series in legend, f"{series} is not a series of the loss plot"
    expect(_status(page)).to_contain_text("validation loss")
    captions = page.locator("#lt-tr-samples .caption-label")
    expect(captions).to_have_text(["step 6 · prompt 1 · strength 1", "step 3 · prompt 1 · strength 1"])
    shots = os.environ.get("LT_SCREENSHOT_DIR")
    if shots:
        page.screenshot(path=str(Path(shots) / "train_panel.png"), full_page=True)

    page.click("#lt-tr-stop")                                          # nothing runs any more: said so
    expect(_message(page)).to_contain_text("No training is running")


def test_stop_and_save_then_resume(page, server, tiny_sd1, train_dataset):
    _, lora_dir, _ = server
    _fill_run(page, tiny_sd1, train_dataset, name="resumable", steps=300, samples=False)
    page.locator("#lt-tr-save-state input[type=checkbox]").check()
    page.click("#lt-tr-start")
    expect(_status(page)).to_contain_text(re.compile(r"running \| step [1-9]\d*/300"), timeout=45_000)
    page.click("#lt-tr-stop-save")
    expect(_message(page)).to_contain_text("Stopping after this step and saving")
    expect(_status(page)).to_contain_text("stopped", timeout=30_000)
    stopped_at = int(re.search(r"step (\d+)/300", _status(page).inner_text()).group(1))
    assert (lora_dir / "resumable.safetensors").is_file()
    state = lora_dir / "resumable-state"
    assert state.is_dir()

    fill(page, "lt-tr-max-train-steps", str(stopped_at + 3))   # resume and finish 3 steps later
    fill(page, "lt-tr-resume-dir", str(state))
    page.click("#lt-tr-resume")
    expect(_message(page)).to_contain_text("Resuming")
    expect(_status(page)).to_contain_text("finished", timeout=45_000)
    assert f"step {stopped_at + 3}/{stopped_at + 3}" in _status(page).inner_text()


def test_bad_dataset_folder_shows_error(page, server, tiny_sd1, tmp_path):
    missing = tmp_path / "missing_dataset"
    fill(page, "lt-tr-folder", str(missing))
    fill(page, "lt-tr-pretrained-model-name-or-path", str(tiny_sd1.checkpoint))
    _open(page, "Model files")
    fill(page, "lt-tr-diffusers-config-dir", str(tiny_sd1.config_dir))
    fill(page, "lt-tr-tokenizer-dir", str(tiny_sd1.tokenizer_dir))
    fill(page, "lt-tr-resolution", "64")
    page.click("#lt-tr-start")
    # checked before the model loads: the error comes instead of "Started", and no job begins
    expect(_message(page)).to_contain_text("Error", timeout=30_000)
    expect(_message(page)).to_contain_text(str(missing))
    expect(_message(page)).not_to_contain_text("Started")


def test_dataset_folder_is_shared_with_the_dataset_panel(page, train_dataset):
    page.locator("#lt-tabs button", has_text=re.compile(r"^\s*Dataset\s*$")).first.click()
    fill(page, "lt-ds-folder", str(train_dataset))
    page.locator("#lt-tabs button", has_text=re.compile(r"^\s*Train\s*$")).first.click()
    expect(page.locator("#lt-tr-folder textarea, #lt-tr-folder input").first).to_have_value(str(train_dataset))
    fill(page, "lt-tr-folder", str(train_dataset / "2_square"))
    page.locator("#lt-tabs button", has_text=re.compile(r"^\s*Dataset\s*$")).first.click()
    expect(page.locator("#lt-ds-folder textarea, #lt-ds-folder input").first).to_have_value(
        str(train_dataset / "2_square"))


def test_import_toml_file_fills_the_fields(page, tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('[network_arguments]\nnetwork_dim = 12\n[saving_arguments]\noutput_name = "from_file"\n'
                    'mystery_key = 1\n', encoding="utf-8")
    _open(page, "Import / export kohya TOML")
    page.locator("#lt-tr-toml-upload input[type=file]").first.set_input_files(str(toml))
    expect(_message(page)).to_contain_text("Imported mine.toml")
    expect(_message(page)).to_contain_text("mystery_key")              # unknown keys are named, not dropped
    expect(page.locator("#lt-tr-output-name input, #lt-tr-output-name textarea").first).to_have_value("from_file")
    assert _value(page, "lt-tr-network-dim") == "12"
    assert "network_dim = 12" in _value(page, "lt-tr-toml-text")


def test_invalid_value_is_a_message_and_nothing_starts(page):
    fill(page, "lt-tr-resolution", "big")
    page.click("#lt-tr-start")
    expect(_message(page)).to_contain_text("Error")
    expect(_message(page)).to_contain_text("resolution")
