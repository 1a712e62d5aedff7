"""The Train panel's Pause and Continue buttons: pause the run after its current step (the host's model is free
for txt2img and the Test panel meanwhile) and go on with the same optimizer, schedule, RNG and data order.

"Continue" goes on with a paused run; the panel's "Resume" button starts a new run from a saved state folder.
"""
from __future__ import annotations

import gradio as gr


def add_pause_buttons(p) -> None:
    """Add the buttons to the current layout, as `p.c["pause"]` and `p.c["continue"]`.

    Args:
        p (TrainPanel): the panel being built.
    """
    with gr.Row(equal_height=True):
        p.c["pause"] = gr.Button("Pause", elem_id="lt-tr-pause")
        p.c["continue"] = gr.Button("Continue", elem_id="lt-tr-continue")


def wire_pause_buttons(p) -> None:
    """Connect the buttons to the panel's job manager; their answer goes to the panel's message.

    Args:
        p (TrainPanel): the built panel.
    """
    manager = p.manager

    def pause() -> str:
        if not manager.pause():
            return "No training is running."
        return "Pausing after this step: then txt2img and the Test panel can use the model; press Continue to go on."

    def resume() -> str:
        return "Continuing." if manager.resume() else "No training is paused."

    p.c["pause"].click(pause, outputs=[p.c["message"]])
    p.c["continue"].click(resume, outputs=[p.c["message"]])


__all__ = ["add_pause_buttons", "wire_pause_buttons"]
