"""Saving and reloading the tag editor's captions: what is on disk, conflicts, exact original bytes."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.tagging.caption_store import encode_caption
from lora_trainer.tagging.editor_io import ImageEntry, LoadedCaption, read_caption_exact
from lora_trainer.tagging.journaled_writes import CaptionChange, JournaledWriter

logger = logging.getLogger(__name__)


@dataclass
class DiskState:
    """Per image: the caption as last read or written (text, bytes or None for no file, problem), and the
    bytes and BOM flag of the very first load (to write originals back exactly)."""

    text: list[str]
    data: list[bytes | None]
    problem: list[str | None]
    orig_data: list[bytes | None]
    orig_bom: list[bool]

    @classmethod
    def from_loaded(cls, loaded: list[LoadedCaption]) -> DiskState:
        return cls(
            text=[c.text for c in loaded],
            data=[c.data for c in loaded],
            problem=[c.problem for c in loaded],
            orig_data=[c.data for c in loaded],
            orig_bom=[c.bom for c in loaded],
        )


@dataclass(frozen=True)
class Conflict:
    """A caption changed on disk since it was loaded while it was also edited here.

    Attributes:
        index: the image index.
        path: the caption file.
        loaded_text: the caption when it was loaded (or last saved).
        disk_text: the caption on disk now ("" if the file is gone).
        editor_text: the caption in the editor.
    """

    index: int
    path: Path
    loaded_text: str
    disk_text: str
    editor_text: str


@dataclass(frozen=True)
class SaveFailure:
    """A caption that could not be written; its edit stays in memory. `message` names the file and the fix."""

    index: int
    path: Path
    message: str


@dataclass
class SaveResult:
    """What `TagEditor.save` did.

    Attributes:
        written: caption files written.
        removed: caption files deleted because an edit returned a caption that had no file to "no caption".
        failed: files that could not be written (edits kept in memory).
        conflicts: files changed on disk since load, not written (save with force=True to overwrite).
        written_indices: image indices of `written` and `removed`.
        interrupted: None, or the message of a save that had to stop (disk full): how many captions changed, that
            the journal holds them, and the command that undoes or completes it.
        run_id: the journal run that recorded this save (None when nothing was written).
    """

    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    failed: list[SaveFailure] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    written_indices: list[int] = field(default_factory=list)
    interrupted: str | None = None
    run_id: str | None = None

    @property
    def ok(self) -> bool:
        """True when every changed caption was written."""
        return not self.failed and not self.conflicts and self.interrupted is None


@dataclass
class ReloadResult:
    """What `TagEditor.reload` did.

    Attributes:
        taken: (index, text) of captions taken from disk (changed there, not edited here).
        conflicts: captions changed on disk and edited here; the edit is kept.
        new_images: images found on disk that were not loaded (relative paths; load again to edit them).
        missing_images: indices of loaded images whose image file is gone.
    """

    taken: list[tuple[int, str]] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    new_images: list[str] = field(default_factory=list)
    missing_images: list[int] = field(default_factory=list)

    @property
    def updated(self) -> list[int]:
        """Indices of the images whose caption was taken from disk."""
        return [i for i, _ in self.taken]


def _conflict(i: int, entry: ImageEntry, disk: DiskState, now: LoadedCaption, editor_text: str) -> Conflict:
    return Conflict(i, entry.caption_path, disk.text[i], now.text, editor_text)


def _planned_bytes(i: int, text: str, orig_text: str, disk: DiskState) -> bytes | None:
    """What to write for image i: its original bytes when the text is back to the loaded one (None when it had no
    caption file and the text is empty: the file this editor created is removed), else the encoded text."""
    if text == orig_text:
        if disk.orig_data[i] is not None:
            return disk.orig_data[i]
        if text == "":
            return None
    return encode_caption(text, disk.orig_bom[i])


def save_captions(root: Path, entries: list[ImageEntry], disk: DiskState, texts: list[str],
                  orig_texts: tuple[str, ...], dirty: list[int], force: bool, backup: bool,
                  source: str = "editor") -> SaveResult:
    """Write the dirty captions through the caption journal; see `TagEditor.save`.

    The old and new bytes of every file about to change are recorded in the journal first, then the files are
    written, then the run is committed: a save cut short (kill, disk full) can be undone or completed with
    ``tags --undo`` / ``tags --complete``.

    Args:
        root (Path): the dataset folder (where the journal lives).
        entries (list[ImageEntry]): the images.
        disk (DiskState): what is on disk; updated for every file written.
        texts (list[str]): current captions.
        orig_texts (tuple[str, ...]): captions as first loaded (written back as their original bytes).
        dirty (list[int]): indices to write.
        force (bool): overwrite files changed on disk since load.
        backup (bool): one-time backup of originals.
        source (str, optional): the writer's name in the journal. Defaults to "editor".

    Returns:
        SaveResult: written, removed, failed and conflicting files; `interrupted` when writing had to stop.

    Raises:
        DatasetError: the journal is unreadable or cannot be written (no caption was changed).
    """
    result, plan = SaveResult(), []
    for i in dirty:
        entry = entries[i]
        now = read_caption_exact(entry.caption_path)
        if not force and now.data != disk.data[i]:
            result.conflicts.append(_conflict(i, entry, disk, now, texts[i]))
            continue
        after = _planned_bytes(i, texts[i], orig_texts[i], disk)
        if after == now.data and now.problem is None:
            disk.data[i], disk.text[i], disk.problem[i] = after, texts[i], None  # already on disk
            result.written_indices.append(i)
            continue
        plan.append(CaptionChange(entry.caption_path, now.data, after, i))
    if plan:
        writer = JournaledWriter(root, source, backup)
        report = writer.write(plan)
        writer.finish()
        for change in report.written:
            i = change.key
            (result.removed if change.after is None else result.written).append(change.path)
            result.written_indices.append(i)
            disk.data[i], disk.text[i], disk.problem[i] = change.after, texts[i], None
        for change, message in report.failed:
            logger.error("%s", message)
            result.failed.append(SaveFailure(change.key, change.path, message))
        result.interrupted = report.interrupted
        result.run_id = writer.run.run_id if report.written else None
    if result.conflicts:
        logger.warning("%d captions changed on disk since load were not saved: reload, or save with force", len(result.conflicts))
    return result


def reload_captions(entries: list[ImageEntry], disk: DiskState, texts: list[str], prefer_disk: bool) -> ReloadResult:
    """Compare every caption on disk with what was loaded; see `TagEditor.reload`.

    Args:
        entries (list[ImageEntry]): the images.
        disk (DiskState): what was loaded; updated for captions taken from disk.
        texts (list[str]): current captions (not changed here).
        prefer_disk (bool): take the disk caption also where it was edited here.

    Returns:
        ReloadResult: captions to take from disk and conflicts.
    """
    result = ReloadResult()
    for i, entry in enumerate(entries):
        now = read_caption_exact(entry.caption_path)
        if now.data == disk.data[i]:
            continue
        edited = texts[i] != disk.text[i]
        if edited and not prefer_disk:
            result.conflicts.append(_conflict(i, entry, disk, now, texts[i]))
            continue
        disk.data[i], disk.text[i], disk.problem[i] = now.data, now.text, now.problem
        if now.text != texts[i]:
            result.taken.append((i, now.text))
    return result
