"""What the Train panel shows, without gradio: its form fields, form values <-> TrainConfig, kohya TOML text, and
a `JobStatus` as text and loss rows. The panel (`train_panel.py`) only lays these out and wires them.
"""
from __future__ import annotations

import math
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer.config import (
    EMA_DEVICES, MAX_TOKEN_LENGTHS, MIXED_PRECISIONS, NETWORK_ALGOS, OPTIMIZERS, SAVE_PRECISIONS, SCHEDULERS,
    VERSION_KEY, TrainConfig, config_from_dict, field_values, preset_config, to_kohya_dict,
)
from lora_trainer.errors import ConfigError
from lora_trainer.ui.train_plots import loss_rows, sample_caption, sample_gallery

NO_PRESET = "(defaults)"


@dataclass(frozen=True)
class FormField:
    """One input of the Train panel.

    Attributes:
        key (str): the kohya config key it sets.
        kind (str): "text" (empty = unset), "int", "float", "bool", "choice", "lines" (prompts) or "args"
            (kohya "key=value" entries separated by spaces or lines).
        label (str): shown above the input.
        group (str): "basic", "network", "optimizer", "steps", "model", or an advanced group.
        choices (tuple, optional): for "choice".
    """

    key: str
    kind: str
    label: str
    group: str
    choices: tuple = ()


def _f(key: str, kind: str, label: str, group: str, choices: tuple = ()) -> FormField:
    return FormField(key, kind, label, group, tuple(choices))


FORM: tuple[FormField, ...] = (
    _f("pretrained_model_name_or_path", "text", "Checkpoint (.safetensors / .ckpt)", "model"),
    _f("output_name", "text", "Output name", "basic"),
    _f("output_dir", "text", "Output folder (empty: the LoRA folder)", "basic"),
    _f("algo", "choice", "Network type", "network", NETWORK_ALGOS),
    _f("network_dim", "int", "Network dim (rank)", "network"),
    _f("network_alpha", "float", "Network alpha", "network"),
    _f("conv_dim", "text", "Conv dim (empty: no conv layers)", "network"),
    _f("conv_alpha", "text", "Conv alpha", "network"),
    _f("network_args", "args", "Network args (key=value ..., e.g. factor=8 for LoKr)", "network"),
    _f("network_weights", "text", "Start from LoRA weights (.safetensors; empty: new)", "network"),
    _f("optimizer_type", "choice", "Optimizer", "optimizer", OPTIMIZERS),
    _f("learning_rate", "float", "Learning rate", "optimizer"),
    _f("unet_lr", "text", "UNet lr (empty: learning rate)", "optimizer"),
    _f("text_encoder_lr", "text", "Text encoder lr (empty: learning rate)", "optimizer"),
    _f("lr_scheduler", "choice", "LR scheduler", "optimizer", SCHEDULERS),
    _f("lr_warmup_steps", "text", "Warmup steps (or ratio < 1)", "optimizer"),
    _f("optimizer_args", "args", "Optimizer args (key=value ..., e.g. weight_decay=0.01)", "optimizer"),
    _f("max_train_epochs", "text", "Epochs (empty: use steps)", "steps"),
    _f("max_train_steps", "int", "Max steps", "steps"),
    _f("train_batch_size", "int", "Batch size", "steps"),
    _f("resolution", "text", "Resolution (512 or width,height)", "steps"),
    _f("seed", "text", "Seed (empty: random)", "steps"),
    _f("reg_data_dir", "text", "Regularization folder (empty: none)", "Dataset files"),
    _f("dataset_config", "text", "kohya dataset config .toml (its subsets replace the dataset folder)",
       "Dataset files"),
    _f("enable_bucket", "bool", "Aspect-ratio buckets", "Buckets"),
    _f("min_bucket_reso", "int", "Min bucket resolution", "Buckets"),
    _f("max_bucket_reso", "int", "Max bucket resolution", "Buckets"),
    _f("bucket_reso_steps", "int", "Bucket step", "Buckets"),
    _f("bucket_no_upscale", "bool", "No upscale", "Buckets"),
    _f("caption_extension", "text", "Caption extension", "Captions"),
    _f("shuffle_caption", "bool", "Shuffle caption", "Captions"),
    _f("keep_tokens", "int", "Keep tokens", "Captions"),
    _f("caption_tag_dropout_rate", "float", "Tag dropout rate", "Captions"),
    _f("caption_dropout_rate", "float", "Caption dropout rate", "Captions"),
    _f("flip_aug", "bool", "Flip augmentation", "Captions"),
    _f("noise_offset", "float", "Noise offset", "Noise and loss"),
    _f("multires_noise_iterations", "int", "Multires noise iterations", "Noise and loss"),
    _f("multires_noise_discount", "float", "Multires noise discount", "Noise and loss"),
    _f("min_snr_gamma", "text", "Min-SNR gamma (empty: off)", "Noise and loss"),
    _f("validation_split", "float", "Held-out share of each concept folder (0: no validation)", "Validation"),
    _f("validation_seed", "text", "Validation seed (empty: the run's seed)", "Validation"),
    _f("validate_every_n_steps", "text", "Validate every N steps", "Validation"),
    _f("validate_every_n_epochs", "text", "Validate every N epochs (empty: every epoch)", "Validation"),
    _f("max_validation_steps", "text", "Held-out images per validation (empty: all)", "Validation"),
    _f("mixed_precision", "choice", "Mixed precision", "Precision and memory", MIXED_PRECISIONS),
    _f("save_precision", "choice", "Save precision", "Precision and memory", SAVE_PRECISIONS),
    _f("gradient_checkpointing", "bool", "Gradient checkpointing", "Precision and memory"),
    _f("gradient_accumulation_steps", "int", "Gradient accumulation steps", "Precision and memory"),
    _f("cache_latents", "bool", "Cache latents", "Precision and memory"),
    _f("network_train_unet_only", "bool", "Train UNet only", "Precision and memory"),
    _f("clip_skip", "int", "Clip skip", "Text encoder"),
    _f("max_token_length", "choice", "Max token length", "Text encoder", tuple(str(n) for n in MAX_TOKEN_LENGTHS)),
    _f("save_every_n_epochs", "text", "Save every N epochs", "Saving and samples"),
    _f("save_every_n_steps", "text", "Save every N steps", "Saving and samples"),
    _f("save_state", "bool", "Save resume state", "Saving and samples"),
    _f("sample_every_n_steps", "text", "Sample every N steps", "Saving and samples"),
    _f("sample_every_n_epochs", "text", "Sample every N epochs", "Saving and samples"),
    _f("sample_prompts", "lines", "Sample prompts (one a line, kohya --w --h --s --d options; or a .txt file)",
       "Saving and samples"),
    _f("ema", "bool", "Keep an EMA of the LoRA weights (saved as <name>-ema.safetensors)", "EMA"),
    _f("ema_decay", "float", "EMA decay (0.999: about the last 1000 updates)", "EMA"),
    _f("ema_warmup", "bool", "EMA warm-up: decay min(decay, (1+n)/(10+n)) at update n", "EMA"),
    _f("ema_update_every", "int", "Update the EMA every N steps", "EMA"),
    _f("ema_device", "choice", "EMA device (same: the training device)", "EMA", EMA_DEVICES),
    _f("v_parameterization", "bool", "v-parameterization (SD2 768-v; also set by the checkpoint's .yaml)",
       "Model files"),
    _f("diffusers_config_dir", "text", "Diffusers config folder (empty: sizes from the checkpoint and its .yaml)",
       "Model files"),
    _f("tokenizer_dir", "text", "Tokenizer folder (empty: built in)", "Model files"),
)
FORM_KEYS: tuple[str, ...] = tuple(f.key for f in FORM)
BASIC_GROUPS = ("model", "basic", "network", "optimizer", "steps")
ADVANCED_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(f.group for f in FORM if f.group not in BASIC_GROUPS))


