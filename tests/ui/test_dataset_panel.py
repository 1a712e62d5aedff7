"""The Dataset panel in a real headless Chromium: load, frequencies, filters, batch edits, undo, save, tagger,
analysis. Each test opens its own browser context, i.e. its own gradio session."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect


# --- page helpers ------------------------------------------------------------------------------------------------

def _fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text], #{elem_id} input:not([type])").first.fill(text)


def _choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a gradio Dropdown."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f"ul.options li[aria-label='{option}']").first.click()


def _radio(page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id} label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first.click()


def _md(page, elem_id: str):
    """A Markdown component (gradio 3 puts its elem_id on the block and on the text: the first holds both)."""
    return page.locator(f"#{elem_id}").first


def _status(page):
    return _md(page, "lt-ds-status")


def _close_warning(page, text: str) -> None:
    """The warning toast shows the message; close it (it sits over the top-right buttons)."""
    toast = page.locator("[data-testid=toast-body]", has_text=text).first
    expect(toast).to_be_visible()
    toast.locator("[data-testid=toast-close]").click()
    expect(toast).to_be_hidden()


def _freq_body(page):
    """The frequency table's rows (gradio 4 adds a one-row measuring table before the real one)."""
    return page.locator("#lt-ds-freq tbody").last


def _frequency(page) -> dict[str, int]:
    rows = _freq_body(page).locator("tr")
    out = {}
    for i in range(rows.count()):
        cells = rows.nth(i).locator("td").all_inner_texts()
        if cells and cells[0].strip():
            out[cells[0].strip()] = int(cells[1])
    return out


def _load(page, folder: Path) -> None:
    _fill(page, "lt-ds-folder", str(folder))
    page.click("#lt-ds-load")
    expect(_status(page)).to_contain_text("Loaded")


def _select(page, include: str, mode: str = "AND", exclude: str = "") -> None:
    _fill(page, "lt-ds-include", include)
    _fill(page, "lt-ds-exclude", exclude)
    _radio(page, "lt-ds-mode", mode)
    page.click("#lt-ds-select")
    expect(_status(page)).to_contain_text("Filter selected")


def _gallery_names(page) -> list[str]:
    return page.locator("#lt-ds-gallery .caption-label").all_inner_texts()


def _batch(page, operation: str, scope: str, tags: str, new: str = "") -> None:
    _radio(page, "lt-ds-scope", scope)
    _choose(page, "lt-ds-op", operation)
    _fill(page, "lt-ds-op-tags", tags)
    _fill(page, "lt-ds-op-new", new)
    page.click("#lt-ds-apply")


def _disk(dataset: Path) -> dict[str, bytes]:
    return {p.relative_to(dataset).with_suffix("").as_posix(): p.read_bytes() for p in sorted(dataset.glob("*/*.txt"))}


# --- tests -------------------------------------------------------------------------------------------------------

def test_load_counts_tags_and_filters_select_images(page, dataset):
    _load(page, dataset)
    expect(_md(page, "lt-ds-count")).to_contain_text("6 of 6 selected")
    expect(_freq_body(page)).to_contain_text("outdoors")
    assert _frequency(page) == {"1girl": 4, "alice": 4, "red hair": 4, "smile": 3, "1boy": 2, "bob": 2, "hat": 2,
                                "outdoors": 1}

    _select(page, "smile, hat", "AND")
    expect(_md(page, "lt-ds-count")).to_contain_text("1 of 6 selected")
    assert _gallery_names(page) == ["10_alice/a3.png"]

    _select(page, "smile, hat", "OR", exclude="bob")
    expect(_md(page, "lt-ds-count")).to_contain_text("2 of 6 selected")
    assert _gallery_names(page) == ["10_alice/a1.png", "10_alice/a3.png"]

    _fill(page, "lt-ds-search", "OUTDOOR")
    _select(page, "", "AND")
    expect(_md(page, "lt-ds-count")).to_contain_text("1 of 6 selected")
    assert _gallery_names(page) == ["10_alice/a2.png"]

    _radio(page, "lt-ds-freq-sort", "name")
    expect(_freq_body(page).locator("tr").first).to_contain_text("1boy")


def test_batch_edit_on_selection_undo_redo_and_save_with_backup(page, dataset):
    before = _disk(dataset)
    _load(page, dataset)
    _select(page, "bob")
    expect(_md(page, "lt-ds-count")).to_contain_text("2 of 6 selected")

    _batch(page, "add at front", "selection", "male focus")
    expect(_status(page)).to_contain_text("changed 2 of 2 images (selection)")
    expect(_md(page, "lt-ds-batch-status")).to_contain_text("changed 2 of 2 images (selection)")
    expect(_md(page, "lt-ds-history")).to_contain_text("1 edits to undo (last: add_tags); 2 captions not saved")
    expect(_freq_body(page)).to_contain_text("male focus")
    assert _frequency(page)["male focus"] == 2
    assert _disk(dataset) == before  # nothing written before Save

    page.click("#lt-ds-undo")
    expect(_status(page)).to_contain_text("undo add_tags")
    expect(_freq_body(page)).not_to_contain_text("male focus")
    page.click("#lt-ds-redo")
    expect(_freq_body(page)).to_contain_text("male focus")

    _batch(page, "remove", "whole dataset", "smile")
    expect(_status(page)).to_contain_text("changed 3 of 6 images (whole dataset)")

    page.click("#lt-ds-save")
    expect(_status(page)).to_contain_text("Saved 4 changed caption files")
    expect(_md(page, "lt-ds-history")).to_contain_text("all saved")
    after = _disk(dataset)
    assert after["2_bob/b1"] == b"male focus, bob, 1boy"
    assert after["2_bob/b2"] == b"male focus, bob, 1boy, hat"
    assert after["10_alice/a1"] == b"alice, 1girl, red hair"
    assert after["10_alice/a3"] == b"alice, 1girl, red hair, hat"
    assert after["10_alice/a2"] == before["10_alice/a2"] and after["10_alice/a4"] == before["10_alice/a4"]
    assert (dataset / "2_bob/.caption_backup/b1.txt").read_bytes() == before["2_bob/b1"]
    assert (dataset / "10_alice/.caption_backup/a1.txt").read_bytes() == before["10_alice/a1"]
    assert not (dataset / "10_alice/.caption_backup/a2.txt").exists()


