"""The extension's glue for the WebUI's callbacks: the tab, its settings section and the API routes.

`scripts/lora_trainer_tab.py` registers the three methods of one `WebUIExtension`; the WebUI objects come through
`a1111.py` (the only module importing `modules`).
"""
from __future__ import annotations

import logging
import os

from lora_trainer.host.a1111 import A1111Host, WebUIJobManager, webui_shared
from lora_trainer.host.a1111_api import TrainApi

logger = logging.getLogger(__name__)

SECTION = ("lora_trainer", "LoRA Trainer")


class WebUIExtension:
    """One host, one job manager, shared by the tab and the API routes."""

    def __init__(self):
        self.host = A1111Host()
        self.manager = WebUIJobManager(self.host)
        self.api = TrainApi(self.manager, check_file=self.host.check_file)

    def tagger_dir(self) -> str:
        shared = webui_shared()
        default = os.path.join(shared.models_path, "tagger")
        return shared.opts.data.get("lora_trainer_tagger_dir") or default

    def ui_settings(self) -> None:
        """Settings > LoRA Trainer: output folder, tagger models folder, idle offload, sample interval."""
        shared = webui_shared()
        lora_dir = getattr(shared.cmd_opts, "lora_dir", "") or os.path.join(shared.models_path, "Lora")
        options = {
            "lora_trainer_output_dir": shared.OptionInfo(
                "", "Folder for trained LoRAs (empty: the WebUI's Lora folder)").info(f"default: {lora_dir}"),
            "lora_trainer_tagger_dir": shared.OptionInfo(
                "", "Folder of tagger models (empty: models/tagger)").info(
                f"default: {os.path.join(shared.models_path, 'tagger')}"),
            "lora_trainer_keep_on_cpu": shared.OptionInfo(
                True, "Keep the trained LoRA's weights on the CPU while it is not applied"),
            "lora_trainer_sample_every_n_steps": shared.OptionInfo(
                0, "Sample images every N steps when the config sets no interval (0: off)"),
        }
        for key, info in options.items():
            info.section = SECTION
            shared.opts.add_option(key, info)

    def ui_tabs(self):
        """The tab for `on_ui_tabs`: Dataset and Train panels on the WebUI's loaded model."""
        import gradio as gr

        from lora_trainer.ui.app import build_tab

        with gr.Blocks(analytics_enabled=False) as blocks:
            build_tab(self.host, tagger_dir=self.tagger_dir(), manager=self.manager)
        return [(blocks, "LoRA Trainer", "lora_trainer")]

    def app_started(self, _demo, app) -> None:
        """`on_app_started`: the start/stop/status routes."""
        self.api.register(app)
