"""Bake LoRA files into a checkpoint, streamed: `W' = W + sum(ratio * block_weight * delta)` per weight.

Works on single-file SD1 / SD2 / SDXL checkpoints, UNet and text encoders; OpenCLIP's fused `in_proj_weight` gets
the q / k / v deltas in its three row ranges. Any type `read_lora` reads (LoRA, LoCon, LoHa, LoKr, full deltas)
is baked through its full delta, scaled as the WebUI scales it. Block weights use LoRA Block Weight's slots, so a
file baked with a vector renders as the LoRA does with that vector in the prompt. The checkpoint is read one
tensor at a time and never loaded as a model; the file is written to a new path.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetworkError
from .blocks import expand_vector, family as block_family
from .ckpt_keys import LoraTarget, checkpoint_family, lora_targets
from .lora_file import LoraFile, read_lora
from .output_path import check_output
from .recipe import recipe_metadata
from .tensor_stream import TensorInfo, TensorReader, output_dtype, write_safetensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraToBake:
    """One LoRA file and how strongly to bake it.

    Attributes:
        path (Path): the LoRA file.
        ratio (float): its multiplier (the `0.8` of `<lora:name:0.8>`), defaults to 1.
        block_weights (tuple[float, ...] | None): a LoRA Block Weight vector (12/17/20/26 values), defaults to None.
    """

    path: Path
    ratio: float = 1.0
    block_weights: tuple[float, ...] | None = None


def parse_lora_spec(text: str) -> LoraToBake:
    """`PATH[:RATIO]` -> LoraToBake (a drive letter such as `C:` is not taken for a ratio)."""
    match = re.match(r"^(.*):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$", text)
    if match and match.group(1):
        return LoraToBake(Path(match.group(1)), float(match.group(2)))
    return LoraToBake(Path(text))


@dataclass
class BakeResult:
    """What a bake wrote.

    Attributes:
        path (Path): the new checkpoint.
        architecture (str): "sd1", "sd2" or "sdxl".
        modules (int): LoRA modules baked (over all files).
        weights_changed (int): checkpoint tensors that changed.
        recipe (dict): the recipe stored in the metadata.
        seconds (float): wall time.
    """

    path: Path
    architecture: str
    modules: int = 0
    weights_changed: int = 0
    recipe: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Contribution:
    rows: tuple[int, int] | None
    module: object  # LoraModuleWeights
    factor: float


def _squeezed(shape: tuple) -> tuple:
    return tuple(shape[:2]) if tuple(shape[2:]) in ((), (1, 1)) else tuple(shape)


def _fits(module_shape: tuple, target: LoraTarget) -> bool:
    """Same shape, or a Linear delta for a 1x1 conv weight (or the reverse): SD1 stores proj_in/out as 1x1 convs."""
    return _squeezed(module_shape) == _squeezed(target.shape)


def _check_architecture(lora: LoraFile, arch: str, checkpoint: Path) -> None:
    if block_family(lora.architecture) != block_family(arch):
        raise NetworkError(f"{lora.label}: a {lora.architecture} LoRA cannot be baked into {checkpoint}, a {arch} "
                           "checkpoint. Use a LoRA made for this checkpoint's architecture.")


def _collect(loras: list[LoraToBake], targets: dict[str, LoraTarget], arch: str,
             checkpoint: Path) -> dict[str, list[_Contribution]]:
    """Checkpoint key -> what to add to it; every module checked against the checkpoint before any work."""
    by_key: dict[str, list[_Contribution]] = {}
    for spec in loras:
        lora = read_lora(spec.path)
        _check_architecture(lora, arch, checkpoint)
        lora.require_no_dora("baking into a checkpoint")
        weights = None
        if spec.block_weights is not None:
            weights = expand_vector(spec.block_weights, arch, source=f"{spec.path} block weights")
        unknown = [name for name in lora.modules if name not in targets]
        if unknown:
            raise NetworkError(f"{spec.path}: {len(unknown)} modules have no weight in {checkpoint} ({arch}), e.g. "
                               f"{unknown[0]}. The LoRA is for another model; bake it into the model it was made "
                               "for.")
        for name, module in lora.modules.items():
            target = targets[name]
            if not _fits(module.shape, target):
                raise NetworkError(f"{spec.path}: module {name} has shape {tuple(module.shape)}, the checkpoint "
                                   f"weight {target.key} {target.shape}. The LoRA is for another model variant.")
            factor = spec.ratio * (weights.weight(name) if weights is not None else 1.0)
            if factor != 0:
                by_key.setdefault(target.key, []).append(_Contribution(target.rows, module, factor))
    return by_key


def _baked(weight: torch.Tensor, contributions: list[_Contribution]) -> torch.Tensor:
    merged = weight.float()
    for part in contributions:
        region = merged if part.rows is None else merged[part.rows[0]:part.rows[1]]
        region += part.module.delta(torch.float32).reshape(region.shape) * part.factor
    return merged


def bake_loras(checkpoint: str | Path, loras: list[LoraToBake], out: str | Path, *, precision: str | None = None,
               overwrite: bool = False, hash_inputs: bool = True,
               progress: Callable[[int, int], None] | None = None) -> BakeResult:
    """Write a new checkpoint with LoRA files merged into its weights.

    Args:
        checkpoint (str | Path): the single-file SD1/SD2/SDXL checkpoint (never modified).
        loras (list[LoraToBake]): the LoRA files with ratios and optional block weights.
        out (str | Path): the new `.safetensors` checkpoint.
        precision (str, optional): "fp16", "bf16" or "fp32" for floating tensors, defaults to the checkpoint's.
        overwrite (bool, optional): replace an existing output, defaults to False.
        hash_inputs (bool, optional): record the checkpoint's sha256 in the metadata, defaults to True.
        progress (Callable[[int, int], None], optional): called with (done, total) tensors.

    Returns:
        BakeResult: modules baked, weights changed, the recipe.

    Raises:
        NetworkError: a LoRA for another architecture or variant, DoRA modules, an unsupported LyCORIS type.
        ValueError: bad output path, block-weight vector or precision.
        FileWriteError: the output cannot be written (no partial file is left).
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not loras:
        raise ValueError("loras: nothing to bake. Give at least one LoRA file.")
    out = check_output(out, [checkpoint, *(spec.path for spec in loras)], overwrite)
    with TensorReader(checkpoint) as reader:
        arch = checkpoint_family(reader.infos, str(checkpoint))
        by_key = _collect(loras, lora_targets(reader.infos, arch, aliases=True), arch, checkpoint)
        result = BakeResult(out, arch, modules=sum(len(v) for v in by_key.values()), weights_changed=len(by_key))
        result.recipe = {"type": "lora_trainer bake", "model": checkpoint.name, "precision": precision,
                         "loras": [{"name": spec.path.name, "ratio": spec.ratio,
                                    "block_weights": list(spec.block_weights) if spec.block_weights else None}
                                   for spec in loras]}
        metadata = recipe_metadata(reader.metadata, result.recipe, [(checkpoint, reader.metadata)], hash_inputs)
        infos = [TensorInfo(k, output_dtype(i.dtype, precision), i.shape) for k, i in reader.infos.items()]
        done = 0

        def tensor_for(info: TensorInfo) -> torch.Tensor:
            nonlocal done
            tensor = reader.get(info.key)
            if info.key in by_key:
                tensor = _baked(tensor, by_key[info.key])
            done += 1
            if progress is not None:
                progress(done, len(infos))
            return tensor.to(info.dtype)

        write_safetensors(out, infos, tensor_for, metadata)
    result.seconds = time.perf_counter() - started
    logger.info("baked %d LoRA modules into %d weights of %s -> %s in %.1f s", result.modules,
                result.weights_changed, checkpoint, out, result.seconds)
    return result


__all__ = ["BakeResult", "LoraToBake", "bake_loras", "parse_lora_spec"]
