"""Validation loss on a held-out share of every concept folder (kohya's `validation_split`).

The split depends only on the image list and `validation_seed`, so a resumed run and any process count hold out the
same images. Each held-out image is evaluated at the fixed timesteps 200/400/600/800 with noise drawn from its own
seeded generator, so figures are comparable across steps; the evaluation runs without gradients, with the network
in eval mode, inside a forked torch RNG, so training draws the same random numbers with and without validation.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from lora_trainer.data.captions import process_caption
from lora_trainer.data.folders import DatasetIndex, ImageItem
from lora_trainer.errors import ConfigError
from lora_trainer.train.loss import compute_target, diffusion_loss
from lora_trainer.train.noise import add_noise

logger = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = (200, 400, 600, 800)


@dataclass(frozen=True)
class ValidationSplit:
    """A dataset divided into the images trained on and the images held out.

    Attributes:
        train (DatasetIndex): the index training uses (held-out images removed).
        held_out (DatasetIndex): the held-out images, sorted by folder then path (empty without a split).
    """

    train: DatasetIndex
    held_out: DatasetIndex


@dataclass(frozen=True)
class ValidationResult:
    """One evaluation: the mean loss over every held-out image and timestep, and per concept folder."""

    loss: float
    per_concept: dict[str, float] = field(default_factory=dict)


def _folder_key(item: ImageItem) -> tuple[int, int, str]:
    return item.dataset, item.subset, item.folder or item.concept


def concept_name(item: ImageItem) -> str:
    """The name a validation figure is reported under: the concept, else the folder (dataset config subsets)."""
    return item.concept or item.folder or os.path.basename(os.path.dirname(item.path))


def _split_of(index: DatasetIndex, item: ImageItem, split: float, seed: int) -> tuple[float, int]:
    """A dataset config's `validation_split`/`validation_seed` for the item's dataset, else the run's."""
    if index.description is None:
        return split, seed
    spec = index.description.datasets[item.dataset]
    return (split if spec.validation_split is None else spec.validation_split,
            seed if spec.validation_seed is None else spec.validation_seed)


def split_validation(index: DatasetIndex, split: float, seed: int) -> ValidationSplit:
    """Hold out `split` of every training concept folder (regularisation images are never held out).

    Args:
        index (DatasetIndex): the scanned dataset; a dataset config's datasets may set their own split and seed.
        split (float): share in [0, 1) held out per folder; a folder with any share holds out at least one image.
        seed (int): `validation_seed`; with the folder's name it picks the images.

    Returns:
        ValidationSplit: training and held-out indexes.

    Raises:
        ConfigError: a folder would keep no training image.
    """
    folders: dict[tuple[int, int, str], list[ImageItem]] = defaultdict(list)
    for item in index.items:
        if not item.is_reg:
            folders[_folder_key(item)].append(item)
    held: set[tuple] = set()
    for key, items in sorted(folders.items()):
        share, folder_seed = _split_of(index, items[0], split, seed)
        if not share:
            continue
        items = sorted(items, key=lambda i: i.path)
        count = max(1, round(len(items) * share))
        if count >= len(items):
            raise ConfigError(
                f"validation_split = {share:g}: the concept folder {key[2]} has {len(items)} image(s), so holding "
                f"out {count} leaves none to train on. Lower validation_split or add images to {key[2]}."
            )
        rng = random.Random(f"validation:{folder_seed}:{key[0]}:{key[1]}:{key[2]}")
        held.update((key, items[i].path) for i in rng.sample(range(len(items)), count))
    if not held:
        return ValidationSplit(index, DatasetIndex(description=index.description))

    def is_held(item: ImageItem) -> bool:
        return not item.is_reg and (_folder_key(item), item.path) in held

    held_items = sorted((i for i in index.items if is_held(i)), key=lambda i: (_folder_key(i), i.path))
    dirs = {name: dict(entry) for name, entry in index.dirs.items()}
    for item in held_items:
        if item.folder in dirs:
            dirs[item.folder]["img_count"] -= 1
    train = dataclasses.replace(index, items=[i for i in index.items if not is_held(i)], dirs=dirs)
    logger.info("validation: %d image(s) held out of %d training image(s)", len(held_items), len(index.train_items))
    return ValidationSplit(train, DatasetIndex(items=held_items, description=index.description))


