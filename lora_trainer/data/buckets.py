"""Aspect-ratio buckets with kohya sd-scripts' rules, and the resize + crop that puts an image into its bucket.

Sizes are `(width, height)` throughout; crops are `(top, left)` in pixels of the resized image (the SDXL size
conditioning convention: offsets of the kept window).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lora_trainer.errors import ConfigError


def parse_resolution(value) -> tuple[int, int]:
    """`512`, `"512"`, `"768,1024"`, `(768, 1024)` -> `(width, height)`.

    Args:
        value (int | str | Sequence[int]): kohya's `resolution`.

    Returns:
        tuple[int, int]: width and height.
    """
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        elif isinstance(value, (int, float)):
            parts = [int(value)]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"resolution: {value!r} is not a size. Use e.g. 512 or \"768,1024\" (width,height).") from exc
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise ConfigError(f"resolution: {value!r} is not a size. Use e.g. 512 or \"768,1024\" (width,height).")
    return parts[0], parts[1]


@dataclass(frozen=True)
class BucketSettings:
    """Kohya's bucket keys. `resolution` is `(width, height)` and gives the maximum area."""

    resolution: tuple[int, int] = (512, 512)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def __post_init__(self):
        object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        steps = int(self.bucket_reso_steps)
        if steps < 8 or steps % 8:
            raise ConfigError(f"bucket_reso_steps: {steps} must be a positive multiple of 8 (latents are 1/8). Use 64.")
        if int(self.min_bucket_reso) > int(self.max_bucket_reso):
            raise ConfigError(
                f"min_bucket_reso: {self.min_bucket_reso} is above max_bucket_reso {self.max_bucket_reso}. "
                "Swap them or lower min_bucket_reso."
            )
        if not self.enable_bucket and any(s % 8 for s in self.resolution):
            raise ConfigError(f"resolution: {self.resolution} must be multiples of 8. Use e.g. 512 or 768,1024.")

    @classmethod
    def from_config(cls, dataset_cfg) -> "BucketSettings":
        """Read kohya-named attributes with getattr; absent or None ones keep defaults.

        Args:
            dataset_cfg (object): e.g. `DatasetConfig`.

        Returns:
            BucketSettings: the settings.
        """
        names = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                 "bucket_no_upscale")
        values = {n: getattr(dataset_cfg, n) for n in names if getattr(dataset_cfg, n, None) is not None}
        return cls(**values)


@dataclass(frozen=True)
class Placement:
    """Where one image goes.

    Attributes:
        bucket (tuple[int, int]): target `(width, height)`, multiples of 8.
        resized (tuple[int, int]): size the image is resized to before cropping; covers the bucket.
        ar_error (float): bucket aspect ratio minus image aspect ratio.
    """

    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float

    def center_crop(self) -> tuple[int, int]:
        """`(top, left)` of a centered crop."""
        return (self.resized[1] - self.bucket[1]) // 2, (self.resized[0] - self.bucket[0]) // 2

    def random_crop(self, rng: random.Random) -> tuple[int, int]:
        """`(top, left)` of a crop chosen uniformly with `rng`."""
        return rng.randint(0, self.resized[1] - self.bucket[1]), rng.randint(0, self.resized[0] - self.bucket[0])


def make_bucket_resolutions(resolution, min_size: int = 256, max_size: int = 1024, steps: int = 64):
    """Kohya's predefined buckets: the square of the max area, and every `(w, h)` with w from min_size to
    max_size in steps whose height fills the area (rounded down to steps), both orientations.

    Args:
        resolution (tuple[int, int]): `(width, height)` giving the maximum area.
        min_size (int, optional): smallest side, defaults to 256.
        max_size (int, optional): largest side, defaults to 1024.
        steps (int, optional): side granularity, defaults to 64.

    Returns:
        list[tuple[int, int]]: sorted bucket sizes, each with area <= the maximum area.
    """
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def _cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    ar, bucket_ar = width / height, bucket[0] / bucket[1]
    scale = bucket[1] / height if ar > bucket_ar else bucket[0] / width
    return max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5))


class Bucketer:
    """Assigns images to buckets.

    Args:
        settings (BucketSettings): kohya's bucket keys.
    """

    def __init__(self, settings: BucketSettings):
        self.settings = settings
        self.steps = int(settings.bucket_reso_steps)
        self.max_area = settings.resolution[0] * settings.resolution[1]
        if not settings.enable_bucket:
            self.resos = [settings.resolution]
        else:
            self.resos = make_bucket_resolutions(
                settings.resolution, int(settings.min_bucket_reso), int(settings.max_bucket_reso), self.steps
            )
        self._ratios = np.array([w / h for w, h in self.resos])

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return max(self.steps, x - x % self.steps)

    def _no_upscale_size(self, width: int, height: int) -> tuple[int, int]:
        ar = width / height
        if width * height <= self.max_area:
            return width, height
        resized_w = math.sqrt(self.max_area * ar)
        resized_h = self.max_area / resized_w
        w_rounded = self._round(resized_w)
        ar_w = w_rounded / self._round(w_rounded / ar)
        h_rounded = self._round(resized_h)
        ar_h = self._round(h_rounded * ar) / h_rounded
        if abs(ar_w - ar) < abs(ar_h - ar):
            return w_rounded, int(w_rounded / ar + 0.5)
        return int(h_rounded * ar + 0.5), h_rounded

    def place(self, width: int, height: int) -> Placement:
        """Choose the bucket and resize size of an image.

        Args:
            width (int): image width (EXIF rotation applied).
            height (int): image height.

        Returns:
            Placement: bucket, resized size (covering the bucket) and aspect-ratio error.
        """
        ar = width / height
        if self.settings.enable_bucket and self.settings.bucket_no_upscale:
            resized = self._no_upscale_size(width, height)
            bucket = (max(self.steps, resized[0] - resized[0] % self.steps),
                      max(self.steps, resized[1] - resized[1] % self.steps))
            if resized[0] < bucket[0] or resized[1] < bucket[1]:  # smaller than one step: upscale to cover
                resized = _cover_size(width, height, bucket)
        else:
            bucket = (width, height) if (width, height) in self.resos else self.resos[
                int(np.abs(self._ratios - ar).argmin())]
            resized = _cover_size(width, height, bucket)
        return Placement(tuple(bucket), tuple(resized), bucket[0] / bucket[1] - ar)


def fit_to_bucket(image: Image.Image, placement: Placement, crop: tuple[int, int], flip: bool = False) -> Image.Image:
    """Resize an image to `placement.resized`, crop the bucket window at `crop`, then optionally mirror it.

    Args:
        image (PIL.Image.Image): the RGB image at its original size.
        placement (Placement): from Bucketer.place.
        crop (tuple[int, int]): `(top, left)` in the resized image.
        flip (bool, optional): mirror horizontally after cropping, defaults to False.

    Returns:
        PIL.Image.Image: an image of size `placement.bucket`.
    """
    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    top, left = crop
    bw, bh = placement.bucket
    if image.size != (bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def bucket_info(placements, repeats) -> dict:
    """Kohya's `ss_bucket_info`: buckets by id with resolution and sample count (repeats included), and the mean
    absolute aspect-ratio error over images.

    Args:
        placements (Sequence[Placement]): one per image.
        repeats (Sequence[int]): repeats per image.

    Returns:
        dict: `{"buckets": {id: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": float}`.
    """
    counts: dict[tuple[int, int], int] = {}
    for placement, n in zip(placements, repeats):
        counts[placement.bucket] = counts.get(placement.bucket, 0) + int(n)
    buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
    errors = [abs(p.ar_error) for p in placements]
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}
