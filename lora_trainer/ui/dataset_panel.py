"""The Dataset panel: tagger, tag frequencies, filters, gallery, batch edits with undo, caption editor and
preview, save/reload, analysis. Layout and wiring only; the actions live in `dataset_actions`/`tagger_actions`.

`build_dataset_panel` places the panel inside the caller's `gr.Blocks` (the WebUI tab); `create_app` makes a
standalone app around it. Works on gradio 3.41 (AUTOMATIC1111) and 4.x (Forge), see `compat`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui import compat, folder_access, tagger_actions
from lora_trainer.ui import dataset_actions as actions
from lora_trainer.ui.dataset_views import FREQ_HEADERS
from lora_trainer.ui.tagger_section import build_tagger_section, wire_tagger_section

logger = logging.getLogger(__name__)

# Errors a user can cause (bad folder, bad regex, nothing selected...): shown as a message, never a traceback.
USER_ERRORS = (LoraTrainerError, ValueError, OSError, KeyError, IndexError)
EDIT_OUT = ["state", "status", "batch_status", "freq", "count", "image", "image_name", "caption", "preview",
            "history"]
SELECT_OUT = EDIT_OUT + ["gallery"]
LOAD_OUT = SELECT_OUT + ["folder_filter"]
STYLE_CSS = Path(__file__).resolve().parents[2] / "style.css"


@dataclass
class DatasetPanel:
    """The panel's components by name (`c["status"]`, `c["gallery"]`, ...), the shared tagger cache and the host's
    folder rule (None: every path allowed)."""

    c: dict[str, gr.components.Component] = field(default_factory=dict)
    cache: tagger_actions.TaggerCache = field(default_factory=tagger_actions.TaggerCache)
    folder_policy: folder_access.PolicySource = None

    def check_folder(self, key: str, path) -> None:
        """Refuse a folder outside those the host allows (see `folder_access`)."""
        folder_access.check_path(self.folder_policy, key, path)

    def on_disk(self, fn: Callable) -> Callable:
        """`fn(session, ...)` that reads or writes the loaded folder: checked against the rule first."""
        def action(session, *args):
            if session is not None and session.editor is not None:
                self.check_folder("dataset folder", session.editor.root)
            return fn(session, *args)
        return action

    def outputs(self, names: list[str]) -> list:
        return [self.c[n] for n in names]

    def to_updates(self, values: dict) -> dict:
        """Named action results -> {component: value}; dropdown choices become updates."""
        out = {}
        for name, value in values.items():
            if name == "folder_filter":
                value = gr.update(choices=value, value=value[0])
            out[self.c[name]] = value
            if name == "status" and "batch_status" in self.c:
                out[self.c["batch_status"]] = value  # also beside the edit buttons, far below the top status
        return out

    def error(self, exc: Exception) -> dict:
        message = str(exc).strip("'\"") or type(exc).__name__
        compat.notify_warning(message)
        return self.to_updates({"status": f"**Error:** {message}"})

    def wrap(self, fn: Callable) -> Callable:
        """An event handler that runs `fn` and shows a user error as a message in the status box."""
        def handler(*args):
            session = next((a for a in args if isinstance(a, actions.DatasetSession)), None)
            try:
                if session is None:
                    return self.to_updates(fn(*args))
                with session.lock:  # two clicks of one session may run at once; the editor is not thread-safe
                    return self.to_updates(fn(*args))
            except USER_ERRORS as exc:
                return self.error(exc)
        return handler

    def wrap_gen(self, fn: Callable) -> Callable:
        """Like `wrap` for a generator of named results (the tagger run)."""
        def handler(*args):
            try:
                for values in fn(*args):
                    yield self.to_updates(values)
            except USER_ERRORS as exc:
                yield self.error(exc) | {self.c["tag_status"]: f"**Error:** {exc}"}
        return handler

    def on(self, trigger: Callable, fn: Callable, inputs: list[str], outputs: list[str], **kwargs) -> None:
        """Wire `trigger` (e.g. `button.click`) to `fn` taking the named inputs."""
        trigger(self.wrap(fn), inputs=self.outputs(inputs), outputs=self.outputs(outputs), **kwargs)


def _load_row(p: DatasetPanel, dataset_dir: str | None) -> None:
    with gr.Row(equal_height=True):
        p.c["folder"] = gr.Textbox(value=dataset_dir or "", label="Dataset folder (holds 10_concept folders)",
                                   placeholder="/path/to/train", scale=6, elem_id="lt-ds-folder")
        p.c["ext"] = gr.Textbox(value=".txt", label="Caption extension", scale=1, min_width=90, elem_id="lt-ds-ext")
        p.c["load"] = gr.Button("Load", variant="primary", scale=1, min_width=90, elem_id="lt-ds-load")
    p.c["status"] = gr.Markdown("Enter a dataset folder and press Load.", elem_id="lt-ds-status")


def _filter_box(p: DatasetPanel) -> None:
    with gr.Group():
        with gr.Row():
            p.c["include"] = gr.Textbox(label="Has tags (comma separated)", elem_id="lt-ds-include", scale=3)
            p.c["mode"] = gr.Radio(["AND", "OR"], value="AND", label="Match", elem_id="lt-ds-mode", scale=1,
                                   min_width=120)
        with gr.Row():
            p.c["exclude"] = gr.Textbox(label="Has none of", elem_id="lt-ds-exclude")
            p.c["search"] = gr.Textbox(label="Caption contains", elem_id="lt-ds-search")
            p.c["folder_filter"] = gr.Dropdown([actions.ALL_FOLDERS], value=actions.ALL_FOLDERS, label="Folder",
                                               elem_id="lt-ds-folder-filter")
        with gr.Row():
            p.c["select"] = gr.Button("Select matching", variant="primary", elem_id="lt-ds-select")
            p.c["select_all"] = gr.Button("Select all", elem_id="lt-ds-select-all")
            p.c["select_none"] = gr.Button("Select none", elem_id="lt-ds-select-none")


def _gallery_column(p: DatasetPanel) -> None:
    p.c["count"] = gr.Markdown("", elem_id="lt-ds-count")
    p.c["gallery"] = gr.Gallery(label="Selected images (click one to edit its caption)", columns=6, height=360,
                                allow_preview=False, object_fit="contain", elem_id="lt-ds-gallery")
    _filter_box(p)


def _image_column(p: DatasetPanel) -> None:
    p.c["image_name"] = gr.Markdown("No image open.", elem_id="lt-ds-image-name")
    p.c["image"] = gr.Image(type="filepath", interactive=False, show_label=False, height=260, elem_id="lt-ds-image")
    with gr.Row():
        p.c["prev"] = gr.Button("< Prev", size="sm", elem_id="lt-ds-prev")
        p.c["next"] = gr.Button("Next >", size="sm", elem_id="lt-ds-next")
    p.c["caption"] = gr.Textbox(label="Caption (edit, then Set caption)", lines=3, elem_id="lt-ds-caption")
    p.c["set_caption"] = gr.Button("Set caption", elem_id="lt-ds-set-caption")
    with gr.Accordion("Caption as the model sees it", open=True):
        with gr.Row():
            defaults = actions.PREVIEW_DEFAULTS
            p.c["keep_tokens"] = gr.Number(value=defaults.keep_tokens, precision=0, label="keep_tokens", min_width=80,
                                           elem_id="lt-ds-keep-tokens")
            p.c["shuffle"] = gr.Checkbox(value=defaults.shuffle_caption, label="shuffle_caption",
                                         elem_id="lt-ds-shuffle")
            p.c["dropout"] = gr.Slider(0, 1, value=defaults.caption_tag_dropout_rate, step=0.05,
                                       label="caption_tag_dropout_rate",
                                       elem_id="lt-ds-dropout")
        p.c["preview"] = gr.Textbox(label="Preview", lines=2, interactive=False, elem_id="lt-ds-preview")
        p.c["reroll"] = gr.Button("Re-roll", size="sm", elem_id="lt-ds-reroll")


def _batch_box(p: DatasetPanel) -> None:
    with gr.Group(elem_id="lt-ds-batch"), gr.Row(equal_height=True):
        p.c["scope"] = gr.Radio(actions.SCOPE_CHOICES, value="selection", label="Apply to", scale=2,
                                elem_id="lt-ds-scope")
        p.c["op"] = gr.Dropdown(actions.BATCH_OPS, value=actions.BATCH_OPS[0], label="Batch operation",
                                scale=2, elem_id="lt-ds-op")
        p.c["op_tags"] = gr.Textbox(label="Tags / find", scale=3, elem_id="lt-ds-op-tags")
        p.c["op_new"] = gr.Textbox(label="Replace with / new name", scale=2, elem_id="lt-ds-op-new")
        p.c["op_keep"] = gr.Number(value=0, precision=0, label="Sort: keep first", scale=1, min_width=80)
        p.c["apply"] = gr.Button("Apply", variant="primary", scale=1, min_width=80, elem_id="lt-ds-apply")
    with gr.Row(equal_height=True):
        p.c["undo"] = gr.Button("Undo", elem_id="lt-ds-undo", min_width=70)
        p.c["redo"] = gr.Button("Redo", elem_id="lt-ds-redo", min_width=70)
        p.c["history"] = gr.Markdown("", elem_id="lt-ds-history")
        p.c["save"] = gr.Button("Save changed captions", variant="primary", elem_id="lt-ds-save")
        p.c["reload"] = gr.Button("Reload from disk", elem_id="lt-ds-reload")
        p.c["force"] = gr.Button("Overwrite conflicts", elem_id="lt-ds-force", min_width=90)
        p.c["take_disk"] = gr.Button("Take disk versions", elem_id="lt-ds-take-disk", min_width=90)
    p.c["batch_status"] = gr.Markdown("", elem_id="lt-ds-batch-status")


def _tables_row(p: DatasetPanel) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                p.c["freq_sort"] = gr.Radio(["count", "name"], value="count", label="Sort tags by",
                                            elem_id="lt-ds-freq-sort")
                p.c["freq_scope"] = gr.Radio(actions.SCOPE_CHOICES, value="whole dataset", label="Count over",
                                             elem_id="lt-ds-freq-scope")
            p.c["freq"] = gr.Dataframe(headers=FREQ_HEADERS, datatype=["str", "number", "str"], type="array",
                                       col_count=(3, "fixed"), interactive=False, wrap=True,
                                       label="Tag frequency (click a tag to filter by it)", elem_id="lt-ds-freq")
        with gr.Column(scale=3):
            p.c["analyze"] = gr.Button("Analyze dataset", elem_id="lt-ds-analyze")
            p.c["analysis"] = gr.Markdown("", elem_id="lt-ds-analysis")


def _layout(p: DatasetPanel, dataset_dir: str | None, tagger_dir: str | None) -> None:
    p.c["state"] = gr.State(None)
    _load_row(p, dataset_dir)
    build_tagger_section(p, tagger_dir)
    with gr.Row():
        with gr.Column(scale=3):
            _gallery_column(p)
        with gr.Column(scale=2):
            _image_column(p)
    _batch_box(p)
    _tables_row(p)


def _wire_editor(p: DatasetPanel) -> None:
    c = p.c

    def load(session, folder, ext, keep_tokens, shuffle, dropout):  # the first preview uses the controls' values
        p.check_folder("dataset folder", folder)
        return actions.load(session, folder, ext, actions.preview_options(keep_tokens, shuffle, dropout))

    p.on(c["load"].click, load, ["state", "folder", "ext", "keep_tokens", "shuffle", "dropout"], LOAD_OUT)
    p.on(c["select"].click, actions.apply_filter,
         ["state", "include", "exclude", "mode", "search", "folder_filter"], SELECT_OUT)
    p.on(c["select_all"].click, actions.select_all, ["state"], SELECT_OUT)
    p.on(c["select_none"].click, actions.clear_selection, ["state"], SELECT_OUT)
    p.on(c["apply"].click, actions.batch, ["state", "op", "scope", "op_tags", "op_new", "op_keep"], EDIT_OUT)
    p.on(c["undo"].click, actions.undo, ["state"], EDIT_OUT)
    p.on(c["redo"].click, actions.redo, ["state"], EDIT_OUT)
    p.on(c["set_caption"].click, actions.set_caption, ["state", "caption"], EDIT_OUT)
    p.on(c["save"].click, p.on_disk(actions.save), ["state"], EDIT_OUT)
    p.on(c["force"].click, p.on_disk(lambda s: actions.save(s, force=True)), ["state"], EDIT_OUT)
    p.on(c["reload"].click, p.on_disk(actions.reload), ["state"], EDIT_OUT)
    p.on(c["take_disk"].click, p.on_disk(lambda s: actions.reload(s, prefer_disk=True)), ["state"], EDIT_OUT)
    p.on(c["prev"].click, lambda s: actions.step_image(s, -1), ["state"], EDIT_OUT)
    p.on(c["next"].click, lambda s: actions.step_image(s, 1), ["state"], EDIT_OUT)
    p.on(c["analyze"].click, actions.analysis, ["state"], ["status", "batch_status", "analysis"])
    preview_in = ["state", "keep_tokens", "shuffle", "dropout"]
    preview_out = ["state", "status", "batch_status", "preview"]
    p.on(c["reroll"].click, lambda s, k, sh, d: actions.preview(s, k, sh, d, True), preview_in, preview_out)
    for name in ("keep_tokens", "shuffle", "dropout"):
        p.on(c[name].change, lambda s, k, sh, d: actions.preview(s, k, sh, d, False), preview_in, preview_out)
    for name in ("freq_sort", "freq_scope"):
        p.on(c[name].change, actions.frequency, ["state", "freq_sort", "freq_scope"], EDIT_OUT)

    def open_clicked(session, evt: gr.SelectData):
        return p.wrap(actions.open_image)(session, evt.index)

    c["gallery"].select(open_clicked, inputs=[c["state"]], outputs=p.outputs(EDIT_OUT))

    def tag_clicked(include, rows, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        tag = rows[row][0] if rows and 0 <= row < len(rows) else ""
        return actions.add_filter_tag(include, str(tag))

    c["freq"].select(tag_clicked, inputs=[c["include"], c["freq"]], outputs=[c["include"]])


def build_dataset_panel(dataset_dir: str | None = None, tagger_dir: str | None = None,
                        folder_policy: folder_access.PolicySource = None) -> DatasetPanel:
    """Build the Dataset panel inside the current `gr.Blocks` (call it inside a `with gr.Blocks()` or a tab).

    Args:
        dataset_dir (str, optional): dataset folder filled in at start.
        tagger_dir (str, optional): folder of WD14 tagger model folders (model.onnx + selected_tags.csv each).
        folder_policy (PolicySource, optional): the host's folder rule, checked by every action that takes a
            folder (Load, Save, Reload, the tagger's folders); defaults to None (every path allowed).

    Returns:
        DatasetPanel: the components by name (for the host to add events) and the shared tagger cache.
    """
    panel = DatasetPanel(folder_policy=folder_policy)
    with gr.Column(elem_id="lt-dataset-panel"):
        _layout(panel, dataset_dir, tagger_dir)
    _wire_editor(panel)
    wire_tagger_section(panel, tagger_dir, LOAD_OUT)
    return panel


def create_app(dataset_dir: str | None = None, tagger_dir: str | None = None, concurrency: int = 4) -> gr.Blocks:
    """A standalone app holding the Dataset panel, with the queue on (the tagger streams its progress).

    Args:
        dataset_dir (str, optional): dataset folder filled in at start.
        tagger_dir (str, optional): folder of tagger model folders.
        concurrency (int, optional): events run at once (a Cancel must run beside a tagger run). Defaults to 4.

    Returns:
        gr.Blocks: call `.launch(server_name="127.0.0.1", ...)` on it.
    """
    css = STYLE_CSS.read_text(encoding="utf-8") if STYLE_CSS.is_file() else None
    with gr.Blocks(title="LoRA trainer: dataset", theme=compat.local_theme(), css=css, analytics_enabled=False) as app:
        build_dataset_panel(dataset_dir, tagger_dir)
    return compat.enable_queue(app, concurrency)


__all__ = ["DatasetPanel", "build_dataset_panel", "create_app"]
