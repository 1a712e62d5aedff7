"""The caption journal under faults: kill -9 mid-save, a full disk, a read-only folder, a corrupt journal.

Each case runs the real `tags` command in a subprocess and checks what a user would: the exit code, the message
(naming the file, the count and the command that undoes it) and that every caption can be brought back exactly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_trainer.data.caption_files import JOURNAL_FILE
from lora_trainer.tagging import TagEditor
from lora_trainer.tagging.caption_journal import DONE, PENDING, CaptionJournal
from lora_trainer.ui import dataset_actions as actions

from fs_faults import fill, tmpfs

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def tags(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_trainer", "tags", *map(str, args)], capture_output=True,
                          text=True, env=_env(), timeout=300, check=False)


def make(root: Path, n: int, folder: str = "10_cat") -> Path:
    concept = root / folder
    concept.mkdir(parents=True)
    for i in range(n):
        (concept / f"{i:04d}.png").write_bytes(b"")
        (concept / f"{i:04d}.txt").write_bytes(f"cat, n{i}".encode())
    return root


def captions(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.txt"))
            if ".caption_backup" not in p.parts}


@pytest.fixture
def scratch(tmp_path):
    """(folder, captions to save) for the kill tests: a tmpfs where it can be mounted (fsync costs nothing there,
    so thousands of captions save in about a second), else the test folder with fewer captions."""
    path = tmp_path / "scratch"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(path)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        yield path, 300
        return
    try:
        yield path, 3000
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- kill -9 in the middle of a save ----------------------------------------------------------------------------

def _kill_mid_save(root: Path) -> None:
    """Start `tags --add b`, wait until its journal intent is on disk and its first caption changed, kill -9."""
    first = root / "10_cat" / "0000.txt"
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "tags", str(root), "--add", "b"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while b", b" not in first.read_bytes():
            assert proc.poll() is None, "the save ended before it could be killed"
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


def test_kill_during_a_save_is_undone_exactly_and_only_that_run(scratch):
    folder, n = scratch
    root = make(folder / "ds", n)
    original = captions(root)
    assert tags(root, "--add", "a").returncode == 0
    after_a = captions(root)
    _kill_mid_save(root)
    runs = CaptionJournal.open(root).runs
    assert [r.status for r in runs] == [DONE, PENDING] and len(runs[1].files) == n
    killed = captions(root)
    assert killed != after_a and sum(killed[k] != after_a[k] for k in killed) < n, "killed mid-save"

    done = tags(root, "--undo", "--force")
    assert done.returncode == 0, done.stdout
    assert "the interrupted tags run" in done.stdout
    assert captions(root) == after_a, "only the interrupted run is undone, exactly"
    assert tags(root, "--undo").returncode == 0
    assert captions(root) == original, "a later --undo takes back the earlier, completed run"
    assert tags(root, "--undo").returncode == 1


def test_kill_during_a_save_can_be_completed(scratch):
    folder, n = scratch
    root = make(folder / "ds", n)
    original = captions(root)
    _kill_mid_save(root)
    done = tags(root, "--complete")
    assert done.returncode == 0, done.stdout
    assert captions(root) == {k: v + b", b" for k, v in original.items()}
    assert tags(root, "--complete").returncode == 1  # nothing left to complete
    assert tags(root, "--undo").returncode == 0 and captions(root) == original


# --- disk full ----------------------------------------------------------------------------------------------------

def test_disk_full_mid_save_says_what_changed_and_how_to_undo(tmp_path):
    with tmpfs(tmp_path / "small", "2m") as disk:
        root = make(disk / "ds", 120)
        original = captions(root)
        new = {k: v + b", x" for k, v in original.items()}
        filler = fill(disk, 48 * 1024)  # room for the journal and some backups, not all

        done = tags(root, "--add", "x")
        assert done.returncode == 1
        assert "[Errno" not in done.stdout and "Traceback" not in done.stderr
        message = done.stdout
        assert "No space left on device" in message and "of 120 captions were changed" in message
        assert str(root / JOURNAL_FILE) in message
        assert f"python -m lora_trainer tags {root} --undo" in message
        assert f"python -m lora_trainer tags {root} --complete" in message
        now = captions(root)
        assert all(now[k] in (original[k], new[k]) for k in now), "every caption is old or new, none broken"
        assert now != original and now != new
        pending = CaptionJournal.open(root).pending()
        assert pending is not None and len(pending.files) == 120

        filler.unlink()
        assert tags(root, "--complete").returncode == 0
        assert captions(root) == new
        assert tags(root, "--undo").returncode == 0
        assert captions(root) == original


def test_disk_full_before_the_journal_changes_nothing(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as disk:
        root = make(disk / "ds", 40)
        original = captions(root)
        fill(disk, 0)
        done = tags(root, "--add", "x")
        assert done.returncode != 0
        assert f"{root / JOURNAL_FILE}: cannot write the caption journal (No space left on device)" in done.stdout
        assert "no caption was changed" in done.stdout
        assert captions(root) == original


# --- read-only folder, corrupt journal ------------------------------------------------------------------------------

def test_read_only_dataset_folder_is_refused_before_any_change(tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as disk:
        root = make(disk / "ds", 5)
        original = captions(root)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        done = tags(root, "--add", "x")
        assert done.returncode != 0
        assert f"{root / JOURNAL_FILE}: cannot write the caption journal (Read-only file system)" in done.stdout
        assert f"make {root} writable" in done.stdout
        assert captions(root) == original


def test_read_only_caption_is_reported_and_the_rest_undoable(tmp_path):
    root = make(tmp_path / "ds", 3)
    original = captions(root)
    locked = root / "10_cat" / "0001.txt"
    locked.chmod(0o444)
    done = tags(root, "--add", "x")
    assert done.returncode == 1 and f"{locked}: caption file is read-only" in done.stdout
    assert captions(root)["10_cat/0000.txt"] == b"cat, n0, x"
    assert tags(root, "--undo").returncode == 0 and captions(root) == original


def test_corrupt_journal_is_reported_before_any_caption_changes(tmp_path):
    root = make(tmp_path / "ds", 3)
    assert tags(root, "--add", "a").returncode == 0
    edited = captions(root)
    journal = root / JOURNAL_FILE
    journal.write_bytes(b"not a record\n" + journal.read_bytes())
    for args in (["--add", "b"], ["--undo"], ["--complete"]):
        done = tags(root, *args)
        assert done.returncode == 2
        assert f"{journal}: line 1 is not a caption journal record" in done.stdout
        assert "Move the file away" in done.stdout and "Traceback" not in done.stderr
        assert captions(root) == edited


def test_a_last_line_cut_short_is_ignored_and_cut_before_the_next_run(tmp_path):
    root = make(tmp_path / "ds", 3)
    original = captions(root)
    assert tags(root, "--add", "a").returncode == 0
    journal = root / JOURNAL_FILE
    with open(journal, "ab") as handle:
        handle.write(b'{"op":"intent","run":"x","files":[{"pa')  # a kill during an append
    assert tags(root, "--add", "b").returncode == 0
    assert [r.status for r in CaptionJournal.open(root).runs] == [DONE, DONE]
    assert tags(root, "--undo").returncode == 0 and tags(root, "--undo").returncode == 0
    assert captions(root) == original


def test_unreadable_journal_names_the_file(tmp_path):
    root = make(tmp_path / "ds", 2)
    (root / JOURNAL_FILE).mkdir()  # unreadable as a file, for root too
    done = tags(root, "--add", "x")
    assert done.returncode == 2 and f"{root / JOURNAL_FILE}: the caption journal cannot be read" in done.stdout


# --- the panel and the CLI share the journal -----------------------------------------------------------------------

def test_panel_save_is_undone_by_tags_undo_and_panel_undo_still_works(tmp_path):
    root = make(tmp_path / "ds", 4)
    original = captions(root)
    session = actions.load(None, str(root))["state"]
    actions.batch(session, "add at front", "whole dataset", "mychar", "", 0)
    out = actions.save(session)
    assert "Saved 4 changed caption files." in out["status"]
    assert tags(root, "--undo").returncode == 0 and captions(root) == original
    actions.reload(session)  # takes the restored captions in, as an undoable step
    assert session.editor.caption(0) == "cat, n0"
    actions.undo(session)
    assert session.editor.caption(0) == "mychar, cat, n0"
    actions.redo(session)
    assert session.editor.caption(0) == "cat, n0"


def test_editor_save_after_an_interrupted_one_keeps_both_undoable(scratch):
    folder, n = scratch
    root = make(folder / "ds", n)
    original = captions(root)
    _kill_mid_save(root)
    killed = captions(root)
    editor = TagEditor.load(root)
    editor.add_tags(["c"], scope="all")
    assert editor.save().ok
    runs = CaptionJournal.open(root).runs
    assert [(r.status, r.partial) for r in runs] == [(DONE, True), (DONE, False)]
    assert tags(root, "--undo").returncode == 0 and captions(root) == killed
    assert tags(root, "--undo").returncode == 0 and captions(root) == original


def test_the_journal_keeps_the_newest_runs_and_stays_undoable(tmp_path):
    from lora_trainer.tagging.caption_journal import KEEP_RUNS
    from lora_trainer.tagging.journaled_writes import CaptionChange, JournaledWriter, undo_last_run

    caption = tmp_path / "10_cat" / "a.txt"
    caption.parent.mkdir()
    caption.write_bytes(b"v0")
    for i in range(1, 2 * KEEP_RUNS + 2):
        writer = JournaledWriter(tmp_path, "test", backup=False)
        writer.write([CaptionChange(caption, f"v{i - 1}".encode(), f"v{i}".encode())])
        writer.finish()
    runs = CaptionJournal.open(tmp_path).runs
    assert len(runs) <= 2 * KEEP_RUNS and runs[-1].files[0].after == f"v{2 * KEEP_RUNS + 1}".encode()
    for _ in range(3):
        assert undo_last_run(tmp_path).ok
    assert caption.read_bytes() == f"v{2 * KEEP_RUNS - 2}".encode()
