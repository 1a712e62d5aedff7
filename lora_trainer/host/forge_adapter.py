"""ModelAdapter over a Forge diffusion engine (`backend.diffusion_engine`: StableDiffusion, StableDiffusion2,
StableDiffusionXL), used in place: `forge_objects.unet.model.diffusion_model` (compvis block names), the HF
`CLIPTextModel`s inside its `IntegratedCLIP`s, its VAE.

Captions go through the engine's own `ClassicTextProcessingEngine` (Forge's tokenizer, chunks, clip skip and
textual-inversion embeddings) at a fixed chunk count, outside inference mode so gradients reach text-encoder LoRAs.
Nothing here imports Forge; `forge.py` hands the engine in.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode

from lora_trainer.host.a1111_text import chunk_count, encode_chunks
from lora_trainer.models.adapter import TextConditioning
from lora_trainer.models.diffusers_adapter import set_text_checkpointing
from lora_trainer.models.ldm_adapter import _weights_id
from lora_trainer.models.naming import TE_PREFIXES, te_targets, unet_targets

# Forge's UNet blocks with their own checkpoint flag (it only sends gradients to a block's own parameters).
CHECKPOINT_FLAGS = {"ResBlock": "use_checkpoint", "BasicTransformerBlock": "checkpoint"}
PREDICTION_TYPES = {"v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}


class OutOfPlaceAdds(TorchFunctionMode):
    """`x += y` computed as `x = x + y` inside the block: Forge's UNet blocks add in place into tensors autograd
    saved for backward (e.g. a LayerNorm's input), which inference allows and training does not."""

    OUT_OF_PLACE = {torch.Tensor.__iadd__: torch.add, torch.Tensor.add_: torch.add,
                    torch.Tensor.__imul__: torch.mul, torch.Tensor.mul_: torch.mul}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.OUT_OF_PLACE.get(func, func)(*args, **(kwargs or {}))


def _training_forward(module: nn.Module):
    """The block's own forward under non-reentrant checkpointing, without in-place adds also in the recompute
    during backward."""
    forward = type(module).forward.__get__(module)

    def out_of_place(*args, **kwargs):
        with OutOfPlaceAdds():
            return forward(*args, **kwargs)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(out_of_place, *args, use_reentrant=False, **kwargs)

    return run


def engine_architecture(engine) -> str:
    """"sd1", "sd2", "sd2-v" or "sdxl" from the engine's flags and its predictor; ValueError for other engines."""
    prediction = PREDICTION_TYPES.get(getattr(engine.forge_objects.unet.model.predictor, "prediction_type", ""))
    if getattr(engine, "is_sdxl", False):
        return "sdxl"
    if getattr(engine, "is_sd2", False):
        return "sd2-v" if prediction == "v_prediction" else "sd2"
    if getattr(engine, "is_sd1", False):
        return "sd1"
    raise ValueError(f"Forge: the loaded model is a {type(engine).__name__}; LoRA training here supports SD1, SD2 "
                     "and SDXL. Load such a checkpoint, or train with `python -m lora_trainer train`.")


@contextlib.contextmanager
def _engine_settings(engine, clip_skip: int, no_emphasis):
    """Clip skip and literal captions (no emphasis syntax) on one text engine for one call."""
    saved = engine.clip_skip, engine.emphasis
    engine.clip_skip = max(int(clip_skip or 1), getattr(engine, "minimal_clip_skip", 1))
    engine.emphasis = no_emphasis
    try:
        yield engine
    finally:
        engine.clip_skip, engine.emphasis = saved


class ForgeAdapter:
    """The training loop's view of a Forge engine (see module doc).

    Args:
        engine: `shared.sd_model` (a `ForgeDiffusionEngine`), already resident and with ordinary tensors.
        no_emphasis: Forge's "None" emphasis object (captions are taken literally, as the A1111 host does).
        model_id (str, optional): the checkpoint's hash, defaults to a sampled hash of the UNet weights.
    """

    def __init__(self, engine, no_emphasis, model_id: str | None = None):
        self.model = engine
        self.engine = engine
        self._no_emphasis = no_emphasis
        self._kmodel = engine.forge_objects.unet.model
        self.architecture = engine_architecture(engine)
        self.prediction_type = "v_prediction" if self.architecture == "sd2-v" else "epsilon"
        self.alphas_cumprod = self._kmodel.predictor.alphas_cumprod.detach().float().cpu().clone()
        self.model_id = model_id or _weights_id(self.unet())
        self._checkpointed: dict[nn.Module, bool] = {}

    # -- parts ---------------------------------------------------------------------------------------------------
    def unet(self) -> nn.Module:
        return self._kmodel.diffusion_model

    def vae(self) -> nn.Module:
        return self.engine.forge_objects.vae.first_stage_model

    def _clips(self) -> dict[str, nn.Module]:
        """Component name -> HF CLIPTextModel (te; te1/te2 for SDXL)."""
        encoders = self.engine.forge_objects.clip.cond_stage_model
        if self.architecture == "sdxl":
            return {"te1": encoders.clip_l.transformer, "te2": encoders.clip_g.transformer}
        name = "clip_h" if self.architecture.startswith("sd2") else "clip_l"
        return {"te": getattr(encoders, name).transformer}

    def text_encoders(self) -> list[nn.Module]:
        return list(self._clips().values())

    @property
    def device(self) -> torch.device:
        return next(self.unet().parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Forge's computation dtype (weights stored in another float dtype are cast per layer, as in generation)."""
        return self._kmodel.computation_dtype

    # -- the contract --------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1, 1] -> latents through Forge's VAE path (`encode_first_stage`), as ordinary tensors."""
        return self.engine.encode_first_stage(pixels.float()).float().clone()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.engine.decode_first_stage(latents.float()).float().clone().clamp(-1, 1)

    def _encode(self, engine, captions, clip_skip, chunks):
        with _engine_settings(engine, clip_skip, self._no_emphasis):
            return encode_chunks(engine, captions, chunks, fixes_owner=engine.embeddings)

    def encode_captions(self, captions: list[str], clip_skip: int = 1, max_token_length: int = 75) -> TextConditioning:
        """See `ModelAdapter.encode_captions` (SDXL: kohya's penultimate layer of both encoders)."""
        chunks = chunk_count(max_token_length)
        if self.architecture != "sdxl":
            z, _ = self._encode(self.engine.text_processing_engine, captions, clip_skip, chunks)
            return TextConditioning(z)
        z1, _ = self._encode(self.engine.text_processing_engine_l, captions, 2, chunks)
        z2, pooled = self._encode(self.engine.text_processing_engine_g, captions, 2, chunks)
        return TextConditioning(torch.cat([z1, z2.to(z1.dtype)], dim=2), pooled)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output (eps or v) from `diffusion_model(x, timesteps, context, y)` in Forge's computation dtype."""
        device, dtype = self.device, self.dtype
        y = None
        if self.architecture == "sdxl":
            sizes = self.engine.embedder(size_cond.to(device).reshape(-1)).reshape(size_cond.shape[0], -1)
            y = torch.cat([cond.pooled.to(device), sizes.to(cond.pooled.dtype)], dim=1).to(dtype)
        with OutOfPlaceAdds():
            return self.unet()(noisy_latents.to(device=device, dtype=dtype), timesteps.to(device).float(),
                               context=cond.crossattn.to(device=device, dtype=dtype), y=y, transformer_options={})

    def lora_targets(self, include_conv: bool = False) -> dict[str, dict[str, nn.Module]]:
        """kohya targets keyed by kohya name: the same names as on A1111 (Forge's Linear found by duck typing)."""
        targets = {"unet": unet_targets(self.unet(), self.architecture, "compvis", include_conv)}
        for component, encoder in self._clips().items():
            targets[component] = te_targets(encoder, TE_PREFIXES[component])
        return targets

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Non-reentrant checkpointing around Forge's ResBlocks and transformer blocks (their own flag off); TE:
        transformers' own. `predict` runs without in-place adds either way."""
        for module in self.unet().modules():
            flag = CHECKPOINT_FLAGS.get(type(module).__name__)
            if flag is None or not hasattr(module, flag):
                continue
            self._checkpointed.setdefault(module, bool(getattr(module, flag)))
            setattr(module, flag, False)
            if enabled:
                module.forward = _training_forward(module)
            else:
                module.__dict__.pop("forward", None)
        for encoder in self.text_encoders():
            if hasattr(encoder, "gradient_checkpointing_enable"):
                set_text_checkpointing(encoder, enabled)

    def restore_checkpoint_flags(self) -> None:
        """Undo enable_gradient_checkpointing."""
        for module, value in self._checkpointed.items():
            module.__dict__.pop("forward", None)
            setattr(module, CHECKPOINT_FLAGS[type(module).__name__], value)
        self._checkpointed.clear()

