"""The Train panel: dataset folder, preset, training options (basic shown, advanced folded), kohya TOML import and
export, Start / Stop / Stop and save / Pause / Continue (`train_pause.py`) / Resume, and a live status with loss
curve and samples polled once a second.

Layout and wiring only: configs come from `train_views` (`config_from_dict` underneath), runs from the
`JobManager`. The status is a generator event started by page load, Start and Resume that yields once a second
while a job is active and then ends (no endless timer). Works on gradio 3.41 (AUTOMATIC1111) and 4.x (Forge).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from lora_trainer.train.job import JobManager
from lora_trainer.ui import compat, folder_access
from lora_trainer.ui import train_views as views
from lora_trainer.ui.panel_errors import error_text
from lora_trainer.ui.train_pause import add_pause_buttons, wire_pause_buttons

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0


@dataclass
class TrainPanel:
    """The panel's components by name (`c["status"]`, `c["lt-key"]`...), its form in FORM order, its manager and
    the host's folder rule (None: every path allowed)."""

    manager: JobManager
    c: dict[str, gr.components.Component] = field(default_factory=dict)
    form: list = field(default_factory=list)
    events: dict = field(default_factory=dict)
    folder_policy: folder_access.PolicySource = None

    def checked(self, config):
        """`config`, once the folder rule allows every path it names (its own prompt files are allowed)."""
        folder_access.check_config(self.folder_policy, config, [views.prompts_folder()])
        return config

    def message(self, text: str, error: bool = False) -> str:
        if error:
            compat.notify_warning(text)
            return f"**Error:** {text}"
        return text


INITIAL = dict(zip(views.FORM_KEYS, views.config_to_form(views.base_config(None))))


def _input(f: views.FormField, elem_id: str):
    value = INITIAL[f.key]
    if f.kind == "bool":
        return gr.Checkbox(value=value, label=f.label, elem_id=elem_id)
    if f.kind in ("int", "float"):
        return gr.Number(value=value, label=f.label, precision=0 if f.kind == "int" else None, elem_id=elem_id,
                         min_width=120)
    if f.kind == "choice":
        return gr.Dropdown(list(f.choices), value=value, label=f.label, elem_id=elem_id)
    lines = 3 if f.kind == "lines" else 1
    return gr.Textbox(value=value, label=f.label, lines=lines, elem_id=elem_id, min_width=120)


def _fields(p: TrainPanel, group: str, per_row: int = 5) -> None:
    fields = [f for f in views.FORM if f.group == group and f.key not in p.c]
    for start in range(0, len(fields), per_row):
        with gr.Row():
            for f in fields[start:start + per_row]:
                p.c[f.key] = _input(f, elem_id(f.key))


def elem_id(key: str) -> str:
    """The HTML id of a form field: `lt-tr-` + the kohya key with dashes (`lt-tr-network-dim`)."""
    return f"lt-tr-{key.replace('_', '-')}"


def _options(p: TrainPanel, host_name: str, models_dir: Path | None) -> None:
    with gr.Group(visible=host_name == "standalone"):
        if models_dir is not None:  # a dropdown of the folder's checkpoints (a path can still be typed)
            from lora_trainer.ui.checkpoint_picker import checkpoint_dropdown

            key = "pretrained_model_name_or_path"
            label = next(f.label for f in views.FORM if f.key == key)
            p.c[key] = checkpoint_dropdown(models_dir, INITIAL[key], label, elem_id(key))
        _fields(p, "model", per_row=1)
    for group in ("basic", "network", "optimizer", "steps"):
        with gr.Group():
            _fields(p, group, per_row=3 if group == "optimizer" else 5)
    for group in views.ADVANCED_GROUPS:
        with gr.Accordion(group, open=False, elem_id=f"lt-tr-adv-{group.split()[0].lower()}"):
            _fields(p, group, per_row=3)
    p.form = [p.c[f.key] for f in views.FORM]


def _toml_box(p: TrainPanel) -> None:
    with gr.Accordion("Import / export kohya TOML", open=False, elem_id="lt-tr-toml"):
        with gr.Row():
            p.c["toml_upload"] = compat.file_upload(label="Import a .toml file", file_types=[".toml"],
                                                    elem_id="lt-tr-toml-upload")
            p.c["toml_file"] = gr.File(label="Exported .toml", interactive=False, elem_id="lt-tr-toml-file")
        p.c["toml_text"] = gr.Textbox(label="kohya TOML", lines=10, elem_id="lt-tr-toml-text")
        with gr.Row():
            p.c["import"] = gr.Button("Import text", elem_id="lt-tr-import")
            p.c["export"] = gr.Button("Export", elem_id="lt-tr-export")


