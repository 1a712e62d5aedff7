"""What the training loop needs from a diffusion model, whatever tree holds it (diffusers, ldm/sgm, the WebUI)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

ARCHITECTURES = ("sd1", "sd2", "sd2-v", "sdxl")
# Component names used by lora_targets(); kohya prefixes are derived from them in networks/keys.py.
COMPONENTS = ("unet", "te", "te1", "te2")


@dataclass
class TextConditioning:
    """Text-encoder output for a batch of captions.

    Attributes:
        crossattn (torch.Tensor): `[B, T, C]` context for the UNet's cross-attention (T = 77 * chunks).
        pooled (torch.Tensor, optional): `[B, 1280]` pooled text embedding (SDXL only), defaults to None.
    """

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "TextConditioning":
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextConditioning(self.crossattn.to(device=device, dtype=dtype), pooled)

    def index(self, idx) -> "TextConditioning":
        pooled = None if self.pooled is None else self.pooled[idx]
        return TextConditioning(self.crossattn[idx], pooled)

    @staticmethod
    def cat(items: list["TextConditioning"]) -> "TextConditioning":
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return TextConditioning(torch.cat([c.crossattn for c in items]), pooled)


@runtime_checkable
class ModelAdapter(Protocol):
    """The model contract (DESIGN.md). Adapters never copy or reload weights they are handed.

    Attributes:
        architecture (str): one of ARCHITECTURES.
        prediction_type (str): "epsilon" or "v_prediction".
        alphas_cumprod (torch.Tensor): `[1000]` float32 on CPU, the training noise schedule.
        device (torch.device): where the UNet lives.
        dtype (torch.dtype): the UNet's weight dtype.
        model_id (str): a stable identity of the weights (e.g. checkpoint hash); part of latent-cache keys.
    """

    architecture: str
    prediction_type: str
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    model_id: str

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1, 1] -> latents `[B,4,H/8,W/8]`, already multiplied by the VAE scale factor."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (VAE-scaled, as encode_images returns them) -> images `[B,3,H,W]` in [-1, 1] (sample previews)."""

    def encode_captions(self, captions: list[str], clip_skip: int = 1, max_token_length: int = 75) -> TextConditioning:
        """Encode captions with the model's own tokenizer(s) and text encoder(s).

        Gradients flow when text-encoder LoRA modules are trainable. `max_token_length` 75/150/225 = 1/2/3 chunks
        of 77 tokens, concatenated along T as kohya and the WebUI do. `clip_skip` 1 = last layer, 2 = penultimate
        (SDXL: kohya ignores clip_skip and uses the penultimate layer of both encoders).
        """

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextConditioning,
        size_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet output (eps or v). `size_cond` `[B,6]` = original h,w, crop top,left, target h,w (SDXL only)."""

    def lora_targets(self, include_conv: bool = False) -> dict[str, dict[str, nn.Module]]:
        """Trainable modules per component ("unet", "te" or "te1"/"te2"), keyed by full kohya module name.

        Names are the kohya module names *with* their prefix (e.g. `lora_unet_down_blocks_0_...`), each mapped to
        an `nn.Linear`, `nn.Conv2d`, or for OpenCLIP's fused attention the `nn.MultiheadAttention` itself under
        the four names `..._self_attn_{q,k,v,out}_proj` (the injector reads the part from the suffix).
        `include_conv` adds kohya's LoCon targets (ResnetBlock2D/Downsample2D/Upsample2D convs).
        """

    def text_encoders(self) -> list[nn.Module]:
        """The text encoder modules (for train/eval flags, device moves and freezing)."""

    def unet(self) -> nn.Module:
        """The UNet module."""

    def vae(self) -> nn.Module:
        """The VAE module (moved to CPU once latents are cached)."""

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint UNet (and TE when trained) blocks so that injected LoRA modules still get gradients."""
