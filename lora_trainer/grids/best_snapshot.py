"""Which snapshot of a run had the lowest validation loss: each saved file's step (its `ss_steps`), the validation
loss measured at that step (the run's `validation.csv`, or a job's status), and the axis notes that mark it
("epoch 4 (best val 0.1234)")."""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import ConfigError
from lora_trainer.train.ema import METADATA_KEY as EMA_METADATA_KEY


@dataclass(frozen=True)
class SnapshotValidation:
    """A snapshot's validation loss.

    Attributes:
        label (str): the snapshot's label (or a file path).
        step (int, optional): the training step it holds, None when unknown.
        loss (float, optional): the validation loss measured at that step, None when none was.
        best (bool): it has the lowest loss of the snapshots compared (several when they hold the same step).
    """

    label: str
    step: int | None
    loss: float | None
    best: bool = False

    def note(self) -> str:
        """The axis note: "best val 0.1234", "val 0.2000", or "" without a loss."""
        if self.loss is None:
            return ""
        return f"{'best ' if self.best else ''}val {self.loss:.4f}"

    def describe(self) -> dict:
        """As plain data (PNG text, API answers): label, step, validation_loss."""
        return {"label": self.label, "step": self.step, "validation_loss": self.loss}


def read_validation_csv(path: str | Path) -> dict[int, float]:
    """The total validation loss per step from a run's `validation.csv` (columns step, epoch, loss, ...).

    Args:
        path (str | Path): the file the training logs wrote (`<logging_dir>/<run>/validation.csv`).

    Returns:
        dict[int, float]: step -> loss (non-finite values left out).

    Raises:
        FileNotFoundError: no such file. ConfigError: the file has no step/loss columns or a value is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: validation file not found. Give the validation.csv of the run's log folder.")
    losses: dict[int, float] = {}
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        if not {"step", "loss"} <= set(reader.fieldnames or ()):
            raise ConfigError(f"{path}: no 'step' and 'loss' columns. Give the validation.csv a training run wrote.")
        for row in reader:
            try:
                step, loss = int(row["step"]), float(row["loss"])
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: row {row} holds a value that is not a number. Fix or remove it.") from None
            if math.isfinite(loss):
                losses[step] = loss
    return losses


def lora_file_step(path: str | Path) -> int | None:
    """The training step a LoRA file holds (kohya's `ss_steps`), read from its header only.

    Args:
        path (str | Path): a `.safetensors` LoRA.

    Returns:
        int | None: the step, None when the file does not record it, or holds averaged (EMA) weights: the
        validation loss was measured on the raw ones.
    """
    if Path(path).suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if EMA_METADATA_KEY in metadata:
        return None
    value = metadata.get("ss_steps")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def rank_snapshots(snapshots: Iterable[tuple[str, int | None]],
                   losses: Mapping[int, float]) -> list[SnapshotValidation]:
    """Each snapshot's validation loss (measured at its own step) and which is best (the lowest).

    Args:
        snapshots (Iterable[tuple[str, int | None]]): (label, step) per snapshot, in axis order.
        losses (Mapping[int, float]): the run's validation loss per step.

    Returns:
        list[SnapshotValidation]: one per snapshot, in order; no `best` when no snapshot has a loss.
    """
    found = [(label, step, losses.get(step) if step is not None else None) for label, step in snapshots]
    known = [loss for _, _, loss in found if loss is not None and math.isfinite(loss)]
    lowest = min(known) if known else None
    return [SnapshotValidation(label, step, loss, loss is not None and loss == lowest) for label, step, loss in found]


def best_snapshot(ranked: Iterable[SnapshotValidation]) -> SnapshotValidation | None:
    """The first snapshot marked best, or None.

    Args:
        ranked (Iterable[SnapshotValidation]): from `rank_snapshots`.

    Returns:
        SnapshotValidation | None: the best one.
    """
    return next((item for item in ranked if item.best), None)


__all__ = ["SnapshotValidation", "best_snapshot", "lora_file_step", "rank_snapshots", "read_validation_csv"]
