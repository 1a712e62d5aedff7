"""A run as a WebUI job: the generation queue lock, `shared.state` (job name, progress bar, Interrupt), and a pause
that lets go of both so txt2img, img2img and our grid run on the model meanwhile.

The WebUI's `State.begin` (called by every generation) resets `interrupted` and stamps `time_start`; a paused run
knows its own stamp, so an Interrupt pressed for a generation during the pause never stops training, while one
pressed when nothing else runs does. Nothing here imports the WebUI at import time.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _queue_lock():
    from modules import call_queue

    return call_queue.queue_lock


class QueueLock:
    """The WebUI's generation queue lock, re-entrant per thread (job and prepare_model may nest)."""

    def __init__(self):
        self._local = threading.local()

    @contextlib.contextmanager
    def held(self):
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            _queue_lock().acquire()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                _queue_lock().release()

    @contextlib.contextmanager
    def released(self):
        """Let go of the lock this thread holds (at any depth) for the block; take it back in queue order after."""
        if getattr(self._local, "depth", 0) == 0:
            yield
            return
        _queue_lock().release()
        try:
            yield
        finally:
            _queue_lock().acquire()


class WebUIJob:
    """The JobHandle of a run inside `shared.state`; begins the WebUI job on creation.

    Args:
        state: `shared.state`.
        title (str): the job's name.
        total_steps (int): steps of the run.
        lock (QueueLock, optional): the lock the run holds, let go of while paused, defaults to None.
        guard (callable, optional): `() -> check`, called when a pause starts; `check()` runs when the pause ends
            (the lock held again) and raises when the model cannot be trained on any more, defaults to None.
    """

    def __init__(self, state, title: str, total_steps: int, lock: QueueLock | None = None,
                 guard: Callable[[], Callable[[], None]] | None = None):
        self._state, self.title, self._lock, self._guard = state, title, lock, guard
        self._step, self._total = 0, max(1, int(total_steps))
        self._started = None
        self.begin()

    def begin(self, text: str | None = None) -> None:
        """(Re)start the WebUI job: name, progress, a fresh Interrupt flag."""
        self._state.begin(job=self.title)
        self._state.job_count = 1
        self._state.sampling_steps, self._state.sampling_step = self._total, self._step
        self._state.textinfo = text
        self._started = getattr(self._state, "time_start", None)

    def progress(self, step: int, total_steps: int) -> None:
        self._step, self._total = int(step), max(1, int(total_steps))
        self._state.sampling_steps = self._total
        self._state.sampling_step = self._step
        self._state.textinfo = f"LoRA training: step {step}/{total_steps}"

    @property
    def interrupted(self) -> bool:
        """The WebUI's Interrupt was pressed for this job (not for a generation run during a pause)."""
        return bool(self._state.interrupted) and getattr(self._state, "time_start", None) == self._started

    @contextlib.contextmanager
    def paused(self):
        """Let go of the queue lock while the run is paused; on exit take it back and begin the job again.

        Yields:
            PauseWatch: `interrupted` tells whether the WebUI's Interrupt was pressed for the paused run.

        Raises:
            LoraTrainerError: from the guard's check, when the model changed during the pause.
        """
        check = self._guard() if self._guard is not None else None
        self._state.textinfo = self._paused_text()
        with self._lock.released() if self._lock is not None else contextlib.nullcontext():
            yield PauseWatch(self)
        self.begin()
        if check is not None:
            check()

    def _paused_text(self) -> str:
        return f"LoRA training paused at step {self._step}/{self._total}"

    def show_paused_if_idle(self) -> None:
        """After a generation ended during the pause, show the paused run as the WebUI's job again (so its
        Interrupt reaches the run); only when no generation holds the queue lock."""
        if self._state.job or not _queue_lock().acquire(False):
            return
        try:
            self.begin(self._paused_text())
        finally:
            _queue_lock().release()


class PauseWatch:
    """What a paused run polls: the WebUI's Interrupt for it."""

    def __init__(self, job: WebUIJob):
        self._job = job

    @property
    def interrupted(self) -> bool:
        self._job.show_paused_if_idle()
        return self._job.interrupted


__all__ = ["PauseWatch", "QueueLock", "WebUIJob"]
