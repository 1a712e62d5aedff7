"""The Train panel's checkpoint field when standalone with a models folder: a dropdown of the checkpoints found
there (subfolders too), each labelled with its architecture from the file header; a path can still be typed.
Picking an entry puts its full path in the field, and a line below says what the file is."""
from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from lora_trainer.errors import describe_error
from lora_trainer.models.checkpoint_list import LABELS, CheckpointInfo, inspect_checkpoint, list_checkpoints

logger = logging.getLogger(__name__)


def describe_checkpoint(value: str, entries: dict[str, CheckpointInfo]) -> str:
    """One line on the chosen or typed checkpoint: its architecture, or why it cannot be used.

    Args:
        value (str): a dropdown label, or a path.
        entries (dict[str, CheckpointInfo]): the listed checkpoints by label and by path.

    Returns:
        str: Markdown ("" for an empty field).
    """
    value = (value or "").strip()
    if not value:
        return ""
    entry = entries.get(value)
    if entry is None:
        path = Path(value).expanduser()
        if not path.is_file():
            return f"`{path}`: no such file."
        try:
            architecture = inspect_checkpoint(path)
        except Exception as exc:  # shown by the package's one rule; the field stays editable
            return f"**Not usable:** {describe_error(exc).message}"
        entry = CheckpointInfo(path, path.name, architecture)
    if entry.architecture is None:
        return f"`{entry.name}`: {entry.note}"
    yaml = entry.path.with_suffix(".yaml")
    source = f"from its header and `{yaml.name}`" if yaml.is_file() else "from its header"
    return f"`{entry.name}`: **{LABELS[entry.architecture]}** ({source})"


def _scan(models_dir: Path) -> tuple[list[CheckpointInfo], str]:
    try:
        found = list_checkpoints(models_dir)
    except OSError as exc:
        return [], describe_error(exc).message
    return found, f"{len(found)} checkpoint(s) in `{models_dir}`."


def checkpoint_dropdown(models_dir: Path, value: str, label: str, elem_id: str) -> gr.Dropdown:
    """Build the dropdown, its rescan button and the line below them, and wire them (inside the current Blocks).

    Args:
        models_dir (Path): the models folder.
        value (str): the initial value.
        label (str): the field's label.
        elem_id (str): the dropdown's HTML id (the button gets `<elem_id>-refresh`, the line `<elem_id>-note`).

    Returns:
        gr.Dropdown: the field (its value is the checkpoint's path).
    """
    found, summary = _scan(models_dir)
    entries: dict[str, CheckpointInfo] = {}

    def remember(infos: list[CheckpointInfo]) -> list[str]:
        entries.clear()
        entries.update({info.label: info for info in infos} | {str(info.path): info for info in infos})
        return [info.label for info in infos]

    with gr.Row(equal_height=True):
        dropdown = gr.Dropdown(remember(found), value=value, label=label, allow_custom_value=True, scale=8,
                               elem_id=elem_id)
        refresh = gr.Button("\U0001f504", scale=1, min_width=40, elem_id=f"{elem_id}-refresh")
    note = gr.Markdown(summary, elem_id=f"{elem_id}-note")

    def picked(choice):
        entry = entries.get(choice or "")
        path = str(entry.path) if entry is not None and choice != str(entry.path) else gr.update()
        return path, describe_checkpoint(choice, entries) or _scan(models_dir)[1]

    def rescan():
        infos, text = _scan(models_dir)
        return gr.update(choices=remember(infos)), text

    dropdown.change(picked, inputs=[dropdown], outputs=[dropdown, note], show_progress="hidden")
    refresh.click(rescan, outputs=[dropdown, note], show_progress="hidden")
    return dropdown


__all__ = ["checkpoint_dropdown", "describe_checkpoint"]
