"""ModelAdapter over diffusers `UNet2DConditionModel` / `AutoencoderKL` and transformers CLIP text encoders."""
from __future__ import annotations

import logging

import torch
from torch import nn

from lora_trainer.models.adapter import ARCHITECTURES, TextConditioning
from lora_trainer.models.naming import TE_PREFIXES, te_targets, unet_targets
from lora_trainer.models.text_encoding import encode_captions_sd, encode_captions_sdxl

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod_from_config(scheduler_config: dict) -> torch.Tensor:
    """The training noise schedule of a diffusers scheduler config (SD: scaled_linear 0.00085..0.012, 1000 steps).

    Args:
        scheduler_config (dict): keys `beta_start`, `beta_end`, `beta_schedule` ("scaled_linear" or "linear"),
            `num_train_timesteps`; missing keys take SD's values.

    Returns:
        torch.Tensor: `[num_train_timesteps]` float32 on CPU.
    """
    start = float(scheduler_config.get("beta_start", 0.00085))
    end = float(scheduler_config.get("beta_end", 0.012))
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    schedule = scheduler_config.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        raise ValueError(f"scheduler config beta_schedule={schedule!r}: not supported. Use 'scaled_linear' "
                         "(Stable Diffusion) or 'linear'.")
    return torch.cumprod(1.0 - betas, dim=0).float()


def set_text_checkpointing(text_encoder: nn.Module, enabled: bool) -> None:
    """Turn a transformers text encoder's (non-reentrant) activation checkpointing on or off.

    Args:
        text_encoder (nn.Module): a transformers model.
        enabled (bool): on or off.
    """
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5.x
        if enabled:
            text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            text_encoder.activation_checkpointing_disable()
    elif enabled:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_disable()


class DiffusersAdapter:
    """The training loop's view of a diffusers SD1/SD2/SDXL model. Holds the modules it is given (no copies).

    Args:
        unet (nn.Module): `UNet2DConditionModel`.
        vae (nn.Module): `AutoencoderKL`.
        text_encoders (list[nn.Module]): `[CLIPTextModel]` (SD1/SD2) or `[CLIPTextModel,
            CLIPTextModelWithProjection]` (SDXL).
        tokenizers (list): the matching CLIP tokenizers.
        scheduler_config (dict): the diffusers scheduler config (betas of the training schedule).
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        prediction_type (str): "epsilon" or "v_prediction".
        model_id (str): identity of the weights (part of latent-cache keys).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module], tokenizers: list,
                 scheduler_config: dict, architecture: str, prediction_type: str, model_id: str):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r}: unknown. Use one of {ARCHITECTURES}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}: unknown. Use one of {PREDICTION_TYPES}.")
        expected = 2 if architecture == "sdxl" else 1
        if len(text_encoders) != expected or len(tokenizers) != expected:
            raise ValueError(f"text_encoders/tokenizers: {architecture} needs {expected} of each, got "
                             f"{len(text_encoders)}/{len(tokenizers)}. Pass one per text encoder.")
        self._unet = unet
        self._vae = vae
        self._text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.architecture = architecture
        self.prediction_type = prediction_type
        self.model_id = model_id
        self.alphas_cumprod = alphas_cumprod_from_config(dict(scheduler_config))

    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._unet.parameters()).dtype

    def unet(self) -> nn.Module:
        return self._unet

    def vae(self) -> nn.Module:
        return self._vae

    def text_encoders(self) -> list[nn.Module]:
        return list(self._text_encoders)

    def _vae_io(self) -> tuple[torch.device, torch.dtype]:
        param = next(self._vae.parameters())
        return param.device, param.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1, 1] -> latents `[B,4,H/8,W/8]` (sampled, times the VAE scaling factor)."""
        device, dtype = self._vae_io()
        dist = self._vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
        return dist.sample() * self._vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-scaled latents -> images `[B,3,H,W]` in [-1, 1]."""
        device, dtype = self._vae_io()
        scaled = latents.to(device=device, dtype=dtype) / self._vae.config.scaling_factor
        return self._vae.decode(scaled).sample.clamp(-1, 1)

    def encode_captions(self, captions: list[str], clip_skip: int = 1, max_token_length: int = 75) -> TextConditioning:
        """See `ModelAdapter.encode_captions`; SDXL ignores clip_skip (penultimate layer of both encoders)."""
        if self.architecture == "sdxl":
            return encode_captions_sdxl(self.tokenizers, self._text_encoders, captions, max_token_length)
        return encode_captions_sd(self.tokenizers[0], self._text_encoders[0], captions, clip_skip, max_token_length)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output (eps or v). SDXL needs `cond.pooled` and `size_cond` `[B,6]`."""
        device, dtype = self.device, self.dtype
        context = cond.crossattn.to(device=device, dtype=dtype)
        kwargs = {}
        if self.architecture == "sdxl":
            if cond.pooled is None or size_cond is None:
                raise ValueError("predict: SDXL needs cond.pooled and size_cond [B,6] (original h,w, crop top,left, "
                                 "target h,w). Encode captions with this adapter and pass the batch's size_cond.")
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(device=device, dtype=dtype),
                                           "time_ids": size_cond.to(device=device, dtype=dtype)}
        out = self._unet(noisy_latents.to(device=device, dtype=dtype), timesteps.to(device), context, **kwargs)
        return out.sample

    def lora_targets(self, include_conv: bool = False) -> dict[str, dict[str, nn.Module]]:
        """kohya targets per component ("unet", "te" or "te1"/"te2"), keyed by full kohya name."""
        targets = {"unet": unet_targets(self._unet, self.architecture, "diffusers", include_conv)}
        if self.architecture == "sdxl":
            for component, encoder in zip(("te1", "te2"), self._text_encoders):
                targets[component] = te_targets(encoder, TE_PREFIXES[component])
        else:
            targets["te"] = te_targets(self._text_encoders[0], TE_PREFIXES["te"])
        return targets

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint UNet blocks (diffusers, non-reentrant) and TE layers (transformers, non-reentrant; these act
        in train mode only), so that injected modules inside still get gradients."""
        if enabled:
            self._unet.enable_gradient_checkpointing()
        else:
            self._unet.disable_gradient_checkpointing()
        for encoder in self._text_encoders:
            set_text_checkpointing(encoder, enabled)
