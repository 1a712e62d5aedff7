"""Small JPEG copies of dataset images for the gallery and the image view, cached in the system temp folder.

The browser then loads a few KB per image instead of the full file, and the files it gets lie in the temp folder,
which gradio 4 serves without extra `allowed_paths`. A copy is keyed by path, size, mtime and side, so an edited
image gets a new one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lora_trainer.errors import DatasetError
from lora_trainer.tagging.tagger_input import load_for_tagging

logger = logging.getLogger(__name__)

GALLERY_SIDE = 256
VIEW_SIDE = 768


def cache_dir() -> Path:
    """The thumbnail folder (``<temp>/lora_trainer_thumbs``), created when missing."""
    folder = Path(tempfile.gettempdir()) / "lora_trainer_thumbs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def thumbnail(path: str | os.PathLike, side: int = GALLERY_SIDE, folder: Path | None = None) -> str:
    """A JPEG of `path` fitting in side x side (never enlarged), made once.

    Args:
        path (str | PathLike): the image.
        side (int, optional): the longest side. Defaults to GALLERY_SIDE.
        folder (Path, optional): the cache folder. Defaults to `cache_dir()`.

    Returns:
        str: the thumbnail's path, or the image's own path when it cannot be decoded (the log says why).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        logger.warning("%s: no thumbnail (%s)", path, exc)
        return str(path)
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{side}".encode()).hexdigest()[:24]
    out = (folder or cache_dir()) / f"{key}.jpg"
    if out.is_file():
        return str(out)
    try:
        image = load_for_tagging(path, side, draft=True)
        image.thumbnail((side, side))
        tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.jpg")
        image.save(tmp, "JPEG", quality=85)
        os.replace(tmp, out)
    except (DatasetError, OSError, ValueError) as exc:
        logger.warning("%s: no thumbnail (%s)", path, exc)
        return str(path)
    return str(out)


def thumbnails(paths: Sequence[str | os.PathLike], side: int = GALLERY_SIDE, workers: int = 4) -> list[str]:
    """`thumbnail` for many images, decoded in a few threads; same order as `paths`."""
    folder = cache_dir()
    if len(paths) <= 1:
        return [thumbnail(p, side, folder) for p in paths]
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda p: thumbnail(p, side, folder), paths))


__all__ = ["GALLERY_SIDE", "VIEW_SIDE", "cache_dir", "thumbnail", "thumbnails"]
