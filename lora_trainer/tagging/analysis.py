"""Dataset analysis on captions: tag frequency, concept balance, tag associations, near-universal tags.

All functions are pure: they take `CaptionRecord`s (the editor gives them with `TagEditor.records()`) and
return dataclasses.
"""
from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class CaptionRecord:
    """One image's caption as analysis needs it.

    Attributes:
        folder: its concept folder, relative to the dataset root (e.g. ``"10_mychar"``).
        concept: the concept name (``"mychar"``).
        repeats: kohya repeats of the folder (0: a plain folder kohya does not train).
        tags: the caption's tags.
    """

    folder: str
    concept: str
    repeats: int
    tags: tuple[str, ...]


@dataclass(frozen=True)
class TagCount:
    """A tag, the number of images whose caption holds it, and that number's share of the images."""

    tag: str
    count: int
    share: float


@dataclass(frozen=True)
class ConceptRow:
    """One concept folder's weight in an epoch: ``weight = images * repeats``, ``share = weight / total``."""

    folder: str
    concept: str
    images: int
    repeats: int
    weight: int
    share: float


@dataclass(frozen=True)
class ConceptBalance:
    """Concept folders, heaviest first, with warnings.

    Attributes:
        rows: trained concept folders (repeats > 0), by weight descending.
        total_weight: images x repeats summed: the samples in one epoch.
        ratio: heaviest weight / lightest weight (1.0 with fewer than two concepts).
        warnings: one per concept outweighed by more than `max_ratio`, with the fix; and plain folders.
        untrained: folders without the ``N_`` prefix (kohya skips them).
    """

    rows: list[ConceptRow]
    total_weight: int
    ratio: float
    warnings: list[str]
    untrained: list[str]


@dataclass(frozen=True)
class Association:
    """Two tags that occur together more than chance predicts.

    `tag_a` is the rarer tag, so ``p_b_given_a`` reads "when tag_a is there, tag_b is there this often"
    (``rain -> umbrella``). ``lift = P(a,b) / (P(a) P(b))``; ``pmi = log2(lift)``.
    """

    tag_a: str
    tag_b: str
    count_a: int
    count_b: int
    count_ab: int
    lift: float
    pmi: float
    p_b_given_a: float
    p_a_given_b: float


@dataclass(frozen=True)
class UniversalTag:
    """A tag present in nearly every image of one concept: a candidate to prune so the trigger word absorbs it.

    `is_trigger` marks the concept's own name (the trigger word), which is meant to be everywhere.
    """

    folder: str
    concept: str
    tag: str
    count: int
    images: int
    share: float
    is_trigger: bool


@dataclass(frozen=True)
class DatasetReport:
    """Everything `analyze` computes."""

    images: int
    frequency: list[TagCount]
    balance: ConceptBalance
    associations: list[Association]
    universal: list[UniversalTag]


def sorted_counts(counts: Mapping[str, int], images: int, sort: str = "count") -> list[TagCount]:
    """Turn tag counts into sorted `TagCount` rows.

    Args:
        counts (Mapping[str, int]): tag -> number of images holding it.
        images (int): number of images (for the share).
        sort (str, optional): "count" (descending, then name) or "name". Defaults to "count".

    Returns:
        list[TagCount]: the rows.
    """
    if sort == "count":
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    elif sort == "name":
        items = sorted(counts.items(), key=lambda kv: (kv[0].casefold(), kv[0]))
    else:
        raise ValueError(f"sort: {sort!r} is not a sort order. Use 'count' or 'name'.")
    denom = max(images, 1)
    return [TagCount(tag, n, n / denom) for tag, n in items if n > 0]


def tag_frequency(records: Sequence[CaptionRecord], sort: str = "count") -> list[TagCount]:
    """Count in how many images each tag occurs (a tag repeated in one caption counts once).

    Args:
        records (Sequence[CaptionRecord]): the captions.
        sort (str, optional): "count" or "name". Defaults to "count".

    Returns:
        list[TagCount]: one row per tag.
    """
    counts: Counter = Counter()
    for rec in records:
        counts.update(set(rec.tags))
    return sorted_counts(counts, len(records), sort)


