"""Resize a LoRA's rank: fixed, or dynamic by `sv_ratio`, `sv_fro` or `sv_cumulative`, keeping its strength.

Each module's delta is decomposed exactly (LoRA/LoCon from its factors by QR + small SVD, LoHa/LoKr/full from
the full delta) and cut to the new rank. The new alpha is `old_scale * new_rank`, so the file keeps each module's
alpha/rank ratio and its strength. Dynamic methods keep exactly the values the criterion asks for (kohya's
resize adds one more); a null layer keeps rank 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .lora_file import LoraFile
from .lowrank import EnergyReport, choose_rank, svd_of_matrix, svd_of_product, truncation_energy
from .output import check_output, derived_metadata, lora_tensors, precision_dtype, source_entry, write_lora

logger = logging.getLogger(__name__)

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class ResizeResult:
    """A resize's output and report.

    Attributes:
        path (Path | None): the written file (None for a preview).
        ranks (dict[str, tuple[int, int]]): module -> (rank before, rank after).
        report (EnergyReport): retained Frobenius norm per module / block / overall.
    """

    path: Path | None
    ranks: dict = field(default_factory=dict)
    report: EnergyReport = field(default_factory=EnergyReport)


def parse_dynamic(text: str) -> tuple[str, float]:
    """`sv_fro:0.9` -> ("sv_fro", 0.9), with range checks.

    Raises:
        ValueError: unknown method, or a value out of range (sv_ratio > 1; sv_fro and sv_cumulative in (0, 1]).
    """
    method, _, value = text.partition(":")
    method = method.strip()
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"dynamic {text!r}: unknown method {method!r}. Use {', '.join(DYNAMIC_METHODS)}, "
                         "e.g. sv_fro:0.9.")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"dynamic {text!r}: {value!r} is not a number. Write METHOD:VALUE, e.g. sv_fro:0.9.") \
            from None
    if method == "sv_ratio" and number <= 1:
        raise ValueError(f"dynamic {text!r}: sv_ratio must be above 1 (keep values above s_max / ratio).")
    if method != "sv_ratio" and not 0 < number <= 1:
        raise ValueError(f"dynamic {text!r}: {method} must be in (0, 1].")
    return method, number


def resize_state_dict(lora: LoraFile, rank: int | None = None, dynamic: tuple[str, float] | None = None,
                      conv_rank: int | None = None, dtype=None) -> tuple[dict, ResizeResult]:
    """The resized kohya state dict and its report (no file written).

    Args:
        lora (LoraFile): the source.
        rank (int, optional): the new rank, or the cap of a dynamic choice.
        dynamic (tuple[str, float], optional): from `parse_dynamic`.
        conv_rank (int, optional): the new rank of kxk conv modules, defaults to `rank`.
        dtype (torch.dtype, optional): stored dtype, defaults to the source's dtype per module.

    Returns:
        tuple: (state dict, ResizeResult without a path).
    """
    if rank is None and dynamic is None:
        raise ValueError(f"{lora.label}: give a rank or a dynamic method (e.g. --rank 4 or --dynamic sv_fro:0.9).")
    lora.require_no_dora("a resize")
    result = ResizeResult(None)
    state: dict = {}
    for name, module in lora.modules.items():
        if module.algorithm == "lora":
            f = module.factors()
            decomposition = svd_of_product(f.up, f.down.reshape(f.rank, -1) * f.scale)
        else:
            decomposition = svd_of_matrix(module.delta())
        wanted = conv_rank if (module.is_conv and module.kernel != (1, 1) and conv_rank) else rank
        keep = choose_rank(decomposition.s, wanted, dynamic)
        scale = module.scale if module.scale > 0 else 1.0
        up, down = decomposition.factors(keep, scale)
        stored = dtype or next(iter(module.tensors.values())).dtype
        state.update(lora_tensors(name, up, down, scale * keep, module.shape, stored))
        before = module.rank or int(decomposition.s.numel())
        result.ranks[name] = (before, keep)
        result.report.modules[name] = truncation_energy(decomposition.s, keep, before)
    return state, result


def resize_lora(lora: LoraFile, out, rank: int | None = None, dynamic: str | None = None,
                conv_rank: int | None = None, precision: str | None = None) -> ResizeResult:
    """Write a resized copy of a LoRA.

    Args:
        lora (LoraFile): the source; never modified.
        out (str | Path): the new `.safetensors` file (not the source).
        rank (int, optional): fixed rank, or the cap of a dynamic choice.
        dynamic (str, optional): "sv_ratio:R", "sv_fro:F" or "sv_cumulative:C".
        conv_rank (int, optional): rank of kxk conv modules, defaults to `rank`.
        precision (str, optional): "float", "fp16" or "bf16", defaults to the source's dtype.

    Returns:
        ResizeResult: with `path` set.
    """
    inputs = [lora.path] if lora.path else []
    check_output(out, inputs)
    method = parse_dynamic(dynamic) if dynamic else None
    dtype = precision_dtype(precision) if precision else None
    state, result = resize_state_dict(lora, rank, method, conv_rank, dtype)
    after = {r for _, r in result.ranks.values()}
    recipe = {"source": source_entry(lora), "rank": rank, "conv_rank": conv_rank, "dynamic": dynamic,
              "retained_overall": result.report.overall}
    dims = {"ss_network_module": "networks.lora", "ss_network_dim": after.pop() if len(after) == 1 else "Dynamic",
            "ss_network_alpha": "Dynamic"}
    metadata = derived_metadata(lora.metadata, lora.architecture, "resize", recipe, dims)
    metadata.pop("ss_network_args", None)
    result.path = write_lora(out, state, metadata, inputs)
    logger.info("resized %s: %.4f of the Frobenius norm kept", lora.label, result.report.overall)
    return result


__all__ = ["DYNAMIC_METHODS", "ResizeResult", "parse_dynamic", "resize_lora", "resize_state_dict"]
