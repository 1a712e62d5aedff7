"""Normalisation (canonical spellings, kohya/LyCORIS defaults) and validation of config values.

Every refusal is a ConfigError "<key> = <value>: <what is wrong>. <how to fix>".
"""
from __future__ import annotations

from typing import Any

from lora_trainer.config.schema import (
    EMA_DEVICES, FIELDS, LOG_WITH, MAX_TOKEN_LENGTHS, MIXED_PRECISIONS, NETWORK_ALGOS, NETWORK_MODULES, NUM_BLOCKS,
    NUM_LR_BLOCKS, OPTIMIZERS, SAMPLERS, SAVE_PRECISIONS, SCHEDULERS, TrainConfig,
)
from lora_trainer.errors import ConfigError

_SAVE_PRECISION_ALIASES = {"fp32": "float", "float32": "float", "float16": "fp16", "bfloat16": "bf16"}

# Upper bounds far beyond real use (kohya sets none): they refuse typos such as 10**12 with a clear message before
# a run fails obscurely (out of memory, an overflow) deep in training.
MAX_RANK = 4096         # the widest layers (SDXL) are 1280 wide, 5120/10240 in their MLPs
MAX_SIDE = 8192         # pixels, resolution and bucket sides
MAX_STEPS = 10_000_000
MAX_EPOCHS = 100_000
LIMITS: dict[str, tuple[int, int]] = {
    "network_dim": (1, MAX_RANK), "conv_dim": (1, MAX_RANK),
    "max_train_steps": (1, MAX_STEPS), "save_every_n_steps": (1, MAX_STEPS), "sample_every_n_steps": (1, MAX_STEPS),
    "lr_warmup_steps": (0, MAX_STEPS),
    "max_train_epochs": (1, MAX_EPOCHS), "save_every_n_epochs": (1, MAX_EPOCHS),
    "save_last_n_epochs": (1, MAX_EPOCHS), "sample_every_n_epochs": (1, MAX_EPOCHS),
    "caption_dropout_every_n_epochs": (0, MAX_EPOCHS),
    "train_batch_size": (1, 1024), "gradient_accumulation_steps": (1, 1024), "lr_scheduler_num_cycles": (1, 10_000),
    "min_bucket_reso": (1, MAX_SIDE), "max_bucket_reso": (1, MAX_SIDE), "bucket_reso_steps": (8, 1024),
    "keep_tokens": (0, 10_000), "max_data_loader_n_workers": (0, 256), "multires_noise_iterations": (0, 100),
    "seed": (0, 2**64 - 1),  # torch.manual_seed's range
    "validation_seed": (0, 2**64 - 1), "validate_every_n_steps": (1, MAX_STEPS),
    "validate_every_n_epochs": (1, MAX_EPOCHS), "max_validation_steps": (1, MAX_STEPS),
    "ema_update_every": (1, MAX_STEPS),
}
_LIST_LIMITS = {"block_dims": MAX_RANK, "conv_block_dims": MAX_RANK}


def _one_of(key: str, value: Any, choices: tuple[str, ...], fold=str.lower) -> str:
    """The canonical spelling in `choices` matching `value` (compared after `fold`), else ConfigError."""
    if isinstance(value, str):
        for choice in choices:
            if fold(choice) == fold(value.strip()):
                return choice
    raise ConfigError(f"{key} = {value!r}: not supported. Use one of: {', '.join(choices)}.")


