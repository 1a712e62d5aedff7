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
