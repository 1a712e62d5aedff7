"""The LoRAs a grid compares: the trained network still in memory (and its EMA) and the epoch/step files its run
saved (each with its `-ema` file when the run kept an EMA).

A snapshot is put on the already loaded model by bypass injection (`apply`, the X/Y/Z plot axes) or handed to the
grid runner bound but not injected (`bind`), which merges it into the weights once per strength; either way it
comes off exactly. Switching snapshots never reloads the model, and a file is read once and kept bound to the
model for the rest of the grid.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_EPOCH_FILE = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})$")
_STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})$")
EMA_SUFFIX = "-ema"  # `<stem>-ema.safetensors`: the EMA file train/ema.py writes beside each LoRA file
EMA_LABEL = " (EMA)"


def _split_ema(stem: str) -> tuple[str, bool]:
    if stem.endswith(EMA_SUFFIX) and len(stem) > len(EMA_SUFFIX):
        return stem[:-len(EMA_SUFFIX)], True
    return stem, False


def snapshot_label(path: str | Path) -> str:
    """The label of a saved file: "epoch 5" for `<name>-000005`, "step 100" for `<name>-step00000100`, else the
    file's name without extension; an EMA file (`...-ema`) gets " (EMA)" after its LoRA file's label.

    Args:
        path (str | Path): the LoRA file.

    Returns:
        str: the label.
    """
    stem, ema = _split_ema(Path(path).stem)
    suffix = EMA_LABEL if ema else ""
    if match := _EPOCH_FILE.match(stem):
        return f"epoch {int(match['epoch'])}{suffix}"
    if match := _STEP_FILE.match(stem):
        return f"step {int(match['step'])}{suffix}"
    return stem + suffix


def with_ema_files(paths) -> list[Path]:
    """Each existing LoRA file followed by its EMA file (`<stem>-ema`) when the run wrote one.

    Args:
        paths (iterable of str | Path): LoRA files.

    Returns:
        list[Path]: the files that exist, each EMA file right after its LoRA file.
    """
    out = []
    for path in map(Path, paths):
        out += [f for f in (path, path.with_name(f"{path.stem}{EMA_SUFFIX}{path.suffix}")) if f.is_file()]
    return list(dict.fromkeys(out))


def run_snapshot_files(lora_path: str | Path) -> list[Path]:
    """Every file the run of `lora_path` saved beside it (kohya's names), steps and epochs in order, last file last,
    each followed by its EMA file when there is one.

    Args:
        lora_path (str | Path): the final file `<name>.safetensors`, or any of its epoch/step (or EMA) files.

    Returns:
        list[Path]: the files found (at least `lora_path` itself when it exists).
    """
    path = Path(lora_path)
    stem = _split_ema(path.stem)[0]
    for pattern in (_EPOCH_FILE, _STEP_FILE):
        if match := pattern.match(stem):
            stem = match["name"]
    files = []
    for candidate in path.parent.glob(f"{glob_escape(stem)}-*{path.suffix}"):
        match = _EPOCH_FILE.match(candidate.stem) or _STEP_FILE.match(candidate.stem)
        if match and match["name"] == stem:
            files.append(candidate)
    files.sort(key=lambda f: (_STEP_FILE.match(f.stem) is None, f.stem))
    final = path.parent / f"{stem}{path.suffix}"
    return with_ema_files(files + [final])


def glob_escape(text: str) -> str:
    """`text` with glob wildcards escaped (file names may hold `[`)."""
    return re.sub(r"([\[\]*?])", r"[\1]", text)


class FileSnapshot:
    """A saved LoRA file, loaded on first use into a network bound to the model's modules.

    Args:
        path (str | Path): the `.safetensors` file.
        label (str, optional): the axis label, defaults to `snapshot_label(path)`.
    """

    def __init__(self, path: str | Path, label: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: LoRA file not found. Check the path.")
        self.label = label or snapshot_label(self.path)
        self._network = None
        self._bound_to = None

    def _network_for(self, adapter):
        if self._network is None or self._bound_to is not adapter:
            from lora_trainer.errors import NetworkError
            from lora_trainer.networks import LoRANetwork, load_lora

            state_dict, _ = load_lora(self.path)
            # conv targets included: LoCon files carry ResNet conv keys, plain LoRA files simply use fewer
            targets = adapter.lora_targets(include_conv=True)
            try:
                network = LoRANetwork.from_kohya(targets, state_dict, strict=True)
            except NetworkError as exc:
                raise NetworkError(f"{self.path}: does not fit the loaded {adapter.architecture} model: {exc} "
                                   "Pick a LoRA trained on this model's architecture.") from exc
            network.requires_grad_(False)
            self._network = network.to(device=adapter.device)  # float32 weights: the module casts per call
            self._bound_to = adapter
            logger.info("grid: loaded %s (%d modules)", self.path.name, len(network.loras))
        return self._network

    @property
    def network(self):
        """The loaded `LoRANetwork` (None before the first `apply`)."""
        return self._network

    def apply(self, adapter, strength: float) -> None:
        """Put the file's LoRA on `adapter`'s model at `strength` (idempotent; a new strength acts at once).

        Raises:
            NetworkError: the file does not fit the model (another architecture).
        """
        network = self._network_for(adapter)
        network.multiplier = strength
        if not network.applied:
            network.apply()

    def bind(self, adapter):
        """The file's network bound to `adapter`'s modules, not injected (the grid merges it).

        Raises:
            NetworkError: the file does not fit the model (another architecture).
        """
        self.remove()
        return self._network_for(adapter)

    def remove(self) -> None:
        """Take the LoRA off the model; its original forwards come back exactly."""
        if self._network is not None:
            self._network.remove()

    def release(self) -> None:
        """Drop the loaded weights (after the grid)."""
        self.remove()
        self._network, self._bound_to = None, None


class LiveSnapshot:
    """The LoRA still in memory after (or during a pause of) training.

    Args:
        live (LiveLoRA): the trained network.
        label (str, optional): defaults to "in memory".
    """

    def __init__(self, live, label: str = "in memory"):
        self.live = live
        self.label = label
        self._multiplier_before = float(live.multiplier)

    @property
    def network(self):
        """The `LoRANetwork` in memory."""
        return self.live.network

    def apply(self, adapter, strength: float) -> None:
        """Put the LoRA on `adapter`'s model at `strength`; idempotent."""
        self.live.multiplier = strength
        self.live.apply(adapter)

    def bind(self, adapter):
        """The network in memory bound to `adapter`'s modules, not injected (the grid merges it)."""
        self.live.remove()
        return self.live.bind(adapter)

    def remove(self) -> None:
        """Take the LoRA off the model exactly."""
        self.live.remove()

    def release(self) -> None:
        """Take it off and give the LoRA back its strength from before the grid."""
        self.live.remove()
        self.live.multiplier = self._multiplier_before


__all__ = ["EMA_LABEL", "FileSnapshot", "LiveSnapshot", "run_snapshot_files", "snapshot_label", "with_ema_files"]
