"""ModelAdapter over Stability's sgm `DiffusionEngine` (SDXL), as the WebUI loads it.

Both text encoders live in `conditioner.embedders[0]` (CLIP-L, transformers) and `[1]` (OpenCLIP bigG, fused
attention); the WebUI wraps each in a `...WithCustomWords` object whose `.wrapped` is the sgm embedder. The UNet's
`y` vector is built as sgm's `GeneralConditioner` builds it: the pooled TE2 output, then each size embedder
(`original_size_as_tuple`, `crop_coords_top_left`, `target_size_as_tuple`) in embedder order. Caption encoding is
handed in (`text_encode`): the WebUI host encodes with its own CLIP wrappers, exactly as generation does.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from lora_trainer.models.adapter import TextConditioning
from lora_trainer.models.ldm_adapter import LdmAdapter, TextEncodeFn
from lora_trainer.models.naming import TE_PREFIXES, te_targets, unet_targets

logger = logging.getLogger(__name__)

# size_cond columns [B,6] per sgm conditioner input key.
SIZE_KEYS = {"original_size_as_tuple": slice(0, 2), "crop_coords_top_left": slice(2, 4),
             "target_size_as_tuple": slice(4, 6)}


def unwrap(module: nn.Module) -> nn.Module:
    """The sgm embedder under a WebUI `...WithCustomWords` wrapper (or the module itself)."""
    return getattr(module, "wrapped", module)


def sdxl_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SDXL's training schedule (sgm `LegacyDDPMDiscretization`: scaled-linear betas), float32 `[steps]`."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class TextCheckpointingFallback:
    """For transformers < 4.35 (the WebUI's 4.30): its text-encoder checkpointing is reentrant only, which gives
    LoRA modules inside no gradients; the text encoder then runs without checkpointing (UNet blocks still are)."""

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        try:
            super().enable_gradient_checkpointing(enabled)
        except TypeError as exc:  # gradient_checkpointing_enable() without gradient_checkpointing_kwargs
            if "gradient_checkpointing_kwargs" not in str(exc):
                raise
            logger.info("text encoder: not checkpointed (this transformers has only reentrant checkpointing, which "
                        "would give its LoRA modules no gradients); UNet blocks are checkpointed")


class SgmAdapter(TextCheckpointingFallback, LdmAdapter):
    """The training loop's view of an sgm `DiffusionEngine` (SDXL).

    Args:
        engine (nn.Module): the `DiffusionEngine` (`model.diffusion_model`, `first_stage_model`, `conditioner` are
            used in place; nothing is copied).
        text_encode (callable): `(captions, clip_skip, max_token_length) -> TextConditioning` with crossattn
            `[B, 77*chunks, 2048]` and pooled `[B, 1280]` (the WebUI host passes its own).
        model_id (str, optional): identity of the weights (the host passes its checkpoint hash), defaults to a
            sampled hash of all weights.
    """

    def __init__(self, engine: nn.Module, text_encode: TextEncodeFn | None = None, model_id: str | None = None):
        from lora_trainer.models.ldm_adapter import _weights_id

        self.model = engine
        self._text_encode = text_encode
        self._tokenizer = None
        self._open_clip = False
        self.architecture = "sdxl"
        self.prediction_type = "epsilon"
        ac = getattr(engine, "alphas_cumprod", None)
        self.alphas_cumprod = (torch.as_tensor(ac).detach().float().cpu() if ac is not None
                               else sdxl_alphas_cumprod())
        self.model_id = model_id or _weights_id(engine)
        self._checkpointed: dict[nn.Module, bool] = {}

    # -- modules -----------------------------------------------------------------------------------------------
    def embedders(self) -> list[nn.Module]:
        return list(self.model.conditioner.embedders)

    def _text_module(self) -> nn.Module:
        return unwrap(self.embedders()[0]).transformer

    def text_encoders(self) -> list[nn.Module]:
        return [unwrap(self.embedders()[0]).transformer, unwrap(self.embedders()[1]).model]

    def _size_embedders(self) -> list[tuple[nn.Module, slice]]:
        found = []
        for embedder in self.embedders():
            key = getattr(unwrap(embedder), "input_key", None) or getattr(embedder, "input_key", None)
            if key in SIZE_KEYS:
                found.append((unwrap(embedder), SIZE_KEYS[key]))
        return found

    # -- images ----------------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1, 1] -> latents times `scale_factor`."""
        param = next(self.vae().parameters())
        out = self.vae().encode(pixels.to(device=param.device, dtype=param.dtype))
        latents = out.sample() if hasattr(out, "sample") else out
        return latents * self.model.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-scaled latents -> images `[B,3,H,W]` in [-1, 1]."""
        param = next(self.vae().parameters())
        z = latents.to(device=param.device, dtype=param.dtype) / self.model.scale_factor
        return self.vae().decode(z).clamp(-1, 1)

    # -- text and UNet ---------------------------------------------------------------------------------------------
    def encode_captions(self, captions: list[str], clip_skip: int = 1, max_token_length: int = 75) -> TextConditioning:
        """See `ModelAdapter.encode_captions`; SDXL needs the host's `text_encode`."""
        if self._text_encode is None:
            raise ValueError("SgmAdapter: no text_encode was given. Pass the host's caption encoder "
                             "(the WebUI host does), or train SDXL from a checkpoint file with the standalone host.")
        return self._text_encode(list(captions), clip_skip, max_token_length)

    def vector(self, pooled: torch.Tensor, size_cond: torch.Tensor) -> torch.Tensor:
        """sgm's `y`: pooled TE2 output, then each size embedder's output, in the conditioner's order.

        Args:
            pooled (torch.Tensor): `[B, 1280]`.
            size_cond (torch.Tensor): `[B, 6]` original h,w, crop top,left, target h,w.

        Returns:
            torch.Tensor: `[B, adm_in_channels]`.
        """
        parts = [pooled]
        for embedder, columns in self._size_embedders():
            parts.append(embedder(size_cond[:, columns]).to(pooled.dtype))
        return torch.cat(parts, dim=1)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output through `diffusion_model(x, timesteps=t, context=crossattn, y=vector)`."""
        device, dtype = self.device, self.dtype
        if cond.pooled is None:
            raise ValueError("SgmAdapter.predict: SDXL conditioning needs the pooled TE2 output (cond.pooled).")
        if size_cond is None:
            h, w = noisy_latents.shape[-2] * 8, noisy_latents.shape[-1] * 8
            size_cond = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(len(noisy_latents), 1)
        y = self.vector(cond.pooled.to(device=device, dtype=dtype), size_cond.to(device=device))
        return self.unet()(noisy_latents.to(device=device, dtype=dtype), timesteps=timesteps.to(device),
                           context=cond.crossattn.to(device=device, dtype=dtype), y=y.to(dtype))

    def lora_targets(self, include_conv: bool = False) -> dict[str, dict[str, nn.Module]]:
        """kohya targets "unet" (compvis names), "te1" (CLIP-L) and "te2" (OpenCLIP, all layers, fused attention)."""
        te1, te2 = self.text_encoders()
        return {
            "unet": unet_targets(self.unet(), "sdxl", "compvis", include_conv),
            "te1": te_targets(te1, TE_PREFIXES["te1"]),
            "te2": te_targets(te2, TE_PREFIXES["te2"]),
        }
