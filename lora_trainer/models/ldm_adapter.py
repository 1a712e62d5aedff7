"""ModelAdapter over Stability's `ldm.models.diffusion.ddpm.LatentDiffusion` (SD1; SD2 with OpenCLIP).

Used outside the WebUI (tests, CLI, where `ldm` is importable) and by the WebUI host adapter, which passes its own
`text_encode` so that prompts are encoded exactly as generation does. Nothing is copied or reloaded.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from lora_trainer.models.adapter import TextConditioning
from lora_trainer.models.diffusers_adapter import set_text_checkpointing
from lora_trainer.models.naming import TE_PREFIXES, te_targets, unet_targets
from lora_trainer.models.text_encoding import (
    encode_clip,
    encode_open_clip,
    tokenize_chunks,
)

logger = logging.getLogger(__name__)

TextEncodeFn = Callable[[list[str], int, int], TextConditioning]
# ldm block classes whose own checkpoint flag we turn off, and the attribute holding it.
_LDM_CHECKPOINT_FLAGS = {"ResBlock": "use_checkpoint", "BasicTransformerBlock": "checkpoint"}


def _embedder(latent_diffusion: nn.Module) -> nn.Module:
    """The ldm text embedder; the WebUI wraps it (`FrozenCLIPEmbedderWithCustomWords.wrapped`)."""
    cond = latent_diffusion.cond_stage_model
    return getattr(cond, "wrapped", cond)


def _is_open_clip(cond_stage_model: nn.Module) -> bool:
    return hasattr(cond_stage_model, "model") and hasattr(cond_stage_model.model, "transformer")


def _weights_id(model: nn.Module, samples: int = 4096) -> str:
    """A short stable hash of every weight tensor (name, shape, ~4096 evenly spaced values each): any merge or
    fine-tune changes it, and a multi-GB model is hashed in moments."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


