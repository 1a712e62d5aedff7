"""WebUI entry point: the LoRA Trainer tab, its settings, its API routes, and its X/Y/Z plot axes with the always-on
script that applies them (logic lives in lora_trainer.host)."""
import sys
from pathlib import Path

_root = str(Path(__file__).resolve().parents[1])
if _root not in sys.path:
    sys.path.insert(0, _root)

from modules import script_callbacks, scripts

from lora_trainer.host.a1111_tab import WebUIExtension

extension = WebUIExtension()
script_callbacks.on_ui_settings(extension.ui_settings)
script_callbacks.on_ui_tabs(extension.ui_tabs)
script_callbacks.on_app_started(extension.app_started)
script_callbacks.on_before_ui(extension.before_ui)


class LoraTrainerAxes(scripts.Script):
    """Puts the trained LoRA on the model for X/Y/Z plot cells that use our axes, and takes it off afterwards."""

    def title(self):
        return "LoRA Trainer axes"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        extension.xyz.before(p)

    def postprocess(self, p, processed, *args):
        extension.xyz.after(p)
