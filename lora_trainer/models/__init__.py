"""Model adapters (what the training loop needs from a diffusion model) and kohya key naming.

Heavy back ends load lazily: diffusers in `loading`, Stability's `ldm` only where an ldm model is passed in.
"""
from lora_trainer.models.adapter import (
    ARCHITECTURES,
    COMPONENTS,
    ModelAdapter,
    TextConditioning,
)
from lora_trainer.models.checkpoint_list import (
    CheckpointInfo,
    inspect_checkpoint,
    list_checkpoints,
    read_safetensors_shapes,
)
from lora_trainer.models.derived_configs import derive_configs, write_config_folder
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
from lora_trainer.models.model_yaml import ModelYaml, read_model_yaml, yaml_path_for
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
    "CheckpointInfo",
    "DiffusersAdapter",
    "LdmAdapter",
    "ModelAdapter",
    "ModelYaml",
    "SDXL_LAYOUT",
    "SD_LAYOUT",
    "TE_PREFIXES",
    "TextConditioning",
    "UNET_PREFIX",
    "UnetLayout",
    "alphas_cumprod_from_config",
    "compvis_to_diffusers_unet",
    "derive_configs",
    "diffusers_to_compvis_unet",
    "encode_captions_sd",
    "encode_captions_sdxl",
    "encode_clip",
    "encode_open_clip",
    "encode_sdxl",
    "file_id",
    "inspect_checkpoint",
    "kohya_unet_name",
    "layout_for",
    "list_checkpoints",
    "load_checkpoint_adapter",
    "load_tokenizers",
    "load_vae",
    "read_model_yaml",
    "read_safetensors_shapes",
    "te_targets",
    "tokenize_chunks",
    "unet_targets",
    "write_config_folder",
    "yaml_path_for",
]
