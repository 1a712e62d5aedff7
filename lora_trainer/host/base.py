"""What a training job needs from the program it runs in: the WebUI (`a1111.py`) or nothing (`standalone.py`).

The job never asks where it runs; it asks its host for the model, a place for LoRAs, and the host's job system.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from lora_trainer.models.adapter import ModelAdapter


@runtime_checkable
class Host(Protocol):
    """A program that holds (or loads) the model and runs training jobs.

    Attributes:
        name (str): "a1111", "forge" or "standalone" (shown in logs and the UI).
        offload_idle (bool, optional): keep a finished run's LoRA weights on the CPU until they are applied;
            hosts without the attribute keep them where they trained.
        run_job (callable, optional): `run_job(work)` runs a background job's body where the host runs its model
            work (Forge: its main-thread task queue); hosts without it run jobs in their own thread.
    """

    name: str

    def prepare_model(self, config) -> AbstractContextManager[ModelAdapter]:
        """Hand out the model for one run and take it back afterwards.

        Entering: the model ready for training (the WebUI: merged LoRAs restored, weights frozen, flags and devices
        remembered); leaving, on success, stop or error: the host's model exactly as it was before.

        Args:
            config (TrainConfig): the run's config (model path standalone, precision, checkpointing, ...).

        Returns:
            A context manager yielding the ModelAdapter.
        """

    def job(self, title: str, total_steps: int) -> AbstractContextManager["JobHandle"]:
        """Run inside the host's job system (the WebUI: `shared.state`, progress bar, Interrupt, generation lock)."""

    def lora_dir(self) -> Path:
        """Where finished LoRAs go by default (the WebUI: its Lora folder)."""

    def checkpoint_dir(self) -> Path | None:
        """Where checkpoints are (the WebUI: its Stable-diffusion folder); the tools read and write them there."""

    def refresh_loras(self) -> None:
        """Make a newly written LoRA visible to the host (the WebUI: reload its Lora list)."""

    def grid_session(self, config) -> AbstractContextManager[tuple]:
        """The model a run trained on and the host's renderer, for a test grid (`host.grid_service`).

        Args:
            config (TrainConfig): the run whose LoRA is tested.

        Returns:
            A context manager yielding `(adapter, render)`: render is a `grids.Render` (the WebUI: its own txt2img
            processing; standalone: the adapter's sampler). Leaving it, the model is as before, bit for bit.
        """

    def sampler_names(self) -> list[str]:
        """The sampler names `render` accepts (the Test panel's dropdown)."""

    def check_sampler(self, name: str) -> None:
        """Raise ConfigError for a sampler `render` does not know (never fall back to another silently)."""


class JobHandle(Protocol):
    """The host's side of one running job."""

    def progress(self, step: int, total_steps: int) -> None:
        """Report progress to the host's own progress display."""

    @property
    def interrupted(self) -> bool:
        """True once the host's Interrupt was pressed; the job then stops after the current step."""

    def paused(self) -> AbstractContextManager:
        """Optional: while a run is paused, let go of what keeps others off the model (the WebUI's queue lock, the
        standalone host's model lock) and take it back on exit (the WebUI: merged LoRAs taken out, another
        checkpoint refused with a `LoraTrainerError`).

        Returns:
            A context manager yielding an object whose `interrupted` is True once the host's Interrupt was pressed
            for the paused run.
        """
