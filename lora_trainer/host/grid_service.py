"""The Test panel's and the grid route's engine: a strength x snapshot x seed grid on the last run's LoRA, rendered
by the host the run trained on (the WebUI's own processing, or the standalone sampler) through `host.grid_session`.

Snapshots are the LoRA still in memory ("in memory"), its EMA when the run kept one ("in memory (EMA)"), and every
file the last run saved (its `-ema` files too); the grid is saved beside the run's LoRA with its settings in the PNG
text. Nothing here imports the WebUI.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import ConfigError, TrainingError
from lora_trainer.grids import (
    DEFAULT_CELL_LIMIT, DEFAULT_STRENGTHS, EMA_LABEL, FileSnapshot, GridEstimate, GridPlan, GridResult, GridSettings,
    LiveSnapshot, RenderSettings, check_cell_limit, estimate_grid, grid_path_beside, measure_speed, plan_grid,
    prompt_from_metadata, save_grid_png, seed_axis, snapshot_axis, snapshot_label, strength_axis, with_ema_files,
)
from lora_trainer.grids.best_snapshot import SnapshotValidation, best_snapshot, lora_file_step, rank_snapshots
from lora_trainer.grids.weights import weights_axis

logger = logging.getLogger(__name__)

IN_MEMORY = "in memory"
IN_MEMORY_EMA = IN_MEMORY + EMA_LABEL


@dataclass(frozen=True)
class GridRequest:
    """What the user asks for (Test panel fields or the route's body).

    Attributes:
        prompt (str): not empty.
        negative_prompt (str, optional): defaults to "".
        strengths (tuple[float, ...], optional): defaults to 0, 0.2, ..., 1.
        seeds (tuple[int, ...], optional): defaults to (1,).
        snapshots (tuple[str, ...], optional): snapshot labels ("in memory", "in memory (EMA)", "epoch 2",
            "epoch 2 (EMA)", ...), defaults to all.
        steps (int, optional): defaults to 20. cfg_scale (float, optional): defaults to 7.
        sampler_name (str, optional): one of the host's samplers, defaults to "Euler a".
        width (int, optional): defaults to 512. height (int, optional): defaults to 512.
        confirmed (bool, optional): render even above the cell limit, defaults to False.
        weights (tuple[str, ...], optional): a module-weights axis ("UNet + TE", "UNet only", LoRA Block Weight
            presets or vectors; `grids.parse_weights`), defaults to none (the whole LoRA).
    """

    prompt: str
    negative_prompt: str = ""
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    seeds: tuple[int, ...] = (1,)
    snapshots: tuple[str, ...] = ()
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"
    width: int = 512
    height: int = 512
    confirmed: bool = False
    weights: tuple[str, ...] = ()


@dataclass
class GridOutcome:
    """A finished (or cancelled) grid.

    Attributes:
        result (GridResult): cells, grid image, timings.
        path (Path, optional): the saved grid PNG (None when cancelled).
        lora_name (str): the LoRA's name, for `<lora:NAME:S>`.
    """

    result: GridResult
    path: Path | None = None
    lora_name: str = ""


class GridService:
    """Grids on the last job of a JobManager.

    Args:
        manager (JobManager): the job manager the tab and the API share.
        cell_limit (int, optional): cells rendered without confirmation, defaults to DEFAULT_CELL_LIMIT.
    """

    def __init__(self, manager, cell_limit: int = DEFAULT_CELL_LIMIT):
        self.manager = manager
        self.cell_limit = cell_limit
        self._files: dict[str, FileSnapshot] = {}
        self._lock = threading.Lock()

    @property
    def host(self):
        return self.manager.host

    def _busy(self) -> bool:
        """A run holds the model (running, not paused)."""
        current = self.manager.current
        return current is not None and not current.paused

    def _job(self):
        if self._busy():
            raise TrainingError("grid: a training run is in progress. Pause it, or wait until it ends (or stop "
                                "it), then test.")
        job = self.manager.last
        if job is None:
            raise TrainingError("grid: nothing trained yet. Train a LoRA first; the grid renders the last run.")
        return job

    def snapshot_labels(self) -> list[str]:
        """Labels of the snapshots of the last run: saved files in order (each EMA file after its LoRA file), then
        "in memory" and "in memory (EMA)" (empty before a run)."""
        job = self.manager.last
        if job is None or self._busy():
            return []
        labels = [snapshot_label(path) for path in with_ema_files(job.status().saved)]
        return list(dict.fromkeys(labels)) + list(_live_snapshots(job))

    def lora_name(self) -> str:
        """The last run's output name (what `<lora:NAME:S>` calls it), "" before a run."""
        job = self.manager.last
        return job.config.save.output_name if job is not None else ""

    def default_prompt(self) -> str:
        """The trigger word then the dataset's most frequent tags (from the saved file, else the dataset)."""
        job = self.manager.last
        if job is None:
            return ""
        saved = [p for p in job.status().saved if Path(p).is_file()]
        if saved:
            from lora_trainer.networks import load_lora

            return prompt_from_metadata(load_lora(saved[-1])[1])
        from lora_trainer.data.folders import scan_dataset

        try:
            counts = scan_dataset(job.config.dataset).tag_frequency
        except (OSError, ValueError) as error:  # the dataset moved since training: no default, not an error
            logger.info("grid: no default prompt from the dataset: %s", error)
            return ""
        return prompt_from_metadata({"ss_tag_frequency": json.dumps(counts)})

    def _snapshots(self, job, labels: tuple[str, ...]) -> list:
        by_label: dict[str, object] = {}
        for path in with_ema_files(job.status().saved):
            label = snapshot_label(path)
            key = str(path.resolve())
            if key not in self._files:
                self._files[key] = FileSnapshot(path, label)
            by_label[label] = self._files[key]
        by_label.update(_live_snapshots(job))
        if not by_label:
            raise TrainingError("grid: the last run kept no LoRA (it failed or stopped without saving). Train again.")
        wanted = labels or tuple(by_label)
        unknown = [label for label in wanted if label not in by_label]
        if unknown:
            raise ConfigError(f"snapshots: {unknown[0]!r} is not a snapshot of the last run. Use one of "
                              f"{', '.join(map(repr, by_label))}.")
        return [by_label[label] for label in wanted]

    def snapshots(self, labels: tuple[str, ...] = ()) -> list:
        """The last run's snapshots by label (all when `labels` is empty).

        Args:
            labels (tuple[str, ...], optional): e.g. ("epoch 2", "in memory"), defaults to all.

        Returns:
            list: FileSnapshot / LiveSnapshot objects.

        Raises:
            ConfigError: an unknown label. TrainingError: no run to test, or one is running.
        """
        return self._snapshots(self._job(), tuple(labels))

    def _ranked(self, job, snapshots: list) -> list[SnapshotValidation]:
        """Each snapshot's validation loss at its step: a file's `ss_steps`, the LoRA in memory the last step's (EMA
        weights have none: validation measures the raw ones)."""
        status = job.status()
        steps = [(s.label, lora_file_step(s.path) if isinstance(s, FileSnapshot) else
                  status.step if isinstance(s, LiveSnapshot) and s.label == IN_MEMORY else None) for s in snapshots]
        return rank_snapshots(steps, dict(status.validation_losses))

    def best_snapshot(self) -> SnapshotValidation | None:
        """The last run's snapshot with the lowest validation loss (None without validation, or before a run).

        Returns:
            SnapshotValidation | None: its label, step and loss.
        """
        job = self.manager.last
        if job is None or self.manager.current is not None or not job.status().validation_losses:
            return None
        return best_snapshot(self._ranked(job, self._snapshots(job, ())))

    def presets(self):
        """Built-in block-weight presets, then LoRA Block Weight's file in the WebUI (when installed).

        Returns:
            PresetBook: the presets the weights axis looks names up in.
        """
        from lora_trainer.tools.presets import load_presets

        webui_dir = getattr(self.host, "webui_dir", None)
        return load_presets((), webui_dir() if callable(webui_dir) else None)

    def release_memory(self) -> None:
        """Give the host its GPU memory back after a grid: the LoRA in memory goes to the CPU when the host keeps
        idle LoRAs there (the WebUI's setting)."""
        job = self.manager.last
        if job is not None and job.live_lora is not None and getattr(self.host, "offload_idle", False):
            job.live_lora.offload()

    def plan(self, request: GridRequest) -> GridPlan:
        """The grid a request asks for, checked (prompt, size, steps, snapshots, cell limit).

        Args:
            request (GridRequest): the request.

        Returns:
            GridPlan: the plan.

        Raises:
            ConfigError: bad input (CellLimitExceeded over the limit without `confirmed`). TrainingError: no run to
                test, or one is running.
        """
        job = self._job()
        render = RenderSettings(width=int(request.width), height=int(request.height), steps=int(request.steps),
                                cfg_scale=float(request.cfg_scale), sampler=request.sampler_name)
        settings = GridSettings(request.prompt, render, request.negative_prompt)
        settings.check()
        self.host.check_sampler(request.sampler_name)
        snapshots = self._snapshots(job, tuple(request.snapshots))
        ranked = self._ranked(job, snapshots)  # the lowest validation loss is marked on the snapshot axis
        weights = weights_axis(request.weights, self.presets()) if request.weights else None
        plan = plan_grid(settings, strength_axis(request.strengths),
                         snapshot_axis(snapshots, [r.note() for r in ranked]), seed_axis(request.seeds),
                         weights=weights)
        plan.best_snapshot = best_snapshot(ranked)
        check_cell_limit(plan, self.cell_limit, confirmed=request.confirmed)
        return plan

    def estimate(self, request: GridRequest) -> GridEstimate:
        """Measure the host's speed at the request's size and estimate the grid's time.

        Args:
            request (GridRequest): the request (the cell limit is not applied: the estimate helps decide).

        Returns:
            GridEstimate: cells, renders, seconds.
        """
        from dataclasses import replace

        plan = self.plan(replace(request, confirmed=True))
        with self._lock, self.host.grid_session(self._job().config) as (_adapter, render):
            return estimate_grid(plan, measure_speed(render, plan.settings))

    def run(self, request: GridRequest, cancel: threading.Event | None = None,
            on_cell: Callable | None = None, save: bool = True) -> GridOutcome:
        """Render the grid on the host's model and save it beside the run's LoRA.

        Args:
            request (GridRequest): the request.
            cancel (threading.Event, optional): set to stop after the current cell.
            on_cell (callable, optional): `(CellResult, done, total)` after each cell.
            save (bool, optional): write the grid PNG, defaults to True.

        Returns:
            GridOutcome: the result and the saved file.
        """
        from lora_trainer.grids import run_grid

        plan = self.plan(request)
        job = self._job()
        with self._lock, self.host.grid_session(job.config) as (adapter, render):
            try:
                result = run_grid(plan, adapter, render, cancel=cancel, on_cell=on_cell)
            finally:
                self.release_memory()
        outcome = GridOutcome(result, lora_name=self.lora_name())
        if save and result.image is not None:
            outcome.path = self._save(job, plan, result)
        return outcome

    def _save(self, job, plan: GridPlan, result: GridResult) -> Path:
        status = job.status()
        beside = status.lora_path or (status.saved[-1] if status.saved else None)
        if beside is None:
            beside = Path(job.config.save.output_dir or self.host.lora_dir()) / f"{self.lora_name()}.safetensors"
        path = grid_path_beside(beside)
        data = {**plan.describe(), "lora": self.lora_name(), "seconds": round(result.seconds, 2),
                "host": getattr(self.host, "name", "")}
        save_grid_png(result.image, path, data)
        logger.info("grid saved: %s", path)
        return path


def _live_snapshots(job) -> dict[str, LiveSnapshot]:
    """The LoRA in memory and its EMA (when the run kept one), by label."""
    live = job.live_lora
    if live is None:
        return {}
    found = {IN_MEMORY: LiveSnapshot(live, IN_MEMORY)}
    if live.ema is not None:
        found[IN_MEMORY_EMA] = LiveSnapshot(live.ema, IN_MEMORY_EMA)
    return found


__all__ = ["IN_MEMORY", "IN_MEMORY_EMA", "GridOutcome", "GridRequest", "GridService"]
