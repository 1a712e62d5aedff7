"""Apply block weights to a LoRA file: a new file whose effect equals the weighted one at generation time.

LoRA Block Weight multiplies one factor of each module in memory (LoRA/LoCon `lora_up`, LoHa `hada_w1_a`, LoKr
`lokr_w1`/`lokr_w1_a`, full `diff`); the same factor is scaled here, once, so the delta scales linearly (never
squared) and DoRA modules behave exactly as they do under the extension. Modules weighted 0 are left out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetworkError
from .blocks import BlockWeights, family, slot_of
from .lora_file import LoraFile, LoraModuleWeights
from .output import check_output, derived_metadata, source_entry, write_lora

logger = logging.getLogger(__name__)

# The factor the extension scales per algorithm (first one present).
SCALED_FACTOR = {"lora": ("lora_up.weight",), "loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a"),
                 "full": ("diff",)}


@dataclass
class BlockWeightResult:
    """What applying block weights did.

    Attributes:
        path (Path | None): the written file (None for a preview).
        weights (BlockWeights): the vector used.
        by_block (dict[str, tuple[int, float]]): slot -> (modules, weight) for slots holding modules.
        dropped (list[str]): modules left out (weight 0).
        zero_filled_used (list[str]): slots missing from the given layout (weight 0, as the extension does) that
            hold modules of this file.
    """

    path: Path | None
    weights: BlockWeights
    by_block: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)
    zero_filled_used: list = field(default_factory=list)


def _scaled_module(module: LoraModuleWeights, weight: float) -> dict[str, torch.Tensor]:
    tensors = dict(module.tensors)
    key = next(k for k in SCALED_FACTOR[module.algorithm] if k in tensors)
    original = tensors[key]
    tensors[key] = (original.float() * weight).to(original.dtype)
    out = {f"{module.name}.{suffix}": t for suffix, t in tensors.items()}
    if module.alpha is not None:
        out[f"{module.name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    if module.scale_key is not None:
        out[f"{module.name}.scale"] = torch.tensor(module.scale_key, dtype=torch.float32)
    if module.dora_scale is not None:
        out[f"{module.name}.dora_scale"] = module.dora_scale
    return out


def weighted_state_dict(lora: LoraFile, weights: BlockWeights) -> tuple[dict, BlockWeightResult]:
    """The kohya state dict of `lora` with block weights applied, and what was done.

    Args:
        lora (LoraFile): the source.
        weights (BlockWeights): expanded for the source's architecture.

    Returns:
        tuple: (state dict, BlockWeightResult without a path).
    """
    if family(weights.architecture) != family(lora.architecture):
        raise NetworkError(f"{lora.label}: block weights were built for {weights.architecture}, the file is "
                           f"{lora.architecture}. Build them for the file's architecture.")
    result = BlockWeightResult(None, weights)
    state: dict = {}
    for name, module in lora.modules.items():
        weight = weights.weight(name)
        slot = slot_of(name)
        count, _ = result.by_block.get(slot, (0, weight))
        result.by_block[slot] = (count + 1, weight)
        if slot in weights.zero_filled and slot not in result.zero_filled_used:
            result.zero_filled_used.append(slot)
        if weight == 0.0:
            result.dropped.append(name)
            continue
        state.update(_scaled_module(module, weight))
    if not state:
        raise NetworkError(f"{lora.label}: the block weights {weights.text()} set every module to 0; the result "
                           "would be empty. Give some block a non-zero weight.")
    if result.zero_filled_used:
        logger.warning("%s: blocks %s are not in the %d-value layout and get weight 0 (as LoRA Block Weight does)",
                       lora.label, ", ".join(result.zero_filled_used), len(weights.given))
    return state, result


def apply_block_weights(lora: LoraFile, weights: BlockWeights, out) -> BlockWeightResult:
    """Write a new LoRA with block weights baked in.

    Args:
        lora (LoraFile): the source (read with `read_lora`); never modified.
        weights (BlockWeights): from `presets.resolve_weights` / `blocks.expand_vector` for its architecture.
        out (str | Path): the new `.safetensors` file (not the source).

    Returns:
        BlockWeightResult: with `path` set.
    """
    inputs = [lora.path] if lora.path else []
    check_output(out, inputs)
    state, result = weighted_state_dict(lora, weights)
    recipe = {"source": source_entry(lora), "vector": weights.text(), "layout": len(weights.given),
              "dropped_modules": len(result.dropped)}
    metadata = derived_metadata(lora.metadata, lora.architecture, "block_weights", recipe)
    result.path = write_lora(out, state, metadata, inputs)
    return result


__all__ = ["BlockWeightResult", "SCALED_FACTOR", "apply_block_weights", "weighted_state_dict"]
