"""Per-epoch batches: repeats, kohya's regularisation balance, bucket batching, captions, latents, size conditioning.

Everything random is drawn from `random.Random` seeded with (seed, epoch[, batch index]), so the batches of an
epoch are a pure function of the seed and the epoch number: a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import logging
import os
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lora_trainer.data.buckets import Bucketer, BucketSettings, bucket_info
from lora_trainer.data.cache import CacheReport, LatentCache, LatentRequest, request_pixels
from lora_trainer.data.captions import CaptionOptions, is_fixed, process_caption
from lora_trainer.data.folders import DatasetIndex, kohya_datasets
from lora_trainer.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

CACHE_FOLDER = ".lora_trainer_cache"


@dataclass(frozen=True)
class BatchPlan:
    """Which samples make one batch (all in one bucket).

    Attributes:
        bucket (tuple[int, int]): `(width, height)` of every sample.
        items (tuple[int, ...]): indexes into `TrainDataset.items`.
        flips (tuple[bool, ...]): horizontal flip per sample.
        crops (tuple[tuple[int, int], ...]): `(top, left)` per sample, in the resized image before flipping.
    """

    bucket: tuple[int, int]
    items: tuple[int, ...]
    flips: tuple[bool, ...]
    crops: tuple[tuple[int, int], ...]


@dataclass
class Batch:
    """One training batch.

    Attributes:
        latents (torch.Tensor, optional): `[B, C, h, w]` (CPU when cached, else where encode_images put them);
            None when no encoder was given (then `pixels` is set).
        pixels (torch.Tensor, optional): `[B, 3, H, W]` float32 in [-1, 1], only when `latents` is None.
        captions (list[str]): processed captions.
        size_cond (torch.Tensor): `[B, 6]` float32: original h, w, crop top, left, target h, w (SDXL).
        loss_weights (torch.Tensor): `[B]` float32: prior_loss_weight for regularisation images, else 1.
        paths (list[str]): image files.
        flips (list[bool]): mirrored samples.
    """

    latents: torch.Tensor | None
    pixels: torch.Tensor | None
    captions: list[str]
    size_cond: torch.Tensor
    loss_weights: torch.Tensor
    paths: list[str]
    flips: list[bool]


def _rng(*parts) -> random.Random:
    # str seeds are hashed with sha512 by `random`: stable across processes and Python's hash randomisation
    return random.Random(":".join(str(p) for p in ("lora_trainer",) + parts))


def _readable_pixels(requests: list[LatentRequest]) -> tuple[list[int], list[torch.Tensor]]:
    """Pixels of the images that decode; one corrupt past its header (the scan cannot see it) is skipped with the
    scan's warning, as latent caching does. A batch with no readable image stops the run (named)."""
    keep, pixels = [], []
    for position, request in enumerate(requests):
        try:
            pixels.append(request_pixels(request))
        except DatasetError as exc:
            logger.warning("%s (skipped)", exc)
            continue
        keep.append(position)
    if not keep:
        raise DatasetError(f"{requests[0].path}: no image of this batch can be decoded. Replace or remove the "
                           "damaged images (see the warnings above) and start again.")
    return keep, pixels


def part_of(plan: BatchPlan, share: slice) -> BatchPlan:
    """The samples of `plan` at the positions `share` (one process's part of a global batch).

    Args:
        plan (BatchPlan): a global batch.
        share (slice): positions in it.

    Returns:
        BatchPlan: the same bucket, those samples.
    """
    return BatchPlan(plan.bucket, plan.items[share], plan.flips[share], plan.crops[share])


def _subset(batch: Batch, keep: list[int]) -> Batch:
    return Batch(batch.latents, batch.pixels, [batch.captions[i] for i in keep], batch.size_cond[keep],
                 batch.loss_weights[keep], [batch.paths[i] for i in keep], [batch.flips[i] for i in keep])


