"""Checkpoint merge, streamed tensor by tensor: weighted sum `A*(1-M) + B*M` and add difference `A + (B-C)*M`,
with one M or one M per block (SuperMerger's MBW slots).

Blocks (SuperMerger `blockfromkey`): SD1/SD2 have 26 slots `BASE, IN00..IN11, M00, OUT00..OUT11`, SDXL 20 slots
`BASE, IN00..IN08, M00, OUT00..OUT08`. UNet `input_blocks.N` -> IN N, `middle_block` -> M00, `output_blocks.N` ->
OUT N, time and label embeddings -> IN00, the final `out.` layers -> the last OUT slot; text encoders, VAE and
every other key -> BASE. A vector of the wrong length is an error (SuperMerger turns a 26-vector into an SDXL one
by dropping slots; we do not guess).

Keys in one file only, as SuperMerger: a key only in A is copied from A; a key only in B is copied from B in
weighted-sum mode and left out in add-difference mode (A + (B-C)*M has no A term); a key in A and B but missing
from C is copied from A. Unlike SuperMerger, every floating-point tensor is merged (SuperMerger keeps A's value for
keys whose name holds neither "weight" nor "bias", such as OpenCLIP's `positional_embedding`); integer tensors
(`position_ids`) are copied from A. Arithmetic is float32, the result is stored in A's dtype or `precision`.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .blocks import SD_SLOTS, SDXL_SLOTS
from .ckpt_keys import checkpoint_family
from .output_path import check_output
from .recipe import recipe_metadata
from .tensor_stream import TensorInfo, TensorReader, output_dtype, write_safetensors

logger = logging.getLogger(__name__)

MODES = ("sum", "add-diff")
_UNET = "model.diffusion_model."


def merge_slots(family: str) -> tuple[str, ...]:
    """The MBW slot names of a family ("sd1", "sd2" -> 26, "sdxl" -> 20)."""
    return SDXL_SLOTS if family == "sdxl" else SD_SLOTS


def merge_slot(key: str, family: str) -> str:
    """The MBW slot of one checkpoint key (see the module docstring).

    Args:
        key (str): an original checkpoint key.
        family (str): "sd1", "sd2" or "sdxl".

    Returns:
        str: a name from `merge_slots(family)`.
    """
    if not key.startswith(_UNET):
        return "BASE"
    rest = key[len(_UNET):]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return merge_slots(family)[-1]
    if m := re.match(r"input_blocks\.(\d+)\.", rest):
        return f"IN{int(m.group(1)):02d}"
    if rest.startswith("middle_block."):
        return "M00"
    if m := re.match(r"output_blocks\.(\d+)\.", rest):
        return f"OUT{int(m.group(1)):02d}"
    return "BASE"


def block_alphas(values: list[float], family: str) -> dict[str, float]:
    """Name a per-block vector by slot.

    Args:
        values (list[float]): 26 values (SD1/SD2) or 20 (SDXL), BASE first.
        family (str): "sd1", "sd2" or "sdxl".

    Returns:
        dict[str, float]: slot -> M.

    Raises:
        ValueError: the length does not fit the family.
    """
    slots = merge_slots(family)
    if len(values) != len(slots):
        raise ValueError(f"block alpha: {len(values)} values, a {family} checkpoint needs {len(slots)} "
                         f"({', '.join(slots[:3])}, ..., {slots[-1]}); SD1/SD2 take 26, SDXL 20. Give one value "
                         "per block.")
    return dict(zip(slots, (float(v) for v in values)))


@dataclass
class CheckpointMergeResult:
    """What a checkpoint merge wrote.

    Attributes:
        path (Path): the merged file.
        family (str): "sd1", "sd2" or "sdxl".
        merged (int): keys computed from the inputs.
        copied_from_a (list[str]): keys copied from A unchanged (A only, integer tensors, missing from C).
        copied_from_b (list[str]): keys only in B, copied (weighted sum).
        left_out (list[str]): keys only in B, not written (add difference).
        recipe (dict): the recipe stored in the file's metadata.
        seconds (float): wall time.
    """

    path: Path
    family: str
    merged: int = 0
    copied_from_a: list[str] = field(default_factory=list)
    copied_from_b: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    seconds: float = 0.0


def _check_inputs(readers: dict[str, TensorReader]) -> str:
    families = {name: checkpoint_family(r.infos, str(r.path)) for name, r in readers.items()}
    family = families["A"]
    for name, other in families.items():
        if other != family:
            raise ValueError(f"{readers[name].path}: a {other} checkpoint, but {readers['A'].path} is {family}. "
                             "Merge checkpoints of the same architecture.")
    for name, reader in readers.items():
        for key, info in reader.infos.items():
            a_info = readers["A"].infos.get(key)
            if a_info is not None and a_info.shape != info.shape:
                raise ValueError(f"{key}: shape {info.shape} in {reader.path} but {a_info.shape} in "
                                 f"{readers['A'].path}. The checkpoints do not have the same layout; merge models "
                                 "of the same architecture and variant.")
    return family


def _plan(readers: dict[str, TensorReader], mode: str, precision: str | None,
          result: CheckpointMergeResult) -> list[tuple[TensorInfo, str]]:
    """(output info, source) per key, source = "merge", "A" or "B"."""
    a, b, c = readers["A"], readers["B"], readers.get("C")
    plan = []
    for key, info in a.infos.items():
        mergeable = info.dtype.is_floating_point and key in b and (c is None or key in c)
        source = "merge" if mergeable else "A"
        if source == "A":
            result.copied_from_a.append(key)
        plan.append((TensorInfo(key, output_dtype(info.dtype, precision), info.shape), source))
    for key, info in b.infos.items():
        if key in a:
            continue
        if mode == "sum":
            result.copied_from_b.append(key)
            plan.append((TensorInfo(key, output_dtype(info.dtype, precision), info.shape), "B"))
        else:
            result.left_out.append(key)
    return plan


def _merge_tensor(key: str, readers: dict[str, TensorReader], mode: str, m: float) -> torch.Tensor:
    a = readers["A"].get(key)
    if mode == "sum" and m == 0:
        return a
    b = readers["B"].get(key)
    if mode == "sum":
        return b if m == 1 else torch.lerp(a.float(), b.float(), m)
    c = readers["C"].get(key)
    return a.float() + (b.float() - c.float()) * m


def _recipe(mode: str, family: str, inputs: list[Path], alpha: float, alphas: dict | None,
            precision: str | None) -> dict:
    return {"type": "lora_trainer ckpt-merge", "mode": mode, "family": family, "primary_model": inputs[0].name,
            "secondary_model": inputs[1].name, "tertiary_model": inputs[2].name if len(inputs) > 2 else None,
            "alpha": None if alphas else alpha, "block_alpha": alphas, "precision": precision}


def merge_checkpoints(a: str | Path, b: str | Path, out: str | Path, *, c: str | Path | None = None,
                      mode: str = "sum", alpha: float = 0.5, block_alpha: list[float] | None = None,
                      precision: str | None = None, overwrite: bool = False, hash_inputs: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> CheckpointMergeResult:
    """Merge two (sum) or three (add difference) checkpoints into a new `.safetensors` file, one tensor at a time.

    Args:
        a (str | Path): model A (its metadata is kept; the result has its keys and dtypes).
        b (str | Path): model B.
        out (str | Path): the output `.safetensors` file.
        c (str | Path, optional): model C, required for mode "add-diff", defaults to None.
        mode (str, optional): "sum" (`A*(1-M) + B*M`) or "add-diff" (`A + (B-C)*M`), defaults to "sum".
        alpha (float, optional): M for every key when no `block_alpha` is given, defaults to 0.5.
        block_alpha (list[float], optional): one M per MBW slot (26 SD1/SD2, 20 SDXL), defaults to None.
        precision (str, optional): "fp16", "bf16" or "fp32" for floating tensors, defaults to A's dtypes.
        overwrite (bool, optional): replace an existing output, defaults to False.
        hash_inputs (bool, optional): record the inputs' sha256 in the metadata, defaults to True.
        progress (Callable[[int, int], None], optional): called with (done, total) keys.

    Returns:
        CheckpointMergeResult: counts of merged and copied keys, the recipe, the time taken.

    Raises:
        ValueError: bad mode, alpha vector or output path, different architectures, or a shape mismatch (named).
        FileWriteError: the output cannot be written (no partial file is left).
    """
    started = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: unknown. Use one of {MODES}.")
    if (mode == "add-diff") != (c is not None):
        raise ValueError("model C: add difference needs exactly three checkpoints (A B C), weighted sum two.")
    inputs = [Path(p) for p in (a, b, c) if p is not None]
    out = check_output(out, inputs, overwrite)
    with ExitStack() as stack:
        readers = {name: stack.enter_context(TensorReader(path)) for name, path in zip("ABC", inputs)}
        family = _check_inputs(readers)
        alphas = block_alphas(block_alpha, family) if block_alpha is not None else None
        result = CheckpointMergeResult(out, family)
        plan = _plan(readers, mode, precision, result)
        result.recipe = _recipe(mode, family, inputs, alpha, alphas, precision)
        metadata = recipe_metadata(readers["A"].metadata, result.recipe,
                                   [(r.path, r.metadata) for r in readers.values()], hash_inputs)
        sources = {info.key: source for info, source in plan}
        done = 0

        def tensor_for(info: TensorInfo) -> torch.Tensor:
            nonlocal done
            source = sources[info.key]
            if source == "merge":
                m = alphas[merge_slot(info.key, family)] if alphas else alpha
                tensor = _merge_tensor(info.key, readers, mode, m)
                result.merged += 1
            else:
                tensor = readers[source].get(info.key)
            done += 1
            if progress is not None:
                progress(done, len(plan))
            return tensor.to(info.dtype)

        write_safetensors(out, [info for info, _ in plan], tensor_for, metadata)
    result.seconds = time.perf_counter() - started
    logger.info("merged %s (%s, %d keys merged, %d copied from A, %d from B, %d left out) in %.1f s", out, mode,
                result.merged, len(result.copied_from_a), len(result.copied_from_b), len(result.left_out),
                result.seconds)
    return result


__all__ = ["MODES", "CheckpointMergeResult", "block_alphas", "merge_checkpoints", "merge_slot",
           "merge_slots"]
