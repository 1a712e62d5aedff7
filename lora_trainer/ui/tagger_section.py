"""The tagger part of the Dataset panel: model choice, thresholds / MCut, trigger words, options, Run and Cancel."""
from __future__ import annotations

import gradio as gr

from lora_trainer.ui import tagger_actions


def build_tagger_section(p, tagger_dir: str | None) -> None:
    """Add the tagger widgets to panel `p` (a DatasetPanel) inside the current Blocks."""
    c = p.c
    choices, note = tagger_actions.model_choices(tagger_dir)
    with gr.Accordion("Tagger (WD14 ONNX)", open=True, elem_id="lt-ds-tagger"):
        with gr.Row(equal_height=True):
            c["tagger_dir"] = gr.Textbox(value=tagger_dir or "", label="Tagger models folder", scale=4,
                                         elem_id="lt-tg-dir")
            c["model"] = gr.Dropdown(choices, value=choices[0] if choices else None, label="Model", scale=3,
                                     elem_id="lt-tg-model")
            c["refresh"] = gr.Button("Refresh", size="sm", scale=1, min_width=80, elem_id="lt-tg-refresh")
            c["device"] = gr.Dropdown(tagger_actions.DEVICES, value="auto", label="Device", scale=1, min_width=90,
                                      elem_id="lt-tg-device")
        c["models_note"] = gr.Markdown(note, elem_id="lt-tg-note")
        with gr.Row():
            c["general"] = gr.Slider(0, 1, value=0.35, step=0.01, label="General threshold", elem_id="lt-tg-general")
            c["general_mcut"] = gr.Checkbox(value=False, label="MCut (general)", elem_id="lt-tg-general-mcut")
            c["character"] = gr.Slider(0, 1, value=0.85, step=0.01, label="Character threshold",
                                       elem_id="lt-tg-character")
            c["character_mcut"] = gr.Checkbox(value=False, label="MCut (character)", elem_id="lt-tg-character-mcut")
        with gr.Row():
            c["triggers"] = gr.Textbox(label="Trigger words (put first)", placeholder="mychar",
                                       elem_id="lt-tg-triggers")
            c["exclude_tags"] = gr.Textbox(label="Never write these tags", elem_id="lt-tg-exclude")
            c["existing"] = gr.Radio(tagger_actions.EXISTING, value="skip", label="Existing captions",
                                     elem_id="lt-tg-existing")
        c["flags"] = gr.CheckboxGroup(tagger_actions.TAG_FLAGS, value=tagger_actions.DEFAULT_FLAGS, label="Options",
                                      elem_id="lt-tg-flags")
        with gr.Row():
            c["run"] = gr.Button("Tag images", variant="primary", elem_id="lt-tg-run")
            c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="lt-tg-cancel")
        c["tag_status"] = gr.Markdown("", elem_id="lt-tg-status")


def wire_tagger_section(p, tagger_dir: str | None, editor_outputs: list[str]) -> None:
    """Connect Run (a generator streaming progress), Cancel (outside the queue) and Refresh."""
    c = p.c
    names = ["state", "folder", "tagger_dir", "model", "device", "general", "character", "general_mcut",
             "character_mcut", "triggers", "existing", "exclude_tags", "flags", "ext"]

    def run_clicked(session, folder, tdir, model, device, general, character, gmcut, cmcut, triggers, existing,
                    exclude, flags, ext):
        p.check_folder("dataset folder", folder)
        p.check_folder("tagger models folder", tdir)
        options = tagger_actions.build_options(general, character, gmcut, cmcut, triggers, existing, exclude, flags,
                                               ext)
        yield from tagger_actions.run(session, folder, tdir, model, device, options, p.cache)

    c["run"].click(p.wrap_gen(run_clicked), inputs=p.outputs(names),
                   outputs=p.outputs(editor_outputs + ["tag_status"]))
    # Outside the queue, so it is answered while the run holds a worker.
    c["cancel"].click(tagger_actions.cancel, inputs=[c["state"]], outputs=[c["tag_status"]], queue=False)

    def refresh(tdir):
        try:
            p.check_folder("tagger models folder", tdir)
        except ValueError as exc:  # the folder rule's refusal: shown instead of the folder's contents
            return gr.update(choices=[], value=None), f"**Error:** {exc}"
        choices, note = tagger_actions.model_choices(tdir)
        return gr.update(choices=choices, value=choices[0] if choices else None), note

    c["refresh"].click(refresh, inputs=[c["tagger_dir"]], outputs=[c["model"], c["models_note"]])
