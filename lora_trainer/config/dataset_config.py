"""kohya's dataset config (`dataset_config`): a TOML of `[general]`, `[[datasets]]` and `[[datasets.subsets]]`.

Every setting is looked up as kohya's `config_util.py` does: the subset's table, then its dataset's table, then
`[general]`, then the training config (`train_batch_size` stands for `batch_size`), then the default. Dataset keys
(resolution, batch size, buckets) may be set in `[general]` and `[[datasets]]`; `image_dir` and `is_reg` only in
a subset; every subset key at every level. Keys kohya reads that we do not use are listed with the reason (and
refused when their value would change training); keys nobody knows are listed by name.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lora_trainer.config.kohya_keys import ANY
from lora_trainer.config.schema import FIELDS, DatasetConfig
from lora_trainer.config.validate import LIMITS, MAX_SIDE
from lora_trainer.config.values import coerce_type, tomllib
from lora_trainer.errors import ConfigError

# key -> type text (as in schema.FIELDS). Subset keys may be set at every level; image_dir/is_reg only in a subset.
SUBSET_KEYS: dict[str, str] = {
    "image_dir": "str", "num_repeats": "int", "is_reg": "bool", "class_tokens": "str | None",
    "caption_extension": "str", "shuffle_caption": "bool", "keep_tokens": "int", "keep_tokens_separator": "str",
    "secondary_separator": "str | None", "enable_wildcard": "bool", "caption_prefix": "str | None",
    "caption_suffix": "str | None", "caption_dropout_rate": "float", "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "float", "flip_aug": "bool", "random_crop": "bool",
}
SUBSET_ONLY = ("image_dir", "is_reg")
DATASET_KEYS: dict[str, str] = {
    "resolution": "tuple[int, int]", "batch_size": "int", "enable_bucket": "bool", "min_bucket_reso": "int",
    "max_bucket_reso": "int", "bucket_reso_steps": "int", "bucket_no_upscale": "bool",
    "validation_split": "float | None", "validation_seed": "int | None",
}
# kohya keys read but not used here: key -> (reason, the value that changes nothing; ANY = every value, None = none)
UNUSED_KEYS: dict[str, tuple[str, Any]] = {
    "color_aug": ("color augmentation is not supported", False),
    "face_crop_aug_range": ("face crop augmentation is not supported", None),
    "token_warmup_min": ("token warm-up is not supported", 1),
    "token_warmup_step": ("token warm-up is not supported", 0),
    "alpha_mask": ("alpha masks are not supported", False),
    "network_multiplier": ("the LoRA is trained at multiplier 1", 1),
    "caption_separator": ("tags are separated by commas", ","),
    "resize_interpolation": ("images are resized with Lanczos", ANY),
    "cache_info": ("image sizes are read on every scan", ANY),
    "custom_attributes": ("only custom dataset classes read them", ANY),
    "debug_dataset": ("dataset debugging mode is not supported; use the Dataset panel", False),
}
# kohya subset kinds we do not train: key -> why and what to do instead
REFUSED_KEYS: dict[str, str] = {
    "metadata_file": ("fine-tuning subsets (captions from a metadata JSON) are not supported. Give the subset an "
                      "image_dir with caption files beside the images instead"),
    "conditioning_data_dir": "ControlNet datasets are not supported. Remove the subset, this trainer trains LoRAs",
}
_DEFAULTS = {"num_repeats": 1, "is_reg": False, "class_tokens": None, "secondary_separator": None,
             "enable_wildcard": True}  # wildcards are expanded everywhere else too


@dataclass(frozen=True)
class SubsetSpec:
    """One subset with every setting resolved; caption keys are named as `CaptionOptions` reads them.

    Attributes:
        image_dir (str): absolute folder of the images (and caption files).
        num_repeats (int): times each image is used per epoch.
        is_reg (bool): regularisation images.
        class_tokens (str, optional): the caption of images without a caption file.
        dataset (int): index of the dataset it belongs to.
        The other attributes are kohya's caption and augmentation keys of the same names.
    """

    image_dir: str
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = True
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False
    dataset: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its own resolution, batch size and buckets, and its subsets.

    Attributes:
        resolution (tuple[int, int]): (width, height).
        batch_size (int): samples per batch (kohya's dataset key; `train_batch_size` is the same value).
        enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale: kohya's bucket keys.
        validation_split (float, optional): share of each of its concept folders held out; None: the run's.
        validation_seed (int, optional): the seed choosing them; None: the run's.
        subsets (tuple[SubsetSpec, ...]): in file order.
    """

    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float | None = None
    validation_seed: int | None = None
    subsets: tuple[SubsetSpec, ...] = ()

    @property
    def train_batch_size(self) -> int:
        return self.batch_size


@dataclass(frozen=True)
class DatasetDescription:
    """What `read_dataset_config` found.

    Attributes:
        path (str): the dataset config file.
        datasets (tuple[DatasetSpec, ...]): in file order.
        ignored_keys (dict[str, str]): "<table> <key>" -> why it has no effect here.
        unknown_keys (list[str]): "<table> <key>" of keys that are not kohya dataset keys.
        warnings (list[str]): notes for the user (unknown keys with a hint).
    """

    path: str
    datasets: tuple[DatasetSpec, ...]
    ignored_keys: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def subsets(self) -> list[SubsetSpec]:
        """Every subset, dataset by dataset (indexes match `ImageItem.subset`)."""
        return [subset for dataset in self.datasets for subset in dataset.subsets]


