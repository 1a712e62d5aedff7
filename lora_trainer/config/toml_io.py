"""kohya TOML in and out: load (flat or sectioned), dict conversion, atomic save, `key=value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from lora_trainer.config import kohya_keys as kk
from lora_trainer.config.schema import FIELDS, SECTIONS, LoadedConfig, TrainConfig
from lora_trainer.config.validate import normalize, validate
from lora_trainer.config.values import coerce, parse_literal, tomllib
from lora_trainer.errors import ConfigError
from lora_trainer.atomic_io import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Collected:
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


def load_toml(path: str | os.PathLike) -> LoadedConfig:
    """Read a kohya-style TOML (flat, or sectioned like `[model_arguments]`, whose sections are flattened).

    Args:
        path: str or PathLike, the .toml file.
    Returns:
        LoadedConfig(config, unknown_keys, ignored_keys {key: reason}, warnings).
    Raises:
        FileNotFoundError: when the file does not exist.
        ConfigError: for TOML syntax errors and invalid values (naming the file, key and fix).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found. Check the path.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML ({error}). Fix the syntax (strings need quotes, Windows paths "
                          "use / or single quotes).") from error
    try:
        loaded = config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    for name in loaded.unknown_keys:
        log.warning("%s: unknown key %r is not used (check its spelling)", path, name)
    return loaded


