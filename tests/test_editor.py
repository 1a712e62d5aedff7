"""TagEditor: load, filters, batch ops on selection vs all, undo/redo, save, reload, locked captions, preview."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from lora_trainer.data.captions import CaptionOptions
from lora_trainer.tagging import TagEditor, backup_path

# rel image path -> caption bytes (None: no caption file)
DATASET = {
    "10_cat/01.png": b"cat, rain, umbrella, blue eyes",
    "10_cat/02.jpg": b"\xef\xbb\xbfcat,rain ,  umbrella",  # BOM, odd spacing
    "10_cat/03.webp": b"cat, sun, blue eyes\r\nsmile\r\n",  # CRLF, two lines
    "10_cat/04.png": None,  # no caption
    "10_cat/sub/05.png": b"cat, blue eyes, cat",
    "3_dog/06.jpeg": b"dog, grass, sun",
    "3_dog/07.bmp": b"dog, caf\xe9",  # latin-1: not UTF-8
    "misc/08.png": b"tree",
}


def make_dataset(root: Path, files: dict = DATASET) -> Path:
    for rel, data in files.items():
        image = root / rel
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"")
        if data is not None:
            image.with_suffix(".txt").write_bytes(data)
    hidden = root / "10_cat" / ".caption_backup"
    hidden.mkdir(parents=True)
    (hidden / "zz.png").write_bytes(b"")  # hidden folders are skipped
    return root


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.txt") if ".caption_backup" not in p.parts}


@pytest.fixture
def root(tmp_path):
    return make_dataset(tmp_path / "ds")


@pytest.fixture
def editor(root):
    return TagEditor.load(root)


def idx(editor, rel):
    return editor.index_of(rel)


def freq_from_scratch(editor):
    counts = Counter()
    for i in range(len(editor)):
        counts.update(set(editor.tags(i)))
    return {t: n for t, n in counts.items()}


def test_load_folders_repeats_missing_and_problems(editor, root):
    assert [e.rel_path for e in editor.images] == sorted(DATASET)
    assert {k: (f.concept, f.repeats, f.is_concept, f.images) for k, f in editor.folders.items()} == {
        "10_cat": ("cat", 10, True, 5),
        "3_dog": ("dog", 3, True, 2),
        "misc": ("misc", 0, False, 1),
    }
    sub = editor.images[idx(editor, "10_cat/sub/05.png")]
    assert (sub.folder, sub.concept, sub.repeats) == ("10_cat", "cat", 10)
    assert editor.images[idx(editor, "10_cat/04.png")].caption_missing
    assert editor.caption("10_cat/04.png") == ""
    assert editor.tags("10_cat/02.jpg") == ("cat", "rain", "umbrella")
    assert editor.tags("10_cat/03.webp") == ("cat", "sun", "blue eyes", "smile")
    bad = editor.images[idx(editor, "3_dog/07.bmp")]
    assert "07.txt" in bad.problem and "UTF-8" in bad.problem
    assert any("07.txt" in p for p in editor.problems)
    assert editor.dirty() == []


def test_frequency_sorting(editor):
    by_count = editor.tag_frequency()
    assert (by_count[0].tag, by_count[0].count) == ("cat", 4)
    assert [r.count for r in by_count] == sorted((r.count for r in by_count), reverse=True)
    names = [r.tag for r in editor.tag_frequency(sort="name")]
    assert names == sorted(names, key=str.casefold)
    editor.select(["3_dog/06.jpeg"])
    assert {r.tag: r.count for r in editor.tag_frequency(scope="selection")} == {"dog": 1, "grass": 1, "sun": 1}


def test_filters_and_or_exclude_text_folder(editor):
    rels = lambda found: {editor.images[i].rel_path for i in found}
    assert rels(editor.filter(["rain", "umbrella"])) == {"10_cat/01.png", "10_cat/02.jpg"}
    assert rels(editor.filter(["rain", "grass"], mode="any")) == {"10_cat/01.png", "10_cat/02.jpg", "3_dog/06.jpeg"}
    assert rels(editor.filter(["cat"], exclude=["blue eyes"])) == {"10_cat/02.jpg"}
    assert rels(editor.filter(text="UMBRELLA")) == {"10_cat/01.png", "10_cat/02.jpg"}
    assert rels(editor.filter(folder="3_dog")) == {"3_dog/06.jpeg", "3_dog/07.bmp"}
    assert editor.select_where(include=["sun"]) == 2
    with pytest.raises(ValueError, match="mode"):
        editor.filter(["a"], mode="xor")


OPS = {
    "add": (lambda ed, scope: ed.add_tags(["trigger"], scope=scope, front=True), lambda t: t[0] == "trigger"),
    "add_end": (lambda ed, scope: ed.add_tags(["zzz"], scope=scope), lambda t: t[-1] == "zzz"),
    "remove": (lambda ed, scope: ed.remove_tags(["cat", "dog"], scope=scope), lambda t: "cat" not in t and "dog" not in t),
    "replace": (lambda ed, scope: ed.replace("blue", "green", scope=scope), lambda t: "blue eyes" not in t),
    "replace_regex": (lambda ed, scope: ed.replace(r"^(cat|dog)$", r"animal \1", scope=scope, regex=True),
                      lambda t: "cat" not in t and "dog" not in t),
    "rename": (lambda ed, scope: ed.rename_tag("sun", "sunlight", scope=scope), lambda t: "sun" not in t),
    "move_front": (lambda ed, scope: ed.move_to_front(["sun"], scope=scope), lambda t: "sun" not in t or t[0] == "sun"),
    "dedupe": (lambda ed, scope: ed.dedupe(scope=scope), lambda t: len(set(t)) == len(t)),
    "sort": (lambda ed, scope: ed.sort_tags(scope=scope), lambda t: list(t) == sorted(t, key=lambda s: (s.casefold(), s))),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_batch_op_on_selection_then_all(root, name):
    run, holds = OPS[name]
    editor = TagEditor.load(root)
    locked = idx(editor, "3_dog/07.bmp")
    before = [editor.caption(i) for i in range(len(editor))]
    chosen = {idx(editor, "10_cat/01.png"), idx(editor, "10_cat/03.webp"), idx(editor, "10_cat/sub/05.png"),
              idx(editor, "3_dog/06.jpeg"), locked}
    editor.select(chosen)
    result = run(editor, "selection")
    assert (result.scope, result.in_scope) == ("selection", len(chosen))
    assert result.skipped == (locked,)
    assert set(result.changed) <= chosen - {locked}
    for i in range(len(editor)):
        if i in result.changed:
            assert editor.caption(i) != before[i] and holds(editor.tags(i))
        else:
            assert editor.caption(i) == before[i]
    assert freq_from_scratch(editor) == {r.tag: r.count for r in editor.tag_frequency()}

    result_all = run(editor, "all")
    assert (result_all.scope, result_all.in_scope) == ("all", len(editor))
    assert not set(result_all.changed) & set(result.changed), "images already edited must not change again"
    for i in range(len(editor)):
        if i != locked:
            assert holds(editor.tags(i)), editor.caption(i)
    assert editor.caption(locked) == before[locked]
    assert result.n_changed + result_all.n_changed > 0
    assert freq_from_scratch(editor) == {r.tag: r.count for r in editor.tag_frequency()}

    for step in (result_all, result):
        if step.changed:
            assert editor.undo().changed == step.changed
    assert not editor.can_undo
    assert [editor.caption(i) for i in range(len(editor))] == before
    assert editor.dirty() == []


def test_empty_selection_and_bad_scope(editor):
    result = editor.add_tags(["x"], scope="selection")
    assert (result.in_scope, result.n_changed) == (0, 0)
    assert not editor.can_undo, "an operation that changed nothing is not a history step"
    with pytest.raises(ValueError, match="scope"):
        editor.add_tags(["x"], scope="everything")


def test_undo_redo_round_trip_exact_strings(editor):
    originals = [editor.caption(i) for i in range(len(editor))]
    editor.add_tags(["trigger"], scope="all", front=True)
    after_add = [editor.caption(i) for i in range(len(editor))]
    editor.replace("blue eyes", "", scope="all")
    editor.set_caption("misc/08.png", "tree, forest")
    assert editor.history() == ["add_tags", "replace", "set_caption"]
    while editor.can_undo:
        editor.undo()
    assert [editor.caption(i) for i in range(len(editor))] == originals
    assert editor.caption("10_cat/02.jpg") == "cat,rain ,  umbrella", "the loaded text comes back untouched"
    assert editor.redo().operation == "redo add_tags"
    assert [editor.caption(i) for i in range(len(editor))] == after_add
    editor.remove_tags(["sun"], scope="all")
    assert not editor.can_redo, "a new edit clears the redo stack"
    assert editor.undo() is not None and editor.undo() is not None and editor.undo() is None


def test_tags_back_to_original_restore_original_text(editor):
    editor.add_tags(["x"], scope="all")
    editor.remove_tags(["x"], scope="all")
    assert editor.caption("10_cat/02.jpg") == "cat,rain ,  umbrella"
    assert editor.dirty() == []


@pytest.mark.parametrize("images", [8, 60])
def test_random_edits_keep_frequency_consistent(tmp_path, images):
    """Small edits update counts in place, large ones recount: both must agree with a count from scratch."""
    rng = random.Random(images)
    vocab = ["cat", "dog", "sun", "rain", "x", "y", "blue eyes"]
    files = {f"{1 + i % 3}_c{i % 3}/{i:03d}.png": ", ".join(rng.sample(vocab, 3)).encode() for i in range(images)}
    editor = TagEditor.load(make_dataset(tmp_path / "ds", files))
    for step in range(60):
        editor.select(rng.sample(range(len(editor)), 3))
        scope = "all" if step % 5 == 0 else "selection"
        op = rng.randrange(4)
        if op == 0:
            editor.add_tags(rng.sample(vocab, 2), scope=scope, front=rng.random() < 0.5)
        elif op == 1:
            editor.remove_tags(rng.sample(vocab, 2), scope=scope)
        elif op == 2:
            editor.rename_tag(rng.choice(vocab), rng.choice(vocab), scope=scope)
        elif editor.can_undo:
            editor.undo()
        assert freq_from_scratch(editor) == {r.tag: r.count for r in editor.tag_frequency()}


def test_save_writes_only_changed_files_then_undo_gives_original_bytes(editor, root):
    original = snapshot(root)
    editor.select(editor.filter(["cat"]))
    editor.add_tags(["trigger"], scope="selection", front=True)
    editor.set_caption("10_cat/04.png", "cat, new caption")
    result = editor.save()
    assert result.ok
    assert sorted(p.relative_to(root).as_posix() for p in result.written) == [
        "10_cat/01.txt", "10_cat/02.txt", "10_cat/03.txt", "10_cat/04.txt", "10_cat/sub/05.txt"]
    now = snapshot(root)
    assert now["10_cat/02.txt"] == b"\xef\xbb\xbftrigger, cat, rain, umbrella", "a BOM file keeps its BOM"
    assert now["3_dog/06.txt"] == original["3_dog/06.txt"]
    assert editor.dirty() == [] and editor.save().written == []
    while editor.can_undo:
        editor.undo()
    result = editor.save()
    assert [p.name for p in result.removed] == ["04.txt"], "a caption the editor created goes away on undo"
    assert snapshot(root) == original
    assert backup_path(root / "10_cat/03.txt").read_bytes() == original["10_cat/03.txt"]


def test_backup_made_once_across_saves(editor, root):
    original = (root / "10_cat/01.txt").read_bytes()
    editor.add_tags(["a"], scope="all")
    editor.save()
    editor.add_tags(["b"], scope="all")
    editor.save()
    assert (root / "10_cat/01.txt").read_bytes() == b"cat, rain, umbrella, blue eyes, a, b"
    assert backup_path(root / "10_cat/01.txt").read_bytes() == original


def test_read_only_file_reported_while_rest_saves(editor, root):
    locked = root / "3_dog/06.txt"
    locked.chmod(0o444)
    try:
        editor.add_tags(["outdoors"], scope="all")
        result = editor.save()
        assert [f.path for f in result.failed] == [locked]
        assert "06.txt" in result.failed[0].message and "read-only" in result.failed[0].message
        assert not result.ok
        assert (root / "10_cat/01.txt").read_bytes().endswith(b"outdoors")
        assert locked.read_bytes() == b"dog, grass, sun"
        assert editor.dirty() == [idx(editor, "3_dog/06.jpeg")], "the failed edit stays in memory"
    finally:
        locked.chmod(0o644)
    assert editor.save().written == [locked]
    assert locked.read_bytes() == b"dog, grass, sun, outdoors"


def test_non_utf8_caption_is_locked_until_set(editor, root):
    bad = idx(editor, "3_dog/07.bmp")
    result = editor.add_tags(["x"], scope="all")
    assert bad in result.skipped and bad not in result.changed
    editor.save()
    assert (root / "3_dog/07.txt").read_bytes() == b"dog, caf\xe9"
    editor.set_caption(bad, "dog, café")
    editor.save()
    assert (root / "3_dog/07.txt").read_bytes() == "dog, café".encode()
    assert backup_path(root / "3_dog/07.txt").read_bytes() == b"dog, caf\xe9"
    assert bad in editor.add_tags(["y"], scope="all").changed, "once rewritten as UTF-8 it is editable"


def test_reload_takes_disk_changes_and_reports_conflicts(editor, root):
    editor.add_tags(["mine"], scope="all")
    editor.undo()
    editor.set_caption("10_cat/01.png", "my edit")
    (root / "10_cat/01.txt").write_bytes(b"someone else")  # edited here too: conflict
    (root / "3_dog/06.txt").write_bytes(b"dog, night")  # not edited here: taken
    result = editor.reload()
    assert result.updated == [idx(editor, "3_dog/06.jpeg")]
    assert editor.caption("3_dog/06.jpeg") == "dog, night"
    assert [(c.path.name, c.loaded_text, c.disk_text, c.editor_text) for c in result.conflicts] == [
        ("01.txt", "cat, rain, umbrella, blue eyes", "someone else", "my edit")]
    saved = editor.save()
    assert [c.path.name for c in saved.conflicts] == ["01.txt"] and saved.written == []
    assert (root / "10_cat/01.txt").read_bytes() == b"someone else"
    forced = editor.save(force=True)
    assert [p.name for p in forced.written] == ["01.txt"]
    assert (root / "10_cat/01.txt").read_bytes() == b"my edit"
    assert editor.undo().operation == "undo reload", "taking disk captions is an undoable step"


def test_reload_prefer_disk_resolves_conflicts(editor, root):
    editor.set_caption("10_cat/01.png", "my edit")
    (root / "10_cat/01.txt").write_bytes(b"theirs")
    result = editor.reload(prefer_disk=True)
    assert result.conflicts == [] and editor.caption("10_cat/01.png") == "theirs"
    assert editor.dirty() == []


def test_save_detects_external_change_without_reload(editor, root):
    editor.add_tags(["x"], scope="all")
    (root / "3_dog/06.txt").write_bytes(b"changed meanwhile")
    result = editor.save()
    assert [c.path.name for c in result.conflicts] == ["06.txt"]
    assert (root / "3_dog/06.txt").read_bytes() == b"changed meanwhile"
    assert len(result.written) == 6


def test_preview_caption_is_processed_and_reproducible(editor):
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.0)
    editor.add_tags(["trigger"], scope="all", front=True)
    image = "10_cat/01.png"
    first = editor.preview_caption(image, opts, seed=123)
    assert first == editor.preview_caption(image, opts, seed=123)
    assert first.caption.startswith("trigger, ")
    assert sorted(first.caption.split(", ")) == sorted(editor.tags(image))
    rolls = {editor.preview_caption(image, opts).caption for _ in range(30)}
    assert len(rolls) > 1, "re-rolling without a seed gives other shuffles"
    assert editor.preview_caption(image).caption == editor.caption(image)


def test_index_errors_name_the_image(editor):
    with pytest.raises(KeyError, match="nope.png"):
        editor.caption("nope.png")
    with pytest.raises(IndexError):
        editor.caption(99)


def test_other_caption_extension(tmp_path):
    root = tmp_path / "ds"
    (root / "2_a").mkdir(parents=True)
    (root / "2_a" / "1.png").write_bytes(b"")
    (root / "2_a" / "1.caption").write_bytes(b"a, b")
    (root / "2_a" / "1.txt").write_bytes(b"ignored")
    editor = TagEditor.load(root, caption_extension="caption")
    assert editor.caption(0) == "a, b"
    editor.add_tags(["c"], scope="all")
    editor.save()
    assert (root / "2_a" / "1.caption").read_bytes() == b"a, b, c"
    assert (root / "2_a" / "1.txt").read_bytes() == b"ignored"


def test_reload_reports_new_and_missing_images(editor, root):
    (root / "3_dog/09.png").write_bytes(b"")
    (root / "misc/08.png").unlink()
    result = editor.reload()
    assert result.new_images == ["3_dog/09.png"]
    assert result.missing_images == [idx(editor, "misc/08.png")]


def test_plain_str_is_one_caption_not_characters(editor, root):
    assert editor.filter("rain, umbrella") == editor.filter(["rain", "umbrella"])
    editor.add_tags("mytag", scope="all")
    assert "mytag" in editor.tags("3_dog/06.jpeg") and "m" not in editor.tags("3_dog/06.jpeg")
    assert editor.index_of(root / "3_dog" / ".." / "3_dog" / "06.jpeg") == idx(editor, "3_dog/06.jpeg")
    assert editor.plain_folders == ["misc"]


def test_images_sharing_a_caption_and_root_concept_folder(tmp_path):
    root = tmp_path / "4_solo"
    root.mkdir()
    for name in ("a.png", "a.jpg", "b.png"):
        (root / name).write_bytes(b"")
    (root / "a.txt").write_bytes(b"x")
    editor = TagEditor.load(root)
    assert [e.rel_path for e in editor.images] == ["a.jpg", "b.png"]
    assert any("a.png" in p and "shares its caption a.txt" in p for p in editor.problems)
    assert {k: (f.concept, f.repeats) for k, f in editor.folders.items()} == {".": ("solo", 4)}


def test_crash_while_saving_one_file_keeps_it_intact(editor, root, monkeypatch):
    from lora_trainer.tagging import caption_store

    real_replace = caption_store.os.replace

    def flaky_replace(src, dst):
        if str(dst).endswith("06.txt"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(caption_store.os, "replace", flaky_replace)
    editor.add_tags(["z"], scope="all")
    result = editor.save()
    monkeypatch.undo()
    assert [f.path.name for f in result.failed] == ["06.txt"] and "06.txt" in result.failed[0].message
    assert (root / "3_dog/06.txt").read_bytes() == b"dog, grass, sun"
    assert not [p for p in root.rglob("*.tmp")]
    assert (root / "misc/08.txt").read_bytes() == b"tree, z"
    assert editor.dirty() == [idx(editor, "3_dog/06.jpeg")]
    assert editor.save().written == [root / "3_dog/06.txt"]


def test_bad_regex_or_replacement_changes_nothing(editor):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        editor.replace("(", "x", scope="all", regex=True)
    with pytest.raises(ValueError, match="not a valid replacement"):
        editor.replace("(cat)", r"\2", scope="all", regex=True)
    assert not editor.can_undo and editor.dirty() == []