def _controls(p: TrainPanel) -> None:
    with gr.Row(equal_height=True):
        p.c["start"] = gr.Button("Start", variant="primary", elem_id="lt-tr-start")
        p.c["stop"] = gr.Button("Stop", variant="stop", elem_id="lt-tr-stop")
        p.c["stop_save"] = gr.Button("Stop and save", elem_id="lt-tr-stop-save")
    add_pause_buttons(p)
    with gr.Row(equal_height=True):
        p.c["resume_dir"] = gr.Textbox(label="Resume from state folder (<name>-state)", scale=3,
                                       elem_id="lt-tr-resume-dir")
        p.c["resume"] = gr.Button("Resume", scale=1, elem_id="lt-tr-resume")
    p.c["message"] = gr.Markdown("", elem_id="lt-tr-message")
    p.c["refresh"] = gr.Button("Refresh status", size="sm", elem_id="lt-tr-refresh")
    p.c["status"] = gr.Markdown(views.status_markdown(p.manager.status()), elem_id="lt-tr-status")
    p.c["loss"] = compat.line_plot(x="step", y="loss", color="series", title="Loss", label="Loss", height=240,
                                   width=440, tooltip=["series", "step", "loss"], elem_id="lt-tr-loss")
    p.c["samples"] = gr.Gallery(label="Latest samples (newest first)", columns=4, height=260,
                                elem_id="lt-tr-samples")


def _layout(p: TrainPanel, dataset_dir: str | None, host_name: str, models_dir: Path | None = None) -> None:
    p.c["base"] = gr.State(None)
    p.c["seen"] = gr.State(None)
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                p.c["folder"] = gr.Textbox(value=dataset_dir or "", label="Dataset folder (holds 10_concept folders)",
                                           scale=4, elem_id="lt-tr-folder")
                p.c["preset"] = gr.Dropdown(views.preset_choices(), value=views.NO_PRESET, label="Preset",
                                            scale=2, elem_id="lt-tr-preset")
            _options(p, host_name, models_dir)
            _toml_box(p)
        with gr.Column(scale=2, elem_id="lt-tr-run"):
            _controls(p)


# -- handlers (thin: views and the manager do the work) ---------------------------------------------------------------
def _guard(p: TrainPanel, fn: Callable, n_outputs: int) -> Callable:
    """Run `fn`; an error becomes an error message (the last output) and leaves the other outputs as they are. An
    expected failure shows its message (file or key, and the fix); a bug also says so, its traceback in the log."""
    def handler(*args):
        try:
            return fn(*args)
        except Exception as exc:  # shown in the panel by the package's one rule (errors.describe_error)
            message = p.message(error_text(exc, "train panel"), error=True)
            return message if n_outputs == 1 else [gr.update()] * (n_outputs - 1) + [message]
    return handler


def _fill(config, notes: list[str], done: str) -> list:
    text = done + ("" if not notes else "\n\n" + "\n".join(f"- {n}" for n in notes))
    folder = config.dataset.train_data_dir
    return [config, folder if folder else gr.update(), *views.config_to_form(config), text]


def _wire_config(p: TrainPanel) -> None:
    c = p.c
    fill_out = [c["base"], c["folder"], *p.form, c["message"]]

    def pick(preset):
        return _fill(views.base_config(preset), [], f"Preset **{preset}** filled in.")

    c["preset"].change(_guard(p, pick, len(fill_out)), inputs=[c["preset"]], outputs=fill_out)

    def import_text(text):
        config, notes = views.config_from_text(text or "")
        return _fill(p.checked(config), notes, "Imported the TOML.")

    c["import"].click(_guard(p, import_text, len(fill_out)), inputs=[c["toml_text"]], outputs=fill_out)

    def import_file(upload):
        path = compat.uploaded_path(upload)
        if not path:
            return [gr.update()] * (len(fill_out) + 1)
        text = Path(path).read_text(encoding="utf-8")
        config, notes = views.config_from_text(text, source=Path(path).name)
        return [text, *_fill(p.checked(config), notes, f"Imported {Path(path).name}.")]

    c["toml_upload"].upload(_guard(p, import_file, len(fill_out) + 1), inputs=[c["toml_upload"]],
                            outputs=[c["toml_text"], *fill_out])

    def export(base, folder, *form):
        config = p.checked(views.form_to_config(base, folder, list(form)))
        text = views.toml_text(config)
        out = Path(tempfile.mkdtemp(prefix="lora_trainer_toml_")) / f"{config.save.output_name}.toml"
        out.write_text(text, encoding="utf-8")
        return text, str(out), f"Exported `{out.name}`."

    c["export"].click(_guard(p, export, 3), inputs=[c["base"], c["folder"], *p.form],
                      outputs=[c["toml_text"], c["toml_file"], c["message"]])


