"""In-memory tag editor over a dataset folder: filters, batch edits with undo/redo, preview, save, reload.

Captions are held as tuples of tags plus their text. An edit changes the text of an image only when its tags
change; when an image's tags return to those loaded, its loaded text comes back exactly, so undo gives the
original strings (and, on save, the original bytes: BOM, line breaks and spacing included). History entries
hold only the images an operation changed.

Images whose caption is not UTF-8 are "locked": batch operations skip them (the result counts them), so the
replacement characters shown for display are never written by accident; `set_caption` still edits them.
"""
from __future__ import annotations

import logging
import os
import random
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from lora_trainer.data.caption_files import join_lines
from lora_trainer.tagging import tag_ops
from lora_trainer.tagging.analysis import CaptionRecord, TagCount, sorted_counts
from lora_trainer.tagging.editor_history import Edit, EditResult, History
from lora_trainer.tagging.editor_io import FolderInfo, ImageEntry, check_extension, load_dataset, scan_folder
from lora_trainer.tagging.editor_store import (
    Conflict,
    DiskState,
    ReloadResult,
    SaveResult,
    reload_captions,
    save_captions,
)
from lora_trainer.tagging.image_check import ImageCheck

logger = logging.getLogger(__name__)

SCOPES = ("selection", "all")


@dataclass(frozen=True)
class CaptionPreview:
    """The caption as the model sees it for one seed (``data.captions.process_caption``)."""

    caption: str
    seed: int


