"""The training configuration: one frozen dataclass tree whose field names are kohya sd-scripts' keys.

Field names are unique across sections, so a flat kohya TOML maps onto the tree key by key. `FIELDS` is the
one table of key -> (section, type, default), derived from the dataclasses below.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion8bit", "PagedAdamW8bit", "Lion", "Prodigy", "DAdaptation",
              "DAdaptAdam", "Adafactor", "SGDNesterov")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
NETWORK_ALGOS = ("lora", "locon", "loha", "lokr")
NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "float")
MAX_TOKEN_LENGTHS = (75, 150, 225)
LOG_WITH = ("tensorboard", "wandb", "all")
EMA_DEVICES = ("same", "cpu")  # where the EMA copy lives: the training device, or the CPU (saves GPU memory)
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
NUM_BLOCKS = 25        # kohya block_dims/block_alphas: IN00..IN11, MID, OUT00..OUT11
NUM_LR_BLOCKS = 12     # kohya down_lr_weight / up_lr_weight entries


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    sdxl: bool = False
    vae: str | None = None
    tokenizer_dir: str | None = None          # ours: local CLIP tokenizer folder (no hub)
    diffusers_config_dir: str | None = None   # ours: local diffusers config folder (no hub)
    clip_skip: int = 1
    max_token_length: int = 75
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    gradient_checkpointing: bool = False
    no_half_vae: bool = False
    sdpa: bool = False
    xformers: bool = False                    # accepted; torch SDPA is used either way
    lowram: bool = False


@dataclass(frozen=True)
class NetworkConfig:
    network_module: str = "networks.lora"
    algo: str = "lora"
    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    network_args: tuple[str, ...] = ()        # entries not parsed into the fields above, kept verbatim
    network_weights: str | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    down_lr_weight: tuple[float, ...] | None = None
    mid_lr_weight: float | None = None
    up_lr_weight: tuple[float, ...] | None = None
    block_lr_zero_threshold: float = 0.0

    @property
    def effective_algo(self) -> str:
        """"loha" or "lokr" as asked, else "locon" when 3x3 convolutions are trained (conv_dim set), or "lora"."""
        if self.algo in ("loha", "lokr"):
            return self.algo
        return "locon" if self.conv_dim else "lora"

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only

    def kohya_network_args(self) -> list[str]:
        """The full kohya `network_args` list: parsed fields written back as "key=value", then the rest."""
        from lora_trainer.config.kohya_keys import format_network_args

        return format_network_args(self)


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str = "AdamW"
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer_args: tuple[str, ...] = ()
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up in steps: `lr_warmup_steps` as is, or as a ratio of `total_steps` when it is a float < 1."""
        if isinstance(self.lr_warmup_steps, float) and self.lr_warmup_steps < 1:
            return int(self.lr_warmup_steps * total_steps)
        return int(self.lr_warmup_steps)


@dataclass(frozen=True)
class DatasetConfig:
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    dataset_config: str | None = None         # kohya dataset TOML; replaces train_data_dir/reg_data_dir
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    flip_aug: bool = False
    random_crop: bool = False
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    train_batch_size: int = 1
    prior_loss_weight: float = 1.0
    max_data_loader_n_workers: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    max_train_epochs: int | None = None
    max_train_steps: int = 1600
    seed: int | None = None
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    min_snr_gamma: float | None = None
    debiased_estimation_loss: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    validation_split: float = 0.0             # share of each concept folder held out for the validation loss
    validation_seed: int | None = None        # chooses the held-out images; None: the run's seed
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None  # None: after every epoch (kohya's default)
    max_validation_steps: int | None = None   # held-out images evaluated per validation, None: all
    ema: bool = False                         # ours: keep an EMA of the LoRA weights, saved as <name>-ema
    ema_decay: float = 0.999
    ema_warmup: bool = True                   # decay min(ema_decay, (1 + n) / (10 + n)) at the n-th update
    ema_update_every: int = 1                 # optimizer steps between EMA updates
    ema_device: str = "same"                  # "same" (the training device) or "cpu"


@dataclass(frozen=True)
class SaveConfig:
    output_dir: str | None = None
    output_name: str = "last"
    save_model_as: str = "safetensors"
    save_precision: str = "fp16"
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_state: bool = False
    resume: str | None = None


@dataclass(frozen=True)
class SampleConfig:
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_prompts: str | None = None
    sample_sampler: str = "ddim"


@dataclass(frozen=True)
class LoggingConfig:
    log_with: str | None = None
    logging_dir: str | None = None
    log_prefix: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass(frozen=True)
class LoadedConfig:
    """What `load_toml` found: the config, keys nobody knows, kohya keys accepted but not used, warnings."""

    config: TrainConfig
    unknown_keys: list[str] = field(default_factory=list)
    ignored_keys: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FieldSpec:
    """One row of the key table: the section attribute on TrainConfig, the annotation text and the default."""

    section: str
    type: str
    default: Any


def _field_table() -> dict[str, FieldSpec]:
    table: dict[str, FieldSpec] = {}
    for section in dataclasses.fields(TrainConfig):
        for item in dataclasses.fields(section.default_factory):
            if item.name in table:
                raise RuntimeError(f"config field {item.name} is defined twice")
            table[item.name] = FieldSpec(section.name, str(item.type), item.default)
    return table


FIELDS: dict[str, FieldSpec] = _field_table()
SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
