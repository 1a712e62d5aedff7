"""Caption files written atomically, with a one-time backup of the original.

Writes go to a temporary file in the caption's own folder (so the rename never crosses a file system), are
flushed and fsynced, then moved over the target with `os.replace`: a reader sees the old caption or the new
one, never half of one. If anything fails before the rename, the temporary file is removed and the original
is untouched.

Backups: before the first overwrite of an existing caption, its original bytes are copied to
``<caption folder>/.caption_backup/<caption file name>`` (e.g. ``train/10_cat/.caption_backup/001.txt``).
An existing backup is never overwritten, so it always holds the bytes from before the first edit by this
package. The folder name starts with a dot, so dataset scans (ours and kohya's, which only look at image
files) ignore it. `restore_backup` puts those bytes back.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.atomic_io import FileWriteError
from lora_trainer.atomic_io import atomic_write_bytes as _atomic_write_bytes
from lora_trainer.errors import DatasetError

logger = logging.getLogger(__name__)

BACKUP_DIR = ".caption_backup"
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class WriteInfo:
    """What `write_caption` did.

    Attributes:
        path: the caption file written.
        created: True when the file did not exist before.
        backup: the backup made by this call (first overwrite of an existing file), else None.
    """

    path: Path
    created: bool
    backup: Path | None


def backup_path(path: str | os.PathLike) -> Path:
    """Where the one-time backup of a caption file lives.

    Args:
        path (str | PathLike): the caption file.

    Returns:
        Path: ``<folder>/.caption_backup/<name>``.
    """
    path = Path(path)
    return path.parent / BACKUP_DIR / path.name


def _check_writable(path: Path) -> os.stat_result | None:
    """Stat the target; refuse directories and read-only files (by mode bits, so it holds for root too)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise DatasetError(f"{path}: is a folder, not a caption file. Rename the folder or pick another caption extension.")
    if not st.st_mode & stat.S_IWUSR:
        raise DatasetError(
            f"{path}: caption file is read-only, so it was not changed. Make it writable "
            f"(chmod u+w, or clear the read-only attribute) and save again."
        )
    return st


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None,
                       dirs_to_sync: set | None = None) -> None:
    """`lora_trainer.atomic_io.atomic_write_bytes`, with its error reported as a dataset error naming the file."""
    try:
        _atomic_write_bytes(path, data, mode=mode, dirs_to_sync=dirs_to_sync)
    except FileWriteError as err:
        raise DatasetError(str(err)) from err


def _make_backup(path: Path, dirs_to_sync: set | None) -> Path | None:
    backup = backup_path(path)
    if backup.exists():
        return None
    original = path.read_bytes()
    try:
        backup.parent.mkdir(exist_ok=True)
    except OSError as err:
        raise DatasetError(
            f"{path}: cannot create the backup folder {backup.parent} ({err.strerror}). "
            f"Make the folder writable, or save with backup=False."
        ) from err
    atomic_write_bytes(backup, original, dirs_to_sync=dirs_to_sync)
    logger.debug("backed up %s to %s", path, backup)
    return backup


def write_caption_bytes(path: str | os.PathLike, data: bytes, backup: bool = True, *,
                        dirs_to_sync: set | None = None) -> WriteInfo:
    """Write a caption file's exact bytes atomically, after a one-time backup of the original.

    Args:
        path (str | PathLike): the caption file.
        data (bytes): the new content.
        backup (bool, optional): back up the original before its first overwrite. Defaults to True.
        dirs_to_sync (set, optional): collect folders to fsync later (see `atomic_write_bytes`). Defaults to None.

    Returns:
        WriteInfo: the path, whether it was created, and the backup made now (if any).

    Raises:
        DatasetError: the file is read-only, is a folder, or its folder cannot be written; the message names
            the file. The original is intact in every case.
    """
    path = Path(path)
    st = _check_writable(path)
    try:
        made = _make_backup(path, dirs_to_sync) if backup and st is not None else None
    except OSError as err:
        raise DatasetError(
            f"{path}: backing up the original to {backup_path(path)} failed ({err}); the caption was not changed. "
            f"Fix the cause (disk space, permissions) or save without backup."
        ) from err
    try:
        atomic_write_bytes(path, data, mode=stat.S_IMODE(st.st_mode) if st is not None else None, dirs_to_sync=dirs_to_sync)
    except DatasetError:
        raise
    except OSError as err:
        raise DatasetError(f"{path}: writing the caption failed ({err}). The original is unchanged; fix the cause and save again.") from err
    return WriteInfo(path=path, created=st is None, backup=made)


def encode_caption(text: str, bom: bool = False) -> bytes:
    """Encode caption text as UTF-8 (optionally with a BOM, to keep a file's original form).

    Args:
        text (str): the caption.
        bom (bool, optional): prefix the UTF-8 byte order mark. Defaults to False.

    Returns:
        bytes: the file content.
    """
    data = text.encode("utf-8")
    return UTF8_BOM + data if bom else data


def write_caption(path: str | os.PathLike, text: str, backup: bool = True, *, bom: bool = False) -> WriteInfo:
    """Write a caption as UTF-8, atomically, after a one-time backup of the original.

    Args:
        path (str | PathLike): the caption file, e.g. ``train/10_cat/001.txt``.
        text (str): the new caption.
        backup (bool, optional): back up the original bytes to ``.caption_backup/`` before the first
            overwrite. Defaults to True.
        bom (bool, optional): write a UTF-8 BOM (to keep a file that had one as it was). Defaults to False.

    Returns:
        WriteInfo: the path, whether it was created, and the backup made now (if any).

    Raises:
        DatasetError: read-only file, folder in the way, or unwritable folder; the message names the file.
    """
    return write_caption_bytes(path, encode_caption(text, bom), backup=backup)


def restore_backup(path: str | os.PathLike) -> bool:
    """Put the backed-up original bytes of a caption file back (atomically). The backup is kept.

    Args:
        path (str | PathLike): the caption file (not the backup).

    Returns:
        bool: True if a backup existed and was restored, False if there was none.
    """
    path = Path(path)
    backup = backup_path(path)
    if not backup.is_file():
        return False
    write_caption_bytes(path, backup.read_bytes(), backup=False)
    return True