@dataclass
class _Reader:
    path: Path
    ignored: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {message}")


def read_dataset_config(path: str | os.PathLike, fallback: DatasetConfig | None = None) -> DatasetDescription:
    """Read a kohya dataset config (TOML, or JSON as kohya also reads) into resolved datasets and subsets.

    Args:
        path: str or PathLike, the file. Relative `image_dir`s are found beside the file, else from the current
            folder (kohya's meaning).
        fallback: DatasetConfig, the training config's dataset keys, used where no table sets a key; defaults
            to DatasetConfig().
    Returns:
        DatasetDescription.
    Raises:
        FileNotFoundError: the file or a subset's image_dir does not exist.
        ConfigError: bad syntax, a value of the wrong type or range, a key at the wrong level, a fine-tuning or
            ControlNet subset, or a key we do not use set to a value that would change training; the message
            names the file, the table and the key, and the fix.
    """
    reader = _Reader(Path(path))
    data = _load(reader.path)
    base = _fallback_values(fallback or DatasetConfig())
    for key in data:
        if key not in ("general", "datasets"):
            _unknown(reader, "top level", key)
    general = _table(reader, data.get("general", {}), "[general]", "general")
    tables = data.get("datasets")
    if not isinstance(tables, list) or not tables:
        raise reader.fail("[[datasets]]", "no dataset. Add a [[datasets]] table with at least one "
                          "[[datasets.subsets]] table holding image_dir = \"<folder of images>\".")
    datasets = tuple(_dataset(reader, raw, i, general, base) for i, raw in enumerate(tables))
    if not any(not s.is_reg for d in datasets for s in d.subsets):
        raise reader.fail("[[datasets.subsets]]", "every subset has is_reg = true. Set is_reg = false (the default) "
                          "on the subsets of training images.")
    return DatasetDescription(str(reader.path), datasets, reader.ignored, reader.unknown, reader.warnings)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"dataset_config: file '{path}' not found. Check the path (relative paths start at "
                                "the folder training is started from).")
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a valid dataset config ({error}). Fix the syntax (strings need quotes, "
                          "Windows paths use / or single quotes).") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a table of [general] and [[datasets]]. Use kohya's dataset config layout.")
    return data


def _fallback_values(cfg: DatasetConfig) -> dict[str, Any]:
    values = {key: getattr(cfg, key) for key in {**SUBSET_KEYS, **DATASET_KEYS} if hasattr(cfg, key)}
    values["batch_size"] = cfg.train_batch_size
    return {**_DEFAULTS, **{k: v for k, v in values.items() if v is not None}}


def _dataset(reader: _Reader, raw: Any, i: int, general: dict, base: dict) -> DatasetSpec:
    where = f"[[datasets]] #{i + 1}"
    own = _table(reader, raw, where, "dataset")
    subsets_raw = raw.get("subsets") if isinstance(raw, dict) else None
    if not isinstance(subsets_raw, list) or not subsets_raw:
        raise reader.fail(where, "no subset. Add a [[datasets.subsets]] table with image_dir = \"<folder>\" "
                          "after this [[datasets]] table.")
    layers = (own, general, base)
    values = {key: _first(key, layers) for key in DATASET_KEYS}
    if values["min_bucket_reso"] > values["max_bucket_reso"]:
        raise reader.fail(where, f"min_bucket_reso ({values['min_bucket_reso']}) is above max_bucket_reso "
                          f"({values['max_bucket_reso']}). Lower min_bucket_reso or raise max_bucket_reso.")
    subsets = []
    for j, subset_raw in enumerate(subsets_raw):
        label = f"{where} > [[datasets.subsets]] #{j + 1}"
        subset = _table(reader, subset_raw, label, "subset")
        subset_values = {key: _first(key, (subset,) + layers) for key in SUBSET_KEYS}
        subset_values["image_dir"] = _image_dir(reader, label, subset_values.get("image_dir"))
        subsets.append(SubsetSpec(**subset_values, dataset=i))
    return DatasetSpec(**values, subsets=tuple(subsets))


def _first(key: str, layers: tuple[Mapping[str, Any], ...]) -> Any:
    for layer in layers:
        if layer.get(key) is not None:
            return layer[key]
    return None


def _image_dir(reader: _Reader, where: str, value: str | None) -> str:
    if not value:
        raise reader.fail(where, "image_dir is missing. Set image_dir = \"<folder of images>\" in this subset.")
    beside, here = reader.path.parent / value, Path(value)
    for candidate in (beside, here) if not here.is_absolute() else (here,):
        if candidate.is_dir():
            return os.path.abspath(candidate)
    looked = f"'{here}'" if here.is_absolute() else f"'{beside}' and '{here.absolute()}'"
    raise FileNotFoundError(f"{reader.path}: {where}: image_dir {value!r} is not a folder (looked at {looked}). "
                            "Fix the path; a relative path starts at the dataset config's folder.")


