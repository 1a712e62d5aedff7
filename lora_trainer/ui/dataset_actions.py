"""What each Dataset panel button does: calls into `lora_trainer.tagging` and returns named view values.

Every action takes the browser session's `DatasetSession` plus the raw widget values and returns a dict
``{output name: value}``; the panel maps names to components (see `dataset_panel.OUTPUTS`). No gradio here,
so the actions run in plain tests too.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.captions import CaptionOptions
from lora_trainer.errors import DatasetError
from lora_trainer.progress import CancelToken
from lora_trainer.tagging import TagEditor, analyze
from lora_trainer.ui import dataset_views as views
from lora_trainer.ui.thumbnails import VIEW_SIDE, thumbnail

logger = logging.getLogger(__name__)

SCOPE_CHOICES = ["selection", "whole dataset"]
ALL_FOLDERS = "(all folders)"
BATCH_OPS = [
    "add at end",
    "add at front",
    "remove",
    "replace text",
    "replace regex",
    "rename tag",
    "move to front",
    "remove duplicates",
    "sort alphabetically",
]
# The preview's settings before the user touches them: kohya's usual ones for tagged captions (trigger word kept
# first, the rest shuffled). The panel's controls start from these, so the first preview matches what they show.
PREVIEW_DEFAULTS = CaptionOptions(shuffle_caption=True, keep_tokens=1)


@dataclass
class DatasetSession:
    """One browser session's dataset: the editor and what the view shows.

    Attributes:
        editor (TagEditor | None): the loaded dataset, None before Load.
        shown (list[int]): image indices in gallery order.
        current (int | None): the image open in the caption editor.
        seed (int | None): the caption preview's seed (None: draw one).
        caption_options (CaptionOptions): the preview's kohya caption settings.
        freq_sort (str): "count" or "name". freq_scope (str): "all" or "selection".
        cancel (CancelToken | None): the running tagger's token.
        lock (threading.Lock): held by the panel while an action runs (events of one session may run at once).
    """

    editor: TagEditor | None = None
    shown: list[int] = field(default_factory=list)
    current: int | None = None
    seed: int | None = None
    caption_options: CaptionOptions = PREVIEW_DEFAULTS
    freq_sort: str = "count"
    freq_scope: str = "all"
    cancel: CancelToken | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)



def _editor(session: DatasetSession | None) -> TagEditor:
    """The session's editor, or a DatasetError telling the user to load a folder first."""
    if session is None or session.editor is None:
        raise DatasetError("dataset folder: nothing loaded yet. Enter the folder above and press Load.")
    return session.editor


def scope_key(label: str) -> str:
    """'whole dataset' -> 'all'; 'selection' stays."""
    return "all" if label == "whole dataset" else "selection"


def preview_options(keep_tokens: float, shuffle: bool, dropout: float) -> CaptionOptions:
    """The preview controls' values as kohya caption options.

    Args:
        keep_tokens (float): tags kept in place. shuffle (bool): shuffle the others. dropout (float): tag dropout.

    Returns:
        CaptionOptions: the options.
    """
    return CaptionOptions(shuffle_caption=bool(shuffle), keep_tokens=int(keep_tokens or 0),
                          caption_tag_dropout_rate=float(dropout or 0))


def load(session: DatasetSession | None, folder: str, caption_extension: str = ".txt",
         caption_options: CaptionOptions | None = None) -> dict:
    """Load a dataset folder and select every image.

    Args:
        session (DatasetSession | None): the session (a new one when None).
        folder (str): the dataset folder (``N_concept`` folders inside, or one itself).
        caption_extension (str, optional): caption extension. Defaults to ".txt".
        caption_options (CaptionOptions, optional): the preview controls' settings; defaults to the session's.

    Returns:
        dict: every view output.
    """
    session = session or DatasetSession()
    folder = (folder or "").strip()
    if not folder:
        raise DatasetError("dataset folder: empty. Enter the folder that holds your 10_concept folders.")
    if not Path(folder).is_dir():
        raise DatasetError(f"{folder}: not a folder. Enter the folder that holds your 10_concept folders.")
    session.editor = TagEditor.load(folder, caption_extension or ".txt")
    if caption_options is not None:
        session.caption_options = caption_options
    session.editor.select_all()
    session.current = 0 if len(session.editor) else None
    out = refresh(session, gallery=True)
    out.update(status=views.load_message(session.editor), folder_filter=[ALL_FOLDERS] + sorted(session.editor.folders))
    return out