def _seed_global_rng(seed: int, device) -> None:
    """Seed the CPU generator and the model device's (only inside `fork_rng`, which restores them)."""
    torch.default_generator.manual_seed(seed)
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


class Validator:
    """Evaluates the validation loss of a network on the held-out images.

    Args:
        config (TrainConfig): the run's config (validate_every_n_*, max_validation_steps, dataset keys).
        adapter (ModelAdapter): the model.
        held_out (DatasetIndex): from `split_validation`.
        seed (int): `validation_seed` (seeds captions and noise per image).
    """

    def __init__(self, config, adapter, held_out: DatasetIndex, seed: int):
        from lora_trainer.data.loader import TrainDataset

        t = config.training
        self.every_steps, self.every_epochs = t.validate_every_n_steps, t.validate_every_n_epochs
        self.adapter, self.seed = adapter, int(seed)
        self.dataset = TrainDataset(held_out, config.dataset, adapter.model_id, adapter.encode_images) \
            if held_out.items else None
        limit = t.max_validation_steps or len(held_out.items)
        self.indexes = list(range(min(limit, len(held_out.items))))
        self.captions = [self._caption(i) for i in self.indexes]

    def _caption(self, i: int) -> str:
        """One fixed caption per image (shuffle and dropout drawn once, from the seed)."""
        rng = random.Random(f"validation-caption:{self.seed}:{i}")
        return process_caption(self.dataset.items[i].caption, self.dataset.item_options[i], rng, epoch=1)

    def due(self, step: int | None = None, epoch: int | None = None) -> bool:
        """True after a step that `validate_every_n_steps` names, or after an epoch that `validate_every_n_epochs`
        names (every epoch when it is not set, as kohya does)."""
        if self.dataset is None:
            return False
        if step is not None:
            return bool(self.every_steps) and step % self.every_steps == 0
        return epoch is not None and epoch % (self.every_epochs or 1) == 0

    def evaluate(self, network, text, precision, loss_options) -> ValidationResult:
        """The validation loss of `network` as applied to the model now.

        Args:
            network (LoRANetwork): put in eval mode for the evaluation, its mode restored after.
            text (TextSource): captions -> conditioning (its cache holds `self.captions` when it has one).
            precision (Precision): the run's autocast.
            loss_options (LossOptions): the run's loss weighting.

        Returns:
            ValidationResult: mean loss in total and per concept folder.
        """
        device = torch.device(self.adapter.device)
        was_training = network.training
        sums: dict[str, list[float]] = defaultdict(list)
        network.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for position, i in enumerate(self.indexes):
                    loss = self._image_loss(i, self.captions[position], text, precision, loss_options)
                    if loss is not None:
                        sums[concept_name(self.dataset.items[i])].append(loss)
        finally:
            network.train(was_training)
        every = [value for values in sums.values() for value in values]
        per_concept = {name: sum(values) / len(values) for name, values in sorted(sums.items())}
        return ValidationResult(sum(every) / len(every) if every else float("nan"), per_concept)

    def _image_loss(self, i: int, caption: str, text, precision, loss_options) -> float | None:
        from lora_trainer.data.loader import BatchPlan

        placement = self.dataset.placements[i]
        plan = BatchPlan(placement.bucket, (i,), (False,), (placement.center_crop(),))
        _seed_global_rng(random.Random(f"validation-encode:{self.seed}:{i}").getrandbits(63), self.adapter.device)
        batch = self.dataset.load_batch(plan, self.seed, 1, i)  # an encoder that samples draws the same each time
        if batch.latents is None or len(batch.latents) == 0:  # unreadable image (logged by the loader)
            return None
        device, ac, n = self.adapter.device, self.adapter.alphas_cumprod, len(VALIDATION_TIMESTEPS)
        latents = batch.latents.to(device=device, dtype=torch.float32).repeat(n, 1, 1, 1)
        generator = torch.Generator().manual_seed(random.Random(f"validation-noise:{self.seed}:{i}").getrandbits(63))
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.tensor(VALIDATION_TIMESTEPS, device=device, dtype=torch.long)
        noisy = add_noise(latents, noise, timesteps, ac)
        with precision.autocast():
            pred = self.adapter.predict(noisy, timesteps, text([caption] * n), batch.size_cond.repeat(n, 1).to(device))
        target = compute_target(latents, noise, timesteps, ac, self.adapter.prediction_type)
        return float(diffusion_loss(pred.float(), target, timesteps, ac, loss_options, torch.ones(n)))
