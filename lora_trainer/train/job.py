"""A training run as a service for a UI: start it in a thread, poll a cheap status snapshot, stop it, keep the
trained LoRA in memory afterwards.

`TrainingJob(config, host)` enters `host.prepare_model(config)` and `host.job(title, total)`, runs the `Trainer`,
forwards its events into a `JobStatus`, and turns the host's Interrupt into a stop-and-save. Every error ends in
state `failed` with its message in `status.message`. `JobManager(host)` allows one job at a time.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.errors import BUG_NOTE, TrainingError, describe_error
from lora_trainer.train.preflight import check_for_host
from lora_trainer.train.events import (
    EventBus, Failed, Finished, Paused, Progress, Resumed, Sample, Saved, Started, Step, TrainCommands, Validation,
)
from lora_trainer.train.job_pause import PausableJob, PausableManager

logger = logging.getLogger(__name__)

_STAGES = {"cache_latents": "caching latents", "cache_text": "caching text-encoder outputs"}


class JobState(str, enum.Enum):
    """Where a job stands; the value is the word the UI shows."""

    IDLE = "idle"
    PREPARING = "preparing"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """True while the job holds the model (preparing, running, paused, stopping)."""
        return self in (JobState.PREPARING, JobState.RUNNING, JobState.PAUSED, JobState.STOPPING)


@dataclass
class JobStatus:
    """A snapshot of one job, safe to read from any thread.

    Attributes:
        state (JobState): where the job stands.
        step (int): optimizer steps done.
        total_steps (int): steps of the run (0 until known).
        epoch (int): current epoch, 1-based (0 before the first step).
        total_epochs (int): epochs of the run (0 until known).
        loss (float, optional): loss of the last step.
        avg_loss (float, optional): moving average of recent losses.
        lr (float, optional): learning rate after the last step.
        it_per_s (float, optional): steps per second.
        eta_s (float, optional): seconds left.
        message (str): what is happening, or the error (state failed).
        plan (str): how many steps the run takes and which key decided it (max_train_epochs or max_train_steps).
        lora_path (str, optional): the final LoRA file (None while running or when stopped without saving).
        saved (list[str]): every LoRA file written, in order.
        losses (list[tuple[int, float]]): (step, loss) of every step.
        samples (list[str]): sample image files, in order.
        sample_infos (list[tuple[int, int, float | None]]): (step, prompt number, strength) of each file in
            `samples` (0 and None when the sampler did not say).
        validation_losses (list[tuple[int, float]]): (step, validation loss) of every validation.
        validation_per_concept (dict[str, float]): the last validation's loss per concept folder.
        validation_concept_losses (list[tuple[int, dict[str, float]]]): (step, loss per concept folder) of every
            validation.
        started_at (float, optional): `time.time()` at start.
        finished_at (float, optional): `time.time()` at the end.
    """

    state: JobState = JobState.IDLE
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""
    plan: str = ""
    lora_path: str | None = None
    saved: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    sample_infos: list[tuple[int, int, float | None]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    validation_per_concept: dict[str, float] = field(default_factory=dict)
    validation_concept_losses: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None

    def copy(self) -> JobStatus:
        """A copy whose lists are not shared with the job."""
        return dataclasses.replace(self, saved=list(self.saved), losses=list(self.losses), samples=list(self.samples),
                                   sample_infos=list(self.sample_infos),
                                   validation_losses=list(self.validation_losses),
                                   validation_per_concept=dict(self.validation_per_concept),
                                   validation_concept_losses=list(self.validation_concept_losses))

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict: `state` as text; NaN/inf (which JSON cannot carry) as None, each named
        at the end of `message`.

        Returns:
            dict[str, Any]: the fields.
        """
        data = dict(dataclasses.asdict(self), state=self.state.value)
        replaced = [f"{key} = {data[key]}" for key in _NUMBERS if not _finite(data[key])]
        for key in _NUMBERS:
            data[key] = data[key] if _finite(data[key]) else None
        data["losses"] = [(step, loss if _finite(loss) else None) for step, loss in self.losses]
        data["validation_losses"] = [(step, loss if _finite(loss) else None) for step, loss in self.validation_losses]
        data["validation_per_concept"] = {name: loss if _finite(loss) else None
                                          for name, loss in self.validation_per_concept.items()}
        data["validation_concept_losses"] = [(step, {name: loss if _finite(loss) else None
                                                     for name, loss in losses.items()})
                                             for step, losses in self.validation_concept_losses]
        bad_losses = sum(not _finite(loss) for _, loss in self.losses + self.validation_losses)
        if bad_losses:
            replaced.append(f"{bad_losses} loss values")
        if replaced:
            note = f"not finite numbers, shown as null: {', '.join(replaced)}"
            data["message"] = f"{self.message} ({note})" if self.message else note
        return data