def _check(ok: bool, key: str, value: Any, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {problem}. {fix}")


def normalize(values: dict[str, Any]) -> list[str]:
    """Canonicalise choice spellings and fill kohya/LyCORIS network defaults in a flat {field: value} dict.

    Args:
        values: dict of coerced field values (only the keys that were set); changed in place.
    Returns:
        list[str] of warnings for the user.
    """
    warnings: list[str] = []
    choices = {"optimizer_type": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "network_module": NETWORK_MODULES,
               "algo": NETWORK_ALGOS, "mixed_precision": MIXED_PRECISIONS, "sample_sampler": SAMPLERS,
               "log_with": LOG_WITH, "ema_device": EMA_DEVICES}
    for key, options in choices.items():
        if values.get(key) is not None:
            values[key] = _one_of(key, values[key], options)
    if values.get("save_precision") is not None:
        text = str(values["save_precision"]).strip().lower()
        values["save_precision"] = _one_of("save_precision", _SAVE_PRECISION_ALIASES.get(text, text),
                                           SAVE_PRECISIONS)
    length = values.get("max_token_length")
    if length is not None and length > MAX_TOKEN_LENGTHS[-1]:
        warnings.append(f"max_token_length = {length}: not supported, using {MAX_TOKEN_LENGTHS[-1]} (the nearest "
                        f"supported value; valid: {', '.join(map(str, MAX_TOKEN_LENGTHS))}).")
        values["max_token_length"] = MAX_TOKEN_LENGTHS[-1]
    if values.get("min_snr_gamma") == 0:
        values["min_snr_gamma"] = None  # kohya: 0 disables min-SNR weighting
    warnings += _network_defaults(values)
    return warnings


def _network_defaults(values: dict[str, Any]) -> list[str]:
    dim = values.get("network_dim", 4)
    alpha = values.get("network_alpha", 1.0)
    if values.get("network_module") == "lycoris.kohya":
        # LyCORIS: conv_dim/conv_alpha default to network_dim/network_alpha (0 also means "use network_dim").
        warnings = []
        if not values.get("conv_dim"):
            warnings.append(f"conv_dim: not set; lycoris.kohya then trains 3x3 convolutions at conv_dim = "
                            f"network_dim ({dim}). Add \"conv_dim=N\" to network_args to choose another rank.")
            values["conv_dim"] = dim
        if not values.get("conv_alpha"):
            values["conv_alpha"] = float(alpha)
        return warnings
    if values.get("conv_dim") == 0:
        values["conv_dim"] = None
    if values.get("conv_dim") is not None and values.get("conv_alpha") is None:
        values["conv_alpha"] = 1.0  # kohya networks.lora default
    return []


def validate(config: TrainConfig) -> list[str]:
    """Check a whole config; raise on a value that cannot train, return warnings for doubtful ones.

    Args:
        config: TrainConfig.
    Returns:
        list[str] of warnings.
    Raises:
        ConfigError: naming key, value and fix.
    """
    return _model(config) + _network(config) + _optimizer(config) + _dataset(config) + _rest(config) + \
        _limits(config)


def _limits(config: TrainConfig) -> list[str]:
    for key, (low, high) in LIMITS.items():
        value = getattr(getattr(config, FIELDS[key].section), key)
        if value is not None:
            _check(low <= value <= high, key, value, f"out of range, must be from {low} to {high}",
                   "Set a value in that range (real runs stay far below the upper limit).")
    for key, high in _LIST_LIMITS.items():
        value = getattr(config.network, key)
        _check(value is None or max(value) <= high, key, value, f"values must be at most {high}",
               "Use ranks such as 4 to 128.")
    return []


def _model(config: TrainConfig) -> list[str]:
    m = config.model
    warnings = []
    _check(not (m.v2 and m.sdxl), "sdxl", m.sdxl, "v2 and sdxl are both set", "Set only the one that matches "
           "the checkpoint (v2 for SD 2.x, sdxl for SDXL).")
    _check(1 <= m.clip_skip <= 12, "clip_skip", m.clip_skip, "must be 1..12", "Use 1 (SD default) or 2 (anime).")
    _check(m.max_token_length in MAX_TOKEN_LENGTHS, "max_token_length", m.max_token_length, "not supported",
           f"Use one of {', '.join(map(str, MAX_TOKEN_LENGTHS))}.")
    _check(not (m.full_fp16 and m.full_bf16), "full_bf16", True, "full_fp16 and full_bf16 are both set",
           "Set at most one.")
    _check(not m.full_fp16 or m.mixed_precision == "fp16", "full_fp16", True, "needs mixed_precision = \"fp16\"",
           "Set mixed_precision = \"fp16\" or full_fp16 = false.")
    _check(not m.full_bf16 or m.mixed_precision == "bf16", "full_bf16", True, "needs mixed_precision = \"bf16\"",
           "Set mixed_precision = \"bf16\" or full_bf16 = false.")
    if m.v_parameterization and not (m.v2 or m.sdxl):
        warnings.append("v_parameterization = true without v2: only SD 2.x 768-v checkpoints (and some SD1 "
                        "fine-tunes) predict v; check the checkpoint.")
    if m.sdxl and m.clip_skip != 1:
        warnings.append(f"clip_skip = {m.clip_skip}: SDXL uses the penultimate layers by design; kohya ignores "
                        "clip_skip for SDXL, so it is ignored here too.")
    return warnings


def _network(config: TrainConfig) -> list[str]:
    n = config.network
    _check(n.network_dim >= 1, "network_dim", n.network_dim, "must be at least 1", "Set the LoRA rank, e.g. 16.")
    _check(n.network_alpha >= 0, "network_alpha", n.network_alpha, "must not be negative",
           "Use e.g. half of network_dim (0 means alpha = dim).")
    _check(n.conv_dim is None or n.conv_dim >= 1, "conv_dim", n.conv_dim, "must be at least 1",
           "Remove it to leave 3x3 convolutions untrained, or use e.g. 4.")
    _check(n.conv_alpha is None or n.conv_alpha >= 0, "conv_alpha", n.conv_alpha, "must not be negative",
           "Use e.g. half of conv_dim.")
    _check(not (n.algo in ("loha", "lokr") and n.network_module == "networks.lora"), "network_module",
           n.network_module, f"algo {n.algo} needs LyCORIS", "Set network_module = \"lycoris.kohya\".")
    _check(not (n.network_train_unet_only and n.network_train_text_encoder_only), "network_train_unet_only",
           True, "network_train_text_encoder_only is also set, so nothing would train", "Set at most one.")
    for key in ("network_dropout", "rank_dropout", "module_dropout"):
        value = getattr(n, key)
        _check(value is None or 0 <= value < 1, key, value, "must be in [0, 1)", "Use e.g. 0.1, or remove it.")
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        value = getattr(n, key)
        _check(value is None or len(value) == NUM_BLOCKS, key, value, f"needs {NUM_BLOCKS} values "
               "(IN00..IN11, MID, OUT00..OUT11)", f"Give {NUM_BLOCKS} comma-separated numbers.")
        _check(value is None or min(value) >= 0, key, value, "must not be negative", "Use 0 to skip a block.")
    for key in ("down_lr_weight", "up_lr_weight"):
        value = getattr(n, key)
        _check(value is None or len(value) == NUM_LR_BLOCKS, key, value, f"needs {NUM_LR_BLOCKS} values",
               f"Give {NUM_LR_BLOCKS} comma-separated numbers or a preset like \"sine\".")
        _check(value is None or min(value) >= 0, key, value, "must not be negative", "Use 0 to freeze a block.")
    _check(n.mid_lr_weight is None or n.mid_lr_weight >= 0, "mid_lr_weight", n.mid_lr_weight,
           "must not be negative", "Use 0 to freeze the middle block.")
    return []


def _optimizer(config: TrainConfig) -> list[str]:
    o = config.optimizer
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        value = getattr(o, key)
        _check(value is None or value >= 0, key, value, "must not be negative", "Use e.g. 1e-4.")
    _check(not (o.lr_scheduler == "constant" and o.lr_warmup_steps), "lr_warmup_steps", o.lr_warmup_steps,
           "the constant scheduler has no warm-up", "Set lr_scheduler = \"constant_with_warmup\" or "
           "lr_warmup_steps = 0.")
    _check(o.lr_scheduler_num_cycles >= 1, "lr_scheduler_num_cycles", o.lr_scheduler_num_cycles,
           "must be at least 1", "Use e.g. 3 for cosine_with_restarts.")
    _check(o.lr_scheduler_power > 0, "lr_scheduler_power", o.lr_scheduler_power, "must be positive", "Use 1.0.")
    _check(o.max_grad_norm >= 0, "max_grad_norm", o.max_grad_norm, "must not be negative",
           "Use 1.0, or 0 to disable clipping.")
    _check(o.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", o.gradient_accumulation_steps,
           "must be at least 1", "Use 1 for no accumulation.")
    for entry in o.optimizer_args:
        _check("=" in entry, "optimizer_args", entry, "entry has no '='", "Write entries as \"key=value\".")
    return []


def _dataset(config: TrainConfig) -> list[str]:
    d = config.dataset
    warnings = []
    for side in d.resolution:
        _check(64 <= side <= MAX_SIDE and side % 8 == 0, "resolution", d.resolution, "sides must be multiples of "
               f"8, from 64 to {MAX_SIDE}", "Use e.g. \"512,512\" or \"768,1024\" (width,height).")
    if d.enable_bucket:
        _check(d.bucket_reso_steps >= 8 and d.bucket_reso_steps % 8 == 0, "bucket_reso_steps",
               d.bucket_reso_steps, "must be a multiple of 8", "Use 64.")
        _check(0 < d.min_bucket_reso <= d.max_bucket_reso, "min_bucket_reso", d.min_bucket_reso,
               f"must be positive and at most max_bucket_reso ({d.max_bucket_reso})", "Use e.g. 256 and 1024.")
        for key in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(d, key) % d.bucket_reso_steps:
                warnings.append(f"{key} = {getattr(d, key)}: not a multiple of bucket_reso_steps "
                                f"({d.bucket_reso_steps}); buckets are rounded to it.")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        value = getattr(d, key)
        _check(0 <= value <= 1, key, value, "must be in [0, 1]", "Use e.g. 0.1.")
    _check(d.caption_extension.startswith("."), "caption_extension", d.caption_extension,
           "must start with '.'", f"Use \".{d.caption_extension}\".")
    for key in ("train_batch_size",):
        _check(getattr(d, key) >= 1, key, getattr(d, key), "must be at least 1", "Use e.g. 1 to 4.")
    for key in ("keep_tokens", "caption_dropout_every_n_epochs", "prior_loss_weight", "max_data_loader_n_workers"):
        _check(getattr(d, key) >= 0, key, getattr(d, key), "must not be negative", "Use 0 or more.")
    return warnings


def _rest(config: TrainConfig) -> list[str]:
    t, s, p = config.training, config.save, config.sample
    warnings = []
    _check(t.max_train_steps >= 1, "max_train_steps", t.max_train_steps, "must be at least 1", "Use e.g. 1600.")
    for key, value in (("max_train_epochs", t.max_train_epochs), ("save_every_n_epochs", s.save_every_n_epochs),
                       ("save_every_n_steps", s.save_every_n_steps), ("save_last_n_epochs", s.save_last_n_epochs),
                       ("sample_every_n_steps", p.sample_every_n_steps),
                       ("sample_every_n_epochs", p.sample_every_n_epochs)):
        _check(value is None or value >= 1, key, value, "must be at least 1", f"Use 1 or more, or remove {key}.")
    for key in ("noise_offset", "multires_noise_iterations"):
        _check(getattr(t, key) >= 0, key, getattr(t, key), "must not be negative", "Use 0 to disable.")
    _check(0 <= t.multires_noise_discount <= 1, "multires_noise_discount", t.multires_noise_discount,
           "must be in [0, 1]", "Use 0.3.")
    _check(t.min_snr_gamma is None or t.min_snr_gamma > 0, "min_snr_gamma", t.min_snr_gamma, "must be positive",
           "Use 5, or remove it.")
    _check(t.seed is None or t.seed >= 0, "seed", t.seed, "must not be negative", "Use e.g. 42.")
    _check(0 <= t.min_timestep < t.max_timestep <= 1000, "min_timestep", (t.min_timestep, t.max_timestep),
           "need 0 <= min_timestep < max_timestep <= 1000", "Use 0 and 1000.")
    _check(s.save_model_as == "safetensors", "save_model_as", s.save_model_as, "only safetensors is written",
           "Set save_model_as = \"safetensors\" (the WebUI loads it).")
    _check(bool(s.output_name) and "/" not in s.output_name and "\\" not in s.output_name, "output_name",
           s.output_name, "must be a plain file name", "Put folders in output_dir.")
    prefix = config.logging.log_prefix
    _check(not prefix or ("/" not in prefix and "\\" not in prefix), "log_prefix", prefix,
           "must be part of a folder name (the run's log folder inside logging_dir)", "Put folders in logging_dir.")
    if (p.sample_every_n_steps or p.sample_every_n_epochs) and not p.sample_prompts:
        warnings.append("sample_every_n_*: set but sample_prompts is not, so no samples are made during training.")
    return warnings + _validation(t) + _ema(t)


def _validation(t) -> list[str]:
    _check(0 <= t.validation_split < 1, "validation_split", t.validation_split, "must be in [0, 1)",
           "Use e.g. 0.1 to hold out a tenth of each concept folder, or 0 for no validation.")
    for key in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(t, key)
        _check(value is None or value >= 1, key, value, "must be at least 1", f"Use 1 or more, or remove {key}.")
    if (t.validate_every_n_steps or t.validate_every_n_epochs) and not t.validation_split:
        return ["validate_every_n_*: set but validation_split is 0, so no validation loss is computed."]
    return []


def _ema(t) -> list[str]:
    _check(0 <= t.ema_decay <= 1, "ema_decay", t.ema_decay, "must be in [0, 1]",
           "Use e.g. 0.999 (about the last 1000 updates weigh in), or 0.99 for short runs.")
    if not t.ema and (t.ema_decay != 0.999 or t.ema_update_every != 1 or t.ema_device != "same"):
        return ["ema_*: set but ema is false, so no EMA is kept. Set ema = true to keep one."]
    return []
