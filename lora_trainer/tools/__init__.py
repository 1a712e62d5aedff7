"""LoRA tools: block layouts and weights, merges, resize, inspect (files in, new files out; inputs never modified)."""
from .architectures import ArchitectureModules, architecture_modules, detect_lora_architecture
from .blocks import (
    BASE, LAYOUTS, SD_SLOTS, SDXL_SLOTS, UNBLOCKED, BlockWeights, expand_vector, family, fitting_lengths,
    group_by_slot, is_named_unblocked, parse_vector, slot_of, slots,
)
from .block_weights import BlockWeightResult, apply_block_weights, weighted_state_dict
from .inspect_lora import InspectReport, inspect_lora, inspect_lora_file
from .lora_file import Factors, LoraFile, LoraModuleWeights, lora_from_state_dict, read_lora
from .lowrank import EnergyReport, ModuleEnergy, choose_rank, svd_of_matrix, svd_of_product
from .merge import MergeInput, MergeResult, merge_loras, merge_state_dict
from .output import check_output, write_lora
from .presets import BUILTIN_PRESETS, PresetBook, load_presets, resolve_weights, webui_preset_file
from .resize import ResizeResult, parse_dynamic, resize_lora, resize_state_dict

__all__ = [
    "BUILTIN_PRESETS", "BlockWeightResult", "EnergyReport", "InspectReport", "MergeInput", "MergeResult",
    "ModuleEnergy", "PresetBook", "ResizeResult", "apply_block_weights", "check_output", "choose_rank",
    "inspect_lora", "inspect_lora_file", "load_presets", "merge_loras", "merge_state_dict", "parse_dynamic",
    "resize_lora", "resize_state_dict", "resolve_weights", "svd_of_matrix", "svd_of_product", "webui_preset_file",
    "weighted_state_dict", "write_lora",
    "BASE", "LAYOUTS", "SDXL_SLOTS", "SD_SLOTS", "UNBLOCKED", "ArchitectureModules", "BlockWeights", "Factors",
    "LoraFile", "LoraModuleWeights", "architecture_modules", "detect_lora_architecture", "expand_vector", "family",
    "fitting_lengths", "group_by_slot", "is_named_unblocked", "lora_from_state_dict", "parse_vector", "read_lora",
    "slot_of", "slots",
]

# Checkpoint tools: streamed tensor I/O, bake, extract, checkpoint merge, prune.
from .bake import BakeResult, LoraToBake, bake_loras, parse_lora_spec  # noqa: E402
from .ckpt_merge import CheckpointMergeResult, block_alphas, merge_checkpoints, merge_slot, merge_slots  # noqa: E402
from .extract import ExtractResult, NothingToExtract, extract_lora, svd_factors  # noqa: E402
from .prune import PruneResult, prune_checkpoint  # noqa: E402
from .tensor_stream import TensorInfo, TensorReader, write_safetensors  # noqa: E402

__all__ += [
    "BakeResult", "CheckpointMergeResult", "ExtractResult", "LoraToBake", "NothingToExtract", "PruneResult", "TensorInfo",
    "TensorReader", "bake_loras", "block_alphas", "extract_lora", "merge_checkpoints", "merge_slot", "merge_slots",
    "parse_lora_spec", "prune_checkpoint", "svd_factors", "write_safetensors",
]
