"""The Dataset panel's actions without a browser: each button's mapping onto TagEditor / tag_folder."""
from __future__ import annotations

import re
import shutil

import pytest

from lora_trainer.errors import DatasetError, TaggerError
from lora_trainer.ui import dataset_actions as actions
from lora_trainer.ui import tagger_actions

B1 = "2_bob/b1"  # "bob, 1boy, smile"


def _caption(session, key):
    editor = session.editor
    return editor.caption(f"{key}.png")


@pytest.mark.parametrize("operation, tags, new, expected", [
    ("add at end", "solo, bob", "", "bob, 1boy, smile, solo"),
    ("add at front", "solo", "", "solo, bob, 1boy, smile"),
    ("remove", "smile, 1boy", "", "bob"),
    ("replace text", "1", "one", "bob, oneboy, smile"),
    ("replace regex", r"^(\w)o", r"\1a", "bab, 1boy, smile"),
    ("rename tag", "smile", "grin", "bob, 1boy, grin"),
    ("move to front", "smile", "", "smile, bob, 1boy"),
    ("sort alphabetically", "", "", "1boy, bob, smile"),
])
def test_each_batch_operation_edits_the_selection_only(dataset, operation, tags, new, expected):
    session = actions.load(None, str(dataset))["state"]
    actions.apply_filter(session, "bob, smile", "", "AND", "", actions.ALL_FOLDERS)
    out = actions.batch(session, operation, "selection", tags, new, 0)
    assert _caption(session, B1) == expected
    assert _caption(session, "2_bob/b2") == "bob, 1boy, hat"  # not selected
    assert "of 1 images (selection)" in out["status"]
    actions.undo(session)
    assert _caption(session, B1) == "bob, 1boy, smile"


def test_scope_errors_and_whole_dataset(dataset):
    session = actions.load(None, str(dataset))["state"]
    actions.clear_selection(session)
    with pytest.raises(DatasetError, match="selection is empty"):
        actions.batch(session, "remove", "selection", "smile", "", 0)
    with pytest.raises(ValueError, match="no tags or text"):
        actions.batch(session, "remove", "whole dataset", " ", "", 0)
    out = actions.batch(session, "remove", "whole dataset", "smile", "", 0)
    assert out["status"] == "remove_tags: changed 3 of 6 images (whole dataset)."
    with pytest.raises(DatasetError, match="nothing loaded yet"):
        actions.undo(None)
    with pytest.raises(DatasetError, match="not a folder"):
        actions.load(None, str(dataset / "nope"))


def test_preview_keeps_tokens_and_rerolls_without_touching_the_caption_box(dataset):
    session = actions.load(None, str(dataset))["state"]
    session.current = 2  # 10_alice/a3: alice, 1girl, red hair, smile, hat
    out = actions.preview(session, 2, True, 0.0, False)
    assert set(out) == {"state", "preview"}
    first = out["preview"]
    assert first.startswith("alice, 1girl, ")
    assert sorted(first.split("\n")[0].split(", ")[2:]) == ["hat", "red hair", "smile"]
    assert actions.preview(session, 2, True, 0.0, False)["preview"] == first  # same seed until re-roll
    seeds = {re.search(r"seed (\d+)", actions.preview(session, 2, True, 0.0, True)["preview"]).group(1)
             for _ in range(3)}
    assert len(seeds) == 3
    dropped = actions.preview(session, 2, False, 1.0, True)["preview"]
    assert dropped.startswith("alice, 1girl\n")


def test_frequency_click_builds_the_filter():
    assert actions.add_filter_tag("", "smile") == "smile"
    assert actions.add_filter_tag("hat, smile", "smile") == "hat, smile"
    assert actions.add_filter_tag("hat", " red hair ") == "hat, red hair"


def test_tagger_options_models_and_cancel(tmp_path, tagger_dir, make_dataset):
    options = tagger_actions.build_options(0.5, 0.9, True, False, "mychar, style x", "append", "smile",
                                           ["include rating", "sort alphabetically"], "caption")
    assert (options.general_threshold, options.character_threshold, options.general_mcut) == (0.5, 0.9, True)
    assert options.trigger_tags == ("mychar", "style x") and options.exclude_tags == ("smile",)
    assert options.include_rating and not options.include_characters and not options.replace_underscores
    assert (options.sort, options.existing, options.caption_extension) == ("alpha", "append", ".caption")

    models = tmp_path / "models"
    shutil.copytree(tagger_dir / "tiny-tagger", models / "tiny-tagger")
    (models / "broken").mkdir()
    (models / "broken" / "selected_tags.csv").write_text("tag_id,name,category,count\n")
    names, note = tagger_actions.model_choices(str(models))
    assert names == ["tiny-tagger"] and "model.onnx missing" in note
    assert tagger_actions.model_choices(str(tmp_path / "none"))[0] == []

    folder = make_dataset(tmp_path / "ds", {f"1_x/img{i}": None for i in range(3)})
    with pytest.raises(TaggerError, match="no model chosen"):
        next(tagger_actions.run(None, str(folder), str(tagger_dir), "", "cpu", options, tagger_actions.TaggerCache()))
    run = tagger_actions.run(None, str(folder), str(tagger_dir), "tiny-tagger", "cpu", options,
                             tagger_actions.TaggerCache())
    first = next(run)
    session = first["state"]
    assert tagger_actions.cancel(session).startswith("Cancelling")
    last = list(run)[-1]
    assert last["tag_status"].startswith("Cancelled on **CPUExecutionProvider**")
    assert not list(folder.glob("1_x/*.txt"))
    assert tagger_actions.cancel(session) == "Nothing is running."


def test_thumbnails_are_small_cached_and_fall_back_to_the_file(tmp_path):
    from PIL import Image

    from lora_trainer.ui.thumbnails import thumbnail, thumbnails

    big = tmp_path / "big.png"
    Image.new("RGBA", (300, 200), (255, 0, 0, 0)).save(big)
    cache = tmp_path / "cache"
    cache.mkdir()
    first = thumbnail(big, 128, cache)
    with Image.open(first) as im:
        assert im.size == (128, 85) and im.getpixel((5, 5)) == (255, 255, 255)  # transparency on white
    stamp = (cache / first).stat().st_mtime_ns
    assert thumbnail(big, 128, cache) == first and (cache / first).stat().st_mtime_ns == stamp
    assert thumbnail(big, 64, cache) != first
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert thumbnail(broken, 128, cache) == str(broken)
    assert len(thumbnails([big, broken, big], 128)) == 3


def test_reload_takes_disk_changes_and_reports_conflicts(dataset):
    session = actions.load(None, str(dataset))["state"]
    session.current = 4  # 2_bob/b1
    actions.set_caption(session, "bob, edited here")
    (dataset / "2_bob/b1.txt").write_bytes(b"bob, edited on disk")
    (dataset / "2_bob/b2.txt").write_bytes(b"bob, hat, new on disk")
    out = actions.reload(session)
    assert out["status"].startswith("Reloaded: 1 captions taken from disk")
    assert "1 captions changed on disk AND edited here" in out["status"]
    assert out["caption"] == "bob, edited here" and _caption(session, "2_bob/b2") == "bob, hat, new on disk"
    out = actions.reload(session, prefer_disk=True)
    assert out["caption"] == "bob, edited on disk"
    assert actions.save(session)["status"].startswith("Saved 0 changed caption files")