_NUMBERS = ("loss", "avg_loss", "lr", "it_per_s", "eta_s", "started_at", "finished_at")


def _finite(value: Any) -> bool:
    """True for None, ints and finite floats: what JSON can carry."""
    return not isinstance(value, float) or math.isfinite(value)


def error_message(exc: BaseException) -> str:
    """The text a user sees for an error (`describe_error`): an expected failure's message, or a bug's type and
    message with a line saying it is a bug (its traceback is in the log).

    Args:
        exc (BaseException): the error.

    Returns:
        str: the message.
    """
    report = describe_error(exc)
    if report.expected:
        return report.message
    return f"training failed: {report.message}. {BUG_NOTE.replace('above', 'in the log')}"


class TrainingJob(PausableJob):
    """One training run on a host (pause / resume: `job_pause.PausableJob`).

    Args:
        config (TrainConfig): the run's config; an unset `output_dir` becomes `host.lora_dir()`.
        host (Host): where the model comes from (the WebUI, or `StandaloneHost`).
        preflight (Preflight, optional): `check_before_model` already run by the caller, defaults to None: the job
            runs it before the model loads.
    """

    def __init__(self, config, host, preflight=None):
        self.config = config
        self.host = host
        self.preflight = preflight
        self.commands = TrainCommands()
        self._status = JobStatus()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._handle = None
        self._live = None

    # -- control ---------------------------------------------------------------------------------------------------
    def start(self) -> TrainingJob:
        """Run the job in a background thread.

        Returns:
            TrainingJob: self.

        Raises:
            TrainingError: the job was already started.
        """
        self._claim()
        runner = getattr(self.host, "run_job", None)  # a host whose GPU work has its own thread (Forge)
        target = self._run if runner is None else (lambda: runner(self._run))
        self._thread = threading.Thread(target=target, name="lora-trainer-job", daemon=True)
        self._thread.start()
        return self

    def run(self) -> JobStatus:
        """Run the job in the calling thread (errors end in state failed, never raise).

        Returns:
            JobStatus: the final status.
        """
        self._claim()
        self._run()
        return self.status()

    def stop(self, save: bool = True) -> None:
        """Ask the job to end after the current step.

        Args:
            save (bool, optional): save the LoRA (and resume state when `save_state` is on) first, defaults to True.
        """
        self.commands.request_stop(save)
        with self._lock:
            if self._status.state.active:
                self._status.state = JobState.STOPPING
                self._status.message = "stopping after this step" + (" and saving" if save else " without saving")

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Wait for the job to end.

        Args:
            timeout (float, optional): seconds to wait at most, defaults to no limit.

        Returns:
            JobStatus: the status then (still active when the timeout passed).
        """
        self._done.wait(timeout)
        return self.status()

    def status(self) -> JobStatus:
        """A snapshot of the job (cheap: poll it every second).

        Returns:
            JobStatus: a copy, not shared with the job.
        """
        with self._lock:
            return self._status.copy()

    @property
    def live_lora(self):
        """The trained network in memory (`LiveLoRA`) once the run finished or stopped, or its copy while paused;
        None before, while running or on error."""
        return self._live if self._live is not None else self._paused_lora

    @property
    def done(self) -> bool:
        """True once the job ended (finished, stopped or failed)."""
        return self._done.is_set()

    def _claim(self) -> None:
        with self._lock:
            if self._status.state is not JobState.IDLE:
                raise TrainingError("training job: already started. Start a new job for another run.")
            self._status.state = JobState.PREPARING
            self._status.started_at = time.time()
            self._status.message = "checking the config, files and dataset"

    def _set(self, **values) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self._status, key, value)

    # -- the run ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        ending: dict = {}
        try:
            config = self._resolved_config()
            checked = self.preflight or check_for_host(config, self.host)
            self._set(total_steps=checked.plan.total_steps, total_epochs=checked.plan.total_epochs,
                      plan=checked.plan_note, message=f"loading the model; {checked.plan_note}")
            title = f"Train LoRA {config.save.output_name}"
            with self.host.prepare_model(config) as adapter, \
                    self.host.job(title, checked.plan.total_steps) as handle:
                self._handle = handle
                ending = self._train(config, adapter, checked)
                self._set(message="giving the model back")
        except BaseException as exc:  # every error becomes a failed status the UI shows
            if describe_error(exc).expected:
                logger.error("training job failed: %s", error_message(exc))
            else:
                logger.exception("training job failed")
            ending = {"state": JobState.FAILED, "message": error_message(exc)}
            if not isinstance(exc, Exception):
                raise
        finally:
            self._end(ending)

    def _end(self, ending: dict) -> None:
        """Say how the run ended only now that the host has the model back, and free the manager for the next
        run in the same step: a client that sees "finished" may start again at once."""
        self._handle = None
        with self._lock:
            for key, value in dict(ending, finished_at=time.time()).items():
                setattr(self._status, key, value)
            self._done.set()

    def _resolved_config(self):
        self.config = with_output_dir(self.config, self.host)
        return self.config

    def _train(self, config, adapter, checked) -> dict:
        """Train on the host's model; returns the ending state and message (`_end` sets them)."""
        from lora_trainer.train.loop import Trainer

        bus = EventBus()
        bus.subscribe(self._on_event)
        trainer = Trainer(config, adapter, bus, self.commands, preflight=checked, host_job=self._handle)
        result = trainer.run()
        self._keep_network(trainer, config)
        if result.lora_path or self._status.saved:
            self._refresh()
        state = JobState.STOPPED if result.stopped else JobState.FINISHED
        if result.stopped:
            message = f"stopped at step {result.steps}" + (f"; saved {result.lora_path}" if result.lora_path
                                                         else " without saving")
        else:
            message = f"finished: {result.steps} steps, saved {result.lora_path}"
        self._set(lora_path=result.lora_path, step=result.steps)
        return {"state": state, "message": message}

    def _keep_network(self, trainer, config) -> None:
        from lora_trainer.networks import NetworkSettings
        from lora_trainer.train.live_lora import LiveLoRA

        network = getattr(trainer, "network", None)
        if network is None:
            return
        include_conv = NetworkSettings.from_config(config.network).wants_conv
        self._live = LiveLoRA(network, lambda a: a.lora_targets(include_conv), ema=getattr(trainer, "ema", None))
        if getattr(self.host, "offload_idle", False):  # the host wants its GPU memory back between generations
            self._live.offload()

    def _refresh(self) -> None:
        try:
            self.host.refresh_loras()
        except Exception:  # the file is written; a host that cannot list it must not fail the run
            logger.exception("refreshing the host's LoRA list failed")

    # -- events ----------------------------------------------------------------------------------------------------
    def _on_event(self, event) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)
        handle = self._handle
        if handle is not None and handle.interrupted and not self.commands.stop_requested:
            logger.info("the host's Interrupt was pressed: stopping and saving")
            self.stop(save=True)

    def _on_started(self, event: Started) -> None:
        self._set(state=JobState.RUNNING if not self.commands.stop_requested else JobState.STOPPING,
                  total_steps=event.total_steps, total_epochs=event.total_epochs, step=event.start_step,
                  message=(f"training from step {event.start_step}" if event.start_step else "training")
                  + (f"; {event.plan}" if event.plan else ""), plan=event.plan)

    def _on_progress(self, event: Progress) -> None:
        self._set(message=f"{_STAGES.get(event.stage, event.stage)} {event.done}/{event.total}")

    def _on_step(self, event: Step) -> None:
        with self._lock:
            s = self._status
            s.step, s.total_steps, s.epoch = event.step, event.total_steps, event.epoch
            s.loss, s.avg_loss, s.lr = event.loss, event.avg_loss, event.lr
            s.it_per_s, s.eta_s = event.it_per_s, event.eta_s
            s.losses.append((event.step, event.loss))
            if s.state is JobState.RUNNING:
                s.message = "training"
        handle = self._handle
        if handle is not None:
            handle.progress(event.step, event.total_steps)

    def _on_sample(self, event: Sample) -> None:
        from lora_trainer.train.samples import sample_file_name

        folder = Path(self.config.save.output_dir) / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        paths, infos = [], []
        known = len(event.infos) == len(event.images)
        for i, image in enumerate(event.images):
            info = event.infos[i] if known else None
            path = folder / sample_file_name(self.config.save.output_name, event.step, i, info)
            if hasattr(image, "save"):
                image.save(path)
                paths.append(str(path))
                infos.append((event.step, info.prompt_index, info.strength) if info else (event.step, 0, None))
        with self._lock:
            self._status.samples.extend(paths)
            self._status.sample_infos.extend(infos)

    def _on_validation(self, event: Validation) -> None:
        with self._lock:
            self._status.validation_losses.append((event.step, event.loss))
            self._status.validation_per_concept = dict(event.per_concept)
            self._status.validation_concept_losses.append((event.step, dict(event.per_concept)))

    def _on_saved(self, event: Saved) -> None:
        with self._lock:
            self._status.saved.append(event.path)
        self._refresh()

    def _on_failed(self, event: Failed) -> None:
        self._set(message=event.message)

    def _on_finished(self, event: Finished) -> None:
        self._set(lora_path=event.path)


