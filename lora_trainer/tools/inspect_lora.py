"""Inspect a LoRA file: architecture, algorithm, ranks per module and block, alphas, conv, metadata, key check.

The key check asks whether every module name lands on a module of the architecture (the full-size model's
Linear/Conv2d layers and text-encoder targets), the question the trainer's pre-save check asks of the loaded
model: a name that fits nowhere is dropped silently by the WebUI.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .architectures import architecture_modules
from .blocks import group_by_slot
from .lora_file import LoraFile, read_lora


@dataclass
class BlockSummary:
    """Modules of one slot: count and the ranks they have."""

    modules: int
    ranks: list


@dataclass
class InspectReport:
    """What a LoRA file holds.

    Attributes:
        path (str): the file.
        architecture (str): "sd1", "sd2" or "sdxl".
        algorithm (str): "lora", "locon", "loha", "lokr", "full" or "mixed".
        modules (int): number of modules.
        ranks (dict[str, int | None]): rank per module.
        alphas (dict[str, float | None]): alpha per module.
        by_block (dict[str, BlockSummary]): per slot (UNBLOCKED for modules outside the blocks).
        conv_modules (int): modules on kxk convolutions (LoCon / LyCORIS conv).
        unet_modules (int): UNet modules.
        te_modules (int): text-encoder modules.
        dora_modules (list[str]): modules with DoRA weights.
        unmatched (list[str]): names that land on no module of the architecture.
        outside_kohya_targets (list[str]): names on real modules kohya does not target (conv_in, time embedding...).
        ignored_keys (list[str]): keys outside any LoRA component.
        metadata (dict[str, str]): `ss_*` and other metadata (tag frequency etc. shortened).
    """

    path: str
    architecture: str
    algorithm: str
    modules: int
    ranks: dict
    alphas: dict
    by_block: dict
    conv_modules: int
    unet_modules: int
    te_modules: int
    dora_modules: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    outside_kohya_targets: list = field(default_factory=list)
    ignored_keys: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def keys_ok(self) -> bool:
        """True when every module name lands on the architecture."""
        return not self.unmatched

    def to_dict(self) -> dict:
        data = asdict(self)
        data["keys_ok"] = self.keys_ok
        return data


def _short(value: str, limit: int = 300) -> str:
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"


def inspect_lora_file(lora: LoraFile) -> InspectReport:
    """Inspect a LoRA already read.

    Args:
        lora (LoraFile): from `read_lora`.

    Returns:
        InspectReport: the facts and the key check.
    """
    table = architecture_modules(lora.architecture)
    names = list(lora.modules)
    by_block = {slot: BlockSummary(len(group), sorted({lora.modules[n].rank for n in group}, key=lambda r: r or 0))
                for slot, group in group_by_slot(names).items()}
    return InspectReport(
        path=lora.label, architecture=lora.architecture, algorithm=lora.algorithm, modules=len(names),
        ranks={n: m.rank for n, m in lora.modules.items()},
        alphas={n: m.alpha for n, m in lora.modules.items()},
        by_block=by_block,
        conv_modules=sum(1 for m in lora.modules.values() if m.is_conv and m.kernel != (1, 1)),
        unet_modules=sum(1 for n in names if n.startswith("lora_unet_")),
        te_modules=sum(1 for n in names if not n.startswith("lora_unet_")),
        dora_modules=lora.dora_modules,
        unmatched=[n for n in names if n not in table.shapes],
        outside_kohya_targets=[n for n in names if n in table.shapes and n not in table.locon_targets],
        ignored_keys=list(lora.ignored_keys),
        metadata={k: _short(v) for k, v in sorted(lora.metadata.items())},
    )


def inspect_lora(path) -> InspectReport:
    """Read and inspect a LoRA file.

    Args:
        path (str | Path): the file.

    Returns:
        InspectReport: the facts and the key check.
    """
    return inspect_lora_file(read_lora(Path(path)))


def rank_summary(report: InspectReport) -> str:
    """`4 (x190), 8 (x2)`: the distinct ranks with their counts."""
    counts = Counter(report.ranks.values())
    return ", ".join(f"{rank} (x{count})" for rank, count in sorted(counts.items(), key=lambda kv: kv[0] or 0))


__all__ = ["BlockSummary", "InspectReport", "inspect_lora", "inspect_lora_file", "rank_summary"]
