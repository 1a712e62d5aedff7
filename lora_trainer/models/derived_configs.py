"""Diffusers configs from a checkpoint's own tensor shapes, with the architecture's shipped config as the template,
so any SD1/SD2/SDXL-shaped checkpoint (a tiny test model, a pruned or widened one) loads without a config folder.

Read from the shapes: UNet block widths, layers per block, which levels have attention, transformer depth per
level, linear or conv projections, cross-attention width, SDXL's addition embeddings; VAE widths, layers and
latent channels; each text encoder's hidden size, layers, MLP size, positions, vocabulary and projection.
Not in the weights: attention head counts. They come from the checkpoint's `.yaml` (`num_heads` /
`num_head_channels`, the text encoder it names; see `model_yaml`), else the architecture's convention:
SD1's UNet has 8 heads per level, SD2's and SDXL's heads are 64 wide, CLIP and OpenCLIP text heads are 64 wide.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from lora_trainer.errors import ModelLoadError

Shapes = Mapping[str, tuple[int, ...]]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
SD1_UNET_HEADS = 8
HEAD_WIDTH = 64  # SD2/SDXL UNet heads and all CLIP/OpenCLIP text heads
HEAD_FIX = ("Put the WebUI's .yaml for this model beside it (num_heads or num_head_channels), or set "
            "diffusers_config_dir to a folder with its diffusers configs.")


def _count(shapes: Shapes, prefix: str) -> int:
    """How many numbered children `prefix{n}.` exist (n = 0, 1, ...)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def _head_rule(yaml_unet: dict, family: str) -> tuple[int, int, str]:
    """(head width or -1, head count or -1, where the rule comes from): ldm's num_head_channels / num_heads."""
    per_head = yaml_unet.get("num_head_channels") or -1
    heads = yaml_unet.get("num_heads") or -1
    if per_head > 0 or heads > 0:
        return per_head, heads, "the yaml's heads"
    if family == "sd1":
        return -1, SD1_UNET_HEADS, "SD1's 8 heads"
    return HEAD_WIDTH, -1, "64-wide heads"