def with_output_dir(config, host):
    """`config` with an unset `output_dir` set to the host's LoRA folder.

    Args:
        config (TrainConfig): the run's config.
        host (Host): the host.

    Returns:
        TrainConfig: the config to train.
    """
    from lora_trainer.config import update_config

    if config.save.output_dir:
        return config
    return update_config(config, {"output_dir": str(host.lora_dir())})


_HANDLERS = {
    Started: TrainingJob._on_started, Progress: TrainingJob._on_progress, Step: TrainingJob._on_step,
    Sample: TrainingJob._on_sample, Saved: TrainingJob._on_saved, Failed: TrainingJob._on_failed,
    Finished: TrainingJob._on_finished, Validation: TrainingJob._on_validation,
    Paused: TrainingJob._on_paused, Resumed: TrainingJob._on_resumed,
}


class JobManager(PausableManager):
    """One training job at a time on a host; keeps the last job (and its LoRA) after it ends (pause / resume:
    `job_pause.PausableManager`).

    Args:
        host (Host): the host jobs run on.
    """

    def __init__(self, host):
        self.host = host
        self._lock = threading.Lock()
        self._last: TrainingJob | None = None

    def start(self, config) -> TrainingJob:
        """Start a job in the background.

        Args:
            config (TrainConfig): the run's config.

        Returns:
            TrainingJob: the started job.

        Raises:
            TrainingError: a job is still running. Any error of `check_before_model` (raised before the job
                starts, so the caller never reports a start that fails at once).
        """
        config = with_output_dir(config, self.host)
        checked = check_for_host(config, self.host) if self.current is None else None
        with self._lock:
            running = self.current
            if running is not None:
                status = running.status()
                raise TrainingError(
                    f"training: a job is already {status.state.value} (step {status.step}/{status.total_steps}). "
                    "Stop it or wait until it ends, then start again."
                )
            job = TrainingJob(config, self.host, preflight=checked)
            self._last = job
            job.start()
            return job

    @property
    def current(self) -> TrainingJob | None:
        """The job that is running (preparing, running or stopping), else None."""
        job = self._last
        return job if job is not None and not job.done else None

    @property
    def last(self) -> TrainingJob | None:
        """The most recently started job (running or ended), None before the first."""
        return self._last

    def status(self) -> JobStatus:
        """The last job's status, or an idle status before the first job."""
        job = self._last
        return job.status() if job is not None else JobStatus()

    def stop(self, save: bool = True) -> bool:
        """Ask the running job to stop.

        Args:
            save (bool, optional): save the LoRA first, defaults to True.

        Returns:
            bool: True when a job was running.
        """
        job = self.current
        if job is None:
            return False
        job.stop(save)
        return True


__all__ = ["JobManager", "JobState", "JobStatus", "TrainingJob", "error_message"]
