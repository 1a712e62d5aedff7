"""Memory and disk a run needs, checked once the model is loaded and before the network is created: the network's
weights, gradients and optimizer state against free memory, every planned save against free disk space."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import TrainingError

logger = logging.getLogger(__name__)

# Bytes of optimizer state per trainable parameter (float32 moments); unknown optimizers are counted as AdamW.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "pagedadamw8bit": 2, "lion": 4, "lion8bit": 1,
                         "sgdnesterov": 4, "sgdnesterov8bit": 1, "adafactor": 4, "prodigy": 16, "dadaptation": 12,
                         "dadaptadam": 12, "dadaptlion": 8, "came": 8}


@dataclass(frozen=True)
class ResourceEstimate:
    """Memory and disk a run needs.

    Attributes:
        parameters (int): trainable parameters of the network.
        training_bytes (int): weights + gradients + optimizer state (+ the EMA on the training device; float32).
        disk_bytes (int): every LoRA file and resume state the run will keep.
        saves (int): LoRA files the run writes and keeps.
    """

    parameters: int
    training_bytes: int
    disk_bytes: int
    saves: int


def count_network_parameters(targets: dict, network_config) -> int:
    """Trainable parameters `LoRANetwork.create` would make, from the target shapes (nothing is allocated).

    Args:
        targets (dict): `adapter.lora_targets(include_conv)`.
        network_config (NetworkConfig): network keys (ranks, algo, block dims, train_*_only).

    Returns:
        int: the parameter count.
    """
    from torch import nn

    from lora_trainer.networks import NetworkSettings

    settings = NetworkSettings.from_config(network_config)
    factor = 2 if settings.algo == "loha" else 1
    total = 0
    for component, named in targets.items():
        if not (settings.train_unet if component == "unet" else settings.train_te):
            continue
        for name, module in named.items():
            dim, _ = settings.dim_alpha(name, module, component)
            if dim <= 0:
                continue
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                size_in, size_out = module.in_channels * k, module.out_channels
            elif isinstance(module, nn.MultiheadAttention):
                size_in = size_out = module.embed_dim
            else:
                size_in, size_out = module.in_features, module.out_features
            total += factor * dim * (size_in + size_out)
    return total


def estimate_resources(config, parameters: int, plan) -> ResourceEstimate:
    """Memory and disk for a network of `parameters` trained under `plan`.

    Args:
        config (TrainConfig): the run's config (optimizer, save keys).
        parameters (int): from `count_network_parameters`.
        plan (StepPlan): steps and epochs.

    Returns:
        ResourceEstimate: the estimate.
    """
    from lora_trainer.train.checkpoints import save_dtype

    optimizer = str(config.optimizer.optimizer_type).lower().replace("_", "").split(".")[-1]
    state_bytes = OPTIMIZER_STATE_BYTES.get(optimizer, 8)
    ema = 4 if config.training.ema else 0  # a float32 copy; on the CPU with ema_device = "cpu"
    training = parameters * (4 + 4 + state_bytes + (ema if config.training.ema_device == "same" else 0))
    s = config.save
    step_saves = (plan.total_steps - 1) // s.save_every_n_steps if s.save_every_n_steps else 0
    epoch_saves = (plan.total_epochs - 1) // s.save_every_n_epochs if s.save_every_n_epochs else 0
    if epoch_saves and s.save_last_n_epochs:
        epoch_saves = min(epoch_saves, int(s.save_last_n_epochs) + 1)
    saves = 1 + step_saves + epoch_saves
    lora_bytes = parameters * save_dtype(s.save_precision).itemsize * (2 if ema else 1)  # and the -ema file
    state = parameters * (4 + state_bytes + ema) if s.save_state else 0
    return ResourceEstimate(parameters, training, saves * (lora_bytes + state), saves)


def available_memory(device) -> int | None:
    """Free memory of a device in bytes (CUDA: the driver's free memory; CPU: the system's available memory).

    Args:
        device (str | torch.device): the device.

    Returns:
        int, optional: bytes, None where unknown.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
            return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else None
    return None


def check_resources(config, adapter, plan, folder: Path, free_memory: int | None = None) -> ResourceEstimate:
    """Refuse a network that does not fit in memory, or saves that do not fit on the disk, before any step.

    Args:
        config (TrainConfig): the run's config.
        adapter (ModelAdapter): the loaded model (targets and device).
        plan (StepPlan): steps and epochs.
        folder (Path): the output folder.
        free_memory (int, optional): bytes free on the device; measured when None (the default).

    Returns:
        ResourceEstimate: what was checked.
    """
    from lora_trainer.networks import NetworkSettings

    include_conv = NetworkSettings.from_config(config.network).wants_conv
    parameters = count_network_parameters(adapter.lora_targets(include_conv), config.network)
    estimate = estimate_resources(config, parameters, plan)
    free = available_memory(adapter.device) if free_memory is None else free_memory
    n = config.network
    if free is not None and estimate.training_bytes > free:
        raise TrainingError(
            f"network_dim: a rank of {n.network_dim}" + (f" (conv_dim {n.conv_dim})" if n.conv_dim else "")
            + f" makes {parameters:,} trainable parameters needing about {_gib(estimate.training_bytes)} (weights, "
            f"gradients and {config.optimizer.optimizer_type} state), but {adapter.device} has {_gib(free)} free. "
            "Lower network_dim / conv_dim (e.g. 16 or 32), or use an 8-bit optimizer.")
    disk = shutil.disk_usage(folder).free
    if estimate.disk_bytes > disk:
        raise TrainingError(
            f"output_dir: {folder} has {_gib(disk)} free, but this run writes {estimate.saves} LoRA file(s)"
            + (" and resume states" if config.save.save_state else "") + f" of about {_gib(estimate.disk_bytes)}. "
            "Free disk space, choose another output_dir, save less often (save_every_n_steps / "
            "save_every_n_epochs, save_last_n_epochs), or lower network_dim.")
    logger.info("network: %s trainable parameters, about %s to train; saves need about %s on disk", f"{parameters:,}",
                _gib(estimate.training_bytes), _gib(estimate.disk_bytes))
    return estimate


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**26 else f"{size / 2**20:.1f} MiB"
