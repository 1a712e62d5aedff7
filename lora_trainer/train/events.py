"""Events the training loop emits, the bus that delivers them, and the commands it reads between steps.

The loop knows no subscriber: the UI, the CLI progress bar and the log writers subscribe to an `EventBus`.
A subscriber that raises is logged with its traceback and training goes on.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """Training is about to take its first step.

    Attributes:
        total_steps (int): optimizer steps of the whole run.
        total_epochs (int): epochs of the whole run.
        start_step (int): the step a resumed run starts from, defaults to 0.
        plan (str): how the step count was chosen (e.g. max_train_epochs winning over max_train_steps).
    """

    total_steps: int
    total_epochs: int
    start_step: int = 0
    plan: str = ""


@dataclass(frozen=True)
class Progress:
    """A preparation stage advanced (scanning, caching latents, caching text-encoder outputs).

    Attributes:
        stage (str): "cache_latents" or "cache_text".
        done (int): units finished.
        total (int): units in all.
    """

    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class Step:
    """One optimizer step finished.

    Attributes:
        step (int): global step, 1-based.
        total_steps (int): steps of the whole run.
        epoch (int): current epoch, 1-based.
        loss (float): loss of this step (mean over its accumulated micro-batches).
        avg_loss (float): moving average of recent losses.
        lr (float): learning rate of the first parameter group after this step.
        it_per_s (float): steps per second since start (or resume).
        eta_s (float, optional): seconds left, None until known.
    """

    step: int
    total_steps: int
    epoch: int
    loss: float
    avg_loss: float
    lr: float
    it_per_s: float
    eta_s: float | None


@dataclass(frozen=True)
class SampleInfo:
    """What one sample image shows.

    Attributes:
        prompt_index (int): the prompt's line among the prompt file's prompts, 1-based.
        strength (float): the LoRA strength it was rendered at.
        prompt (str, optional): the prompt text, defaults to "".
    """

    prompt_index: int
    strength: float
    prompt: str = ""


@dataclass(frozen=True)
class Sample:
    """Sample images rendered during training.

    Attributes:
        step (int): global step.
        images (list): PIL images (or anything the sampler produced).
        infos (list[SampleInfo]): one per image, in the same order (empty when the sampler gave none).
    """

    step: int
    images: list = field(default_factory=list)
    infos: list = field(default_factory=list)


@dataclass(frozen=True)
class Validation:
    """The validation loss on the held-out images (fixed timesteps and noise, comparable across steps).

    Attributes:
        step (int): global step.
        epoch (int): epochs finished.
        loss (float): mean loss over every held-out image and timestep.
        per_concept (dict[str, float]): mean loss per concept folder.
    """

    step: int
    epoch: int
    loss: float
    per_concept: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Saved:
    """A LoRA file was written.

    Attributes:
        path (str): the `.safetensors` file.
        step (int): global step at save.
        epoch (int): epochs finished at save.
    """

    path: str
    step: int
    epoch: int


@dataclass(frozen=True)
class Finished:
    """Training ended without an error.

    Attributes:
        path (str, optional): the final LoRA file, None when stopped without saving.
        stopped (bool): True when ended by a stop command.
        steps (int): global steps done.
    """

    path: str | None
    stopped: bool
    steps: int


@dataclass(frozen=True)
class Paused:
    """Training waits after a step until resumed (or stopped); the host's model is lent out meanwhile.

    Attributes:
        step (int): global steps done.
        epoch (int): current epoch, 1-based.
        lora (object, optional): a `LiveLoRA` copy of the network as it is now, for test renders during the pause.
    """

    step: int
    epoch: int
    lora: object = None


@dataclass(frozen=True)
class Resumed:
    """Training took the model back after a pause; the next step follows (or the stop, when one was asked for).

    Attributes:
        step (int): global steps done.
        stopping (bool): a stop was requested during the pause.
        reason (str, optional): why the run stops when the host could not give the model back, defaults to "".
    """

    step: int
    stopping: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Failed:
    """Training ended with an error; `message` says what and how to fix it."""

    message: str


Event = Started | Progress | Step | Sample | Validation | Saved | Paused | Resumed | Finished | Failed


class EventBus:
    """Delivers events to subscribers in the order they subscribed, on the emitting thread."""

    def __init__(self):
        self._subscribers: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        """Add a subscriber.

        Args:
            fn (callable): called with each event.

        Returns:
            callable: `fn`, so this works as a decorator.
        """
        with self._lock:
            self._subscribers.append(fn)
        return fn

    def unsubscribe(self, fn: Callable[[Any], None]) -> None:
        """Remove a subscriber; removing one that is not there does nothing."""
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def emit(self, event: Any) -> None:
        """Deliver `event` to every subscriber; a subscriber's exception is logged with its traceback.

        Args:
            event: one of the event dataclasses.
        """
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(event)
            except Exception:  # a broken subscriber must not end training; it is logged, not hidden
                logger.exception("event subscriber %r failed on %s", fn, type(event).__name__)


class TrainCommands:
    """Requests from other threads (UI buttons, signal handlers) that the loop reads between steps."""

    def __init__(self):
        self._stop = threading.Event()
        self._save = threading.Event()
        self._pause = threading.Event()
        self._wake = threading.Event()  # set by resume and stop: ends a pause's wait at once

    def stop(self) -> None:
        """Ask the loop to end after the current step without saving."""
        self._stop.set()
        self._wake.set()

    def stop_and_save(self) -> None:
        """Ask the loop to end after the current step and save the LoRA as `<output_name>.safetensors` (and the
        resume state when save_state is on)."""
        self._save.set()
        self._stop.set()

    def request_stop(self, save: bool = False) -> None:
        """Ask the loop to end after the current step.

        Args:
            save (bool, optional): save the LoRA (and state when enabled) before ending, defaults to False.
        """
        if save:
            self.stop_and_save()
        else:
            self.stop()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def save_requested(self) -> bool:
        return self._save.is_set()

    def pause(self) -> None:
        """Ask the loop to wait after the current step until `resume` (or a stop)."""
        self._wake.clear()
        self._pause.set()

    def resume(self) -> None:
        """End a pause (or take back a pause request not yet reached)."""
        self._pause.clear()
        self._wake.set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()

    def wait_while_paused(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a resume or stop.

        Args:
            timeout (float): seconds.

        Returns:
            bool: True while still paused and not stopped.
        """
        self._wake.wait(timeout)
        return self._pause.is_set() and not self._stop.is_set()

    @property
    def cancelled(self) -> bool:
        """A stop was requested (the `CancelToken` interface, so caching stops early too)."""
        return self._stop.is_set()

    def clear(self) -> None:
        """Forget pending requests (before a new run)."""
        self._stop.clear()
        self._save.clear()
        self.resume()
