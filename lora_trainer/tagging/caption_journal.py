"""The caption journal: every caption write by the tag editor, the `tags` and `tag` commands and the Dataset panel,
recorded *before* the captions change, so any save can be undone, and an interrupted one undone or completed.

One file at the dataset root, ``.lora_trainer_tags_journal.jsonl``, one JSON record per line, appended and fsynced:

- ``intent``: a run's id, time, source and, per caption file about to change, its exact bytes before and after
  (base64; null for "no file"). Written and flushed to disk before the first of those files is touched. A run
  that writes in batches (the tagger) appends one intent per batch.
- ``commit``: the run finished (every file written, or the failures reported); ``partial`` when it was closed
  after an interruption.
- ``undone``: the run's files were put back.

A run with intents and no commit is *pending*: the save was interrupted (killed, disk full). A last line cut
short by a kill is an intent that was never flushed, so no caption of it was written; it is ignored (and cut off
before the next append). Any other unreadable line makes the journal refuse to work, naming the file and the fix,
before a caption changes. The newest `KEEP_RUNS` runs are kept.
"""
from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.atomic_io import atomic_write_bytes, fsync_dirs
from lora_trainer.data.caption_files import JOURNAL_FILE
from lora_trainer.errors import DatasetError

logger = logging.getLogger(__name__)

KEEP_RUNS = 20
PENDING, DONE, UNDONE = "pending", "done", "undone"


@dataclass(frozen=True)
class JournalFile:
    """One caption file of a run: its path relative to the dataset root (POSIX) and its exact bytes before and
    after (None: no file)."""

    path: str
    before: bytes | None
    after: bytes | None


@dataclass
class JournalRun:
    """One recorded save.

    Attributes:
        run_id (str): unique id. time (str): UTC start time, ISO format. source (str): "tags", "editor", "tag"...
        files (list[JournalFile]): every file the run meant to change, in write order.
        status (str): "pending" (interrupted), "done" or "undone".
        partial (bool): closed after an interruption without being completed.
    """

    run_id: str
    time: str
    source: str
    files: list[JournalFile] = field(default_factory=list)
    status: str = PENDING
    partial: bool = False


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text, validate=True)


def journal_path(root: str | os.PathLike) -> Path:
    """The journal file of a dataset folder.

    Args:
        root (str | PathLike): the dataset folder.

    Returns:
        Path: ``<root>/.lora_trainer_tags_journal.jsonl``.
    """
    return Path(root) / JOURNAL_FILE


