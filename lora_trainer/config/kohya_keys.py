"""Tables of kohya sd-scripts / GUI keys: accepted but not used, renamed, and those living in `network_args`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_trainer.errors import ConfigError

if TYPE_CHECKING:
    from lora_trainer.config.schema import NetworkConfig

VERSION_KEY = "lora_trainer_version"
ANY = object()  # neutral value meaning "any value is fine"

_SDPA = "torch scaled-dot-product attention (SDPA) is always used"
_NOT_SUPPORTED = "not supported by lora_trainer"

# key -> (reason, neutral value). A value other than the neutral one would change training in kohya, so it is
# refused (ConfigError) instead of being silently dropped; ANY accepts every value.
IGNORED_KEYS: dict[str, tuple[str, Any]] = {
    "mem_eff_attn": (_SDPA, ANY),
    "persistent_data_loader_workers": ("data loader workers are managed by lora_trainer", ANY),
    "model_train_type": ("lora-scripts GUI key; only sets sdxl when it names sdxl", ANY),
    "in_json": ("fine-tuning metadata is not supported; images and captions are read from train_data_dir "
                "folders (<repeats>_<concept>)", ANY),
    "dataset_repeats": ("only used with in_json; repeats come from the folder names (10_name)", 1),
    "weighted_captions": ("weighted captions are " + _NOT_SUPPORTED, False),
    "color_aug": ("color augmentation is " + _NOT_SUPPORTED, False),
    "token_warmup_min": ("token warm-up is " + _NOT_SUPPORTED, 1),
    "token_warmup_step": ("token warm-up is " + _NOT_SUPPORTED, 0),
    "debug_dataset": ("dataset debugging mode is " + _NOT_SUPPORTED + "; use the Dataset panel", False),
    "cache_text_encoder_outputs_to_disk": ("text-encoder outputs are cached in memory", ANY),
    "no_metadata": ("kohya ss_* metadata is always written", False),
    "training_comment": ("not written to the metadata", ANY),
    "vae_batch_size": ("latents are encoded in training-batch sized groups", ANY),
    "highvram": ("memory placement is chosen automatically", ANY),
    "lowvram": ("memory placement is chosen automatically", ANY),
    "output_config": ("use save_toml / the saved <output_name>.toml instead", False),
    "config_file": ("the file being read is the config", ANY),
    "tokenizer_cache_dir": ("the tokenizer is local; set tokenizer_dir", ANY),
    "console_log_level": ("logging goes through Python's logging module", ANY),
    "console_log_file": ("logging goes through Python's logging module", ANY),
    "console_log_simple": ("logging goes through Python's logging module", ANY),
    "wandb_api_key": ("wandb options are not used", ANY),
    "wandb_run_name": ("wandb options are not used", ANY),
    "log_tracker_name": ("tracker options are not used", ANY),
    "log_tracker_config": ("tracker options are not used", ANY),
    "log_config": ("the config is saved beside the LoRA as <output_name>.toml", ANY),
    "ddp_timeout": ("training runs on one device", ANY),
    "ddp_gradient_as_bucket_view": ("training runs on one device", ANY),
    "ddp_static_graph": ("training runs on one device", ANY),
    "metadata_title": ("metadata_* fields are not written yet", ANY),
    "metadata_author": ("metadata_* fields are not written yet", ANY),
    "metadata_description": ("metadata_* fields are not written yet", ANY),
    "metadata_license": ("metadata_* fields are not written yet", ANY),
    "metadata_tags": ("metadata_* fields are not written yet", ANY),
    "caption_separator": ("tags are separated by commas", ","),
    "enable_wildcard": ("{a|b} wildcards in captions are always expanded", ANY),
    "sample_at_first": ("sampling before training is " + _NOT_SUPPORTED, False),
    "use_8bit_adam": ("legacy switch; set optimizer_type = \"AdamW8bit\"", False),
    "use_lion_optimizer": ("legacy switch; set optimizer_type = \"Lion\"", False),
    "fp8_base": ("fp8 base weights are " + _NOT_SUPPORTED, False),
    "loss_type": ("only the L2 loss is supported", "l2"),
    "zero_terminal_snr": ("zero terminal SNR is " + _NOT_SUPPORTED, False),
    "scale_v_pred_loss_like_noise_pred": (_NOT_SUPPORTED, False),
    "v_pred_like_loss": (_NOT_SUPPORTED, 0),
    "masked_loss": ("masked loss is " + _NOT_SUPPORTED, False),
    "alpha_mask": ("alpha masks are " + _NOT_SUPPORTED, False),
    "ip_noise_gamma": ("input perturbation noise is " + _NOT_SUPPORTED, 0),
    "adaptive_noise_scale": ("adaptive noise scale is " + _NOT_SUPPORTED, 0),
    "noise_offset_random_strength": (_NOT_SUPPORTED, False),
    "ip_noise_gamma_random_strength": (_NOT_SUPPORTED, False),
    "scale_weight_norms": ("max-norm regularisation is " + _NOT_SUPPORTED, 0),
    "network_multiplier": ("the LoRA is trained at multiplier 1", 1),
    "dim_from_weights": ("set network_dim to the rank of network_weights", False),
    "stop_text_encoder_training": ("the text encoder trains for the whole run", 0),
    "lr_decay_steps": (_NOT_SUPPORTED, 0),
    "save_state_on_train_end": ("set save_state to keep resume states", False),
}

# Fields that are kept (for round trips and kohya compatibility) but have no effect here.
UNUSED_FIELDS: dict[str, str] = {"xformers": _SDPA}

ALIASES: dict[str, str] = {"caption_extention": "caption_extension"}  # kohya's old spelling

# kohya's sectioned TOML section names, used when saving (any section name is accepted when loading).
SECTION_NAMES: dict[str, str] = {
    "model": "model_arguments", "network": "additional_network_arguments", "optimizer": "optimizer_arguments",
    "dataset": "dataset_arguments", "training": "training_arguments", "save": "saving_arguments",
    "sample": "sample_prompt_arguments", "logging": "logging_arguments",
}

# network_args entry name -> field. kohya reads these only from network_args ("conv_dim=4"); LyCORIS takes its
# neuron dropout from "dropout=".
NETWORK_ARG_FIELDS: dict[str, str] = {
    "algo": "algo", "conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "dropout": "network_dropout",
    "rank_dropout": "rank_dropout", "module_dropout": "module_dropout", "block_dims": "block_dims",
    "block_alphas": "block_alphas", "conv_block_dims": "conv_block_dims", "conv_block_alphas": "conv_block_alphas",
    "down_lr_weight": "down_lr_weight", "mid_lr_weight": "mid_lr_weight", "up_lr_weight": "up_lr_weight",
    "block_lr_zero_threshold": "block_lr_zero_threshold",
}
_FIELD_TO_ARG = {field: arg for arg, field in NETWORK_ARG_FIELDS.items()}
# network_args entries kept verbatim and read by the networks themselves, by algo (LoKr's Kronecker factor)
NETWORK_ARGS_READ: dict[str, tuple[str, ...]] = {"lokr": ("factor",)}


def is_neutral(key: str, value: Any) -> bool:
    """True when an ignored key's value changes nothing (see `IGNORED_KEYS`)."""
    neutral = IGNORED_KEYS[key][1]
    if neutral is ANY:
        return True
    if isinstance(neutral, str) and isinstance(value, str):
        return value.strip().lower() == neutral
    return value == neutral and type(value) is not str


