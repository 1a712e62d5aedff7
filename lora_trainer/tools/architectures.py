"""Module names and weight shapes of the full-size architectures, built on the `meta` device (no weight memory).

Used to check a LoRA's names against its architecture (as the trainer's pre-save check does: every name must
land on a module of the model), to find the kernel size of LoHa/LoKr conv deltas stored flattened, and to list
what a LoRA/LoCon of an architecture can hold.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NetworkError
from ..models.naming import (
    UNET_PREFIX,
    diffusers_to_compvis_unet,
    layout_for,
    te_targets,
    unet_targets,
)

logger = logging.getLogger(__name__)

TE_PREFIXES_BY_ARCH = {"sd1": ("lora_te_",), "sd2": ("lora_te_",), "sd2-v": ("lora_te_",),
                       "sdxl": ("lora_te1_", "lora_te2_")}


@dataclass(frozen=True)
class ArchitectureModules:
    """What a LoRA of one architecture may name.

    Attributes:
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        shapes (dict[str, tuple]): kohya module name -> target weight shape, for every Linear/Conv2d of the UNet
            and every text-encoder target (SDXL UNet modules also under their diffusers spelling, which the WebUI
            converts).
        lora_targets (frozenset[str]): kohya's plain LoRA targets (attention / MLP layers).
        locon_targets (frozenset[str]): kohya's LoCon targets (adds resnets, down/upsamplers).
    """

    architecture: str
    shapes: dict
    lora_targets: frozenset
    locon_targets: frozenset

    def kernel(self, name: str) -> tuple[int, ...]:
        """The kernel size of a module (() for Linear or an unknown name)."""
        shape = self.shapes.get(name)
        return tuple(shape[2:]) if shape is not None else ()


def _config(arch: str, sub: str) -> dict:
    from ..models.configs import config_dir

    return json.loads((config_dir("sd2" if arch == "sd2-v" else arch) / sub / "config.json").read_text("utf-8"))


def _unet_shapes(unet: nn.Module, arch: str) -> dict[str, tuple]:
    shapes = {}
    for path, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        shape = tuple(module.weight.shape)
        shapes[UNET_PREFIX + path.replace(".", "_")] = shape
        if arch == "sdxl":
            try:
                compvis = diffusers_to_compvis_unet(path, layout_for(arch))
            except ValueError:
                continue
            shapes[UNET_PREFIX + compvis.replace(".", "_")] = shape
    return shapes


@functools.lru_cache(maxsize=4)
def architecture_modules(architecture: str) -> ArchitectureModules:
    """The module table of a full-size architecture (built once per process, ~0.2 s).

    Args:
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".

    Returns:
        ArchitectureModules: names, shapes and kohya target sets.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if architecture not in TE_PREFIXES_BY_ARCH:
        raise ValueError(f"architecture {architecture!r}: unknown. Use one of {sorted(TE_PREFIXES_BY_ARCH)}.")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config(architecture, "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig(**_config(architecture, "text_encoder")))]
        if architecture == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_config(architecture, "text_encoder_2"))))
    shapes = _unet_shapes(unet, architecture)
    lora = set(unet_targets(unet, architecture, "diffusers"))
    locon = set(unet_targets(unet, architecture, "diffusers", include_conv=True))
    for encoder, prefix in zip(encoders, TE_PREFIXES_BY_ARCH[architecture]):
        targets = te_targets(encoder, prefix)
        shapes.update({name: tuple(module.weight.shape) for name, module in targets.items()})
        lora |= set(targets)
        locon |= set(targets)
    return ArchitectureModules(architecture, shapes, frozenset(lora), frozenset(locon))


_SDXL_NAME_RE = re.compile(r"^lora_te[12]_"
                           r"|^lora_unet_(input_blocks|middle_block|output_blocks|label_emb|add_embedding)_"
                           r"|^lora_unet_up_blocks_0_attentions_|_transformer_blocks_[1-9]")
_TE_LAYER_RE = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_")


def _metadata_architecture(metadata: dict) -> str | None:
    version = str(metadata.get("ss_base_model_version", "")).lower()
    spec = str(metadata.get("modelspec.architecture", "")).lower()
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return "sdxl"
    if str(metadata.get("ss_v2", "")).lower() == "true" or version.startswith("sd_v2") \
            or spec.startswith("stable-diffusion-v2"):
        return "sd2"
    return None


def _looks_sd2(groups: dict) -> bool:
    for name, tensors in groups.items():
        match = _TE_LAYER_RE.match(name)
        if match and int(match.group(1)) >= 12:  # CLIP-L has 12 layers, OpenCLIP-H 23 used
            return True
        down = tensors.get("lora_down.weight", tensors.get("lora_A.weight"))
        if name.endswith("_proj_in") and down is not None and name.startswith("lora_unet_"):
            return down.dim() == 2  # SD2 projects with Linear, SD1 with a 1x1 conv
    return False


def detect_lora_architecture(groups: dict, metadata: dict | None = None, label: str = "LoRA") -> str:
    """The architecture a LoRA was trained for.

    SDXL by its names (`lora_te1_`/`lora_te2_`, compvis UNet names, blocks only SDXL has); SD2 by metadata
    (`ss_v2`, `ss_base_model_version`, `modelspec.architecture`) or by text-encoder depth / Linear `proj_in`;
    SD1 otherwise.

    Args:
        groups (dict[str, dict]): kohya module name -> {suffix: tensor}.
        metadata (dict[str, str], optional): the file's metadata.
        label (str, optional): the file, for the log.

    Returns:
        str: "sd1", "sd2" or "sdxl".
    """
    names = list(groups)
    if any(_SDXL_NAME_RE.search(name) for name in names):
        return "sdxl"
    from_metadata = _metadata_architecture(metadata or {})
    if from_metadata == "sdxl":
        raise NetworkError(f"{label}: metadata says SDXL but the module names are SD1/SD2 ones. The file is "
                           "damaged or mislabelled; pass the architecture explicitly.")
    if from_metadata == "sd2" or _looks_sd2(groups):
        return "sd2"
    if not metadata:
        logger.info("%s: no metadata; SD1 assumed from the module names", label)
    return "sd1"


__all__ = ["ArchitectureModules", "architecture_modules", "detect_lora_architecture"]