class LdmAdapter:
    """The training loop's view of an ldm `LatentDiffusion`.

    Args:
        latent_diffusion (nn.Module): the `LatentDiffusion` (its `model.diffusion_model`, `first_stage_model`,
            `cond_stage_model` are used in place).
        text_encode (callable, optional): `(captions, clip_skip, max_token_length) -> TextConditioning`, replacing
            the built-in encoding (the WebUI host passes its own), defaults to None.
        tokenizer (optional): a transformers CLIP tokenizer for OpenCLIP (SD2) models, whose ldm embedder has no
            tokenizer object of its own, defaults to None.
        model_id (str, optional): identity of the weights (the host passes its checkpoint hash), defaults to a
            sampled hash of all weights.
    """

    def __init__(self, latent_diffusion: nn.Module, text_encode: TextEncodeFn | None = None, tokenizer=None,
                 model_id: str | None = None):
        self.model = latent_diffusion
        self._text_encode = text_encode
        self._tokenizer = tokenizer
        cond = _embedder(latent_diffusion)
        self._open_clip = _is_open_clip(cond)
        v = getattr(latent_diffusion, "parameterization", "eps") == "v"
        self.architecture = ("sd2-v" if v else "sd2") if self._open_clip else "sd1"
        self.prediction_type = "v_prediction" if v else "epsilon"
        self.alphas_cumprod = latent_diffusion.alphas_cumprod.detach().float().cpu()
        self.model_id = model_id or _weights_id(latent_diffusion)
        self._checkpointed: dict[nn.Module, bool] = {}

    @property
    def device(self) -> torch.device:
        return next(self.unet().parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet().parameters()).dtype

    def unet(self) -> nn.Module:
        return self.model.model.diffusion_model

    def vae(self) -> nn.Module:
        return self.model.first_stage_model

    def _text_module(self) -> nn.Module:
        cond = _embedder(self.model)
        return cond.model if self._open_clip else cond.transformer

    def text_encoders(self) -> list[nn.Module]:
        return [self._text_module()]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1, 1] -> latents (sampled, times `scale_factor`)."""
        param = next(self.vae().parameters())
        posterior = self.vae().encode(pixels.to(device=param.device, dtype=param.dtype))
        return posterior.sample() * self.model.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-scaled latents -> images `[B,3,H,W]` in [-1, 1]."""
        param = next(self.vae().parameters())
        z = latents.to(device=param.device, dtype=param.dtype) / self.model.scale_factor
        return self.vae().decode(z).clamp(-1, 1)

    def encode_captions(self, captions: list[str], clip_skip: int = 1, max_token_length: int = 75) -> TextConditioning:
        """See `ModelAdapter.encode_captions`; uses `text_encode` when one was given."""
        if self._text_encode is not None:
            return self._text_encode(list(captions), clip_skip, max_token_length)
        cond = _embedder(self.model)
        if not self._open_clip:
            ids = tokenize_chunks(cond.tokenizer, captions, max_token_length)
            return TextConditioning(encode_clip(cond.transformer, ids, clip_skip))
        if self._tokenizer is None:
            raise ValueError("LdmAdapter: this SD2 model's OpenCLIP embedder has no tokenizer object. Pass "
                             "tokenizer= (a CLIP tokenizer padding with '!', see models/tokenizer.py).")
        ids = tokenize_chunks(self._tokenizer, captions, max_token_length)
        skip = getattr(cond, "layer_idx", 1) + clip_skip - 1
        return TextConditioning(encode_open_clip(cond.model, ids, layer_idx=skip))

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output through `diffusion_model(x, timesteps=t, context=c)`; size_cond is unused (SD1/SD2)."""
        device, dtype = self.device, self.dtype
        context = cond.crossattn.to(device=device, dtype=dtype)
        return self.unet()(noisy_latents.to(device=device, dtype=dtype), timesteps=timesteps.to(device),
                           context=context)

    def lora_targets(self, include_conv: bool = False) -> dict[str, dict[str, nn.Module]]:
        """kohya targets ("unet", "te") keyed by full kohya name (SD1/SD2 UNet names in diffusers naming)."""
        targets = {"unet": unet_targets(self.unet(), self.architecture, "compvis", include_conv)}
        if self._open_clip:
            blocks = self._text_module().transformer.resblocks
            used = len(blocks) - getattr(_embedder(self.model), "layer_idx", 0)
            targets["te"] = te_targets(self._text_module(), TE_PREFIXES["te"], max_layers=used)
        else:
            targets["te"] = te_targets(self._text_module(), TE_PREFIXES["te"])
        return targets

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Swap ldm's own checkpointing (which sends gradients only to a block's own parameters, so injected
        modules would get none) for non-reentrant `torch.utils.checkpoint` around ResBlocks and transformer blocks.
        `enabled=False` turns checkpointing off entirely. TE: transformers' own (train mode only)."""
        for module in self.unet().modules():
            flag = _LDM_CHECKPOINT_FLAGS.get(type(module).__name__)
            if flag is None:
                continue
            if hasattr(module, flag):  # ComfyUI's blocks (reForge) have no such flag: nothing to turn off
                self._checkpointed.setdefault(module, bool(getattr(module, flag)))
                setattr(module, flag, False)
            else:
                self._checkpointed.setdefault(module, None)
            if enabled:
                module.forward = _checkpointed_forward(module)
            else:
                module.__dict__.pop("forward", None)
        text = self._text_module()
        if hasattr(text, "gradient_checkpointing_enable"):
            set_text_checkpointing(text, enabled)

    def restore_checkpoint_flags(self) -> None:
        """Undo enable_gradient_checkpointing: plain forwards and ldm's original `use_checkpoint` flags."""
        for module, flag_value in self._checkpointed.items():
            module.__dict__.pop("forward", None)
            if flag_value is not None:
                setattr(module, _LDM_CHECKPOINT_FLAGS[type(module).__name__], flag_value)
        self._checkpointed.clear()


def _checkpointed_forward(module: nn.Module):
    forward = type(module).forward.__get__(module)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
