"""Render a grid: for each cell put its snapshot on the model at its strength, render through the host's `render`,
and check the cancel flag between cells. The model is given back without any LoRA on it, whatever happens.

A snapshot is merged into the weights once per strength (`networks.MergedWeights`), not injected as bypass
forwards: cells render without the LoRA's extra matmuls at every step, as with a file loaded by name. While merged
the model holds one extra copy of the touched weights, kept from the first merge to the end of the grid (every
snapshot writes into the same copy); the original weight tensors are put back afterwards (bit for bit, no
subtraction)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from PIL import Image

from lora_trainer.grids.axes import format_strength
from lora_trainer.grids.image import draw_labelled_grid
from lora_trainer.grids.plan import GridCell, GridPlan, Render
from lora_trainer.grids.weights import weigh_network
from lora_trainer.networks.merge import MergedWeights

logger = logging.getLogger(__name__)


@dataclass
class CellResult:
    """One rendered cell.

    Attributes:
        cell (GridCell): position and values.
        image (PIL.Image.Image): the image.
        seconds (float): render time (0 for a base image shared with another snapshot's cell).
    """

    cell: GridCell
    image: Image.Image
    seconds: float


@dataclass
class GridResult:
    """What a grid run produced.

    Attributes:
        plan (GridPlan): the plan.
        cells (list[CellResult]): cells rendered, in render order.
        image (PIL.Image.Image, optional): the labelled grid; None when cancelled before every cell was rendered.
        cancelled (bool): the cancel flag stopped the run between cells.
        seconds (float): wall time.
    """

    plan: GridPlan
    cells: list[CellResult] = field(default_factory=list)
    image: Image.Image | None = None
    cancelled: bool = False
    seconds: float = 0.0

    def seconds_per_render(self) -> float:
        """Mean time of the images actually rendered."""
        rendered = [c.seconds for c in self.cells if c.seconds > 0]
        return sum(rendered) / len(rendered) if rendered else 0.0


class _Switcher:
    """Keeps at most one snapshot merged into the model's weights; strength 0 means none (the base model, bit for
    bit). Cells come strength-major (`plan_grid`), so each strength of a snapshot is merged once for all its seeds.

    Args:
        adapter (ModelAdapter): the loaded model.
    """

    def __init__(self, adapter):
        self.adapter = adapter
        self._buffers: dict = {}  # the merged weights, shared by every snapshot's merger
        self._mergers: dict[int, MergedWeights] = {}
        self._current = None
        self._key = None

    def show(self, snapshot, strength: float, weights=None) -> str:
        key = (id(snapshot), strength, weights)
        if key != self._key:
            self.take_off()
            if strength != 0:
                self._merge(snapshot, strength, weights)
            self._key = key
        if strength == 0:
            return "base"
        return f"{snapshot.label}@{format_strength(strength)}" + (f"/{weights.label}" if weights is not None else "")

    def _merge(self, snapshot, strength: float, weights) -> None:
        network = snapshot.bind(self.adapter)
        merger = self._mergers.get(id(snapshot))
        if merger is None or merger.network is not network:
            merger = self._mergers[id(snapshot)] = MergedWeights(network, buffers=self._buffers)
        # per-module factors on top of the strength (UNet only, block weights)
        weigh_network(network, strength, weights, self.adapter.architecture)
        merger.merge()
        self._current = merger

    def take_off(self) -> None:
        """Put the model's own weights back (the original tensors); the buffers stay for the next strength."""
        if self._current is not None:
            self._current.restore()
            self._current = None
        self._key = None

    def release(self) -> None:
        """Take off and drop the merged weights' buffers (end of the grid)."""
        self.take_off()
        for merger in self._mergers.values():
            merger.release()
        self._mergers = {}


def run_grid(plan: GridPlan, adapter, render: Render, cancel: threading.Event | None = None,
             on_cell: Callable[[CellResult, int, int], None] | None = None) -> GridResult:
    """Render every cell of `plan` on `adapter`'s model and draw the labelled grid.

    Args:
        plan (GridPlan): from `plan_grid` (check the cell limit and show the estimate before).
        adapter (ModelAdapter): the loaded model the snapshots are put on (its `lora_targets` bind the files).
        render (Render): the host's renderer; it renders the model as it is at that moment.
        cancel (threading.Event, optional): set it to stop after the current cell, defaults to None.
        on_cell (callable, optional): `(result, done, total)` after each cell (progress, live gallery).

    Returns:
        GridResult: the cells and, when complete, the grid image.

    Raises:
        NetworkError: a snapshot does not fit the model. Render errors pass through; in every case the LoRA is
            taken off the model first.
    """
    started = time.perf_counter()
    result = GridResult(plan)
    switcher = _Switcher(adapter)
    base_images: dict[int, Image.Image] = {}
    try:
        for done, cell in enumerate(plan.cells, start=1):
            if cancel is not None and cancel.is_set():
                result.cancelled = True
                logger.info("grid cancelled after %d of %d cells", done - 1, len(plan.cells))
                break
            cell_result = _render_cell(plan, cell, switcher, render, base_images)
            result.cells.append(cell_result)
            if on_cell is not None:
                on_cell(cell_result, done, len(plan.cells))
    finally:
        switcher.release()  # the model's own weight tensors back first
        for snapshot in _snapshots(plan):  # every LoRA off the model, in-memory strengths as they were
            snapshot.release()
    if not result.cancelled:
        images = {(c.cell.x, c.cell.y, c.cell.z): c.image for c in result.cells}
        result.image = draw_labelled_grid(images, list(plan.x.labels), list(plan.y.labels), list(plan.z.labels))
    result.seconds = time.perf_counter() - started
    return result


def _snapshots(plan: GridPlan) -> tuple:
    return next(axis.values for axis in plan.axes if axis.kind == "snapshot")


def _render_cell(plan: GridPlan, cell: GridCell, switcher: _Switcher, render: Render,
                 base_images: dict[int, Image.Image]) -> CellResult:
    if cell.is_base and cell.seed in base_images:
        return CellResult(cell, base_images[cell.seed], 0.0)
    state = switcher.show(cell.snapshot, cell.strength, cell.weights)
    settings = plan.settings
    start = time.perf_counter()
    image = render(settings.prompt, settings.negative_prompt, cell.seed, replace(settings.render, lora_state=state))
    seconds = time.perf_counter() - start
    if cell.is_base:
        base_images[cell.seed] = image
    return CellResult(cell, image, seconds)


__all__ = ["CellResult", "GridResult", "run_grid"]
