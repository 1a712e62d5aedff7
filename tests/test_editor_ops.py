"""Pure tag operations (tagging/tag_ops.py)."""
from __future__ import annotations

import random
import re

from lora_trainer.tagging import tag_ops as ops


def test_parse_normalises_whitespace_and_drops_blanks():
    assert ops.parse_tags("  1girl,solo ,  long   hair,,\t, ") == ["1girl", "solo", "long hair"]
    assert ops.parse_tags("") == []


def test_parse_keeps_escaped_parentheses_and_commas():
    text = r"hatsune miku \(cosplay\), (smile:1.2), a\, b"
    assert ops.parse_tags(text) == [r"hatsune miku \(cosplay\)", "(smile:1.2)", r"a\, b"]
    assert ops.join_tags(ops.parse_tags(text)) == text


def test_parse_treats_line_breaks_as_separators():
    assert ops.parse_tags("cat, rain\r\numbrella\n\nsky") == ["cat", "rain", "umbrella", "sky"]


def test_add_at_end_and_front_skips_present():
    tags = ["cat", "rain"]
    assert ops.add_tags(tags, ["umbrella", "cat"]) == ["cat", "rain", "umbrella"]
    assert ops.add_tags(tags, ["trigger, style"], front=True) == ["trigger", "style", "cat", "rain"]
    assert tags == ["cat", "rain"], "input must not be mutated"


def test_remove_every_occurrence():
    assert ops.remove_tags(["a", "b", "a", "c"], [" a ", "c"]) == ["b"]


def test_replace_plain_inside_tags_and_splitting():
    tags = ["long hair", "blue hair", "smile"]
    assert ops.replace_text(tags, "hair", "fur") == ["long fur", "blue fur", "smile"]
    assert ops.replace_text(tags, "smile", "smile, open mouth") == ["long hair", "blue hair", "smile", "open mouth"]
    assert ops.replace_text(tags, "smile", "") == ["long hair", "blue hair"]
    assert ops.replace_text(tags, "", "x") == tags


def test_replace_regex_with_groups_keeps_escapes():
    tags = [r"artist \(style\)", "1girl", "2girls"]
    assert ops.replace_text(tags, r"^(\d)girls?$", r"\1 person", regex=True) == [r"artist \(style\)", "1 person", "2 person"]
    assert ops.replace_text(tags, re.compile(r"\\\((.*)\\\)"), r"[\1]") == ["artist [style]", "1girl", "2girls"]


def test_rename_whole_tag_only_and_merge():
    assert ops.rename_tag(["hair", "long hair"], "hair", "fur") == ["fur", "long hair"]
    assert ops.rename_tag(["a", "b", "c"], "a", "c") == ["b", "c"]
    assert ops.rename_tag(["a", "b", "a"], "a", "z") == ["z", "b"]
    assert ops.rename_tag(["a", "b"], "x", "y") == ["a", "b"]
    assert ops.rename_tag(["a", "b"], "a", "") == ["b"]


def test_move_to_front_only_present_in_given_order():
    assert ops.move_to_front(["a", "b", "c", "d"], ["d", "x", "c"]) == ["d", "c", "a", "b"]
    assert ops.move_to_front(["a", "b"], ["x"]) == ["a", "b"]


def test_dedupe_keeps_first():
    assert ops.dedupe(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_sort_keeps_leading_tags():
    assert ops.sort_tags(["trigger", "b", "A", "c"], keep=1) == ["trigger", "A", "b", "c"]
    assert ops.sort_tags(["b", "a"]) == ["a", "b"]


def test_fast_parse_path_agrees_with_full_normalisation():
    odd = {chr(c) for c in range(0x3001) if chr(c).isspace()} - {" ", "\n", "\r"}
    assert {c for c in odd if ops._ODD_SPACE.search(c)} == odd, "every other whitespace char takes the slow path"
    rng = random.Random(0)
    alphabet = list("ab, \n\r\\()") + sorted(odd) + ["  "]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        expected = [t for t in (" ".join(p.split()) for p in re.split(r"(?<!\\)[,\n\r]", text)) if t]
        assert ops.parse_tags(text) == expected, repr(text)


def test_replace_memo_is_shared_and_exact():
    memo: dict = {}
    first = ops.replace_text(["long hair", "smile"], "hair", "fur, soft", memo=memo)
    second = ops.replace_text(["smile", "long hair", "long hair"], "hair", "fur, soft", memo=memo)
    assert first == ["long fur", "soft", "smile"]
    assert second == ["smile", "long fur", "soft", "long fur", "soft"]
    assert memo["long hair"] == ("long fur", "soft")
