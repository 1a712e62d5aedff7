"""The LoRA a run just trained, kept in memory so it can be put on the loaded model for a test generation.

Bypass injection as in training: the model's weights are never changed, so `remove()` gives back the model's
outputs bit for bit.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

TargetsFn = Callable[[object], dict[str, dict[str, nn.Module]]]


class LiveLoRA:
    """A trained `LoRANetwork` kept after its run; thread-safe.

    Args:
        network (LoRANetwork): the trained network (its targets are the modules of the model it was trained on).
        targets_fn (callable): `adapter -> adapter.lora_targets(include_conv)` with the run's conv setting; used
            to bind the network to another model object (the host reloaded its checkpoint).
        metadata (dict[str, str], optional): `ss_*` metadata written by `save`, defaults to none.
        ema (LoraEma, optional): the run's EMA of the weights; kept as `self.ema`, a LiveLoRA of its own.
    """

    def __init__(self, network, targets_fn: TargetsFn, metadata: dict[str, str] | None = None, ema=None):
        self.ema = LiveLoRA(ema.network_copy(), targets_fn) if ema is not None else None
        self._network = network
        self._targets_fn = targets_fn
        self._metadata = dict(metadata or {})
        self._lock = threading.RLock()
        self._multiplier = float(network.multiplier)
        network.eval()
        for param in network.parameters():
            param.requires_grad_(False)

    @property
    def network(self):
        """The `LoRANetwork` (bound to the model it was last applied to)."""
        return self._network

    @property
    def applied(self) -> bool:
        """True while the LoRA is on a model."""
        return bool(self._network.applied)

    @property
    def multiplier(self) -> float:
        """Strength of the LoRA (0 = the base model); may be set at any time, also while applied."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        with self._lock:
            self._multiplier = float(value)
            self._network.multiplier = float(value)

    def _bound_to(self, targets: dict[str, dict[str, nn.Module]]) -> bool:
        flat = {name: module for named in targets.values() for name, module in named.items()}
        for name, module in self._network.loras.items():
            if flat.get(name) is not module.org_module:
                return False
        return True

    def _rebind(self, targets: dict[str, dict[str, nn.Module]]) -> None:
        from lora_trainer.networks import LoRANetwork

        state_dict = self._network.state_dict_kohya(torch.float32)
        network = LoRANetwork.from_kohya(targets, state_dict, strict=True, multiplier=self._multiplier)
        network.eval()
        for param in network.parameters():
            param.requires_grad_(False)
        self._network = network
        logger.info("live LoRA: bound to a newly loaded model (%d modules)", len(network.loras))

    def apply(self, adapter) -> None:
        """Put the LoRA on `adapter`'s model for generations (bypass injection); idempotent.

        Args:
            adapter (ModelAdapter): the loaded model; when it is not the model trained on, the weights are bound
                to its modules by kohya name.

        Raises:
            NetworkError: the model has no module for one of the LoRA's names (another architecture).
        """
        with self._lock:
            if self._network.applied:
                return
            self.bind(adapter)
            self._network.multiplier = self._multiplier
            self._network.apply()

    def bind(self, adapter):
        """The network bound to `adapter`'s modules and on its device, not injected (e.g. to merge it).

        Args:
            adapter (ModelAdapter): the loaded model.

        Returns:
            LoRANetwork: the network (rebuilt by kohya name when the model is not the one it was bound to).

        Raises:
            NetworkError: the model has no module for one of the LoRA's names (another architecture).
        """
        with self._lock:
            targets = self._targets_fn(adapter)
            if not self._bound_to(targets):
                if self._network.applied:
                    self._network.remove()
                self._rebind(targets)
            self._network.to(device=adapter.device)
            return self._network

    def remove(self) -> None:
        """Take the LoRA off the model; the model's original forwards come back exactly. Idempotent."""
        with self._lock:
            self._network.remove()

    def offload(self) -> None:
        """Move the LoRA weights to CPU while idle (the host needs the GPU memory); `apply` moves them back."""
        with self._lock:
            if not self._network.applied:
                self._network.to(device="cpu")
        if self.ema is not None:
            self.ema.offload()

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write the LoRA as a kohya `.safetensors` file (atomic), with the run's metadata.

        Args:
            path (str | Path): the file to write.
            dtype (torch.dtype, optional): tensor precision in the file, defaults to torch.float16.

        Returns:
            Path: the file written.
        """
        from lora_trainer.networks import save_lora

        path = Path(path)
        with self._lock:
            state_dict = self._network.state_dict_kohya(dtype)
        save_lora(path, state_dict, dict(self._metadata))
        return path


__all__ = ["LiveLoRA"]