def _table(reader: _Reader, raw: Any, where: str, level: str) -> dict[str, Any]:
    """The known keys of one table, converted and range-checked; other keys are reported or refused."""
    if not isinstance(raw, dict):
        raise reader.fail(where, f"expected a table, found {type(raw).__name__}. Use kohya's layout: [general], "
                          "[[datasets]], [[datasets.subsets]].")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "subsets" and level == "dataset":
            continue
        if key in REFUSED_KEYS:
            raise reader.fail(where, f"{key}: {REFUSED_KEYS[key]}.")
        if key in UNUSED_KEYS:
            _unused(reader, where, key, value)
        elif key in SUBSET_KEYS or key in DATASET_KEYS:
            _check_level(reader, where, level, key)
            values[key] = _convert(reader, where, key, value)
        else:
            _unknown(reader, where, key)
    return values


def _check_level(reader: _Reader, where: str, level: str, key: str) -> None:
    if key in SUBSET_ONLY and level != "subset":
        raise reader.fail(where, f"{key} belongs in a [[datasets.subsets]] table. Move it into the subset it is "
                          "for.")
    if key in DATASET_KEYS and level == "subset":
        raise reader.fail(where, f"{key} is a dataset key. Move it to the [[datasets]] table above (or [general]); "
                          "subsets with another resolution or batch size go into a [[datasets]] of their own.")


def _convert(reader: _Reader, where: str, key: str, value: Any) -> Any:
    type_text = SUBSET_KEYS.get(key) or DATASET_KEYS[key]
    try:
        converted = coerce_type(key, value, type_text)
    except ConfigError as error:
        raise reader.fail(where, str(error)) from error
    problem = _range_problem(key, converted)
    if problem:
        raise reader.fail(where, f"{key} = {value!r}: {problem}.")
    return converted


def _range_problem(key: str, value: Any) -> str | None:
    """What is wrong with a converted value ("<problem>. <fix>"), or None."""
    limits = LIMITS.get("train_batch_size" if key == "batch_size" else key)
    if key == "num_repeats" and value < 1:
        return "must be at least 1. Use 1 or more (each image is used that many times per epoch)"
    if key in ("caption_dropout_rate", "caption_tag_dropout_rate") and not 0 <= value <= 1:
        return "must be from 0 to 1. Use e.g. 0.1"
    if key == "caption_extension" and not value.startswith("."):
        return f"must start with '.'. Use \".{value}\""
    if key == "resolution" and not all(64 <= side <= MAX_SIDE and side % 8 == 0 for side in value):
        return f"sides must be multiples of 8 from 64 to {MAX_SIDE}. Use e.g. 512 or [768, 1024] (width, height)"
    if key == "validation_split" and not 0 <= value < 1:
        return "must be in [0, 1). Use e.g. 0.1, or 0 for no validation"
    if key == "bucket_reso_steps" and value % 8:
        return "must be a multiple of 8. Use 64"
    if key == "image_dir" and not value.strip():
        return "is empty. Set the folder of the subset's images"
    if limits and not limits[0] <= value <= limits[1]:
        return f"must be from {limits[0]} to {limits[1]}. Use a value in that range"
    return None


def _unused(reader: _Reader, where: str, key: str, value: Any) -> None:
    reason, neutral = UNUSED_KEYS[key]
    if not _is_neutral(value, neutral):
        fix = f"Remove {key}" + (f" or set it to {json.dumps(neutral)}" if neutral is not None else "")
        raise reader.fail(where, f"{key} = {value!r}: {reason}. {fix}.")
    reader.ignored[f"{where} {key}"] = reason


def _is_neutral(value: Any, neutral: Any) -> bool:
    if neutral is ANY:
        return True
    if neutral is None:
        return False
    if isinstance(neutral, str):
        return isinstance(value, str) and value.strip().lower() == neutral
    if isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    return isinstance(value, (int, float)) and value == neutral


def _unknown(reader: _Reader, where: str, key: str) -> None:
    reader.unknown.append(f"{where} {key}")
    known = list(SUBSET_KEYS) + list(DATASET_KEYS) + list(UNUSED_KEYS)
    if key in FIELDS:
        hint = "it is a training-config key: set it in the training config, not the dataset config"
    else:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "it is not a kohya dataset config key"
    reader.warnings.append(f"{reader.path}: {where}: unknown key {key!r} is not used ({hint}).")


def describe_settings(description: DatasetDescription) -> list[str]:
    """One line per dataset and subset, for the log (what kohya prints when it reads a dataset config).

    Args:
        description: DatasetDescription.
    Returns:
        list[str] of lines.
    """
    lines = []
    for i, dataset in enumerate(description.datasets):
        head = dataclasses.asdict(dataset)
        head.pop("subsets")
        lines.append(f"dataset {i + 1}: " + ", ".join(f"{k}={v}" for k, v in head.items()))
        for subset in dataset.subsets:
            values = dataclasses.asdict(subset)
            values.pop("dataset")
            lines.append("  subset: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return lines
