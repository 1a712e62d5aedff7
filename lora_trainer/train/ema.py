"""An exponential moving average (EMA) of the LoRA weights, kept beside training and saved as its own file.

After every `ema_update_every`-th optimizer step each EMA weight moves towards the trained one:
`ema = d * ema + (1 - d) * weight`, with `d = ema_decay`, or with `ema_warmup` `d = min(ema_decay, (1 + n) / (10 + n))`
at the n-th update (n from 0), the warm-up of TensorFlow's `ExponentialMovingAverage(num_updates=)` and diffusers'
`EMAModel`, so the first updates follow the young weights instead of holding on to their zero start. The update is
torch's own `swa_utils.get_ema_multi_avg_fn` (one `_foreach_lerp_` over all weights), in float32, on the training
device or the CPU (`ema_device`). The EMA starts as a copy of the weights training starts from.

Files: `<name>-ema.safetensors` beside every `<name>.safetensors` (same kohya keys, alphas and `ss_*` metadata, plus
`lora_trainer_ema` = JSON with the decay, warm-up, interval and update count); a resume state holds `ema.safetensors`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lora_trainer.errors import TrainingError

logger = logging.getLogger(__name__)

EMA_SUFFIX = "-ema"
METADATA_KEY = "lora_trainer_ema"
_UPDATES_KEY = "updates"
_SHADOW_PREFIX = "shadow."


def ema_path(lora_path: str | Path) -> Path:
    """The EMA file beside a LoRA file: `<name>-000004.safetensors` -> `<name>-000004-ema.safetensors`.

    Args:
        lora_path (str | Path): the LoRA file.

    Returns:
        Path: the EMA file's path.
    """
    path = Path(lora_path)
    return path.with_name(f"{path.stem}{EMA_SUFFIX}{path.suffix}")


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of the next update.

    Args:
        decay (float): `ema_decay`.
        updates (int): updates done before this one.
        warmup (bool): `ema_warmup`: use `min(decay, (1 + updates) / (10 + updates))`.

    Returns:
        float: the weight the EMA keeps of its old value.
    """
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


@dataclass(frozen=True)
class EmaSettings:
    """The `ema_*` keys of a run.

    Attributes:
        decay (float): `ema_decay`. warmup (bool): `ema_warmup`. update_every (int): `ema_update_every` (steps).
        device (str): `ema_device`, "same" (the training device) or "cpu".
    """

    decay: float = 0.999
    warmup: bool = True
    update_every: int = 1
    device: str = "same"

    @classmethod
    def from_config(cls, training) -> "EmaSettings | None":
        """The settings of `config.training`, None when `ema` is off."""
        if not training.ema:
            return None
        return cls(training.ema_decay, training.ema_warmup, training.ema_update_every, training.ema_device)

    def describe(self, updates: int) -> dict:
        """The JSON the EMA file carries under `lora_trainer_ema`."""
        return {"decay": self.decay, "warmup": self.warmup, "update_every": self.update_every, "updates": updates}


