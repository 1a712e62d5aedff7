"""Starting points from DESIGN.md, as flat kohya-key overrides of the defaults."""
from __future__ import annotations

from typing import Any

from lora_trainer.config.schema import TrainConfig
from lora_trainer.errors import ConfigError

_SD1_STYLE: dict[str, Any] = {
    "network_module": "networks.lora", "network_dim": 128, "network_alpha": 128.0, "network_dropout": 0.1,
    "optimizer_type": "Lion", "learning_rate": 6e-5, "unet_lr": 6e-5, "text_encoder_lr": 6e-6,
    "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3, "min_snr_gamma": 5.0,
    "multires_noise_iterations": 6, "multires_noise_discount": 0.3,
    "resolution": (768, 768), "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 1536,
    "bucket_reso_steps": 64, "train_batch_size": 4, "mixed_precision": "bf16", "save_precision": "bf16",
    "shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.2, "clip_skip": 2,
    "max_token_length": 225, "cache_latents": True, "max_train_epochs": 15, "save_every_n_epochs": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    "sd1_style_lora": dict(_SD1_STYLE),
    "sd1_style_loha": {
        **_SD1_STYLE, "network_module": "lycoris.kohya", "algo": "loha", "network_dim": 16, "network_alpha": 8.0,
        "conv_dim": 4, "conv_alpha": 2.0, "text_encoder_lr": 5e-6,
    },
    "sd1_character_lora": {
        "network_module": "networks.lora", "network_dim": 32, "network_alpha": 16.0,
        "optimizer_type": "AdamW8bit", "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5,
        "lr_scheduler": "cosine", "lr_warmup_steps": 0.05, "max_train_steps": 5000,
        "resolution": (512, 512), "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 1024,
        "train_batch_size": 2, "mixed_precision": "fp16", "save_precision": "fp16", "shuffle_caption": True,
        "keep_tokens": 1, "clip_skip": 2, "max_token_length": 225, "cache_latents": True,
        "save_every_n_steps": 500,
    },
    "sdxl_lora": {
        "sdxl": True, "network_module": "networks.lora", "network_dim": 32, "network_alpha": 16.0,
        "network_train_unet_only": True, "optimizer_type": "Adafactor", "learning_rate": 1e-5,
        "optimizer_args": ("scale_parameter=False", "relative_step=False", "warmup_init=False"),
        "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100, "max_grad_norm": 0.0,
        "resolution": (1024, 1024), "enable_bucket": True, "min_bucket_reso": 512, "max_bucket_reso": 2048,
        "train_batch_size": 4, "mixed_precision": "fp16", "save_precision": "fp16", "no_half_vae": True,
        "gradient_checkpointing": True, "cache_latents": True, "cache_text_encoder_outputs": True,
        "max_token_length": 225, "max_train_epochs": 10, "save_every_n_epochs": 1,
    },
}
"""Preset name -> {kohya key: value}. SDXL conv layers (conv_dim 32 / conv_alpha 16) are optional: pass them."""


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """A validated TrainConfig: defaults, then preset `name`, then `overrides`.

    Args:
        name: str, a key of PRESETS.
        **overrides: kohya key -> value (e.g. train_data_dir="...", conv_dim=32).
    Returns:
        TrainConfig.
    Raises:
        ConfigError: for an unknown preset name, key or invalid value.
    """
    from lora_trainer.config.toml_io import update_config

    if name not in PRESETS:
        raise ConfigError(f"preset {name!r}: unknown. Use one of: {', '.join(PRESETS)}.")
    return update_config(TrainConfig(), {**PRESETS[name], **overrides})
