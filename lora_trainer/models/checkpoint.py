"""Single-file checkpoints: read them safely, tell SD1 / SD2 / SDXL apart by signature keys, hash them as the
WebUI does."""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = "SD1.x, SD2.x (512 base / 768-v) and SDXL base single-file checkpoints"

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# Text-encoder signatures of the original (ldm / sgm) layouts, checked in order.
SIGNATURES = (
    ("sdxl", "conditioner.embedders.1.model.transformer.resblocks."),
    ("sd2", "cond_stage_model.model.transformer.resblocks."),
    ("sd1", "cond_stage_model.transformer.text_model."),
    ("sd1", "cond_stage_model.transformer.embeddings."),  # checkpoints saved with transformers < 4.21
)
# Cross-attention context width of the real UNets, for files without text encoders.
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _pickle_refused(path: Path, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: this pickle checkpoint needs more than plain tensors to load ({err.__class__.__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}); arbitrary pickles are not loaded because they can run "
        "code. Convert it to .safetensors (e.g. with the WebUI's Checkpoint Merger, or kohya's "
        "convert_diffusers20_original_sd.py) and load that file."
    )


def check_can_read(path: Path) -> None:
    """Open a checkpoint file to tell "not found" and "permission denied" from a bad file, with the right fix.

    Args:
        path (Path): the file.

    Raises:
        FileNotFoundError: missing. ModelLoadError: permission denied or an I/O error.
    """
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint file not found. Check the path (and the models folder).") from None
    except PermissionError as err:
        raise ModelLoadError(f"{path}: permission denied. Make the file readable (chmod a+r) or copy it somewhere "
                             "you may read.") from err
    except IsADirectoryError as err:
        raise ModelLoadError(f"{path}: is a folder. Give the checkpoint file itself.") from err
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot be read ({err.strerror}). Check the disk, then copy the file again."
                             ) from err


def _invalid_safetensors(path: Path, err: Exception) -> ModelLoadError:
    check_can_read(path)  # a file that cannot be opened gets its real cause and fix
    return ModelLoadError(f"{path}: not a valid safetensors file ({err}). The file is damaged or incomplete: "
                          "download or save it again.")


