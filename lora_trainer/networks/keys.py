"""kohya key names as data: prefixes, dot<->underscore, suffixes, UNet block index of a module name.

kohya names a module `<prefix>_<module path with "." replaced by "_">`, e.g.
`lora_unet_down_blocks_0_attentions_0_proj_in`; a state-dict key is `<name>.<suffix>` (`lora_down.weight`, ...).
SD1/SD2 UNet names follow diffusers paths, SDXL UNet names follow compvis (ldm/sgm) paths.
"""
from __future__ import annotations

import re

PREFIXES = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
TE_COMPONENTS = ("te", "te1", "te2")

# 25 blocks as kohya and the LoRA Block Weight extension count them: IN00..IN11, MID, OUT00..OUT11.
NUM_DOWN_BLOCKS = 12
MID_BLOCK_INDEX = 12
NUM_BLOCKS = 25
BLOCK_LABELS = tuple([f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)])

# OpenCLIP's fused nn.MultiheadAttention is listed under four names ending in these parts.
FUSED_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
_FUSED_RE = re.compile(r"^(.*_self_attn)_(q_proj|k_proj|v_proj|out_proj)$")

_DIFFUSERS_UPDOWN_RE = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_COMPVIS_RE = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_")


def kohya_name(component: str, module_path: str) -> str:
    """The kohya module name of a module path.

    Args:
        component (str): "unet", "te", "te1" or "te2".
        module_path (str): dotted path of the module inside that component, e.g. `down_blocks.0.attentions.0.proj_in`.

    Returns:
        str: e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    """
    if component not in PREFIXES:
        raise ValueError(f"component {component!r}: unknown. Use one of {sorted(PREFIXES)}.")
    return f"{PREFIXES[component]}_{module_path.replace('.', '_')}"


def component_of(name: str) -> str | None:
    """"unet", "te", "te1" or "te2" for a kohya module name (longest prefix wins), None if it has none of them."""
    for component in ("te1", "te2", "unet", "te"):
        if name.startswith(PREFIXES[component] + "_"):
            return component
    return None


def split_key(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`); a key without a dot -> (key, "")."""
    name, _, suffix = key.partition(".")
    return name, suffix


def fused_attention_part(name: str) -> tuple[str, str] | None:
    """(`..._self_attn`, part) for a fused-attention name ending `_self_attn_{q,k,v,out}_proj`, else None."""
    match = _FUSED_RE.match(name)
    return (match.group(1), match.group(2)) if match else None


def unet_block_index(name: str) -> int | None:
    """Index 0..24 (IN00..IN11, MID=12, OUT00..OUT11 = 13..24) of a UNet kohya module name, None when outside blocks.

    SD1/SD2 (diffusers-style names) follow kohya's `get_block_index`: down_blocks_i resnets/attentions_j ->
    IN(1 + 3i + j), downsamplers -> IN(3i + 3), mid_block -> MID, up_blocks_i resnets/attentions_j -> OUT(3i + j),
    upsamplers -> OUT(3i + 2). SDXL (compvis-style names): input_blocks_N -> IN N, middle_block -> MID,
    output_blocks_N -> OUT N.

    Args:
        name (str): a kohya module name with its `lora_unet_` prefix.

    Returns:
        int | None: the block index, or None for names outside the 25 blocks (time embedding, conv_in/out, TE).
    """
    if not name.startswith(PREFIXES["unet"] + "_"):
        return None
    match = _DIFFUSERS_UPDOWN_RE.search(name)
    if match:
        direction, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        idx = 3 * i + 2 if kind in ("upsamplers", "downsamplers") else 3 * i + j
        return 1 + idx if direction == "down" else MID_BLOCK_INDEX + 1 + idx
    if "_mid_block_" in name or "_middle_block_" in name:
        return MID_BLOCK_INDEX
    match = _COMPVIS_RE.match(name)
    if match:
        n = int(match.group(2))
        return n if match.group(1) == "input_blocks" else MID_BLOCK_INDEX + 1 + n
    return None
