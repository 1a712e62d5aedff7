"""Optimizers by kohya's `optimizer_type` names, with `optimizer_args` given as "key=value" strings."""
from __future__ import annotations

import ast
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from lora_trainer.config.schema import OPTIMIZERS
from lora_trainer.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

OPTIMIZER_TYPES = OPTIMIZERS  # the config validates names against the same tuple


def parse_optimizer_args(args: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """Parse kohya's `optimizer_args` ("betas=0.9,0.99", "weight_decay=0.01", "relative_step=False").

    Args:
        args (list[str], optional): "key=value" strings; values are Python literals (`ast.literal_eval`).

    Returns:
        dict: keyword arguments for the optimizer class.
    """
    kwargs: dict[str, Any] = {}
    for item in args or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"optimizer_args: {item!r} is not 'key=value'. Write e.g. \"weight_decay=0.01\".")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(
                f"optimizer_args: value of {key!r} ({value!r}) is not a Python literal. Use numbers, True/False, "
                f"tuples like 0.9,0.99, or quote strings: {key}='text'."
            ) from exc
    return kwargs


def _bitsandbytes(class_name: str) -> Callable:
    try:
        import bitsandbytes as bnb

        return getattr(bnb.optim, class_name)
    except (ImportError, RuntimeError, OSError, AttributeError) as exc:
        raise TrainingError(
            f"optimizer_type {class_name}: bitsandbytes cannot be used here ({exc}). Install a bitsandbytes build "
            f"for this platform (pip install -U bitsandbytes) or set optimizer_type = \"AdamW\"."
        ) from exc


