"""Merging a network into its targets' weights, for rendering many images at one strength (grids).

Bypass injection (`NetworkModule.apply`) adds the LoRA's matmuls to every forward of every sampling step; a grid
renders several images at each strength, so it is cheaper to put `W + multiplier * delta` in place of each target
weight once per strength, as the WebUI's Lora extension does. The original weight Parameters are kept aside and put
back as they were (the same tensor objects, no subtraction), so `restore()` gives the model back bit for bit.

Memory while merged: one merged copy of every touched weight, in the model's dtype (the originals stay alive). With
`cache_deltas` the float32 delta of every module is kept as well between merges (for the merger's lifetime).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NetworkError
from .base import NetworkModule

logger = logging.getLogger(__name__)

_QKV = ("q_proj", "k_proj", "v_proj")


@dataclass
class _Slot:
    """One weight Parameter of the model and the modules whose deltas add to it (`rows`: their rows of it)."""

    owner: nn.Module
    attribute: str
    parts: list[tuple[NetworkModule, slice | None]]


def _slots(network) -> list[_Slot]:
    fused_parts = {id(m) for f in network.fused for m in f.parts.values()}
    slots = [_Slot(module.org_module, "weight", [(module, None)])
             for module in network.loras.values() if id(module) not in fused_parts]
    for fused in network.fused:  # nn.MultiheadAttention: q/k/v rows of in_proj_weight, and out_proj.weight
        embed = fused.mha.embed_dim
        qkv = [(fused.parts[part], slice(i * embed, (i + 1) * embed)) for i, part in enumerate(_QKV)
               if part in fused.parts]
        if qkv:
            slots.append(_Slot(fused.mha, "in_proj_weight", qkv))
        if "out_proj" in fused.parts:
            slots.append(_Slot(fused.mha.out_proj, "weight", [(fused.parts["out_proj"], None)]))
    return slots


class MergedWeights:
    """Merges a `LoRANetwork` into the model's weights at each module's current multiplier; restores exactly.

    Each merged weight is computed in float32 (`W.float() + multiplier * delta`) and cast to the layer's dtype, as
    the WebUI's Lora extension merges a file loaded by name. The network must not be injected (bypass) meanwhile.

    Args:
        network (LoRANetwork): the network, bound to the model's modules, in eval mode.
        cache_deltas (bool, optional): keep each module's float32 delta between merges (one weight-sized float32
            tensor per module) instead of recomputing it at every merge, defaults to False.
    """

    def __init__(self, network, cache_deltas: bool = False):
        self.network = network
        self.cache_deltas = cache_deltas
        self._slots = _slots(network)
        self._deltas: dict[int, torch.Tensor] = {}
        self._originals: list[tuple[_Slot, nn.Parameter]] = []

    @property
    def merged(self) -> bool:
        """True while merged weights are in the model."""
        return bool(self._originals)

    def _delta(self, module: NetworkModule, like: torch.Tensor) -> torch.Tensor:
        delta = self._deltas.get(id(module))
        if delta is None:
            delta = module.delta_weight().detach().to(device=like.device, dtype=torch.float32)
            if self.cache_deltas:
                self._deltas[id(module)] = delta
        return delta

    def merge(self) -> None:
        """Put `W + multiplier * delta` in place of every touched weight (each module's own multiplier; a weight
        whose modules are all at 0 keeps its original). Merged already: restored first, then merged anew.

        Raises:
            NetworkError: the network is injected (bypass forwards would add the delta twice).
        """
        if self.network.applied:
            raise NetworkError("network: injected (bypass) while merging would apply it twice. Remove it first.")
        self.restore()
        try:
            with torch.no_grad():
                for slot in self._slots:
                    self._merge_slot(slot)
        except BaseException:
            self.restore()
            raise

    def _merge_slot(self, slot: _Slot) -> None:
        active = [(module, rows) for module, rows in slot.parts if module.multiplier != 0]
        if not active:
            return
        original = slot.owner._parameters[slot.attribute]
        base = original.detach().to(torch.float32)  # no copy when it is float32 already
        merged = None
        for module, rows in active:
            delta = self._delta(module, base)
            if merged is None and rows is None:  # one pass and one new tensor for the usual single module
                merged = torch.add(base, delta.reshape(base.shape), alpha=module.multiplier)
                continue
            if merged is None:
                merged = base.clone()
            target = merged if rows is None else merged[rows]
            target.add_(delta.reshape(target.shape), alpha=module.multiplier)
        self._originals.append((slot, original))
        slot.owner._parameters[slot.attribute] = nn.Parameter(merged.to(original.dtype), requires_grad=False)

    def restore(self) -> None:
        """Put the original weight Parameters back (the same objects: bit for bit). Idempotent."""
        for slot, original in reversed(self._originals):
            slot.owner._parameters[slot.attribute] = original
        self._originals = []

    def release(self) -> None:
        """Restore and drop the cached deltas."""
        self.restore()
        self._deltas = {}


__all__ = ["MergedWeights"]
