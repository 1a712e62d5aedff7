"""Misleading or silent dataset cases: symbolic link loops, a non-UTF-8 tag list, animated GIFs, corrupt images
in the report. Each is either handled the same way by the scan, the tagger, the editor and training, or named."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.data.folders import scan_dataset
from lora_trainer.data.images import load_image
from lora_trainer.errors import TaggerError
from lora_trainer.tagging import TagEditor, TaggerModel, TagOptions, tag_folder
from lora_trainer.tagging.tagger_models import read_labels
from lora_trainer.testing.tiny_tagger import build_tiny_tagger
from lora_trainer.ui import dataset_actions as actions

REPO = Path(__file__).resolve().parents[1]


def _tags(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lora_trainer", "tags", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def _png(path: Path, colour="white") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def _animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def test_symlink_loops_are_named_and_skipped_not_a_bare_errno(tmp_path):
    concept = tmp_path / "10_cat"
    _png(concept / "a.png")
    (concept / "a.txt").write_text("cat")
    os.symlink("loop.png", concept / "loop.png")  # a link to itself
    os.symlink("..", concept / "up")  # a folder link back to the dataset root
    done = _tags(tmp_path, "--add", "x")
    assert done.returncode == 0, done.stdout
    assert "[Errno" not in done.stdout
    assert f"{concept / 'loop.png'}: cannot be followed (Too many levels of symbolic links); skipped" in done.stdout
    assert f"{concept / 'up'}: links back to the folder {tmp_path.resolve()} above it; skipped" in done.stdout
    assert "1 images in 1 folders" in done.stdout, "the looped folder is not scanned again and again"
    assert (concept / "a.txt").read_text() == "cat, x"
    index = scan_dataset(tmp_path)  # training: the same image, the looping link named
    assert [Path(i.path).name for i in index.items] == ["a.png"]
    assert any("loop.png: symbolic link to no readable file" in p for p in index.problems)


def test_non_utf8_tag_list_names_the_file_and_the_fix(tmp_path):
    folder = build_tiny_tagger(tmp_path / "model")
    csv_path = folder / "selected_tags.csv"
    csv_path.write_bytes(csv_path.read_bytes().replace(b"red", "r\xe9d".encode("latin-1")))
    with pytest.raises(TaggerError) as err:
        read_labels(csv_path)
    assert str(err.value).startswith(f"{csv_path}: not UTF-8 text (byte 0xe9")
    assert "re-save this one as UTF-8" in str(err.value)
    with pytest.raises(TaggerError, match="selected_tags.csv: not UTF-8"):
        TaggerModel(folder)


def test_animated_gif_is_used_by_its_first_frame_everywhere_and_said_so(tmp_path):
    concept = tmp_path / "10_cat"
    concept.mkdir()
    gif = _animated_gif(concept / "anim.gif")
    (concept / "anim.txt").write_text("cat, dancing")
    _png(concept / "still.png")

    index = scan_dataset(tmp_path)  # training
    assert sorted(Path(i.path).name for i in index.items) == ["anim.gif", "still.png"]
    assert [i.caption for i in index.items if i.path.endswith(".gif")] == ["cat, dancing"]
    assert any(f"{gif}: animated (3 frames); only its first frame is trained" in p for p in index.problems)
    first = np.asarray(load_image(gif))
    with Image.open(gif) as im:
        assert np.array_equal(first, np.asarray(im.convert("RGB")))  # frame 0

    editor = TagEditor.load(tmp_path)  # the editor
    assert editor.caption("10_cat/anim.gif") == "cat, dancing"

    model = TaggerModel(build_tiny_tagger(tmp_path / ".model"))
    summary = tag_folder(tmp_path, model, TagOptions(existing="overwrite"), recursive=True)
    assert summary.tagged == 2 and not summary.failed  # the tagger takes the GIF too
    assert (concept / "anim.txt").read_text() != "cat, dancing" and (concept / "still.txt").exists()


def test_panel_analysis_names_a_corrupt_image_and_leaves_it_out(tmp_path):
    concept = tmp_path / "10_cat"
    for name in ("a", "b", "c"):
        _png(concept / f"{name}.png")
        (concept / f"{name}.txt").write_text("cat, red")
    data = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(data, "JPEG")
    broken = concept / "d.jpg"
    broken.write_bytes(data.getvalue()[:200])  # header fine, data cut: the training scan skips it
    (concept / "d.txt").write_text("cat, red")

    session = actions.load(None, str(tmp_path))["state"]
    text = actions.analysis(session)["analysis"]
    assert "**1 images left out**" in text and f"- {broken}: " in text
    training = scan_dataset(tmp_path)
    assert len(training.items) == 3
    assert session.editor.records(usable_only=True) and len(session.editor.records(usable_only=True)) == 3
