"""Merge LoRAs: exactly by rank concatenation, or to a chosen rank by SVD, with a retained-energy report.

Exact: each file's `ratio * scale * block_weight` is folded into its up side and the ranks are concatenated with
`alpha = rank`, so the merged delta is sum(ratio_i * delta_i) to float precision (negative ratios included).
SVD: the same stacked factors are decomposed exactly (QR + small SVD, see `lowrank`) and cut to the asked rank,
capped at each layer's size; LoHa/LoKr/full modules enter as full deltas.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetworkError
from .blocks import BlockWeights
from .lora_file import LoraFile
from .lowrank import EnergyReport, ModuleEnergy, choose_rank, svd_of_matrix, svd_of_product, truncation_energy
from .output import check_output, derived_metadata, lora_tensors, precision_dtype, source_entry, write_lora

logger = logging.getLogger(__name__)


@dataclass
class MergeInput:
    """One LoRA of a merge.

    Attributes:
        lora (LoraFile): the file.
        ratio (float): its strength in the merge (negative subtracts).
        weights (BlockWeights, optional): per-block ratios on top, defaults to None (all 1).
    """

    lora: LoraFile
    ratio: float = 1.0
    weights: BlockWeights | None = None

    def factor(self, name: str) -> float:
        return self.ratio * (self.weights.weight(name) if self.weights is not None else 1.0)


@dataclass
class MergeResult:
    """A merge's output and report.

    Attributes:
        path (Path | None): the written file (None for a preview).
        mode (str): "exact" or "svd".
        ranks (dict[str, int]): rank per output module.
        report (EnergyReport): retained Frobenius norm per module / block / overall.
    """

    path: Path | None
    mode: str
    ranks: dict = field(default_factory=dict)
    report: EnergyReport = field(default_factory=EnergyReport)


def _check_inputs(inputs: list[MergeInput]) -> str:
    if not inputs:
        raise ValueError("merge: no input LoRAs. Give at least one FILE:RATIO.")
    arch = inputs[0].lora.architecture
    for item in inputs:
        if item.lora.architecture != arch and {item.lora.architecture, arch} != {"sd2", "sd2-v"}:
            raise NetworkError(f"{item.lora.label}: a {item.lora.architecture} LoRA cannot be merged with "
                               f"{inputs[0].lora.label} ({arch}). Merge LoRAs of one architecture.")
        item.lora.require_no_dora("a merge")
    return arch


def _contributions(inputs: list[MergeInput]) -> dict[str, list[tuple[MergeInput, float]]]:
    by_name: dict[str, list] = {}
    shapes: dict[str, tuple] = {}
    for item in inputs:
        for name, module in item.lora.modules.items():
            if name in shapes and shapes[name][0] != module.shape:
                raise NetworkError(f"{item.lora.label}: module {name} has shape {module.shape}, but "
                                   f"{shapes[name][1]} has {shapes[name][0]}. The files are for different models.")
            shapes.setdefault(name, (module.shape, item.lora.label))
            factor = item.factor(name)
            if factor != 0.0:
                by_name.setdefault(name, []).append((item, factor))
    return by_name


def _stacked(name: str, parts) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U [out, R], D [R, in_flat]) with the merge factors folded into U, or None if a part is not LoRA."""
    ups, downs = [], []
    for item, factor in parts:
        module = item.lora.modules[name]
        if module.algorithm != "lora":
            return None
        f = module.factors()
        ups.append(f.up * (f.scale * factor))
        downs.append(f.down.reshape(f.rank, -1))
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _exact_delta(name: str, parts) -> torch.Tensor:
    return sum(item.lora.modules[name].delta() * factor for item, factor in parts)