class TagEditor:
    """Captions of one dataset folder, edited in memory. Build it with `TagEditor.load`."""

    def __init__(self, root: Path, caption_extension: str, entries: list[ImageEntry], disk: DiskState,
                 folders: dict[str, FolderInfo], problems: list[str]):
        self.root = root
        self.caption_extension = caption_extension
        self.images = entries
        self.folders = folders
        self.problems = problems
        self._disk = disk
        self._text = list(disk.text)
        self._tags = [tuple(tag_ops.parse_tags(t)) for t in self._text]
        self._orig_text = tuple(self._text)
        self._orig_tags = tuple(self._tags)
        self._locked = {e.index for e in entries if e.problem is not None}
        self._freq: Counter | None = None  # images per tag; None: recount on demand (see _write)
        self._selection: set[int] = set()
        self._history = History()
        self._image_check = ImageCheck()
        self._by_path = {str(e.image_path): e.index for e in entries}
        self._by_path.update({e.rel_path: e.index for e in entries})

    # ----- loading and access -----
    @classmethod
    def load(cls, dataset_dir: str | os.PathLike, caption_extension: str = ".txt") -> TagEditor:
        """Load every image under `dataset_dir` (recursively) with its caption.

        Args:
            dataset_dir (str | PathLike): folder holding ``N_concept`` folders (or one itself).
            caption_extension (str, optional): caption file extension. Defaults to ".txt".

        Returns:
            TagEditor: the editor; `folders` lists concept and plain folders, `problems` what was skipped.
        """
        ext = check_extension(caption_extension)
        root = Path(dataset_dir)
        data = load_dataset(root, ext)
        logger.info("loaded %d images from %s (%d folders)", len(data.entries), root, len(data.folders))
        return cls(root, ext, data.entries, DiskState.from_loaded(data.captions), data.folders, data.problems)

    def __len__(self) -> int:
        return len(self.images)

    def index_of(self, image: int | str | os.PathLike) -> int:
        """The index of an image given by index, path, or path relative to the dataset root."""
        if isinstance(image, int):
            if not 0 <= image < len(self.images):
                raise IndexError(f"image index {image} is out of range (0..{len(self.images) - 1}).")
            return image
        key = os.fspath(image)
        if key in self._by_path:
            return self._by_path[key]
        try:
            rel = Path(key).resolve().relative_to(self.root.resolve()).as_posix()
        except (ValueError, OSError):
            rel = None
        if rel in self._by_path:
            return self._by_path[rel]
        raise KeyError(f"{key}: not an image of {self.root}. Give its index or its path as loaded.")

    def caption(self, image: int | str | os.PathLike) -> str:
        """The current caption text of an image."""
        return self._text[self.index_of(image)]

    def tags(self, image: int | str | os.PathLike) -> tuple[str, ...]:
        """The current tags of an image."""
        return self._tags[self.index_of(image)]

    def original_caption(self, image: int | str | os.PathLike) -> str:
        """The caption text as first loaded."""
        return self._orig_text[self.index_of(image)]

    def dirty(self) -> list[int]:
        """Indices of images whose caption differs from what is on disk (as last loaded or saved)."""
        return [i for i, (now, disk) in enumerate(zip(self._text, self._disk.text)) if now != disk]

    @property
    def plain_folders(self) -> list[str]:
        """Folders without the ``N_`` repeat prefix (kohya does not train their images)."""
        return [f.rel_path for f in self.folders.values() if not f.is_concept]

    def records(self, usable_only: bool = False) -> list[CaptionRecord]:
        """The current captions for `analysis` functions.

        Args:
            usable_only (bool, optional): leave out the images training would skip (see `unusable_images`).
                Defaults to False.

        Returns:
            list[CaptionRecord]: one per image.
        """
        skip = self.unusable_images() if usable_only else {}
        return [CaptionRecord(e.folder, e.concept, e.repeats, t)
                for e, t in zip(self.images, self._tags) if e.index not in skip]

    def unusable_images(self) -> dict[int, str]:
        """Images whose data is corrupt, truncated or unreadable, found with the training scan's own check.

        Returns:
            dict[int, str]: image index -> message naming the file and the fix (checked once per file version).
        """
        return self._image_check.unusable([e.image_path for e in self.images])

    # ----- frequency, filters, selection -----
    def tag_frequency(self, sort: str = "count", scope: str = "all") -> list[TagCount]:
        """Number of images holding each tag.

        Args:
            sort (str, optional): "count" (descending) or "name". Defaults to "count".
            scope (str, optional): "all" or "selection". Defaults to "all".

        Returns:
            list[TagCount]: one row per tag.
        """
        indices = self._scope(scope)
        if scope == "all":
            return sorted_counts(self._counts(), len(self.images), sort)
        counts: Counter = Counter()
        for i in indices:
            counts.update(set(self._tags[i]))
        return sorted_counts(counts, len(indices), sort)

    def filter(self, include: Iterable[str] = (), exclude: Iterable[str] = (), mode: str = "all",
               text: str | None = None, folder: str | None = None) -> list[int]:
        """Indices of images matching tag and text conditions.

        Args:
            include (Iterable[str], optional): tags required: all of them (mode "all") or any (mode "any").
            exclude (Iterable[str], optional): images holding any of these tags are left out.
            mode (str, optional): "all" (AND) or "any" (OR) for `include`. Defaults to "all".
            text (str, optional): case-insensitive substring the caption text must contain.
            folder (str, optional): only images of this folder (relative path as in `folders`).

        Returns:
            list[int]: matching indices, ascending.
        """
        if mode not in ("all", "any"):
            raise ValueError(f"mode: {mode!r} is not a filter mode. Use 'all' (AND) or 'any' (OR).")
        inc, exc = tag_ops.as_tag_list(include), set(tag_ops.as_tag_list(exclude))
        needle = text.casefold() if text else None
        test = all if mode == "all" else any
        out = []
        for i, tags in enumerate(self._tags):
            if folder is not None and self.images[i].folder != folder:
                continue
            if inc and not test(t in tags for t in inc):
                continue
            if exc and not exc.isdisjoint(tags):
                continue
            if needle and needle not in self._text[i].casefold():
                continue
            out.append(i)
        return out

    @property
    def selection(self) -> frozenset[int]:
        """The selected image indices."""
        return frozenset(self._selection)

    def select(self, images: Iterable[int | str | os.PathLike], add: bool = False) -> int:
        """Select images (replacing the selection unless `add`). Returns the selection size."""
        chosen = {self.index_of(i) for i in images}
        self._selection = self._selection | chosen if add else chosen
        return len(self._selection)

    def select_where(self, **conditions) -> int:
        """Select the images `filter(**conditions)` returns. Returns the selection size."""
        self._selection = set(self.filter(**conditions))
        return len(self._selection)

    def select_all(self) -> int:
        """Select every image. Returns the selection size."""
        self._selection = set(range(len(self.images)))
        return len(self._selection)

    def clear_selection(self) -> None:
        """Select nothing."""
        self._selection = set()

    def _scope(self, scope: str) -> list[int]:
        if scope == "all":
            return list(range(len(self.images)))
        if scope == "selection":
            return sorted(self._selection)
        raise ValueError(f"scope: {scope!r} is not a scope. Use 'selection' or 'all'.")

    # ----- batch operations -----
    def add_tags(self, tags: Iterable[str], *, scope: str, front: bool = False) -> EditResult:
        """Add tags not yet present, at the end or the front. `scope`: "selection" or "all"."""
        new = tag_ops.as_tag_list(tags)
        return self._batch("add_tags", scope, lambda t: tag_ops.add_tags(t, new, front))

    def remove_tags(self, tags: Iterable[str], *, scope: str) -> EditResult:
        """Remove tags (exact match). `scope`: "selection" or "all"."""
        gone = tag_ops.as_tag_list(tags)
        return self._batch("remove_tags", scope, lambda t: tag_ops.remove_tags(t, gone))

    def replace(self, old: str, new: str, *, scope: str, regex: bool = False) -> EditResult:
        """Replace text inside tags, plain or regular expression (``re`` syntax). `scope`: "selection" or "all"."""
        target: str | re.Pattern = old
        if regex:
            try:
                target = re.compile(old)
            except re.error as err:
                raise ValueError(f"replace: {old!r} is not a valid regular expression ({err}). Fix it or drop regex.") from err
            try:
                target.sub(new, "")  # checks the replacement's group references once, before any caption changes
            except re.error as err:
                raise ValueError(f"replace: {new!r} is not a valid replacement for {old!r} ({err}). "
                                 f"Use \\1, \\2... only for groups the pattern has.") from err
        memo: dict = {}  # distinct tags are far fewer than tag occurrences
        return self._batch("replace", scope, lambda t: tag_ops.replace_text(t, target, new, memo=memo))

    def rename_tag(self, old: str, new: str, *, scope: str) -> EditResult:
        """Rename a whole tag (merging with `new` if present). `scope`: "selection" or "all"."""
        return self._batch("rename_tag", scope, lambda t: tag_ops.rename_tag(t, old, new))

    def move_to_front(self, tags: Iterable[str], *, scope: str) -> EditResult:
        """Move present tags to the front in the given order. `scope`: "selection" or "all"."""
        front = tag_ops.as_tag_list(tags)
        return self._batch("move_to_front", scope, lambda t: tag_ops.move_to_front(t, front))

    def dedupe(self, *, scope: str) -> EditResult:
        """Drop repeated tags. `scope`: "selection" or "all"."""
        return self._batch("dedupe", scope, tag_ops.dedupe)

    def sort_tags(self, *, scope: str, keep: int = 0) -> EditResult:
        """Sort tags by name, the first `keep` staying in place. `scope`: "selection" or "all"."""
        return self._batch("sort_tags", scope, lambda t: tag_ops.sort_tags(t, keep))

    def apply(self, operation: str, fn: Callable[[Sequence[str]], list[str]], *, scope: str) -> EditResult:
        """Apply any pure tag function `(tags) -> tags` as one undoable operation.

        Args:
            operation (str): its name in the history.
            fn (Callable): the function, e.g. ``lambda t: tag_ops.remove_tags(t, ["solo"])``.
            scope (str): "selection" or "all".

        Returns:
            EditResult: the scope, the images looked at and those changed.
        """
        return self._batch(operation, scope, fn)

    def set_caption(self, image: int | str | os.PathLike, text: str) -> EditResult:
        """Set one image's caption text (also for a locked, non-UTF-8 caption)."""
        i = self.index_of(image)
        text = join_lines(text) if "\n" in text or "\r" in text else text.strip()
        if text == self._text[i]:
            return EditResult("set_caption", "image", 1, ())
        tags = tuple(tag_ops.parse_tags(text))
        self._push(Edit("set_caption", "image", 1, (i,), (self._text[i],), (self._tags[i],), (text,), (tags,), ()))
        self._locked.discard(i)
        return EditResult("set_caption", "image", 1, (i,))

    def _batch(self, operation: str, scope: str, fn: Callable) -> EditResult:
        targets = self._scope(scope)
        locked, tags_now, orig_tags, orig_text = self._locked, self._tags, self._orig_tags, self._orig_text
        idx, old_text, old_tags, new_text, new_tags, skipped = [], [], [], [], [], []
        for i in targets:
            if i in locked:
                skipped.append(i)
                continue
            old = tags_now[i]
            new = tuple(fn(old))
            if new != old:
                idx.append(i)
                old_text.append(self._text[i])
                old_tags.append(old)
                new_text.append(orig_text[i] if new == orig_tags[i] else tag_ops.join_tags(new))
                new_tags.append(new)
        if skipped:
            logger.info("%s: %d images with non-UTF-8 captions were left alone", operation, len(skipped))
        if idx:
            self._push(Edit(operation, scope, len(targets), tuple(idx), tuple(old_text), tuple(old_tags),
                             tuple(new_text), tuple(new_tags), tuple(skipped)))
        return EditResult(operation, scope, len(targets), tuple(idx), tuple(skipped))

    # ----- history -----
    def _push(self, edit: Edit) -> None:
        self._write(edit.indices, edit.new_text, edit.new_tags)
        self._history.push(edit)

    def _write(self, indices, texts, tags) -> None:
        cur_tags, cur_text = self._tags, self._text
        if self._freq is not None and len(indices) * 4 > len(cur_tags):
            self._freq = None  # a large change: recounting on demand is cheaper than per-image updates
        freq = self._freq
        for i, text, new in zip(indices, texts, tags):
            old = cur_tags[i]
            if freq is not None and old != new:
                old_set, new_set = set(old), set(new)
                for t in old_set - new_set:
                    freq[t] -= 1
                    if freq[t] <= 0:
                        del freq[t]
                for t in new_set - old_set:
                    freq[t] += 1
            cur_tags[i] = new
            cur_text[i] = text

    def _counts(self) -> Counter:
        if self._freq is None:
            self._freq = Counter(chain.from_iterable(map(set, self._tags)))
        return self._freq

    @property
    def can_undo(self) -> bool:
        return self._history.can_undo

    @property
    def can_redo(self) -> bool:
        return self._history.can_redo

    def history(self) -> list[str]:
        """Names of the operations that `undo` would take back, oldest first."""
        return self._history.names()

    def undo(self) -> EditResult | None:
        """Take back the last operation. Returns what changed, or None when there is nothing to undo."""
        edit = self._history.pop_undo()
        if edit is None:
            return None
        self._write(edit.indices, edit.old_text, edit.old_tags)
        return edit.result("undo ")

    def redo(self) -> EditResult | None:
        """Do the last undone operation again. Returns what changed, or None when there is nothing to redo."""
        edit = self._history.pop_redo()
        if edit is None:
            return None
        self._write(edit.indices, edit.new_text, edit.new_tags)
        return edit.result("redo ")

    # ----- preview, save, reload -----
    def preview_caption(self, image: int | str | os.PathLike, caption_options=None, seed: int | None = None,
                        epoch: int = 0) -> CaptionPreview:
        """The caption as the model sees it in training: `data.captions.process_caption` on the current text.

        Args:
            image (int | str | PathLike): the image.
            caption_options (CaptionOptions, optional): kohya caption settings; defaults to CaptionOptions().
            seed (int, optional): the random seed; None draws a new one (re-roll).
            epoch (int, optional): epoch counted from 1 for caption_dropout_every_n_epochs; 0 = not known.

        Returns:
            CaptionPreview: the processed caption and the seed used.
        """
        from lora_trainer.data.captions import CaptionOptions, process_caption

        opts = caption_options if caption_options is not None else CaptionOptions()
        seed = secrets.randbits(32) if seed is None else int(seed)
        text = process_caption(self._text[self.index_of(image)], opts, random.Random(seed), epoch)
        return CaptionPreview(text, seed)

    def save(self, force: bool = False, backup: bool = True, source: str = "editor") -> SaveResult:
        """Write the captions that differ from disk (atomically, backing up originals once), through the caption
        journal: the old and new text of every file is recorded before it changes, so ``tags --undo`` takes the
        save back, also after a kill or a full disk.

        Args:
            force (bool, optional): False: a file changed on disk since it was loaded is not written but
                reported in `conflicts` (use `reload` to see it). True: overwrite such files. Defaults to False.
            backup (bool, optional): keep a one-time backup of each original (see caption_store). Defaults to True.
            source (str, optional): the writer's name in the journal. Defaults to "editor".

        Returns:
            SaveResult: files written, files that failed (edit kept in memory; message names the file), conflicts,
            and `interrupted` when writing had to stop.

        Raises:
            DatasetError: the journal is unreadable or cannot be written; no caption was changed.
        """
        result = save_captions(self.root, self.images, self._disk, self._text, self._orig_text, self.dirty(), force,
                               backup, source)
        for i in result.written_indices:
            self._locked.discard(i)
        return result

    def reload(self, prefer_disk: bool = False) -> ReloadResult:
        """Re-read captions and take in those changed on disk since load, without losing edits.

        An image changed on disk and not edited here takes the disk caption (an undoable "reload" step).
        An image changed on disk AND edited here is a conflict: the edit is kept and reported (unless
        `prefer_disk`, which takes the disk caption); `save()` skips it, `save(force=True)` overwrites it.

        Args:
            prefer_disk (bool, optional): resolve conflicts by taking the disk caption. Defaults to False.

        Returns:
            ReloadResult: images updated from disk, conflicts, and images added or removed on disk since load
            (reported only: `load` again to edit new images).
        """
        result = reload_captions(self.images, self._disk, self._text, prefer_disk)
        on_disk = {rel for _, rel, _ in scan_folder(self.root).images}
        result.new_images = sorted(on_disk - {e.rel_path for e in self.images})
        result.missing_images = [e.index for e in self.images if e.rel_path not in on_disk]
        if result.taken:
            idx = tuple(i for i, _ in result.taken)
            texts = tuple(t for _, t in result.taken)
            tags = tuple(tuple(tag_ops.parse_tags(t)) for t in texts)
            self._push(Edit("reload", "all", len(self.images), idx, tuple(self._text[i] for i in idx),
                             tuple(self._tags[i] for i in idx), texts, tags, ()))
            for i in idx:
                if self._disk.problem[i]:
                    self._locked.add(i)
                else:
                    self._locked.discard(i)
        return result


__all__ = ["SCOPES", "CaptionPreview", "Conflict", "EditResult", "ReloadResult", "SaveResult", "TagEditor"]