class TrainDataset:
    """The training data of one run.

    Args:
        index (DatasetIndex): from scan_dataset.
        dataset_cfg (DatasetConfig): read with getattr (kohya keys): resolution and bucket keys, caption keys,
            flip_aug, random_crop, cache_latents, cache_latents_to_disk, train_batch_size, prior_loss_weight,
            max_data_loader_n_workers (reader threads of iter_batches), train_data_dir (the disk cache goes to
            `<train_data_dir>/.lora_trainer_cache`).
        model_id (str, optional): the model's identity, part of latent-cache keys, defaults to "".
        encode_images (Callable, optional): `[B,3,H,W]` in [-1, 1] -> latents (adapter.encode_images); without it
            batches carry pixels, defaults to None.
        cache_dir (str, optional): disk cache folder instead of the default.
    """

    def __init__(self, index: DatasetIndex, dataset_cfg, model_id: str = "", encode_images=None, cache_dir=None):
        if callable(model_id) and not callable(encode_images):  # tolerate (index, cfg, encode_images, model_id)
            model_id, encode_images = encode_images or "", model_id
        cfg = getattr(dataset_cfg, "dataset", dataset_cfg)
        self._index = index
        self.items = list(index.items)
        self.description = index.description
        self.caption_options = CaptionOptions.from_config(cfg)
        self.bucket_settings = BucketSettings.from_config(cfg)
        self._settings_per_item(cfg)
        self.batch_size = self.batch_sizes[0]
        self.processes = 1  # data-parallel processes: an epoch is planned in global batches of processes x size
        self.flip_aug = any(self.item_flip)
        self.random_crop = any(self.item_random_crop)
        prior = getattr(cfg, "prior_loss_weight", None)
        self.prior_loss_weight = 1.0 if prior is None else float(prior)
        self.encode_images = encode_images
        self.workers = max(0, int(getattr(cfg, "max_data_loader_n_workers", 0) or 0))
        self.model_id = str(model_id)
        to_disk = bool(getattr(cfg, "cache_latents_to_disk", False))
        self.cache: LatentCache | None = None
        if getattr(cfg, "cache_latents", False) or to_disk:
            if self.random_crop:
                raise ConfigError(
                    "random_crop: cannot be used with cache_latents / cache_latents_to_disk (a cached latent fixes "
                    "the crop). Turn random_crop off, or turn latent caching off."
                )
            if to_disk and not cache_dir:
                root = getattr(cfg, "train_data_dir", "")
                if self.description:  # beside the dataset config: its subsets may live anywhere
                    root = os.path.dirname(self.description.path)
                cache_dir = os.path.join(os.fspath(root or "."), CACHE_FOLDER)
            self.cache = LatentCache(self.model_id, cache_dir if to_disk else None)

    def _settings_per_item(self, cfg) -> None:
        """Caption options, flip and crop per image, and buckets and batch size per dataset: a dataset config's
        subsets and datasets set them (kohya's levels); images from folders all take the run's settings."""
        subsets = self.description.subsets if self.description else []
        datasets = self.description.datasets if self.description else [cfg]
        sources = [subsets[item.subset] if subsets else cfg for item in self.items]
        options = {id(s): CaptionOptions.from_config(s) for s in subsets or [cfg]}
        self.item_options = [options[id(source)] for source in sources]
        self.item_flip = [bool(getattr(source, "flip_aug", False)) for source in sources]
        self.item_random_crop = [bool(getattr(source, "random_crop", False)) for source in sources]
        self.batch_sizes = [max(1, int(getattr(d, "train_batch_size", 1) or 1)) for d in datasets]
        bucketers = [Bucketer(BucketSettings.from_config(d)) for d in datasets]
        self.dataset_bucket_settings = [b.settings for b in bucketers]
        self.placements = [bucketers[self._dataset_of(item)].place(item.width, item.height) for item in self.items]

    def _dataset_of(self, item) -> int:
        return item.dataset if self.description else 0

    # --- epoch order ----------------------------------------------------------------------------------------------

    def _epoch_samples(self) -> list[int]:
        """Item indexes of one epoch before shuffling, dataset by dataset (kohya balances each dataset alone)."""
        return [i for number in range(len(self.batch_sizes)) for i in self._dataset_samples(number)]

    def _dataset_samples(self, number: int) -> list[int]:
        """Train images x repeats, then regularisation images balanced to the same count as kohya does (whole
        repeats until enough, then one more use each in turn)."""
        mine = [i for i, item in enumerate(self.items) if self._dataset_of(item) == number]
        samples = [i for i in mine if not self.items[i].is_reg for _ in range(self.items[i].repeats)]
        reg = [i for i in mine if self.items[i].is_reg]
        if not reg:
            return samples
        wanted, reg_samples = len(samples), []
        for i in reg:
            if len(reg_samples) >= wanted:
                break
            reg_samples.extend([i] * self.items[i].repeats)
        turn = 0
        while len(reg_samples) < wanted:
            reg_samples.append(reg[turn % len(reg)])
            turn += 1
        return samples + reg_samples

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self._epoch_samples())

    def batches_per_epoch(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        counts: dict[tuple[int, tuple[int, int]], int] = {}
        for i in self._epoch_samples():
            key = self._batch_group(i)
            counts[key] = counts.get(key, 0) + 1
        return sum(-(-n // self._global_batch_size(key[0])) for key, n in counts.items())

    def _global_batch_size(self, dataset: int) -> int:
        """train_batch_size is per process (kohya): a global batch holds one batch of every process."""
        return self.batch_sizes[dataset] * self.processes

    def _batch_group(self, i: int) -> tuple[int, tuple[int, int]]:
        """Samples batch together when they share a dataset (its batch size) and a bucket."""
        return self._dataset_of(self.items[i]), self.placements[i].bucket

    def epoch_batches(self, epoch: int, seed: int) -> list[BatchPlan]:
        """The batches of one epoch, shuffled within and across buckets; a pure function of (seed, epoch).

        Args:
            epoch (int): epoch number (counted from 1, as kohya; the same number gives the same batches).
            seed (int): the run's seed.

        Returns:
            list[BatchPlan]: every sample of the epoch once; the last batch of a bucket may be smaller. With
            several processes each plan is a global batch, of which every process loads its `share`.
        """
        rng = _rng(seed, epoch)
        by_group: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for i in self._epoch_samples():
            by_group.setdefault(self._batch_group(i), []).append(i)
        plans = []
        for group in sorted(by_group):
            members, size = by_group[group], self._global_batch_size(group[0])
            rng.shuffle(members)
            for start in range(0, len(members), size):
                chunk = tuple(members[start:start + size])
                flips = tuple(self.item_flip[i] and rng.random() < 0.5 for i in chunk)
                crops = tuple(self._crop(i, rng) for i in chunk)
                plans.append(BatchPlan(group[1], chunk, flips, crops))
        rng.shuffle(plans)
        return plans

    def _crop(self, i: int, rng: random.Random) -> tuple[int, int]:
        return self.placements[i].random_crop(rng) if self.item_random_crop[i] else self.placements[i].center_crop()

    # --- batches --------------------------------------------------------------------------------------------------

    def _request(self, i: int, crop, flip: bool) -> LatentRequest:
        return LatentRequest(self.items[i].path, self.placements[i], tuple(crop), bool(flip))

    def _size_cond(self, plan: BatchPlan) -> torch.Tensor:
        rows = []
        for i, (top, left), flip in zip(plan.items, plan.crops, plan.flips):
            item, placement = self.items[i], self.placements[i]
            if flip:  # the kept window measured from the mirrored image's left edge
                left = placement.resized[0] - left - placement.bucket[0]
            rows.append([item.height, item.width, top, left, placement.bucket[1], placement.bucket[0]])
        return torch.tensor(rows, dtype=torch.float32)

    def _requests(self, plan: BatchPlan) -> list[LatentRequest]:
        return [self._request(i, c, f) for i, c, f in zip(plan.items, plan.crops, plan.flips)]

    def _read(self, plan: BatchPlan, seed: int, epoch: int, index: int, share: slice | None = None) -> Batch:
        """The CPU part of load_batch (safe in a worker thread): captions, cached latents or pixels; never encodes."""
        rng = _rng(seed, epoch, index, "captions")
        # captions of the whole global batch, in order, so every sample's caption is the same in any process count
        captions = [process_caption(self.items[i].caption, self.item_options[i], rng, epoch=epoch) for i in plan.items]
        if share is not None:
            plan, captions = part_of(plan, share), captions[share]
        requests = self._requests(plan)
        latents = pixels = None
        keep = list(range(len(requests)))
        if self.cache is not None:
            found = [self.cache.get(r) for r in requests]
            if all(latent is not None for latent in found):
                latents = torch.stack(found)
        else:
            keep, read = _readable_pixels(requests)
            pixels = torch.stack(read)
        weights = [self.prior_loss_weight if self.items[i].is_reg else 1.0 for i in plan.items]
        batch = Batch(
            latents, pixels, captions, self._size_cond(plan), torch.tensor(weights, dtype=torch.float32),
            [self.items[i].path for i in plan.items], list(plan.flips),
        )
        return batch if len(keep) == len(requests) else _subset(batch, keep)

    def _encode(self, plan: BatchPlan, batch: Batch) -> Batch:
        """The model part of load_batch (caller's thread): encode pixels, or fill cache misses."""
        if batch.latents is not None:
            return batch
        if self.cache is not None:
            requests = self._requests(plan)
            missing = [r for r in requests if self.cache.get(r) is None]
            if missing and self.encode_images is None:
                raise ConfigError(
                    f"cache_latents: {missing[0].path} has no cached latent and no image encoder was given. "
                    "Call cache_latents() with the model's encode_images before training."
                )
            self.cache.cache_all(missing, self.encode_images, batch_size=len(missing))
            batch.latents = torch.stack([self.cache.get(r) for r in requests])
        elif self.encode_images is not None:
            with torch.no_grad():
                batch.latents = self.encode_images(batch.pixels)
            batch.pixels = None
        return batch

    def load_batch(self, plan: BatchPlan, seed: int, epoch: int, index: int, share: slice | None = None) -> Batch:
        """Load one planned batch, or this process's share of it.

        Args:
            plan (BatchPlan): from epoch_batches.
            seed (int): the run's seed.
            epoch (int): epoch number (from 1; used by caption_dropout_every_n_epochs).
            index (int): the batch's position in the epoch (seeds its caption randomness).
            share (slice, optional): the positions in `plan` this process trains on (not empty), defaults to all.

        Returns:
            Batch: latents (cached, or encoded now) or pixels (no encoder), processed captions, size conditioning,
            loss weights.
        """
        local = plan if share is None else part_of(plan, share)
        return self._encode(local, self._read(plan, seed, epoch, index, share))

    def iter_batches(self, epoch: int, seed: int, start: int = 0, workers: int | None = None):
        """Yield `(index, Batch)` for one epoch from batch `start` on, reading ahead in worker threads.

        Images are read, resized and cropped (or cached latents fetched) in `workers` threads; encoding stays in
        the calling thread. The batches are exactly those of load_batch, in epoch_batches order.

        Args:
            epoch (int): epoch number (from 1).
            seed (int): the run's seed.
            start (int, optional): first batch index (resume mid-epoch), defaults to 0.
            workers (int, optional): reader threads; 0 reads in the calling thread, defaults to the config's
                max_data_loader_n_workers.

        Yields:
            tuple[int, Batch]: the batch index in the epoch and the batch.
        """
        plans = self.epoch_batches(epoch, seed)
        workers = self.workers if workers is None else max(0, int(workers))
        if workers == 0:
            for index in range(start, len(plans)):
                yield index, self.load_batch(plans[index], seed, epoch, index)
            return
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-data")
        try:
            pending: deque = deque()
            next_index = start
            for index in range(start, len(plans)):
                while next_index < len(plans) and len(pending) < 2 * workers:
                    pending.append(pool.submit(self._read, plans[next_index], seed, epoch, next_index))
                    next_index += 1
                yield index, self._encode(plans[index], pending.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # --- caches and metadata --------------------------------------------------------------------------------------

    def latent_requests(self) -> list[LatentRequest]:
        """Every latent training can ask for (center crop; both flips with flip_aug)."""
        return [self._request(i, self.placements[i].center_crop(), flip) for i in range(len(self.items))
                for flip in ((False, True) if self.item_flip[i] else (False,))]

    def cache_latents(self, batch_size: int = 1, progress=None, cancel=None) -> CacheReport:
        """Encode every latent up front (with cache_latents on).

        Args:
            batch_size (int, optional): images per encode call, defaults to 1.
            progress (Callable[[ProgressInfo], None], optional): called after each batch.
            cancel (CancelToken, optional): checked between batches.

        Returns:
            CacheReport: what was encoded or found; images that cannot be decoded are skipped (warned, left out of
            the epochs).
        """
        if self.cache is None:
            raise ConfigError("cache_latents: is off for this dataset. Set cache_latents = true to cache latents.")
        if self.encode_images is None:
            raise ConfigError("cache_latents: no image encoder was given. Pass the model adapter's encode_images.")
        report = self.cache.cache_all(self.latent_requests(), self.encode_images, batch_size, progress, cancel)
        if report.skipped:
            self._drop(set(report.skipped))
        return report

    def _drop(self, paths: set[str]) -> None:
        """Leave out images found unreadable after the scan (before training starts, so every epoch agrees)."""
        keep = [i for i, item in enumerate(self.items) if item.path not in paths]
        self.items = [self.items[i] for i in keep]
        self.placements = [self.placements[i] for i in keep]
        logger.warning("%d image(s) left out of training: their data cannot be decoded", len(paths))

    def fixed_captions(self) -> list[str] | None:
        """The processed captions when they never change (text-encoder outputs may then be cached), else None."""
        if not all(is_fixed(opts, [item.caption]) for opts, item in zip(self.item_options, self.items)):
            return None
        rng = random.Random(0)
        return sorted({process_caption(item.caption, opts, rng) for opts, item in zip(self.item_options, self.items)})

    def bucket_info(self) -> dict | None:
        """Kohya's `ss_bucket_info` (counts with repeats), or None with enable_bucket off (kohya writes none)."""
        if not self.bucket_settings.enable_bucket:
            return None
        return bucket_info(self.placements, [item.repeats for item in self.items])

    def datasets_metadata(self) -> list[dict] | None:
        """Kohya's `ss_datasets` (each dataset with its bucket info and subsets) for a dataset config, else None."""
        if self.description is None:
            return None
        infos = []
        for number, settings in enumerate(self.dataset_bucket_settings):
            mine = [i for i, item in enumerate(self.items) if item.dataset == number]
            infos.append(bucket_info([self.placements[i] for i in mine], [self.items[i].repeats for i in mine])
                         if settings.enable_bucket else None)
        return kohya_datasets(self._index, infos)