def merge_state_dict(inputs: list[MergeInput], rank: int | None = None, conv_rank: int | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[dict, MergeResult]:
    """The merged kohya state dict and its report (no file written).

    Args:
        inputs (list[MergeInput]): files with ratios.
        rank (int, optional): SVD to this rank; None merges exactly by concatenation.
        conv_rank (int, optional): rank of kxk conv modules in an SVD merge, defaults to `rank`.
        dtype (torch.dtype, optional): stored weight dtype, defaults to float32.

    Returns:
        tuple: (state dict, MergeResult without a path).
    """
    _check_inputs(inputs)
    mode = "exact" if rank is None else "svd"
    result = MergeResult(None, mode)
    state: dict = {}
    for name, parts in _contributions(inputs).items():
        shape = parts[0][0].lora.modules[name].shape
        stacked = _stacked(name, parts)
        if mode == "exact":
            if stacked is None:
                raise NetworkError(f"{parts[0][0].lora.label}: module {name} is not LoRA/LoCon; an exact merge "
                                   "concatenates LoRA factors. Merge to a rank instead (--rank N).")
            up, down = stacked
            state.update(lora_tensors(name, up, down, up.shape[1], shape, dtype))
            result.ranks[name] = up.shape[1]
            result.report.modules[name] = _stored_error(name, state, up, down)
            continue
        decomposition = svd_of_matrix(_exact_delta(name, parts)) if stacked is None else svd_of_product(*stacked)
        wanted = conv_rank if (len(shape) == 4 and shape[2:] != (1, 1) and conv_rank) else rank
        keep = choose_rank(decomposition.s, wanted)
        up, down = decomposition.factors(keep)
        state.update(lora_tensors(name, up, down, keep, shape, dtype))
        result.ranks[name] = keep
        before = stacked[0].shape[1] if stacked is not None else int(decomposition.s.numel())
        result.report.modules[name] = truncation_energy(decomposition.s, keep, before)
    return state, result


def _product_norm_sq(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F^2 from the two small Gram matrices (never forms the product)."""
    left, right = left.double(), right.double()
    return max(0.0, float(((left.T @ left) * (right @ right.T)).sum()))


def _stored_error(name: str, state: dict, up: torch.Tensor, down: torch.Tensor) -> ModuleEnergy:
    """Energy figures of an exact merge as stored: the only loss is the output dtype's rounding.

    `up @ down` is the exact sum (the ratios are folded into `up`); the stored product differs only by rounding,
    and both norms come from Gram matrices of the stacked factors, so no full delta is built.
    """
    rank = up.shape[1]
    stored_up = state[f"{name}.lora_up.weight"].reshape(up.shape[0], rank)
    stored_down = state[f"{name}.lora_down.weight"].reshape(rank, -1)
    difference = _product_norm_sq(torch.cat([up, -stored_up.to(up.dtype)], 1),
                                  torch.cat([down, stored_down.to(down.dtype)], 0))
    return ModuleEnergy(rank, rank, _product_norm_sq(up, down), difference)


def merge_loras(inputs: list[MergeInput], out, rank: int | None = None, conv_rank: int | None = None,
                precision: str = "float") -> MergeResult:
    """Merge LoRAs into a new file.

    Args:
        inputs (list[MergeInput]): files with ratios and optional block weights; never modified.
        out (str | Path): the new `.safetensors` file (not one of the inputs).
        rank (int, optional): SVD merge to this rank; None = exact merge.
        conv_rank (int, optional): rank of kxk conv modules in an SVD merge, defaults to `rank`.
        precision (str, optional): "float", "fp16" or "bf16", defaults to "float".

    Returns:
        MergeResult: with `path` set.
    """
    sources = [item.lora.path for item in inputs if item.lora.path]
    check_output(out, sources)
    state, result = merge_state_dict(inputs, rank, conv_rank, precision_dtype(precision))
    recipe = {"mode": result.mode, "rank": rank, "conv_rank": conv_rank, "precision": precision,
              "sources": [{**source_entry(i.lora), "ratio": i.ratio,
                           "block_weights": i.weights.text() if i.weights else None} for i in inputs],
              "retained_overall": result.report.overall}
    ranks = set(result.ranks.values())
    dims = {"ss_network_module": "networks.lora",
            "ss_network_dim": ranks.pop() if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": "Dynamic" if result.mode == "exact" or len(set(result.ranks.values())) > 1
            else next(iter(result.ranks.values()))}
    metadata = derived_metadata(inputs[0].lora.metadata, inputs[0].lora.architecture, "merge", recipe, dims)
    metadata.pop("ss_network_args", None)
    result.path = write_lora(out, state, metadata, sources)
    logger.info("merged %d LoRAs (%s): %.4f of the Frobenius norm kept", len(inputs), result.mode,
                result.report.overall)
    return result


__all__ = ["MergeInput", "MergeResult", "merge_loras", "merge_state_dict"]
