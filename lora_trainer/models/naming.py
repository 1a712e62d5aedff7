"""kohya's LoRA target rules and module names, and the compvis <-> diffusers UNet path mapping.

kohya names a module `lora_unet_` / `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`) + its path with "." -> "_".
SD1/SD2 UNet names use diffusers paths (`down_blocks_0_attentions_0_...`); SDXL UNet names use compvis paths
(`input_blocks_4_1_transformer_blocks_0_attn1_to_q`). Text-encoder names use the transformers CLIP paths
(`text_model_encoder_layers_0_self_attn_q_proj`); OpenCLIP resblocks are given those names too.
Targets (kohya `networks/lora.py`): Linear and 1x1 Conv2d inside `Transformer2DModel` (ldm `SpatialTransformer`);
with conv also Linear/Conv2d of any kernel inside `ResnetBlock2D`/`Downsample2D`/`Upsample2D` (ldm `ResBlock`/
`Downsample`/`Upsample`); Linear inside `CLIPAttention` (or `CLIPSdpaAttention`)/`CLIPMLP`. "Linear" is
`networks.base.is_linear`: hosts' own Linear classes that do not subclass `nn.Linear` (Forge) get the same names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lora_trainer.networks.base import is_linear

UNET_PREFIX = "lora_unet_"
TE_PREFIXES = {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}

UNET_ATTENTION_CLASSES = ("Transformer2DModel", "SpatialTransformer")
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample")
# transformers 4.36-4.47 (Forge pins 4.46) name the attention class after its kernel; kohya lists the SDPA one too.
TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
OPEN_CLIP_BLOCK_CLASS = "ResidualAttentionBlock"
MHA_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")

# compvis ResBlock child -> diffusers ResnetBlock2D child.
RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# compvis top-level module -> diffusers top-level module (outside the down/mid/up blocks).
TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# OpenCLIP resblock child -> transformers CLIPEncoderLayer child.
OPEN_CLIP_PARTS = {"attn": "self_attn", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "ln_1": "layer_norm1",
                   "ln_2": "layer_norm2"}


@dataclass(frozen=True)
class UnetLayout:
    """Which UNet levels carry attention; enough to map compvis block indices to diffusers blocks.

    Attributes:
        down_attention (tuple[bool, ...]): per down level, whether it has attention blocks.
        up_attention (tuple[bool, ...]): per up level, whether it has attention blocks.
        layers_per_block (int, optional): resnets per down level, defaults to 2 (up levels have one more).
    """

    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    layers_per_block: int = 2


SD_LAYOUT = UnetLayout((True, True, True, False), (False, True, True, True))
SDXL_LAYOUT = UnetLayout((False, True, True), (True, True, False))


def layout_for(architecture: str) -> UnetLayout:
    """The UNet layout of an architecture ("sd1", "sd2", "sd2-v" or "sdxl")."""
    return SDXL_LAYOUT if architecture == "sdxl" else SD_LAYOUT


def _split(path: str, head_parts: int) -> tuple[list[str], str]:
    parts = path.split(".")
    return parts[:head_parts], ".".join(parts[head_parts:])


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _map_prefix(rest: str, table: dict[str, str]) -> str:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def compvis_to_diffusers_unet(path: str, layout: UnetLayout = SD_LAYOUT) -> str:
    """Map a compvis (ldm/sgm) UNet module path to the diffusers `UNet2DConditionModel` path.

    Args:
        path (str): e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q` (relative to `diffusion_model`).
        layout (UnetLayout, optional): the UNet's layout, defaults to SD_LAYOUT (SD1/SD2).

    Returns:
        str: e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.

    Raises:
        ValueError: the path is not part of an SD-style UNet.
    """
    mapped = _map_prefix(path, TOP_LEVEL)
    if mapped != path:
        return mapped
    head, rest = _split(path, 3)
    stride = layout.layers_per_block + 1
    if head[0] == "input_blocks" and len(head) == 3 and head[1].isdigit():
        level, j = divmod(int(head[1]) - 1, stride)
        if j == layout.layers_per_block and head[2] == "0":
            return _join(f"down_blocks.{level}.downsamplers.0", _map_prefix(rest, {"op": "conv"}))
        if head[2] == "0":
            return _join(f"down_blocks.{level}.resnets.{j}", _map_prefix(rest, RESNET_PARTS))
        if head[2] == "1":
            return _join(f"down_blocks.{level}.attentions.{j}", rest)
    if head[0] == "middle_block" and len(head) >= 2:
        head, rest = _split(path, 2)
        if head[1] == "1":
            return _join("mid_block.attentions.0", rest)
        if head[1] in ("0", "2"):
            return _join(f"mid_block.resnets.{int(head[1]) // 2}", _map_prefix(rest, RESNET_PARTS))
    if head[0] == "output_blocks" and len(head) == 3 and head[1].isdigit():
        level, j = divmod(int(head[1]), stride)
        has_attention = level < len(layout.up_attention) and layout.up_attention[level]
        if head[2] == "0":
            return _join(f"up_blocks.{level}.resnets.{j}", _map_prefix(rest, RESNET_PARTS))
        if head[2] == "1" and has_attention:
            return _join(f"up_blocks.{level}.attentions.{j}", rest)
        if head[2] in ("1", "2"):
            return _join(f"up_blocks.{level}.upsamplers.0", rest)
    raise ValueError(f"UNet module path {path!r}: not a compvis SD UNet path. Pass a path relative to "
                     "`diffusion_model`, e.g. 'input_blocks.1.1.proj_in'.")


def diffusers_to_compvis_unet(path: str, layout: UnetLayout = SD_LAYOUT) -> str:
    """Map a diffusers `UNet2DConditionModel` module path to the compvis (ldm/sgm) path.

    Args:
        path (str): e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
        layout (UnetLayout, optional): the UNet's layout, defaults to SD_LAYOUT (SD1/SD2).

    Returns:
        str: e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_q`.

    Raises:
        ValueError: the path is not part of an SD-style UNet.
    """
    for src, dst in TOP_LEVEL.items():
        if path == dst or path.startswith(dst + "."):
            return src + path[len(dst):]
    reverse_resnet = {v: k for k, v in RESNET_PARTS.items()}
    stride = layout.layers_per_block + 1
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$",
                 path)
    if m:
        kind, level, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if kind == "down_blocks":
            if part == "downsamplers":
                return _join(f"input_blocks.{1 + level * stride + layout.layers_per_block}.0",
                             _map_prefix(rest, {"conv": "op"}))
            index = 1 + level * stride + j
        else:
            index = level * stride + (j if part != "upsamplers" else layout.layers_per_block)
            if part == "upsamplers":
                has_attention = level < len(layout.up_attention) and layout.up_attention[level]
                return _join(f"output_blocks.{index}.{2 if has_attention else 1}", rest)
        if part == "resnets":
            return _join(f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{index}.0",
                         _map_prefix(rest, reverse_resnet))
        if part == "attentions":
            return _join(f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{index}.1", rest)
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)(?:\.(.*))?$", path)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if part == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{j * 2}", _map_prefix(rest, reverse_resnet))
    raise ValueError(f"UNet module path {path!r}: not a diffusers SD UNet path. Pass a path relative to the "
                     "UNet2DConditionModel, e.g. 'down_blocks.0.attentions.0.proj_in'.")


def kohya_unet_name(path: str, architecture: str, tree: str) -> str:
    """The kohya name of a UNet module.

    Args:
        path (str): the module path relative to the UNet (diffusers) or `diffusion_model` (compvis).
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        tree (str): "diffusers" or "compvis": which naming `path` is in.

    Returns:
        str: e.g. `lora_unet_down_blocks_0_attentions_0_proj_in` (SD1/SD2) or `lora_unet_input_blocks_4_1_proj_in`.
    """
    layout = layout_for(architecture)
    if architecture == "sdxl":
        kohya_path = path if tree == "compvis" else diffusers_to_compvis_unet(path, layout)
    else:
        kohya_path = path if tree == "diffusers" else compvis_to_diffusers_unet(path, layout)
    return UNET_PREFIX + kohya_path.replace(".", "_")


def _is_1x1_or_linear(module: nn.Module) -> bool:
    if is_linear(module):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def find_unet_targets(unet: nn.Module, include_conv: bool = False) -> dict[str, nn.Module]:
    """kohya's UNet targets as {module path relative to `unet`: module}, in module order.

    Args:
        unet (nn.Module): a diffusers `UNet2DConditionModel` or an ldm/sgm `UNetModel` (`diffusion_model`).
        include_conv (bool, optional): add the LoCon targets in resnets/down/upsamplers, defaults to False.

    Returns:
        dict[str, nn.Module]: Linear / Conv2d modules by path.
    """
    targets: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        cls = type(module).__name__
        in_attention = cls in UNET_ATTENTION_CLASSES
        in_conv = include_conv and cls in UNET_CONV_CLASSES
        if not (in_attention or in_conv):
            continue
        for child_name, child in module.named_modules():
            if not child_name:
                continue
            conv_target = in_conv and (is_linear(child) or isinstance(child, nn.Conv2d))
            if (in_attention and _is_1x1_or_linear(child)) or conv_target:
                targets[_join(name, child_name)] = child
    return targets


def unet_targets(unet: nn.Module, architecture: str, tree: str, include_conv: bool = False) -> dict[str, nn.Module]:
    """kohya's UNet targets keyed by kohya name (with the `lora_unet_` prefix).

    Args:
        unet (nn.Module): a diffusers UNet (tree="diffusers") or an ldm/sgm `diffusion_model` (tree="compvis").
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        tree (str): "diffusers" or "compvis".
        include_conv (bool, optional): add the LoCon targets, defaults to False.

    Returns:
        dict[str, nn.Module]: {kohya name: module}.
    """
    found = find_unet_targets(unet, include_conv)
    return {kohya_unet_name(path, architecture, tree): module for path, module in found.items()}


def _text_model_path(path: str) -> str:
    # transformers >= 5.6 flattens CLIPTextModel (no `.text_model`); kohya names always carry `text_model_`.
    rest = path.removeprefix("text_model.")
    return "text_model." + rest


def te_targets(text_encoder: nn.Module, prefix: str, max_layers: int | None = None) -> dict[str, nn.Module]:
    """kohya's text-encoder targets keyed by kohya name.

    Works on transformers `CLIPTextModel`/`CLIPTextModelWithProjection` (Linear in CLIPAttention/CLIPMLP) and on
    OpenCLIP text transformers (`...resblocks.N`: the `nn.MultiheadAttention` under four names, `mlp.c_fc`,
    `mlp.c_proj`), which get the transformers names.

    Args:
        text_encoder (nn.Module): the text encoder (for OpenCLIP: any module containing the resblocks).
        prefix (str): "lora_te_", "lora_te1_" or "lora_te2_".
        max_layers (int, optional): only the first N OpenCLIP resblocks (the ones a penultimate-layer encoder
            runs), defaults to all.

    Returns:
        dict[str, nn.Module]: {kohya name: module}.
    """
    targets: dict[str, nn.Module] = {}
    for name, module in text_encoder.named_modules():
        cls = type(module).__name__
        if cls in TE_CLASSES:
            for child_name, child in module.named_modules():
                if is_linear(child):
                    path = _text_model_path(_join(name, child_name))
                    targets[prefix + path.replace(".", "_")] = child
        elif cls == OPEN_CLIP_BLOCK_CLASS:
            m = re.search(r"resblocks\.(\d+)$", name)
            if m is None or (max_layers is not None and int(m.group(1)) >= max_layers):
                continue
            base = f"{prefix}text_model_encoder_layers_{m.group(1)}_"
            for part in MHA_PARTS:
                targets[f"{base}self_attn_{part}"] = module.attn
            targets[base + "mlp_fc1"] = module.mlp.c_fc
            targets[base + "mlp_fc2"] = module.mlp.c_proj
    return targets


def open_clip_to_transformers_path(path: str) -> str:
    """Map an OpenCLIP text path (`transformer.resblocks.3.mlp.c_fc`) to the transformers CLIP path
    (`text_model.encoder.layers.3.mlp.fc1`). Paths outside the resblocks raise ValueError."""
    m = re.match(r"(?:.*\.)?transformer\.resblocks\.(\d+)\.(.+)$", path)
    if m is None:
        raise ValueError(f"OpenCLIP path {path!r}: not inside `transformer.resblocks.N`. Pass a resblock child path.")
    return f"text_model.encoder.layers.{m.group(1)}.{_map_prefix(m.group(2), OPEN_CLIP_PARTS)}"


def transformers_to_open_clip_path(path: str) -> str:
    """Map a transformers CLIP text path (`text_model.encoder.layers.3.self_attn`) to the OpenCLIP path
    (`transformer.resblocks.3.attn`). Paths outside the encoder layers raise ValueError."""
    m = re.match(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$", path)
    if m is None:
        raise ValueError(f"CLIP path {path!r}: not inside `encoder.layers.N`. Pass an encoder layer child path.")
    reverse = {v: k for k, v in OPEN_CLIP_PARTS.items()}
    return f"transformer.resblocks.{m.group(1)}.{_map_prefix(m.group(2), reverse)}"
