"""The Test panel: a strength x snapshot x seed grid of the last run's LoRA, rendered by the host the run trained on
(the WebUI's own txt2img inside the WebUI, the standalone sampler in `python -m lora_trainer ui`).

"Load last run" fills the prompt (trigger word, then the dataset's most frequent tags) and the snapshots (every file
the run saved, and the LoRA in memory); Estimate measures the speed and says how long the grid takes; Render shows
the cells as they come, then the labelled grid, saved beside the LoRA; Cancel stops after the current cell. Over the
cell limit the grid needs "Render above the cell limit". `<lora:NAME:S>` with a picked strength goes to txt2img.
Layout and wiring only: the work is `host.grid_service`, the form parsing `test_actions`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import gradio as gr

from lora_trainer.grids import format_strength
from lora_trainer.host.grid_service import GridService
from lora_trainer.ui import compat
from lora_trainer.ui import test_actions as actions
from lora_trainer.ui.panel_errors import error_text

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# WebUI page globals: append the tag to txt2img's prompt and switch to the txt2img tab
SEND_JS = """(tag) => {
  const box = gradioApp().querySelector('#txt2img_prompt textarea');
  if (box && tag) { box.value = (box.value.trim() ? box.value.trim() + ' ' : '') + tag; updateInput(box);
                    switch_to_txt2img(); }
  return [];
}"""


@dataclass
class TestPanel:
    """The panel's components by name (`c["prompt"]`, `c["grid"]`...), its grid service and the running grid."""

    service: GridService
    c: dict = field(default_factory=dict)
    run: actions.GridRun | None = None


def _error_text(exc: BaseException) -> str:
    return f"**Error:** {error_text(exc, 'test panel')}"


def _form(p: TestPanel, samplers: list[str]) -> None:
    c = p.c
    with gr.Row(equal_height=True):
        c["load"] = gr.Button("Load last run", elem_id="lt-te-load", scale=1)
        c["lora"] = gr.Textbox(label="LoRA", interactive=False, elem_id="lt-te-lora", scale=3)
    c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="lt-te-prompt")
    c["negative"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="lt-te-negative")
    with gr.Row():
        default = "Euler a" if "Euler a" in samplers else (samplers[0] if samplers else "")
        c["sampler"] = gr.Dropdown(samplers, value=default, label="Sampler", elem_id="lt-te-sampler")
        c["steps"] = gr.Number(value=20, label="Steps", precision=0, elem_id="lt-te-steps")
        c["cfg"] = gr.Number(value=7, label="CFG scale", elem_id="lt-te-cfg")
        c["width"] = gr.Number(value=512, label="Width", precision=0, elem_id="lt-te-width")
        c["height"] = gr.Number(value=512, label="Height", precision=0, elem_id="lt-te-height")
    with gr.Row():
        c["strengths"] = gr.Textbox(value=actions.DEFAULT_STRENGTHS_TEXT, label="Strengths (0 = the base model)",
                                    elem_id="lt-te-strengths")
        c["seeds"] = gr.Textbox(value="1", label="Seeds", elem_id="lt-te-seeds")
    c["snapshots"] = gr.CheckboxGroup([], label="Snapshots (saved files of the last run, and the LoRA in memory; "
                                      "\"(EMA)\": the run's EMA of the weights)",
                                      elem_id="lt-te-snapshots")
    c["weights"] = gr.Textbox(label="Module weights axis, one a line (UNet + TE, UNet only, a LoRA Block Weight "
                              "preset such as OUTD, or a vector; empty: the whole LoRA)", lines=2,
                              elem_id="lt-te-weights")
    c["confirm"] = gr.Checkbox(False, label="Render above the cell limit", elem_id="lt-te-confirm")
    with gr.Row():
        c["estimate"] = gr.Button("Estimate", elem_id="lt-te-estimate")
        c["render"] = gr.Button("Render grid", variant="primary", elem_id="lt-te-render")
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="lt-te-cancel")


def _results(p: TestPanel, in_webui: bool) -> None:
    c = p.c
    c["message"] = gr.Markdown("", elem_id="lt-te-message")
    c["grid"] = gr.Image(label="Grid", type="pil", interactive=False, elem_id="lt-te-grid")
    c["gallery"] = gr.Gallery(label="Cells", columns=6, height=300, elem_id="lt-te-gallery")
    with gr.Row(equal_height=True):
        c["pick"] = gr.Dropdown([], label="Strength for txt2img", elem_id="lt-te-pick", scale=1)
        c["tag"] = gr.Textbox(label="LoRA tag", elem_id="lt-te-tag", scale=2)
        c["send"] = gr.Button("Send to txt2img prompt", visible=in_webui, elem_id="lt-te-send", scale=1)


