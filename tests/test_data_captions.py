"""Caption files and kohya-style caption processing."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from lora_trainer.data.caption_files import caption_path, join_lines, read_caption
from lora_trainer.data.captions import CaptionOptions, has_wildcards, is_fixed, process_caption
from lora_trainer.errors import ConfigError

# --- caption files ---------------------------------------------------------------------------------------------


def test_read_utf8_with_bom_and_newlines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeff1girl, solo,\nred hair\n\n  smile  \r\n".encode("utf-8"))
    cap = read_caption(path)
    assert cap.problem is None
    assert cap.text == "1girl, solo, red hair, smile"


def test_read_non_utf8_reports_and_decodes_for_display(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café, naïve".encode("latin-1"))
    cap = read_caption(path)
    assert "latin.txt" in cap.problem and "not UTF-8" in cap.problem and "re-save it as UTF-8" in cap.problem
    assert cap.text.startswith("caf") and "\ufffd" in cap.text


def test_read_utf16_reports_but_displays_text(tmp_path):
    path = tmp_path / "u16.txt"
    path.write_bytes("blue sky, cloud".encode("utf-16"))
    cap = read_caption(path)
    assert "not UTF-8" in cap.problem
    assert cap.text == "blue sky, cloud"


def test_missing_caption(tmp_path):
    cap = read_caption(tmp_path / "none.txt")
    assert cap.text == "" and cap.problem == "missing"


def test_caption_path_and_join_lines():
    assert caption_path("d/img.one.png") == "d/img.one.txt"
    assert caption_path("d/img.png", "caption") == "d/img.caption"
    assert join_lines("A photo of a cat.\nIt sleeps") == "A photo of a cat. It sleeps"
    assert join_lines("") == ""


# --- processing ------------------------------------------------------------------------------------------------

CAP = "sks, 1girl, red hair, blue eyes, smile, outdoors"


def _tags(text):
    return [t.strip() for t in text.split(",")]


def test_defaults_leave_caption_untouched():
    assert process_caption(CAP, CaptionOptions(), random.Random(0)) == CAP
    assert is_fixed(CaptionOptions())


def test_prefix_suffix_as_kohya():
    opts = CaptionOptions(caption_prefix="trigger,", caption_suffix=", masterpiece")
    assert process_caption("a, b", opts, random.Random(0)) == "trigger, a, b , masterpiece"


def test_shuffle_keeps_first_tokens_in_place():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    orders = set()
    for seed in range(30):
        out = _tags(process_caption(CAP, opts, random.Random(seed)))
        assert out[:2] == ["sks", "1girl"]
        assert sorted(out) == sorted(_tags(CAP))
        orders.add(tuple(out))
    assert len(orders) > 5
    assert not is_fixed(opts)


def test_same_seed_same_caption():
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    a = [process_caption(CAP, opts, random.Random(s)) for s in range(20)]
    b = [process_caption(CAP, opts, random.Random(s)) for s in range(20)]
    assert a == b


def test_keep_tokens_separator():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
    cap = "sks, 1girl ||| a, b, c, d, e ||| best quality"
    for seed in range(20):
        out = _tags(process_caption(cap, opts, random.Random(seed)))
        assert out[:2] == ["sks", "1girl"] and out[-1] == "best quality"
        assert sorted(out[2:-1]) == ["a", "b", "c", "d", "e"]
    # without shuffle the separator is still removed, never shown to the text encoder
    plain = process_caption(cap, CaptionOptions(keep_tokens_separator="|||"), random.Random(0))
    assert plain == "sks, 1girl, a, b, c, d, e, best quality"


def test_tag_dropout_never_drops_kept_tags():
    opts = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    lengths = []
    for seed in range(50):
        out = _tags(process_caption(CAP, opts, random.Random(seed)))
        assert out[0] == "sks"
        flex = out[1:]
        assert flex == [t for t in _tags(CAP)[1:] if t in flex]  # order kept without shuffle
        lengths.append(len(out))
    assert min(lengths) < 6 and max(lengths) > 2
    full = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=2)
    assert process_caption(CAP, full, random.Random(0)) == "sks, 1girl"


def test_caption_dropout_rate():
    opts = CaptionOptions(caption_dropout_rate=0.5)
    outs = [process_caption(CAP, opts, random.Random(s)) for s in range(60)]
    assert 10 < outs.count("") < 50
    assert all(o in ("", CAP) for o in outs)
    assert process_caption(CAP, CaptionOptions(caption_dropout_rate=1.0), random.Random(0)) == ""
    assert process_caption(CAP, CaptionOptions(), random.Random(0), drop_all=True) == ""


def test_caption_dropout_every_n_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3)
    got = [process_caption(CAP, opts, random.Random(0), epoch=e) for e in range(1, 8)]
    assert got == [CAP, CAP, "", CAP, CAP, "", CAP]
    assert process_caption(CAP, opts, random.Random(0), epoch=0) == CAP
    assert not is_fixed(opts)


def test_wildcards():
    cap = "{red|blue|green} hair, {{literal}}, smile"
    seen = set()
    for seed in range(40):
        out = process_caption(cap, CaptionOptions(), random.Random(seed))
        color = out.split(" ")[0]
        assert color in ("red", "blue", "green")
        assert out.endswith(" hair, {literal}, smile")
        seen.add(color)
    assert seen == {"red", "blue", "green"}
    assert has_wildcards(cap) and not has_wildcards("{{x|y}}, a")
    assert not is_fixed(CaptionOptions(), [CAP, cap]) and is_fixed(CaptionOptions(), [CAP])
    off = CaptionOptions(enable_wildcard=False)
    assert process_caption(cap, off, random.Random(0)) == cap
    assert is_fixed(off, [cap])


def test_secondary_separator_groups_tags():
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(10):
        out = process_caption("a, b;;;c, d", opts, random.Random(seed))
        assert "b,c" in out


def test_from_config_reads_kohya_names():
    cfg = SimpleNamespace(
        shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.2, caption_prefix=None,
        caption_dropout_every_n_epochs=0, unrelated=5,
    )
    opts = CaptionOptions.from_config(cfg)
    assert opts.shuffle_caption and opts.keep_tokens == 1 and opts.caption_tag_dropout_rate == 0.2
    assert opts.caption_prefix is None and opts.caption_separator == ","


@pytest.mark.parametrize("kw", [{"caption_dropout_rate": 1.5}, {"keep_tokens": -1}, {"caption_tag_dropout_rate": -0.1}])
def test_bad_options_name_the_key(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        CaptionOptions(**kw)
