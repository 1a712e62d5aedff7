"""Training configuration: a frozen dataclass tree keyed by kohya sd-scripts names, TOML in/out, presets."""
from lora_trainer.config.dataset_config import (
    DatasetDescription, DatasetSpec, SubsetSpec, describe_settings, read_dataset_config,
)
from lora_trainer.config.kohya_keys import IGNORED_KEYS, NETWORK_ARG_FIELDS, VERSION_KEY, format_network_args
from lora_trainer.config.presets import PRESETS, preset_config
from lora_trainer.config.schema import (
    EMA_DEVICES, FIELDS, MAX_TOKEN_LENGTHS, MIXED_PRECISIONS, NETWORK_ALGOS, NETWORK_MODULES, OPTIMIZERS, SAMPLERS,
    SAVE_PRECISIONS, SCHEDULERS, DatasetConfig, FieldSpec, LoadedConfig, LoggingConfig, ModelConfig,
    NetworkConfig, OptimizerConfig, SampleConfig, SaveConfig, TrainConfig, TrainingConfig,
)
from lora_trainer.config.toml_io import (
    apply_overrides, config_from_dict, field_values, load_toml, save_toml, to_kohya_dict, update_config,
)
from lora_trainer.config.values import block_lr_preset, coerce, parse_literal

__all__ = [
    "EMA_DEVICES", "FIELDS", "IGNORED_KEYS", "MAX_TOKEN_LENGTHS", "MIXED_PRECISIONS", "NETWORK_ALGOS",
    "NETWORK_ARG_FIELDS", "NETWORK_MODULES", "OPTIMIZERS", "PRESETS", "SAMPLERS", "SAVE_PRECISIONS", "SCHEDULERS",
    "VERSION_KEY",
    "DatasetConfig", "DatasetDescription", "DatasetSpec", "FieldSpec", "LoadedConfig", "LoggingConfig",
    "ModelConfig", "NetworkConfig", "OptimizerConfig", "SampleConfig", "SaveConfig", "SubsetSpec", "TrainConfig",
    "TrainingConfig", "apply_overrides", "block_lr_preset", "coerce", "config_from_dict", "describe_settings",
    "field_values", "format_network_args", "load_toml", "parse_literal", "preset_config", "read_dataset_config",
    "save_toml", "to_kohya_dict", "update_config",
]
