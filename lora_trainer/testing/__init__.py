"""Test helpers that build real things: tiny real-architecture checkpoints (SD1, SD2, SDXL) with random weights, a VAE
that reconstructs, and (for the demo) a UNet that starts as a denoiser."""
from lora_trainer.testing.signal_path import make_unet_identity, make_vae_reconstruct
from lora_trainer.testing.tiny_models import (
    TINY_ARCHITECTURES,
    TinyModel,
    build_tiny_model,
    full_size_original_state_dict,
)

__all__ = ["TINY_ARCHITECTURES", "TinyModel", "build_tiny_model", "full_size_original_state_dict", "make_unet_identity",
           "make_vae_reconstruct"]
