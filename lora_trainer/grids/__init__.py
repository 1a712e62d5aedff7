"""Strength x snapshot x seed grids on a loaded model: axes, plan with a measured time estimate, the labelled grid
image with its PNG text, and the runner. Rendering goes through a host-supplied `render(prompt, negative, seed,
settings) -> PIL.Image`; nothing here knows a WebUI class."""
from lora_trainer.grids.axes import (
    AXIS_KINDS, DEFAULT_STRENGTHS, Axis, format_strength, parse_numbers, seed_axis, snapshot_axis, strength_axis,
)
from lora_trainer.grids.best_snapshot import (
    SnapshotValidation, best_snapshot, lora_file_step, rank_snapshots, read_validation_csv,
)
from lora_trainer.grids.image import (
    PNG_GRID_KEY, PNG_PARAMETERS_KEY, annotate, draw_labelled_grid, grid_path_beside, infotext, save_grid_png,
)
from lora_trainer.grids.plan import (
    DEFAULT_CELL_LIMIT, CellLimitExceeded, GridCell, GridEstimate, GridPlan, GridSettings, Render, RenderSettings,
    RenderSpeed, check_cell_limit, estimate_grid, measure_speed, plan_grid, prompt_from_metadata,
)
from lora_trainer.grids.runner import CellResult, GridResult, run_grid
from lora_trainer.grids.snapshots import (
    EMA_LABEL, FileSnapshot, LiveSnapshot, run_snapshot_files, snapshot_label, with_ema_files,
)
from lora_trainer.grids.standalone import adapter_renderer
from lora_trainer.grids.weights import UNET_ONLY, WHOLE, ModuleWeights, parse_weights, weigh_network, weights_axis

__all__ = [
    "AXIS_KINDS", "DEFAULT_CELL_LIMIT", "DEFAULT_STRENGTHS", "EMA_LABEL", "PNG_GRID_KEY", "PNG_PARAMETERS_KEY", "Axis",
    "CellLimitExceeded", "CellResult", "FileSnapshot", "GridCell", "GridEstimate", "GridPlan", "GridResult",
    "GridSettings", "LiveSnapshot", "Render", "RenderSettings", "RenderSpeed", "adapter_renderer", "annotate",
    "ModuleWeights", "SnapshotValidation", "UNET_ONLY", "WHOLE", "best_snapshot", "lora_file_step", "parse_weights",
    "rank_snapshots", "read_validation_csv", "weigh_network", "weights_axis",
    "check_cell_limit", "draw_labelled_grid", "estimate_grid", "format_strength", "grid_path_beside", "infotext",
    "measure_speed", "parse_numbers", "plan_grid", "prompt_from_metadata", "run_grid", "run_snapshot_files",
    "save_grid_png", "seed_axis", "snapshot_axis", "snapshot_label", "strength_axis", "with_ema_files",
]
