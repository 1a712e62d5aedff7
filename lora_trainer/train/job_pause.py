"""Pause and resume on the job and the job manager (the loop's side is `train/pause.py`).

A pause is asked for from any thread (a button, a route); the loop reaches it after the current step and emits
`Paused`, which puts the job in state "paused" and keeps the network's copy for test renders (`live_lora`);
`Resumed` puts it back to "running" (or "stopping" when a stop came during the pause).
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class PausableJob:
    """Pause / resume for `TrainingJob` (uses its `commands`, `_lock`, `_status` and `_set`)."""

    _paused_lora = None

    def pause(self) -> bool:
        """Ask the run to pause after the current step; the host may generate with its model meanwhile.

        Returns:
            bool: True when the job is preparing or running (a pause before the first step waits there).
        """
        from lora_trainer.train.job import JobState

        with self._lock:
            if self._status.state not in (JobState.PREPARING, JobState.RUNNING) or self.commands.stop_requested:
                return False
            self.commands.pause()
            self._status.message = "pausing after this step"
        return True

    def resume(self) -> bool:
        """Go on after a pause (or take back a pause not reached yet).

        Returns:
            bool: True when the job was paused or pausing.
        """
        from lora_trainer.train.job import JobState

        with self._lock:
            asked = self.commands.pause_requested and self._status.state.active
            self.commands.resume()
            if self._status.state is JobState.PAUSED:
                self._status.message = "resuming"
            elif asked and self._status.state.active and not self.commands.stop_requested:
                self._status.message = "training"
        return asked

    @property
    def paused(self) -> bool:
        """True while the run waits in a pause (the host's model is free for generations)."""
        from lora_trainer.train.job import JobState

        return self.status().state is JobState.PAUSED

    def _on_paused(self, event) -> None:
        from lora_trainer.train.job import JobState

        self._paused_lora = event.lora
        with self._lock:
            if not self.commands.stop_requested:
                self._status.state = JobState.PAUSED
                self._status.message = (f"paused after step {event.step}: generate or test the LoRA, then resume")

    def _on_resumed(self, event) -> None:
        from lora_trainer.train.job import JobState

        self._paused_lora = None
        with self._lock:
            self._status.state = JobState.STOPPING if event.stopping else JobState.RUNNING
            self._status.message = event.reason or ("stopping" if event.stopping else "training")


class PausableManager:
    """Pause / resume for `JobManager` (uses its `current`)."""

    def pause(self) -> bool:
        """Ask the running job to pause after its current step.

        Returns:
            bool: True when a job was running (or preparing).
        """
        job = self.current
        return job is not None and job.pause()

    def resume(self) -> bool:
        """Resume the paused job.

        Returns:
            bool: True when a job was paused (or pausing).
        """
        job = self.current
        return job is not None and job.resume()


__all__ = ["PausableJob", "PausableManager"]
