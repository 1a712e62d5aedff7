"""The module-weights axis of a grid: the whole LoRA, the UNet part only (text-encoder modules at 0), or LoRA Block
Weight presets and vectors, applied to the LoRA on the model as per-module multipliers (nothing is written).

Block weights use the tools' mapping (`tools.blocks.slot_of`, `tools.presets`), so a cell matches the file
`lbw` bakes with the same preset and what the LoRA Block Weight extension renders at generation time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lora_trainer.errors import ConfigError
from lora_trainer.grids.axes import Axis
from lora_trainer.networks.keys import component_of
from lora_trainer.tools.blocks import LAYOUTS, BlockWeights, expand_vector, parse_vector
from lora_trainer.tools.presets import PresetBook

WHOLE = "UNet + TE"
UNET_ONLY = "UNet only"
_LENGTHS = sorted({n for table in LAYOUTS.values() for n in table})


@dataclass(frozen=True)
class ModuleWeights:
    """One value of the weights axis.

    Attributes:
        label (str): "UNet + TE", "UNet only", a preset name, or a vector as given.
        vector (tuple[float, ...]): block weights (12, 17, 20 or 26 values); empty for the two named choices.
        unet_only (bool): text-encoder modules at 0.
    """

    label: str
    vector: tuple = ()
    unet_only: bool = False
    _expanded: dict = field(default_factory=dict, compare=False, repr=False)

    def _blocks(self, architecture: str) -> BlockWeights:
        if architecture not in self._expanded:
            self._expanded[architecture] = expand_vector(self.vector, architecture, f"weights {self.label}")
        return self._expanded[architecture]

    def factor(self, name: str, architecture: str) -> float:
        """The factor of one module (by kohya name) on top of the cell's strength.

        Raises:
            ValueError: the vector does not fit the architecture (the message names the lengths that do).
        """
        if self.unet_only:
            return 0.0 if component_of(name) != "unet" else 1.0
        return self._blocks(architecture).weight(name) if self.vector else 1.0


def parse_weights(spec: str, book: PresetBook | None = None) -> ModuleWeights:
    """One weights value: "UNet + TE", "UNet only", a preset name (`OUTD`, or one of `book`'s) or a
    vector (`1,0,0,...`).

    Args:
        spec (str): the value.
        book (PresetBook, optional): presets to look names up in, defaults to the built-in ones.

    Returns:
        ModuleWeights: the value.

    Raises:
        ConfigError: an unknown name, a non-number, or a vector of a length no layout has.
    """
    text = spec.strip()
    folded = text.lower().replace(" ", "")
    if folded in ("unet+te", "whole", ""):
        return ModuleWeights(WHOLE)
    if folded in ("unetonly", "unet"):
        return ModuleWeights(UNET_ONLY, unet_only=True)
    try:
        vector = tuple(parse_vector(text, f"weights {text}")) if "," in text else (book or PresetBook()).vector(text)
    except ValueError as error:
        raise ConfigError(f"{error}".rstrip(".") + f". Or use {WHOLE!r} / {UNET_ONLY!r}.") from None
    if len(vector) not in _LENGTHS:
        raise ConfigError(f"weights {text}: {len(vector)} values; block-weight vectors have "
                          f"{', '.join(map(str, _LENGTHS))} values. Give a vector of one of those lengths.")
    return ModuleWeights(text, tuple(float(v) for v in vector))


def weights_axis(specs=(WHOLE,), book: PresetBook | None = None) -> Axis:
    """The module-weights axis.

    Args:
        specs (Sequence[str | ModuleWeights], optional): values (see `parse_weights`), defaults to the whole LoRA.
        book (PresetBook, optional): presets for names.

    Returns:
        Axis: kind "weights", labels "Weights: UNet only".
    """
    values = tuple(s if isinstance(s, ModuleWeights) else parse_weights(s, book) for s in specs)
    if not values:
        raise ConfigError("weights: no value given. Give at least one, e.g. UNet + TE, UNet only.")
    labels = [v.label for v in values]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"weights: {labels} repeats a value. Give each value once.")
    return Axis("weights", values, tuple(f"Weights: {label}" for label in labels))


def weigh_network(network, strength: float, weights: ModuleWeights | None, architecture: str) -> None:
    """Set each module's multiplier to `strength` x its factor (the whole LoRA: `strength` everywhere).

    Args:
        network (LoRANetwork): the LoRA on the model.
        strength (float): the cell's strength.
        weights (ModuleWeights, optional): the cell's weights, None for the whole LoRA.
        architecture (str): the model's architecture (block layouts differ).
    """
    if weights is None or (not weights.vector and not weights.unet_only):
        network.multiplier = strength
        return
    for name, module in network.loras.items():
        module.multiplier = float(strength) * weights.factor(name, architecture)


__all__ = ["UNET_ONLY", "WHOLE", "ModuleWeights", "parse_weights", "weigh_network", "weights_axis"]
