"""Learning-rate schedules by kohya's `lr_scheduler` names, built with diffusers' `get_scheduler`."""
from __future__ import annotations

import logging

import torch
from diffusers.optimization import get_scheduler

from lora_trainer.config.schema import SCHEDULERS
from lora_trainer.errors import ConfigError

logger = logging.getLogger(__name__)



def resolve_warmup_steps(warmup_steps: int | float, total_steps: int) -> int:
    """kohya's rule: an int is a step count, a float below 1 is a ratio of `total_steps`.

    Args:
        warmup_steps (int | float): `lr_warmup_steps`.
        total_steps (int): optimizer steps of the run.

    Returns:
        int: warm-up steps.
    """
    if warmup_steps is None:
        return 0
    if warmup_steps < 0:
        raise ConfigError(f"lr_warmup_steps: {warmup_steps} is negative. Use a step count or a ratio in [0, 1).")
    if isinstance(warmup_steps, float) and warmup_steps < 1:
        return int(warmup_steps * total_steps)
    return int(warmup_steps)


def _is_relative_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Create the schedule for `optimizer`, stepped once per optimizer step.

    Args:
        name (str): constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial
            (Adafactor with relative_step=True always gets its own schedule, as in kohya).
        optimizer (torch.optim.Optimizer): the optimizer.
        total_steps (int): optimizer steps of the run.
        warmup_steps (int | float, optional): steps, or a ratio < 1 of `total_steps`, defaults to 0.
        num_cycles (int, optional): hard restarts for cosine_with_restarts, defaults to 1.
        power (float, optional): polynomial power, defaults to 1.0.

    Returns:
        torch.optim.lr_scheduler.LRScheduler: the schedule (its state dict is part of the resume state).
    """
    if _is_relative_adafactor(optimizer):
        from transformers.optimization import AdafactorSchedule

        logger.info("Adafactor with relative_step=True: lr_scheduler %r replaced by Adafactor's own schedule", name)
        return AdafactorSchedule(optimizer)
    key = (name or "constant").lower()
    if key not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler: unknown schedule {name!r}. Use one of {', '.join(SCHEDULERS)}.")
    warmup = resolve_warmup_steps(warmup_steps, total_steps)
    if key == "constant" and warmup:
        logger.warning("lr_scheduler constant ignores lr_warmup_steps=%s; use constant_with_warmup", warmup_steps)
    kwargs = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    if key == "cosine_with_restarts":
        kwargs["num_cycles"] = int(num_cycles or 1)
    if key == "polynomial":
        kwargs["power"] = float(power)
    if key == "constant":
        kwargs = {}
    elif key == "constant_with_warmup":
        kwargs.pop("num_training_steps")
    return get_scheduler(key, optimizer, **kwargs)
