"""LoRA files: atomic safetensors save with str metadata, load, algorithm detection, kohya/addnet hashes."""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from ..errors import NetworkError
from ..atomic_io import atomic_write_bytes

logger = logging.getLogger(__name__)

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_BLOCK = 1024 * 1024


def _addnet_hashes(stream) -> tuple[str, str]:
    """(sha256 of everything after the 8-byte length + JSON header, sha256[:8] of bytes 0x100000..0x110000)."""
    stream.seek(0)
    header_len = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_len)
    model = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_BLOCK), b""):
        model.update(chunk)
    stream.seek(_LEGACY_OFFSET)
    legacy = hashlib.sha256(stream.read(_LEGACY_LENGTH)).hexdigest()[:8]
    return model.hexdigest(), legacy


def model_hashes(path_or_bytes) -> tuple[str, str]:
    """`(sshs_model_hash, sshs_legacy_hash)` of a safetensors file, as sd-webui-additional-networks computes them.

    The model hash is the sha256 of the bytes after the header (8-byte little-endian length + JSON header), so
    metadata edits do not change it; the legacy hash is the first 8 hex digits of the sha256 of the 64 KiB window
    at offset 1 MiB (of an empty string for files shorter than 1 MiB).

    Args:
        path_or_bytes (str | Path | bytes): a file path or the file's bytes.

    Returns:
        tuple[str, str]: (model hash, legacy hash) as hex strings.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return _addnet_hashes(io.BytesIO(bytes(path_or_bytes)))
    with open(path_or_bytes, "rb") as stream:
        return _addnet_hashes(stream)


def kohya_hashes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[str, str]:
    """The hashes kohya writes before saving (`precalculate_safetensors_hashes`).

    kohya serialises the tensors with only the `ss_*` metadata (training facts, meant to be immutable) and takes
    `model_hashes` of those bytes; the model hash therefore equals that of the final file.

    Args:
        state_dict (dict[str, torch.Tensor]): the tensors to be saved.
        metadata (dict[str, str], optional): the metadata to be saved.

    Returns:
        tuple[str, str]: (sshs_model_hash, sshs_legacy_hash).
    """
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    return model_hashes(safetensors.torch.save(state_dict, ss_only))


def _check_metadata(path, metadata: dict | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"{path}: metadata {key!r} is {type(value).__name__}, not str. "
                             "Convert values with str() or json.dumps() (build_metadata does).")
    return metadata


def save_lora(path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
              add_hashes: bool = True) -> Path:
    """Write a LoRA as safetensors atomically: temp file in the same folder, fsync, then rename over `path`.

    A failed write leaves no file behind and an existing file untouched.

    Args:
        path (str | Path): destination `.safetensors` file.
        state_dict (dict[str, torch.Tensor]): kohya keys -> tensors (made contiguous and moved to CPU here).
        metadata (dict[str, str], optional): str -> str metadata (`ss_*`...), defaults to None.
        add_hashes (bool, optional): add `sshs_model_hash` / `sshs_legacy_hash` as kohya does, defaults to True.

    Returns:
        Path: the written file.
    """
    path = Path(path)
    metadata = _check_metadata(path, metadata)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if add_hashes:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(tensors, metadata)
    data = safetensors.torch.save(tensors, metadata or None)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    logger.info("saved %s (%d tensors, %.1f MiB)", path, len(tensors), len(data) / 2**20)
    return path


def load_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file: `.safetensors` (with metadata) or `.pt`/`.ckpt` (weights-only pickle, no metadata).

    Args:
        path (str | Path): the file.

    Returns:
        tuple: (state dict on CPU, metadata dict; empty when the file has none).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LoRA file not found. Check the path.")
    if path.suffix.lower() != ".safetensors":
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise NetworkError(f"{path}: cannot be read as a weights-only torch file ({exc}). "
                               "Convert it to .safetensors.") from exc
        return dict(sd), {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            sd = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise NetworkError(f"{path}: not a readable safetensors file ({exc}). The file may be truncated; "
                           "download or save it again.") from exc
    return sd, metadata


def detect_algorithm(keys) -> str:
    """The network name ("lora", "loha") whose `detect_keys` the state-dict keys carry.

    Args:
        keys (Iterable[str]): state-dict keys.

    Returns:
        str: the claiming class's `name`.

    Raises:
        NetworkError: no class or more than one class claims the keys.
    """
    from .network import NETWORKS

    keys = list(keys)
    suffixes = {key.partition(".")[2] for key in keys}
    claims = [cls.name for cls in NETWORKS if any(s in suffixes for s in cls.detect_keys)]
    if len(claims) == 1:
        return claims[0]
    sample = ", ".join(sorted(keys)[:5])
    if not claims:
        known = ", ".join(k for cls in NETWORKS for k in cls.detect_keys)
        raise NetworkError(f"keys ({sample}...): no known network type. Supported files carry {known} keys.")
    raise NetworkError(f"keys ({sample}...): claimed by several types {claims}; mixed files are not supported.")
