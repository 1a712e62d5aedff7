"""Caption writes through the journal (intent, then the files, then a commit), and undoing or completing a run.

Every writer of captions (the tag editor's save, the tagger) goes through `JournaledWriter`, so `tags --undo`
takes back any of them, exactly, and a save cut short by a kill or a full disk is undone or completed from what
the journal recorded before the first file changed.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.atomic_io import fsync_dirs
from lora_trainer.errors import DatasetError
from lora_trainer.tagging.caption_journal import PENDING, CaptionJournal, JournalFile, JournalRun
from lora_trainer.tagging.caption_store import write_caption_bytes

logger = logging.getLogger(__name__)

# Errors after which no further file can be written: stop at once and leave the run to undo or complete.
_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


@dataclass(frozen=True)
class CaptionChange:
    """One caption file to change: its path, exact bytes now and to write (None: no file), and the caller's key."""

    path: Path
    before: bytes | None
    after: bytes | None
    key: object = None


@dataclass
class WriteReport:
    """What `JournaledWriter.write` did.

    Attributes:
        written (list[CaptionChange]): changes now on disk.
        failed (list[tuple[CaptionChange, str]]): changes not made, with a message naming the file and the fix.
        interrupted (str | None): set when writing stopped (disk full, file system read-only): one message saying
            how many captions were changed, that the journal holds them and the command that undoes or completes it.
    """

    written: list[CaptionChange] = field(default_factory=list)
    failed: list[tuple[CaptionChange, str]] = field(default_factory=list)
    interrupted: str | None = None


def command(root: Path, flag: str) -> str:
    """The exact `tags` command line for `flag` on `root` (quoted when the path needs it)."""
    text = os.fspath(root)
    shown = f'"{text}"' if any(c in text for c in " '\"") else text
    return f"python -m lora_trainer tags {shown} {flag}"


def _os_error(err: BaseException) -> OSError | None:
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _apply(path: Path, data: bytes | None, backup: bool, dirs: set) -> None:
    if data is None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise DatasetError(f"{path}: cannot remove the caption ({err.strerror}). Delete it by hand.") from err
        dirs.add(path.parent)
    else:
        write_caption_bytes(path, data, backup=backup, dirs_to_sync=dirs)


