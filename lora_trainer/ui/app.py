"""The whole LoRA trainer tab: the Dataset panel and the Train panel side by side in sub-tabs, sharing the dataset
folder. `build_tab(host)` places it inside a caller's `gr.Blocks` (the WebUI's tab); `create_app` is the standalone
app (`python -m lora_trainer ui`) with a `StandaloneHost`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from lora_trainer.train.job import JobManager
from lora_trainer.ui import compat
from lora_trainer.ui.dataset_panel import STYLE_CSS, DatasetPanel, build_dataset_panel
from lora_trainer.ui.folder_access import PolicySource
from lora_trainer.ui.test_panel import build_test_panel
from lora_trainer.ui.tools_panel import build_tools_panel
from lora_trainer.ui.train_panel import TrainPanel, build_train_panel

logger = logging.getLogger(__name__)


@dataclass
class TrainerTab:
    """The tab's panels (their components by name) and the job manager."""

    dataset: DatasetPanel
    train: TrainPanel

    @property
    def manager(self) -> JobManager:
        return self.train.manager


def _share_folder(dataset: DatasetPanel, train: TrainPanel) -> None:
    """One dataset folder for both panels: a change in the Dataset panel fills the Train panel's field, typing in
    the Train panel fills the Dataset panel's (`input` fires only for typing, so the two never loop)."""
    ds_folder, tr_folder = dataset.c["folder"], train.c["folder"]
    ds_folder.change(lambda value: value, inputs=[ds_folder], outputs=[tr_folder], show_progress="hidden")
    tr_folder.input(lambda value: value, inputs=[tr_folder], outputs=[ds_folder], show_progress="hidden")


def build_tab(host, dataset_dir: str | None = None, tagger_dir: str | None = None,
              manager: JobManager | None = None, folder_policy: PolicySource = None, grids=None) -> TrainerTab:
    """Build the tab (Dataset and Train sub-tabs) inside the current `gr.Blocks`; the queue must be on.

    Args:
        host (Host): where training runs (the WebUI's host, or `StandaloneHost`).
        dataset_dir (str, optional): dataset folder filled in at start.
        tagger_dir (str, optional): folder of WD14 tagger model folders.
        manager (JobManager, optional): a job manager to share (e.g. with API routes); defaults to a new one.
        folder_policy (PolicySource, optional): the host's folder rule (a `FolderPolicy` or a function returning
            it), checked by every panel action that takes a path; defaults to None (standalone: all allowed).
        grids (GridService, optional): the Test panel's grid service to share (API, X/Y/Z axes); defaults to a new
            one on the manager.

    Returns:
        TrainerTab: both panels and the manager.
    """
    with gr.Tabs(elem_id="lt-tabs"):
        with gr.Tab("Dataset", elem_id="lt-tab-dataset"):
            dataset = build_dataset_panel(dataset_dir, tagger_dir, folder_policy)
        with gr.Tab("Train", elem_id="lt-tab-train"):
            train = build_train_panel(host, manager, dataset_dir, folder_policy)
        with gr.Tab("Test", elem_id="lt-tab-test"):
            build_test_panel(host, train.manager, grids)
        with gr.Tab("Tools", elem_id="lt-tab-tools"):
            build_tools_panel(host, folder_policy)
    _share_folder(dataset, train)
    return TrainerTab(dataset, train)


def create_app(host=None, dataset_dir: str | None = None, tagger_dir: str | None = None,
               lora_dir: str | Path | None = None, concurrency: int = 4) -> gr.Blocks:
    """The standalone app: the whole tab with the queue on.

    Args:
        host (Host, optional): defaults to `StandaloneHost(lora_dir)`.
        dataset_dir (str, optional): dataset folder filled in at start.
        tagger_dir (str, optional): folder of tagger model folders.
        lora_dir (str | Path, optional): where LoRAs go by default, defaults to `./output`.
        concurrency (int, optional): events run at once (Stop must run beside the status poll). Defaults to 4.

    Returns:
        gr.Blocks: call `.launch(server_name="127.0.0.1", ...)` on it.
    """
    if host is None:
        from lora_trainer.host import StandaloneHost

        host = StandaloneHost(Path(lora_dir) if lora_dir else Path.cwd() / "output")
    css = STYLE_CSS.read_text(encoding="utf-8") if STYLE_CSS.is_file() else None
    with gr.Blocks(title="LoRA trainer", theme=compat.local_theme(), css=css, analytics_enabled=False) as app:
        build_tab(host, dataset_dir, tagger_dir)
    return compat.enable_queue(app, concurrency)


__all__ = ["TrainerTab", "build_tab", "create_app"]
