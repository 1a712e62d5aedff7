"""Latent cache (RAM, optionally disk) and text-encoder output cache.

A latent's key is the sha256 of the image file's bytes + bucket size + crop + flip + the model id, so a changed
image, bucket, crop or VAE never reuses a stale entry.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lora_trainer.data.buckets import Placement, fit_to_bucket
from lora_trainer.data.images import image_to_tensor, load_image
from lora_trainer.progress import ProgressTracker
from lora_trainer.atomic_io import atomic_write_bytes
from lora_trainer.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentRequest:
    """One image as the model sees it.

    Attributes:
        path (str): the image file.
        placement (Placement): bucket and resize size.
        crop (tuple[int, int]): `(top, left)` in the resized image.
        flip (bool): mirrored horizontally.
    """

    path: str
    placement: Placement
    crop: tuple[int, int]
    flip: bool = False


@dataclass(frozen=True)
class CacheReport:
    """What cache_all did: `encoded` new latents, `from_disk` loaded, `in_memory` already there, `cancelled`, and
    `skipped` images whose data could not be decoded (each logged as at scan time)."""

    encoded: int
    from_disk: int
    in_memory: int
    cancelled: bool = False
    skipped: tuple[str, ...] = ()


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file's bytes.

    Args:
        path (str): the file.

    Returns:
        str: 64 hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def latent_key(file_hash: str, bucket, crop, flip: bool, model_id: str) -> str:
    """The cache key of one latent.

    Args:
        file_hash (str): sha256 of the image bytes.
        bucket (tuple[int, int]): `(width, height)`.
        crop (tuple[int, int]): `(top, left)`.
        flip (bool): mirrored.
        model_id (str): identity of the VAE / model weights.

    Returns:
        str: a sha256 hex digest.
    """
    text = f"{file_hash}|{bucket[0]}x{bucket[1]}|{crop[0]},{crop[1]}|{int(bool(flip))}|{model_id}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def request_pixels(request: LatentRequest) -> torch.Tensor:
    """Load, resize, crop and flip one image: `[3, H, W]` float32 in [-1, 1] with `(W, H)` = the bucket.

    Args:
        request (LatentRequest): the image and its placement.

    Returns:
        torch.Tensor: the pixels.
    """
    image = fit_to_bucket(load_image(request.path), request.placement, request.crop, request.flip)
    return image_to_tensor(image)


def _check_latents(latents, count: int, bucket) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != count:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"encode_images: returned {shape} for {count} image(s) of {bucket[0]}x{bucket[1]}; expected "
            f"[{count}, C, {bucket[1] // 8}, {bucket[0] // 8}]. Pass the model adapter's encode_images."
        )
    return latents.detach().to("cpu")


class LatentCache:
    """Latents by key, in RAM and (with `cache_dir`) as `<cache_dir>/<key>.safetensors`.

    Args:
        model_id (str): identity of the VAE weights; part of every key.
        cache_dir (str, optional): folder for the disk cache, created when needed, defaults to None (RAM only).
        keep_in_memory (bool, optional): keep latents in RAM (else read from disk each time), defaults to True.
    """

    def __init__(self, model_id: str, cache_dir: str | None = None, keep_in_memory: bool = True):
        self.model_id = str(model_id)
        self.cache_dir = os.fspath(cache_dir) if cache_dir else None
        self.keep_in_memory = keep_in_memory or not self.cache_dir
        self._memory: dict[str, torch.Tensor] = {}
        self._hashes: dict[str, tuple[int, int, str]] = {}

    def _file_hash(self, path: str, refresh: bool = False) -> str:
        stat = os.stat(path)
        memo = self._hashes.get(path)
        if refresh or memo is None or memo[:2] != (stat.st_mtime_ns, stat.st_size):
            memo = (stat.st_mtime_ns, stat.st_size, file_sha256(path))
            self._hashes[path] = memo
        return memo[2]

    def key(self, request: LatentRequest, refresh: bool = False) -> str:
        """The key of a request (the image is hashed once, again when its size or mtime changes or on refresh)."""
        file_hash = self._file_hash(request.path, refresh)
        return latent_key(file_hash, request.placement.bucket, request.crop, request.flip, self.model_id)

    def _disk_path(self, key: str) -> str | None:
        return os.path.join(self.cache_dir, f"{key}.safetensors") if self.cache_dir else None

    def _load_disk(self, key: str) -> torch.Tensor | None:
        path = self._disk_path(key)
        if not path or not os.path.isfile(path):
            return None
        try:
            return load_file(path)["latents"]
        except (SafetensorError, KeyError, OSError) as exc:
            logger.warning("%s: unreadable latent cache entry (%s); it will be encoded again", path, exc)
            return None

    def _lookup(self, key: str) -> tuple[torch.Tensor | None, str]:
        if key in self._memory:
            return self._memory[key], "memory"
        latents = self._load_disk(key)
        if latents is not None and self.keep_in_memory:
            self._memory[key] = latents
        return latents, "disk"

    def get(self, request: LatentRequest) -> torch.Tensor | None:
        """The cached latent `[C, h, w]` of a request, or None."""
        return self._lookup(self.key(request))[0]

    def put(self, request: LatentRequest, latents: torch.Tensor, key: str | None = None) -> None:
        """Store one latent `[C, h, w]` (CPU) in RAM and, with a cache_dir, atomically on disk."""
        key = key or self.key(request)
        latents = latents.detach().to("cpu").contiguous()
        if self.keep_in_memory:
            self._memory[key] = latents
        path = self._disk_path(key)
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            atomic_write_bytes(path, save({"latents": latents}, metadata={"model_id": self.model_id}))

    def __len__(self) -> int:
        return len(self._memory)

    def cache_all(self, requests, encode_images, batch_size: int = 1, progress=None, cancel=None) -> CacheReport:
        """Make sure every request has a latent: RAM, then disk, else encode (batched within one bucket size).

        Args:
            requests (Iterable[LatentRequest]): the images to cache (duplicates are fine).
            encode_images (Callable[[torch.Tensor], torch.Tensor]): `[B,3,H,W]` in [-1, 1] (float32, CPU) ->
                latents `[B,C,H/8,W/8]`, e.g. `adapter.encode_images`.
            batch_size (int, optional): images per encode call, defaults to 1.
            progress (Callable[[ProgressInfo], None], optional): called after each encoded batch.
            cancel (CancelToken, optional): checked between batches.

        Returns:
            CacheReport: counts; `cancelled` when stopped early (what was encoded stays cached).
        """
        todo: dict[str, LatentRequest] = {}
        from_disk = in_memory = 0
        for request in requests:
            key = self.key(request, refresh=True)
            if key in todo:
                continue
            latents, where = self._lookup(key)
            if latents is None:
                todo[key] = request
            elif where == "memory":
                in_memory += 1
            else:
                from_disk += 1
        by_bucket: dict[tuple[int, int], list[tuple[str, LatentRequest]]] = {}
        for key, request in todo.items():
            by_bucket.setdefault(request.placement.bucket, []).append((key, request))
        tracker = ProgressTracker(len(todo))
        encoded, skipped = 0, []
        for bucket, entries in sorted(by_bucket.items()):
            for start in range(0, len(entries), max(1, int(batch_size))):
                if cancel is not None and cancel.cancelled:
                    return CacheReport(encoded, from_disk, in_memory, cancelled=True, skipped=tuple(skipped))
                chunk = entries[start:start + max(1, int(batch_size))]
                readable, pixels = _read_pixels(chunk, skipped)
                if readable:
                    with torch.no_grad():
                        latents = _check_latents(encode_images(torch.stack(pixels)), len(readable), bucket)
                    for (key, request), latent in zip(readable, latents):
                        self.put(request, latent.clone(), key)
                    encoded += len(readable)
                info = tracker.update(len(chunk))
                if progress is not None:
                    progress(info)
        logger.info("latents: %d encoded, %d from disk, %d already in memory", encoded, from_disk, in_memory)
        return CacheReport(encoded, from_disk, in_memory, skipped=tuple(dict.fromkeys(skipped)))


def _read_pixels(chunk, skipped: list[str]) -> tuple[list, list[torch.Tensor]]:
    """The pixels of each (key, request) in `chunk`; an image whose data cannot be decoded (a header that opens,
    then corrupt data) is skipped with the scan's warning and its path added to `skipped`."""
    readable, pixels = [], []
    for key, request in chunk:
        if request.path in skipped:
            continue
        try:
            pixels.append(request_pixels(request))
        except DatasetError as exc:
            logger.warning("%s (skipped)", exc)
            skipped.append(request.path)
            continue
        readable.append((key, request))
    return readable, pixels