def _import(module: str, attr: str, pip_name: str, optimizer_type: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise TrainingError(
            f"optimizer_type {optimizer_type}: package {pip_name!r} is not installed. "
            f"Install it (pip install {pip_name}) or set optimizer_type = \"AdamW\"."
        ) from exc


def _sgd_nesterov(kwargs: dict) -> Callable:
    kwargs.setdefault("momentum", 0.9)
    kwargs["nesterov"] = True
    return torch.optim.SGD


def _adafactor(kwargs: dict, groups: list[dict], lr: float | None) -> tuple[Callable, float | None]:
    """kohya's Adafactor rules: relative_step defaults to True (lr is then computed by Adafactor itself)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step, so relative_step is set to True")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        if any(g.pop("lr", None) is not None for g in groups):
            logger.warning("Adafactor with relative_step=True ignores unet_lr/text_encoder_lr")
        if lr:
            logger.info("Adafactor with relative_step=True computes its own lr; learning_rate %g is ignored", lr)
        lr = None
    elif not lr or lr <= 0:
        raise ConfigError(
            "optimizer_args: Adafactor with relative_step=False needs a learning_rate > 0. Set learning_rate "
            "(e.g. 1e-5) or remove relative_step=False."
        )
    return _import("transformers.optimization", "Adafactor", "transformers", "Adafactor"), lr


def _resolve(name: str, kwargs: dict, groups: list[dict], lr: float | None) -> tuple[Callable, float | None]:
    key = name.lower()
    simple = {
        "adamw": lambda: torch.optim.AdamW,
        "adamw8bit": lambda: _bitsandbytes("AdamW8bit"),
        "pagedadamw8bit": lambda: _bitsandbytes("PagedAdamW8bit"),
        "lion8bit": lambda: _bitsandbytes("Lion8bit"),
        "lion": lambda: _import("lion_pytorch", "Lion", "lion-pytorch", name),
        "prodigy": lambda: _import("prodigyopt", "Prodigy", "prodigyopt", name),
        "dadaptation": lambda: _import("dadaptation", "DAdaptAdam", "dadaptation", name),
        "dadaptadam": lambda: _import("dadaptation", "DAdaptAdam", "dadaptation", name),
        "sgdnesterov": lambda: _sgd_nesterov(kwargs),
    }
    if key in simple:
        return simple[key](), lr
    if key == "adafactor":
        return _adafactor(kwargs, groups, lr)
    if "." in name:  # kohya accepts a full class path, e.g. "torch.optim.RMSprop"
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr), lr
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"optimizer_type: cannot import {name!r} ({exc}). Check the class path.") from exc
    raise ConfigError(f"optimizer_type: unknown optimizer {name!r}. Use one of {', '.join(OPTIMIZER_TYPES)}.")


def build_optimizer(
    optimizer_type: str,
    param_groups: list[dict] | list[torch.nn.Parameter],
    learning_rate: float | None,
    optimizer_args: list[str] | None = None,
) -> torch.optim.Optimizer:
    """Create the optimizer kohya would create for `optimizer_type`.

    Args:
        optimizer_type (str): kohya name, case-insensitive (AdamW, AdamW8bit, PagedAdamW8bit, Lion8bit, Lion,
            Prodigy, DAdaptation/DAdaptAdam, Adafactor, SGDNesterov) or a full class path.
        param_groups (list): parameter groups (dicts with "params" and optionally "lr") or parameters.
        learning_rate (float, optional): default lr for groups without their own.
        optimizer_args (list[str], optional): "key=value" strings, see `parse_optimizer_args`.

    Returns:
        torch.optim.Optimizer: the optimizer over `param_groups`.
    """
    kwargs = parse_optimizer_args(optimizer_args)
    groups = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in param_groups]
    if not any(len(list(g["params"])) for g in groups):
        raise TrainingError("network: there are no trainable parameters. Check network_train_unet_only / "
                            "network_train_text_encoder_only and the learning rates (0 disables a part).")
    cls, lr = _resolve(optimizer_type, kwargs, groups, learning_rate)
    if optimizer_type.lower() == "prodigy" and lr is not None and lr < 0.1:
        logger.warning("Prodigy adapts the step size; learning_rate is usually 1.0 (got %g)", lr)
    if lr is not None or optimizer_type.lower() == "adafactor":
        kwargs["lr"] = lr
    try:
        optimizer = _fused_adamw(cls, groups, kwargs) or cls(groups, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"optimizer_args: {optimizer_type} does not accept {sorted(kwargs)} ({exc}). Remove or rename the "
            f"argument."
        ) from exc
    logger.info("optimizer %s (%s) args %s", optimizer_type, type(optimizer).__name__, kwargs)
    return optimizer


def _fused_adamw(cls, groups: list[dict], kwargs: dict) -> torch.optim.Optimizer | None:
    """torch's fused AdamW when it applies: one kernel over all LoRA tensors instead of a loop over hundreds of
    small ones (a rank-64 SD1 LoRA has 528); 3x faster optimizer steps on CPU, the same numbers. None where the
    user chose an implementation, or this torch has no fused kernel for the device (CPU needs torch >= 2.4)."""
    if cls not in (torch.optim.AdamW, torch.optim.Adam) or "fused" in kwargs or "foreach" in kwargs:
        return None
    params = [p for g in groups for p in g["params"]]
    if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return None
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError) as exc:
        logger.debug("fused %s not available here (%s); using the default implementation", cls.__name__, exc)
        return None


def current_lr(optimizer: torch.optim.Optimizer, scheduler: Any = None) -> float:
    """The learning rate as a user would read it: the UNet group's (else the first group's), d*lr for
    Prodigy/D-Adaptation.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer.
        scheduler (optional): an Adafactor schedule, whose `get_lr()` reads Adafactor's own lr.

    Returns:
        float: the lr, 0.0 when unknown.
    """
    groups = optimizer.param_groups
    index = next((i for i, g in enumerate(groups) if str(g.get("name", "")).startswith("unet")), 0)
    group = groups[index]
    if group.get("lr") is None and scheduler is not None:
        return float(scheduler.get_lr()[index])
    lr = float(group.get("lr") or 0.0)
    return lr * float(group["d"]) if "d" in group else lr
