"""Safe image loading: every dataset image becomes an 8-bit RGB `PIL.Image`, or a `DatasetError` naming the file."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.errors import DatasetError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# GIF included: an animated one is used by its first frame, as the scan reports (kohya leaves GIFs out silently).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Pillow's own default; kept as our constant so nothing depends on (or changes) the global Image.MAX_IMAGE_PIXELS.
DEFAULT_MAX_PIXELS = 178_956_970
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height
_FIX = "Re-export it as PNG or JPEG with an image editor, or remove it from the dataset folder."


@dataclass(frozen=True)
class ImageSize:
    """Displayed size of an image (EXIF rotation applied). Unpacks as `(width, height)`.

    Attributes:
        width (int), height (int): as displayed.
        frames (int): frames of an animated image (GIF, APNG, WebP) as found by `verify_image`; 1 otherwise.
    """

    width: int
    height: int
    frames: int = 1

    def __iter__(self):
        return iter((self.width, self.height))


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file name has one of the dataset image extensions (`IMAGE_EXTENSIONS`)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _open(path: str, max_pixels: int) -> Image.Image:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: image file not found. Check the path, or rescan the dataset folder.")
    if os.path.getsize(path) == 0:
        raise DatasetError(f"{path}: image file is empty (0 bytes). {_FIX}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: image is too large to load safely ({exc}). Downscale it first.") from exc
    except UnidentifiedImageError as exc:
        raise DatasetError(f"{path}: not a readable image (unknown or corrupt format). {_FIX}") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open image ({exc}). {_FIX}") from exc
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise DatasetError(
            f"{path}: image is {width}x{height} = {width * height} pixels, over the safety limit of {max_pixels} "
            "(a possible decompression bomb). Downscale it (training resolutions are far smaller)."
        )
    if width <= 0 or height <= 0:
        im.close()
        raise DatasetError(f"{path}: image has no pixels ({width}x{height}). {_FIX}")
    return im


def _displayed_size(im: Image.Image, path: str) -> ImageSize:
    width, height = im.size
    try:
        if im.format == "PNG":  # Image.getexif() would decode a PNG to look for a late eXIf chunk
            exif = Image.Exif()
            if im.info.get("exif"):
                exif.load(im.info["exif"])
        else:
            exif = im.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not hide a usable image
        logger.debug("%s: unreadable EXIF ignored (%s)", path, exc)
        orientation = 1
    if orientation in _ROTATED_ORIENTATIONS:
        width, height = height, width
    return ImageSize(width, height)


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageSize:
    """Read an image's size from its header without decoding the pixels.

    Args:
        path (str | os.PathLike): image file.
        max_pixels (int, optional): refuse larger images, defaults to DEFAULT_MAX_PIXELS.

    Returns:
        ImageSize: `(width, height)` as displayed, i.e. swapped for EXIF orientations 5-8.

    Raises:
        DatasetError: the file is missing, empty, not an image, or too large.
    """
    path = os.fspath(path)
    im = _open(path, max_pixels)
    try:
        return _displayed_size(im, path)
    finally:
        im.close()


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grayscale -> 8-bit "L", scaled rather than clipped."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 257.0
    elif im.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else arr
    else:  # "I": Pillow opens 16-bit grayscale PNGs as 32-bit "I" holding 0..65535
        arr = arr.astype(np.float64)
        arr = arr / 257.0 if arr.size and float(arr.max()) > 255 else arr
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB; transparent pixels become white.

    Args:
        im (PIL.Image.Image): a loaded image.

    Returns:
        PIL.Image.Image: a new or the same image in mode "RGB".
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        return _composite_on_white(im)
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_depth_to_l(im).convert("RGB")
    return im.convert("RGB")


def verify_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageSize:
    """Check that an image's data is complete, cheaply: PNG chunk CRCs, JPEG decoded at 1/8 scale (which still reads
    every byte), other formats fully decoded. Finds truncated and corrupt files before training starts.

    Args:
        path (str | os.PathLike): image file.
        max_pixels (int, optional): refuse larger images, defaults to DEFAULT_MAX_PIXELS.

    Returns:
        ImageSize: `(width, height)` as displayed (EXIF rotation applied), and the frame count of an animated image.

    Raises:
        DatasetError: as load_image.
    """
    path = os.fspath(path)
    im = _open(path, max_pixels)
    try:
        size = _displayed_size(im, path)
        if getattr(im, "is_animated", False):
            size = ImageSize(size.width, size.height, int(getattr(im, "n_frames", 1)))
            im.seek(0)
        if im.format == "PNG":  # walks every chunk and checks its CRC: finds truncation without inflating
            im.verify()
        else:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: image data cannot be decoded, truncated or corrupt ({exc}). {_FIX}") from exc
    finally:
        im.close()
    return size


def image_to_tensor(image: Image.Image) -> "torch.Tensor":
    """RGB image -> float32 tensor `[3, H, W]` in [-1, 1] (what the VAE encoder expects).

    Args:
        image (PIL.Image.Image): an image in mode "RGB".

    Returns:
        torch.Tensor: the pixels scaled to [-1, 1].
    """
    arr = np.asarray(image, dtype=np.uint8)
    import torch  # here, so that reading images (tagger, tag editor) does not import torch

    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load a dataset image as 8-bit RGB.

    EXIF orientation is applied; alpha (RGBA, LA, palette or grayscale with transparency) is composited on white;
    CMYK, 16-bit, palette and grayscale images are converted; an animated image gives its first frame.

    Args:
        path (str | os.PathLike): image file.
        max_pixels (int, optional): refuse images with more pixels (decompression-bomb guard), defaults to
            DEFAULT_MAX_PIXELS.

    Returns:
        PIL.Image.Image: a fully loaded image in mode "RGB", detached from the file.

    Raises:
        DatasetError: the file is missing, empty, truncated, corrupt, too large or in a mode that cannot be
            converted; the message names the file and the fix.
    """
    path = os.fspath(path)
    im = _open(path, max_pixels)
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not hide a usable image
            logger.warning("%s: EXIF orientation could not be read (%s); using the image as stored", path, exc)
            oriented = im
        rgb = to_rgb(oriented if oriented is not None else im)
        if rgb is im:
            rgb = im.copy()
        rgb.load()
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: image data cannot be decoded, truncated or corrupt ({exc}). {_FIX}") from exc
    finally:
        im.close()
    return rgb
