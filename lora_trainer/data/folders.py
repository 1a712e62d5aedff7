"""Dataset folders in kohya's DreamBooth layout: `<train_data_dir>/<repeats>_<concept>/image.png` + `image.txt`."""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

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
    """

    path: str
    caption: str
    concept: str
    repeats: int
    width: int
    height: int
    is_reg: bool = False
    folder: str = ""


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
    """

    items: list[ImageItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable_captions: list[str] = field(default_factory=list)

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


def _scan_folder(folder: str, repeats: int, concept: str, caption_extension: str, is_reg: bool,
                 index: DatasetIndex):
    problems = index.problems
    name = os.path.basename(folder)
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
        cap = read_caption(caption_path(path, caption_extension))
        text = cap.text
        if cap.problem == MISSING:
            uncaptioned += 1
            text = concept
        elif cap.problem:
            problems.append(cap.problem)
            index.unreadable_captions.append(cap.problem)
            text = text.replace("\ufffd", "")
        items.append(ImageItem(path, text, concept, repeats, width, height, is_reg, name))
    if uncaptioned:
        problems.append(
            f"{folder}: {uncaptioned} image(s) have no '{caption_extension}' caption file; they are trained with "
            f"the caption '{concept}'. Tag them (Dataset panel) or add caption files if that is not what you want."
        )
    return items


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
        repeats, concept = int(match.group(1)), match.group(2)
        items = _scan_folder(path, repeats, concept, caption_extension, is_reg, index)
        if not items:
            kinds = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            index.problems.append(f"{path}: no usable images ({kinds}) in this folder.")
            continue
        index.items.extend(items)
        (index.reg_dirs if is_reg else index.dirs)[entry] = {"n_repeats": repeats, "img_count": len(items)}
        freq = index.tag_frequency.setdefault(entry, {})
        for tag, n in count_tags(i.caption for i in items).items():
            freq[tag] = freq.get(tag, 0) + n
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
            `caption_extension` and `reg_data_dir` attributes are used.
        caption_extension (str, optional): caption file extension, defaults to ".txt".
        reg_data_dir (str, optional): regularisation images in the same layout, defaults to None.

    Returns:
        DatasetIndex: usable images, problems, tag frequency and folder summaries.

    Raises:
        DatasetError: a folder does not exist, or there is no usable training image at all.
    """
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