def _wire_run(p: TrainPanel) -> None:
    c, manager = p.c, p.manager

    def start(base, folder, *form):
        job = manager.start(p.checked(views.form_to_config(base, folder, list(form))))
        return f"Started **{job.config.save.output_name}**."

    def resume(base, folder, state_dir, *form):
        if not (state_dir or "").strip():
            raise ValueError("resume: no state folder given. Enter a <name>-state folder written with "
                             "\"Save resume state\" on, then press Resume.")
        folder_access.check_path(p.folder_policy, "resume", state_dir)
        config = views.form_to_config(base, folder, list(form))
        from lora_trainer.config import update_config

        job = manager.start(p.checked(update_config(config, {"resume": state_dir.strip(), "save_state": True})))
        return f"Resuming **{job.config.save.output_name}** from `{state_dir.strip()}`."

    def stop(save: bool) -> str:
        if not manager.stop(save=save):
            return "No training is running."
        return "Stopping after this step" + (" and saving." if save else " without saving.")

    form_in = [c["base"], c["folder"], *p.form]
    p.events["start"] = c["start"].click(_guard(p, start, 1), inputs=form_in, outputs=[c["message"]])
    p.events["resume"] = c["resume"].click(_guard(p, resume, 1), inputs=[c["base"], c["folder"], c["resume_dir"], *p.form],
                      outputs=[c["message"]])
    c["stop"].click(lambda: stop(False), outputs=[c["message"]])
    c["stop_save"].click(lambda: stop(True), outputs=[c["message"]])
    wire_pause_buttons(p)


def _render(p: TrainPanel, seen):
    """The status outputs for the manager's job now; the plot and gallery only when they changed."""
    status = p.manager.status()
    key = (id(p.manager.last), status.state.value, status.step, len(status.validation_losses), len(status.samples))
    plot = samples = gr.update()
    if seen is None or seen[:4] != key[:4]:
        import pandas as pd

        plot = pd.DataFrame(views.loss_rows(status))
    if seen is None or seen[0] != key[0] or seen[4] != key[4]:
        samples = views.sample_gallery(status)
    return status, [key, views.status_markdown(status), plot, samples]


def _watch_fn(p: TrainPanel) -> Callable:
    """A generator event: the status once, then once a second while a job is active (ends with the job).

    A finite stream instead of a timer: it works alike on gradio 3 and 4, inside the WebUI's Blocks too, and
    leaves nothing running after the job (so the server shuts down at once on Ctrl-C).
    """
    def watch(seen):
        while True:
            status, outputs = _render(p, seen)
            if outputs[0] == seen:  # nothing new: still yield (gradio 3 ends a stream that is silent for 5 s)
                outputs = [seen, gr.update(), gr.update(), gr.update()]
            seen = outputs[0]
            yield outputs
            if not status.state.active:
                return
            time.sleep(POLL_SECONDS)
    return watch


def on_load(fn: Callable, inputs: list, outputs: list) -> None:
    """Run `fn` when the page loads, on the Blocks being built (the standalone app, or the WebUI's tab).

    Args:
        fn (callable): the handler.
        inputs (list): input components.
        outputs (list): output components.
    """
    from gradio.context import Context

    root = Context.root_block
    if root is None:
        raise RuntimeError("on_load: call it inside a `with gr.Blocks()` block")
    root.load(fn, inputs=inputs, outputs=outputs, show_progress="hidden")


def build_train_panel(host, manager: JobManager | None = None, dataset_dir: str | None = None,
                      folder_policy: folder_access.PolicySource = None) -> TrainPanel:
    """Build the Train panel inside the current `gr.Blocks` (a tab of the WebUI, or the standalone app).

    Args:
        host (Host): where jobs run (`StandaloneHost`, or the WebUI's host).
        manager (JobManager, optional): the job manager to share; defaults to a new one on `host`.
        dataset_dir (str, optional): dataset folder filled in at start.
        folder_policy (PolicySource, optional): the host's folder rule, checked by Start, Resume, TOML import and
            export; defaults to None (every path allowed).

    Returns:
        TrainPanel: the components by name (`c["folder"]`, `c["status"]`, ...) and the manager.
    """
    panel = TrainPanel(manager or JobManager(host), folder_policy=folder_policy)
    with gr.Column(elem_id="lt-train-panel"):
        _layout(panel, dataset_dir, getattr(host, "name", ""), getattr(host, "models_dir", None))
    _wire_config(panel)
    _wire_run(panel)
    c = panel.c
    watch, outputs = _watch_fn(panel), [c["seen"], c["status"], c["loss"], c["samples"]]
    on_load(watch, [c["seen"]], outputs)
    c["refresh"].click(watch, inputs=[c["seen"]], outputs=outputs, show_progress="hidden")  # a job started elsewhere
    for name in ("start", "resume"):
        panel.events[name].then(watch, inputs=[c["seen"]], outputs=outputs, show_progress="hidden")
    return panel


__all__ = ["TrainPanel", "build_train_panel", "elem_id", "on_load"]
