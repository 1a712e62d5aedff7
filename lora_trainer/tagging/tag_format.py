"""Pure tagger output logic: thresholds (fixed or MCut), tag formatting and caption merging. No I/O.

Facts followed from SmilingWolf's reference tagger (the WD14 / WD-v3 model author's demo): a tag is kept when its
probability is strictly above the threshold; MCut puts the threshold in the middle of the largest gap between
consecutive sorted probabilities, with a floor of 0.15 for characters; underscores become spaces except in
kaomoji; parentheses are escaped as `\\(` `\\)` for WebUI prompts.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lora_trainer.data.caption_files import check_caption_extension
from lora_trainer.tagging.tag_ops import normalize_tag, parse_tags

# Danbooru tags that keep their underscores (the reference tagger's list).
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})
CHARACTER_MCUT_FLOOR = 0.15
EXISTING_MODES = ("skip", "overwrite", "append", "prepend")
SORT_MODES = ("confidence", "alpha")
TRIGGER_POSITIONS = ("prepend", "append")


@dataclass(frozen=True)
class TagOptions:
    """How tags are chosen and written.

    Attributes:
        general_threshold (float, optional): keep general tags above this; None = the model's P=R threshold
            (0.35 for unknown models).
        character_threshold (float): keep character tags above this, defaults to 0.85.
        general_mcut (bool): MCut threshold for general tags instead of `general_threshold`.
        character_mcut (bool): MCut threshold for character tags (floor 0.15) instead of `character_threshold`.
        include_characters (bool): write character tags, defaults to True.
        include_rating (bool): write the most likely rating tag (general/sensitive/...), defaults to False.
        replace_underscores (bool): `long_hair` -> `long hair` (kaomoji like `^_^` are kept), defaults to True.
        escape_parentheses (bool): `(` -> `\\(` and `)` -> `\\)` for WebUI prompts, defaults to False.
        exclude_tags (tuple[str, ...]): model tags never written (compared ignoring `_`/space, case, escapes);
            a string is split at commas.
        trigger_tags (tuple[str, ...]): tags put first (or last), in the given order: first = highest weight;
            a string is split at commas.
        trigger_position (str): "prepend" (default) or "append".
        sort (str): model tags by "confidence" (default, highest first) or "alpha"; characters come first.
        existing (str): an existing caption is kept ("skip", default), replaced ("overwrite"), or merged with the
            new tags after ("append") or before ("prepend") it.
        remove_duplicates (bool): drop repeated tags (first kept), defaults to True.
        caption_extension (str): caption file extension, defaults to ".txt".
    """

    general_threshold: float | None = None
    character_threshold: float = 0.85
    general_mcut: bool = False
    character_mcut: bool = False
    include_characters: bool = True
    include_rating: bool = False
    replace_underscores: bool = True
    escape_parentheses: bool = False
    exclude_tags: tuple[str, ...] = field(default_factory=tuple)
    trigger_tags: tuple[str, ...] = field(default_factory=tuple)
    trigger_position: str = "prepend"
    sort: str = "confidence"
    existing: str = "skip"
    remove_duplicates: bool = True
    caption_extension: str = ".txt"

    def __post_init__(self):
        for key in ("general_threshold", "character_threshold"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: {value} is not a probability. Use a value between 0 and 1.")
        _check_choice("existing", self.existing, EXISTING_MODES)
        _check_choice("sort", self.sort, SORT_MODES)
        _check_choice("trigger_position", self.trigger_position, TRIGGER_POSITIONS)
        object.__setattr__(self, "caption_extension", check_caption_extension(self.caption_extension))
        object.__setattr__(self, "exclude_tags", _tag_tuple(self.exclude_tags))
        object.__setattr__(self, "trigger_tags", _tag_tuple(self.trigger_tags))


def _tag_tuple(tags: str | Iterable[str]) -> tuple[str, ...]:
    """Tags as a tuple; a string is a comma-separated caption (`"mychar, style"`), as typed in a text box."""
    if isinstance(tags, str):
        return tuple(parse_tags(tags))
    return tuple(t for t in map(normalize_tag, tags) if t)


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(choices)}. Pick one of those.")


@dataclass(frozen=True)
class TagScores:
    """Model output for one image, split by category; tag names are raw (as in selected_tags.csv).

    Attributes:
        ratings (dict[str, float]): every rating tag with its probability.
        general (dict[str, float]): general tags above the threshold.
        character (dict[str, float]): character tags above the threshold.
    """

    ratings: dict[str, float]
    general: dict[str, float]
    character: dict[str, float]

    @property
    def rating(self) -> str | None:
        """The most likely rating tag, or None when the model has no rating tags."""
        return max(self.ratings, key=self.ratings.get) if self.ratings else None


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut Thresholding: the middle of the largest gap between consecutive sorted probabilities.

    Largeron et al., "MCut: A Thresholding Strategy for Multi-label Classification" (IDA 2012).

    Args:
        probs (np.ndarray): probabilities of one category, any order.

    Returns:
        float: the threshold (tags strictly above it are kept); 0.0 for fewer than two values.
    """
    values = np.sort(np.asarray(probs, dtype=np.float64).ravel())[::-1]
    if values.size < 2:
        return 0.0
    gaps = values[:-1] - values[1:]
    i = int(gaps.argmax())
    return float((values[i] + values[i + 1]) / 2.0)