class CaptionJournal:
    """The journal of one dataset folder. `CaptionJournal.open` reads and checks it."""

    def __init__(self, root: Path, runs: list[JournalRun], valid_size: int, file_size: int):
        self.root = root
        self.path = journal_path(root)
        self.runs = runs
        self._valid_size = valid_size
        self._file_size = file_size

    @classmethod
    def open(cls, root: str | os.PathLike) -> CaptionJournal:
        """Read the journal of `root` (an empty one when there is no file).

        Args:
            root (str | PathLike): the dataset folder.

        Returns:
            CaptionJournal: its runs, oldest first.

        Raises:
            DatasetError: the file cannot be read or holds a record that is not the journal's; the message names
                the file and the fix.
        """
        root = Path(root)
        path = journal_path(root)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(root, [], 0, 0)
        except OSError as err:
            raise DatasetError(f"{path}: the caption journal cannot be read ({err.strerror}). Make it readable "
                               "(check its permissions) and run again; no caption was changed.") from err
        runs, valid = _parse(path, data)
        return cls(root, runs, valid, len(data))

    def last_active(self) -> JournalRun | None:
        """The newest run not undone (what `--undo` takes back), or None."""
        return next((r for r in reversed(self.runs) if r.status != UNDONE), None)

    def pending(self) -> JournalRun | None:
        """The newest run when it was interrupted, else None."""
        last = self.last_active()
        return last if last is not None and last.status == PENDING else None

    def begin(self, source: str) -> JournalRun:
        """Start a run (nothing is written until its first `record`).

        Args:
            source (str): who writes ("tags", "editor", "tag", "panel-tagger").

        Returns:
            JournalRun: the new, empty run.
        """
        stamp = datetime.datetime.now(datetime.timezone.utc)
        run = JournalRun(f"{stamp:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", stamp.isoformat(timespec="seconds"), source)
        self.runs.append(run)
        return run

    def record(self, run: JournalRun, files: list[JournalFile]) -> None:
        """Write the intent to change `files` durably (appended and fsynced) before any of them is touched.

        Raises:
            DatasetError: the journal cannot be written; no caption of these files was changed.
        """
        if not files:
            return
        self._append({"op": "intent", "run": run.run_id, "time": run.time, "source": run.source,
                      "files": [{"path": f.path, "before": _b64(f.before), "after": _b64(f.after)} for f in files]},
                     "no caption was changed")
        run.files.extend(files)

    def commit(self, run: JournalRun, partial: bool = False) -> None:
        """Mark a run finished (`partial`: closed after an interruption); keeps the newest KEEP_RUNS runs."""
        if not run.files:
            self.runs.remove(run)
            return
        self._append({"op": "commit", "run": run.run_id, "partial": partial},
                     "the captions were written; the run stays marked as interrupted")
        run.status, run.partial = DONE, partial
        if len(self.runs) > 2 * KEEP_RUNS:
            self._compact()

    def mark_undone(self, run: JournalRun) -> None:
        """Mark a run's files as put back."""
        self._append({"op": "undone", "run": run.run_id},
                     "the captions were restored; the run still shows as the last one")
        run.status = UNDONE

    def _append(self, record: dict, consequence: str) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        created = self._file_size == 0 and not self.path.exists()
        try:
            with open(self.path, "ab") as handle:
                if self._valid_size < self._file_size:  # a line cut short by a kill: drop it before appending
                    handle.truncate(self._valid_size)
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise DatasetError(f"{self.path}: cannot write the caption journal ({err.strerror}); {consequence}. "
                               f"Free disk space or make {self.root} writable, then run again.") from err
        if created:
            fsync_dirs([self.root])
        self._valid_size = self._file_size = self._valid_size + len(line)

    def _compact(self) -> None:
        keep = self.runs[-KEEP_RUNS:]
        lines = []
        for run in keep:
            lines.append({"op": "intent", "run": run.run_id, "time": run.time, "source": run.source,
                          "files": [{"path": f.path, "before": _b64(f.before), "after": _b64(f.after)}
                                    for f in run.files]})
            if run.status != PENDING:
                lines.append({"op": "commit", "run": run.run_id, "partial": run.partial})
            if run.status == UNDONE:
                lines.append({"op": "undone", "run": run.run_id})
        data = "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines).encode("utf-8")
        try:
            atomic_write_bytes(self.path, data)
        except OSError as err:  # the long journal stays valid; trimming it can wait for the next run
            logger.warning("%s: could not trim the journal (%s)", self.path, err)
            return
        self.runs = keep
        self._valid_size = self._file_size = len(data)


def _parse(path: Path, data: bytes) -> tuple[list[JournalRun], int]:
    """Runs from the journal bytes, and the length of the valid part (a last line cut short is left out)."""
    runs: dict[str, JournalRun] = {}
    lines = data.split(b"\n")
    offset = 0
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        if last and not raw:
            break
        try:
            if last:
                raise ValueError("the line has no end")  # a kill during its append: never flushed, never used
            _apply(runs, json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
            if last:
                logger.warning("%s: ignoring a last record cut short (an interrupted write)", path)
                break
            raise DatasetError(f"{path}: line {number} is not a caption journal record ({err}). Move the file "
                               "away to start a new journal (the saves it records can then no longer be undone); "
                               "no caption was changed.") from err
        offset += len(raw) + 1
    return list(runs.values()), offset


def _apply(runs: dict[str, JournalRun], record: dict) -> None:
    op, run_id = record["op"], str(record["run"])
    if op == "intent":
        run = runs.setdefault(run_id, JournalRun(run_id, str(record["time"]), str(record["source"])))
        run.files.extend(JournalFile(str(f["path"]), _unb64(f["before"]), _unb64(f["after"])) for f in record["files"])
    elif op in ("commit", "undone") and run_id in runs:
        run = runs[run_id]
        run.status = DONE if op == "commit" else UNDONE
        run.partial = run.partial or bool(record.get("partial", False))
    else:
        raise ValueError(f"unknown record {op!r} for run {run_id!r}")


__all__ = ["DONE", "JOURNAL_FILE", "KEEP_RUNS", "PENDING", "UNDONE", "CaptionJournal", "JournalFile", "JournalRun",
           "journal_path"]
