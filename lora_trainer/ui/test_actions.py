"""What the Test panel does, without gradio: its form values -> a GridRequest, the texts it shows, and a grid run in a
background thread whose cells can be read while it renders (so the panel can show them and Cancel can stop it)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from lora_trainer.grids import format_strength, parse_numbers
from lora_trainer.host.grid_service import GridRequest

DEFAULT_STRENGTHS_TEXT = "0, 0.2, 0.4, 0.6, 0.8, 1"


def request_from_form(prompt: str, negative: str, sampler: str, steps, cfg, width, height, seeds: str,
                      strengths: str, snapshots, confirmed: bool, weights: str = "") -> GridRequest:
    """The panel's fields as a GridRequest (numbers as the WebUI's X/Y/Z plot reads them: "0-1 [6]" works).

    Args:
        prompt (str): the prompt. negative (str): the negative prompt. sampler (str): the sampler's name.
        steps, cfg, width, height: numbers from the form (None when empty).
        seeds (str): "1, 2". strengths (str): "0, 0.5, 1". snapshots (list[str]): the ticked snapshot labels.
        confirmed (bool): render even above the cell limit.
        weights (str, optional): module weights, one a line ("UNet only", "OUTD", "1,0,..."), defaults to "" (the
            whole LoRA, no weights axis).

    Returns:
        GridRequest: the request (checked further by `GridService.plan`).

    Raises:
        ConfigError: a field that is not a number.
    """
    return GridRequest(
        prompt=prompt or "", negative_prompt=negative or "", sampler_name=sampler or "Euler a",
        steps=_whole(steps, "steps"), cfg_scale=_number(cfg, "CFG scale"), width=_whole(width, "width"),
        height=_whole(height, "height"), seeds=tuple(parse_numbers(seeds or "", "seeds", integer=True)),
        strengths=tuple(parse_numbers(strengths or "", "strengths")), snapshots=tuple(snapshots or ()),
        confirmed=bool(confirmed),
        weights=tuple(line.strip() for line in (weights or "").splitlines() if line.strip()))


def _number(value, key: str) -> float:
    from lora_trainer.errors import ConfigError

    if value is None or value == "":
        raise ConfigError(f"{key}: empty. Enter a number.")
    return float(value)


def _whole(value, key: str) -> int:
    from lora_trainer.errors import ConfigError

    number = _number(value, key)
    if number != int(number):
        raise ConfigError(f"{key}: {number:g} is not a whole number. Enter e.g. {int(number)}.")
    return int(number)


def lora_tag(name: str, strength) -> str:
    """`<lora:NAME:S>` as txt2img reads it ("" without a name).

    Args:
        name (str): the LoRA's file name without extension.
        strength (float | str): the strength picked in the grid.

    Returns:
        str: the tag.
    """
    if not name:
        return ""
    return f"<lora:{name}:{format_strength(float(strength))}>"


def best_text(best) -> str:
    """The sentence naming the snapshot with the lowest validation loss ("" when none is known).

    Args:
        best (SnapshotValidation, optional): from `GridService.best_snapshot` or `GridPlan.best_snapshot`.

    Returns:
        str: e.g. " Lowest validation loss: **epoch 4** (0.1234 at step 8)."
    """
    if best is None:
        return ""
    return f" Lowest validation loss: **{best.label}** ({best.loss:.4f} at step {best.step})."


def cell_caption(cell) -> str:
    """A gallery caption: "in memory, strength 0.6, seed 1"."""
    weights = f", {cell.weights.label}" if cell.weights is not None else ""
    return f"{cell.snapshot.label}, strength {format_strength(cell.strength)}{weights}, seed {cell.seed}"


@dataclass
class GridRun:
    """One grid rendering in a background thread.

    Attributes:
        cells (list): CellResults so far (read them while it runs).
        outcome (GridOutcome, optional): set when it ended well. error (BaseException, optional): set on failure.
        cancel (threading.Event): set to stop after the current cell.
    """

    cells: list = field(default_factory=list)
    total: int = 0
    outcome: object = None
    error: BaseException | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, service, request: GridRequest) -> GridRun:
        """Render `request` with `service` in a thread; returns self."""
        def on_cell(result, done, total):
            self.cells.append(result)
            self.total = total

        def work():
            try:
                self.outcome = service.run(request, cancel=self.cancel, on_cell=on_cell)
            except BaseException as error:  # handed to the panel, which shows it
                self.error = error

        self.thread = threading.Thread(target=work, name="lora-trainer-grid", daemon=True)
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


__all__ = ["DEFAULT_STRENGTHS_TEXT", "GridRun", "best_text", "cell_caption", "lora_tag", "request_from_form"]
