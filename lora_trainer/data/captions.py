"""Caption processing per training sample, with kohya sd-scripts' semantics, as a pure function of an explicit RNG.

Order (as kohya's `process_caption`): prefix/suffix -> caption dropout -> wildcards -> keep tokens / shuffle /
tag dropout -> secondary separator.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields

from lora_trainer.errors import ConfigError

_WILDCARD = re.compile(r"\{([^}]+)\}")
_HAS_CHOICE = re.compile(r"\{[^}]*\|[^}]*\}")


@dataclass(frozen=True)
class CaptionOptions:
    """Caption settings, named as kohya's dataset keys.

    Attributes:
        caption_prefix (str, optional): prepended with a space (kohya), defaults to None.
        caption_suffix (str, optional): appended with a space (kohya), defaults to None.
        shuffle_caption (bool, optional): shuffle the tags that are not kept, defaults to False.
        keep_tokens (int, optional): the first N tags stay in place and are never dropped, defaults to 0.
        keep_tokens_separator (str, optional): tags before it stay in place (and, when it occurs twice, tags after
            the second one stay at the end); used instead of keep_tokens when it occurs in a caption, defaults to "".
        caption_tag_dropout_rate (float, optional): chance of dropping each tag that is not kept, defaults to 0.
        caption_dropout_rate (float, optional): chance of training a sample with the empty caption, defaults to 0.
        caption_dropout_every_n_epochs (int, optional): empty captions for every sample in epochs N, 2N, ...
            (epochs counted from 1), defaults to 0 (off).
        caption_separator (str, optional): tag separator, defaults to ",".
        secondary_separator (str, optional): joins tags that shuffle and dropout treat as one; replaced by
            caption_separator at the end, defaults to None.
        enable_wildcard (bool, optional): replace `{a|b}` by one choice per call, defaults to True.
    """

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = True

    def __post_init__(self):
        for key in ("caption_tag_dropout_rate", "caption_dropout_rate"):
            value = getattr(self, key)
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{key}: {value} is not a probability. Use a value from 0 to 1 (e.g. 0.1).")
        for key in ("keep_tokens", "caption_dropout_every_n_epochs"):
            value = getattr(self, key)
            if int(value) < 0:
                raise ConfigError(f"{key}: {value} is negative. Use 0 (off) or a positive whole number.")
        if not self.caption_separator:
            raise ConfigError('caption_separator: must not be empty. Use "," (the default).')

    @classmethod
    def from_config(cls, dataset_cfg) -> "CaptionOptions":
        """Read the kohya-named attributes of any dataset config object; absent or None attributes keep defaults.

        Args:
            dataset_cfg (object): e.g. `DatasetConfig`; read with getattr only.

        Returns:
            CaptionOptions: the caption settings.
        """
        values = {}
        for f in fields(cls):
            value = getattr(dataset_cfg, f.name, None)
            if value is not None:
                values[f.name] = value
        return cls(**values)


def has_wildcards(caption: str) -> bool:
    """Whether a caption holds a `{a|b}` choice or several lines (one picked per call), so it is not fixed."""
    return "\n" in caption.strip() or bool(_HAS_CHOICE.search(caption.replace("{{", "").replace("}}", "")))


def is_fixed(opts: CaptionOptions, captions=None) -> bool:
    """Whether process_caption always gives the same text for a caption (so text-encoder outputs can be cached).

    Args:
        opts (CaptionOptions): caption settings.
        captions (Iterable[str], optional): the raw captions; when given, a caption with wildcards also makes the
            result not fixed (with `enable_wildcard`), defaults to None (options only).

    Returns:
        bool: True when no shuffle, tag dropout, caption dropout or wildcard choice applies.
    """
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0:
        return False
    if opts.caption_dropout_rate > 0 or opts.caption_dropout_every_n_epochs > 0:
        return False
    if captions is not None and opts.enable_wildcard:
        return not any(has_wildcards(c) for c in captions)
    return True


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption.strip():
        caption = rng.choice([line for line in caption.split("\n") if line.strip()])
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _split_kept(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """-> (kept in front, flexible, kept at the end)."""
    sep, keep_sep = opts.caption_separator, opts.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        front, flex = caption.split(keep_sep, 1)
        back = ""
        if keep_sep in flex:
            flex, back = flex.split(keep_sep, 1)
        return _split(front, sep), _split(flex, sep), _split(back, sep)
    tokens = _split(caption, sep)
    n = int(opts.keep_tokens)
    return tokens[:n], tokens[n:], []


def process_caption(
    caption: str, opts: CaptionOptions, rng: random.Random, epoch: int = 0, drop_all: bool = False
) -> str:
    """The caption one training sample sees.

    Args:
        caption (str): the raw caption (one line, or several lines of which one is picked with wildcards on).
        opts (CaptionOptions): caption settings.
        rng (random.Random): the only source of randomness; the same seed gives the same result.
        epoch (int, optional): current epoch counted from 1, for caption_dropout_every_n_epochs; 0 = not known
            (that rule is then off), defaults to 0.
        drop_all (bool, optional): force the empty caption, defaults to False.

    Returns:
        str: the processed caption; "" when dropped. Tags are joined with ", " whenever they were split.
    """
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"

    dropped = drop_all or (opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate)
    every = int(opts.caption_dropout_every_n_epochs)
    if dropped or (every > 0 and epoch > 0 and epoch % every == 0):
        return ""

    if opts.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    has_keep_sep = bool(opts.keep_tokens_separator) and opts.keep_tokens_separator in caption
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or has_keep_sep:
        front, flex, back = _split_kept(caption, opts)
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(front + flex + back)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption.strip()
