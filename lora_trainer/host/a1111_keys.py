"""The compatibility self-test: does every LoRA module name map onto the loaded model by the WebUI's own rules?

The built-in Lora extension (`extensions-builtin/Lora/networks.py`, `load_network`) looks each key's module name up
in `sd_model.network_layer_mapping` after `convert_diffusers_name_to_compvis`, then tries the `_[qkv]_proj` /
`lora_unet` / `lora_te1_text_model` fallbacks, and drops a key it cannot place with only a DEBUG log line. Here the
same lookups run with the extension's own functions (passed in as `networks`), so a name that would be dropped is
an error before training starts and before a file is saved.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class CompatReport:
    """Result of the self-test.

    Attributes:
        checked (int): module names looked up.
        unmatched (list[str]): names the WebUI would drop.
        misplaced (list[str]): names the WebUI would apply to a different module than the one trained.
    """

    checked: int = 0
    unmatched: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.misplaced


def webui_module(name: str, networks, mapping: dict, is_sd2: bool) -> nn.Module | None:
    """The module the WebUI's Lora extension applies the kohya module `name` to, or None (dropped).

    Args:
        name (str): kohya module name (`lora_unet_...`, `lora_te1_...`).
        networks: the extension's `networks` module (`convert_diffusers_name_to_compvis`, `re_x_proj`).
        mapping (dict): `sd_model.network_layer_mapping`.
        is_sd2 (bool): as the extension computes it (`'model_transformer_resblocks' in mapping`).

    Returns:
        nn.Module | None: the target module.
    """
    key = networks.convert_diffusers_name_to_compvis(name, is_sd2)
    module = mapping.get(key)
    if module is None:
        match = networks.re_x_proj.match(key)
        if match:
            module = mapping.get(match.group(1))
    if module is None and "lora_unet" in name:
        module = mapping.get(name.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in name:
        module = mapping.get(name.replace("lora_te1_text_model", "0_transformer_text_model"))
        if module is None:
            module = mapping.get(name.replace("lora_te1_text_model", "transformer_text_model"))
    return module


def check_names(targets: dict[str, nn.Module], networks, mapping: dict) -> CompatReport:
    """Look every kohya module name of `targets` up the WebUI's way.

    Args:
        targets (dict[str, nn.Module]): {kohya module name: the module we train} (all components merged).
        networks: the extension's `networks` module.
        mapping (dict): `sd_model.network_layer_mapping`.

    Returns:
        CompatReport: unmatched and misplaced names.
    """
    is_sd2 = "model_transformer_resblocks" in mapping
    report = CompatReport()
    for name, target in targets.items():
        report.checked += 1
        found = webui_module(name, networks, mapping, is_sd2)
        if found is None:
            report.unmatched.append(name)
        elif found is not target and not any(found is sub for sub in target.modules()):
            report.misplaced.append(name)
    return report


def file_module_names(keys) -> dict[str, None]:
    """kohya module names of a LoRA file's keys (`name.lora_up.weight` -> `name`), in order."""
    return dict.fromkeys(key.split(".", 1)[0] for key in keys)


def describe(report: CompatReport, where: str) -> str:
    """A message naming the failing keys and the fix."""
    parts = []
    if report.unmatched:
        parts.append(f"{len(report.unmatched)} module names the WebUI's Lora extension cannot place "
                     f"(it would drop them silently), e.g. {report.unmatched[:3]}")
    if report.misplaced:
        parts.append(f"{len(report.misplaced)} names it would apply to a different layer, e.g. {report.misplaced[:3]}")
    return (f"{where}: " + "; ".join(parts) + ". The LoRA would not work as trained in this WebUI; report this "
            "with the model's architecture, or train without the affected modules (e.g. network_train_unet_only).")
