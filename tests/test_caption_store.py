"""Atomic caption writes, one-time backups, read-only files, restore."""
from __future__ import annotations

import os
import stat

import pytest

from lora_trainer.errors import DatasetError
from lora_trainer.tagging import caption_store
from lora_trainer.tagging.caption_store import backup_path, restore_backup, write_caption, write_caption_bytes


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_new_file_is_written_without_backup(tmp_path):
    path = tmp_path / "a.txt"
    info = write_caption(path, "cat, rain")
    assert path.read_bytes() == b"cat, rain"
    assert info.created and info.backup is None
    assert not (tmp_path / caption_store.BACKUP_DIR).exists()


def test_first_overwrite_backs_up_original_bytes_once(tmp_path):
    path = tmp_path / "a.txt"
    original = b"\xef\xbb\xbfcat,  rain\r\n"
    path.write_bytes(original)
    first = write_caption(path, "cat, rain, umbrella")
    assert first.backup == tmp_path / ".caption_backup" / "a.txt"
    assert first.backup.read_bytes() == original
    second = write_caption(path, "dog")
    assert second.backup is None
    assert backup_path(path).read_bytes() == original, "the backup must keep the very first bytes"
    assert path.read_bytes() == b"dog"


def test_backup_can_be_skipped(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"old")
    write_caption(path, "new", backup=False)
    assert path.read_bytes() == b"new"
    assert not backup_path(path).exists()


def test_bom_is_written_on_request(tmp_path):
    path = tmp_path / "a.txt"
    write_caption(path, "café", bom=True)
    assert path.read_bytes() == b"\xef\xbb\xbf" + "café".encode()


def test_crash_between_temp_write_and_rename_leaves_original(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_bytes(b"original caption")

    def crash(src, dst):
        assert os.path.exists(src), "the temp file exists when the rename would happen"
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(caption_store.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_caption(path, "new caption that must not appear", backup=False)
    monkeypatch.undo()
    assert path.read_bytes() == b"original caption"
    assert _leftovers(tmp_path) == []


def test_crash_during_write_leaves_original(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_bytes(b"original caption")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(caption_store.os, "fsync", failing_fsync)
    with pytest.raises(DatasetError, match="a.txt"):
        write_caption(path, "x" * 1000, backup=False)
    monkeypatch.undo()
    assert path.read_bytes() == b"original caption"
    assert _leftovers(tmp_path) == []


def test_read_only_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_bytes(b"keep me")
    path.chmod(0o444)
    try:
        with pytest.raises(DatasetError, match=r"locked\.txt.*read-only.*chmod"):
            write_caption(path, "changed")
        assert path.read_bytes() == b"keep me"
        assert not backup_path(path).exists()
    finally:
        path.chmod(0o644)


def test_file_mode_is_kept(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"x")
    path.chmod(0o640)
    write_caption(path, "y")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_folder_in_the_way_is_refused(tmp_path):
    (tmp_path / "a.txt").mkdir()
    with pytest.raises(DatasetError, match="is a folder"):
        write_caption(tmp_path / "a.txt", "x")


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(DatasetError, match="cannot create a file"):
        write_caption(tmp_path / "nope" / "a.txt", "x")


def test_restore_backup_puts_original_back(tmp_path):
    path = tmp_path / "a.txt"
    assert restore_backup(path) is False
    path.write_bytes(b"\xff\xfeodd bytes")
    write_caption_bytes(path, b"edited")
    write_caption_bytes(path, b"edited again")
    assert restore_backup(path) is True
    assert path.read_bytes() == b"\xff\xfeodd bytes"
    assert backup_path(path).is_file()


def test_failed_backup_leaves_caption_unchanged(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"original")
    (tmp_path / caption_store.BACKUP_DIR).write_bytes(b"a file where the backup folder should be")
    with pytest.raises(DatasetError, match=r"a\.txt.*backup"):
        write_caption(path, "changed")
    assert path.read_bytes() == b"original"
    assert _leftovers(tmp_path) == []
