"""Block layouts: the slots of a block-weight vector per architecture and which slot each kohya module is in.

The slot of a module is the one the LoRA Block Weight extension picks at generation time: it converts the module
name to the WebUI's compvis name and matches `input_blocks_N` -> IN{N}, `middle_block` -> M00,
`output_blocks_N` -> OUT{N}, text-encoder `encoder` layers -> BASE. kohya's SD1/SD2 names use diffusers paths;
those convert to the same block numbers (`networks.keys.unet_block_index`) and `conv_in` to IN00. Modules it
matches nowhere (time embedding, `conv_out` / `out`, SDXL's `label_emb`) keep weight 1: they are UNBLOCKED here.

A vector has one value per slot of a layout: SD1/SD2 take 26 values (every slot) or 17 (slots that hold
attention, enough for plain LoRA); SDXL takes 20 or 12. The extension expands a short vector to its 26 slots by
name with 0 in the slots it lacks; `expand_vector` does the same, so a file weighted here matches a prompt
weighted there. A length that does not fit the architecture is an error, never a remap.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..networks.keys import MID_BLOCK_INDEX, component_of, unet_block_index

BASE = "BASE"
UNBLOCKED = "UNBLOCKED"

SD_SLOTS = tuple([BASE] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
SDXL_SLOTS = tuple([BASE] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)])

LAYOUTS: dict[str, dict[int, tuple[str, ...]]] = {
    "sd": {
        17: (BASE, "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
        26: SD_SLOTS,
    },
    "sdxl": {
        12: (BASE, "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
        20: SDXL_SLOTS,
    },
}
FAMILY_NAMES = {"sd": "SD1/SD2", "sdxl": "SDXL"}

# UNet modules outside the numbered blocks, by their kohya path part (diffusers and compvis spellings). The
# extension leaves them at weight 1.
UNBLOCKED_UNET_PARTS = ("time_embedding", "time_embed", "add_embedding", "label_emb", "conv_out", "conv_norm_out",
                        "out")
_UNBLOCKED_RE = re.compile(r"^lora_unet_(" + "|".join(UNBLOCKED_UNET_PARTS) + r")(_|$)")
_CONV_IN_RE = re.compile(r"^lora_unet_conv_in($|_)")


def family(architecture: str) -> str:
    """"sd" for "sd1"/"sd2"/"sd2-v", "sdxl" for "sdxl"; ValueError for anything else."""
    if architecture in ("sd1", "sd2", "sd2-v"):
        return "sd"
    if architecture == "sdxl":
        return "sdxl"
    raise ValueError(f"architecture {architecture!r}: unknown. Use one of sd1, sd2, sd2-v, sdxl.")


def slots(architecture: str) -> tuple[str, ...]:
    """Every slot of an architecture: 26 for SD1/SD2, 20 for SDXL."""
    return LAYOUTS[family(architecture)][26 if family(architecture) == "sd" else 20]


def fitting_lengths(architecture: str) -> tuple[int, ...]:
    """Vector lengths that fit an architecture: (17, 26) for SD1/SD2, (12, 20) for SDXL."""
    return tuple(sorted(LAYOUTS[family(architecture)]))


def is_named_unblocked(name: str) -> bool:
    """True for a UNet module the extension leaves at weight 1 (time embedding, conv_out, label_emb, ...)."""
    return bool(_UNBLOCKED_RE.match(name))


def slot_of(name: str) -> str:
    """The slot of a kohya module name, as LoRA Block Weight assigns it at generation time.

    Args:
        name (str): kohya module name (`lora_unet_...`, `lora_te_...`, `lora_te1_...`, `lora_te2_...`), with or
            without a `.suffix`.

    Returns:
        str: "BASE", "IN00".."IN11", "M00", "OUT00".."OUT11", or UNBLOCKED (weight stays 1): UNet modules outside
        the blocks, text-encoder modules outside the encoder layers, names of no known component.
    """
    name = name.split(".", 1)[0]
    component = component_of(name)
    if component is None:
        return UNBLOCKED
    if component != "unet":
        return BASE if "encoder" in name else UNBLOCKED
    if _CONV_IN_RE.match(name):
        return "IN00"
    index = unet_block_index(name)
    if index is None:
        return UNBLOCKED
    if index < MID_BLOCK_INDEX:
        return f"IN{index:02d}"
    if index == MID_BLOCK_INDEX:
        return "M00"
    return f"OUT{index - MID_BLOCK_INDEX - 1:02d}"


@dataclass(frozen=True)
class BlockWeights:
    """A block-weight vector expanded to every slot of one architecture.

    Attributes:
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        weights (dict[str, float]): slot -> weight for every slot of the architecture.
        given (tuple[float, ...]): the values as given (12, 17, 20 or 26 of them).
        zero_filled (tuple[str, ...]): slots the given layout lacks, set to 0 as the extension does.
    """

    architecture: str
    weights: dict
    given: tuple
    zero_filled: tuple

    def weight(self, name: str) -> float:
        """The weight of a kohya module name (1.0 for UNBLOCKED modules)."""
        slot = slot_of(name)
        if slot == UNBLOCKED:
            return 1.0
        if slot not in self.weights:
            raise ValueError(f"{name}: block {slot} does not exist in {FAMILY_NAMES[family(self.architecture)]}. "
                             "The file is for another architecture; pick the vector for its own architecture.")
        return float(self.weights[slot])

    def text(self) -> str:
        """The given values as a comma-separated vector (for metadata and presets)."""
        return ",".join(f"{v:g}" for v in self.given)


def expand_vector(values, architecture: str, source: str = "block weights") -> BlockWeights:
    """Expand a 12/17/20/26-value vector to every slot of an architecture.

    Args:
        values (Sequence[float]): the vector.
        architecture (str): the LoRA's architecture.
        source (str, optional): what the vector came from (preset name, option), for error messages.

    Returns:
        BlockWeights: slot weights; slots missing from the layout are 0 and listed in `zero_filled`.

    Raises:
        ValueError: the length fits no layout of this architecture (the message names the lengths that do).
    """
    fam = family(architecture)
    values = tuple(float(v) for v in values)
    layout = LAYOUTS[fam].get(len(values))
    if layout is None:
        other = [f"{n} ({FAMILY_NAMES[f]})" for f, table in LAYOUTS.items() if f != fam for n in table]
        hint = f" {len(values)} values is a {FAMILY_NAMES[_family_of_length(len(values))]} layout." \
            if _family_of_length(len(values)) else ""
        raise ValueError(
            f"{source}: {len(values)} values do not fit a {FAMILY_NAMES[fam]} LoRA.{hint} Give "
            f"{' or '.join(str(n) for n in fitting_lengths(architecture))} values for {FAMILY_NAMES[fam]} "
            f"(other architectures take {', '.join(other)})."
        )
    weights = dict.fromkeys(slots(architecture), 0.0)
    weights.update(zip(layout, values))
    zero_filled = tuple(s for s in slots(architecture) if s not in layout)
    return BlockWeights(architecture, weights, values, zero_filled)


def _family_of_length(n: int) -> str | None:
    for fam, table in LAYOUTS.items():
        if n in table:
            return fam
    return None


def parse_vector(text: str, source: str = "block weights") -> list[float]:
    """Parse a literal vector `1,0,0.5,...` (spaces allowed).

    Args:
        text (str): comma-separated numbers.
        source (str, optional): where the text came from, for error messages.

    Returns:
        list[float]: the numbers.

    Raises:
        ValueError: an item is not a number (the extension's random `R`/`U` and `X` items are refused: a file
            needs fixed numbers).
    """
    items = [item.strip() for item in text.split(",")]
    values = []
    for position, item in enumerate(items, 1):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{source}: item {position} ({item!r}) is not a number. Write the vector as numbers "
                             "separated by commas, e.g. 1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0.") from None
    return values


def group_by_slot(names) -> dict[str, list[str]]:
    """Module names grouped by slot (slot order first, UNBLOCKED last).

    Args:
        names (Iterable[str]): kohya module names.

    Returns:
        dict[str, list[str]]: slot -> names, only slots that hold names.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(slot_of(name), []).append(name)
    order = {slot: i for i, slot in enumerate(SD_SLOTS)}
    return dict(sorted(groups.items(), key=lambda item: order.get(item[0], len(order))))


__all__ = [
    "BASE", "FAMILY_NAMES", "LAYOUTS", "SDXL_SLOTS", "SD_SLOTS", "UNBLOCKED", "UNBLOCKED_UNET_PARTS", "BlockWeights",
    "expand_vector", "family", "fitting_lengths", "group_by_slot", "is_named_unblocked", "parse_vector", "slot_of",
    "slots",
]
