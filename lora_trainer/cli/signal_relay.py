"""Signal actions run on a helper thread, not inside the handler.

Python runs a handler in the main thread between two bytecodes, possibly while that thread holds a lock. An action
that sets a `threading.Event` needs the Event's lock, which is not reentrant: a training run polls its pause Event five
times a second, so `kill -USR1` or Ctrl+C landing inside one of those polls hung the process for good. The handler
now only puts the action into a `queue.SimpleQueue` (whose `put` is reentrant), and a daemon thread runs it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class SignalRelay:
    """A helper thread that runs the actions signal handlers hand it; `close()` ends it."""

    def __init__(self):
        self._actions: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="signal-relay", daemon=True)
        self._thread.start()

    def handler(self, action: Callable[[], None]):
        """A signal handler that hands `action` to the helper thread and returns at once.

        Args:
            action (callable): what the signal should do, without arguments.

        Returns:
            callable: `(signum, frame) -> None`, for `signal.signal`.
        """
        return lambda *_: self._actions.put(action)

    def _run(self) -> None:
        while (action := self._actions.get()) is not None:
            action()

    def close(self) -> None:
        """End the helper thread after the actions already handed to it."""
        self._actions.put(None)
        self._thread.join(5)


__all__ = ["SignalRelay"]