def read_bytes(path: Path) -> bytes | None:
    """A file's bytes, None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class JournaledWriter:
    """Writes caption changes of one run: each batch's intent is recorded durably before its files change.

    Opening checks the journal first (a corrupt one stops everything before a caption changes) and closes an
    interrupted earlier run as it stands (it stays undoable with ``tags --undo``).
    """

    def __init__(self, root: str | os.PathLike, source: str, backup: bool = True):
        """Open the journal of `root` for a new run.

        Args:
            root (str | PathLike): the dataset folder; every path written must be inside it.
            source (str): who writes ("tags", "editor", "tag", "panel-tagger").
            backup (bool, optional): one-time backup of each original (caption_store). Defaults to True.

        Raises:
            DatasetError: the journal cannot be read or is corrupt (nothing was changed).
        """
        self.root = Path(root)
        self.backup = backup
        self.journal = CaptionJournal.open(self.root)
        earlier = self.journal.pending()
        if earlier is not None:
            logger.warning("%s: the save of %s was interrupted; it is kept as it stands (undo it with `%s`)",
                           self.journal.path, earlier.time, command(self.root, "--undo"))
            self.journal.commit(earlier, partial=True)
        self.run = self.journal.begin(source)
        self.planned = 0
        self.changed = 0
        self.interrupted: str | None = None

    def _rel(self, path: Path) -> str:
        rel = Path(os.path.relpath(path, self.root))
        if rel.parts and rel.parts[0] == "..":
            raise ValueError(f"{path}: not inside the dataset folder {self.root}. Save captions of that folder only.")
        return rel.as_posix()

    def write(self, changes: list[CaptionChange]) -> WriteReport:
        """Record the intent of `changes`, then write them (atomically, with the one-time backup).

        Args:
            changes (list[CaptionChange]): the files to change, in order.

        Returns:
            WriteReport: written, failed and, when writing had to stop, the message to show.

        Raises:
            DatasetError: the intent could not be recorded and no caption of this run was changed yet.
        """
        report = WriteReport()
        if self.interrupted or not changes:
            report.interrupted = self.interrupted
            return report
        try:
            self.journal.record(self.run, [JournalFile(self._rel(c.path), c.before, c.after) for c in changes])
        except DatasetError as err:
            if self.changed == 0:
                raise
            report.interrupted = self.interrupted = self._stop_message(self.journal.path, err)
            return report
        self.planned += len(changes)
        dirs: set = set()
        for change in changes:
            try:
                _apply(change.path, change.after, self.backup, dirs)
            except (DatasetError, OSError) as err:
                cause = _os_error(err)
                if cause is not None and cause.errno in _FATAL:
                    report.interrupted = self.interrupted = self._stop_message(change.path, err)
                    break
                report.failed.append((change, str(err)))
                continue
            report.written.append(change)
            self.changed += 1
        fsync_dirs(dirs)
        return report

    def _stop_message(self, path: Path, err: BaseException) -> str:
        cause = _os_error(err)
        why = cause.strerror if cause is not None and cause.strerror else str(err)
        return (f"{path}: {why}. {self.changed} of {self.planned} captions were changed before writing stopped; the "
                f"journal {self.journal.path} holds the old and new text of all {self.planned}. Free disk space "
                f"(or make the folder writable), then run `{command(self.root, '--undo')}` to put the "
                f"{self.changed} back, or `{command(self.root, '--complete')}` to write the rest.")

    def finish(self) -> None:
        """Mark the run finished unless writing was interrupted (then it stays pending: undo or complete it)."""
        if self.interrupted is None:
            self.journal.commit(self.run)


@dataclass
class RestoreReport:
    """What `undo_last_run` or `complete_last_run` did (or, with dry_run, would do).

    Attributes:
        run (JournalRun | None): the run acted on; None when there was nothing to do.
        files (list[str]): files written (or to write), relative to the dataset folder.
        conflicts (list[str]): files changed since the run (by something else); nothing is written unless forced.
        failed (list[str]): messages of files that could not be written.
        note (str): why nothing was done, when that is the case.
        interrupted (bool): the run was an interrupted one (pending) when found.
    """

    run: JournalRun | None = None
    files: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    note: str = ""
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.run is not None and not self.conflicts and not self.failed


def _restore(root: Path, journal: CaptionJournal, run: JournalRun, to_after: bool, force: bool,
             dry_run: bool) -> RestoreReport:
    report = RestoreReport(run=run, interrupted=run.status == PENDING)
    todo = []
    for f in run.files:
        target, other = (f.after, f.before) if to_after else (f.before, f.after)
        now = read_bytes(root / f.path)
        if now == target:
            continue
        if now != other:
            report.conflicts.append(f.path)
            if not force:
                continue
        todo.append((f.path, target))
    if (report.conflicts and not force) or dry_run:
        report.files = [p for p, _ in todo]
        return report
    report.conflicts = []
    dirs: set = set()
    for rel, data in todo:
        try:
            _apply(root / rel, data, to_after, dirs)
            report.files.append(rel)
        except (DatasetError, OSError) as err:
            report.failed.append(str(err))
    fsync_dirs(dirs)
    if not report.failed:
        if to_after:
            journal.commit(run)
        else:
            journal.mark_undone(run)
    return report


def undo_last_run(root: str | os.PathLike, force: bool = False, dry_run: bool = False) -> RestoreReport:
    """Put back the captions of the newest run not yet undone (an interrupted one included, and only it).

    A file already holding its old bytes is left alone, so an interrupted undo can be run again.

    Args:
        root (str | PathLike): the dataset folder.
        force (bool, optional): restore also files changed since that run by something else. Defaults to False.
        dry_run (bool, optional): only list what would be restored. Defaults to False.

    Returns:
        RestoreReport: the run, files restored, conflicts (nothing written then) and failures.

    Raises:
        DatasetError: the journal cannot be read or is corrupt.
    """
    root = Path(root)
    journal = CaptionJournal.open(root)
    run = journal.last_active()
    if run is None:
        return RestoreReport(note=f"nothing to undo: no saves recorded in {journal.path}")
    return _restore(root, journal, run, False, force, dry_run)


def complete_last_run(root: str | os.PathLike, force: bool = False, dry_run: bool = False) -> RestoreReport:
    """Write the rest of an interrupted run from the new texts the journal recorded.

    Args:
        root (str | PathLike): the dataset folder.
        force (bool, optional): write also files changed since by something else. Defaults to False.
        dry_run (bool, optional): only list what would be written. Defaults to False.

    Returns:
        RestoreReport: the run, files written, conflicts and failures; `note` when the last run is not interrupted.

    Raises:
        DatasetError: the journal cannot be read or is corrupt.
    """
    root = Path(root)
    journal = CaptionJournal.open(root)
    run = journal.last_active()
    if run is None or run.status != PENDING:
        return RestoreReport(note=f"nothing to complete: the last save recorded in {journal.path} finished")
    return _restore(root, journal, run, True, force, dry_run)


__all__ = ["CaptionChange", "JournaledWriter", "RestoreReport", "WriteReport", "command", "complete_last_run",
           "read_bytes", "undo_last_run"]
