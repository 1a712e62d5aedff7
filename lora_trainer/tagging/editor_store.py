"""Saving and reloading the tag editor's captions: what is on disk, conflicts, exact original bytes."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.errors import DatasetError
from lora_trainer.atomic_io import fsync_dirs
from lora_trainer.tagging.caption_store import encode_caption, write_caption_bytes
from lora_trainer.tagging.editor_io import ImageEntry, LoadedCaption, read_caption_exact

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
    """

    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    failed: list[SaveFailure] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    written_indices: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every changed caption was written."""
        return not self.failed and not self.conflicts


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


def _write_one(i: int, path: Path, text: str, orig_text: str, disk: DiskState, backup: bool, result: SaveResult,
               dirs: set) -> None:
    if text == orig_text and disk.orig_data[i] is None and text == "":
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise DatasetError(f"{path}: cannot remove the caption this editor created ({err.strerror}). Delete it by hand.") from err
        result.removed.append(path)
        data = None
    else:
        data = disk.orig_data[i] if text == orig_text and disk.orig_data[i] is not None else encode_caption(text, disk.orig_bom[i])
        write_caption_bytes(path, data, backup=backup, dirs_to_sync=dirs)
        result.written.append(path)
    result.written_indices.append(i)
    disk.data[i], disk.text[i], disk.problem[i] = data, text, None


def save_captions(entries: list[ImageEntry], disk: DiskState, texts: list[str], orig_texts: tuple[str, ...],
                  dirty: list[int], force: bool, backup: bool) -> SaveResult:
    """Write the dirty captions; see `TagEditor.save`.

    Args:
        entries (list[ImageEntry]): the images.
        disk (DiskState): what is on disk; updated for every file written.
        texts (list[str]): current captions.
        orig_texts (tuple[str, ...]): captions as first loaded (written back as their original bytes).
        dirty (list[int]): indices to write.
        force (bool): overwrite files changed on disk since load.
        backup (bool): one-time backup of originals.

    Returns:
        SaveResult: written, removed, failed and conflicting files.
    """
    result, dirs = SaveResult(), set()
    for i in dirty:
        entry = entries[i]
        if not force:
            now = read_caption_exact(entry.caption_path)
            if now.data != disk.data[i]:
                result.conflicts.append(_conflict(i, entry, disk, now, texts[i]))
                continue
        try:
            _write_one(i, entry.caption_path, texts[i], orig_texts[i], disk, backup, result, dirs)
        except DatasetError as err:
            logger.error("%s", err)
            result.failed.append(SaveFailure(i, entry.caption_path, str(err)))
    fsync_dirs(dirs)
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
