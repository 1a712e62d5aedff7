"""Captions go only into caption files: one extension rule for the tagger, the editor, both CLIs and the scan."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.data.caption_files import JOURNAL_FILE, check_caption_extension
from lora_trainer.data.folders import scan_dataset
from lora_trainer.errors import DatasetError
from lora_trainer.tagging import TagEditor
from lora_trainer.tagging.tag_format import TagOptions
from lora_trainer.testing.tiny_tagger import build_tiny_tagger
from lora_trainer.ui.tagger_actions import build_options

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lora_trainer", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("ext", [".png", "png", ".JPG", ".gif", ".tiff", ".webp", ".jsonl", "", ".", "a/b"])
def test_the_rule_refuses_images_the_journal_and_non_extensions(ext):
    with pytest.raises(ValueError, match="--ext") as err:
        check_caption_extension(ext, "--ext")
    assert "'.txt'" in str(err.value)


@pytest.mark.parametrize("ext, expected", [(".txt", ".txt"), ("caption", ".caption"), (" .tags ", ".tags")])
def test_the_rule_accepts_text_extensions(ext, expected):
    assert check_caption_extension(ext) == expected


def test_every_entry_point_shares_the_rule(tmp_path):
    (tmp_path / "10_cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "10_cat" / "a.png")
    with pytest.raises(ValueError, match="image extension"):
        TagOptions(caption_extension="png")
    with pytest.raises(ValueError, match="image extension"):
        build_options(0.35, 0.85, False, False, "", "overwrite", "", [], caption_extension=".png")
    with pytest.raises(DatasetError, match="image extension"):
        TagEditor.load(tmp_path, ".png")
    with pytest.raises(DatasetError, match="image extension"):
        scan_dataset(tmp_path, ".png")
    with pytest.raises(ValueError, match="journal"):
        TagOptions(caption_extension=os.path.splitext(JOURNAL_FILE)[1])


def test_tag_cli_refuses_an_image_extension_before_touching_anything(tmp_path):
    model = build_tiny_tagger(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(["red", "green"]):
        Image.new("RGB", (32, 32), colour).save(data / f"{i}.png")
    before = _tree(data)
    done = _cli("tag", str(data), "--model-dir", str(model), "--ext", "png", "--existing", "overwrite")
    assert done.returncode != 0
    assert "--ext: 'png' is an image extension" in done.stderr and "'.txt'" in done.stderr
    assert "Traceback" not in done.stderr
    assert _tree(data) == before  # images untouched, no backup folder, no journal


def test_tags_cli_refuses_an_image_extension(tmp_path):
    (tmp_path / "10_cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "10_cat" / "a.png")
    before = _tree(tmp_path)
    done = _cli("tags", str(tmp_path), "--ext", ".png", "--add", "x")
    assert done.returncode != 0 and "--ext: '.png' is an image extension" in done.stdout
    assert _tree(tmp_path) == before