def concept_balance(records: Iterable[CaptionRecord], max_ratio: float = 2.0) -> ConceptBalance:
    """Weigh concept folders by images x repeats and warn when one outweighs another by more than `max_ratio`.

    Advice followed: keep images x repeats about equal across concepts, so each concept gets a similar
    number of steps per epoch.

    Args:
        records (Iterable[CaptionRecord]): the captions (only folder, concept and repeats are used).
        max_ratio (float, optional): the largest tolerated weight ratio. Defaults to 2.0.

    Returns:
        ConceptBalance: rows heaviest first, the ratio, warnings and untrained folders.
    """
    groups: dict[str, list] = {}
    for rec in records:
        group = groups.setdefault(rec.folder, [rec.concept, rec.repeats, 0])
        group[2] += 1
    trained = {f: g for f, g in groups.items() if g[1] > 0}
    untrained = sorted(f for f, g in groups.items() if g[1] <= 0)
    total = sum(g[1] * g[2] for g in trained.values())
    rows = [
        ConceptRow(folder, concept, images, repeats, images * repeats, images * repeats / total if total else 0.0)
        for folder, (concept, repeats, images) in trained.items()
    ]
    rows.sort(key=lambda r: (-r.weight, r.folder))
    warnings = [
        f"{folder}: no N_ repeat prefix, so kohya does not train its {groups[folder][2]} images. "
        f"Rename it to e.g. 10_{groups[folder][0]} to train them."
        for folder in untrained
    ]
    ratio = rows[0].weight / rows[-1].weight if len(rows) > 1 else 1.0
    if rows:
        heavy = rows[0]
        for row in rows[1:]:
            if heavy.weight > max_ratio * row.weight:
                suggest = max(1, round(heavy.weight / row.images))
                name = row.folder.rsplit("/", 1)[-1]
                warnings.append(
                    f"{heavy.folder} (images x repeats = {heavy.weight}) outweighs {row.folder} ({row.weight}) by "
                    f"{heavy.weight / row.weight:.1f}x: keep images x repeats about equal across concepts, e.g. "
                    f"rename {name} to {suggest}_{row.concept} or lower the repeats of {heavy.folder}."
                )
    return ConceptBalance(rows, total, ratio, warnings, untrained)


