"""Shared bits of the checkpoint tool commands (bake, extract, ckpt-merge, prune): a progress bar and the error
report."""
from __future__ import annotations

import sys

from tqdm import tqdm

from lora_trainer.errors import LoraTrainerError


class ProgressBar:
    """A `(done, total)` callback drawing one tqdm bar on stderr; `close()` when the job ends."""

    def __init__(self, desc: str, unit: str = "tensor"):
        self._desc, self._unit = desc, unit
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self._desc, unit=self._unit, file=sys.stderr, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_job(job, desc: str, unit: str = "tensor"):
    """Run `job(progress)`; returns (result, 0), or (None, 2) after printing the error of bad input."""
    bar = ProgressBar(desc, unit)
    try:
        return job(bar), 0
    except (LoraTrainerError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 2
    finally:
        bar.close()
