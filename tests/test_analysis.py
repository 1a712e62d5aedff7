"""Dataset analysis on constructed captions with a known association and a known imbalance."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from lora_trainer.tagging import TagEditor
from lora_trainer.tagging.analysis import (
    CaptionRecord,
    analyze,
    associations,
    concept_balance,
    near_universal_tags,
    tag_frequency,
)


def build_records(seed: int = 0) -> list[CaptionRecord]:
    """40 images of `10_hero` (rain always with umbrella; blue eyes in 39) and 10 of `2_villain`."""
    rng = random.Random(seed)
    noise = [f"n{i}" for i in range(12)]
    records = []
    for i in range(40):
        tags = ["hero"] + rng.sample(noise, 4)
        if i % 4 == 0:
            tags += ["rain", "umbrella"]
        elif i % 13 == 1:
            tags += ["umbrella"]
        if i != 7:
            tags.append("blue eyes")
        if i < 34:
            tags.append("red scarf")  # 85%: below the 90% threshold
        records.append(CaptionRecord("10_hero", "hero", 10, tuple(tags)))
    for _ in range(10):
        records.append(CaptionRecord("2_villain", "villain", 2, tuple(["villain", "cape"] + rng.sample(noise, 4))))
    return records


def brute_force_pairs(records):
    counts = {}
    for rec in records:
        for a, b in itertools.combinations(sorted(set(rec.tags)), 2):
            counts[(a, b)] = counts.get((a, b), 0) + 1
    return counts


def test_rain_predicts_umbrella():
    records = build_records()
    rows = associations(records, min_count=3, min_lift=2.0, limit=None)
    pair = next(r for r in rows if {r.tag_a, r.tag_b} == {"rain", "umbrella"})
    n_rain, n_umbrella = 10, 10 + 3  # i % 13 == 1 adds umbrella at i = 1, 14, 27 (i = 40 is out of range)
    assert (pair.tag_a, pair.tag_b) == ("rain", "umbrella")
    assert (pair.count_a, pair.count_b, pair.count_ab) == (n_rain, n_umbrella, n_rain)
    assert pair.p_b_given_a == 1.0
    assert pair.lift == pytest.approx(n_rain * 50 / (n_rain * n_umbrella))
    assert pair.pmi == pytest.approx(math.log2(pair.lift))


def test_associations_match_brute_force_and_filters():
    records = build_records(seed=3)
    rows = associations(records, min_count=3, min_lift=1.5, limit=None)
    pairs = brute_force_pairs(records)
    single = {t.tag: t.count for t in tag_frequency(records)}
    expected = set()
    for (a, b), n_ab in pairs.items():
        if n_ab >= 3 and single[a] >= 3 and single[b] >= 3 and n_ab * len(records) / (single[a] * single[b]) >= 1.5:
            expected.add(frozenset((a, b)))
    assert {frozenset((r.tag_a, r.tag_b)) for r in rows} == expected
    for r in rows:
        assert r.count_ab == pairs[tuple(sorted((r.tag_a, r.tag_b)))]
        assert r.count_a <= r.count_b
    assert [r.lift for r in rows] == sorted((r.lift for r in rows), reverse=True)
    assert len(associations(records, min_count=3, min_lift=1.5, limit=5)) == min(5, len(rows))
    assert all(r.count_ab >= 8 for r in associations(records, min_count=8, min_lift=1.0, limit=None))


def test_independent_tags_are_not_reported():
    records = [CaptionRecord("1_a", "a", 1, (x, y)) for x in ("p", "q") for y in ("s", "t") for _ in range(5)]
    assert associations(records, min_count=1, min_lift=1.01) == []
    assert associations([], min_count=1) == []


def test_imbalance_warning_names_both_folders_and_fix():
    balance = concept_balance(build_records())
    assert [(r.folder, r.images, r.repeats, r.weight) for r in balance.rows] == [("10_hero", 40, 10, 400), ("2_villain", 10, 2, 20)]
    assert balance.total_weight == 420
    assert balance.rows[0].share == pytest.approx(400 / 420)
    assert balance.ratio == pytest.approx(20.0)
    assert len(balance.warnings) == 1
    warning = balance.warnings[0]
    assert "10_hero" in warning and "2_villain" in warning and "20.0x" in warning
    assert "40_villain" in warning, "suggests repeats that equalise images x repeats"


def test_balanced_concepts_do_not_warn_but_plain_folders_do():
    records = [CaptionRecord("10_a", "a", 10, ("a",))] * 10 + [CaptionRecord("5_b", "b", 5, ("b",))] * 15
    records += [CaptionRecord("extra", "extra", 0, ("c",))] * 3
    balance = concept_balance(records)
    assert balance.ratio == pytest.approx(100 / 75)
    assert balance.untrained == ["extra"]
    assert len(balance.warnings) == 1 and "extra" in balance.warnings[0] and "10_extra" in balance.warnings[0]


def test_near_universal_tags_per_concept():
    rows = near_universal_tags(build_records(), threshold=0.9)
    hero = {(r.tag, r.count, r.is_trigger) for r in rows if r.folder == "10_hero"}
    assert hero == {("hero", 40, True), ("blue eyes", 39, False)}
    villain = {r.tag for r in rows if r.folder == "2_villain"}
    assert villain == {"villain", "cape"}
    assert near_universal_tags(build_records(), min_images=50) == []


def test_frequency_counts_each_image_once():
    records = [CaptionRecord("1_a", "a", 1, ("x", "x", "y")), CaptionRecord("1_a", "a", 1, ("y",))]
    assert [(r.tag, r.count, r.share) for r in tag_frequency(records)] == [("y", 2, 1.0), ("x", 1, 0.5)]
    assert [r.tag for r in tag_frequency(records, sort="name")] == ["x", "y"]
    with pytest.raises(ValueError, match="sort"):
        tag_frequency(records, sort="size")


def test_analyze_editor_dataset(tmp_path):
    root = tmp_path / "ds"
    for rec_i, rec in enumerate(build_records()):
        folder = root / rec.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{rec_i:03d}.png").write_bytes(b"")
        (folder / f"{rec_i:03d}.txt").write_text(", ".join(rec.tags), encoding="utf-8")
    editor = TagEditor.load(root)
    report = analyze(editor.records())
    assert report.images == 50
    assert ("rain", "umbrella") in {(a.tag_a, a.tag_b) for a in report.associations}
    assert len(report.balance.warnings) == 1
    editor.remove_tags(["blue eyes"], scope="all")
    after = analyze(editor.records())
    assert "blue eyes" not in {u.tag for u in after.universal}
