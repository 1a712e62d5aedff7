"""Tensor-by-tensor checkpoint I/O: read one tensor at a time, write a `.safetensors` file one tensor at a time.

Merging two SDXL checkpoints by loading them whole needs three checkpoints in RAM. Here the reader hands out one
tensor at a time and the writer computes the whole header from the shapes and dtypes first, then streams each
tensor's bytes: peak memory is the largest few tensors, not the files. `safetensors.safe_open` checks the file and
gives its metadata, but the tensors are read with plain positioned reads: `safe_open.get_tensor` returns views of a
memory map, and every page read through it stays in the process's resident set until the file is closed (a
streamed merge of two files would show 2x a file of RSS).

safetensors layout: 8-byte little-endian header length, a JSON header `{key: {dtype, shape, data_offsets},
"__metadata__": {str: str}}` padded with spaces to a multiple of 8, then the raw little-endian tensor bytes in
header order. The file goes to a temporary name in the target's folder, is fsynced, then renamed over the target
(as `lora_trainer/atomic_io.py` does for in-memory data): a failed write leaves no partial file.
"""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.atomic_io import atomic_writer
from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class TensorInfo:
    """What the header says of one tensor.

    Attributes:
        key (str): the state-dict key.
        dtype (torch.dtype): element type.
        shape (tuple[int, ...]): tensor shape.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class TensorReader:
    """A checkpoint opened for reading one tensor at a time (use as a context manager).

    `.safetensors` files are streamed; `.ckpt`/`.pt` pickles are loaded whole with
    `torch.load(weights_only=True)` (through `lora_trainer.models.checkpoint.read_state_dict`).

    Args:
        path (str | Path): the checkpoint file.

    Raises:
        FileNotFoundError: the file does not exist.
        ModelLoadError: not a readable safetensors file or weights-only pickle.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: file not found. Check the path.")
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.path.suffix.lower() == ".safetensors":
            self._open_safetensors()
        else:
            from lora_trainer.models.checkpoint import read_state_dict

            self._tensors = read_state_dict(self.path)
            self.metadata: dict[str, str] = {}
            self.infos = {k: TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}

    def _open_safetensors(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:  # the library's validation
                self.metadata = dict(handle.metadata() or {})
            self._handle = open(self.path, "rb")
            length = struct.unpack("<Q", self._handle.read(8))[0]
            header = json.loads(self._handle.read(length))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"{self.path}: not a readable safetensors file ({err}). Re-download or re-save "
                                 "it.") from err
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._offsets = {key: tuple(entry["data_offsets"]) for key, entry in header.items()}
        self.infos = {key: TensorInfo(key, CODE_DTYPES[entry["dtype"]], tuple(entry["shape"]))
                      for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])}

    def keys(self) -> list[str]:
        """The tensor keys in file order."""
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU copy)."""
        if key not in self.infos:
            raise KeyError(f"{self.path}: no tensor {key!r}.")
        if self._tensors is not None:
            return self._tensors[key]
        info = self.infos[key]
        begin, end = self._offsets[key]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._handle.seek(self._data_start + begin)
        if end > begin and self._handle.readinto(memoryview(buffer.numpy())) != end - begin:
            raise ModelLoadError(f"{self.path}: {key} ends past the end of the file. The file is truncated; "
                                 "re-download or re-save it.")
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        """Release the file (and a loaded pickle's tensors)."""
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._tensors = None

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_header(infos: Iterable[TensorInfo], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding `infos` in this order.

    Args:
        infos (Iterable[TensorInfo]): the tensors, in the order their bytes will follow.
        metadata (dict[str, str], optional): `__metadata__`; every value must be a str.

    Returns:
        bytes: length prefix and header, padded with spaces to a multiple of 8 bytes.
    """
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"metadata {bad[0]!r}: safetensors metadata values must be str. Convert with str() or "
                             "json.dumps().")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in infos:
        if info.dtype not in DTYPE_CODES:
            raise ValueError(f"{info.key}: dtype {info.dtype} cannot be stored in safetensors. Cast it first.")
        header[info.key] = {"dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: str | Path, infos: list[TensorInfo], tensor_for: Callable[[TensorInfo], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write a `.safetensors` file tensor by tensor, atomically.

    Args:
        path (str | Path): the target file (a missing folder is created).
        infos (list[TensorInfo]): every tensor's key, dtype and shape, in file order (the header is built first).
        tensor_for (Callable[[TensorInfo], torch.Tensor]): called once per info, in order; must return a tensor of
            exactly that dtype and shape (it may be freed right after).
        metadata (dict[str, str], optional): `__metadata__`, defaults to None.

    Returns:
        Path: the written file. On any error no file is left behind and an existing target is unchanged.

    Raises:
        ValueError: a produced tensor does not match its header entry.
        FileWriteError: the file cannot be written.
    """
    path = Path(path)
    header = build_header(infos, metadata)
    with atomic_writer(path, make_folder=True) as handle:
        handle.write(header)
        for info in infos:
            tensor = tensor_for(info)
            if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                raise ValueError(f"{info.key}: produced {tensor.dtype} {tuple(tensor.shape)}, the header says "
                                 f"{info.dtype} {info.shape}. This is a bug in the caller.")
            handle.write(_tensor_bytes(tensor))
            del tensor
    logger.info("wrote %s (%d tensors, %.1f MiB)", path, len(infos), path.stat().st_size / 2**20)
    return path


def output_dtype(dtype: torch.dtype, precision: str | None) -> torch.dtype:
    """The stored dtype of a tensor under a save precision: floats become `precision`, other dtypes are kept.

    Args:
        dtype (torch.dtype): the tensor's dtype.
        precision (str, optional): "fp16", "bf16", "fp32", or None to keep every dtype.

    Returns:
        torch.dtype: the dtype to write.
    """
    if precision is None or not dtype.is_floating_point or dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return dtype
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: unknown. Use one of {sorted(PRECISIONS)}.")
    return PRECISIONS[precision]


__all__ = ["PRECISIONS", "TensorInfo", "TensorReader", "build_header", "output_dtype",
           "write_safetensors"]
