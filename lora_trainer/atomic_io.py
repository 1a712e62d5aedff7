"""Atomic file writes: a reader sees the old file or the new one, never half of one, and never a lost file.

Data goes to a temporary file in the target's own folder (so the rename never crosses a file system), is
flushed and fsynced, then moved over the target with `os.replace`; the folder is fsynced after the rename.
A new file gets the umask's default permissions and a replaced file keeps its own.
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from lora_trainer.errors import LoraTrainerError

logger = logging.getLogger(__name__)


TEMP_SUFFIX = ".tmp"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class FileWriteError(LoraTrainerError, OSError):
    """A file could not be written; the message names it and the fix."""


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: int | None = None, dirs_to_sync: set | None = None,
                  make_folder: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; when the block ends without error, fsync it and rename it over `path`.

    Args:
        path (str | PathLike): the target file.
        mode (int, optional): permission bits; defaults to the existing file's, or the umask default.
        dirs_to_sync (set, optional): when given, the folder is added to it instead of being fsynced now, so a
            caller writing many files calls `fsync_dirs` once per folder at the end. Defaults to None.
        make_folder (bool, optional): create a missing folder, defaults to False (it must exist).

    Yields:
        BinaryIO: the open temporary file. On any error the target is unchanged and the temporary file is removed;
        a full disk, or a failure of the fsync / rename, becomes a `FileWriteError` naming the target and the fix.
    """
    path = Path(path)
    if mode is None and path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        if make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        raise FileWriteError(
            f"{path}: cannot create a file in {path.parent} ({err.strerror}). "
            f"Check that the folder exists and is writable."
        ) from err
    in_block = True
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            in_block = False
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # The caller's own failures (a source file it reads) pass unchanged; a full disk or our steps are ours.
        if isinstance(err, OSError) and not isinstance(err, FileWriteError) and (
                not in_block or err.errno in DISK_FULL):
            raise _write_error(path, err) from err
        raise
    if dirs_to_sync is None:
        _fsync_dir(path.parent)
    else:
        dirs_to_sync.add(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None,
                       dirs_to_sync: set | None = None) -> Path:
    """Write bytes to `path` atomically (see `atomic_writer`).

    Args:
        path (str | PathLike): the target file; its folder must exist.
        data (bytes): the full new content.
        mode (int, optional): permission bits; defaults to the existing file's, or the umask default.
        dirs_to_sync (set, optional): as for `atomic_writer`. Defaults to None.

    Returns:
        Path: the written file. On any error the target is unchanged and no temporary file is left behind.
    """
    with atomic_writer(path, mode, dirs_to_sync) as handle:
        handle.write(data)
    return Path(path)


def _write_error(path: Path, err: OSError) -> FileWriteError:
    if err.errno in DISK_FULL:
        fix = "Free disk space (or choose a folder on another disk) and save again"
    else:
        fix = "Check the disk and the folder's permissions, then save again"
    error = FileWriteError(f"{path}: cannot be written ({err.strerror or err}); the file on disk is unchanged. {fix}.")
    error.errno = err.errno  # callers may still test for ENOSPC; the message stays ours
    return error


def temp_files(folder: str | os.PathLike, target_prefix: str = "") -> list[Path]:
    """Temporary files `atomic_write_bytes` left in `folder` when its process was killed mid-write.

    Args:
        folder (str | PathLike): the folder to look in (a missing folder has none).
        target_prefix (str, optional): only temp files of targets whose name starts with this, defaults to all.

    Returns:
        list[Path]: the files, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{glob.escape(target_prefix)}*.????????{TEMP_SUFFIX}"
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def fsync_dirs(folders) -> None:
    """Flush folder entries (after renames) to disk; a no-op where folders cannot be fsynced (Windows).

    Args:
        folders (Iterable[Path]): folders whose renames to make durable.
    """
    for folder in folders:
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as err:
        logger.debug("cannot open %s to fsync it: %s", folder, err)
        return
    try:
        os.fsync(fd)
    except OSError as err:
        logger.debug("cannot fsync folder %s: %s", folder, err)
    finally:
        os.close(fd)
