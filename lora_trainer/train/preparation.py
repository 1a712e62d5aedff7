"""Everything the loop needs before its first step: seed, data and caches, network, optimizer, the step plan."""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from lora_trainer.errors import ConfigError, DatasetError, TrainingError, is_out_of_memory
from lora_trainer.train.events import EventBus, Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """How long the run is.

    Attributes:
        batches_per_epoch (int): batches in one epoch.
        steps_per_epoch (int): optimizer steps in one epoch (batches / gradient_accumulation_steps, rounded up).
        total_steps (int): optimizer steps of the run.
        total_epochs (int): epochs of the run (the last may be cut short by total_steps).
    """

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int


def plan_steps(batches_per_epoch: int, accumulation: int, max_train_steps: int | None,
               max_train_epochs: int | None) -> StepPlan:
    """kohya's rule: max_train_epochs, when set, overrides max_train_steps.

    Args:
        batches_per_epoch (int): from the dataset.
        accumulation (int): gradient_accumulation_steps.
        max_train_steps (int, optional): steps when no epoch count is set.
        max_train_epochs (int, optional): epochs.

    Returns:
        StepPlan: the plan.
    """
    if batches_per_epoch <= 0:
        raise TrainingError("train_data_dir: the dataset gives no batch. Add images (and check the repeats prefix).")
    per_epoch = math.ceil(batches_per_epoch / max(1, int(accumulation or 1)))
    if max_train_epochs:
        total = int(max_train_epochs) * per_epoch
    elif max_train_steps and max_train_steps > 0:
        total = int(max_train_steps)
    else:
        raise ConfigError("max_train_steps: must be > 0 when max_train_epochs is not set. Set one of them.")
    return StepPlan(batches_per_epoch, per_epoch, total, math.ceil(total / per_epoch))


def seed_everything(seed: int | None) -> int:
    """Seed python, numpy and torch as kohya does; None picks a random seed (logged, so it can be repeated).

    Args:
        seed (int, optional): `seed`.

    Returns:
        int: the seed used.
    """
    if seed is None:
        seed = random.SystemRandom().randint(0, 2**31 - 1)
        logger.info("seed not set; using seed %d", seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return int(seed)


@dataclass
class TrainData:
    """The dataset of a run and, for fixed captions and a frozen text encoder, its text-encoder cache."""

    index: object
    dataset: object
    text_cache: object | None


def _progress(events: EventBus, stage: str):
    def report(info) -> None:
        events.emit(Progress(stage, info.done, info.total))

    return report


def refuse_unreadable_captions(index) -> None:
    """Stop on captions that cannot be read as UTF-8: a guessed caption trains the wrong words silently (kohya
    stops here too).

    Args:
        index (DatasetIndex): the scanned dataset.
    """
    if index.unreadable_captions:
        raise DatasetError("; ".join(index.unreadable_captions[:5]) + (
            f" (and {len(index.unreadable_captions) - 5} more)" if len(index.unreadable_captions) > 5 else ""))


def prepare_data(config, adapter, events: EventBus, train_te: bool, cancel=None, index=None) -> TrainData:
    """Scan the dataset, cache latents (cache_latents), and cache text-encoder outputs when captions are fixed and
    the text encoder is not trained. Caching reports `Progress` events.

    Args:
        config (TrainConfig): the run's config.
        adapter (ModelAdapter): the model (its encoders are used).
        events (EventBus): where progress goes.
        train_te (bool): text-encoder LoRA modules are trained (no text cache then).
        cancel (CancelToken, optional): stops caching early.
        index (DatasetIndex, optional): the dataset already scanned (by the checks before the model), defaults to
            None: scanned here.

    Returns:
        TrainData: index, dataset, text cache (or None).
    """
    from lora_trainer.data.cache import TextEncoderCache
    from lora_trainer.data.folders import scan_dataset
    from lora_trainer.data.loader import TrainDataset

    index = index if index is not None else scan_dataset(config.dataset)  # the scan logs its own problems
    refuse_unreadable_captions(index)
    dataset = TrainDataset(index, config.dataset, adapter.model_id, adapter.encode_images)
    if dataset.cache is not None:
        dataset.cache_latents(batch_size=config.dataset.train_batch_size, progress=_progress(events, "cache_latents"),
                              cancel=cancel)
    captions = None if train_te else dataset.fixed_captions()
    if config.dataset.cache_text_encoder_outputs and captions is None:
        logger.warning("cache_text_encoder_outputs is off for this run: captions change between epochs (shuffle, "
                       "dropout or wildcards) or the text encoder is trained")
    text_cache = None
    if captions is not None:
        text_cache = TextEncoderCache()
        model = config.model
        text_cache.encode_all(
            captions, lambda c: adapter.encode_captions(c, model.clip_skip, model.max_token_length),
            progress=_progress(events, "cache_text"), cancel=cancel,
        )
    return TrainData(index, dataset, text_cache)


class TextSource:
    """Captions -> conditioning on the model's device: from the cache, or encoded now (with gradients when the
    text-encoder LoRA trains)."""

    def __init__(self, adapter, model_config, cache, train_te: bool):
        self.adapter = adapter
        self.clip_skip = model_config.clip_skip
        self.max_token_length = model_config.max_token_length
        self.cache = cache
        self.train_te = train_te

    def __call__(self, captions: list[str]):
        if self.cache is not None:
            return self.cache.get(captions).to(device=self.adapter.device)
        with torch.set_grad_enabled(self.train_te and torch.is_grad_enabled()):
            return self.adapter.encode_captions(captions, self.clip_skip, self.max_token_length)


def build_network(config, adapter):
    """Create the LoRA network on the adapter's targets (conv targets when conv_dim or LoHa asks for them), with
    `network_weights` loaded when set, float32 on the model's device.

    Args:
        config (TrainConfig): the run's config.
        adapter (ModelAdapter): the model.

    Returns:
        LoRANetwork: not yet applied.
    """
    from lora_trainer.networks import LoRANetwork, NetworkSettings, load_lora

    include_conv = NetworkSettings.from_config(config.network).wants_conv
    try:
        network = LoRANetwork.create(adapter.lora_targets(include_conv), config.network)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        n = config.network
        raise TrainingError(f"network_dim: creating the network (rank {n.network_dim}"
                            + (f", conv_dim {n.conv_dim}" if n.conv_dim else "") + ") ran out of memory. Lower "
                            "network_dim / conv_dim (e.g. 16 or 32).") from exc
    if config.network.network_weights:
        state_dict, _ = load_lora(config.network.network_weights)
        report = network.load_kohya(state_dict)
        logger.info("network_weights: loaded %d modules from %s", len(report.loaded), config.network.network_weights)
    return network.to(device=adapter.device, dtype=torch.float32)


def param_groups(config, network) -> list[dict]:
    """Optimizer groups: unet_lr / text_encoder_lr, each defaulting to learning_rate (kohya).

    Args:
        config (TrainConfig): the run's config.
        network (LoRANetwork): the network.

    Returns:
        list[dict]: groups for `build_optimizer`.
    """
    opt = config.optimizer
    return network.param_groups(opt.unet_lr, opt.text_encoder_lr, config.network, default_lr=opt.learning_rate)
