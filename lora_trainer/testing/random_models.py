"""Full-size Stable Diffusion checkpoints (SD1, SD2, SDXL) with random weights, for benchmarks.

The components are built from the shipped diffusers configs (`lora_trainer/models/configs/`), so shapes, key
names and compute are those of the real models; weights are random. Norm scales and biases are perturbed and the
output convolutions scaled up, so the UNet's prediction is far from the noise and losses are non-trivial.
The result is one original single-file `.safetensors` (fp16 by default: half the size) that both our loader and
kohya sd-scripts read.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.models.configs import config_dir as shipped_config_dir
from lora_trainer.models.convert import OPEN_CLIP_LAYERS, pipeline_to_original

logger = logging.getLogger(__name__)

RANDOM_ARCHITECTURES = ("sd1", "sd2", "sdxl")
FORMAT_VERSION = 1  # bump when the weights recipe changes, so cached builds are rebuilt
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class RandomModel:
    """A full-size random checkpoint on disk.

    Attributes:
        arch (str): "sd1", "sd2" or "sdxl".
        checkpoint (Path): the original single-file `.safetensors`.
        size_bytes (int): its size.
    """

    arch: str
    checkpoint: Path
    size_bytes: int


def _config(arch: str, sub: str) -> dict:
    cfg = json.loads((shipped_config_dir(arch) / sub / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Keep the default init; randomise norm scales and biases and scale up the output layers a little."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            elif name.startswith("conv_out.") or name.endswith("proj_out.weight"):
                param.mul_(2.0)


def _half_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def _text_encoder_state_dicts(arch: str, generator: torch.Generator, dtype: torch.dtype) -> list[dict]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch == "sd1":
        specs = [("text_encoder", CLIPTextModel, {})]
    elif arch == "sd2":  # the original file keeps all OpenCLIP layers; diffusers loads one less
        specs = [("text_encoder", CLIPTextModelWithProjection, {"num_hidden_layers": OPEN_CLIP_LAYERS["sd2"]})]
    else:
        specs = [("text_encoder", CLIPTextModel, {}), ("text_encoder_2", CLIPTextModelWithProjection, {})]
    out = []
    for sub, cls, extra in specs:
        model = cls(CLIPTextConfig(**dict(_config(arch, sub), **extra)))
        _perturb(model, generator)
        out.append(_half_state_dict(model, dtype))
        del model
    return out


def _component_state_dicts(arch: str, seed: int, dtype: torch.dtype) -> tuple[dict, dict, list[dict]]:
    """One component at a time, each cast to `dtype` before the next is built (peak ~ one fp32 UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)  # the default init draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_config(_config(arch, "unet"))
    _perturb(unet, generator)
    unet_sd = _half_state_dict(unet, dtype)
    del unet
    vae = AutoencoderKL.from_config(_config(arch, "vae"))
    _perturb(vae, generator)
    vae_sd = _half_state_dict(vae, dtype)
    del vae
    return unet_sd, vae_sd, _text_encoder_state_dicts(arch, generator, dtype)


def _cached(marker: Path, checkpoint: Path, expected: dict) -> bool:
    if not (marker.is_file() and checkpoint.is_file()):
        return False
    return json.loads(marker.read_text(encoding="utf-8")) == expected


def build_random_model(arch: str, out_dir: str | Path, seed: int = 0, precision: str = "fp16") -> RandomModel:
    """Build (or reuse) a full-size random-weight checkpoint of a real architecture.

    Args:
        arch (str): "sd1", "sd2" or "sdxl".
        out_dir (str | Path): folder for the file; a complete earlier build with the same settings is reused.
        seed (int, optional): weight seed, defaults to 0.
        precision (str, optional): "fp16", "bf16" or "fp32" storage, defaults to "fp16".

    Returns:
        RandomModel: the checkpoint path and size.

    Raises:
        ValueError: unknown arch or precision.
    """
    from safetensors.torch import save_file

    if arch not in RANDOM_ARCHITECTURES:
        raise ValueError(f"arch={arch!r}: no full-size random model. Use one of {RANDOM_ARCHITECTURES}.")
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}: unknown. Use one of {sorted(DTYPES)}.")
    out = Path(out_dir).resolve()
    checkpoint = out / f"random_{arch}_{precision}_seed{seed}.safetensors"
    marker = checkpoint.with_suffix(".json")
    expected = {"arch": arch, "seed": seed, "precision": precision, "format": FORMAT_VERSION}
    if not _cached(marker, checkpoint, expected):
        out.mkdir(parents=True, exist_ok=True)
        unet_sd, vae_sd, te_sds = _component_state_dicts(arch, seed, DTYPES[precision])
        state = pipeline_to_original(unet_sd, vae_sd, te_sds, arch)
        del unet_sd, vae_sd, te_sds
        partial = checkpoint.with_suffix(".partial")
        save_file(state, str(partial), metadata={"format": "pt"})
        partial.replace(checkpoint)
        marker.write_text(json.dumps(expected) + "\n", encoding="utf-8")
        logger.info("built full-size random %s checkpoint %s", arch, checkpoint)
    return RandomModel(arch, checkpoint, checkpoint.stat().st_size)


__all__ = ["RANDOM_ARCHITECTURES", "RandomModel", "build_random_model"]