def _attention_heads(widths: list[int], attends: list[bool], rule: tuple[int, int, str], source: str):
    """diffusers' `attention_head_dim` (a head count, despite its name): one per level, or one for all."""
    per_head, heads, origin = rule
    counts = [max(1, w // per_head) if per_head > 0 else heads for w in widths]
    for width, count, attention in zip(widths, counts, attends):
        if attention and (count < 1 or width % count or (per_head > 0 and width % per_head)):
            raise ModelLoadError(f"{source}: a UNet level {width} wide cannot be split into heads by {origin}. "
                                 f"{HEAD_FIX}")
    return counts if per_head > 0 else heads


def _unet_levels(shapes: Shapes) -> list[dict]:
    levels, current, i = [], {"width": 0, "layers": 0, "depth": 0}, 1
    while True:
        block = f"{UNET}input_blocks.{i}."
        if f"{block}0.op.weight" in shapes:  # a downsample opens the next level
            levels.append(current)
            current = {"width": 0, "layers": 0, "depth": 0}
        elif f"{block}0.in_layers.2.weight" in shapes:
            current["width"] = shapes[f"{block}0.in_layers.2.weight"][0]
            current["layers"] += 1
            current["depth"] = max(current["depth"], _count(shapes, f"{block}1.transformer_blocks."))
        else:
            break
        i += 1
    return levels + [current]


def _first(shapes: Shapes, suffix: str, prefix: str = UNET) -> tuple[int, ...] | None:
    return next((shape for key, shape in shapes.items() if key.startswith(prefix) and key.endswith(suffix)), None)


def derive_unet(shapes: Shapes, template: dict, family: str, yaml_unet: dict, source: str,
                pooled_dim: int | None = None) -> dict:
    """The UNet's diffusers config.

    Args:
        shapes (Mapping[str, tuple]): tensor shapes by original key.
        template (dict): the architecture's shipped UNet config.
        family (str): "sd1", "sd2" or "sdxl".
        yaml_unet (dict): the yaml's UNet params (empty when there is none).
        source (str): the checkpoint's name, for messages.
        pooled_dim (int, optional): SDXL's pooled text width (TE2's projection), defaults to None.

    Returns:
        dict: the config.
    """
    levels = _unet_levels(shapes)
    widths = [level["width"] for level in levels]
    mid_depth = _count(shapes, f"{UNET}middle_block.1.transformer_blocks.")
    depths = [level["depth"] or 1 for level in levels]
    if not levels[-1]["depth"]:
        depths[-1] = mid_depth or 1  # diffusers' mid block takes the last level's depth
    heads = _attention_heads(widths, [bool(lv["depth"]) for lv in levels], _head_rule(yaml_unet, family), source)
    projection = _first(shapes, ".proj_in.weight")
    cfg = dict(template)
    cfg.update(
        in_channels=shapes[f"{UNET}input_blocks.0.0.weight"][1],
        out_channels=shapes[f"{UNET}out.2.weight"][0],
        block_out_channels=widths,
        layers_per_block=levels[0]["layers"],
        down_block_types=["CrossAttnDownBlock2D" if lv["depth"] else "DownBlock2D" for lv in levels],
        up_block_types=["CrossAttnUpBlock2D" if lv["depth"] else "UpBlock2D" for lv in reversed(levels)],
        attention_head_dim=heads,
        transformer_layers_per_block=depths if len(set(depths)) > 1 else depths[0],
        use_linear_projection=projection is not None and len(projection) == 2,
    )
    context = _first(shapes, "attn2.to_k.weight")
    if context is not None:
        cfg["cross_attention_dim"] = context[1]
    adm = shapes.get(f"{UNET}label_emb.0.0.weight")
    if adm is not None:
        cfg["projection_class_embeddings_input_dim"] = adm[1]
        if pooled_dim is not None:
            if (adm[1] - pooled_dim) % 6:
                raise ModelLoadError(f"{source}: SDXL's size embedding ({adm[1]}) does not fit 6 numbers plus the "
                                     f"pooled text ({pooled_dim}). The file is not an SDXL base model.")
            cfg["addition_time_embed_dim"] = (adm[1] - pooled_dim) // 6
    return cfg


def derive_vae(shapes: Shapes, template: dict, scale_factor: float | None) -> dict:
    """The VAE's diffusers config (template unchanged when the file has no VAE).

    Args:
        shapes (Mapping[str, tuple]): tensor shapes by original key.
        template (dict): the shipped VAE config.
        scale_factor (float, optional): the yaml's latent scale factor, defaults to the template's.

    Returns:
        dict: the config.
    """
    cfg = dict(template)
    if scale_factor is not None:
        cfg["scaling_factor"] = scale_factor
    levels = _count(shapes, f"{VAE}encoder.down.")
    if not levels:
        return cfg
    widths = [shapes[f"{VAE}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    cfg.update(
        block_out_channels=widths,
        layers_per_block=_count(shapes, f"{VAE}encoder.down.0.block."),
        latent_channels=shapes[f"{VAE}encoder.conv_out.weight"][0] // 2,  # mean and log-variance
        in_channels=shapes[f"{VAE}encoder.conv_in.weight"][1],
        out_channels=shapes[f"{VAE}decoder.conv_out.weight"][0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return cfg


def _text_heads(hidden: int, heads: int | None, source: str) -> int:
    if heads:
        return heads
    if hidden % HEAD_WIDTH:
        raise ModelLoadError(f"{source}: a text encoder {hidden} wide cannot be split into 64-wide heads. Put the "
                             "WebUI's .yaml for this model beside it (naming its text encoder's config), or set "
                             "diffusers_config_dir to a folder with its diffusers configs.")
    return hidden // HEAD_WIDTH


def derive_clip_l(shapes: Shapes, template: dict, prefix: str, heads: int | None, source: str) -> dict:
    """A CLIP-L-shaped text encoder's config (keys with or without `text_model.`)."""
    token = _first(shapes, "embeddings.token_embedding.weight", prefix)
    if token is None:
        return dict(template)
    base = prefix + ("text_model." if any(k.startswith(prefix + "text_model.") for k in shapes) else "")
    return dict(template, vocab_size=token[0], hidden_size=token[1],
                num_attention_heads=_text_heads(token[1], heads, source),
                num_hidden_layers=_count(shapes, f"{base}encoder.layers."),
                intermediate_size=shapes[f"{base}encoder.layers.0.mlp.fc1.weight"][0],
                max_position_embeddings=shapes[f"{base}embeddings.position_embedding.weight"][0])


def derive_open_clip(shapes: Shapes, template: dict, prefix: str, heads: int | None, source: str,
                     penultimate: bool) -> dict:
    """An OpenCLIP text tower's config; SD2's diffusers encoder stops one layer short (`penultimate`)."""
    token = shapes.get(f"{prefix}token_embedding.weight")
    if token is None:
        return dict(template)
    cfg = dict(template, vocab_size=token[0], hidden_size=token[1],
               num_attention_heads=_text_heads(token[1], heads, source),
               num_hidden_layers=_count(shapes, f"{prefix}transformer.resblocks.") - (1 if penultimate else 0),
               intermediate_size=shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0],
               max_position_embeddings=shapes[f"{prefix}positional_embedding"][0])
    projection = shapes.get(f"{prefix}text_projection")
    if projection is not None and not penultimate:
        cfg["projection_dim"] = projection[1]
    return cfg


def _load(folder: Path, sub: str) -> dict:
    return json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))


def derive_configs(shapes: Shapes, architecture: str, model_yaml=None, source: str = "checkpoint") -> dict[str, dict]:
    """All diffusers configs of a checkpoint ("unet", "vae", "text_encoder", SDXL's "text_encoder_2",
    "scheduler").

    Args:
        shapes (Mapping[str, tuple]): tensor shapes by original key.
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl" (see `detect_architecture`).
        model_yaml (ModelYaml, optional): the checkpoint's yaml, defaults to None.
        source (str, optional): the checkpoint's name, for messages.

    Returns:
        dict[str, dict]: config per sub-folder.

    Raises:
        ModelLoadError: head counts cannot be derived, or the yaml's sizes contradict the weights.
    """
    from lora_trainer.models.configs import config_dir

    family = "sd2" if architecture.startswith("sd2") else architecture
    folder = config_dir(architecture)
    yaml_unet = dict(model_yaml.unet) if model_yaml is not None else {}
    heads = list(model_yaml.text_heads) if model_yaml is not None else []
    heads += [None] * (2 - len(heads))
    configs = {}
    if family == "sd2":
        configs["text_encoder"] = derive_open_clip(shapes, _load(folder, "text_encoder"), OPEN_CLIP["sd2"],
                                                   heads[0], source, penultimate=True)
    else:
        configs["text_encoder"] = derive_clip_l(shapes, _load(folder, "text_encoder"), CLIP_L[family], heads[0],
                                                source)
    pooled = None
    if family == "sdxl":
        configs["text_encoder_2"] = derive_open_clip(shapes, _load(folder, "text_encoder_2"), OPEN_CLIP["sdxl"],
                                                     heads[1], source, penultimate=False)
        pooled = configs["text_encoder_2"]["projection_dim"]
    configs["unet"] = derive_unet(shapes, _load(folder, "unet"), family, yaml_unet, source, pooled)
    configs["vae"] = derive_vae(shapes, _load(folder, "vae"), model_yaml.scale_factor if model_yaml else None)
    configs["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    if architecture == "sd2-v":
        configs["scheduler"]["prediction_type"] = "v_prediction"
    if model_yaml is not None:
        check_yaml_sizes(configs["unet"], model_yaml)
    return configs


def unet_basics(shapes: Shapes) -> dict:
    """The UNet sizes a yaml is checked against (`check_yaml_sizes`), from the shapes alone.

    Args:
        shapes (Mapping[str, tuple]): tensor shapes by original key (a UNet must be present).

    Returns:
        dict: in_channels, block_out_channels (the first level only), cross_attention_dim.
    """
    conv_in = shapes[f"{UNET}input_blocks.0.0.weight"]
    context = _first(shapes, "attn2.to_k.weight")
    return {"in_channels": conv_in[1], "block_out_channels": [conv_in[0]],
            "cross_attention_dim": context[1] if context else None}


def check_yaml_sizes(unet: dict, model_yaml) -> None:
    """Refuse a yaml whose UNet sizes contradict the weights (the WebUI would fail to load the pair).

    Args:
        unet (dict): the UNet config derived from the weights.
        model_yaml (ModelYaml): the yaml.

    Raises:
        ModelLoadError: names the yaml, the key and both values.
    """
    pairs = {"in_channels": unet["in_channels"], "model_channels": unet["block_out_channels"][0]}
    context = model_yaml.unet.get("context_dim")
    if isinstance(context, int) and not isinstance(context, bool):
        pairs["context_dim"] = unet.get("cross_attention_dim")
    for key, from_weights in pairs.items():
        said = model_yaml.unet_int(key) if key != "context_dim" else context
        if said is not None and said != from_weights:
            hint = " (an inpainting model's yaml)" if key == "in_channels" and said == 9 else ""
            raise ModelLoadError(f"{model_yaml.path}: {key} = {said}{hint}, but the checkpoint's weights have "
                                 f"{from_weights}. Use the yaml made for this checkpoint, or remove it.")


def write_config_folder(configs: dict[str, dict], architecture: str, out_dir: str | Path) -> Path:
    """Write derived configs as a diffusers config folder (`from_single_file(config=...)` reads it).

    Args:
        configs (dict[str, dict]): from `derive_configs`.
        architecture (str): the architecture (its shipped `model_index.json` is copied).
        out_dir (str | Path): the folder (created).

    Returns:
        Path: `out_dir`.
    """
    from lora_trainer.models.configs import config_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_dir(architecture) / "model_index.json", out / "model_index.json")
    for sub, cfg in configs.items():
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (out / sub).mkdir(exist_ok=True)
        (out / sub / name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out


__all__ = ["check_yaml_sizes", "derive_clip_l", "derive_configs", "derive_open_clip", "derive_unet", "derive_vae",
           "unet_basics", "write_config_folder"]