def preset_choices() -> list[str]:
    """The preset dropdown's choices: defaults first, then `PRESETS`."""
    from lora_trainer.config import PRESETS

    return [NO_PRESET, *PRESETS]


def base_config(preset: str | None) -> TrainConfig:
    """The config a preset starts from.

    Args:
        preset (str, optional): a `PRESETS` name, or NO_PRESET/None for the defaults.

    Returns:
        TrainConfig: the preset's config.
    """
    return TrainConfig() if not preset or preset == NO_PRESET else preset_config(preset)


def _shown(field: FormField, value: Any) -> Any:
    if field.kind == "args":
        return " ".join(value or ())
    if field.kind == "bool":
        return bool(value)
    if field.kind in ("int", "float"):
        return value
    if value is None:
        return "" if field.kind != "choice" else (field.choices[0] if field.choices else "")
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and field.kind == "text":
        return f"{value:g}"
    return str(value)


def config_to_form(config: TrainConfig) -> list:
    """The form's values for `config`, in FORM order.

    Args:
        config (TrainConfig): the config to show.

    Returns:
        list: one value per FORM field (text for "text"/"choice", numbers, booleans).
    """
    values = field_values(config)
    return [_shown(field, values[field.key]) for field in FORM]


def prompts_folder() -> Path:
    """Where `prompts_file` writes prompt lines (in the temp folder).

    Returns:
        Path: the folder (it may not exist yet).
    """
    return Path(tempfile.gettempdir()) / "lora_trainer_prompts"


def prompts_file(text: str) -> str:
    """`sample_prompts` as a file path: a path (an existing file, or one line ending in .txt) is kept, prompt lines are written to a file named by
    their content hash in the temp folder (kohya reads prompts from a file).

    Args:
        text (str): a path, or prompt lines.

    Returns:
        str: the prompt file's path.
    """
    import hashlib
    import os

    text = text.strip()
    if "\n" not in text and (text.lower().endswith(".txt") or os.path.isfile(text)):
        return text
    folder = prompts_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}.txt"
    if not path.is_file():
        path.write_text(text + "\n", encoding="utf-8")
    return str(path)


