"""Tiny real-architecture Stable Diffusion checkpoints (SD1, SD2, SDXL) with random weights, for tests and demos.

The VAE is the exception: its weights are set so that it reconstructs images (`signal_path`), so samples are images.
With `identity_unet=True` (the demo) the UNet starts as a denoiser that takes everything for noise, so a LoRA learns
its images in a few dozen steps.

Block structure, transformer depths, text-encoder layer counts, vocabulary (49408) and positions (77) are the real
ones, so key names and module counts match full-size files; only widths are small. The checkpoint is written in
the original single-file format (`.safetensors` + same-named ldm/sgm `.yaml`), beside a diffusers config folder
with tokenizers so `from_single_file(ckpt, config=config_dir, local_files_only=True)` loads it offline.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.models.configs import TOKENIZERS
from lora_trainer.models.configs import config_dir as full_config_dir
from lora_trainer.models.convert import OPEN_CLIP_LAYERS, pipeline_to_original
from lora_trainer.models.tokenizer import write_clip_tokenizer
from lora_trainer.testing.signal_path import make_unet_identity, make_vae_reconstruct
from lora_trainer.testing.tiny_yaml import tiny_yaml

logger = logging.getLogger(__name__)

TINY_ARCHITECTURES = ("sd1", "sd2", "sd2-v", "sdxl")
FORMAT_VERSION = 5  # bump when the tiny layout changes, so cached builds are rebuilt
# Widths: channel changes at the same levels as the real models (so the same shortcut convs exist).
UNET_CHANNELS = {"sd1": [32, 64, 96, 96], "sd2": [32, 64, 96, 96], "sdxl": [32, 64, 96]}
# The identity UNet reads (+v, -v) pairs in its last GroupNorm: 64 = 2 channels per group (narrower deeper down: faster)
IDENTITY_UNET_CHANNELS = {"sd1": [64, 128, 64, 64], "sd2": [64, 128, 64, 64], "sdxl": [64, 128, 64]}
# 64 = 2 channels per GroupNorm group before both conv_outs, which the reconstructing VAE needs (signal_path.py)
VAE_CHANNELS = [64, 128, 64, 64]
HEAD_CHANNELS = 16  # SD2/SDXL use num_head_channels (64 in the real models)
TE_HIDDEN = {"clip_l": 32, "open_clip_sd2": 32, "open_clip_sdxl": 64}
TIME_EMBED_DIM_XL = 8  # SDXL size-conditioning embedding per number (256 in the real model)


@dataclass(frozen=True)
class TinyModel:
    """A tiny checkpoint on disk.

    Attributes:
        arch (str): "sd1", "sd2", "sd2-v" or "sdxl".
        checkpoint (Path): the original single-file `.safetensors`.
        yaml (Path): the same-named ldm/sgm config the WebUI reads.
        config_dir (Path): diffusers config folder with tiny configs and tokenizer folder(s).
        tokenizer_dir (Path): the (first) CLIP tokenizer folder.
        text_encoder_dir (Path): transformers-format (first) text encoder + tokenizer (`from_pretrained` loads it).
    """

    arch: str
    checkpoint: Path
    yaml: Path
    config_dir: Path
    tokenizer_dir: Path
    text_encoder_dir: Path


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _tiny_unet_config(arch: str, identity_unet: bool) -> dict:
    cfg = _load_json(full_config_dir(arch) / "unet" / "config.json")
    family = "sd2" if arch.startswith("sd2") else arch
    channels = (IDENTITY_UNET_CHANNELS if identity_unet else UNET_CHANNELS)[family]
    cfg.update(block_out_channels=channels, sample_size=16)
    if family == "sd1":
        cfg.update(cross_attention_dim=TE_HIDDEN["clip_l"])  # 8 heads, as the real model
    elif family == "sd2":
        heads = [c // HEAD_CHANNELS for c in channels]
        cfg.update(cross_attention_dim=TE_HIDDEN["open_clip_sd2"], attention_head_dim=heads)
    else:
        cfg.update(
            cross_attention_dim=TE_HIDDEN["clip_l"] + TE_HIDDEN["open_clip_sdxl"],
            attention_head_dim=[c // HEAD_CHANNELS for c in channels],
            addition_time_embed_dim=TIME_EMBED_DIM_XL,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM_XL + TE_HIDDEN["open_clip_sdxl"],
        )
    return cfg


def _tiny_vae_config(arch: str) -> dict:
    cfg = _load_json(full_config_dir(arch) / "vae" / "config.json")
    cfg.update(block_out_channels=VAE_CHANNELS, sample_size=128)
    return cfg


def _tiny_te_config(arch: str, sub: str) -> dict:
    cfg = _load_json(full_config_dir(arch) / sub / "config.json")
    key = "clip_l" if cfg["hidden_act"] == "quick_gelu" else ("open_clip_sdxl" if arch == "sdxl" else "open_clip_sd2")
    hidden = TE_HIDDEN[key]
    cfg.update(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=4, projection_dim=hidden)
    return cfg


def _tiny_configs(arch: str, identity_unet: bool) -> dict[str, dict]:
    configs = {"unet": _tiny_unet_config(arch, identity_unet), "vae": _tiny_vae_config(arch)}
    configs["text_encoder"] = _tiny_te_config(arch, "text_encoder")
    if arch == "sdxl":
        configs["text_encoder_2"] = _tiny_te_config(arch, "text_encoder_2")
    return configs


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic random weights with non-trivial norms, biases and output layers (nothing zero or identity)."""
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.2, generator=generator)
            elif param.ndim == 1:
                param.normal_(0.0, 0.05, generator=generator)
            elif name.endswith("token_embedding.weight"):
                param.normal_(0.0, 1.0, generator=generator)
            elif name.endswith("position_embedding.weight"):
                param.normal_(0.0, 0.5, generator=generator)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)