def _pair_counts(tag_sets: list[set], index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images holding each pair of indexed tags -> (first ids, second ids, counts), first id < second id.

    Vectorised per caption length: the ids of all captions with k indexed tags form an (m, k) array whose
    upper-triangle column pairs are every pair once; pairs are encoded as ``a * T + b`` and counted with
    `np.unique`, so memory grows with the number of pairs present, not with T squared.
    """
    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for tags in tag_sets:
        ids = sorted(index[t] for t in tags if t in index)
        if len(ids) >= 2:
            by_len[len(ids)].append(ids)
    width = len(index)
    codes = []
    for k, rows in by_len.items():
        arr = np.asarray(rows, dtype=np.int64)
        iu, ju = np.triu_indices(k, 1)
        codes.append((arr[:, iu] * width + arr[:, ju]).ravel())
    if not codes:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    pairs, counts = np.unique(np.concatenate(codes), return_counts=True)
    return pairs // width, pairs % width, counts


def associations(
    records: Sequence[CaptionRecord], min_count: int = 3, min_lift: float = 2.0, limit: int | None = 50
) -> list[Association]:
    """Tag pairs that co-occur far more than chance: high lift, at least `min_count` images together.

    Args:
        records (Sequence[CaptionRecord]): the captions.
        min_count (int, optional): least number of images holding both tags. Defaults to 3.
        min_lift (float, optional): least lift (2.0 = twice as often as if independent). Defaults to 2.0.
        limit (int | None, optional): keep the strongest N pairs; None keeps all. Defaults to 50.

    Returns:
        list[Association]: by lift descending, then joint count descending.
    """
    n = len(records)
    tag_sets = [set(rec.tags) for rec in records]
    counts: Counter = Counter()
    for tags in tag_sets:
        counts.update(tags)
    frequent = sorted(t for t, c in counts.items() if c >= max(min_count, 1))
    if n == 0 or len(frequent) < 2:
        return []
    index = {t: i for i, t in enumerate(frequent)}
    first, second, joint = _pair_counts(tag_sets, index)
    single = np.array([counts[t] for t in frequent], dtype=np.float64)
    lift = joint * n / (single[first] * single[second])
    keep = np.nonzero((joint >= min_count) & (lift >= min_lift))[0]
    keep = keep[np.lexsort((-joint[keep], -lift[keep]))]  # strongest first; only the kept rows become objects
    if limit is not None:
        keep = keep[:limit]
    out = []
    for k in keep.tolist():
        i, j = int(first[k]), int(second[k])
        a, b = (i, j) if (single[i], frequent[i]) <= (single[j], frequent[j]) else (j, i)
        n_a, n_b, n_ab, value = int(single[a]), int(single[b]), int(joint[k]), float(lift[k])
        out.append(Association(frequent[a], frequent[b], n_a, n_b, n_ab, value, math.log2(value), n_ab / n_a, n_ab / n_b))
    out.sort(key=lambda r: (-r.lift, -r.count_ab, r.tag_a, r.tag_b))
    return out


def near_universal_tags(records: Iterable[CaptionRecord], threshold: float = 0.9, min_images: int = 3) -> list[UniversalTag]:
    """Tags present in at least `threshold` of a concept folder's images.

    Such tags describe what every image of the concept shares (hair colour, outfit); pruning them lets the
    trigger word absorb them.

    Args:
        records (Iterable[CaptionRecord]): the captions.
        threshold (float, optional): least share of the folder's images. Defaults to 0.9.
        min_images (int, optional): folders with fewer images are skipped. Defaults to 3.

    Returns:
        list[UniversalTag]: by folder, then share descending, then tag.
    """
    by_folder: dict[str, list[CaptionRecord]] = defaultdict(list)
    for rec in records:
        by_folder[rec.folder].append(rec)
    out = []
    for folder in sorted(by_folder):
        recs = by_folder[folder]
        if len(recs) < min_images:
            continue
        counts: Counter = Counter()
        for rec in recs:
            counts.update(set(rec.tags))
        concept = recs[0].concept
        trigger = concept.replace("_", " ").casefold()
        for tag, count in counts.items():
            share = count / len(recs)
            if share >= threshold:
                is_trigger = tag.casefold() in (concept.casefold(), trigger)
                out.append(UniversalTag(folder, concept, tag, count, len(recs), share, is_trigger))
    out.sort(key=lambda u: (u.folder, -u.share, u.tag))
    return out


def analyze(
    records: Sequence[CaptionRecord],
    min_count: int = 3,
    min_lift: float = 2.0,
    universal_threshold: float = 0.9,
    max_ratio: float = 2.0,
) -> DatasetReport:
    """Run every analysis on the captions.

    Args:
        records (Sequence[CaptionRecord]): the captions.
        min_count (int, optional): see `associations`. Defaults to 3.
        min_lift (float, optional): see `associations`. Defaults to 2.0.
        universal_threshold (float, optional): see `near_universal_tags`. Defaults to 0.9.
        max_ratio (float, optional): see `concept_balance`. Defaults to 2.0.

    Returns:
        DatasetReport: frequency, balance, associations and near-universal tags.
    """
    return DatasetReport(
        images=len(records),
        frequency=tag_frequency(records),
        balance=concept_balance(records, max_ratio),
        associations=associations(records, min_count, min_lift),
        universal=near_universal_tags(records, universal_threshold),
    )
