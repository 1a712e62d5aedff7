"""Putting the model into training shape and back: frozen weights, module modes, devices, mixed precision."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_trainer.errors import ConfigError

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelSnapshot:
    """Flags and devices of the model's modules before training, put back by `restore`."""

    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    devices: list[tuple[nn.Module, torch.device]] = field(default_factory=list)
    checkpointing: bool | None = None
    shape: TrainingShape | None = None

    def restore(self, adapter) -> None:
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, flag in self.training:
            module.training = flag
        for module, device in self.devices:
            module.to(device)
        if self.checkpointing is not None:
            adapter.enable_gradient_checkpointing(self.checkpointing)


def _roots(adapter) -> list[nn.Module]:
    return [adapter.unet(), adapter.vae(), *adapter.text_encoders()]


def _device_of(module: nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return None if param is None else param.device


@dataclass(frozen=True)
class TrainingShape:
    """How `training_mode` shapes the model (kept so a pause can put the shape back)."""

    train_te: bool
    gradient_checkpointing: bool
    offload_vae: bool
    offload_text_encoders: bool = False


@contextlib.contextmanager
def training_mode(adapter, *, train_te: bool, gradient_checkpointing: bool, offload_vae: bool,
                  offload_text_encoders: bool = False):
    """Freeze every model weight and set module modes for LoRA training; put everything back on exit.

    The UNet is in train mode only with gradient checkpointing (diffusers checkpoints in train mode only), the
    text encoders only when their LoRA trains; what the steps no longer need (the VAE once latents are cached,
    the text encoders once their outputs are) waits on the CPU. Sample previews still work: the adapters run
    each encoder on the device it is on.

    Args:
        adapter (ModelAdapter): the model.
        train_te (bool): text-encoder LoRA modules are trained.
        gradient_checkpointing (bool): checkpoint UNet (and TE) blocks.
        offload_vae (bool): move the VAE to the CPU while training.
        offload_text_encoders (bool, optional): move the text encoders to the CPU while training, defaults to False.

    Yields:
        ModelSnapshot: what will be restored (`lent_out` takes it).
    """
    snap = ModelSnapshot()
    snap.shape = TrainingShape(train_te, gradient_checkpointing, offload_vae, offload_text_encoders)
    for root in _roots(adapter):
        snap.requires_grad += [(p, p.requires_grad) for p in root.parameters()]
        snap.training += [(m, m.training) for m in root.modules()]
    try:
        _shape_for_training(adapter, snap)
        yield snap
    finally:
        snap.restore(adapter)


def _shape_for_training(adapter, snap: ModelSnapshot) -> None:
    shape = snap.shape
    for param, _ in snap.requires_grad:
        param.requires_grad_(False)
    adapter.unet().train(shape.gradient_checkpointing)
    adapter.vae().eval()
    for encoder in adapter.text_encoders():
        encoder.train(shape.train_te and shape.gradient_checkpointing)
    if shape.gradient_checkpointing:
        if snap.checkpointing is None:
            snap.checkpointing = bool(getattr(adapter.unet(), "is_gradient_checkpointing", False))
        adapter.enable_gradient_checkpointing(True)
    snap.devices = []
    idle = ([adapter.vae()] if shape.offload_vae else []) + \
        (list(adapter.text_encoders()) if shape.offload_text_encoders else [])
    for module in idle:
        device = _device_of(module)
        if device is not None and device.type != "cpu":
            snap.devices.append((module, device))
            module.to("cpu")


@contextlib.contextmanager
def lent_out(adapter, snap: ModelSnapshot):
    """The model as it was before training (modes, devices, checkpointing) for a pause, where the host generates
    with it; back in training shape on exit.

    Args:
        adapter (ModelAdapter): the model in `training_mode`.
        snap (ModelSnapshot): what `training_mode` yielded.
    """
    snap.restore(adapter)
    try:
        yield
    finally:
        _shape_for_training(adapter, snap)


class Precision:
    """Mixed precision as kohya's `mixed_precision`: autocast to fp16/bf16, fp32 trainable weights, and a
    GradScaler for fp16 on CUDA.

    Args:
        mixed_precision (str): "no", "fp16" or "bf16".
        device (torch.device): where the model runs.
        model_dtype (torch.dtype, optional): the frozen weights' dtype; half weights (a WebUI model) get autocast
            in their dtype even with "no", since float32 LoRA modules cannot take half inputs otherwise.
    """

    def __init__(self, mixed_precision: str | None, device: torch.device, model_dtype: torch.dtype | None = None):
        mode = mixed_precision or "no"
        if mode not in ("no", *AUTOCAST_DTYPES):
            raise ConfigError(f"mixed_precision: {mode!r} is not one of no, fp16, bf16. Pick one of those.")
        self.device_type = torch.device(device).type
        self.dtype = AUTOCAST_DTYPES.get(mode)
        if self.dtype is None and model_dtype in (torch.float16, torch.bfloat16):
            logger.info("mixed_precision \"no\" with %s model weights: autocast to %s", model_dtype, model_dtype)
            self.dtype = model_dtype
        if self.dtype == torch.bfloat16 and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("mixed_precision: this GPU has no bf16 support. Use mixed_precision = \"fp16\".")
        enabled = self.dtype == torch.float16 and self.device_type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if enabled else None

    def autocast(self):
        """The autocast context for forward passes (a no-op for "no")."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_grad_norm: float) -> None:
        """Unscale (fp16), clip to `max_grad_norm` (0 = off), step, update the scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_grad_norm and max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
