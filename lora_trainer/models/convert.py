"""Pure diffusers -> original (ldm/sgm single-file) state-dict converters.

They are the inverse of diffusers' `from_single_file` conversion (`loaders/single_file_utils.py`): a state dict
written by `pipeline_to_original` loads back through `StableDiffusionPipeline.from_single_file` /
`StableDiffusionXLPipeline.from_single_file` with every tensor equal. No file I/O here.

Original layouts:
- UNet: `model.diffusion_model.` + `input_blocks.N.M...`, `middle_block.M...`, `output_blocks.N.M...`.
- VAE: `first_stage_model.` + `encoder.down.N.block.M...`, `decoder.up.N...` (decoder levels numbered from the
  bottom), attention projections stored as 1x1 convs.
- CLIP-L (transformers CLIPTextModel): `cond_stage_model.transformer.text_model...` (SD1),
  `conditioner.embedders.0.transformer.text_model...` (SDXL).
- OpenCLIP: `cond_stage_model.model.` (SD2) / `conditioner.embedders.1.model.` (SDXL) + `transformer.resblocks.N.`
  with fused `attn.in_proj_weight` (q, k, v stacked), `text_projection` stored transposed.
"""
from __future__ import annotations

import math
import re

import torch

from lora_trainer.errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
# Text-encoder layer counts in the original files (diffusers' SD2 text encoder drops the last OpenCLIP layer).
OPEN_CLIP_LAYERS = {"sd2": 24, "sdxl": 32}
LOGIT_SCALE = math.log(100.0)  # OpenCLIP's trained (clamped) logit scale, kept in the original files

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_TOP = {
    "conv_norm_out.": "norm_out.",
}
_VAE_ATTN = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _replace_prefix(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return None


def _unknown(keys: list[str], what: str) -> ModelLoadError:
    shown = ", ".join(sorted(keys)[:5])
    return ModelLoadError(
        f"{what}: unexpected diffusers keys ({len(keys)}: {shown}...). "
        "Pass the state dict of the matching diffusers model (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)."
    )


def _unet_layout(sd: dict) -> tuple[int, int, set[int]]:
    """(resnets per down block, resnets per up block, up blocks with attentions) read from the keys."""
    per_down = {int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    per_up = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.0\.resnets\.(\d+)\.", k))}
    if not per_down or not per_up:
        raise _unknown(list(sd)[:5], "unet")
    up_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return len(per_down), len(per_up), up_attn


def _block_part(kind: str, rest: str) -> str:
    """`0.<resnet key>` (ldm ResBlock names) or `1.<attention key>` (same names in ldm's SpatialTransformer)."""
    return f"0.{_replace_prefix(rest, _RESNET) or rest}" if kind == "resnets" else f"1.{rest}"


def _unet_block_key(key: str, layers: int, up_layers: int, up_attn: set[int]) -> str | None:
    """Original name (without prefix) of one down/mid/up-block key, or None when it is not one.

    input_blocks: 0 = conv_in, then per down block `layers` (resnet, attention) pairs and its downsampler;
    output_blocks: per up block `up_layers` (resnet, attention) pairs, the upsampler after the last one.
    """
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        n = 1 + int(m.group(1)) * (layers + 1) + int(m.group(3))
        return f"input_blocks.{n}.{_block_part(m.group(2), m.group(4))}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        n = 1 + int(m.group(1)) * (layers + 1) + layers
        return f"input_blocks.{n}.0.op.{m.group(2)}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        if m.group(1) == "attentions":
            return f"middle_block.1.{m.group(3)}"
        return f"middle_block.{2 * int(m.group(2))}.{_replace_prefix(m.group(3), _RESNET) or m.group(3)}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        n = int(m.group(1)) * up_layers + int(m.group(3))
        return f"output_blocks.{n}.{_block_part(m.group(2), m.group(4))}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m.group(1))
        n = block * up_layers + up_layers - 1
        return f"output_blocks.{n}.{2 if block in up_attn else 1}.conv.{m.group(2)}"
    return None


def unet_diffusers_to_original(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Convert a diffusers `UNet2DConditionModel` state dict to the original `model.diffusion_model.` layout.

    Args:
        sd (dict[str, torch.Tensor]): the diffusers UNet state dict.
        arch (str): "sd1", "sd2", "sd2-v" or "sdxl" (the block layout itself is read from the keys).

    Returns:
        dict[str, torch.Tensor]: original keys (with the `model.diffusion_model.` prefix), same tensors.
    """
    if arch not in ("sd1", "sd2", "sd2-v", "sdxl"):
        raise ValueError(f"arch={arch!r}: unknown architecture. Use 'sd1', 'sd2', 'sd2-v' or 'sdxl'.")
    layers, up_layers, up_attn = _unet_layout(sd)
    out, unknown = {}, []
    for key, value in sd.items():
        new = _replace_prefix(key, _UNET_TOP) or _unet_block_key(key, layers, up_layers, up_attn)
        if new is None:
            unknown.append(key)
        else:
            out[UNET_PREFIX + new] = value
    if unknown:
        raise _unknown(unknown, "unet")
    return out


def vae_diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers `AutoencoderKL` state dict to the original `first_stage_model.` layout.

    Args:
        sd (dict[str, torch.Tensor]): the diffusers VAE state dict.

    Returns:
        dict[str, torch.Tensor]: original keys; mid-block attention projections become 1x1 conv weights.
    """
    levels = len({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    out, unknown = {}, []
    for key, value in sd.items():
        new = None
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif m := re.match(r"(encoder|decoder)\.(.*)", key):
            part, rest = m.group(1), m.group(2)
            new = _vae_part_key(part, rest, levels)
        if new is None:
            unknown.append(key)
            continue
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    if unknown:
        raise _unknown(unknown, "vae")
    return out


def _vae_part_key(part: str, rest: str, levels: int) -> str | None:
    if rest.startswith(("conv_in.", "conv_out.")):
        return f"{part}.{rest}"
    if (new := _replace_prefix(rest, _VAE_TOP)) is not None:
        return f"{part}.{new}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        level = int(m.group(2)) if m.group(1) == "down" else levels - 1 - int(m.group(2))
        tail = m.group(4).replace("conv_shortcut.", "nin_shortcut.")
        return f"{part}.{m.group(1)}.{level}.block.{m.group(3)}.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
        return f"{part}.down.{m.group(1)}.downsample.conv.{m.group(2)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
        return f"{part}.up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{part}.mid.block_{int(m.group(1)) + 1}.{m.group(2).replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        new = _replace_prefix(m.group(1), _VAE_ATTN)
        return None if new is None else f"{part}.mid.attn_1.{new}"
    return None


def _text_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to the CLIP text transformer: accepts wrapped (`text_model.`) and flattened CLIPTextModel."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if k != "text_projection.weight"}


def clip_l_diffusers_to_original(sd: dict[str, torch.Tensor], arch: str = "sd1") -> dict[str, torch.Tensor]:
    """Convert a transformers `CLIPTextModel` state dict (CLIP ViT-L/14 text tower) to the original layout.

    Args:
        sd (dict[str, torch.Tensor]): the CLIPTextModel state dict (with or without the `text_model.` level).
        arch (str, optional): "sd1" (`cond_stage_model.transformer.`) or "sdxl"
            (`conditioner.embedders.0.transformer.`), defaults to "sd1".

    Returns:
        dict[str, torch.Tensor]: `<prefix>text_model.<key>` for every key, plus `embeddings.position_ids`.
    """
    prefix = CLIP_L_PREFIX.get(arch)
    if prefix is None:
        raise ValueError(f"arch={arch!r}: CLIP-L is the text encoder of 'sd1' and 'sdxl' only.")
    text = _text_model_keys(sd)
    unknown = [k for k in text if not k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))]
    if unknown:
        raise _unknown(unknown, "text_encoder")
    out = {f"{prefix}text_model.{k}": v for k, v in text.items()}
    # Released SD1/SDXL files carry the position_ids buffer of older transformers versions; keep that layout.
    positions = text["embeddings.position_embedding.weight"].shape[0]
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def _fuse_qkv(text: dict, layer: int, kind: str) -> torch.Tensor:
    base = f"encoder.layers.{layer}.self_attn."
    return torch.cat([text[f"{base}{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)


def open_clip_diffusers_to_original(
    sd: dict[str, torch.Tensor], prefix: str, n_layers: int | None = None
) -> dict[str, torch.Tensor]:
    """Convert a transformers `CLIPTextModel(WithProjection)` state dict to OpenCLIP's text-tower layout.

    Args:
        sd (dict[str, torch.Tensor]): the text encoder state dict; `text_projection.weight`
            (CLIPTextModelWithProjection) becomes the transposed `text_projection`.
        prefix (str): e.g. "cond_stage_model.model." (SD2) or "conditioner.embedders.1.model." (SDXL).
        n_layers (int, optional): resblocks to write; must not exceed the layers in `sd` (SD2: diffusers keeps 23 of
            the original 24, so write the original file from a 24-layer encoder); defaults to all layers of `sd`.

    Returns:
        dict[str, torch.Tensor]: original keys, with fused `attn.in_proj_weight`/`in_proj_bias` and `logit_scale`.
    """
    text = _text_model_keys(sd)
    have = len({int(m.group(1)) for k in text if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    n_layers = have if n_layers is None else n_layers
    if n_layers > have:
        raise ModelLoadError(
            f"text_encoder: has {have} layers, the original OpenCLIP layout needs {n_layers}. "
            f"Build the text encoder with num_hidden_layers={n_layers} (diffusers' SD2 encoder drops the last layer)."
        )
    out = {prefix + new: text[old] for old, new in _OPEN_CLIP_TOP.items()}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    out[prefix + "logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=text["final_layer_norm.weight"].dtype)
    for layer in range(n_layers):
        block = f"{prefix}transformer.resblocks.{layer}."
        out[block + "attn.in_proj_weight"] = _fuse_qkv(text, layer, "weight")
        out[block + "attn.in_proj_bias"] = _fuse_qkv(text, layer, "bias")
        for key, value in text.items():
            if m := re.match(rf"encoder\.layers\.{layer}\.(.*)", key):
                new = _replace_prefix(m.group(1), _OPEN_CLIP_LAYER)
                if new is not None:
                    out[block + new] = value
                elif not re.match(r"self_attn\.[qkv]_proj\.", m.group(1)):
                    raise _unknown([key], "text_encoder")
    return out


def pipeline_to_original(
    unet_sd: dict[str, torch.Tensor],
    vae_sd: dict[str, torch.Tensor],
    te_sds: list[dict[str, torch.Tensor]],
    arch: str,
) -> dict[str, torch.Tensor]:
    """Assemble one original single-file state dict from diffusers component state dicts.

    Args:
        unet_sd (dict[str, torch.Tensor]): `UNet2DConditionModel` state dict.
        vae_sd (dict[str, torch.Tensor]): `AutoencoderKL` state dict.
        te_sds (list[dict[str, torch.Tensor]]): text encoders: sd1 `[CLIPTextModel]`, sd2/sd2-v
            `[CLIPTextModel(WithProjection) with 24 layers]`, sdxl `[CLIPTextModel, CLIPTextModelWithProjection]`.
        arch (str): "sd1", "sd2", "sd2-v" or "sdxl".

    Returns:
        dict[str, torch.Tensor]: the original (ldm / sgm) checkpoint state dict.
    """
    expected = {"sd1": 1, "sd2": 1, "sd2-v": 1, "sdxl": 2}
    if arch not in expected:
        raise ValueError(f"arch={arch!r}: unknown architecture. Use 'sd1', 'sd2', 'sd2-v' or 'sdxl'.")
    if len(te_sds) != expected[arch]:
        raise ValueError(f"te_sds: {arch} needs {expected[arch]} text encoder state dicts, got {len(te_sds)}.")
    out = unet_diffusers_to_original(unet_sd, arch)
    out.update(vae_diffusers_to_original(vae_sd))
    if arch == "sd1":
        out.update(clip_l_diffusers_to_original(te_sds[0], "sd1"))
    elif arch in ("sd2", "sd2-v"):
        out.update(open_clip_diffusers_to_original(te_sds[0], OPEN_CLIP_PREFIX["sd2"], OPEN_CLIP_LAYERS["sd2"]))
    else:
        out.update(clip_l_diffusers_to_original(te_sds[0], "sdxl"))
        out.update(open_clip_diffusers_to_original(te_sds[1], OPEN_CLIP_PREFIX["sdxl"], OPEN_CLIP_LAYERS["sdxl"]))
    return out
