"""Pure tag operations: `(tags: list[str], ...) -> list[str]`, no I/O, no state.

A caption is a comma-separated list of tags. Parsing splits on commas (and line breaks) that are not escaped
with a backslash, trims each tag and collapses runs of whitespace inside it to one space; empty tags vanish.
Nothing else is touched: `artist \\(style\\)`, `(tag:1.2)` and underscores stay exactly as written, and tags
compare as exact strings after that whitespace normalisation.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_SEPARATOR = re.compile(r"(?<!\\)[,\n\r]")
# Every char for which str.isspace() is true, except " ", "\n" and "\r" (line breaks separate tags); an explicit
# class is several times faster to search than a negated \S.
_ODD_SPACE = re.compile(
    "[\t\x0b\x0c\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)


def normalize_tag(tag: str) -> str:
    """Trim a tag and collapse its inner whitespace to single spaces.

    Args:
        tag (str): one tag as written.

    Returns:
        str: the normalised tag ("" for a blank one).
    """
    return " ".join(tag.split())


def parse_tags(text: str) -> list[str]:
    """Split a caption into normalised tags.

    Args:
        text (str): the caption, e.g. ``"1girl,  solo , long  hair"``.

    Returns:
        list[str]: ``["1girl", "solo", "long hair"]``; blank tags are dropped.
    """
    if "\\" in text:
        parts = [normalize_tag(p) for p in _SEPARATOR.split(text)]
        return [tag for tag in parts if tag]
    if "\n" in text or "\r" in text:
        parts = text.replace("\r", "\n").replace("\n", ",").split(",")
    else:
        parts = text.split(",")
    if "  " not in text and _ODD_SPACE.search(text) is None:  # single plain spaces only: trimming is enough
        return [tag for tag in map(str.strip, parts) if tag]
    out = []
    for part in parts:
        tag = " ".join(part.split())
        if tag:
            out.append(tag)
    return out


def join_tags(tags: Iterable[str]) -> str:
    """Join tags into a caption with ``", "``.

    Args:
        tags (Iterable[str]): tags in order.

    Returns:
        str: the caption text.
    """
    return ", ".join(tags)


def as_tag_list(tags: str | Iterable[str]) -> list[str]:
    """User-given tags as a normalised list.

    Args:
        tags (str | Iterable[str]): a caption-like str (``"a, b"``), or tags (each may hold several).

    Returns:
        list[str]: the tags; a str is never split into characters.
    """
    return _clean(tags)


def _clean(tags: Iterable[str]) -> list[str]:
    """Normalise user-given tags (each may itself hold several comma-separated tags; a str is one caption)."""
    if isinstance(tags, str):
        return parse_tags(tags)
    out: list[str] = []
    for tag in tags:
        out.extend(parse_tags(tag))
    return out


def add_tags(tags: Sequence[str], new: Iterable[str], front: bool = False) -> list[str]:
    """Add tags that are not present yet, at the end or at the front (in the given order).

    Tags already present stay where they are; use `move_to_front` to move them.

    Args:
        tags (Sequence[str]): current tags.
        new (Iterable[str]): tags to add.
        front (bool, optional): put them first. Defaults to False (append).

    Returns:
        list[str]: the new tag list.
    """
    present = set(tags)
    added: list[str] = []
    for tag in _clean(new):
        if tag not in present:
            present.add(tag)
            added.append(tag)
    if not added:
        return list(tags)
    return added + list(tags) if front else list(tags) + added


def remove_tags(tags: Sequence[str], remove: Iterable[str]) -> list[str]:
    """Remove every occurrence of the given tags (exact match after normalisation).

    Args:
        tags (Sequence[str]): current tags.
        remove (Iterable[str]): tags to remove.

    Returns:
        list[str]: the remaining tags in order.
    """
    gone = set(_clean(remove))
    return [t for t in tags if t not in gone]


def replace_text(tags: Sequence[str], old: str | re.Pattern, new: str, regex: bool = False,
                 memo: dict | None = None) -> list[str]:
    """Replace text inside each tag (substring or regular expression), then re-parse.

    The replacement may hold commas (one tag becomes several) or be empty (the tag disappears).

    Args:
        tags (Sequence[str]): current tags.
        old (str | re.Pattern): the text or pattern to find; a compiled pattern implies ``regex=True``.
        new (str): the replacement (``\\1`` group references work with a regex).
        regex (bool, optional): treat `old` as a regular expression. Defaults to False.
        memo (dict, optional): tag -> result cache to share across captions for the same `old`/`new` (a
            dataset has far fewer distinct tags than tag occurrences). Defaults to None (no sharing).

    Returns:
        list[str]: the new tag list.
    """
    if isinstance(old, re.Pattern) or regex:
        pattern = old if isinstance(old, re.Pattern) else re.compile(old)

        def sub(tag: str) -> str:
            return pattern.sub(new, tag)
    elif not old:
        return list(tags)
    else:
        def sub(tag: str) -> str:
            return tag.replace(old, new) if old in tag else tag
    memo = {} if memo is None else memo
    out: list[str] = []
    for tag in tags:
        got = memo.get(tag)
        if got is None:
            after = sub(tag)
            got = (tag,) if after == tag else tuple(parse_tags(after))
            memo[tag] = got
        out.extend(got)
    return out


def rename_tag(tags: Sequence[str], old: str, new: str) -> list[str]:
    """Rename a whole tag; if the new name is already present the duplicate is dropped.

    Args:
        tags (Sequence[str]): current tags.
        old (str): the tag to rename (exact match after normalisation).
        new (str): its new name; empty removes the tag.

    Returns:
        list[str]: the new tag list; the renamed tag takes the place of the old one, unless the new name was
        already present, in which case that earlier tag stays and the renamed one is dropped.
    """
    old, new_tags = normalize_tag(old), parse_tags(new)
    if old not in tags:
        return list(tags)
    out: list[str] = []
    seen = {t for t in tags if t != old}
    for tag in tags:
        if tag != old:
            out.append(tag)
            continue
        for n in new_tags:
            if n not in seen:
                seen.add(n)
                out.append(n)
    return out


def move_to_front(tags: Sequence[str], front: Iterable[str]) -> list[str]:
    """Move the given tags that are present to the front, in the given order; absent ones are not added.

    Args:
        tags (Sequence[str]): current tags.
        front (Iterable[str]): tags to move first.

    Returns:
        list[str]: the new tag list.
    """
    present = set(tags)
    first = [t for t in dict.fromkeys(_clean(front)) if t in present]
    if not first:
        return list(tags)
    chosen = set(first)
    return first + [t for t in tags if t not in chosen]


def dedupe(tags: Sequence[str]) -> list[str]:
    """Drop repeated tags, keeping each first occurrence.

    Args:
        tags (Sequence[str]): current tags.

    Returns:
        list[str]: the tags without duplicates.
    """
    return list(dict.fromkeys(tags))


def sort_tags(tags: Sequence[str], keep: int = 0) -> list[str]:
    """Sort tags alphabetically (case-insensitive), leaving the first `keep` in place (kohya keep_tokens).

    Args:
        tags (Sequence[str]): current tags.
        keep (int, optional): number of leading tags to leave in place. Defaults to 0.

    Returns:
        list[str]: the sorted tag list.
    """
    keep = max(0, keep)
    return list(tags[:keep]) + sorted(tags[keep:], key=lambda t: (t.casefold(), t))
