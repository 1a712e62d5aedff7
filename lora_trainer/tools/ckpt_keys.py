"""Original single-file checkpoint keys: which architecture a header describes, and which weight each kohya LoRA
module name lands on.

kohya names (see `lora_trainer/models/naming.py`): SD1/SD2 UNet modules use diffusers paths, SDXL UNet modules
compvis paths; text encoders use transformers CLIP paths (`lora_te_` for SD1/SD2, `lora_te1_`/`lora_te2_` for
SDXL). OpenCLIP stores q, k and v stacked in one `attn.in_proj_weight` [3E, E]: the three kohya names
`..._self_attn_{q,k,v}_proj` are row ranges of that tensor.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.checkpoint import CONTEXT_DIMS, SIGNATURES, UNET_KEY, SUPPORTED
from lora_trainer.models.convert import CLIP_L_PREFIX, OPEN_CLIP_LAYERS, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from lora_trainer.models.naming import compvis_to_diffusers_unet, kohya_unet_name, layout_for

from .tensor_stream import TensorInfo

CLIP_L_PARTS = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
                "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
                "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}
OPEN_CLIP_PARTS = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class LoraTarget:
    """A checkpoint weight (or a row range of one) that a kohya module name stands for.

    Attributes:
        name (str): the kohya module name, e.g. `lora_unet_input_blocks_4_1_proj_in`.
        key (str): the checkpoint key of the weight.
        rows (tuple[int, int] | None): row range inside a fused `in_proj_weight`, None for the whole tensor.
        shape (tuple[int, ...]): the shape the module's delta has (the row range's shape for fused parts).
        component (str): "unet", "te", "te1" or "te2".
        kind (str): "attention" (kohya's plain LoRA targets, text encoders included), "conv_block" (UNet
            resnet / down- / upsampler layers: kohya's LoCon targets) or "other" (conv_in, conv_out, time and
            label embeddings: only full-network LyCORIS files name them).
    """

    name: str
    key: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]
    component: str
    kind: str = "attention"


def _family_by_context(infos: Mapping[str, TensorInfo]) -> str | None:
    for key, info in infos.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(info.shape) == 2:
            return CONTEXT_DIMS.get(int(info.shape[1]))
    return None


def checkpoint_family(infos: Mapping[str, TensorInfo], source: str = "checkpoint") -> str:
    """"sd1", "sd2" or "sdxl" of an original-format checkpoint, from its keys and shapes only.

    Unlike `detect_architecture` this accepts inpainting / instruct UNets (more input channels): merging and
    pruning them is fine.

    Args:
        infos (Mapping[str, TensorInfo]): the header (`TensorReader.infos`).
        source (str, optional): the file name for messages, defaults to "checkpoint".

    Returns:
        str: the family.

    Raises:
        ModelLoadError: no SD UNet, or no known text encoder and UNet layout.
    """
    if UNET_KEY not in infos:
        raise ModelLoadError(f"{source}: no Stable Diffusion UNet ({UNET_KEY}) found. Supported: {SUPPORTED}.")
    family = next((arch for arch, prefix in SIGNATURES if any(k.startswith(prefix) for k in infos)), None)
    family = family or _family_by_context(infos)
    if family is None:
        raise ModelLoadError(f"{source}: no known text-encoder keys and an unknown UNet layout. Supported: "
                             f"{SUPPORTED}.")
    return family


def component_of_key(key: str) -> str:
    """"unet", "vae", "te" (any text encoder) or "other" for an original checkpoint key."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(("cond_stage_model.", "conditioner.")):
        return "te"
    return "other"


def _unet_target(key: str, info: TensorInfo, arch: str) -> LoraTarget | None:
    module = key[len(UNET_PREFIX):-len(".weight")]
    try:
        diffusers_path = compvis_to_diffusers_unet(module, layout_for(arch))
    except ValueError:
        return None
    if ".attentions." in diffusers_path:
        kind = "attention"
    elif re.search(r"\.(resnets|downsamplers|upsamplers)\.", diffusers_path):
        kind = "conv_block"
    else:
        kind = "other"  # conv_in, conv_out, time / label embeddings: kohya never targets them
    return LoraTarget(kohya_unet_name(module, arch, "compvis"), key, None, info.shape, "unet", kind)


