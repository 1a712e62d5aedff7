"""Coercion of TOML, CLI and UI values to the type of a config field (the annotation text in `FIELDS`)."""
from __future__ import annotations

import math
from typing import Any, Callable

from lora_trainer.config.schema import FIELDS, NUM_LR_BLOCKS
from lora_trainer.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the WebUI's usual interpreter)
    import tomli as tomllib

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: expected {expected}. Fix the value of {key} in the config.")


def parse_literal(text: str) -> Any:
    """A TOML literal (`true`, `1e-4`, `"a b"`, `["x=1"]`) from a string; the string itself when it is none.

    Args:
        text: str, e.g. the right side of a `--set key=value`.
    Returns:
        The parsed value, or `text` unchanged.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(key, value, "true or false")


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _fail(key, value, "a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return _to_int(key, float(value.strip().replace("_", "")))
        except ValueError:
            pass
    raise _fail(key, value, "a whole number")


def _to_float(key: str, value: Any) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
    elif isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            pass
    if number is None:
        raise _fail(key, value, "a number")
    if not math.isfinite(number):  # NaN or inf would turn every weight into NaN at the first step
        raise ConfigError(f"{key} = {value!r}: not a finite number. Use a plain number such as 1e-4.")
    return number


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _fail(key, value, "a string in quotes")


def _to_int_or_ratio(key: str, value: Any) -> int | float:
    number = _to_float(key, value)
    if number < 0:
        raise ConfigError(f"{key} = {value!r}: must not be negative. Use a step count, or a ratio below 1 "
                          "(0.05 = 5% of the total steps).")
    if number < 1 and not number.is_integer():
        return number
    if not number.is_integer():
        raise _fail(key, value, "a whole number of steps, or a ratio below 1")
    return int(number)


def _items(key: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = parse_literal(text)
            if isinstance(parsed, list):
                return parsed
            raise _fail(key, value, "a list like [1, 2, 3]")
        return [part for part in text.replace(",", " ").split() if part]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise _fail(key, value, "a list")


def _to_str_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and not value.strip().startswith("["):
        return tuple(value.split())  # "a=1 b=2": kohya's command-line form (values may hold commas)
    return tuple(_to_str(key, item) for item in _items(key, value))


def _to_resolution(key: str, value: Any) -> tuple[int, int]:
    parts = _items(key, value.replace("x", ",") if isinstance(value, str) else value)
    if len(parts) not in (1, 2):
        raise _fail(key, value, '"width,height" like "768,1024", or one number for a square')
    sizes = tuple(_to_int(key, part) for part in parts)
    return (sizes[0], sizes[-1])


def block_lr_preset(key: str, text: str, count: int = NUM_LR_BLOCKS) -> tuple[float, ...]:
    """Expand kohya's named block lr-weight curves ("sine", "cosine", "linear", "reverse_linear", "zeros",
    optionally "+<base>" like "sine+.25") into `count` weights, as kohya's networks/lora.py does.

    Args:
        key: str, the config key (for error messages).
        text: str, the preset name.
        count: int, number of blocks (12 for down/up).
    Returns:
        tuple[float, ...] of `count` weights.
    """
    name, _, base_text = text.strip().partition("+")
    base = _to_float(key, base_text) if base_text else 0.0
    steps = [i / (count - 1) for i in range(count)]
    curves = {
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * count,
    }
    if name not in curves:
        raise ConfigError(f"{key} = {text!r}: unknown block weight preset. Use one of {', '.join(curves)} "
                          f"(optionally '+0.25'), or {count} comma-separated numbers.")
    return tuple(weight + base for weight in curves[name])


def _to_lr_weights(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, str) and value.strip()[:1].isalpha():
        return block_lr_preset(key, value)
    return tuple(_to_float(key, item) for item in _items(key, value))


_COERCERS: dict[str, Callable[[str, Any], Any]] = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "str": _to_str,
    "int | float": _to_int_or_ratio,
    "tuple[int, int]": _to_resolution,
    "tuple[str, ...]": _to_str_tuple,
    "tuple[int, ...]": lambda key, value: tuple(_to_int(key, item) for item in _items(key, value)),
    "tuple[float, ...]": lambda key, value: tuple(_to_float(key, item) for item in _items(key, value)),
}
_BY_KEY: dict[str, Callable[[str, Any], Any]] = {"down_lr_weight": _to_lr_weights, "up_lr_weight": _to_lr_weights}


def coerce(key: str, value: Any) -> Any:
    """Convert `value` to the type of config field `key`; strings are parsed for every type.

    Args:
        key: str, a field name from `FIELDS`.
        value: a TOML value, or a string from the command line or UI.
    Returns:
        The value with the field's type (tuples for lists; None for an empty optional).
    Raises:
        ConfigError: naming the key and value when it cannot be converted.
    """
    return coerce_type(key, value, FIELDS[key].type, FIELDS[key].default)


def coerce_type(key: str, value: Any, type_text: str, default: Any = None) -> Any:
    """Convert `value` to a type named as in `FIELDS` ("int", "str | None", "tuple[int, int]", ...).

    Args:
        key: str, the key (for error messages and the per-key rules of lr weights).
        value: a TOML value, or a string.
        type_text: str, the annotation text.
        default: the key's default, named when a required value is missing.
    Returns:
        The converted value.
    Raises:
        ConfigError: naming the key and value when it cannot be converted.
    """
    optional = type_text.endswith(" | None")
    base = type_text.removesuffix(" | None")
    if value is None or (optional and isinstance(value, str) and value.strip() == ""):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required. Set {key} or remove it to use the default "
                          f"({default!r}).")
    if optional and base != "str" and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    return _BY_KEY.get(key, _COERCERS[base])(key, value)
