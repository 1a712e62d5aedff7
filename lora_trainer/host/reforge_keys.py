"""The compatibility self-test on reForge and Forge: does every LoRA module name land on the module we train, by the
host's own key map?

reForge's Lora extension does not use A1111's `network_layer_mapping`: `load_lora_for_models` builds a key map with
`ldm_patched.modules.lora.model_lora_keys_unet(unet.model)` and `model_lora_keys_clip(clip.cond_stage_model)`
({kohya module name: weight key}, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in` ->
`diffusion_model.input_blocks.1.1.proj_in.weight`) and logs "lora key not loaded" for a name it lacks. Here the
same map (built by `reforge.py` with reForge's functions) is looked up for every target name. Forge's LoRA loader
builds the same kind of map with its own functions of those names (`forge.py`).
"""
from __future__ import annotations

from torch import nn

from lora_trainer.host.a1111_keys import CompatReport


def module_index(*roots: nn.Module) -> dict[str, nn.Module]:
    """{dotted module path: module} of the key map's roots (UNet `BaseModel`, CLIP `cond_stage_model`).

    Args:
        *roots (nn.Module): the modules the key map's weight keys are relative to.

    Returns:
        dict[str, nn.Module]: every named module (later roots do not override earlier ones).
    """
    index: dict[str, nn.Module] = {}
    for root in roots:
        for path, module in root.named_modules():
            index.setdefault(path, module)
    return index


def mapped_module(name: str, key_map: dict[str, str], index: dict[str, nn.Module]) -> nn.Module | None:
    """The module reForge patches for kohya module `name`, or None (reForge would not load it).

    Args:
        name (str): kohya module name.
        key_map (dict): the host's key map ({kohya name: weight key}; Forge: also (weight key, slice)).
        index (dict[str, nn.Module]): `module_index` of the key map's roots.

    Returns:
        nn.Module | None: the patched module.
    """
    key = key_map.get(name)
    if isinstance(key, tuple):  # Forge: (weight key, slice of a fused weight)
        key = key[0]
    if key is None:
        return None
    path = key[: -len(".weight")] if key.endswith(".weight") else key.rsplit(".", 1)[0]
    return index.get(path)


def check_names(targets: dict[str, nn.Module], key_map: dict[str, str], index: dict[str, nn.Module]) -> CompatReport:
    """Look every target name up reForge's way.

    Args:
        targets (dict[str, nn.Module]): {kohya module name: the module we train}.
        key_map (dict): the host's key map ({kohya name: weight key}; Forge: also (weight key, slice)).
        index (dict[str, nn.Module]): `module_index` of the key map's roots.

    Returns:
        CompatReport: names reForge would not load (unmatched) or would patch elsewhere (misplaced).
    """
    report = CompatReport()
    for name, target in targets.items():
        report.checked += 1
        found = mapped_module(name, key_map, index)
        if found is None:
            report.unmatched.append(name)
        elif found is not target and not any(found is sub for sub in target.modules()):
            report.misplaced.append(name)
    return report


__all__ = ["check_names", "mapped_module", "module_index"]
