"""Progress with rate and ETA, and a cancel token, shared by long jobs (tagging, caching, training)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressInfo:
    """A snapshot of a long job. `eta_s` is None until the rate is known."""

    done: int
    total: int
    elapsed_s: float
    rate_per_s: float
    eta_s: float | None

    def describe(self, unit: str = "it") -> str:
        eta = "?" if self.eta_s is None else format_seconds(self.eta_s)
        return f"{self.done}/{self.total} [{format_seconds(self.elapsed_s)}<{eta}, {self.rate_per_s:.2f} {unit}/s]"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressTracker:
    """Counts finished units; the rate is measured from `start` (or from the first unit when warm-up is skipped)."""

    def __init__(self, total: int, done: int = 0, clock=time.monotonic):
        self.total = total
        self.done = done
        self._clock = clock
        self._start = clock()
        self._start_done = done

    def update(self, n: int = 1) -> ProgressInfo:
        self.done += n
        return self.info()

    def info(self) -> ProgressInfo:
        elapsed = self._clock() - self._start
        counted = self.done - self._start_done
        rate = counted / elapsed if elapsed > 0 and counted > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return ProgressInfo(self.done, self.total, elapsed, rate, eta)


class CancelToken:
    """Set from any thread; long jobs check `cancelled` between units of work and stop cleanly."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
