"""reForge's single main-thread task queue (`modules_forge.main_thread`), held by a job from start to end.

reForge runs txt2img, img2img and model (re)loading as tasks on one worker loop (`main_thread.loop`, in the process's
main thread); `run_and_wait_result` prints a task's exception, swallows it and returns None. A job (training, a test
grid) holds the queue with one task of its own: that task occupies the worker and runs the calls the job hands it
(`call`: model loading through reForge's memory manager, exceptions raised in the caller) until the job lets go, so
no other task (a checkpoint change, a generation an extension starts) runs on the model in between. A paused run
lets go (`released`) and takes the worker back on resume. Nothing here imports reForge: the queue module is passed
in (`async_run(func, *args)` is all that is used).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class _Call:
    """One function call handed to the worker, with its outcome."""

    def __init__(self, func: Callable, args: tuple, kwargs: dict):
        self.func, self.args, self.kwargs = func, args, kwargs
        self.result = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.func(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the caller's thread, raised there
            self.error = exc
        finally:
            self.done.set()


class MainThreadWorker:
    """Holds a host's main-thread queue and runs calls on it.

    Args:
        queue_module (callable): returns the host's queue module (`modules_forge.main_thread`); called when the
            queue is first held, so building the worker imports nothing.
    """

    def __init__(self, queue_module: Callable[[], object]):
        self._queue_module = queue_module
        self._local = threading.local()
        self._inbox: queue.Queue | None = None
        self._serving_thread: int | None = None

    @property
    def holding(self) -> bool:
        """True while the calling thread holds the queue."""
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def held(self):
        """Occupy the host's worker loop for the block (re-entrant per thread); calls run on it meanwhile."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._inbox = queue.Queue()
            self._queue_module().async_run(self._serve, self._inbox)
            logger.info("reForge: the main-thread queue is held by this job")
        self._local.depth = depth + 1
        try:
            yield self
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                inbox, self._inbox = self._inbox, None
                inbox.put(None)

    @contextlib.contextmanager
    def released(self):
        """Free the worker loop for the block (a paused run lets reForge's own tasks run); hold it again after."""
        if not self.holding:
            yield
            return
        inbox, self._inbox = self._inbox, None
        inbox.put(None)
        try:
            yield
        finally:
            self._inbox = queue.Queue()
            self._queue_module().async_run(self._serve, self._inbox)

    def call(self, func: Callable, *args, **kwargs):
        """Run `func(*args, **kwargs)` on the host's main thread and return its result.

        Args:
            func (callable): the function.
            *args, **kwargs: its arguments.

        Returns:
            Whatever `func` returns; its exception is raised here.

        Raises:
            RuntimeError: the queue is not held by the calling thread.
        """
        if threading.get_ident() == self._serving_thread:
            return func(*args, **kwargs)  # already on the worker: queueing would wait for ourselves
        if not self.holding or self._inbox is None:
            raise RuntimeError("reForge main-thread queue: call() outside held(). Hold the queue first.")
        item = _Call(func, args, kwargs)
        self._inbox.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def _serve(self, inbox: queue.Queue) -> None:
        """The task on the host's worker: run handed calls until released (None)."""
        self._serving_thread = threading.get_ident()
        try:
            while True:
                item = inbox.get()
                if item is None:
                    return
                item.run()
        finally:
            self._serving_thread = None
            logger.info("reForge: the main-thread queue is free again")




class QueueAndMainThread:
    """The WebUI's generation queue lock, then the host's main-thread queue, held and let go of together.

    Taken in that order (a txt2img from the UI holds the queue lock while it waits for the main thread) and given
    back in the reverse order; `released` is what a paused run lets go of.

    Args:
        queue_lock: `a1111_job.QueueLock`.
        worker (MainThreadWorker): the host's main-thread queue.
    """

    def __init__(self, queue_lock, worker: MainThreadWorker):
        self.queue_lock, self.worker = queue_lock, worker

    @contextlib.contextmanager
    def held(self):
        with self.queue_lock.held(), self.worker.held():
            yield

    @contextlib.contextmanager
    def released(self):
        with self.worker.released(), self.queue_lock.released():
            yield


__all__ = ["MainThreadWorker", "QueueAndMainThread"]
