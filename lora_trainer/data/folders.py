"""Dataset folders in kohya's DreamBooth layout: `<train_data_dir>/<repeats>_<concept>/image.png` + `image.txt`."""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from lora_trainer.config.dataset_config import DatasetDescription, SubsetSpec, describe_settings, read_dataset_config
from lora_trainer.data.caption_files import MISSING, caption_path, check_caption_extension, read_caption
from lora_trainer.data.images import IMAGE_EXTENSIONS, is_image_file, verify_image
from lora_trainer.errors import DatasetError

logger = logging.getLogger(__name__)

_FOLDER = re.compile(r"^(\d+)_(.+)$")
_LAYOUT_FIX = (
    "Put the images in subfolders named '<repeats>_<concept>', e.g. '10_mychar' "
    "(each image is seen 10 times per epoch; 'mychar' is the caption of images without a caption file)."
)


@dataclass(frozen=True)
class ImageItem:
    """One usable image.

    Attributes:
        path (str): the image file.
        caption (str): the raw caption (caption file text, or the concept words when there is none).
        concept (str): the folder name after `<repeats>_`.
        repeats (int): times the image is used per epoch.
        width (int): displayed width in pixels (EXIF rotation applied).
        height (int): displayed height in pixels.
        is_reg (bool): a regularisation image (from reg_data_dir).
        folder (str): the folder's name, e.g. "10_mychar" (kohya's key for tag frequency and dataset dirs).
        subset (int): index of its folder or `dataset_config` subset, in scan order.
        dataset (int): index of its `dataset_config` dataset (0 for folders).
    """

    path: str
    caption: str
    concept: str
    repeats: int
    width: int
    height: int
    is_reg: bool = False
    folder: str = ""
    subset: int = 0
    dataset: int = 0


