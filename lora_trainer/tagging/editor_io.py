"""Disk side of the tag editor: scanning a dataset folder, reading captions with their exact bytes, saving.

Folders named ``N_concept`` (kohya: N repeats of concept) hold training images; images below them in
subfolders belong to the nearest such folder. Images in folders without that prefix are "plain": kohya does
not train them, so they are loaded (to be edited) with 0 repeats and reported. Folders whose name starts with
a dot (e.g. ``.caption_backup``) are skipped.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.data.caption_files import check_caption_extension, join_lines, read_caption
from lora_trainer.data.images import IMAGE_EXTENSIONS
from lora_trainer.errors import DatasetError
from lora_trainer.tagging.caption_store import UTF8_BOM

logger = logging.getLogger(__name__)

_CONCEPT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class FolderInfo:
    """One folder that holds images.

    Attributes:
        rel_path: the folder relative to the dataset root, POSIX style ("." for the root).
        concept: the concept name (after ``N_``), or the folder name for a plain folder.
        repeats: N from ``N_concept``; 0 for a plain folder (kohya does not train it).
        is_concept: True for an ``N_concept`` folder (or a folder below one).
        images: number of images in it.
    """

    rel_path: str
    concept: str
    repeats: int
    is_concept: bool
    images: int


@dataclass(frozen=True)
class ImageEntry:
    """One image and its caption file.

    Attributes:
        index: position in the editor (stable for the editor's life).
        image_path / caption_path: absolute-or-as-given paths on disk.
        rel_path: the image relative to the dataset root, POSIX style.
        folder: rel_path of its concept (or plain) folder.
        concept / repeats: from the ``N_concept`` folder (repeats 0 for plain folders).
        caption_missing: no caption file existed at load.
        problem: None, or why the caption cannot be edited safely (not UTF-8: batch edits skip it).
    """

    index: int
    image_path: Path
    caption_path: Path
    rel_path: str
    folder: str
    concept: str
    repeats: int
    caption_missing: bool
    problem: str | None


@dataclass(frozen=True)
class LoadedCaption:
    """A caption as read: display/edit text (one line), exact bytes (None: no file), BOM flag, problem."""

    text: str
    data: bytes | None
    bom: bool
    problem: str | None


@dataclass(frozen=True)
class ScanResult:
    """Images found under a dataset root, with folders and problems (duplicate captions, unreadable folders)."""

    images: list[tuple[str, str, str]]  # (image path, rel path, folder rel path)
    folders: dict[str, FolderInfo]
    problems: list[str]


@dataclass(frozen=True)
class LoadedDataset:
    """Images with their captions as read, folders and problems (see `load_dataset`)."""

    entries: list[ImageEntry]
    captions: list[LoadedCaption]
    folders: dict[str, FolderInfo]
    problems: list[str]


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """Split an ``N_concept`` folder name.

    Args:
        name (str): a folder name, e.g. ``"10_mychar"``.

    Returns:
        tuple[int, str] | None: ``(10, "mychar")``, or None when the name has no repeat prefix.
    """
    match = _CONCEPT_FOLDER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def _link_problem(path: str, err: OSError) -> str:
    return (f"{path}: cannot be followed ({err.strerror}); skipped. Remove the symbolic link or point it at an "
            "existing file or folder.")


def _classify(entry: os.DirEntry, out: ScanResult) -> str | None:
    """"dir", "image" or None (skipped); an entry that cannot be followed (link loop, dangling link) is reported."""
    try:
        if entry.is_dir():
            return "dir"
        if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            return None
        if entry.is_file():
            return "image"
        os.stat(entry.path)  # raises for a dangling or looping link
    except OSError as err:
        out.problems.append(_link_problem(entry.path, err))
    return None


def _walk(folder: Path, rel: str, owner: tuple[str, str, int, bool], out: ScanResult, counts: dict,
          ancestors: frozenset = frozenset()) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        here = os.stat(folder)
    except OSError as err:
        out.problems.append(f"{folder}: cannot be listed ({err.strerror}). Check its permissions.")
        return
    ancestors = ancestors | {(here.st_dev, here.st_ino)}
    subdirs = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        kind = _classify(entry, out)
        if kind == "dir":
            subdirs.append(entry)
        elif kind == "image":
            child_rel = entry.name if rel == "." else f"{rel}/{entry.name}"
            out.images.append((entry.path, child_rel, owner[0]))
            counts[owner] = counts.get(owner, 0) + 1
    for entry in subdirs:
        st = entry.stat()
        if (st.st_dev, st.st_ino) in ancestors:  # a symbolic link back up the tree: would be scanned forever
            out.problems.append(f"{entry.path}: links back to the folder {os.path.realpath(entry.path)} above it; "
                                "skipped. Remove the symbolic link or point it at another folder.")
            continue
        child_rel = entry.name if rel == "." else f"{rel}/{entry.name}"
        parsed = parse_folder_name(entry.name)
        if parsed is not None:
            child_owner = (child_rel, parsed[1], parsed[0], True)
        elif owner[3]:
            child_owner = owner  # below an N_concept folder: same concept
        else:
            child_owner = (child_rel, entry.name, 0, False)
        _walk(Path(entry.path), child_rel, child_owner, out, counts, ancestors)


def scan_folder(root: str | os.PathLike) -> ScanResult:
    """Find every image under `root`, recursively, with its ``N_concept`` folder.

    Args:
        root (str | PathLike): the dataset folder (holding ``N_concept`` folders, or itself one).

    Returns:
        ScanResult: images sorted by relative path, folders by relative path, problems.

    Raises:
        DatasetError: `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found. Give the folder that holds the N_concept folders.")
    parsed = parse_folder_name(root.name)
    owner = (".", parsed[1], parsed[0], True) if parsed else (".", root.name, 0, False)
    out = ScanResult(images=[], folders={}, problems=[])
    counts: dict = {}
    _walk(root, ".", owner, out, counts)
    for (rel, concept, repeats, is_concept), n in sorted(counts.items()):
        out.folders[rel] = FolderInfo(rel, concept, repeats, is_concept, n)
    for info in out.folders.values():
        if not info.is_concept:
            logger.info("%s: plain folder (no N_ repeat prefix): kohya will not train its %d images", info.rel_path, info.images)
    return out


def read_caption_exact(path: str | os.PathLike) -> LoadedCaption:
    """Read a caption file keeping its exact bytes; text as `data.caption_files.read_caption` gives it.

    Args:
        path (str | PathLike): the caption file.

    Returns:
        LoadedCaption: text "" and data None when there is no file; a problem for non-UTF-8 or unreadable files.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return LoadedCaption("", None, False, None)
    except OSError:
        shown = read_caption(path)
        return LoadedCaption(shown.text, None, False, shown.problem or f"{path}: cannot be read. Check its permissions.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        shown = read_caption(path)
        return LoadedCaption(shown.text, data, False, shown.problem)
    bom = data.startswith(UTF8_BOM)
    if bom:
        text = text.lstrip("\ufeff")
    if "\n" in text or "\r" in text:
        text = join_lines(text)
    else:
        text = text.strip()
    return LoadedCaption(text, data, bom, None)


def check_extension(caption_extension: str) -> str:
    """Validate a caption extension (`data.caption_files.check_caption_extension`); returns it with a leading dot.

    Raises:
        DatasetError: an image extension, the journal's, or an empty one was given.
    """
    try:
        return check_caption_extension(caption_extension)
    except ValueError as err:
        raise DatasetError(str(err)) from err


def load_dataset(root: Path, caption_extension: str) -> LoadedDataset:
    """Scan `root` and read every image's caption with its exact bytes.

    Args:
        root (Path): the dataset folder.
        caption_extension (str): e.g. ".txt" (checked by `check_extension`).

    Returns:
        LoadedDataset: entries and captions in the same order; images sharing one caption file keep only the
        first (the others are reported in `problems`), as do non-UTF-8 captions.
    """
    scan = scan_folder(root)
    problems = list(scan.problems)
    entries, captions, seen = [], [], {}
    for image, rel, folder in scan.images:
        cap = os.path.splitext(image)[0] + caption_extension
        if cap in seen:
            problems.append(f"{image}: shares its caption {os.path.basename(cap)} with {seen[cap]}; skipped. "
                            f"Rename one of them.")
            continue
        seen[cap] = os.path.basename(image)
        got = read_caption_exact(cap)
        info = scan.folders[folder]
        entries.append(ImageEntry(len(entries), Path(image), Path(cap), rel, folder, info.concept, info.repeats,
                                  got.data is None and got.problem is None, got.problem))
        captions.append(got)
        if got.problem:
            problems.append(got.problem)
    return LoadedDataset(entries, captions, scan.folders, problems)