def refresh(session: DatasetSession, gallery: bool = False) -> dict:
    """The views that follow the editor's state: frequency table, count, caption box, preview, history."""
    editor = _editor(session)
    out = {"state": session, "freq": views.frequency_rows(editor, session.freq_sort, session.freq_scope)}
    if gallery:
        session.shown = sorted(editor.selection)
        out["gallery"] = views.gallery_items(editor, session.shown)
    out["count"] = views.selection_label(editor, min(len(session.shown), views.MAX_GALLERY))
    out.update(image_view(session))
    out["history"] = history_label(editor)
    return out


def history_label(editor: TagEditor) -> str:
    """'Undo: <last op>' line for the history box."""
    names = editor.history()
    unsaved = len(editor.dirty())
    return (f"{len(names)} edits to undo" + (f" (last: {names[-1]})" if names else "")
            + ("; redo available" if editor.can_redo else "")
            + (f"; **{unsaved} captions not saved**" if unsaved else "; all saved"))


def image_view(session: DatasetSession) -> dict:
    """The open image, its caption and its preview."""
    editor = _editor(session)
    if session.current is None or not 0 <= session.current < len(editor):
        return {"image": None, "caption": "", "preview": "", "image_name": "No image open."}
    i = session.current
    entry = editor.images[i]
    shown = editor.preview_caption(i, session.caption_options, session.seed)
    session.seed = shown.seed
    name = f"`{entry.rel_path}`" + ("" if entry.problem is None else f" ({entry.problem})")
    return {"image": thumbnail(entry.image_path, VIEW_SIDE), "caption": editor.caption(i), "image_name": name,
            "preview": f"{shown.caption}\n\n(seed {shown.seed})"}


def apply_filter(session: DatasetSession, include: str, exclude: str, mode: str, text: str, folder: str) -> dict:
    """Select the images matching the filters (AND/OR include tags, exclude tags, text, folder)."""
    editor = _editor(session)
    editor.select_where(include=include or "", exclude=exclude or "", mode="any" if mode == "OR" else "all",
                        text=(text or "").strip() or None, folder=None if folder in (None, "", ALL_FOLDERS) else folder)
    out = refresh(session, gallery=True)
    out["status"] = f"Filter selected {len(editor.selection)} of {len(editor)} images."
    return out


def select_all(session: DatasetSession) -> dict:
    """Select every image."""
    _editor(session).select_all()
    return refresh(session, gallery=True)


def clear_selection(session: DatasetSession) -> dict:
    """Select nothing."""
    _editor(session).clear_selection()
    return refresh(session, gallery=True)


def batch(session: DatasetSession, operation: str, scope_label: str, tags: str, replacement: str, keep: float) -> dict:
    """Run one batch operation on the selection or the whole dataset.

    Args:
        session (DatasetSession): the session.
        operation (str): one of BATCH_OPS.
        scope_label (str): "selection" or "whole dataset".
        tags (str): the tags (add/remove/move), the text or pattern to find (replace), the old tag (rename).
        replacement (str): the replacement text or the new tag name.
        keep (float): tags kept in place when sorting (keep_tokens).

    Returns:
        dict: status and the refreshed views.
    """
    editor = _editor(session)
    scope = scope_key(scope_label)
    if scope == "selection" and not editor.selection:
        raise DatasetError("scope: the selection is empty. Select images with a filter, or pick 'whole dataset'.")
    tags, replacement = tags or "", replacement or ""
    needs_tags = operation not in ("remove duplicates", "sort alphabetically")
    if needs_tags and not tags.strip():
        raise ValueError(f"{operation}: no tags or text given. Fill in the 'Tags / find' box.")
    ops = {
        "add at end": lambda: editor.add_tags(tags, scope=scope),
        "add at front": lambda: editor.add_tags(tags, scope=scope, front=True),
        "remove": lambda: editor.remove_tags(tags, scope=scope),
        "replace text": lambda: editor.replace(tags, replacement, scope=scope),
        "replace regex": lambda: editor.replace(tags, replacement, scope=scope, regex=True),
        "rename tag": lambda: editor.rename_tag(tags.strip(), replacement.strip(), scope=scope),
        "move to front": lambda: editor.move_to_front(tags, scope=scope),
        "remove duplicates": lambda: editor.dedupe(scope=scope),
        "sort alphabetically": lambda: editor.sort_tags(scope=scope, keep=int(keep or 0)),
    }
    if operation not in ops:
        raise ValueError(f"operation: {operation!r} is unknown. Pick one of: {', '.join(BATCH_OPS)}.")
    result = ops[operation]()
    out = refresh(session)
    out["status"] = views.edit_message(result)
    return out