def test_caption_edit_preview_and_save_conflict(page, dataset):
    _load(page, dataset)
    page.locator("#lt-ds-gallery button.thumbnail-item").nth(4).click()
    expect(_md(page, "lt-ds-image-name")).to_contain_text("2_bob/b1.png")
    caption = page.locator("#lt-ds-caption textarea")
    expect(caption).to_have_value("bob, 1boy, smile")

    _fill(page, "lt-ds-caption", "bob, 1boy, smile, looking at viewer")
    page.locator("#lt-ds-keep-tokens input").fill("3")  # a preview setting does not touch the caption box
    page.locator("#lt-ds-keep-tokens input").press("Enter")
    preview = page.locator("#lt-ds-preview textarea")
    expect(preview).to_have_value(re.compile(r"^bob, 1boy, smile\s"))
    page.click("#lt-ds-set-caption")
    expect(_status(page)).to_contain_text("set_caption: changed 1 of 1")
    expect(preview).to_have_value(re.compile(r"^bob, 1boy, smile, looking at viewer\s+\(seed \d+\)$"))
    seed = re.search(r"seed (\d+)", preview.input_value()).group(1)
    page.click("#lt-ds-reroll")
    expect(preview).not_to_have_value(re.compile(rf"seed {seed}\)"))

    # Someone changes the same caption on disk: Save refuses it, Overwrite writes ours.
    (dataset / "2_bob/b1.txt").write_bytes(b"bob, edited elsewhere")
    page.click("#lt-ds-save")
    expect(_status(page)).to_contain_text("NOT written")
    assert (dataset / "2_bob/b1.txt").read_bytes() == b"bob, edited elsewhere"
    page.click("#lt-ds-force")
    expect(_status(page)).to_contain_text("Saved 1 changed caption file")
    assert (dataset / "2_bob/b1.txt").read_bytes() == b"bob, 1boy, smile, looking at viewer"


def test_tagger_writes_captions_and_shows_provider(page, tmp_path, make_dataset):
    folder = make_dataset(tmp_path / "untagged", {"5_thing/red": None, "5_thing/green": None, "5_thing/blue": None})
    for name, color in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (40, 40), color).save(folder / "5_thing" / f"{name}.png")
    _fill(page, "lt-ds-folder", str(folder))
    expect(page.locator("#lt-tg-model input")).to_have_value("tiny-tagger")
    _fill(page, "lt-tg-triggers", "mytrigger")
    page.click("#lt-tg-run")
    status = _md(page, "lt-tg-status")
    expect(status).to_contain_text("Done on CPUExecutionProvider", timeout=30000)
    expect(status).to_contain_text("3 captions written")
    red = (folder / "5_thing/red.txt").read_text(encoding="utf-8")
    green = (folder / "5_thing/green.txt").read_text(encoding="utf-8")
    assert red.startswith("mytrigger, ") and "red theme" in red and "blue theme" not in red
    assert green.startswith("mytrigger, hatsune miku")
    # The written captions are loaded into the editor.
    expect(_md(page, "lt-ds-count")).to_contain_text("3 of 3 selected")
    assert _frequency(page)["mytrigger"] == 3


def test_analysis_warns_about_concept_imbalance_and_errors_are_messages(page, dataset, tmp_path):
    page.click("#lt-ds-analyze")
    expect(_status(page)).to_contain_text("nothing loaded yet")
    _close_warning(page, "nothing loaded yet")
    _fill(page, "lt-ds-folder", str(tmp_path / "missing"))
    page.click("#lt-ds-load")
    expect(_status(page)).to_contain_text("not a folder")
    _close_warning(page, "not a folder")

    _load(page, dataset)
    page.click("#lt-ds-analyze")
    analysis = _md(page, "lt-ds-analysis")
    expect(analysis).to_contain_text("outweighs 2_bob (4) by 10.0x")
    expect(analysis).to_contain_text("red hair")  # near-universal in 10_alice
    page.screenshot(path=str(tmp_path / "panel.png"), full_page=True)


def test_tagger_shows_progress_and_cancel_stops_it(page, tmp_path):
    folder = tmp_path / "many" / "1_x"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(160):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    _fill(page, "lt-ds-folder", str(folder.parent))
    _choose(page, "lt-tg-model", "wide-tagger")  # 448 px input: slow enough to cancel mid-run
    page.click("#lt-tg-run")
    status = _md(page, "lt-tg-status")
    expect(status).to_contain_text(re.compile(r"Tagging on CPUExecutionProvider: \d+/160 images, .* ETA "))
    page.click("#lt-tg-cancel")
    expect(status).to_contain_text("Cancelled on CPUExecutionProvider", timeout=30000)
    written = len(list(folder.glob("*.txt")))
    assert 0 < written < 160
    expect(status).to_contain_text(f"{written} captions written")
