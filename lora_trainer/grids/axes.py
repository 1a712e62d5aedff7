"""Grid axes: strength, snapshot and seed values with the labels drawn beside the grid (as the WebUI's X/Y/Z plot
labels its axes: "<axis>: <value>")."""
from __future__ import annotations

import re
from dataclasses import dataclass

from lora_trainer.errors import ConfigError

AXIS_KINDS = ("strength", "snapshot", "seed")
DEFAULT_STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# "0-1 [6]" = six values from 0 to 1; "0-1 (+0.25)" = 0 to 1 in steps of 0.25 (the WebUI's range syntax)
_COUNT_RANGE = re.compile(r"^\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*\[\s*(\d+)\s*\]\s*$")
_STEP_RANGE = re.compile(r"^\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*\(\s*\+?\s*([\d.]+)\s*\)\s*$")


@dataclass(frozen=True)
class Axis:
    """One axis of a grid.

    Attributes:
        kind (str): one of AXIS_KINDS.
        values (tuple): floats (strength), ints (seed) or snapshot objects (snapshot).
        labels (tuple[str, ...]): one label per value, drawn beside its row, column or sub-grid.
    """

    kind: str
    values: tuple
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.values)


def format_strength(value: float) -> str:
    """A strength as users type it: 0.2, 1, 0.75."""
    return f"{value:g}"


def strength_axis(values=DEFAULT_STRENGTHS) -> Axis:
    """The LoRA strength axis (0 = the base model).

    Args:
        values (Sequence[float], optional): strengths, defaults to DEFAULT_STRENGTHS.

    Returns:
        Axis: labels "Strength: 0.2".
    """
    values = tuple(float(v) for v in values)
    _check_values("strengths", values)
    return Axis("strength", values, tuple(f"Strength: {format_strength(v)}" for v in values))


def seed_axis(seeds) -> Axis:
    """The seed axis.

    Args:
        seeds (Sequence[int]): initial noise seeds.

    Returns:
        Axis: labels "Seed: 1234".
    """
    seeds = tuple(int(s) for s in seeds)
    _check_values("seeds", seeds)
    return Axis("seed", seeds, tuple(f"Seed: {s}" for s in seeds))


def snapshot_axis(snapshots, notes=None) -> Axis:
    """The snapshot axis: saved epoch/step files of a run, or the LoRA still in memory.

    Args:
        snapshots (Sequence[Snapshot]): objects with a `label`.
        notes (Sequence[str], optional): one note per snapshot shown after its label in brackets ("" for none),
            e.g. its validation loss; defaults to none.

    Returns:
        Axis: the snapshots' own labels, "epoch 4 (best val 0.1234)" with a note.
    """
    snapshots = tuple(snapshots)
    _check_values("snapshots", snapshots)
    notes = tuple(notes) if notes is not None else ("",) * len(snapshots)
    if len(notes) != len(snapshots):
        raise ValueError(f"snapshot notes: {len(notes)} notes for {len(snapshots)} snapshots. Give one per snapshot.")
    return Axis("snapshot", snapshots, tuple(f"{s.label} ({note})" if note else s.label
                                             for s, note in zip(snapshots, notes)))


def _check_values(key: str, values: tuple) -> None:
    if not values:
        raise ConfigError(f"{key}: no value given. Give at least one.")
    if len(set(map(id, values)) if key == "snapshots" else set(values)) != len(values):
        raise ConfigError(f"{key}: {values} repeats a value. Give each value once.")


def parse_numbers(text: str, key: str, integer: bool = False) -> list:
    """Parse "0, 0.2, 0.5", "0-1 [6]" or "0-1 (+0.25)" as the WebUI's X/Y/Z plot reads axis values.

    Args:
        text (str): the values.
        key (str): the field name, for messages.
        integer (bool, optional): values must be whole numbers (seeds), defaults to False.

    Returns:
        list[float] | list[int]: the values in order.

    Raises:
        ConfigError: a value is not a number, or nothing is given.
    """
    cast = int if integer else float
    values: list = []
    for part in (p for p in str(text).split(",") if p.strip()):
        count, step = _COUNT_RANGE.match(part), _STEP_RANGE.match(part)
        try:
            if count:
                start, end, n = float(count[1]), float(count[2]), int(count[3])
                values += [cast(round(start + (end - start) * i / max(n - 1, 1), 6)) for i in range(n)]
            elif step:
                start, end, inc = float(step[1]), float(step[2]), float(step[3])
                n = int((end - start) / inc + 1e-9) + 1 if inc > 0 else 1
                values += [cast(round(start + inc * i, 6)) for i in range(n)]
            else:
                values.append(cast(part.strip()))
        except ValueError:
            noun = "a whole number" if integer else "a number"
            raise ConfigError(f"{key}: {part.strip()!r} is not {noun}. Write e.g. 0, 0.5, 1 or 0-1 [5].") from None
    if not values:
        raise ConfigError(f"{key}: no value given. Write e.g. 0, 0.5, 1 or 0-1 [5].")
    return values


__all__ = ["AXIS_KINDS", "DEFAULT_STRENGTHS", "Axis", "format_strength", "parse_numbers", "seed_axis",
           "snapshot_axis", "strength_axis"]
