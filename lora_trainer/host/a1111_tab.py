"""The extension's glue for the WebUI's callbacks: the tab, its settings section and the API routes.

`scripts/lora_trainer_tab.py` registers the three methods of one `WebUIExtension`; the WebUI objects come through
`a1111.py` (the A1111 parts Forge shares) and the detected host (`detect.py`).
"""
from __future__ import annotations

import logging
import os

from lora_trainer.host.a1111 import WebUIJobManager, webui_shared
from lora_trainer.host.a1111_api import GridApi, TrainApi
from lora_trainer.host.a1111_render import XyzAxes
from lora_trainer.host.api_routes import parse_credentials
from lora_trainer.host.detect import detect_host
from lora_trainer.host.folder_policy import SETTING_KEY, SETTING_LABEL, FolderPolicy, is_exposed, split_folders
from lora_trainer.host.grid_service import GridService

logger = logging.getLogger(__name__)

SECTION = ("lora_trainer", "LoRA Trainer")
FOLDER_SETTINGS = ("lora_trainer_output_dir", SETTING_KEY)


def webui_folder_policy(shared) -> FolderPolicy:
    """The WebUI's rule for exposed servers over its folders (see `folder_policy.py`).

    Args:
        shared: the WebUI's `modules.shared` (cmd_opts, models_path, data_path, opts).

    Returns:
        FolderPolicy: restricted when the WebUI disables extension access; roots: the models, Lora, checkpoint and
        data folders, this extension's output folder and the folders of its setting.
    """
    cmd_opts, settings = shared.cmd_opts, shared.opts.data
    roots = [shared.models_path, getattr(shared, "data_path", None), getattr(cmd_opts, "lora_dir", None),
             getattr(cmd_opts, "ckpt_dir", None), settings.get("lora_trainer_output_dir")]
    roots += split_folders(settings.get(SETTING_KEY, ""))
    return FolderPolicy.build(is_exposed(cmd_opts), roots)


class WebUIExtension:
    """One host, one job manager and one grid service, shared by the tab, the API routes and the X/Y/Z axes.

    The host is the WebUI this process runs in (`detect.detect_host`: AUTOMATIC1111 or Forge), told by its packages.
    """

    def __init__(self):
        self.host = detect_host()
        self.manager = WebUIJobManager(self.host)
        self.grids = GridService(self.manager)
        self.api = TrainApi(self.manager, check_file=self.host.check_file, folder_policy=self.folder_policy)
        self.grid_api = GridApi(self.grids)
        self.xyz = XyzAxes(self.host, self.grids)
        self.tools_api = self._tools_api()

    def _tools_api(self):
        """The LoRA tools' routes, on the same host folders and folder rule as the Tools panel."""
        from lora_trainer.host.tools_api import ToolsApi
        from lora_trainer.ui.tools_ckpt_actions import Tools

        return ToolsApi(Tools(self.host), folder_policy=self.folder_policy)

    def tagger_dir(self) -> str:
        shared = webui_shared()
        default = os.path.join(shared.models_path, "tagger")
        return shared.opts.data.get("lora_trainer_tagger_dir") or default

    def folder_policy(self) -> FolderPolicy:
        """The folders API requests may name, read from the WebUI's command line and settings at each request."""
        return webui_folder_policy(webui_shared())

    def ui_settings(self) -> None:
        """Settings > LoRA Trainer: output folder, tagger models folder, idle offload, sample interval, and the
        extra folders API requests may use on an exposed WebUI."""
        import gradio as gr

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
            SETTING_KEY: shared.OptionInfo("", SETTING_LABEL, gr.Textbox, {"lines": 3}).info(
                "only used when the WebUI listens on the network without --enable-insecure-extension-access; "
                "the models, Lora and data folders are always allowed"),
        }
        for key, info in options.items():
            info.section = SECTION
            if key in FOLDER_SETTINGS:  # /sdapi/v1/options must not widen the folders; --hide-ui-dir-config locks them
                info.restrict_api = True
                if getattr(shared, "restricted_opts", None) is not None:
                    shared.restricted_opts.add(key)
            shared.opts.add_option(key, info)

    def ui_tabs(self):
        """The tab for `on_ui_tabs`: Dataset and Train panels on the WebUI's loaded model; their paths follow the
        same folder rule as the API's."""
        import gradio as gr

        from lora_trainer.ui.app import build_tab

        with gr.Blocks(analytics_enabled=False) as blocks:
            build_tab(self.host, tagger_dir=self.tagger_dir(), manager=self.manager,
                      folder_policy=self.folder_policy, grids=self.grids)
        return [(blocks, "LoRA Trainer", "lora_trainer")]

    def app_started(self, _demo, app) -> None:
        """`on_app_started`: the training, grid and tool routes, behind `--api-auth` when the WebUI has it."""
        credentials = parse_credentials(getattr(webui_shared().cmd_opts, "api_auth", None))
        self.api.register(app, credentials=credentials)
        self.grid_api.register(app, credentials=credentials)
        self.tools_api.register(app, credentials=credentials)

    def before_ui(self) -> None:
        """`on_before_ui`: our strength and snapshot axes in the WebUI's X/Y/Z plot script."""
        self.xyz.register()
