"""A terminal progress bar that subscribes to the training events."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

from lora_trainer.progress import format_seconds


class TrainingProgressBar:
    """Event subscriber: one tqdm bar over the training steps, messages for saves. A failure is not
    printed here: the entry point prints it once."""

    def __init__(self, stream=sys.stderr):
        self._stream = stream
        self._bar: tqdm | None = None

    def __call__(self, event) -> None:
        kind = type(event).__name__
        if kind == "Started":
            self._bar = tqdm(total=event.total_steps, unit="step", file=self._stream, dynamic_ncols=True)
        elif kind == "Step" and self._bar is not None:
            self._bar.update(event.step - self._bar.n)
            eta = "?" if event.eta_s is None else format_seconds(event.eta_s)
            self._bar.set_postfix_str(f"epoch {event.epoch} loss {event.avg_loss:.4f} lr {event.lr:.2e} eta {eta}")
        elif kind == "Saved":
            self._write(f"saved {event.path}")
        elif kind == "Paused":
            self._write(f"paused after step {event.step}: `kill -USR1 {os.getpid()}` goes on, Ctrl+C stops and saves")
        elif kind == "Resumed":
            self._write(f"going on from step {event.step}" if not event.stopping else "stopping")
        elif kind in ("Finished", "Failed"):
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream)
