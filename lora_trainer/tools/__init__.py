"""LoRA tools: block layouts and weights, merges, resize, inspect (files in, new files out; inputs never modified)."""
from .architectures import ArchitectureModules, architecture_modules, detect_lora_architecture
from .blocks import (
    BASE, LAYOUTS, SD_SLOTS, SDXL_SLOTS, UNBLOCKED, BlockWeights, expand_vector, family, fitting_lengths,
    group_by_slot, is_named_unblocked, parse_vector, slot_of, slots,
)
from .lora_file import Factors, LoraFile, LoraModuleWeights, lora_from_state_dict, read_lora

__all__ = [
    "BASE", "LAYOUTS", "SDXL_SLOTS", "SD_SLOTS", "UNBLOCKED", "ArchitectureModules", "BlockWeights", "Factors",
    "LoraFile", "LoraModuleWeights", "architecture_modules", "detect_lora_architecture", "expand_vector", "family",
    "fitting_lengths", "group_by_slot", "is_named_unblocked", "lora_from_state_dict", "parse_vector", "read_lora",
    "slot_of", "slots",
]

# Checkpoint tools: streamed tensor I/O, bake, extract, checkpoint merge, prune.
from .bake import BakeResult, LoraToBake, bake_loras, parse_lora_spec  # noqa: E402
from .ckpt_merge import MergeResult, block_alphas, merge_checkpoints, merge_slot, merge_slots  # noqa: E402
from .extract import ExtractResult, NothingToExtract, extract_lora, svd_factors  # noqa: E402
from .prune import PruneResult, prune_checkpoint  # noqa: E402
from .tensor_stream import TensorInfo, TensorReader, write_safetensors  # noqa: E402

__all__ += [
    "BakeResult", "ExtractResult", "LoraToBake", "MergeResult", "NothingToExtract", "PruneResult", "TensorInfo",
    "TensorReader", "bake_loras", "block_alphas", "extract_lora", "merge_checkpoints", "merge_slot", "merge_slots",
    "parse_lora_spec", "prune_checkpoint", "svd_factors", "write_safetensors",
]
