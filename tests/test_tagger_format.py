"""Tagger output logic without a model: thresholds, MCut, formatting, trigger tags, existing-caption modes."""
from __future__ import annotations

import numpy as np
import pytest

from lora_trainer.tagging.tag_format import (KAOMOJIS, TagOptions, TagScores, build_caption, format_tag,
                                             mcut_threshold, model_tags, select_tags)
from lora_trainer.tagging.tagger_models import default_threshold

NAMES = ["general", "sensitive", "long_hair", "saber_(fate)", "^_^", "smile", "hatsune_miku", "solo"]
RATING, GENERAL, CHARACTER = np.array([0, 1]), np.array([2, 4, 5, 7]), np.array([3, 6])
PROBS = np.array([0.2, 0.7, 0.9, 0.95, 0.5, 0.3, 0.4, 0.86], np.float32)


def _select(**kw):
    return select_tags(PROBS, NAMES, RATING, GENERAL, CHARACTER, TagOptions(**kw), 0.35)


def test_fixed_thresholds_are_strict_and_per_category():
    s = _select(general_threshold=0.5, character_threshold=0.9)
    assert s.general == {"long_hair": pytest.approx(0.9), "solo": pytest.approx(0.86)}  # 0.5 is not > 0.5
    assert list(s.character) == ["saber_(fate)"]
    assert s.ratings == {"general": pytest.approx(0.2), "sensitive": pytest.approx(0.7)}
    assert s.rating == "sensitive"
    # None = the model's default (here 0.35): ^_^ at 0.5 now passes, smile at 0.3 does not.
    assert set(_select().general) == {"long_hair", "^_^", "solo"}


def test_mcut_cuts_at_the_largest_gap():
    assert mcut_threshold(np.array([0.25, 0.9, 0.3, 0.85])) == pytest.approx((0.85 + 0.3) / 2)
    assert mcut_threshold(np.array([0.5])) == 0.0
    s = _select(general_mcut=True)  # general probs 0.9, 0.86, 0.5, 0.3: largest gap between 0.86 and 0.5
    assert set(s.general) == {"long_hair", "solo"}


def test_character_mcut_has_a_floor():
    probs = PROBS.copy()
    probs[CHARACTER] = [0.12, 0.02]  # MCut alone would be 0.07; the floor of 0.15 keeps both out
    s = select_tags(probs, NAMES, RATING, GENERAL, CHARACTER, TagOptions(character_mcut=True), 0.35)
    assert s.character == {}
    s = _select(character_mcut=True)  # 0.95 and 0.4 -> threshold 0.675
    assert list(s.character) == ["saber_(fate)"]


def test_include_characters_off():
    assert _select(include_characters=False).character == {}


SCORES = TagScores(ratings={"general": 0.9, "sensitive": 0.1},
                   general={"long_hair": 0.6, "^_^": 0.9, "bow_(weapon)": 0.4, "smile": 0.6},
                   character={"saber_(fate)": 0.95})


def test_format_underscores_kaomoji_and_escapes():
    assert format_tag("long_hair", TagOptions()) == "long hair"
    for kaomoji in ("^_^", ">_<", "o_o", "(o)_(o)", "||_||"):
        assert kaomoji in KAOMOJIS and format_tag(kaomoji, TagOptions()) == kaomoji
    assert format_tag("long_hair", TagOptions(replace_underscores=False)) == "long_hair"
    assert format_tag("saber_(fate)", TagOptions(escape_parentheses=True)) == "saber \\(fate\\)"
    assert format_tag("(o)_(o)", TagOptions(escape_parentheses=True)) == "\\(o\\)_\\(o\\)"


def test_sort_by_confidence_or_alpha_characters_first():
    # Confidence ties (0.6) are broken by name.
    assert model_tags(SCORES, TagOptions()) == ["saber (fate)", "^_^", "long hair", "smile", "bow (weapon)"]
    assert model_tags(SCORES, TagOptions(sort="alpha")) == ["saber (fate)", "^_^", "bow (weapon)", "long hair",
                                                          "smile"]


def test_rating_and_exclude():
    tags = model_tags(SCORES, TagOptions(include_rating=True, exclude_tags=("long_hair", "Smile", "saber \\(fate\\)")))
    assert tags == ["general", "^_^", "bow (weapon)"]


def test_trigger_tags_keep_their_order_first_or_last():
    opts = TagOptions(trigger_tags=("mychar", "style x"), existing="overwrite")
    assert build_caption(["a", "b"], None, opts) == "mychar, style x, a, b"
    opts = TagOptions(trigger_tags=("mychar", "style x"), trigger_position="append", existing="overwrite")
    assert build_caption(["a", "b"], "old", opts) == "a, b, mychar, style x"
    # A trigger already in the caption moves to its place instead of appearing twice.
    opts = TagOptions(trigger_tags=("mychar",), existing="append")
    assert build_caption(["a", "mychar"], "mychar, old", opts) == "mychar, old, a"


@pytest.mark.parametrize("mode, expected", [
    ("skip", None),
    ("overwrite", "smile, long hair"),
    ("append", "old tag, long_hair, smile"),
    ("prepend", "smile, long hair, old tag"),
])
def test_existing_caption_modes(mode, expected):
    assert build_caption(["smile", "long hair"], "old tag,  long_hair", TagOptions(existing=mode)) == expected


def test_no_existing_caption_is_written_in_every_mode_and_duplicates_optional():
    for mode in ("skip", "overwrite", "append", "prepend"):
        assert build_caption(["a", "b"], None, TagOptions(existing=mode)) == "a, b"
    opts = TagOptions(existing="append", remove_duplicates=False)
    assert build_caption(["smile"], "smile", opts) == "smile, smile"


def test_options_validation_names_the_key():
    with pytest.raises(ValueError, match="general_threshold"):
        TagOptions(general_threshold=1.5)
    with pytest.raises(ValueError, match="existing"):
        TagOptions(existing="merge")
    with pytest.raises(ValueError, match="sort"):
        TagOptions(sort="random")
    assert TagOptions(caption_extension="caption").caption_extension == ".caption"
    opts = TagOptions(trigger_tags="mychar,  my style", exclude_tags=["solo", " "])  # text box input
    assert (opts.trigger_tags, opts.exclude_tags) == (("mychar", "my style"), ("solo",))


def test_default_thresholds_of_known_models():
    assert default_threshold("wd-vit-tagger-v3") == pytest.approx(0.2614)
    assert default_threshold("SmilingWolf_wd-v1-4-moat-tagger-v2") == pytest.approx(0.3771)
    assert default_threshold("wd-v1-4-swinv2-tagger-v2") == pytest.approx(0.35)  # no published figure
    assert default_threshold("my-own-tagger") == pytest.approx(0.35)
