"""LoRA / LoCon / LoHa networks: bypass injection into adapter targets, merging into their weights, kohya state dicts,
files and metadata."""
from .base import NetworkModule
from .files import detect_algorithm, kohya_hashes, load_lora, model_hashes, save_lora
from .fused_qkv import FusedAttention
from .keys import BLOCK_LABELS, NUM_BLOCKS, PREFIXES, component_of, kohya_name, split_key, unet_block_index
from .loha import LoHaModule
from .merge import MergedWeights
from .lora import LoRAModule
from .metadata import TrainingFacts, base_model_version, build_metadata, network_args_metadata
from .network import NETWORKS, LoadReport, LoRANetwork, module_class
from .settings import NetworkSettings, block_lr_weights

__all__ = [
    "BLOCK_LABELS", "NETWORKS", "NUM_BLOCKS", "PREFIXES", "FusedAttention", "LoHaModule", "LoRAModule",
    "LoRANetwork", "LoadReport", "MergedWeights", "NetworkModule", "NetworkSettings", "TrainingFacts",
    "base_model_version", "block_lr_weights", "build_metadata", "component_of", "detect_algorithm", "kohya_hashes", "kohya_name",
    "load_lora", "model_hashes", "module_class", "network_args_metadata", "save_lora", "split_key",
    "unet_block_index",
]
