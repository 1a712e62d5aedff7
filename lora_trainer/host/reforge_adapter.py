"""ModelAdapters over reForge's loaded model: A1111's ldm/sgm object whose UNet, VAE and text transformers are
ComfyUI modules (`ldm_patched`).

What differs from the WebUI adapters (`a1111.py`), and why:
- The VAE is ComfyUI's `AutoencoderKL`: `encode` returns the posterior's mode, not a distribution, so images are
  encoded through its `encoder` + `quant_conv` and sampled here (as kohya and the ldm posterior do); latents are
  scaled by the model's `latent_format` (`process_in`/`process_out`), as reForge's sampler scales them.
- The UNet computes in `BaseModel.manual_cast_dtype` when weights are stored in another dtype; inputs are cast to
  that compute dtype.
- Text encoders are transformers `CLIPTextModel`s (also SD2's OpenCLIP-H and SDXL's bigG, loaded by ComfyUI in
  transformers layout) under the WebUI's `...WithCustomWords` wrappers: the LoRA targets are their Linear layers with
  kohya's `text_model_encoder_layers_...` names; SD2 uses the penultimate layer, so its last layer is left out.
Nothing here imports reForge: `reforge.py` passes the objects in.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from lora_trainer.host.a1111 import WebUILdmAdapter
from lora_trainer.models.naming import TE_PREFIXES, te_targets, unet_targets
from lora_trainer.models.sgm_adapter import SgmAdapter, unwrap

_LAYER = re.compile(r"_encoder_layers_(\d+)_")


def sample_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A sample of the VAE posterior (unscaled), from a ComfyUI/ldm `AutoencoderKL`'s encoder and quant_conv.

    Args:
        vae (nn.Module): has `encoder` and `quant_conv` (ldm and ComfyUI AutoencoderKL both do).
        pixels (torch.Tensor): `[B,3,H,W]` in [-1, 1].

    Returns:
        torch.Tensor: `[B,C,H/8,W/8]`, mean + std * noise from the global RNG.
    """
    param = next(vae.parameters())
    moments = vae.quant_conv(vae.encoder(pixels.to(device=param.device, dtype=param.dtype)))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    noise = torch.randn(mean.shape).to(device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def penultimate_only(targets: dict[str, nn.Module], layers: int) -> dict[str, nn.Module]:
    """Drop the last encoder layer's targets (a penultimate-layer encoder never runs them, so they would get no
    gradient; kohya leaves them out too).

    Args:
        targets (dict[str, nn.Module]): te targets by kohya name.
        layers (int): the encoder's layer count.

    Returns:
        dict[str, nn.Module]: the targets of layers 0 .. layers-2.
    """
    kept = {}
    for name, module in targets.items():
        match = _LAYER.search(name)
        if match is None or int(match.group(1)) < layers - 1:
            kept[name] = module
    return kept


def _layer_count(text_model: nn.Module) -> int:
    return int(text_model.config.num_hidden_layers)


class ComfyModules:
    """The reForge parts every adapter here shares: ComfyUI VAE, latent format and UNet compute dtype.

    Subclasses set `self._base` (ComfyUI `BaseModel`: `latent_format`, `manual_cast_dtype`, `diffusion_model`) and
    `self._vae_module` (ComfyUI `AutoencoderKL`).
    """

    _base: nn.Module
    _vae_module: nn.Module

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in (ComfyUI's manual cast dtype, else its weights' dtype)."""
        return getattr(self._base, "manual_cast_dtype", None) or next(self.unet().parameters()).dtype

    def unet(self) -> nn.Module:
        return self._base.diffusion_model

    def vae(self) -> nn.Module:
        return self._vae_module

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1, 1] -> latents scaled as reForge's sampler expects them."""
        return self._base.latent_format.process_in(sample_latents(self._vae_module, pixels))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images `[B,3,H,W]` in [-1, 1]."""
        param = next(self._vae_module.parameters())
        z = self._base.latent_format.process_out(latents.to(device=param.device, dtype=param.dtype))
        return self._vae_module.decode(z).clamp(-1, 1)


class ReForgeLdmAdapter(ComfyModules, WebUILdmAdapter):
    """SD1/SD2 on reForge.

    Args:
        sd_model: `shared.sd_model` (ldm `LatentDiffusion` with ComfyUI modules).
        base_model (nn.Module): `forge_objects.unet.model` (ComfyUI `BaseModel`).
        vae_module (nn.Module): `forge_objects.vae.first_stage_model`.
        text_encode (callable): the WebUI wrapper's caption encoding (`a1111_text.sd_text_encoder`).
        model_id (str): the checkpoint hash.
    """

    def __init__(self, sd_model, base_model: nn.Module, vae_module: nn.Module, text_encode, model_id: str):
        super().__init__(sd_model, text_encode=text_encode, model_id=model_id)
        self._base, self._vae_module = base_model, vae_module
        self._open_clip = False  # SD2's OpenCLIP-H is a transformers CLIPTextModel here
        v = getattr(sd_model, "parameterization", "eps") == "v"
        if getattr(sd_model, "is_sd2", False):
            self.architecture = "sd2-v" if v else "sd2"

    def _text_module(self) -> nn.Module:
        return unwrap(self.model.cond_stage_model).transformer

    def lora_targets(self, include_conv: bool = False) -> dict[str, dict[str, nn.Module]]:
        """kohya targets "unet" (diffusers names from compvis paths) and "te" (penultimate layers for SD2)."""
        text = self._text_module()
        te = te_targets(text, TE_PREFIXES["te"])
        if self.architecture != "sd1":
            te = penultimate_only(te, _layer_count(text))
        return {"unet": unet_targets(self.unet(), self.architecture, "compvis", include_conv), "te": te}


class ReForgeSgmAdapter(ComfyModules, SgmAdapter):
    """SDXL on reForge: the sgm conditioner's size embedders for `y`, both text encoders as transformers models.

    Args:
        engine: `shared.sd_model` (sgm `DiffusionEngine` with ComfyUI modules).
        base_model (nn.Module): `forge_objects.unet.model`.
        vae_module (nn.Module): `forge_objects.vae.first_stage_model`.
        text_encode (callable): `a1111_text.sdxl_text_encoder` over the conditioner's two wrappers.
        model_id (str): the checkpoint hash.
    """

    def __init__(self, engine, base_model: nn.Module, vae_module: nn.Module, text_encode, model_id: str):
        super().__init__(engine, text_encode=text_encode, model_id=model_id)
        self._base, self._vae_module = base_model, vae_module

    def text_encoders(self) -> list[nn.Module]:
        return [unwrap(self.embedders()[0]).transformer, unwrap(self.embedders()[1]).transformer]

    def lora_targets(self, include_conv: bool = False) -> dict[str, dict[str, nn.Module]]:
        """kohya targets "unet" (compvis names), "te1" (CLIP-L) and "te2" (bigG: all layers, its last one feeds the
        pooled output)."""
        te1, te2 = self.text_encoders()
        return {
            "unet": unet_targets(self.unet(), "sdxl", "compvis", include_conv),
            "te1": te_targets(te1, TE_PREFIXES["te1"]),
            "te2": te_targets(te2, TE_PREFIXES["te2"]),
        }


__all__ = ["ComfyModules", "ReForgeLdmAdapter", "ReForgeSgmAdapter", "penultimate_only", "sample_latents"]