def _diffusers_spelling(key: str) -> str:
    module = key[len(UNET_PREFIX):-len(".weight")]
    return kohya_unet_name(compvis_to_diffusers_unet(module, layout_for("sdxl")), "sd1", "diffusers")


def _te_prefixes(arch: str) -> tuple[tuple[str, str, bool], ...]:
    """(checkpoint prefix, kohya prefix, OpenCLIP layout) per text encoder."""
    if arch == "sd1":
        return ((CLIP_L_PREFIX["sd1"], "lora_te_", False),)
    if arch.startswith("sd2"):
        return ((OPEN_CLIP_PREFIX["sd2"], "lora_te_", True),)
    return ((CLIP_L_PREFIX["sdxl"], "lora_te1_", False), (OPEN_CLIP_PREFIX["sdxl"], "lora_te2_", True))


def _clip_l_targets(key: str, info: TensorInfo, prefix: str, kohya: str) -> list[LoraTarget]:
    m = re.match(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)\.weight$", key[len(prefix):])
    if m is None or m.group(2) not in CLIP_L_PARTS:
        return []
    name = f"{kohya}text_model_encoder_layers_{m.group(1)}_{CLIP_L_PARTS[m.group(2)]}"
    return [LoraTarget(name, key, None, info.shape, kohya[5:-1])]


def _open_clip_targets(key: str, info: TensorInfo, prefix: str, kohya: str) -> list[LoraTarget]:
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key[len(prefix):])
    if m is None:
        return []
    base = f"{kohya}text_model_encoder_layers_{m.group(1)}_"
    component = kohya[5:-1]
    if m.group(2) == "attn.in_proj_weight":
        embed = info.shape[0] // 3
        return [LoraTarget(base + f"self_attn_{part}", key, (i * embed, (i + 1) * embed), (embed, info.shape[1]),
                           component) for i, part in enumerate(QKV)]
    module = m.group(2).removesuffix(".weight")
    if not m.group(2).endswith(".weight") or module not in OPEN_CLIP_PARTS:
        return []
    return [LoraTarget(base + OPEN_CLIP_PARTS[module], key, None, info.shape, component)]


def lora_targets(infos: Mapping[str, TensorInfo], arch: str, aliases: bool = False) -> dict[str, LoraTarget]:
    """Every weight a kohya LoRA/LoCon module can target in this checkpoint, by kohya module name.

    Args:
        infos (Mapping[str, TensorInfo]): the checkpoint header.
        arch (str): "sd1", "sd2" or "sdxl" (see `checkpoint_family`).
        aliases (bool, optional): also list SDXL UNet modules under their diffusers-path spelling (which some
            trainers write and the WebUI converts), mapped to the same targets (whose `name` stays the compvis
            spelling). Defaults to False.

    Returns:
        dict[str, LoraTarget]: every UNet Linear/Conv2d weight (see `LoraTarget.kind`) and the text encoders'
        attention/MLP layers, in file order.
    """
    targets: dict[str, LoraTarget] = {}
    te_prefixes = _te_prefixes(arch)
    for key, info in infos.items():
        found: list[LoraTarget] = []
        if key.startswith(UNET_PREFIX) and key.endswith(".weight") and len(info.shape) in (2, 4):
            target = _unet_target(key, info, arch)
            found = [target] if target is not None else []
            if target is not None and aliases and arch == "sdxl":
                targets[_diffusers_spelling(key)] = target  # the target keeps its canonical name
        for prefix, kohya, open_clip in te_prefixes:
            if key.startswith(prefix) and len(info.shape) == 2:
                found = (_open_clip_targets if open_clip else _clip_l_targets)(key, info, prefix, kohya)
        targets.update((t.name, t) for t in found)
    return targets


def open_clip_trained_layers(arch: str) -> int | None:
    """OpenCLIP resblocks a kohya-trained SD2 LoRA covers (diffusers drops the last one); None = all."""
    return OPEN_CLIP_LAYERS["sd2"] - 1 if arch.startswith("sd2") else None


__all__ = ["LoraTarget", "checkpoint_family", "component_of_key", "lora_targets", "open_clip_trained_layers"]
