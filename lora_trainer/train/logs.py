"""Log writers that subscribe to training events: CSV, JSON lines and TensorBoard."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

from lora_trainer.errors import ConfigError
from lora_trainer.train.events import Failed, Finished, Paused, Sample, Step, Validation

logger = logging.getLogger(__name__)

STEP_COLUMNS = ("step", "epoch", "loss", "avg_loss", "lr", "it_per_s")
VALIDATION_COLUMNS = ("step", "epoch", "loss")


class CsvLogger:
    """Writes one row per `Step` (or per event of `kind`) to a CSV file (header first), flushed after every row.

    Args:
        path (str | Path): the `.csv` file (its folder is created).
        kind (type, optional): the event class written, defaults to `Step`; `Validation` rows are step, epoch,
            loss, then one column per concept folder (named by the first validation).
    """

    def __init__(self, path: str | Path, kind: type = Step):
        self.path = Path(path)
        self.kind = kind
        self._file = None
        self._writer = None
        self._concepts: list[str] = []

    def __call__(self, event: Any) -> None:
        if isinstance(event, self.kind):
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("w", newline="", encoding="utf-8")
                self._writer = csv.writer(self._file)
                self._writer.writerow(self._header(event))
            self._writer.writerow(self._row(event))
            self._file.flush()
        elif isinstance(event, (Finished, Failed)):
            self.close()

    def _header(self, event: Any) -> list[str]:
        if isinstance(event, Validation):
            self._concepts = sorted(event.per_concept)
            return list(VALIDATION_COLUMNS) + [f"loss_{name}" for name in self._concepts]
        return list(STEP_COLUMNS)

    def _row(self, event: Any) -> list:
        if isinstance(event, Validation):
            return [getattr(event, name) for name in VALIDATION_COLUMNS] + \
                [event.per_concept.get(name, "") for name in self._concepts]
        return [getattr(event, name) for name in STEP_COLUMNS]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def event_record(event: Any) -> dict[str, Any]:
    """A JSON-ready dict of an event: its fields plus "event" (class name) and "time"; images become a count (with
    each image's prompt number and strength).

    Args:
        event: an event dataclass.

    Returns:
        dict: the record.
    """
    record: dict[str, Any] = {"event": type(event).__name__, "time": round(time.time(), 3)}
    if isinstance(event, Sample):
        record["infos"] = [dataclasses.asdict(info) for info in event.infos]  # each image's prompt and strength
        record.update(step=event.step, images=len(event.images))
    elif isinstance(event, Paused):  # its LoRA copy is no log material (and asdict would deep-copy the model)
        record.update(step=event.step, epoch=event.epoch)
    elif dataclasses.is_dataclass(event):
        record.update(dataclasses.asdict(event))
    return record


class JsonLinesLogger:
    """Appends every event as one JSON object per line, flushed after each.

    Args:
        path (str | Path): the `.jsonl` file (its folder is created).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def __call__(self, event: Any) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(event_record(event), default=str) + "\n")
        self._file.flush()
        if isinstance(event, (Finished, Failed)):
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger:
    """Scalars `loss/current`, `loss/average`, `lr` per step, `loss/validation` (and per concept folder) per
    validation, and sample images, via torch's SummaryWriter.

    Args:
        log_dir (str | Path): the run folder TensorBoard reads.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                f"log_with: TensorBoard logging needs the tensorboard package ({exc}). Install it "
                "(pip install tensorboard) or remove log_with."
            ) from exc

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, event: Any) -> None:
        if self._writer is None:
            return
        if isinstance(event, Step):
            self._writer.add_scalar("loss/current", event.loss, event.step)
            self._writer.add_scalar("loss/average", event.avg_loss, event.step)
            self._writer.add_scalar("lr", event.lr, event.step)
        elif isinstance(event, Validation):
            self._writer.add_scalar("loss/validation", event.loss, event.step)
            for name, loss in event.per_concept.items():
                self._writer.add_scalar(f"loss/validation_{name}", loss, event.step)
        elif isinstance(event, Sample):
            self._add_images(event)
        elif isinstance(event, (Finished, Failed)):
            self.close()

    def _add_images(self, event: Sample) -> None:
        import numpy as np

        for index, image in enumerate(event.images):
            array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
            self._writer.add_image(f"sample/{index}", array, event.step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def build_log_subscribers(logging_config: Any, run_name: str) -> list[Callable[[Any], None]]:
    """The writers a `LoggingConfig` asks for: with `logging_dir` set, CSV (steps.csv, validation.csv) + JSON lines
    always, and TensorBoard when `log_with` is "tensorboard" or "all", in
    `<logging_dir>/<log_prefix><run_name>_<timestamp>/`.

    Args:
        logging_config (LoggingConfig): `log_with`, `logging_dir`, `log_prefix`.
        run_name (str): usually `output_name`.

    Returns:
        list[callable]: subscribers for an `EventBus`.
    """
    root = getattr(logging_config, "logging_dir", None)
    log_with = (getattr(logging_config, "log_with", None) or "").lower()
    if not root:
        if log_with:
            logger.warning("log_with = %r needs logging_dir; nothing is logged. Set logging_dir.", log_with)
        return []
    prefix = getattr(logging_config, "log_prefix", None) or ""
    folder = Path(root) / f"{prefix}{run_name}_{time.strftime('%Y%m%d%H%M%S')}"
    subscribers: list[Callable[[Any], None]] = [CsvLogger(folder / "steps.csv"),
                                                CsvLogger(folder / "validation.csv", Validation),
                                                JsonLinesLogger(folder / "events.jsonl")]
    if log_with in ("tensorboard", "all"):
        subscribers.append(TensorBoardLogger(folder))
    if log_with in ("wandb", "all"):
        logger.warning("log_with wandb is not supported; use tensorboard (logs are in %s)", folder)
    return subscribers
