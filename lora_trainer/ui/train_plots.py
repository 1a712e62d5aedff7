"""What the Train panel plots and shows beside its status, without gradio: the loss curves (training, its moving
average, validation in total and per concept folder) as rows of one line plot, and the training previews as
captioned gallery entries."""
from __future__ import annotations

import math
from pathlib import Path

TRAINING, AVERAGE, VALIDATION = "training", "training (average)", "validation"


def _thinned(points: list, limit: int) -> list:
    """Every `stride`-th point (at most `limit`), keeping the last one."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _moving_average(losses: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """The trailing mean over `window` steps, as the status line's "avg" (the loop averages one epoch)."""
    averaged, total = [], 0.0
    for i, (step, loss) in enumerate(losses):
        total += loss
        if i >= window:
            total -= losses[i - window][1]
        averaged.append((step, total / min(i + 1, window)))
    return averaged


def loss_rows(status, limit: int = 2000) -> dict[str, list]:
    """The loss curves as long-form columns for one line plot coloured by `series`: the training loss of every step
    ("training"), its moving average over an epoch ("training (average)"), the validation loss ("validation"),
    and, with several concept folders, each folder's validation loss ("validation: <folder>"). Training series
    are evenly thinned to at most `limit` points each.

    Args:
        status (JobStatus): the snapshot.
        limit (int, optional): most points per training series, defaults to 2000.

    Returns:
        dict: {"step": [...], "loss": [...], "series": [...]}, training rows first.
    """
    losses = [(step, float(loss)) for step, loss in status.losses if math.isfinite(loss)]
    window = max(1, status.total_steps // status.total_epochs) if status.total_epochs else 10
    series = [(TRAINING, _thinned(losses, limit)), (AVERAGE, _thinned(_moving_average(losses, window), limit)),
              (VALIDATION, list(status.validation_losses))]
    history = getattr(status, "validation_concept_losses", [])
    concepts = sorted({name for _, per in history for name in per})
    if len(concepts) > 1:
        series += [(f"{VALIDATION}: {name}", [(step, per[name]) for step, per in history if name in per])
                   for name in concepts]
    rows: dict[str, list] = {"step": [], "loss": [], "series": []}
    for name, points in series:
        for step, loss in points:
            if loss is not None and math.isfinite(loss):
                rows["step"].append(step)
                rows["loss"].append(float(loss))
                rows["series"].append(name)
    return rows


def sample_caption(step: int, prompt_index: int, strength: float | None) -> str:
    """A preview's caption: "step 100 · prompt 2 · strength 0.5" (only the step when the rest is unknown)."""
    parts = [f"step {step}"]
    if prompt_index:
        parts.append(f"prompt {prompt_index}")
    if strength is not None:
        parts.append(f"strength {strength:g}")
    return " · ".join(parts)


def sample_gallery(status, limit: int = 12) -> list[tuple[str, str]]:
    """The latest previews for a gallery: newest step first, each step's images in prompt-file order (prompt, then
    strength), captioned by `sample_caption`.

    Args:
        status (JobStatus): the snapshot.
        limit (int, optional): most images, defaults to 12.

    Returns:
        list[tuple[str, str]]: (image file, caption).
    """
    infos = list(getattr(status, "sample_infos", []))
    entries = [(path, infos[i] if i < len(infos) else None) for i, path in enumerate(status.samples)]
    entries = entries[-limit:]
    order = sorted(range(len(entries)), key=lambda i: -(entries[i][1] or (0,))[0])  # stable: file order kept
    return [(entries[i][0], sample_caption(*entries[i][1]) if entries[i][1] else Path(entries[i][0]).stem)
            for i in order]


__all__ = ["AVERAGE", "TRAINING", "VALIDATION", "loss_rows", "sample_caption", "sample_gallery"]
