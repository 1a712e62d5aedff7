"""`tag` writes through the caption journal (so `tags --undo` takes a tagging run back) and finds N_concept folders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from lora_trainer.tagging import TaggerModel, tag_folder, undo_last_run
from lora_trainer.tagging.caption_journal import CaptionJournal
from lora_trainer.testing.tiny_tagger import build_tiny_tagger

from fs_faults import fill, tmpfs

REPO = Path(__file__).resolve().parents[1]


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lora_trainer", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def _image(path: Path, colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _captions(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.txt"))
            if ".caption_backup" not in p.parts}


def test_tag_on_a_dataset_root_tags_every_concept_and_tags_undo_takes_it_back(tmp_path):
    model = build_tiny_tagger(tmp_path / "model")
    root = tmp_path / "train"
    _image(root / "10_cat" / "a.png", "red")
    _image(root / "10_cat" / "deeper" / "b.png", "green")
    _image(root / "3_dog" / "c.png", "blue")
    _image(root / "unsorted" / "d.png", "red")  # not a concept folder: kohya does not train it
    (root / "10_cat" / "a.txt").write_bytes(b"my own caption")
    before = _captions(root)

    done = _cli("tag", root, "--model-dir", model, "--existing", "overwrite")
    assert done.returncode == 0, done.stderr
    assert "holds 2 N_concept folders (10_cat, 3_dog): tagging the images in all of them" in done.stderr
    assert "tagged 3," in done.stdout and f"tags {root} --undo" in done.stdout
    after = _captions(root)
    assert set(after) == {"10_cat/a.txt", "10_cat/deeper/b.txt", "3_dog/c.txt"}
    assert after["10_cat/a.txt"] != b"my own caption"

    undo = _cli("tags", root, "--undo")
    assert undo.returncode == 0 and "restored 3 captions from the tag run" in undo.stdout
    assert _captions(root) == before, "overwritten captions come back, created ones are removed"


def test_tag_on_a_folder_without_images_says_how_to_reach_them(tmp_path):
    model = build_tiny_tagger(tmp_path / "model")
    _image(tmp_path / "photos" / "raw" / "a.png", "red")
    done = _cli("tag", tmp_path / "photos", "--model-dir", model)
    assert done.returncode == 1
    assert f"{tmp_path / 'photos'}: no images directly in this folder, 1 in its sub-folders. Add --recursive" \
        in done.stderr
    assert not (tmp_path / "photos" / "raw" / "a.txt").exists()
    assert _cli("tag", tmp_path / "photos", "--model-dir", model, "--recursive").returncode == 0
    assert (tmp_path / "photos" / "raw" / "a.txt").exists()


def test_panel_style_tagging_run_is_one_undoable_journal_run(tmp_path):
    tagger = TaggerModel(build_tiny_tagger(tmp_path / "model"))
    root = tmp_path / "train"
    for i in range(5):
        _image(root / "2_x" / f"{i}.png", ["red", "green", "blue"][i % 3])
    summary = tag_folder(root, tagger, recursive=True, batch_size=2)
    assert summary.tagged == 5 and summary.journal == root / ".lora_trainer_tags_journal.jsonl"
    runs = CaptionJournal.open(root).runs
    assert len(runs) == 1 and runs[0].source == "tag" and len(runs[0].files) == 5  # three batches, one run
    report = undo_last_run(root)
    assert report.ok and len(report.files) == 5 and _captions(root) == {}


def test_disk_full_while_tagging_stops_with_one_message_and_is_undone(tmp_path):
    model = build_tiny_tagger(tmp_path / "model")
    with tmpfs(tmp_path / "small", "2m") as disk:
        root = disk / "train"
        for i in range(40):
            _image(root / "5_x" / f"{i:02d}.png", ["red", "green", "blue"][i % 3])
        filler = fill(disk, 40 * 1024)
        done = _cli("tag", root, "--model-dir", model, "--batch-size", "4")
        assert done.returncode == 1
        assert "Traceback" not in done.stderr and "[Errno" not in done.stdout
        assert "No space left on device" in done.stdout and "captions were changed before writing stopped" in done.stdout
        assert f"python -m lora_trainer tags {root} --undo" in done.stdout
        written = _captions(root)
        assert 0 < len(written) < 40
        filler.unlink()
        undo = _cli("tags", root, "--undo")
        assert undo.returncode == 0, undo.stdout
        assert _captions(root) == {}
