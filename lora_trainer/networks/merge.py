"""Merging a network into its targets' weights, for rendering many images at one strength (grids).

Bypass injection (`NetworkModule.apply`) adds the LoRA's matmuls to every forward of every sampling step; a grid
renders several images at each strength, so it is cheaper to put `W + multiplier * delta` in place of each target
weight once per strength, as the WebUI's Lora extension does. The original weight Parameters are kept aside and put
back as they were (the same tensor objects, no subtraction), so `restore()` gives the model back bit for bit.

Memory: one merged copy of every touched weight, in the model's dtype, from the first merge until `release()` (the
originals stay alive). A LoRA's delta is accumulated into it by one GEMM (`NetworkModule.add_delta_`), so no
weight-sized delta is made: at SD1.5 size on one CPU thread a merge takes 0.26 s (1.0-1.5 s when each merge
allocated its weights and built each delta, 0.18 s with every delta kept for 1.3 GiB more).
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
    The merged weights are written into buffers kept from one merge to the next, so a grid allocates (and the OS
    maps) them once, not at every strength.

    Args:
        network (LoRANetwork): the network, bound to the model's modules, in eval mode.
        buffers (dict, optional): the buffers to write merged weights into, keyed by weight; pass one dict to
            the mergers of several networks on the same model so they share them, defaults to the merger's own.
    """

    def __init__(self, network, buffers: dict | None = None):
        self.network = network
        self._slots = _slots(network)
        self._buffers = {} if buffers is None else buffers
        self._originals: list[tuple[_Slot, nn.Parameter]] = []

    @property
    def merged(self) -> bool:
        """True while merged weights are in the model."""
        return bool(self._originals)

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
        merged = self._buffer(slot, original)
        work = merged.copy_(original) if merged.dtype == torch.float32 else original.float()
        for module, rows in active:
            module.add_delta_(work if rows is None else work[rows], module.multiplier)
        if work is not merged:
            merged.copy_(work)
        self._originals.append((slot, original))
        slot.owner._parameters[slot.attribute] = merged

    def _buffer(self, slot: _Slot, original: torch.Tensor) -> nn.Parameter:
        key = (id(slot.owner), slot.attribute)
        buffer = self._buffers.get(key)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (original.shape, original.dtype,
                                                                             original.device):
            buffer = self._buffers[key] = nn.Parameter(torch.empty_like(original), requires_grad=False)
        return buffer

    def restore(self) -> None:
        """Put the original weight Parameters back (the same objects: bit for bit). Idempotent."""
        for slot, original in reversed(self._originals):
            slot.owner._parameters[slot.attribute] = original
        self._originals = []

    def release(self) -> None:
        """Restore and drop the buffers."""
        self.restore()
        self._buffers.clear()


__all__ = ["MergedWeights"]
