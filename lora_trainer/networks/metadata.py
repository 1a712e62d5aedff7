"""kohya's `ss_*` metadata (and optional `modelspec.*`) for a saved LoRA, every value a string.

Formats follow kohya-ss/sd-scripts `train_network.py`: scalars as `str(value)` ("True", "None", "0.0001"),
dicts as JSON. The config is read with getattr (flat, or sections such as `config.network.network_dim`); facts
that only the training run knows come in a `TrainingFacts`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .settings import parse_network_args, read_setting

_SECTIONS = ("model", "network", "optimizer", "dataset", "training", "save", "sample", "logging")
_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                   "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


@dataclass
class TrainingFacts:
    """What the run knows beyond the config. Dataset dicts use kohya's shapes:

    `dataset_dirs` {folder name: {"n_repeats": int, "img_count": int}}, `tag_frequency` {folder name: {tag: count}},
    `bucket_info` {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": float} or None.
    `datasets` is kohya's `ss_datasets` list when the run read a dataset config (None otherwise); then, as kohya,
    the per-dataset keys (resolution, batch size, buckets, flip, shuffle, keep_tokens, reg dirs) live only there.
    `optimizer` is kohya's `ss_optimizer` text (e.g. "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)"); when
    None it is made from the config's optimizer_type and optimizer_args.
    """

    session_id: int = 0
    training_started_at: float = field(default_factory=time.time)
    training_finished_at: float | None = None
    epoch: int = 0
    steps: int = 0
    num_epochs: int = 0
    max_train_steps: int = 0
    num_train_images: int = 0
    num_reg_images: int = 0
    num_batches_per_epoch: int = 0
    total_batch_size: int | None = None
    optimizer: str | None = None
    sd_model_name: str | None = None
    sd_model_hash: str | None = None
    new_sd_model_hash: str | None = None
    vae_name: str | None = None
    dataset_dirs: dict = field(default_factory=dict)
    reg_dataset_dirs: dict = field(default_factory=dict)
    tag_frequency: dict = field(default_factory=dict)
    bucket_info: dict | None = None
    datasets: list | None = None
    training_comment: str | None = None


def _get(config, key: str, default=None):
    """`config.key`, or `config.<section>.key` for the sections of our config tree, else default."""
    if config is None:
        return default
    if hasattr(config, key):
        value = getattr(config, key)
        return default if value is None else value
    for section in _SECTIONS:
        part = getattr(config, section, None)
        if part is not None and hasattr(part, key):
            value = getattr(part, key)
            return default if value is None else value
    return default


def base_model_version(architecture: str, v_parameterization: bool = False) -> str:
    """kohya's `ss_base_model_version`: "sd_v1", "sd_v2", "sd_v2_v" (also "sd_v1_v"), "sdxl_base_v1-0".

    Args:
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        v_parameterization (bool, optional): v-prediction; "sd2-v" implies it. Defaults to False.

    Returns:
        str: the version string.
    """
    if architecture not in _VERSIONS:
        raise ValueError(f"architecture {architecture!r}: unknown. Use one of {sorted(_VERSIONS)}.")
    version = _VERSIONS[architecture]
    if v_parameterization and architecture == "sd1":
        version += "_v"
    if v_parameterization and architecture == "sd2":
        version = "sd_v2_v"
    return version


def network_args_metadata(config) -> dict[str, str]:
    """The `ss_network_args` dict: kohya network_args as given, plus conv_dim/conv_alpha/algo/dropouts we hold."""
    net = config if hasattr(config, "network_dim") else getattr(config, "network", config)
    args = parse_network_args(getattr(net, "network_args", None))
    keys = ["conv_dim", "conv_alpha", "rank_dropout", "module_dropout"]
    if _network_module(config) != "networks.lora":
        keys.append("algo")  # LyCORIS reads algo from network_args; kohya's networks.lora has none
    for key in keys:
        value = read_setting(net, key)
        if value is not None:
            args[key] = str(value)
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                "down_lr_weight", "mid_lr_weight", "up_lr_weight"):
        value = read_setting(net, key)
        if value is not None and value != []:
            args[key] = value if isinstance(value, str) else ",".join(str(v) for v in _as_list(value))
    return args


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _network_module(config) -> str:
    module = _get(config, "network_module")
    algo = str(read_setting(getattr(config, "network", config), "algo", "lora")).lower()
    if module:
        return module
    return "lycoris.kohya" if algo in ("loha", "lokr") else "networks.lora"


def _optimizer_text(config, facts: TrainingFacts) -> str:
    if facts.optimizer:
        return facts.optimizer
    args = _get(config, "optimizer_args", []) or []
    text = ",".join(str(a) for a in args)
    return str(_get(config, "optimizer_type", "AdamW")) + (f"({text})" if text else "")


def _training_keys(config, facts: TrainingFacts) -> dict:
    return {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": _get(config, "output_name"),
        "ss_learning_rate": _get(config, "learning_rate"),
        "ss_text_encoder_lr": _get(config, "text_encoder_lr"),
        "ss_unet_lr": _get(config, "unet_lr"),
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": bool(_get(config, "gradient_checkpointing", False)),
        "ss_gradient_accumulation_steps": _get(config, "gradient_accumulation_steps", 1),
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": _get(config, "lr_warmup_steps", 0),
        "ss_lr_scheduler": _get(config, "lr_scheduler", "constant"),
        "ss_optimizer": _optimizer_text(config, facts),
        "ss_max_grad_norm": _get(config, "max_grad_norm"),
        "ss_mixed_precision": _get(config, "mixed_precision", "no"),
        "ss_full_fp16": bool(_get(config, "full_fp16", False)),
        "ss_seed": _get(config, "seed"),
        "ss_lowram": bool(_get(config, "lowram", False)),
        "ss_noise_offset": _get(config, "noise_offset"),
        "ss_multires_noise_iterations": _get(config, "multires_noise_iterations"),
        "ss_multires_noise_discount": _get(config, "multires_noise_discount"),
        "ss_min_snr_gamma": _get(config, "min_snr_gamma"),
        "ss_debiased_estimation": bool(_get(config, "debiased_estimation_loss", False)),
        "ss_training_comment": facts.training_comment,
        "ss_epoch": facts.epoch,
        "ss_steps": facts.steps,
        "ss_training_finished_at": facts.training_finished_at if facts.training_finished_at else time.time(),
    }


def _dataset_keys(config, facts: TrainingFacts) -> dict:
    resolution = _get(config, "resolution", (512, 512))
    if isinstance(resolution, (int, float)):
        resolution = (int(resolution), int(resolution))
    if facts.datasets is not None:
        return _shared_dataset_keys(config) | {
            "ss_datasets": json.dumps(facts.datasets),
            "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
            "ss_tag_frequency": json.dumps(facts.tag_frequency),
        }
    return _shared_dataset_keys(config) | {
        "ss_batch_size_per_device": _get(config, "train_batch_size", 1),
        "ss_total_batch_size": facts.total_batch_size or _get(config, "train_batch_size", 1),
        "ss_resolution": str(tuple(resolution)),
        "ss_shuffle_caption": bool(_get(config, "shuffle_caption", False)),
        "ss_keep_tokens": _get(config, "keep_tokens", 0),
        "ss_flip_aug": bool(_get(config, "flip_aug", False)),
        "ss_random_crop": bool(_get(config, "random_crop", False)),
        "ss_enable_bucket": bool(_get(config, "enable_bucket", False)),
        "ss_bucket_no_upscale": bool(_get(config, "bucket_no_upscale", False)),
        "ss_min_bucket_reso": _get(config, "min_bucket_reso"),
        "ss_max_bucket_reso": _get(config, "max_bucket_reso"),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_bucket_info": json.dumps(facts.bucket_info),
    }


def _shared_dataset_keys(config) -> dict:
    """Dataset keys kohya writes for every run (with or without a dataset config)."""
    return {
        "ss_clip_skip": _get(config, "clip_skip"),
        "ss_max_token_length": _get(config, "max_token_length"),
        "ss_cache_latents": bool(_get(config, "cache_latents", False)),
        "ss_caption_dropout_rate": _get(config, "caption_dropout_rate", 0.0),
        "ss_caption_dropout_every_n_epochs": _get(config, "caption_dropout_every_n_epochs", 0),
        "ss_caption_tag_dropout_rate": _get(config, "caption_tag_dropout_rate", 0.0),
        "ss_prior_loss_weight": _get(config, "prior_loss_weight", 1.0),
    }


def _modelspec(config, facts: TrainingFacts, architecture: str, v_param: bool) -> dict:
    resolution = _get(config, "resolution", (512, 512))
    width, height = (resolution, resolution) if isinstance(resolution, (int, float)) else tuple(resolution)[:2]
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_MODELSPEC_ARCH[architecture]}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if architecture == "sdxl"
                                     else "diffusers"),
        "modelspec.title": _get(config, "output_name") or "LoRA",
        "modelspec.resolution": f"{int(width)}x{int(height)}",
        "modelspec.prediction_type": "v" if v_param else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(facts.training_started_at)),
    }


def build_metadata(config, facts: TrainingFacts, architecture: str, modelspec: bool = True) -> dict[str, str]:
    """All `ss_*` keys kohya writes for a LoRA, as strings.

    Args:
        config: the training config (kohya key names; flat or in sections), read with getattr.
        facts (TrainingFacts): run facts (epoch, steps, dataset folders, tag frequency, buckets, model names).
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        modelspec (bool, optional): also write `modelspec.*` keys, defaults to True.

    Returns:
        dict[str, str]: the metadata.
    """
    v_param = architecture == "sd2-v" or bool(_get(config, "v_parameterization", False))
    meta = {
        "ss_network_module": _network_module(config),
        "ss_network_dim": _get(config, "network_dim", 4),
        "ss_network_alpha": _get(config, "network_alpha", 1.0),
        "ss_network_dropout": _get(config, "network_dropout"),
        "ss_v2": architecture in ("sd2", "sd2-v"),
        "ss_base_model_version": base_model_version(architecture, v_param),
        "ss_sd_model_name": facts.sd_model_name,
    }
    args = network_args_metadata(config)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    meta.update(_training_keys(config, facts))
    meta.update(_dataset_keys(config, facts))
    for key, value in (("ss_sd_model_hash", facts.sd_model_hash), ("ss_new_sd_model_hash", facts.new_sd_model_hash),
                       ("ss_vae_name", facts.vae_name)):
        if value:
            meta[key] = value
    out = {key: str(value) for key, value in meta.items()}
    if modelspec:
        out.update(_modelspec(config, facts, architecture, v_param))
    return out