def refuse_ignored(key: str, value: Any) -> ConfigError:
    """The error for an ignored key set to a value that would change training (names the key, value and fix)."""
    reason, neutral = IGNORED_KEYS[key]
    return ConfigError(f"{key} = {value!r}: {reason}. Remove {key} from the config or set it to {neutral!r}.")


def parse_network_args(args: tuple[str, ...]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Split kohya `network_args` ("conv_dim=4", "algo=loha", ...) into field values and the rest.

    Args:
        args: tuple[str, ...], the entries as written.
    Returns:
        ({field name: value text}, entries kept verbatim in `network_args`).
    Raises:
        ConfigError: for an entry without "=".
    """
    fields: dict[str, str] = {}
    rest: list[str] = []
    for entry in args:
        name, sep, value = entry.partition("=")
        if not sep:
            raise ConfigError(f"network_args: entry {entry!r} has no '='. Write entries as \"key=value\", "
                              "e.g. \"conv_dim=4\".")
        name = name.strip()
        if name in NETWORK_ARG_FIELDS:
            fields[NETWORK_ARG_FIELDS[name]] = value.strip()
        else:
            rest.append(entry.strip())
    return fields, tuple(rest)


def arg_name(field: str) -> str | None:
    """The network_args entry name of a field that kohya reads only from network_args (None otherwise)."""
    return None if field == "network_dropout" else _FIELD_TO_ARG.get(field)


def _arg_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_arg_text(item) for item in value)
    return repr(value) if isinstance(value, float) else str(value)


def format_network_args(network: NetworkConfig) -> list[str]:
    """The kohya `network_args` list of a NetworkConfig: parsed fields as "key=value", then the verbatim rest.

    Args:
        network: NetworkConfig.
    Returns:
        list[str] as kohya's train_network.py and LyCORIS read it.
    """
    lycoris = network.network_module == "lycoris.kohya"
    out: list[str] = []
    for arg, field in NETWORK_ARG_FIELDS.items():
        value = getattr(network, field)
        if value is None or (field == "block_lr_zero_threshold" and value == 0.0):
            continue
        if field == "algo" and value == "lora" and not lycoris:
            continue
        if field == "network_dropout" and not lycoris:
            continue  # a top-level key for networks.lora
        out.append(f"{arg}={_arg_text(value)}")
    return out + list(network.network_args)