def select_tags(probs: np.ndarray, names: Sequence[str], rating_idx: np.ndarray, general_idx: np.ndarray,
                character_idx: np.ndarray, options: TagOptions, default_general_threshold: float) -> TagScores:
    """Keep the tags above each category's threshold.

    Args:
        probs (np.ndarray): [T] probabilities for one image, in the order of `names`.
        names (Sequence[str]): tag names (selected_tags.csv rows).
        rating_idx, general_idx, character_idx (np.ndarray): indices of each category in `names`.
        options (TagOptions): thresholds and MCut switches.
        default_general_threshold (float): used when `options.general_threshold` is None.

    Returns:
        TagScores: all ratings, and the kept general and character tags.
    """
    general_t = default_general_threshold if options.general_threshold is None else options.general_threshold
    if options.general_mcut:
        general_t = mcut_threshold(probs[general_idx])
    character_t = options.character_threshold
    if options.character_mcut:
        character_t = max(CHARACTER_MCUT_FLOOR, mcut_threshold(probs[character_idx]))

    def above(indices: np.ndarray, threshold: float) -> dict[str, float]:
        return {names[i]: float(probs[i]) for i in indices if probs[i] > threshold}

    return TagScores(
        ratings={names[i]: float(probs[i]) for i in rating_idx},
        general=above(general_idx, general_t),
        character=above(character_idx, character_t) if options.include_characters else {},
    )


def format_tag(name: str, options: TagOptions) -> str:
    """Write one model tag name as caption text (underscores, escapes).

    Args:
        name (str): raw tag name, e.g. `saber_(fate)`.
        options (TagOptions): `replace_underscores`, `escape_parentheses`.

    Returns:
        str: e.g. `saber (fate)` or `saber \\(fate\\)`; kaomoji keep their underscores.
    """
    if options.replace_underscores and name not in KAOMOJIS:
        name = name.replace("_", " ")
    if options.escape_parentheses:
        name = name.replace("(", "\\(").replace(")", "\\)")
    return name


def tag_key(tag: str) -> str:
    """Comparison key: the same tag written with `_` or space, escaped or not, in any case, gives one key."""
    return normalize_tag(tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ")).casefold()


def _ordered(tags: dict[str, float], sort: str) -> list[str]:
    if sort == "alpha":
        return sorted(tags)
    return sorted(tags, key=lambda name: (-tags[name], name))


def model_tags(scores: TagScores, options: TagOptions) -> list[str]:
    """The model's tags for a caption: rating (if asked), characters, then general tags, formatted and filtered.

    Args:
        scores (TagScores): selected tags of one image.
        options (TagOptions): sort, include_rating, exclude_tags and formatting.

    Returns:
        list[str]: formatted tags, excluded ones removed.
    """
    names = _ordered(scores.character, options.sort) + _ordered(scores.general, options.sort)
    if options.include_rating and scores.rating is not None:
        names.insert(0, scores.rating)
    excluded = {tag_key(t) for t in options.exclude_tags}
    return [tag for tag in (format_tag(n, options) for n in names) if tag_key(tag) not in excluded]


def _dedupe(tags: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def build_caption(new_tags: Sequence[str], existing: str | None, options: TagOptions) -> str | None:
    """Merge new tags with an existing caption and place the trigger tags.

    Args:
        new_tags (Sequence[str]): the model's formatted tags (`model_tags`).
        existing (str, optional): the current caption text, None when there is no caption file.
        options (TagOptions): `existing` mode, `trigger_tags`, `trigger_position`, `remove_duplicates`.

    Returns:
        str | None: the caption to write, or None when the existing caption is to be kept ("skip").
    """
    old = parse_tags(existing) if existing is not None else []
    if existing is not None and options.existing == "skip":
        return None
    if options.existing == "append":
        body = old + list(new_tags)
    elif options.existing == "prepend":
        body = list(new_tags) + old
    else:
        body = list(new_tags)
    triggers = list(options.trigger_tags)
    trigger_keys = {tag_key(t) for t in triggers}
    body = [t for t in body if tag_key(t) not in trigger_keys]
    tags = triggers + body if options.trigger_position == "prepend" else body + triggers
    if options.remove_duplicates:
        tags = _dedupe(tags)
    return ", ".join(tags)
