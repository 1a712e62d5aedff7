"""Checkpoints in a models folder (the WebUI's `models/Stable-diffusion` layout, subfolders too), each with its
architecture told from the file header alone: a `.safetensors` header holds every key and shape, so no tensor is
read (a 7 GB SDXL file costs a few hundred KB), and the same-named `.yaml` decides v-prediction."""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
MAX_HEADER_BYTES = 100 << 20  # real headers are well under 1 MB; a bigger one is a damaged file
LABELS = {"sd1": "SD1", "sd2": "SD2", "sd2-v": "SD2 v", "sdxl": "SDXL"}


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint file and what its header says.

    Attributes:
        path (Path): the file.
        name (str): its path relative to the models folder (the WebUI shows the same).
        architecture (str, optional): "sd1", "sd2", "sd2-v" or "sdxl"; None when unknown or unsupported.
        note (str): why the architecture is unknown, or "" (e.g. an inpainting model, a pickle not opened).
    """

    path: Path
    name: str
    architecture: str | None
    note: str = ""

    @property
    def label(self) -> str:
        """The dropdown text: `name [SD1]`, `name [?]` when unknown."""
        return f"{self.name} [{LABELS.get(self.architecture or '', '?')}]"


@dataclass(frozen=True)
class _HeaderTensor:
    """A tensor known only by its header shape (what `detect_architecture` looks at)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a `.safetensors` header (the first 8 + N bytes; no tensor is read).

    Args:
        path (str | Path): the file.

    Returns:
        dict[str, tuple[int, ...]]: shape by key.

    Raises:
        ModelLoadError: not a safetensors file (damaged or truncated header).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ModelLoadError(f"{path}: not a valid safetensors file (header size {size}). The file is damaged "
                                 "or incomplete: download or save it again.")
        raw = handle.read(size)
    try:
        header = json.loads(raw)
        return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: not a valid safetensors file (unreadable header: {exc}). The file is damaged "
                             "or incomplete: download or save it again.") from exc


def inspect_checkpoint(path: str | Path, v_parameterization: bool = False) -> str | None:
    """The architecture of a checkpoint from its header and its `.yaml`, without reading tensors.

    Args:
        path (str | Path): a `.safetensors` (header read) or pickle checkpoint (only its yaml is read: a pickle
            cannot be opened without loading it).
        v_parameterization (bool, optional): the user's flag (turns "sd2" into "sd2-v"), defaults to False.

    Returns:
        str | None: "sd1", "sd2", "sd2-v" or "sdxl"; None for a pickle.

    Raises:
        ModelLoadError: not a supported model (LoRA, VAE, inpainting, refiner...), or a malformed or contradicting
            `.yaml` (each named, with the fix).
    """
    from lora_trainer.models.checkpoint import detect_architecture
    from lora_trainer.models.derived_configs import check_yaml_sizes, unet_basics
    from lora_trainer.models.model_yaml import read_model_yaml

    path = Path(path)
    model_yaml = read_model_yaml(path)
    v_parameterization = v_parameterization or (model_yaml is not None and model_yaml.v_parameterization)
    if path.suffix.lower() != ".safetensors":
        return None
    shapes = read_safetensors_shapes(path)
    architecture = detect_architecture({k: _HeaderTensor(s) for k, s in shapes.items()}, v_parameterization, path)
    if model_yaml is not None:
        check_yaml_sizes(unet_basics(shapes), model_yaml)
    return architecture


def _info(path: Path, root: Path) -> CheckpointInfo:
    name = path.relative_to(root).as_posix()
    if path.suffix.lower() != ".safetensors":
        return CheckpointInfo(path, name, None, "a pickle checkpoint: its architecture is found when it loads")
    try:
        return CheckpointInfo(path, name, inspect_checkpoint(path))
    except (ModelLoadError, OSError) as exc:
        return CheckpointInfo(path, name, None, str(exc))


def list_checkpoints(models_dir: str | Path) -> list[CheckpointInfo]:
    """The checkpoints under a models folder (subfolders too), sorted by name, each with its architecture.

    Args:
        models_dir (str | Path): e.g. the WebUI's `models/Stable-diffusion`.

    Returns:
        list[CheckpointInfo]: one per `.safetensors` / `.ckpt` file; a file that is not a supported model is
        listed with architecture None and the reason in `note`.

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: models folder not found. Give the folder holding your checkpoints "
                                "(the WebUI's models/Stable-diffusion).")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix().lower())
    found = [_info(path, root) for path in files]
    logger.info("%s: %d checkpoint(s)", root, len(found))
    return found


__all__ = ["CHECKPOINT_SUFFIXES", "CheckpointInfo", "inspect_checkpoint", "list_checkpoints",
           "read_safetensors_shapes"]
