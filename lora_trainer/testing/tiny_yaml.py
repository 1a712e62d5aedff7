"""The ldm / sgm model config (`<checkpoint>.yaml`) of a tiny checkpoint, in the layout of the WebUI's
`v1-inference.yaml`, `v2-inference(-v).yaml` and `sd_xl_base.yaml`, with the tiny sizes."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

# The tiny SDXL TE2's OpenCLIP architecture name: sgm's FrozenOpenCLIPEmbedder2 builds its text tower with
# `open_clip.create_model_and_transforms(arch)`, which knows only registered names. `tiny_yaml` writes
# `<TE2_ARCH>.json` beside the yaml; register its folder with `open_clip.add_model_config(folder)` before loading
# (in the WebUI: a preload script, see tests/webui).
TE2_ARCH = "tiny-sdxl-te2"
# The same for the tiny SD2 text tower (FrozenOpenCLIPEmbedder's `arch`): its head count is read from this json.
SD2_TE_ARCH = "tiny-sd2-te"

_SCHEDULE = {
    "linear_start": 0.00085,
    "linear_end": 0.0120,
    "num_timesteps_cond": 1,
    "log_every_t": 200,
    "timesteps": 1000,
    "first_stage_key": "jpg",
    "cond_stage_key": "txt",
    "image_size": 64,
    "channels": 4,
    "cond_stage_trainable": False,
    "conditioning_key": "crossattn",
    "monitor": "val/loss_simple_ema",
    "use_ema": False,
}


def _mult(channels: list[int]) -> list[int]:
    return [c // channels[0] for c in channels]


def _ddconfig(vae: dict) -> dict:
    channels = vae["block_out_channels"]
    return {
        "double_z": True,
        "z_channels": vae["latent_channels"],
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": channels[0],
        "ch_mult": _mult(channels),
        "num_res_blocks": vae["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def _first_stage(vae: dict, target: str) -> dict:
    params = {"embed_dim": vae["latent_channels"], "monitor": "val/rec_loss", "ddconfig": _ddconfig(vae)}
    params["lossconfig"] = {"target": "torch.nn.Identity"}
    return {"target": target, "params": params}


def _unet_params(unet: dict, arch: str) -> dict:
    channels = unet["block_out_channels"]
    params = {
        "use_checkpoint": True,
        "image_size": 32,
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "model_channels": channels[0],
        "attention_resolutions": [4, 2, 1] if len(channels) == 4 else [4, 2],
        "num_res_blocks": unet["layers_per_block"],
        "channel_mult": _mult(channels),
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": unet["cross_attention_dim"],
        "legacy": False,
    }
    if arch == "sd1":
        params["num_heads"] = unet["attention_head_dim"]
    else:
        heads = unet["attention_head_dim"]
        params["num_head_channels"] = channels[0] // (heads[0] if isinstance(heads, list) else heads)
        params["use_linear_in_transformer"] = True
    return params


def _ldm_config(arch: str, configs: dict, text_encoder_dir: Path) -> dict:
    params = dict(_SCHEDULE, scale_factor=configs["vae"]["scaling_factor"])
    if arch == "sd2-v":
        params = {"parameterization": "v", **params}
    params["unet_config"] = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": _unet_params(configs["unet"], arch),
    }
    params["first_stage_config"] = _first_stage(configs["vae"], "ldm.models.autoencoder.AutoencoderKL")
    if arch == "sd1":
        cond = {
            "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": str(text_encoder_dir)},
        }
    else:
        # OpenCLIP builds its text tower from the architecture name: `<SD2_TE_ARCH>.json` beside the yaml.
        cond = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"arch": SD2_TE_ARCH, "freeze": True, "layer": "penultimate"},
        }
    params["cond_stage_config"] = cond
    target = "ldm.models.diffusion.ddpm.LatentDiffusion"
    return {"model": {"base_learning_rate": 1.0e-4, "target": target, "params": params}}


def _size_embedder(key: str, outdim: int) -> dict:
    return {
        "is_trainable": False,
        "input_key": key,
        "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
        "params": {"outdim": outdim},
    }


def _sgm_config(configs: dict, text_encoder_dir: Path) -> dict:
    unet = configs["unet"]
    network = _unet_params(unet, "sdxl")
    network.pop("image_size")  # sgm's UNetModel has no image_size parameter (ldm's has)
    network.update(
        adm_in_channels=unet["projection_class_embeddings_input_dim"],
        num_classes="sequential",
        transformer_depth=unet["transformer_layers_per_block"],
        spatial_transformer_attn_type="softmax-xformers",
    )
    outdim = unet["addition_time_embed_dim"]
    embedders = [
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"layer": "hidden", "layer_idx": 11, "version": str(text_encoder_dir)},
        },
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
            "params": {"arch": TE2_ARCH, "version": "laion2b_s39b_b160k", "freeze": True,
                       "layer": "penultimate", "always_return_pooled": True, "legacy": False},
        },
        _size_embedder("original_size_as_tuple", outdim),
        _size_embedder("crop_coords_top_left", outdim),
        _size_embedder("target_size_as_tuple", outdim),
    ]
    denoiser = {
        "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
        "params": {
            "num_idx": 1000,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
        },
    }
    first_stage = _first_stage(configs["vae"], "sgm.models.autoencoder.AutoencoderKLInferenceWrapper")
    first_stage["params"]["ddconfig"]["attn_type"] = "vanilla-xformers"
    params = {
        "scale_factor": configs["vae"]["scaling_factor"],
        "disable_first_stage_autocast": True,
        "denoiser_config": denoiser,
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": network},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": first_stage,
    }
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}


def open_clip_config(te2: dict) -> dict:
    """The OpenCLIP model config of the tiny SDXL TE2 (text tower as the transformers config; tiny vision tower).

    Args:
        te2 (dict): the transformers `CLIPTextModelWithProjection` config of text_encoder_2.

    Returns:
        dict: the open_clip model-config json content.
    """
    return {
        "embed_dim": te2["projection_dim"],
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": te2.get("max_position_embeddings", 77), "vocab_size": te2["vocab_size"],
                     "width": te2["hidden_size"], "heads": te2["num_attention_heads"],
                     "layers": te2["num_hidden_layers"]},
    }


def tiny_yaml(arch: str, configs: dict[str, dict], text_encoder_dir: Path) -> str:
    """The YAML text for a tiny checkpoint; for SDXL (SD2) also writes `<TE2_ARCH>.json` (`<SD2_TE_ARCH>.json`),
    the OpenCLIP config its yaml names as `arch`, into the yaml's folder, `text_encoder_dir.parent`.

    Args:
        arch (str): "sd1", "sd2", "sd2-v" or "sdxl".
        configs (dict[str, dict]): the tiny diffusers configs ("unet", "vae", ...).
        text_encoder_dir (Path): transformers-format CLIP-L folder, written as `version` of FrozenCLIPEmbedder.

    Returns:
        str: YAML text.
    """
    folder = Path(text_encoder_dir).parent
    if arch == "sdxl":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{TE2_ARCH}.json").write_text(json.dumps(open_clip_config(configs["text_encoder_2"]), indent=2)
                                                 + "\n", encoding="utf-8")
    elif arch.startswith("sd2"):  # the file keeps all 24 layers (diffusers' config stops at the penultimate)
        tower = dict(configs["text_encoder"], num_hidden_layers=configs["text_encoder"]["num_hidden_layers"] + 1)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{SD2_TE_ARCH}.json").write_text(json.dumps(open_clip_config(tower), indent=2) + "\n",
                                                    encoding="utf-8")
    data = _sgm_config(configs, text_encoder_dir) if arch == "sdxl" else _ldm_config(arch, configs, text_encoder_dir)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
