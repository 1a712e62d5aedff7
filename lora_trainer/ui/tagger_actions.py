"""The Dataset panel's tagger: model list, options from the widgets, a run with progress and cancel.

The run itself is `tagging.tag_folder` in a worker thread; this module only relays its progress to the view and
loads the written captions into the editor afterwards.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lora_trainer.errors import DatasetError, TaggerError
from lora_trainer.progress import CancelToken
from lora_trainer.tagging import TaggerModel, TagOptions, find_models, tag_folder
from lora_trainer.tagging.tag_format import EXISTING_MODES
from lora_trainer.ui import dataset_actions as actions
from lora_trainer.ui import dataset_views as views
from lora_trainer.ui.dataset_actions import DatasetSession

logger = logging.getLogger(__name__)

TAG_FLAGS = ["include characters", "include rating", "replace underscores", "escape parentheses",
             "sort alphabetically"]
DEFAULT_FLAGS = ["include characters", "replace underscores"]
DEVICES = ["auto", "cuda", "cpu"]
EXISTING = list(EXISTING_MODES)
POLL_S = 0.25


class TaggerCache:
    """Keeps the last loaded tagger, so a second run does not load the model again. Shared by sessions."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._model: TaggerModel | None = None

    def get(self, folder: Path, device: str) -> TaggerModel:
        """The model of `folder` on `device`, loading it (and dropping the previous one) when needed."""
        key = (str(folder), device)
        with self._lock:
            if self._key != key or self._model is None:
                self._model = None
                self._model = TaggerModel(folder, device=device)
                self._key = key
            return self._model


def model_choices(tagger_dir: str | None) -> tuple[list[str], str]:
    """Ready model folder names under `tagger_dir`, and a note on incomplete ones or an empty folder."""
    if not tagger_dir:
        return [], "No tagger models folder set."
    infos = find_models(tagger_dir)
    ready = [m.name for m in infos if m.ready]
    notes = [m.problem for m in infos if not m.ready and m.problem]
    if not infos:
        notes.append(f"{tagger_dir}: no tagger models. Put a WD14 model folder (model.onnx + selected_tags.csv) there.")
    return ready, "\n".join(f"- {n}" for n in notes)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def build_options(general: float, character: float, general_mcut: bool, character_mcut: bool, triggers: str,
                  existing: str, exclude: str, flags: list[str], caption_extension: str = ".txt") -> TagOptions:
    """TagOptions from the tagger widgets (thresholds, MCut, trigger words, existing-caption mode, exclude, flags)."""
    flags = set(flags or [])
    return TagOptions(
        general_threshold=float(general), character_threshold=float(character), general_mcut=bool(general_mcut),
        character_mcut=bool(character_mcut), include_characters="include characters" in flags,
        include_rating="include rating" in flags, replace_underscores="replace underscores" in flags,
        escape_parentheses="escape parentheses" in flags, exclude_tags=_split(exclude), trigger_tags=_split(triggers),
        sort="alpha" if "sort alphabetically" in flags else "confidence", existing=existing,
        caption_extension=(caption_extension or ".txt").strip() or ".txt")


def run(session: DatasetSession | None, folder: str, tagger_dir: str, model_name: str, device: str,
        options: TagOptions, cache: TaggerCache) -> Iterator[dict]:
    """Tag every image under the dataset folder, yielding progress, then load the captions into the editor.

    Args:
        session (DatasetSession | None): the session (a new one when None).
        folder (str): the dataset folder (tagged recursively; hidden folders such as backups are skipped).
        tagger_dir (str): the tagger models folder. model_name (str): a model folder name inside it.
        device (str): "auto", "cuda" or "cpu".
        options (TagOptions): what to write.
        cache (TaggerCache): the loaded-model cache.

    Yields:
        dict: named view outputs ("tag_status" while running; all editor views at the end).
    """
    session = session or DatasetSession()
    folder = (folder or "").strip()
    if not folder or not Path(folder).is_dir():
        raise DatasetError(f"dataset folder: {folder or '(empty)'} is not a folder. Enter it above, then Run.")
    if not model_name:
        raise TaggerError(f"{tagger_dir or 'tagger models folder'}: no model chosen. Put a WD14 model folder "
                          "(model.onnx + selected_tags.csv) there, press Refresh, and pick it.")
    token = CancelToken()
    session.cancel = token
    updates: queue.Queue = queue.Queue()
    yield {"state": session, "tag_status": f"Loading tagger `{model_name}` ..."}

    def work():
        model = cache.get(Path(tagger_dir) / model_name, device)
        updates.put(model.provider)
        return tag_folder(folder, model, options, recursive=True, progress=updates.put, cancel=token)

    provider = "?"
    with ThreadPoolExecutor(1, thread_name_prefix="tagger") as pool:
        future = pool.submit(work)
        while not (future.done() and updates.empty()):
            try:
                item = updates.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, str):
                provider = item
                yield {"tag_status": f"Tagging on **{provider}** ..."}
            else:
                yield {"tag_status": views.progress_text(item, provider)}
        summary = future.result()
    session.cancel = None
    with session.lock:
        result = _after_run(session, folder, summary, options.caption_extension)
    yield result


def _after_run(session: DatasetSession, folder: str, summary, caption_extension: str) -> dict:
    editor = session.editor
    if editor is not None and Path(editor.root).resolve() == Path(folder).resolve():
        out = actions.reload(session)
    else:
        out = actions.load(session, folder, caption_extension)
    out["tag_status"] = views.tag_summary_markdown(summary, Path(folder))
    return out


def cancel(session: DatasetSession | None) -> str:
    """Ask the running tagger to stop after its current batch."""
    if session is None or session.cancel is None:
        return "Nothing is running."
    session.cancel.cancel()
    return "Cancelling after the current batch ..."
