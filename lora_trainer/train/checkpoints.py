"""Saving during training: kohya file names, the LoRA file with metadata, the config beside it, old-epoch pruning."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from lora_trainer.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "fp32": torch.float32}


def checkpoint_stem(output_name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: `<name>-000002` after epoch 2, `<name>-step00000100` at step 100, `<name>` at the end.

    Args:
        output_name (str): `output_name`.
        epoch (int, optional): 1-based epoch of an epoch save.
        step (int, optional): global step of a step save.

    Returns:
        str: the file stem.
    """
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    if step is not None:
        return f"{output_name}-step{step:08d}"
    return output_name


def save_dtype(save_precision: str | None) -> torch.dtype:
    """The tensor dtype of `save_precision` ("fp16", "bf16", "float").

    Args:
        save_precision (str, optional): None means fp16.

    Returns:
        torch.dtype: the dtype.
    """
    try:
        return SAVE_DTYPES[save_precision or "fp16"]
    except KeyError:
        raise ConfigError(f"save_precision: {save_precision!r} is not fp16, bf16 or float. Use one of those.") from None


def check_finite(network_sd: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to save weights that hold NaN or inf (the last good file stays).

    Args:
        network_sd (dict[str, torch.Tensor]): weights about to be saved.
        step (int): global step, for the message.
    """
    bad = [k for k, v in network_sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(
            f"step {step}: LoRA weights hold NaN/inf ({bad[0]} and {len(bad) - 1} more); nothing was saved and the "
            "last saved file is kept. Lower learning_rate, use mixed_precision = \"bf16\" or \"no\" instead of "
            "fp16, or keep max_grad_norm at 1.0."
        )


def write_lora(path: Path, network, config, metadata: dict[str, str], ema=None) -> Path:
    """Write the LoRA (in `save_precision`) with metadata, the config as `<stem>.toml` and the EMA as `<stem>-ema`
    beside it.

    Args:
        path (Path): the `.safetensors` file.
        network (LoRANetwork): the trained network.
        config (TrainConfig): the run's config (saved with `save_toml`).
        metadata (dict[str, str]): `ss_*` metadata.
        ema (LoraEma, optional): the run's EMA (`ema = true`), written as `<stem>-ema.safetensors`.

    Returns:
        Path: the LoRA file.
    """
    from lora_trainer.config import save_toml
    from lora_trainer.networks import save_lora

    dtype = save_dtype(config.save.save_precision)
    save_lora(path, network.state_dict_kohya(dtype), metadata)
    if ema is not None:
        ema.save(path, dtype, metadata)
    save_toml(config, path.with_suffix(".toml"))
    return path


def prune_old_epochs(folder: Path, output_name: str, epoch: int, every: int, keep: int | None) -> None:
    """kohya's `save_last_n_epochs`: after saving `epoch`, remove the epoch file `keep` saves back.

    Args:
        folder (Path): output folder.
        output_name (str): `output_name`.
        epoch (int): the epoch just saved (1-based).
        every (int): `save_every_n_epochs`.
        keep (int, optional): `save_last_n_epochs`; None or 0 keeps all.
    """
    if not keep or keep <= 0:
        return
    old = epoch - every * keep
    if old <= 0:
        return
    stem = checkpoint_stem(output_name, epoch=old)
    for suffix in (".safetensors", ".toml", "-ema.safetensors"):
        victim = folder / f"{stem}{suffix}"
        if victim.exists():
            victim.unlink()
            logger.info("removed %s (save_last_n_epochs=%d)", victim, keep)