class TextEncoderCache:
    """Text-encoder outputs (on CPU) by caption text, for fixed captions and a frozen text encoder.

    One instance serves one encoder with fixed settings (clip_skip, max_token_length): make a new one when they
    change.
    """

    def __init__(self):
        self._items: dict[str, object] = {}

    def __contains__(self, caption: str) -> bool:
        return caption in self._items

    def __len__(self) -> int:
        return len(self._items)

    def encode_all(self, captions, encode_captions, batch_size: int = 8, progress=None, cancel=None) -> int:
        """Encode every caption not yet cached.

        Args:
            captions (Iterable[str]): processed captions.
            encode_captions (Callable[[list[str]], TextConditioning]): e.g. `adapter.encode_captions` with its
                clip_skip / max_token_length bound.
            batch_size (int, optional): captions per call, defaults to 8.
            progress (Callable[[ProgressInfo], None], optional): called after each batch.
            cancel (CancelToken, optional): checked between batches.

        Returns:
            int: captions newly encoded.
        """
        todo = sorted({c for c in captions if c not in self._items})
        tracker = ProgressTracker(len(todo))
        step = max(1, int(batch_size))
        for start in range(0, len(todo), step):
            if cancel is not None and cancel.cancelled:
                return start
            chunk = todo[start:start + step]
            with torch.no_grad():
                cond = encode_captions(chunk).to(device="cpu")
            for i, caption in enumerate(chunk):
                self._items[caption] = cond.index(slice(i, i + 1))
            info = tracker.update(len(chunk))
            if progress is not None:
                progress(info)
        return len(todo)

    def get(self, captions: list[str]):
        """The cached conditioning of a batch of captions, concatenated in order.

        Args:
            captions (list[str]): processed captions, all cached.

        Returns:
            TextConditioning: `[B, T, C]` (and pooled) on CPU.

        Raises:
            KeyError: a caption was not cached (call encode_all with every caption first).
        """
        missing = [c for c in captions if c not in self._items]
        if missing:
            raise KeyError(f"text-encoder cache: caption {missing[0]!r} was not encoded. Call encode_all first.")
        items = [self._items[c] for c in captions]
        return type(items[0]).cat(items)