def _parsed(field: FormField, value: Any) -> Any:
    if field.kind == "args":  # kohya values hold commas ("betas=0.9,0.99"), never spaces
        return ("" if value is None else str(value)).split()
    if field.kind == "lines":
        text = "" if value is None else str(value).strip()
        return prompts_file(text) if text else None
    if field.kind == "text":
        text = "" if value is None else str(value).strip()
        return text or None
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if field.kind == "choice" and field.key == "max_token_length":
        return int(value)
    return value


def form_to_config(base: TrainConfig | None, dataset_dir: str, form: list) -> TrainConfig:
    """Build the run's config: the base config's keys (preset or imported TOML), then the form's values.

    Args:
        base (TrainConfig, optional): what the form was filled from (keys the form does not show are kept).
        dataset_dir (str): the dataset folder (train_data_dir).
        form (list): one value per FORM field.

    Returns:
        TrainConfig: validated.

    Raises:
        ConfigError: a value is invalid (the message names the key and the fix).
    """
    base = base or TrainConfig()
    data = {key: value for key, value in field_values(base).items() if value is not None}
    data["network_args"] = list(base.network.network_args)
    for field, value in zip(FORM, form):
        data[field.key] = _parsed(field, value)
    # a kohya dataset config names its own folders (the label says so): the dataset folder is then not sent
    data["train_data_dir"] = None if data.get("dataset_config") else (dataset_dir or "").strip() or None
    lycoris = base.network.network_module == "lycoris.kohya"
    data["network_module"] = "lycoris.kohya" if data["algo"] in ("loha", "lokr") or (lycoris and data["algo"] != "lora") \
        else "networks.lora"
    data = {key: value for key, value in data.items() if value is not None}
    return config_from_dict(data).config


def toml_text(config: TrainConfig) -> str:
    """The config as kohya TOML text (flat keys + `lora_trainer_version`), as `save_toml` would store it.

    Args:
        config (TrainConfig): the config.

    Returns:
        str: TOML text that `config_from_text` reads back to an equal config.
    """
    import tomli_w

    from lora_trainer import __version__

    return tomli_w.dumps({**to_kohya_dict(config), VERSION_KEY: __version__})


def config_from_text(text: str, source: str = "TOML text") -> tuple[TrainConfig, list[str]]:
    """Read kohya TOML text (flat or sectioned).

    Args:
        text (str): the TOML.
        source (str, optional): what to call it in messages, defaults to "TOML text".

    Returns:
        tuple: (TrainConfig, notes about unknown and ignored keys and other warnings).

    Raises:
        ConfigError: the TOML cannot be parsed, or a value is invalid.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc}). Fix the line it names.") from exc
    data.pop(VERSION_KEY, None)
    loaded = config_from_dict(data)
    notes = [f"unknown key {key!r} ignored" for key in loaded.unknown_keys]
    notes += [f"{key}: {reason}" for key, reason in loaded.ignored_keys.items()]
    notes += list(loaded.warnings)
    return loaded.config, notes


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _validation_line(status) -> list[str]:
    finite = [(step, loss) for step, loss in getattr(status, "validation_losses", []) if math.isfinite(loss)]
    if not finite:
        return []
    best_step, best = min(finite, key=lambda point: point[1])
    step, loss = finite[-1]
    return ["", f"validation loss {loss:.4f} at step {step} (lowest {best:.4f} at step {best_step})"]


def status_markdown(status) -> str:
    """A `JobStatus` as Markdown: state, step/total, epoch, loss, lr, it/s, ETA, message, files.

    Args:
        status (JobStatus): the snapshot.

    Returns:
        str: Markdown.
    """
    state = status.state.value
    if state == "idle":
        return "**idle**: pick a preset, set the dataset folder, press Start."
    head = (f"**{state}** | step {status.step}/{status.total_steps} | epoch {status.epoch}/{status.total_epochs} | "
            f"loss {_number(status.loss, '.4f')} (avg {_number(status.avg_loss, '.4f')}) | "
            f"lr {_number(status.lr, '.2e')} | {_number(status.it_per_s, '.2f')} it/s | ETA {_duration(status.eta_s)}")
    if state == "failed":
        return f"{head}\n\n**Error:** {status.message}"
    lines = [head, "", status.message]
    plan = getattr(status, "plan", "")
    if plan and plan not in status.message:
        lines += ["", plan]
    lines += _validation_line(status)
    if status.lora_path:
        lines += ["", f"LoRA: `{status.lora_path}`"]
    elif status.saved:
        lines += ["", f"last saved: `{status.saved[-1]}`"]
    return "\n".join(lines)


__all__ = [
    "ADVANCED_GROUPS", "BASIC_GROUPS", "FORM", "FORM_KEYS", "NO_PRESET", "FormField", "base_config",
    "config_from_text", "config_to_form", "form_to_config", "loss_rows", "preset_choices", "prompts_file",
    "prompts_folder", "sample_caption", "sample_gallery", "status_markdown",
    "toml_text",
]