def undo(session: DatasetSession) -> dict:
    """Take back the last edit."""
    result = _editor(session).undo()
    out = refresh(session)
    out["status"] = views.edit_message(result, "undo")
    return out


def redo(session: DatasetSession) -> dict:
    """Do the last undone edit again."""
    result = _editor(session).redo()
    out = refresh(session)
    out["status"] = views.edit_message(result, "redo")
    return out


def open_image(session: DatasetSession, gallery_index: int) -> dict:
    """Open the gallery's n-th image in the caption editor."""
    _editor(session)
    if not 0 <= gallery_index < len(session.shown):
        raise IndexError(f"gallery: image {gallery_index} is not shown any more. Click another image.")
    session.current = session.shown[gallery_index]
    session.seed = None
    return image_view(session) | {"state": session}


def step_image(session: DatasetSession, step: int) -> dict:
    """Open the previous (-1) or next (+1) image of the gallery."""
    _editor(session)
    if not session.shown:
        return {"status": "No image selected."}
    pos = session.shown.index(session.current) if session.current in session.shown else -step
    session.current = session.shown[(pos + step) % len(session.shown)]
    session.seed = None
    return image_view(session) | {"state": session}


def set_caption(session: DatasetSession, text: str) -> dict:
    """Set the open image's caption (in memory: Save writes it)."""
    editor = _editor(session)
    if session.current is None:
        raise DatasetError("caption: no image open. Click an image in the gallery first.")
    result = editor.set_caption(session.current, text or "")
    out = refresh(session)
    out["status"] = views.edit_message(result)
    return out


def preview(session: DatasetSession, keep_tokens: float, shuffle: bool, dropout: float, reroll: bool) -> dict:
    """The open caption as the model sees it with these settings; `reroll` draws a new seed. Before Load there is
    nothing to show (Load reads the controls)."""
    if session is None or session.editor is None:
        return {}
    session.caption_options = preview_options(keep_tokens, shuffle, dropout)
    if reroll:
        session.seed = None
    # Only the preview: the caption box may hold an edit not yet set.
    return {"state": session, "preview": image_view(session)["preview"]}


def frequency(session: DatasetSession, sort: str, scope_label: str) -> dict:
    """Re-sort the frequency table ('count' or 'name'), over the whole dataset or the selection."""
    session.freq_sort = "name" if sort == "name" else "count"
    session.freq_scope = scope_key(scope_label)
    return refresh(session)


def save(session: DatasetSession, force: bool = False) -> dict:
    """Write the changed captions (force: also those changed on disk since load)."""
    editor = _editor(session)
    result = editor.save(force=force)
    out = refresh(session)
    out["status"] = views.save_message(result, editor.root)
    return out


def reload(session: DatasetSession, prefer_disk: bool = False) -> dict:
    """Take in captions changed on disk (prefer_disk: also drop edits that conflict)."""
    editor = _editor(session)
    result = editor.reload(prefer_disk=prefer_disk)
    out = refresh(session)
    out["status"] = views.reload_message(result, editor.root)
    return out


def analysis(session: DatasetSession) -> dict:
    """Concept balance, associations and near-universal tags of the current captions."""
    editor = _editor(session)
    text = views.analysis_markdown(analyze(editor.records(usable_only=True)))
    return {"analysis": views.unusable_markdown(editor.unusable_images(), editor.root) + text}


def add_filter_tag(include: str, tag: str) -> str:
    """The include box with `tag` appended (clicking a frequency row)."""
    tag = (tag or "").strip()
    have = [t.strip() for t in (include or "").split(",") if t.strip()]
    if tag and tag not in have:
        have.append(tag)
    return ", ".join(have)
