"""Gradio panels (gradio 3.41 as in AUTOMATIC1111 1.10, and 4.x as in Forge). Layout and wiring only: the work is
done by `lora_trainer.tagging` and the other packages.

`build_tab(host)` places the whole tab (Dataset, Train and Tools panels) inside a host's `gr.Blocks`;
`build_dataset_panel`, `build_train_panel` and `build_tools_panel` place one panel; `create_app` is the standalone
app (`python -m lora_trainer ui`).
gradio is imported on first use of one of these names, so the actions (`dataset_actions`, `train_views`) import
without it (so do the tools' jobs, `Tools`, which the API routes share).
"""

from lora_trainer.lazy import lazy_names

_LAZY = {
    "DatasetPanel": "lora_trainer.ui.dataset_panel",
    "build_dataset_panel": "lora_trainer.ui.dataset_panel",
    "create_app": "lora_trainer.ui.app",
    "build_tab": "lora_trainer.ui.app",
    "TrainerTab": "lora_trainer.ui.app",
    "TrainPanel": "lora_trainer.ui.train_panel",
    "build_train_panel": "lora_trainer.ui.train_panel",
    "DatasetSession": "lora_trainer.ui.dataset_actions",
    "ToolsPanel": "lora_trainer.ui.tools_panel",
    "build_tools_panel": "lora_trainer.ui.tools_panel",
    "Tools": "lora_trainer.ui.tools_ckpt_actions",
}


__getattr__ = lazy_names(globals(), _LAZY)


__all__ = [
    "DatasetPanel", "DatasetSession", "Tools", "ToolsPanel", "TrainPanel", "TrainerTab", "build_dataset_panel",
    "build_tab", "build_tools_panel", "build_train_panel", "create_app",
]
