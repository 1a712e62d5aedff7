"""WD14 / WD-v3 tagger model folders: what is known about each model, finding, checking and downloading them.

A model is a folder holding `model.onnx` and `selected_tags.csv` (columns `tag_id,name,category,count`;
category 9 = rating, 0 = general, 4 = character), as published in the Hugging Face repos `SmilingWolf/<name>`.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_trainer.errors import TaggerError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
HF_OWNER = "SmilingWolf"
RATING_CATEGORY, GENERAL_CATEGORY, CHARACTER_CATEGORY = 9, 0, 4
FALLBACK_GENERAL_THRESHOLD = 0.35

# Known model names -> general threshold where precision = recall on the author's validation set (model cards);
# None where no figure is published, in which case FALLBACK_GENERAL_THRESHOLD is used.
KNOWN_MODELS: dict[str, float | None] = {
    "wd-v1-4-vit-tagger-v2": 0.3537,
    "wd-v1-4-convnext-tagger-v2": 0.3685,
    "wd-v1-4-convnextv2-tagger-v2": None,
    "wd-v1-4-swinv2-tagger-v2": None,
    "wd-v1-4-moat-tagger-v2": 0.3771,
    "wd-vit-tagger-v3": 0.2614,
    "wd-convnext-tagger-v3": 0.2682,
    "wd-swinv2-tagger-v3": 0.2653,
    "wd-eva02-large-tagger-v3": None,
    "wd-vit-large-tagger-v3": None,
}


@dataclass(frozen=True)
class TagLabels:
    """The tags of a model, in output order, with the indices of each category.

    Attributes:
        names (tuple[str, ...]): raw tag names (underscores kept), one per model output.
        rating (np.ndarray): indices of rating tags (category 9).
        general (np.ndarray): indices of general tags (category 0).
        character (np.ndarray): indices of character tags (category 4).
    """

    names: tuple[str, ...]
    rating: np.ndarray
    general: np.ndarray
    character: np.ndarray


@dataclass(frozen=True)
class ModelInfo:
    """A tagger model folder.

    Attributes:
        name (str): folder name (the Hugging Face model name for downloaded models).
        path (Path): the folder.
        known (bool): a model name we know (threshold and repo).
        default_threshold (float): the general threshold used when none is given.
        ready (bool): both files present.
        problem (str, optional): what is missing and how to fix it, None when ready.
    """

    name: str
    path: Path
    known: bool
    default_threshold: float
    ready: bool
    problem: str | None = None


def known_name(name: str) -> str | None:
    """The known model name a folder name refers to (`wd-vit-tagger-v3`, `SmilingWolf_wd-vit-tagger-v3`), or None."""
    for known in KNOWN_MODELS:
        if name == known or name.endswith(("_" + known, "-" + known, "/" + known)):
            return known
    return None


def default_threshold(name: str) -> float:
    """The general threshold for a model folder name: its P=R value where known, else 0.35."""
    known = known_name(name)
    value = KNOWN_MODELS.get(known) if known else None
    return FALLBACK_GENERAL_THRESHOLD if value is None else value


def _fix_hint(folder: Path) -> str:
    name = known_name(folder.name)
    if name:
        return (f"Download it with `python -m lora_trainer tag DIR --download {name} --tagger-dir {folder.parent}`, "
                f"or put model.onnx and selected_tags.csv from https://huggingface.co/{HF_OWNER}/{name} there.")
    return (f"Put model.onnx and selected_tags.csv of a WD14 tagger (e.g. https://huggingface.co/{HF_OWNER}/"
            f"wd-vit-tagger-v3) in {folder}, or download one with `--download wd-vit-tagger-v3`.")


def model_info(folder: str | os.PathLike) -> ModelInfo:
    """Describe a model folder without loading it.

    Args:
        folder (str | os.PathLike): the model folder.

    Returns:
        ModelInfo: with `ready` False and `problem` set when a file is missing.
    """
    folder = Path(folder)
    missing = [f for f in (MODEL_FILE, TAGS_FILE) if not (folder / f).is_file()]
    problem = None
    if not folder.is_dir():
        problem = f"{folder}: tagger model folder not found. {_fix_hint(folder)}"
    elif missing:
        problem = f"{folder}: tagger model folder is incomplete, {' and '.join(missing)} missing. {_fix_hint(folder)}"
    return ModelInfo(folder.name, folder, known_name(folder.name) is not None, default_threshold(folder.name),
                     problem is None, problem)


def find_models(models_dir: str | os.PathLike) -> list[ModelInfo]:
    """List the tagger model folders under `models_dir` (sub-folders holding model.onnx or selected_tags.csv).

    Args:
        models_dir (str | os.PathLike): the folder of tagger models; a missing folder gives an empty list.

    Returns:
        list[ModelInfo]: sorted by name; incomplete folders are listed with their problem.
    """
    root = Path(models_dir)
    if not root.is_dir():
        return []
    folders = [root] if (root / MODEL_FILE).is_file() else []
    folders += [p for p in root.iterdir()
                if p.is_dir() and ((p / MODEL_FILE).is_file() or (p / TAGS_FILE).is_file())]
    return sorted((model_info(p) for p in folders), key=lambda m: m.name)


def check_model_folder(folder: str | os.PathLike) -> ModelInfo:
    """Like `model_info`, but raise when the folder cannot be used.

    Raises:
        TaggerError: the folder or one of its files is missing; the message says where to put it or how to download.
    """
    info = model_info(folder)
    if not info.ready:
        raise TaggerError(info.problem)
    return info


def read_labels(csv_path: str | os.PathLike) -> TagLabels:
    """Read selected_tags.csv; categories are taken from the `category` column, never from row order.

    Args:
        csv_path (str | os.PathLike): the csv file.

    Returns:
        TagLabels: names in row order (= model output order) and the category indices.

    Raises:
        TaggerError: the file is not UTF-8 or unreadable, lacks the `name` or `category` column, or a category is
            not a number.
    """
    csv_path = Path(csv_path)
    try:
        return _read_labels(csv_path)
    except UnicodeDecodeError as exc:
        raise TaggerError(f"{csv_path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}). "
                          "Put back the selected_tags.csv that comes with the model, or re-save this one as "
                          "UTF-8.") from exc
    except OSError as exc:
        raise TaggerError(f"{csv_path}: cannot be read ({exc.strerror}). Check the file's permissions, or "
                          "download the model again.") from exc


def _read_labels(csv_path: Path) -> TagLabels:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if not {"name", "category"} <= columns:
            raise TaggerError(f"{csv_path}: needs the columns name and category (has {sorted(columns)}). "
                              f"Use the selected_tags.csv that comes with the model.")
        names, categories = [], []
        for line, row in enumerate(reader, start=2):
            try:
                categories.append(int(row["category"]))
            except (TypeError, ValueError) as exc:
                raise TaggerError(f"{csv_path}, line {line}: category {row['category']!r} is not a number. "
                                  "Use the selected_tags.csv that comes with the model.") from exc
            names.append(row["name"])
    cats = np.asarray(categories, dtype=np.int64)
    return TagLabels(tuple(names), np.flatnonzero(cats == RATING_CATEGORY), np.flatnonzero(cats == GENERAL_CATEGORY),
                     np.flatnonzero(cats == CHARACTER_CATEGORY))


def download_model(name: str, models_dir: str | os.PathLike, *, endpoint: str | None = None) -> Path:
    """Download a known model (model.onnx, selected_tags.csv) from `SmilingWolf/<name>` into `models_dir/<name>`.

    Args:
        name (str): one of KNOWN_MODELS.
        models_dir (str | os.PathLike): where model folders live.
        endpoint (str, optional): Hugging Face endpoint, defaults to the hub's own.

    Returns:
        Path: the model folder.

    Raises:
        TaggerError: unknown name, or the download failed (offline, hub unreachable); the message says what to do.
    """
    if name not in KNOWN_MODELS:
        raise TaggerError(f"--download {name}: not a known tagger model. Use one of: {', '.join(KNOWN_MODELS)}.")
    folder = Path(models_dir) / name
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise TaggerError(f"{folder}: downloading needs huggingface_hub (`pip install huggingface_hub`), or put "
                          f"the files there by hand from https://huggingface.co/{HF_OWNER}/{name}.") from exc
    folder.mkdir(parents=True, exist_ok=True)
    for filename in (TAGS_FILE, MODEL_FILE):
        logger.info("downloading %s/%s/%s", HF_OWNER, name, filename)
        try:
            hf_hub_download(f"{HF_OWNER}/{name}", filename, local_dir=folder, endpoint=endpoint)
        except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear message
            raise TaggerError(f"{folder / filename}: download from https://huggingface.co/{HF_OWNER}/{name} failed "
                              f"({type(exc).__name__}: {exc}). Check the internet connection, or download "
                              f"{MODEL_FILE} and {TAGS_FILE} by hand into {folder}.") from exc
    return check_model_folder(folder).path