def _flatten(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    flat: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            if name in flat and flat[name] != item:
                warnings.append(f"{name}: set more than once ({flat[name]!r}, then {item!r}); the last one is used.")
            flat[name] = item
    if isinstance(data.get("sdxl_arguments"), dict) and "sdxl" not in flat:
        flat["sdxl"] = True  # kohya's sdxl_train_network.py configs carry this section
        warnings.append("sdxl: set to true because the file has an [sdxl_arguments] section.")
    return flat, warnings


def config_from_dict(data: Mapping[str, Any]) -> LoadedConfig:
    """Build a validated config from kohya keys (a parsed TOML, a UI form).

    Args:
        data: mapping of kohya key -> value, flat or with kohya sections (`{"model_arguments": {...}}`, which
            are flattened); unset keys take the defaults.
    Returns:
        LoadedConfig; unknown keys are listed by name, never dropped silently.
    Raises:
        ConfigError: for invalid values or ignored keys set to a value that would change training.
    """
    flat, warnings = _flatten(data)
    got = _Collected(warnings=warnings)
    for key, value in flat.items():
        _collect(key, value, got)
    if "network_args" in got.values:
        _split_network_args(got)
    config, warnings = _build(got.values)
    return LoadedConfig(config, got.unknown, got.ignored, got.warnings + warnings)


def _collect(key: str, value: Any, got: _Collected) -> None:
    if key in kk.ALIASES:
        got.warnings.append(f"{key}: old spelling of {kk.ALIASES[key]}; rename it.")
        key = kk.ALIASES[key]
    if key == kk.VERSION_KEY:
        return
    if key in FIELDS:
        got.values[key] = value
        if key in kk.UNUSED_FIELDS:
            got.ignored[key] = kk.UNUSED_FIELDS[key]
    elif key in kk.IGNORED_KEYS:
        if not kk.is_neutral(key, value):
            raise kk.refuse_ignored(key, value)
        got.ignored[key] = kk.IGNORED_KEYS[key][0]
        if key == "model_train_type":
            _model_train_type(value, got)
    elif isinstance(value, dict):
        got.unknown.append(key)
        got.warnings.append(f"{key}: nested table is not read; put its keys at the top level or in one section.")
    else:
        got.unknown.append(key)


def _model_train_type(value: Any, got: _Collected) -> None:
    text = str(value).strip().lower()
    if text not in ("sd-lora", "sdxl-lora"):
        raise ConfigError(f"model_train_type = {value!r}: only LoRA training of SD1/SD2/SDXL is supported. "
                          "Use \"sd-lora\" or \"sdxl-lora\".")
    if text == "sdxl-lora" and "sdxl" not in got.values:
        got.values["sdxl"] = True


def _split_network_args(got: _Collected) -> None:
    args = coerce("network_args", got.values["network_args"])
    parsed, rest = kk.parse_network_args(args)
    for field, text in parsed.items():
        new = coerce(field, text)
        if field in got.values and coerce(field, got.values[field]) != new:
            got.warnings.append(f"{field}: {got.values[field]!r} is replaced by network_args "
                                f"\"{kk.arg_name(field) or 'dropout'}={text}\" (kohya/LyCORIS read the latter).")
        got.values[field] = new
    read = kk.NETWORK_ARGS_READ.get(str(got.values.get("algo", "")).lower(), ())
    for entry in rest:
        name = entry.partition("=")[0].strip()
        if name not in read:
            got.ignored[f"network_args.{name}"] = "network argument not used by lora_trainer; kept in network_args"
    got.values["network_args"] = rest


def _build(values: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    coerced = {key: coerce(key, value) for key, value in values.items()}
    warnings = normalize(coerced)
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in coerced.items():
        sections[FIELDS[key].section][key] = value
    kinds = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{name: kinds[name](**fields) for name, fields in sections.items()})
    return config, warnings + validate(config)


def field_values(config: TrainConfig) -> dict[str, Any]:
    """Every field of `config` as one flat dict.

    Args:
        config: TrainConfig.
    Returns:
        dict of field name (kohya key) -> value; `network_args` holds only the entries not parsed into fields.
    """
    return {key: getattr(getattr(config, spec.section), key) for key, spec in FIELDS.items()}


def update_config(config: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """A copy of `config` with some fields changed, coerced and validated like a loaded TOML.

    Args:
        config: TrainConfig to start from.
        values: mapping of field name (or "section.field") -> value; a string is parsed for the field's type.
            Setting `network_args` parses its "key=value" entries into the network fields.
    Returns:
        The new TrainConfig.
    Raises:
        ConfigError: for an unknown key (with the closest names) or an invalid value.
    """
    current = field_values(config)
    got = _Collected(values={k: v for k, v in current.items() if v is not None})
    for raw_key, value in values.items():
        key = _field_name(raw_key)
        got.values[key] = value
    if "network_args" in values:
        _split_network_args(got)
    new, warnings = _build(got.values)
    for warning in warnings:
        log.warning("%s", warning)
    return new


def _field_name(raw_key: str) -> str:
    section, _, key = raw_key.strip().rpartition(".")
    if key in FIELDS and section in ("", FIELDS[key].section):
        return key
    if key in kk.IGNORED_KEYS:
        raise ConfigError(f"{raw_key}: accepted in kohya configs but has no effect here "
                          f"({kk.IGNORED_KEYS[key][0]}). Remove it.")
    close = difflib.get_close_matches(key, list(FIELDS), n=3)
    hint = f"Did you mean {', '.join(close)}?" if close else "See docs/ARCHITECTURE.md (Config) for the keys."
    raise ConfigError(f"{raw_key}: unknown config key. {hint}")


def apply_overrides(config: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Apply command-line `--set key=value` overrides.

    Args:
        config: TrainConfig.
        overrides: iterable of "key=value" strings; the value is read for the field's type ("768,1024",
            "true", "1e-4", '["conv_dim=4", "algo=loha"]', "none" for an optional value).
    Returns:
        The new TrainConfig.
    Raises:
        ConfigError: for a malformed override, an unknown key or an invalid value.
    """
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. network_dim=16. Fix the override.")
        text = text.strip()
        values[key.strip()] = parse_literal(text) if text[:1] in "\"'[" else text
    return update_config(config, values) if values else config


def _toml_value(key: str, value: Any) -> Any:
    if key == "resolution":
        return f"{value[0]},{value[1]}"
    return list(value) if isinstance(value, tuple) else value


def to_kohya_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as flat kohya keys, TOML-ready (None values left out, network fields inside network_args).

    Args:
        config: TrainConfig.
    Returns:
        dict of kohya key -> str/int/float/bool/list value.
    """
    out: dict[str, Any] = {}
    for key, value in field_values(config).items():
        if value is None or kk.arg_name(key) or key == "network_args":
            continue
        if key in kk.UNUSED_FIELDS and value == FIELDS[key].default:
            continue  # no effect here; keep saved files free of notes on reload
        out[key] = _toml_value(key, value)
    args = config.network.kohya_network_args()
    if args:
        out["network_args"] = args
    return out


def save_toml(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the config as sectioned kohya TOML (+ `lora_trainer_version`) atomically (temp file + rename).

    Args:
        config: TrainConfig.
        path: str or PathLike of the .toml to write; parent folders are created.
    Returns:
        Path written. `load_toml` of it gives back an equal config.
    """
    import tomli_w

    from lora_trainer import __version__

    path = Path(path)
    flat = to_kohya_dict(config)
    document: dict[str, Any] = {kk.VERSION_KEY: __version__}
    for key, value in flat.items():
        section = kk.SECTION_NAMES[FIELDS[key].section]
        document.setdefault(section, {})[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tomli_w.dumps(document).encode("utf-8"))
    return path