def _wire(p: TestPanel) -> None:
    c, service = p.c, p.service
    form = [c[k] for k in ("prompt", "negative", "sampler", "steps", "cfg", "width", "height", "seeds",
                           "strengths", "snapshots", "confirm", "weights")]

    def load():
        labels = service.snapshot_labels()
        if not labels:
            return [gr.update()] * 3 + ["Nothing to test yet: train a LoRA in the Train panel (and let it end)."]
        return [service.lora_name(), service.default_prompt(), gr.update(choices=labels, value=labels),
                f"Last run **{service.lora_name()}**: {len(labels)} snapshots."
                + actions.best_text(service.best_snapshot())]

    def guarded_load():
        try:
            return load()
        except Exception as exc:  # shown in the panel by the package's one rule (errors.describe_error)
            return [gr.update()] * 3 + [_error_text(exc)]

    c["load"].click(guarded_load, outputs=[c["lora"], c["prompt"], c["snapshots"], c["message"]])

    def estimate(*values):
        try:
            request = actions.request_from_form(*values)
            return f"Estimate: {service.estimate(request).describe()}."
        except Exception as exc:  # shown in the panel
            return _error_text(exc)

    c["estimate"].click(estimate, inputs=form, outputs=[c["message"]])
    c["render"].click(_render_fn(p), inputs=form + [c["lora"]],
                      outputs=[c["message"], c["gallery"], c["grid"], c["pick"], c["tag"]])

    def cancel():
        if p.run is None or not p.run.running:
            return "No grid is rendering."
        p.run.cancel.set()
        return "Cancelling after the current cell."

    c["cancel"].click(cancel, outputs=[c["message"]])
    c["pick"].change(lambda name, s: actions.lora_tag(name, s) if s not in (None, "") else "",
                     inputs=[c["lora"], c["pick"]], outputs=[c["tag"]])
    compat.click_js(c["send"], SEND_JS, inputs=[c["tag"]])


def _render_fn(p: TestPanel):
    def render(*values):
        *form, lora = values
        keep = [gr.update()] * 4
        if p.run is not None and p.run.running:
            yield ["A grid is already rendering; wait or cancel it.", *keep]
            return
        try:
            request = actions.request_from_form(*form)
            plan = p.service.plan(request)  # bad input and the cell limit answer before anything renders
        except Exception as exc:  # shown in the panel
            yield [_error_text(exc), *keep]
            return
        p.run = actions.GridRun().start(p.service, request)
        shown = -1
        while p.run.running or shown != len(p.run.cells):
            cells = list(p.run.cells)
            if len(cells) != shown:
                shown = len(cells)
                yield [f"Rendering: {shown}/{len(plan.cells)} cells.",
                       [(r.image, actions.cell_caption(r.cell)) for r in cells], *keep[:3]]
            else:
                yield [gr.update()] * 5  # keep the stream alive (gradio 3 ends a silent one)
            time.sleep(POLL_SECONDS)
        yield _finished(p.run, request, lora)

    return render


def _finished(run: actions.GridRun, request, lora: str) -> list:
    gallery = [(r.image, actions.cell_caption(r.cell)) for r in run.cells]
    if run.error is not None:
        return [_error_text(run.error), gallery, gr.update(), gr.update(), gr.update()]
    outcome = run.outcome
    result = outcome.result
    if result.cancelled:
        return [f"Cancelled after {len(result.cells)} of {len(result.plan.cells)} cells; nothing saved.", gallery,
                gr.update(), gr.update(), gr.update()]
    strengths = [format_strength(s) for s in request.strengths if s != 0]
    pick = strengths[-1] if strengths else None
    name = outcome.lora_name or lora
    message = (f"Done: {len(result.cells)} cells in {result.seconds:.1f} s "
               f"({result.seconds_per_render():.2f} s per image). Saved `{outcome.path}`."
               + actions.best_text(result.plan.best_snapshot))
    return [message, gallery, result.image, gr.update(choices=strengths, value=pick),
            actions.lora_tag(name, pick) if pick else ""]


def build_test_panel(host, manager, grids: GridService | None = None) -> TestPanel:
    """Build the Test panel inside the current `gr.Blocks` (a sub-tab of the trainer's tab).

    Args:
        host (Host): the host (its samplers fill the dropdown; "a1111" shows "Send to txt2img prompt").
        manager (JobManager): the Train panel's job manager (the last run is tested).
        grids (GridService, optional): a service to share (with the API and the X/Y/Z axes), defaults to a new one.

    Returns:
        TestPanel: the components by name and the service.
    """
    panel = TestPanel(grids or GridService(manager))
    samplers = list(host.sampler_names()) if hasattr(host, "sampler_names") else []
    with gr.Column(elem_id="lt-test-panel"):
        _form(panel, samplers)
        _results(panel, getattr(host, "name", "") == "a1111")
    _wire(panel)
    return panel


__all__ = ["TestPanel", "build_test_panel"]
