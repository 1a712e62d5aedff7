"""reForge's single main-thread task queue (`modules_forge.main_thread`): jobs run on it or hold it.

reForge runs txt2img, img2img and model (re)loading as tasks on one worker loop (`main_thread.loop`, in the process's
main thread); `run_and_wait_result` prints a task's exception, swallows it and returns None. Two ways in:
- `run(work)`: a training job's whole body runs as one task (its exception is raised in the waiting thread);
- `held()`: work that stays in its own thread (a test grid from a request) occupies the worker with a task of ours
  that runs the calls handed to it (`call`: model loading through reForge's memory manager) until released.
Either way no other task (a checkpoint change, a generation an extension starts) runs on the model in between;
inside `run`, `held()` and `call()` run inline. Nothing here imports reForge: the queue module is passed in
(`async_run(func, *args)`, and `run_and_wait_result` when it has one).
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

    def run(self, work: Callable):
        """Run `work()` as one task on the host's queue and wait for it.

        Args:
            work (callable): no arguments (a job's body).

        Returns:
            What `work` returns; its exception is raised here.
        """
        def task():
            self._serving_thread = threading.get_ident()
            try:
                return work()
            finally:
                self._serving_thread = None

        item = _Call(task, (), {})
        host_queue = self._queue_module()
        if hasattr(host_queue, "run_and_wait_result"):
            host_queue.run_and_wait_result(item.run)  # also takes the finished task off the host's list
        else:
            host_queue.async_run(item.run)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    @contextlib.contextmanager
    def held(self):
        """Occupy the host's worker loop for the block (re-entrant per thread); calls run on it meanwhile."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0 and threading.get_ident() == self._serving_thread:
            self._local.inline = True  # inside run(): the worker is already ours
        elif depth == 0:
            self._inbox = queue.Queue()
            self._queue_module().async_run(self._serve, self._inbox)
            logger.info("reForge: the main-thread queue is held by this job")
        self._local.depth = depth + 1
        try:
            yield self
        finally:
            self._local.depth -= 1
            if self._local.depth == 0 and getattr(self._local, "inline", False):
                self._local.inline = False
            elif self._local.depth == 0:
                inbox, self._inbox = self._inbox, None
                inbox.put(None)

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


__all__ = ["MainThreadWorker"]
