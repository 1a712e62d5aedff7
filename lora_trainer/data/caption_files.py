"""Reading caption files beside images: UTF-8 text, problems reported rather than raised."""
from __future__ import annotations

import codecs
import functools
import os
from dataclasses import dataclass

MISSING = "missing"
# The tag editor's and tagger's journal of caption writes, at the dataset root (tagging/caption_journal.py).
JOURNAL_FILE = ".lora_trainer_tags_journal.jsonl"
_SENTENCE_END = (",", ".", ";", ":", "!", "?")


@dataclass(frozen=True)
class CaptionText:
    """A caption file's content.

    Attributes:
        text (str): the caption on one line ("" when missing); decoded with replacement characters when the file is
            not UTF-8, so it is fit for display only in that case.
        problem (str, optional): None when the file is fine; "missing" when there is no file; otherwise a message
            naming the file, what is wrong and the fix.
    """

    text: str
    problem: str | None = None


def caption_path(image_path: str | os.PathLike, caption_extension: str = ".txt") -> str:
    """The caption file beside an image (`a/b.png` -> `a/b.txt`).

    Args:
        image_path (str | os.PathLike): the image file.
        caption_extension (str, optional): extension with or without the dot, defaults to ".txt".

    Returns:
        str: the caption file path.
    """
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    return os.path.splitext(os.fspath(image_path))[0] + ext


@functools.lru_cache(maxsize=1)
def _image_suffixes() -> frozenset[str]:
    """Every extension the dataset scan treats as an image, plus every one Pillow can open or save."""
    from PIL import Image

    from lora_trainer.data.images import IMAGE_EXTENSIONS

    Image.init()
    return frozenset(IMAGE_EXTENSIONS) | frozenset(ext.lower() for ext in Image.registered_extensions())


def check_caption_extension(caption_extension: str, key: str = "caption_extension") -> str:
    """The one rule for what a caption extension may be, shared by the tagger, the tag editor and the dataset scan.

    A caption extension names a text file beside each image, so it must never be one that would make the
    caption overwrite the image itself or our own journal.

    Args:
        caption_extension (str): e.g. ".txt" (a missing leading dot is added: "txt" -> ".txt").
        key (str, optional): the option or key to name in the error (e.g. "--ext"). Defaults to "caption_extension".

    Returns:
        str: the extension with its leading dot.

    Raises:
        ValueError: empty, holds a path separator, or is an image extension or the journal's; the message names
            the extension and the fix.
    """
    text = (caption_extension or "").strip()
    ext = text if text.startswith(".") else "." + text
    fix = "Use a text extension such as '.txt' or '.caption'."
    if ext == ".":
        raise ValueError(f"{key}: empty caption extension. {fix}")
    if any(ch in ext for ch in ("/", "\\", "\0")):
        raise ValueError(f"{key}: {caption_extension!r} holds a path separator or NUL, not a file extension. {fix}")
    if ext.lower() in _image_suffixes():
        raise ValueError(f"{key}: {caption_extension!r} is an image extension: captions would overwrite the images. "
                         f"{fix}")
    if JOURNAL_FILE.lower().endswith(ext.lower()):
        raise ValueError(f"{key}: {caption_extension!r} is the extension of the caption journal ({JOURNAL_FILE}). "
                         f"{fix}")
    return ext


def join_lines(text: str) -> str:
    """Join a multi-line caption into one line: blank lines dropped, lines joined with ", " (or " " after a comma
    or sentence end), so that tags spread over several lines stay separate tags.

    Args:
        text (str): caption text, possibly with newlines.

    Returns:
        str: the caption on one line, stripped.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = ""
    for line in lines:
        if not out:
            out = line
        elif out.endswith(_SENTENCE_END):
            out = f"{out} {line}"
        else:
            out = f"{out}, {line}"
    return out


def _decode_for_display(data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8", errors="replace")


def read_caption(path: str | os.PathLike) -> CaptionText:
    """Read a caption file as UTF-8, BOM stripped, lines joined into one.

    Args:
        path (str | os.PathLike): the caption file.

    Returns:
        CaptionText: the text and None, or the text and a problem: "missing" for no file (text ""), or a message
        naming the file for non-UTF-8 content (text decoded with replacement, for display) or an unreadable file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return CaptionText("", MISSING)
    except IsADirectoryError:
        return CaptionText("", f"{path}: is a folder, not a caption file. Rename or move it.")
    except OSError as exc:
        return CaptionText("", f"{path}: cannot be read ({exc}). Check the file's permissions.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = _decode_for_display(data).lstrip("\ufeff")
        return CaptionText(join_lines(text), f"{path}: not UTF-8: re-save it as UTF-8.")
    return CaptionText(join_lines(text.lstrip("\ufeff")), None)