def _read_pickle(path: Path) -> dict:
    check_can_read(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _pickle_refused(path, err) from err
    except (RuntimeError, EOFError) as err:
        raise ModelLoadError(f"{path}: not a readable checkpoint ({err}). Re-download or re-save the file.") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict. Give a model checkpoint file.")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors on CPU.

    Args:
        path (str | Path): a `.safetensors` file, or a `.ckpt`/`.pt`/`.pth`/`.bin` pickle that loads with
            `torch.load(weights_only=True)` (a top-level "state_dict" entry is unwrapped).

    Returns:
        dict[str, torch.Tensor]: the tensors by key (non-tensor entries such as `global_step` are dropped).

    Raises:
        FileNotFoundError: the file does not exist.
        ModelLoadError: unknown suffix, unreadable file, or a pickle that needs more than tensors.
    """
    path = Path(path)
    check_can_read(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise _invalid_safetensors(path, err) from err
    if suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: unknown checkpoint type {suffix!r}. Use a .safetensors file (or .ckpt/.pt/.pth/.bin)."
        )
    raw = _read_pickle(path)
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(raw):
        logger.debug("%s: dropped %d non-tensor entries", path, len(raw) - len(tensors))
    return tensors


def _by_context_dim(state_dict: dict) -> str | None:
    for key, value in state_dict.items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight") and value.ndim == 2:
            return CONTEXT_DIMS.get(int(value.shape[1]))
    return None


class SafetensorsFile(Mapping):
    """A `.safetensors` checkpoint read lazily: keys from the header, tensors on access, and `subset(prefixes)`
    reading one component at a time, so that loading never holds the whole file and its models at once.

    Args:
        path (str | Path): the file.
    """

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                self._keys = list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise _invalid_safetensors(self.path, err) from err

    def subset(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The tensors whose keys start with one of `prefixes`, read into memory (the file is closed after)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in self._keys if key.startswith(prefixes)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the header (no tensor is read)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in self._keys}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self.subset((key,))[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """`read_state_dict`, but lazy for `.safetensors` (see SafetensorsFile); pickles are read whole."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return SafetensorsFile(path)
    return read_state_dict(path)


def tensor_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a state dict or a SafetensorsFile (whose tensors are not read).

    Args:
        state_dict (Mapping[str, torch.Tensor]): from `open_state_dict` or `read_state_dict`.

    Returns:
        dict[str, tuple[int, ...]]: shape by key.
    """
    if isinstance(state_dict, SafetensorsFile):
        return state_dict.shapes()
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def subset(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The entries of one component (UNet, VAE, text encoders) of a state dict or a SafetensorsFile."""
    if isinstance(state_dict, SafetensorsFile):
        return state_dict.subset(prefixes)
    return {key: value for key, value in state_dict.items() if key.startswith(prefixes)}


def detect_architecture(
    state_dict: dict[str, torch.Tensor], v_parameterization: bool = False, source: str | Path | None = None
) -> str:
    """Tell which Stable Diffusion architecture an original-format state dict holds.

    Args:
        state_dict (dict[str, torch.Tensor]): from `read_state_dict`.
        v_parameterization (bool, optional): the user's flag; turns "sd2" into "sd2-v" (weights cannot tell),
            defaults to False.
        source (str | Path, optional): the file name for error messages, defaults to None.

    Returns:
        str: "sd1", "sd2", "sd2-v" or "sdxl".

    Raises:
        ModelLoadError: not a supported full checkpoint (LoRA file, inpainting or refiner model, diffusers UNet...).
    """
    name = str(source) if source is not None else "checkpoint"
    unet = state_dict.get(UNET_KEY)
    if unet is None:
        hint = _not_a_checkpoint_hint(state_dict)
        raise ModelLoadError(f"{name}: no Stable Diffusion UNet ({UNET_KEY}) found{hint}. Supported: {SUPPORTED}.")
    if unet.ndim == 4 and unet.shape[1] != 4:
        raise ModelLoadError(
            f"{name}: the UNet takes {unet.shape[1]} input channels (an inpainting or instruct model); "
            f"LoRA training needs a regular text-to-image model. Supported: {SUPPORTED}."
        )
    arch = next((a for a, prefix in SIGNATURES if any(k.startswith(prefix) for k in state_dict)), None)
    if arch is None and any(k.startswith("conditioner.embedders.0.model.") for k in state_dict):
        raise ModelLoadError(
            f"{name}: an SDXL refiner checkpoint; train on the SDXL base model. Supported: {SUPPORTED}."
        )
    arch = arch or _by_context_dim(state_dict)
    if arch is None:
        raise ModelLoadError(f"{name}: no known text-encoder keys and an unknown UNet layout. Supported: {SUPPORTED}.")
    if arch == "sd2" and v_parameterization:
        return "sd2-v"
    return arch


def _not_a_checkpoint_hint(state_dict: dict) -> str:
    keys = list(state_dict)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_te1_", "lora_te2_")) for k in keys):
        return " (this is a LoRA/LyCORIS file, not a base model)"
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        return " (this looks like a diffusers-format UNet; use the original single-file checkpoint)"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return " (this looks like a VAE file)"
    return ""


@dataclass(frozen=True)
class CheckpointHash:
    """The WebUI's hashes of a checkpoint file.

    Attributes:
        sha256 (str): sha256 of the whole file (hex), the WebUI's full hash.
        shorthash (str): its first 10 hex digits, shown by the WebUI as `[abcdef1234]`.
        legacy (str): the old 8-digit `model_hash` (sha256 of 64 KiB at offset 1 MiB).
    """

    sha256: str
    shorthash: str
    legacy: str


def checkpoint_hash(path: str | Path, block_size: int = 1 << 20) -> CheckpointHash:
    """Hash a checkpoint file as the WebUI does.

    Args:
        path (str | Path): the file.
        block_size (int, optional): read size, defaults to 1 MiB.

    Returns:
        CheckpointHash: full sha256, 10-digit short hash and legacy 8-digit hash.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found. Check the path.")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
        handle.seek(0x100000)
        legacy = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    full = digest.hexdigest()
    return CheckpointHash(sha256=full, shorthash=full[:10], legacy=legacy)
