"""Writing tool results: output-path rules, LoRA state dicts from factors, precision, metadata of derived files.

Outputs are written atomically by `networks.files.save_lora` (no partial file on failure, an existing file
untouched), never over an input, and never to a path with `..` parts.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..networks.files import save_lora
from ..networks.metadata import base_model_version

logger = logging.getLogger(__name__)

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    """torch dtype of "float"/"fp32", "fp16" or "bf16" (ValueError for anything else)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: unknown. Use one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def check_output(out, inputs=()) -> Path:
    """Validate an output path before any work is done.

    Args:
        out (str | Path): the output file.
        inputs (Iterable[str | Path], optional): the input files it must differ from.

    Returns:
        Path: the output path.

    Raises:
        ValueError: `..` in the path, not `.safetensors`, or the same file as an input.
    """
    out = Path(out)
    if ".." in out.parts:
        raise ValueError(f"{out}: output paths may not contain '..'. Give a plain file name or a full path.")
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: outputs are written as .safetensors. Use a name ending in .safetensors.")
    resolved = out.resolve()
    for source in inputs:
        if Path(source).resolve() == resolved:
            raise ValueError(f"{out}: the output is one of the inputs. Inputs are never modified; choose another "
                             "output name.")
    return out


def lora_tensors(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float, shape, dtype) -> dict:
    """kohya keys of one LoRA/LoCon module from factors `up [out, r]`, `down [r, in, *kernel]`.

    Args:
        name (str): kohya module name.
        up (torch.Tensor): `[out, r]`.
        down (torch.Tensor): `[r, in]` or `[r, in, kh, kw]` (any view of `r x in*kh*kw`).
        alpha (float): the alpha to store.
        shape (tuple): the target weight shape.
        dtype (torch.dtype): stored dtype of the weights (alpha is stored as float32, as kohya does).

    Returns:
        dict[str, torch.Tensor]: `name.lora_up.weight`, `name.lora_down.weight`, `name.alpha`.
    """
    rank = up.shape[1]
    conv = len(shape) == 4
    up = up.reshape(shape[0], rank, 1, 1) if conv else up.reshape(shape[0], rank)
    down = down.reshape(rank, *shape[1:])
    return {f"{name}.lora_up.weight": up.to(dtype).contiguous(),
            f"{name}.lora_down.weight": down.to(dtype).contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def derived_metadata(base: dict, architecture: str, tool: str, recipe: dict, dims: dict | None = None) -> dict:
    """Metadata of a file made from others: the base file's `ss_*` facts, hashes dropped, the recipe added.

    Args:
        base (dict[str, str]): metadata of the (first) source file.
        architecture (str): the architecture.
        tool (str): "block_weights", "merge" or "resize".
        recipe (dict): what was done (sources, ratios, vectors, ranks); stored as JSON in `lora_trainer_<tool>`.
        dims (dict, optional): `ss_network_dim` / `ss_network_alpha` / `ss_network_module` overrides.

    Returns:
        dict[str, str]: the new metadata.
    """
    meta = {k: v for k, v in base.items() if not k.startswith("sshs_")}
    meta.setdefault("ss_base_model_version", base_model_version(architecture))
    meta.setdefault("ss_v2", str(architecture.startswith("sd2")))
    meta.update({k: str(v) for k, v in (dims or {}).items()})
    meta[f"lora_trainer_{tool}"] = json.dumps(recipe, sort_keys=True)
    meta["lora_trainer_created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return meta


def source_entry(lora_file) -> dict:
    """How a source file is named in a recipe: its file name and kohya model hash when it has one."""
    entry = {"file": lora_file.path.name if lora_file.path else "memory"}
    if lora_file.metadata.get("sshs_model_hash"):
        entry["sshs_model_hash"] = lora_file.metadata["sshs_model_hash"]
    return entry


def write_lora(out, state_dict: dict, metadata: dict, inputs=()) -> Path:
    """Write a tool's result atomically after the output-path checks.

    Args:
        out (str | Path): the output file.
        state_dict (dict[str, torch.Tensor]): kohya keys.
        metadata (dict[str, str]): metadata.
        inputs (Iterable[str | Path], optional): input files the output must differ from.

    Returns:
        Path: the written file.
    """
    out = check_output(out, inputs)
    return save_lora(out, state_dict, metadata)


__all__ = ["PRECISIONS", "check_output", "derived_metadata", "lora_tensors", "precision_dtype", "source_entry",
           "write_lora"]
