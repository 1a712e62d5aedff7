"""`python -m lora_trainer tags`: edits are saved with backup and history; --undo restores the exact bytes."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

from lora_trainer.__main__ import main
from lora_trainer.cli.tags import HISTORY_FILE
from lora_trainer.tagging.caption_journal import CaptionJournal

FILES = {
    "10_cat/01.png": b"cat, rain, umbrella, blue eyes\n",
    "10_cat/02.png": b"\xef\xbb\xbfcat,rain,umbrella",
    "10_cat/03.png": b"cat, sun, blue eyes",
    "10_cat/04.png": None,
    "1_dog/05.png": b"dog, caf\xe9, blue eyes",  # not UTF-8: left alone
    "1_dog/06.png": b"dog, grass",
}


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(out, "PNG")
    return out.getvalue()


PNG = _png()


def make(root: Path) -> Path:
    for rel, data in FILES.items():
        image = root / rel
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(PNG)
        if data is not None:
            image.with_suffix(".txt").write_bytes(data)
    return root


def captions(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.txt") if ".caption_backup" not in p.parts}


def test_edit_then_undo_gives_original_bytes(tmp_path, capsys):
    root = make(tmp_path / "ds")
    original = captions(root)
    code = main(["tags", str(root), "--add", "mychar", "--front", "--remove", "blue eyes", "--replace", "rain", "storm"])
    assert code == 0
    out = capsys.readouterr().out
    assert "add_tags: 5 of 6 images changed (all), 1 non-UTF-8 captions left alone" in out
    now = captions(root)
    assert now["10_cat/01.txt"] == b"mychar, cat, storm, umbrella"
    assert now["10_cat/02.txt"] == b"\xef\xbb\xbfmychar, cat, storm, umbrella"
    assert now["10_cat/04.txt"] == b"mychar"
    assert now["1_dog/05.txt"] == original["1_dog/05.txt"]
    assert (root / "10_cat/.caption_backup/01.txt").read_bytes() == original["10_cat/01.txt"]
    assert [r.status for r in CaptionJournal.open(root).runs] == ["done"]

    assert main(["tags", str(root), "--undo"]) == 0
    assert captions(root) == original, "undo restores bytes and removes the caption the edit created"
    assert [r.status for r in CaptionJournal.open(root).runs] == ["undone"]
    assert main(["tags", str(root), "--undo"]) == 1


def test_two_runs_undo_newest_first(tmp_path):
    root = make(tmp_path / "ds")
    original = captions(root)
    assert main(["tags", str(root), "--add", "a"]) == 0
    after_first = captions(root)
    assert main(["tags", str(root), "--sort", "--dedupe"]) == 0
    assert main(["tags", str(root), "--undo"]) == 0
    assert captions(root) == after_first
    assert main(["tags", str(root), "--undo"]) == 0
    assert captions(root) == original


def test_filter_any_and_exclude_limit_the_edit(tmp_path, capsys):
    root = make(tmp_path / "ds")
    original = captions(root)
    assert main(["tags", str(root), "--filter", "sun", "grass", "--any", "--exclude", "dog", "--move-front", "sun"]) == 0
    assert "filter: 1 images selected" in capsys.readouterr().out
    now = captions(root)
    assert now["10_cat/03.txt"] == b"sun, cat, blue eyes"
    assert {k: v for k, v in now.items() if k != "10_cat/03.txt"} == {k: v for k, v in original.items() if k != "10_cat/03.txt"}


def test_dry_run_writes_nothing(tmp_path, capsys):
    root = make(tmp_path / "ds")
    original = captions(root)
    assert main(["tags", str(root), "--rename", "cat", "kitty", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 3 captions would be written" in out and "+ kitty, rain, umbrella, blue eyes" in out
    assert captions(root) == original
    assert not (root / HISTORY_FILE).exists()
    assert not (root / "10_cat/.caption_backup").exists()


def test_undo_refuses_files_changed_since_unless_forced(tmp_path, capsys):
    root = make(tmp_path / "ds")
    original = captions(root)
    assert main(["tags", str(root), "--add", "x"]) == 0
    (root / "1_dog/06.txt").write_bytes(b"hand edit")
    assert main(["tags", str(root), "--undo"]) == 1
    assert "06.txt changed since the tags run of" in capsys.readouterr().out
    assert captions(root)["10_cat/01.txt"] != original["10_cat/01.txt"], "nothing restored on conflict"
    assert main(["tags", str(root), "--undo", "--force"]) == 0
    assert captions(root) == original


def test_undo_with_edits_is_a_usage_error(tmp_path, capsys):
    root = make(tmp_path / "ds")
    assert main(["tags", str(root), "--undo", "--add", "x"]) == 2
    assert "cannot be combined" in capsys.readouterr().out


def test_report_prints_tables(tmp_path, capsys):
    root = make(tmp_path / "ds")
    (root / "10_cat/04.txt").write_bytes(b"cat")
    assert main(["tags", str(root), "--report", "--min-count", "2"]) == 0
    out = capsys.readouterr().out
    assert "tag frequency" in out and "blue eyes" in out
    assert "10_cat" in out and "outweighs 1_dog" in out
    assert "rain -> umbrella: 2 of 2 (100%)" in out
    assert "cat: 4/4  (trigger word)" in out
    assert "images left out" not in out


def test_report_names_a_corrupt_image_and_leaves_it_out_of_the_counts(tmp_path, capsys):
    root = make(tmp_path / "ds")
    broken = root / "10_cat/03.png"
    broken.write_bytes(PNG[:-20])  # truncated: the training scan skips it
    assert main(["tags", str(root), "--report"]) == 0
    out = capsys.readouterr().out
    assert "1 images left out (training skips them):" in out and f"{broken}: image data cannot be decoded" in out
    assert "tag frequency" in out and ", 5 images):" in out
    assert "10_cat                             3 images x  10 =     30" in out


def test_missing_folder_is_an_error(tmp_path, capsys):
    assert main(["tags", str(tmp_path / "nope")]) == 2
    assert "dataset folder not found" in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    root = make(tmp_path / "ds")
    proc = subprocess.run([sys.executable, "-m", "lora_trainer", "tags", str(root), "--add", "z"], check=False,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (root / "1_dog/06.txt").read_bytes() == b"dog, grass, z"


def test_undo_dry_run_lists_files_and_restores_nothing(tmp_path, capsys):
    root = make(tmp_path / "ds")
    assert main(["tags", str(root), "--add", "x", "--filter", "dog"]) == 0
    edited = captions(root)
    capsys.readouterr()
    assert main(["tags", str(root), "--undo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 captions would be restored" in out and "1_dog/06.txt" in out
    assert captions(root) == edited