def _build_components(arch: str, configs: dict[str, dict], seed: int,
                      identity_unet: bool) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    models = {
        "unet": UNet2DConditionModel.from_config(configs["unet"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
    }
    te_cfg = {k: v for k, v in configs["text_encoder"].items() if k != "architectures"}
    if arch.startswith("sd2"):
        # The original file keeps all 24 OpenCLIP layers and the projection; diffusers loads the first 23.
        full = dict(te_cfg, num_hidden_layers=OPEN_CLIP_LAYERS["sd2"])
        models["text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**full))
    else:
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**te_cfg))
    if arch == "sdxl":
        te2_cfg = {k: v for k, v in configs["text_encoder_2"].items() if k != "architectures"}
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    for name in sorted(models):
        _randomize(models[name], generator)
        models[name].eval()
    make_vae_reconstruct(models["vae"])
    if identity_unet:
        make_unet_identity(models["unet"])
    return models


def _write_config_dir(arch: str, configs: dict[str, dict], out: Path, tokenizer_src: Path) -> None:
    shutil.copytree(full_config_dir(arch), out, dirs_exist_ok=True)
    for sub, cfg in configs.items():
        (out / sub / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if arch == "sd2-v":
        sched_path = out / "scheduler" / "scheduler_config.json"
        sched = _load_json(sched_path)
        sched["prediction_type"] = "v_prediction"
        sched_path.write_text(json.dumps(sched, indent=2) + "\n", encoding="utf-8")
    for sub, pad in TOKENIZERS[arch].items():
        write_clip_tokenizer(out / sub, pad_token=pad, source=tokenizer_src)


def _write_text_encoder_dir(arch: str, model: torch.nn.Module, configs: dict, out: Path, tok: Path) -> None:
    """transformers-format text encoder (as diffusers loads it: SD2 keeps 23 layers) + its tokenizer.

    Written in the classic `text_model.` layout, which old (the WebUI's) and new transformers versions both load.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(configs["text_encoder"], architectures=["CLIPTextModel"], model_type="clip_text_model")
    layers = cfg["num_hidden_layers"]
    state = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight" or (key.startswith("encoder.layers.") and int(key.split(".")[2]) >= layers):
            continue
        state["text_model." + key] = value.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(tok / name, out / name)


def _marker(arch: str, seed: int, identity_unet: bool) -> dict:
    return {"arch": arch, "seed": seed, "format": FORMAT_VERSION, "identity_unet": identity_unet}


def _cached(out: Path, arch: str, seed: int, identity_unet: bool) -> TinyModel | None:
    marker = out / "tiny_model.json"
    if not marker.is_file() or _load_json(marker) != _marker(arch, seed, identity_unet):
        return None
    model = _paths(out, arch)
    required = (model.checkpoint, model.yaml, model.config_dir / "model_index.json", model.text_encoder_dir)
    return model if all(p.exists() for p in required) else None


def _paths(out: Path, arch: str) -> TinyModel:
    name = f"tiny_{arch.replace('-', '_')}"
    return TinyModel(
        arch=arch,
        checkpoint=out / f"{name}.safetensors",
        yaml=out / f"{name}.yaml",
        config_dir=out / "diffusers_config",
        tokenizer_dir=out / "diffusers_config" / "tokenizer",
        text_encoder_dir=out / "text_encoder",
    )


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, identity_unet: bool = False) -> TinyModel:
    """Build (or reuse) a tiny random checkpoint of a real architecture.

    Args:
        arch (str): "sd1", "sd2", "sd2-v" (same weights as "sd2", v-prediction configs) or "sdxl".
        out_dir (str | Path): folder for the files; a complete earlier build of the same settings is reused.
        seed (int, optional): weight seed, defaults to 0.
        identity_unet (bool, optional): a UNet 64 wide at the top that predicts its input as the noise
            (`signal_path.make_unet_identity`; epsilon prediction), for a demo where a LoRA visibly learns; defaults
            to False (random UNet).

    Returns:
        TinyModel: the paths of the checkpoint, its yaml, the diffusers config folder and the tokenizer folders.
    """
    from safetensors.torch import save_file

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"arch={arch!r}: no tiny model. Use one of {TINY_ARCHITECTURES}.")
    out = Path(out_dir).resolve()
    if (cached := _cached(out, arch, seed, identity_unet)) is not None:
        return cached
    out.mkdir(parents=True, exist_ok=True)
    paths = _paths(out, arch)
    configs = _tiny_configs(arch, identity_unet)
    models = _build_components(arch, configs, seed, identity_unet)
    tok_src = write_clip_tokenizer(out / "tokenizer_source")
    _write_config_dir(arch, configs, paths.config_dir, tok_src)
    _write_text_encoder_dir(arch, models["text_encoder"], configs, paths.text_encoder_dir, paths.tokenizer_dir)
    te_sds = [models["text_encoder"].state_dict()]
    if arch == "sdxl":
        te_sds.append(models["text_encoder_2"].state_dict())
    state = pipeline_to_original(models["unet"].state_dict(), models["vae"].state_dict(), te_sds, arch)
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths.checkpoint), metadata={"format": "pt"})
    paths.yaml.write_text(tiny_yaml(arch, configs, paths.text_encoder_dir), encoding="utf-8")
    shutil.rmtree(out / "tokenizer_source")
    (out / "tiny_model.json").write_text(
        json.dumps(_marker(arch, seed, identity_unet)) + "\n", encoding="utf-8"
    )
    logger.info("built tiny %s model in %s", arch, out)
    return paths


def full_size_original_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The original-format state dict of a full-size model on the `meta` device (real keys and shapes, no memory).

    Built from the shipped diffusers configs and converted with `pipeline_to_original`; SD2's text encoder gets the
    24 layers and 1024x1024 projection of the released files.

    Args:
        arch (str): "sd1", "sd2", "sd2-v" or "sdxl".

    Returns:
        dict[str, torch.Tensor]: meta tensors by original key.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = full_config_dir(arch)

    def text_encoder(sub: str, cls, **override) -> dict:
        cfg = {k: v for k, v in _load_json(folder / sub / "config.json").items() if k != "architectures"}
        return cls(CLIPTextConfig(**{**cfg, **override})).state_dict()

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_load_json(folder / "unet" / "config.json")).state_dict()
        vae = AutoencoderKL.from_config(_load_json(folder / "vae" / "config.json")).state_dict()
        if arch == "sd1":
            tes = [text_encoder("text_encoder", CLIPTextModel)]
        elif arch.startswith("sd2"):
            full = {"num_hidden_layers": OPEN_CLIP_LAYERS["sd2"], "projection_dim": 1024}
            tes = [text_encoder("text_encoder", CLIPTextModelWithProjection, **full)]
        else:
            tes = [
                text_encoder("text_encoder", CLIPTextModel),
                text_encoder("text_encoder_2", CLIPTextModelWithProjection),
            ]
        return pipeline_to_original(unet, vae, tes, arch)


__all__ = ["TINY_ARCHITECTURES", "TinyModel", "build_tiny_model", "full_size_original_state_dict"]
