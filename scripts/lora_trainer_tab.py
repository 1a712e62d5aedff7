"""WebUI entry point: the LoRA Trainer tab, its settings and its API routes (logic lives in lora_trainer.host)."""
import sys
from pathlib import Path

_root = str(Path(__file__).resolve().parents[1])
if _root not in sys.path:
    sys.path.insert(0, _root)

from modules import script_callbacks

from lora_trainer.host.a1111_tab import WebUIExtension

extension = WebUIExtension()
script_callbacks.on_ui_settings(extension.ui_settings)
script_callbacks.on_ui_tabs(extension.ui_tabs)
script_callbacks.on_app_started(extension.app_started)