@dataclass
class DatasetIndex:
    """The scanned dataset.

    Attributes:
        items (list[ImageItem]): usable images, train then regularisation, each sorted by path.
        problems (list[str]): what was skipped or guessed, each naming the file or folder and the fix.
        tag_frequency (dict[str, dict[str, int]]): per folder name, lower-cased tag -> number of images
            (kohya's `ss_tag_frequency`).
        dirs (dict[str, dict[str, int]]): train folder name -> {"n_repeats", "img_count"} (`ss_dataset_dirs`).
        reg_dirs (dict[str, dict[str, int]]): the same for reg_data_dir (`ss_reg_dataset_dirs`).
        unreadable_captions (list[str]): caption problems (e.g. not UTF-8) that training must not guess around.
        description (DatasetDescription, optional): the dataset config the images came from; None for folders.
            Its subsets hold the caption, augmentation, bucket and batch settings of their images.
    """

    items: list[ImageItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable_captions: list[str] = field(default_factory=list)
    description: DatasetDescription | None = None

    @property
    def train_items(self) -> list[ImageItem]:
        return [i for i in self.items if not i.is_reg]

    @property
    def reg_items(self) -> list[ImageItem]:
        return [i for i in self.items if i.is_reg]

    @property
    def num_train_images(self) -> int:
        """Train images times repeats (kohya's `ss_num_train_images`)."""
        return sum(i.repeats for i in self.items if not i.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images times repeats (kohya's `ss_num_reg_images`)."""
        return sum(i.repeats for i in self.items if i.is_reg)


def count_tags(captions, separator: str = ",") -> dict[str, int]:
    """Count each tag once per caption it occurs in, lower-cased and stripped, as kohya's `ss_tag_frequency`.

    Args:
        captions (Iterable[str]): raw captions.
        separator (str, optional): tag separator, defaults to ",".

    Returns:
        dict[str, int]: tag -> number of captions.
    """
    counts: Counter = Counter()
    for caption in captions:
        for tag in caption.split(separator):
            tag = tag.strip().lower()
            if tag:
                counts[tag] += 1
    return dict(counts)


def _scan_folder(subset: SubsetSpec, number: int, index: DatasetIndex) -> list[ImageItem]:
    """The usable images of one folder; images without a caption file get the subset's class tokens."""
    problems, folder = index.problems, subset.image_dir
    name, concept = os.path.basename(folder), subset.class_tokens or ""
    items = []
    uncaptioned = 0
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not is_image_file(entry):
            continue
        if not os.path.isfile(path):
            if os.path.islink(path):
                problems.append(f"{path}: symbolic link to no readable file (dangling or a loop); skipped. Remove "
                                "the link or point it at the image.")
            continue
        try:
            size = verify_image(path)
        except DatasetError as exc:
            problems.append(f"{exc} (skipped)")
            continue
        width, height = size
        if size.frames > 1:
            problems.append(f"{path}: animated ({size.frames} frames); only its first frame is trained. Export the "
                            "frame you want as PNG if it is another one.")
        cap = read_caption(caption_path(path, subset.caption_extension))
        text = cap.text
        if cap.problem == MISSING:
            uncaptioned += 1
            text = concept
        elif cap.problem:
            problems.append(cap.problem)
            index.unreadable_captions.append(cap.problem)
            text = text.replace("\ufffd", "")
        items.append(ImageItem(path, text, concept, subset.num_repeats, width, height, subset.is_reg, name, number,
                               subset.dataset))
    if uncaptioned:
        problems.append(_uncaptioned_problem(folder, uncaptioned, subset))
    return items


def _uncaptioned_problem(folder: str, count: int, subset: SubsetSpec) -> str:
    extension = subset.caption_extension
    if subset.class_tokens is None:  # kohya trains these with the empty caption too
        return (f"{folder}: {count} image(s) have no '{extension}' caption file and the subset has no class_tokens; "
                "they are trained with the empty caption. Add caption files or set class_tokens for this subset.")
    return (f"{folder}: {count} image(s) have no '{extension}' caption file; they are trained with the caption "
            f"'{subset.class_tokens}'. Tag them (Dataset panel) or add caption files if that is not what you want.")


def _add_tags(index: DatasetIndex, name: str, items: list[ImageItem]) -> None:
    freq = index.tag_frequency.setdefault(name, {})
    for tag, n in count_tags(i.caption for i in items).items():
        freq[tag] = freq.get(tag, 0) + n


def _scan_root(root: str, key: str, caption_extension: str, is_reg: bool, index: DatasetIndex) -> int:
    if not root or not os.path.isdir(root):
        raise DatasetError(f"{key}: folder '{root}' does not exist. Set {key} to your dataset folder.")
    found, loose = 0, []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith(".") or not os.path.isdir(path):
            if os.path.isfile(path) and is_image_file(entry):
                loose.append(entry)
            continue
        match = _FOLDER.match(entry)
        if not match or int(match.group(1)) < 1:
            index.problems.append(f"{path}: folder name is not '<repeats>_<concept>' (skipped). {_LAYOUT_FIX}")
            continue
        subset = SubsetSpec(path, num_repeats=int(match.group(1)), is_reg=is_reg, class_tokens=match.group(2),
                            caption_extension=caption_extension)
        items = _scan_folder(subset, len(index.dirs) + len(index.reg_dirs), index)
        if not items:
            kinds = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            index.problems.append(f"{path}: no usable images ({kinds}) in this folder.")
            continue
        index.items.extend(items)
        (index.reg_dirs if is_reg else index.dirs)[entry] = {"n_repeats": subset.num_repeats,
                                                              "img_count": len(items)}
        _add_tags(index, entry, items)
        found += len(items)
    if loose:
        index.problems.append(_loose_images_problem(root, key, loose))
    return found


def _loose_images_problem(root: str, key: str, names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    match = _FOLDER.match(os.path.basename(os.path.normpath(root)))
    if match:
        return (
            f"{root}: {len(names)} image(s) directly in {key} are not used ({shown}). This folder looks like a "
            f"concept folder itself: set {key} to its parent folder '{os.path.dirname(os.path.normpath(root))}'."
        )
    return f"{root}: {len(names)} image(s) directly in {key} are not used ({shown}). {_LAYOUT_FIX}"


def scan_dataset(train_data_dir, caption_extension: str = ".txt", reg_data_dir: str | None = None) -> DatasetIndex:
    """Scan the train (and regularisation) folders.

    Args:
        train_data_dir (str | DatasetConfig): the dataset folder, or a config object whose `train_data_dir`,
            `caption_extension` and `reg_data_dir` attributes are used; one with `dataset_config` set is scanned
            by `scan_dataset_config` instead.
        caption_extension (str, optional): caption file extension, defaults to ".txt".
        reg_data_dir (str, optional): regularisation images in the same layout, defaults to None.

    Returns:
        DatasetIndex: usable images, problems, tag frequency and folder summaries.

    Raises:
        DatasetError: a folder does not exist, or there is no usable training image at all.
    """
    if getattr(train_data_dir, "dataset_config", None):
        return scan_dataset_config(train_data_dir)
    if not isinstance(train_data_dir, (str, os.PathLike)) and hasattr(train_data_dir, "train_data_dir"):
        cfg = train_data_dir
        train_data_dir = cfg.train_data_dir
        caption_extension = getattr(cfg, "caption_extension", None) or caption_extension
        reg_data_dir = getattr(cfg, "reg_data_dir", None)
    train_data_dir = os.fspath(train_data_dir) if train_data_dir else ""
    try:
        caption_extension = check_caption_extension(caption_extension)
    except ValueError as err:
        raise DatasetError(str(err)) from err
    index = DatasetIndex()
    found = _scan_root(train_data_dir, "train_data_dir", caption_extension, False, index)
    if not found:
        listed = "; ".join(index.problems[:5])
        raise DatasetError(
            f"train_data_dir: no usable training image in '{train_data_dir}'. {_LAYOUT_FIX}"
            + (f" Found: {listed}" if listed else "")
        )
    if reg_data_dir:
        if not _scan_root(os.fspath(reg_data_dir), "reg_data_dir", caption_extension, True, index):
            index.problems.append(f"reg_data_dir: no usable regularisation image in '{reg_data_dir}'. {_LAYOUT_FIX}")
    for problem in index.problems:
        logger.warning("%s", problem)
    return index


def scan_dataset_config(cfg) -> DatasetIndex:
    """Scan the subsets of the run's kohya dataset config (`dataset_config`) instead of train/reg folders.

    Args:
        cfg (DatasetConfig): the run's dataset keys; `dataset_config` names the file, the other keys are the
            fallbacks of settings no table of the file sets (as kohya's command-line arguments are).

    Returns:
        DatasetIndex: with `description` set; `dirs` and `tag_frequency` merged over datasets as kohya writes
        `ss_dataset_dirs` / `ss_tag_frequency` for a dataset config (train subsets only in `dirs`, a folder used
        again named "<name> (2)"; the first dataset's tags of a folder name win).

    Raises:
        FileNotFoundError: the file or an image_dir does not exist.
        ConfigError: the file is not a valid dataset config (file, table, key and fix named).
        DatasetError: no subset has a usable training image.
    """
    description = read_dataset_config(cfg.dataset_config, cfg)
    index = DatasetIndex(problems=list(description.warnings), description=description)
    for where, reason in description.ignored_keys.items():
        index.problems.append(f"{description.path}: {where}: not used ({reason}).")
    for key in ("train_data_dir", "reg_data_dir"):
        if getattr(cfg, key, None):
            index.problems.append(f"{key}: not used because dataset_config is set (its subsets name the folders). "
                                  f"Remove {key}, or remove dataset_config to train from {key}.")
    for line in describe_settings(description):
        logger.info("dataset_config: %s", line)
    for number, subset in enumerate(description.subsets):
        try:
            check_caption_extension(subset.caption_extension)
        except ValueError as err:
            raise DatasetError(f"{description.path}: {err}") from err
        items = _scan_folder(subset, number, index)
        if not items:
            kinds = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            index.problems.append(f"{subset.image_dir}: no usable images ({kinds}) in this subset; it is skipped.")
            continue
        index.items.extend(items)
        _merge_subset(index, subset, items)
    if not index.train_items:
        listed = "; ".join(index.problems[:5])
        raise DatasetError(f"{description.path}: no usable training image in the subsets' image_dir folders. Put "
                           "images in them (or fix the paths)." + (f" Found: {listed}" if listed else ""))
    for problem in index.problems:
        logger.warning("%s", problem)
    return index


def _merge_subset(index: DatasetIndex, subset: SubsetSpec, items: list[ImageItem]) -> None:
    name = os.path.basename(subset.image_dir)
    if not subset.is_reg:
        key, n = name, 2
        while key in index.dirs:
            key, n = f"{name} ({n})", n + 1
        index.dirs[key] = {"n_repeats": subset.num_repeats, "img_count": len(items)}
    earlier = {i.folder for i in index.items if i.dataset < subset.dataset}
    if name not in earlier:
        _add_tags(index, name, items)


def kohya_datasets(index: DatasetIndex, bucket_infos: list | None = None) -> list[dict] | None:
    """kohya's `ss_datasets` entries of an index scanned from a dataset config (None for folders).

    Args:
        index (DatasetIndex): from `scan_dataset_config`.
        bucket_infos (list, optional): kohya's bucket info per dataset (None where buckets are off).

    Returns:
        list[dict] | None: one dict per dataset, with its subsets, shaped as kohya's train_network.py writes them.
    """
    if index.description is None:
        return None
    out, first = [], 0
    counts = Counter(i.subset for i in index.items)
    for number, dataset in enumerate(index.description.datasets):
        items = [i for i in index.items if i.dataset == number]
        tags = {}
        for folder in dict.fromkeys(i.folder for i in items):
            tags[folder] = count_tags(i.caption for i in items if i.folder == folder)
        out.append({
            "is_dreambooth": True, "batch_size_per_device": dataset.batch_size,
            "num_train_images": sum(i.repeats for i in items if not i.is_reg),
            "num_reg_images": sum(i.repeats for i in items if i.is_reg),
            "resolution": list(dataset.resolution), "enable_bucket": dataset.enable_bucket,
            "min_bucket_reso": dataset.min_bucket_reso, "max_bucket_reso": dataset.max_bucket_reso,
            "tag_frequency": tags, "bucket_info": bucket_infos[number] if bucket_infos else None,
            "subsets": [_kohya_subset(s, counts[first + j]) for j, s in enumerate(dataset.subsets)],
        })
        first += len(dataset.subsets)
    return out


def _kohya_subset(subset: SubsetSpec, img_count: int) -> dict:
    return {
        "img_count": img_count,
        "num_repeats": subset.num_repeats, "color_aug": False, "flip_aug": subset.flip_aug,
        "random_crop": subset.random_crop, "shuffle_caption": subset.shuffle_caption,
        "keep_tokens": subset.keep_tokens, "keep_tokens_separator": subset.keep_tokens_separator,
        "secondary_separator": subset.secondary_separator, "enable_wildcard": subset.enable_wildcard,
        "caption_prefix": subset.caption_prefix, "caption_suffix": subset.caption_suffix,
        "image_dir": os.path.basename(subset.image_dir), "class_tokens": subset.class_tokens,
        "is_reg": subset.is_reg,
    }