class LoraEma:
    """The EMA of a network's trainable weights.

    Args:
        network (LoRANetwork): the network being trained (names and kohya saving).
        params (list[torch.nn.Parameter]): the weights the optimizer updates (parameters of `network`).
        settings (EmaSettings): decay, warm-up, interval, device.
        device (torch.device | str): the training device ("same" keeps the EMA there).
    """

    def __init__(self, network, params: list[torch.nn.Parameter], settings: EmaSettings, device):
        names = {id(p): name for name, p in network.named_parameters()}
        missing = [p for p in params if id(p) not in names]
        if missing:
            raise ValueError(f"ema: {len(missing)} trained weights are not parameters of the network. "
                             "Build the EMA from the network's own parameters.")
        self.network = network
        self.params = list(params)
        self.names = [names[id(p)] for p in self.params]
        self.settings = settings
        self.device = torch.device("cpu") if settings.device == "cpu" else torch.device(device)
        self.updates = 0
        self.shadow: list[torch.Tensor] = []
        self.reset()

    @classmethod
    def from_config(cls, config, network, params, device) -> "LoraEma | None":
        """The EMA a config asks for (None when `ema` is off).

        Args:
            config (TrainConfig): the run's config.
            network (LoRANetwork): the trained network. params (list): the optimizer's parameters.
            device (torch.device | str): the training device.

        Returns:
            LoraEma | None: a fresh EMA (a copy of the current weights), or None.
        """
        settings = EmaSettings.from_config(config.training)
        return None if settings is None else cls(network, params, settings, device)

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the current weights (no updates yet)."""
        self.shadow = [p.detach().to(device=self.device, dtype=torch.float32, copy=True) for p in self.params]
        self.updates = 0

    def due(self, step: int) -> bool:
        """True when the EMA updates after optimizer step `step` (1-based)."""
        return step % self.settings.update_every == 0

    @torch.no_grad()
    def update(self) -> float:
        """Move the EMA towards the current weights once.

        Returns:
            float: the decay used.
        """
        decay = ema_decay(self.settings.decay, self.updates, self.settings.warmup)
        current = [p.detach().to(device=self.device, dtype=torch.float32) for p in self.params]
        get_ema_multi_avg_fn(decay)(self.shadow, current, None)
        self.updates += 1
        return decay

    def after_step(self, step: int) -> None:
        """The loop's hook after optimizer step `step`: update when due."""
        if self.due(step):
            self.update()

    # -- resume ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA for a resume state: `shadow.<parameter name>` float32 CPU tensors and `updates`."""
        state = {f"{_SHADOW_PREFIX}{n}": t.detach().cpu().contiguous() for n, t in zip(self.names, self.shadow)}
        state[_UPDATES_KEY] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor] | None, source: str = "resume") -> None:
        """Continue from a saved EMA; without one (a state saved with `ema` off) start from the current weights.

        Args:
            state (dict[str, torch.Tensor], optional): from `state_dict`.
            source (str, optional): the state folder, for messages.

        Raises:
            TrainingError: the saved EMA holds other weights (another network).
        """
        if state is None:
            self.reset()
            logger.info("ema: %s holds no EMA; it starts from the resumed weights", source)
            return
        wanted = {f"{_SHADOW_PREFIX}{n}": p for n, p in zip(self.names, self.params)}
        saved = {k for k in state if k.startswith(_SHADOW_PREFIX)}
        wrong = sorted(saved ^ set(wanted)) + [k for k in saved & set(wanted) if state[k].shape != wanted[k].shape]
        if wrong or _UPDATES_KEY not in state:
            raise TrainingError(f"resume: the EMA in {source} does not fit this network ({(wrong or ['updates'])[0]}). "
                             "Resume with the network settings of the run that saved it, or start without resume.")
        self.shadow = [state[f"{_SHADOW_PREFIX}{n}"].to(device=self.device, dtype=torch.float32) for n in self.names]
        self.updates = int(state[_UPDATES_KEY])

    # -- the EMA as a LoRA -------------------------------------------------------------------------------------------
    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The network holds the EMA weights inside the block, its trained weights again afterwards."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], [s.to(p.device) for s, p in
                                                                   zip(self.shadow, self.params)])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], trained)

    def kohya_state_dict(self, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
        """The EMA as kohya keys (alphas and frozen weights from the network).

        Args:
            dtype (torch.dtype, optional): tensor precision, defaults to torch.float16; None keeps float32.

        Returns:
            dict[str, torch.Tensor]: contiguous CPU tensors.
        """
        with self.swapped_in():  # copies: float32 CPU tensors of state_dict_kohya are the parameters themselves
            return {k: v.clone() for k, v in self.network.state_dict_kohya(dtype).items()}

    def metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """The LoRA file's metadata plus `lora_trainer_ema` (decay, warm-up, interval, updates)."""
        return {**metadata, METADATA_KEY: json.dumps(self.settings.describe(self.updates))}

    def save(self, lora_path: str | Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        """Write `<name>-ema.safetensors` beside `lora_path` (atomic, kohya format, hashes added).

        Args:
            lora_path (str | Path): the raw LoRA file just written.
            dtype (torch.dtype): save precision.
            metadata (dict[str, str]): that file's metadata.

        Returns:
            Path: the EMA file.
        """
        from lora_trainer.networks import save_lora

        path = ema_path(lora_path)
        save_lora(path, self.kohya_state_dict(dtype), self.metadata(metadata))
        return path

    def network_copy(self):
        """A new network with the EMA weights on the same model modules (not applied), for tests in memory.

        Returns:
            LoRANetwork: bound to the trained network's target modules.
        """
        from lora_trainer.networks import LoRANetwork

        targets = {"network": {name: module.org_module for name, module in self.network.loras.items()}}
        return LoRANetwork.from_kohya(targets, self.kohya_state_dict(torch.float32), strict=True,
                                      multiplier=self.network.multiplier)


def read_ema_metadata(metadata: dict[str, str]) -> dict | None:
    """The EMA facts of a LoRA file's metadata.

    Args:
        metadata (dict[str, str]): from `load_lora`.

    Returns:
        dict | None: decay, warmup, update_every, updates; None for a file that is not an EMA.
    """
    text = metadata.get(METADATA_KEY)
    return json.loads(text) if text else None


__all__ = ["EMA_SUFFIX", "EmaSettings", "LoraEma", "ema_decay", "ema_path", "read_ema_metadata"]
