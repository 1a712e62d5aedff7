"""LoRA files with non-trivial weights on the targets of a tiny real-architecture model (for tool tests)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from lora_trainer.networks import LoRANetwork, save_lora


def tiny_targets(tiny, include_conv: bool = False) -> dict:
    """`adapter.lora_targets(include_conv)` of a tiny model (`TinyModel` from build_tiny_model)."""
    from lora_trainer.models.loading import load_checkpoint_adapter

    adapter = load_checkpoint_adapter(tiny.checkpoint, config_dir=tiny.config_dir)
    return adapter.lora_targets(include_conv)


def random_lora(targets: dict, path: str | Path, *, algo: str = "lora", dim: int = 4, alpha: float = 2.0,
                conv_dim: int | None = None, conv_alpha: float | None = None, seed: int = 0,
                architecture: str = "sd1", metadata: dict | None = None) -> Path:
    """Create a network on `targets`, fill every weight with random values (up sides too), save it.

    Args:
        targets (dict): `adapter.lora_targets(include_conv)`.
        path (str | Path): the `.safetensors` file to write.
        algo (str, optional): "lora" or "loha", defaults to "lora".
        dim, alpha (optional): rank and alpha, defaults to 4 and 2.0.
        conv_dim, conv_alpha (optional): LoCon / LoHa conv rank and alpha, defaults to None (no kxk convs).
        seed (int, optional): random seed, defaults to 0.
        architecture (str, optional): written as `ss_base_model_version` / `ss_v2`, defaults to "sd1".
        metadata (dict, optional): extra metadata.

    Returns:
        Path: the written file (float32 tensors).
    """
    cfg = SimpleNamespace(network_dim=dim, network_alpha=alpha, conv_dim=conv_dim, conv_alpha=conv_alpha, algo=algo)
    network = LoRANetwork.create(targets, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[architecture]
    meta = {"ss_base_model_version": version, "ss_v2": str(architecture == "sd2"), "ss_network_dim": str(dim),
            "ss_network_alpha": str(alpha), **(metadata or {})}
    return save_lora(path, network.state_dict_kohya(torch.float32), meta)


__all__ = ["random_lora", "tiny_targets"]
