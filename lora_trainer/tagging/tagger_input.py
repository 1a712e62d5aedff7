"""Tagger input: which files, how they are decoded, and the preprocessing the WD14 / WD-v3 models expect.

Preprocessing follows SmilingWolf's reference tagger: alpha composited on white, padded to a centered white
square, resized to the model's input side with bicubic, RGB -> BGR, float32 0..255, NHWC.
On request, large JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, 1/2..1/8) that keeps at least 1.5x
the model's input side before that bicubic step: the decode and the resize then cost a fraction, and the model
input differs from a full decode by about one grey level on average (a tag right at the threshold may flip).
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lora_trainer.data.images import image_size, is_image_file, load_image, to_rgb
from lora_trainer.errors import DatasetError, LoraTrainerError, TaggerError
from lora_trainer.progress import CancelToken

logger = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")
_CONCEPT = re.compile(r"^\d+_.+$")
DRAFT_MARGIN = 1.5  # a drafted JPEG keeps at least this many times the model's input side
_WHITE = (255, 255, 255)
_IMAGE_ERRORS = (LoraTrainerError, OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError)
Prepared = tuple[Path, "np.ndarray | None", "str | None"]


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """Turn an image into the model's input: alpha on white, padded to a centered white square, resized, BGR.

    Args:
        image (PIL.Image.Image): any mode; transparency is composited on white.
        size (int): the model's input side (448 for WD14 v2/v3).

    Returns:
        np.ndarray: [size, size, 3] float32 in 0..255, channels in BGR order.
    """
    image = to_rgb(image)
    w, h = image.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), _WHITE)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(image, dtype=np.float32)[:, :, ::-1])


def load_for_tagging(path: str | os.PathLike, size: int, draft: bool = False) -> Image.Image:
    """Load an image as RGB for a model of input side `size`.

    Args:
        path (str | os.PathLike): the image file.
        size (int): the model's input side.
        draft (bool, optional): decode a JPEG of at least 2 x 1.5 x `size` pixels at a reduced scale that keeps
            >= 1.5 x `size`, defaults to False. Other files (and draft=False) go through `data.images.load_image`.

    Returns:
        PIL.Image.Image: RGB, EXIF orientation applied, transparency on white.

    Raises:
        DatasetError: missing, empty, corrupt, truncated or too large; the message names the file.
    """
    path = Path(path)
    want = math.ceil(DRAFT_MARGIN * size)
    if not draft or path.suffix.lower() not in JPEG_SUFFIXES or max(image_size(path)) < 2 * want:
        return load_image(path)
    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return load_image(path)
            w, h = im.size
            side = max(w, h)
            im.draft("RGB", (max(1, math.ceil(w * want / side)), max(1, math.ceil(h * want / side))))
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not hide a usable image (as load_image)
                logger.warning("%s: EXIF orientation could not be read (%s); using the image as stored", path, exc)
                oriented = im.copy()
            return to_rgb(oriented)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: image data cannot be decoded, truncated or corrupt ({exc}). Re-export it as "
                           "PNG or JPEG with an image editor, or remove it from the dataset folder.") from exc


def list_images(folder_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
                recursive: bool = False) -> list[Path]:
    """The image files to tag.

    Args:
        folder_or_paths: a folder, or image paths (returned as they are).
        recursive (bool, optional): include sub-folders of a folder, defaults to False. Hidden folders (such as
            caption backups) are always skipped.

    Returns:
        list[Path]: a folder's image files (`data.images.IMAGE_EXTENSIONS`), sorted.

    Raises:
        TaggerError: the folder does not exist.
    """
    if isinstance(folder_or_paths, (str, os.PathLike)):
        root = Path(folder_or_paths)
        if not root.is_dir():
            raise TaggerError(f"{root}: folder not found. Give the folder that holds the images.")
        pattern = root.rglob("*") if recursive else root.iterdir()
        return sorted(p for p in pattern if p.is_file() and is_image_file(p)
                      and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [Path(p) for p in folder_or_paths]


def concept_folders(root: str | os.PathLike) -> list[Path]:
    """The ``N_concept`` folders (kohya's repeats_concept layout) directly inside `root`, sorted.

    Args:
        root (str | os.PathLike): a dataset folder.

    Returns:
        list[Path]: its sub-folders named like ``10_mychar``; empty when `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _CONCEPT.match(p.name))


def dataset_images(root: str | os.PathLike) -> list[Path]:
    """The images of a dataset root: those directly in it plus every image under its ``N_concept`` folders.

    Args:
        root (str | os.PathLike): the folder holding ``N_concept`` folders.

    Returns:
        list[Path]: sorted image paths (hidden folders such as caption backups skipped).

    Raises:
        TaggerError: the folder does not exist.
    """
    paths = list_images(root)
    for folder in concept_folders(root):
        paths += list_images(folder, recursive=True)
    return sorted(paths)


def _load(path: Path, size: int, draft: bool) -> np.ndarray:
    return prepare_image(load_for_tagging(path, size, draft), size)


def prepared_batches(paths: list[Path], size: int, batch: int, workers: int, cancel: CancelToken | None = None,
                     draft: bool = False) -> Iterator[list[Prepared]]:
    """Decode and preprocess images in a thread pool, ahead of the consumer, in order.

    Args:
        paths (list[Path]): images.
        size (int): the model's input side.
        batch (int): images per yielded chunk.
        workers (int): threads; up to 2 x batch + workers images are in flight.
        cancel (CancelToken, optional): stop (pending work is dropped) when set.
        draft (bool, optional): see `load_for_tagging`, defaults to False.

    Returns:
        Iterator[list[tuple[Path, np.ndarray | None, str | None]]]: chunks of (path, model input, None), or
        (path, None, reason) for an image that cannot be used.
    """
    todo = iter(paths)
    pending: deque[tuple[Path, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tagger-load") as pool:
        def fill() -> None:
            while len(pending) < 2 * batch + workers:
                path = next(todo, None)
                if path is None:
                    return
                pending.append((path, pool.submit(_load, path, size, draft)))

        fill()
        chunk: list[Prepared] = []
        while pending:
            if cancel is not None and cancel.cancelled:
                for _, future in pending:
                    future.cancel()
                return
            path, future = pending.popleft()
            fill()
            try:
                chunk.append((path, future.result(), None))
            except _IMAGE_ERRORS as exc:
                chunk.append((path, None, str(exc) or type(exc).__name__))
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
