"""Model adapters (what the training loop needs from a diffusion model) and kohya key naming.

Heavy back ends load lazily: diffusers in `loading`, Stability's `ldm` only where an ldm model is passed in.
"""
from lora_trainer.models.adapter import (
    ARCHITECTURES,
    COMPONENTS,
    ModelAdapter,
    TextConditioning,
)
from lora_trainer.models.diffusers_adapter import (
    DiffusersAdapter,
    alphas_cumprod_from_config,
)
from lora_trainer.models.ldm_adapter import LdmAdapter
from lora_trainer.models.loading import (
    file_id,
    load_checkpoint_adapter,
    load_tokenizers,
    load_vae,
)
from lora_trainer.models.naming import (
    SD_LAYOUT,
    SDXL_LAYOUT,
    TE_PREFIXES,
    UNET_PREFIX,
    UnetLayout,
    compvis_to_diffusers_unet,
    diffusers_to_compvis_unet,
    kohya_unet_name,
    layout_for,
    te_targets,
    unet_targets,
)
from lora_trainer.models.text_encoding import (
    encode_captions_sd,
    encode_captions_sdxl,
    encode_clip,
    encode_open_clip,
    encode_sdxl,
    tokenize_chunks,
)

__all__ = [
    "ARCHITECTURES",
    "COMPONENTS",
    "SDXL_LAYOUT",
    "SD_LAYOUT",
    "TE_PREFIXES",
    "UNET_PREFIX",
    "DiffusersAdapter",
    "LdmAdapter",
    "ModelAdapter",
    "TextConditioning",
    "UnetLayout",
    "alphas_cumprod_from_config",
    "compvis_to_diffusers_unet",
    "diffusers_to_compvis_unet",
    "encode_captions_sd",
    "encode_captions_sdxl",
    "encode_clip",
    "encode_open_clip",
    "encode_sdxl",
    "file_id",
    "kohya_unet_name",
    "layout_for",
    "load_checkpoint_adapter",
    "load_tokenizers",
    "load_vae",
    "te_targets",
    "tokenize_chunks",
    "unet_targets",
]
