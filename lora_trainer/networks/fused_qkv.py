"""OpenCLIP's fused `nn.MultiheadAttention`: q/k/v/out deltas from four kohya names, added functionally.

The attention forward reads `in_proj_weight` and `out_proj.weight` directly, so the injected forward calls
`F.multi_head_attention_forward` with `in_proj_weight + cat(dq, dk, dv)` and `out_proj.weight + dout`; the stored
weights are never touched. While injected the module always takes this (slow) path; its outputs equal the
module's own slow path bit for bit when the deltas are zero.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetworkError
from .base import NetworkModule
from .functional import module_dropped, output_channel_dropout

logger = logging.getLogger(__name__)

PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def part_shape(name: str, mha: nn.Module) -> tuple[int, int]:
    """`[embed, embed]`, the Linear shape each of q/k/v/out stands for; refuses layouts we cannot fuse."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise NetworkError(f"{name}: fused-attention target is {type(mha).__name__}, not nn.MultiheadAttention. "
                           "Fix the adapter's lora_targets().")
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise NetworkError(f"{name}: only nn.MultiheadAttention with one in_proj_weight, no bias_k/v and no "
                           "zero attention (OpenCLIP's layout) is supported. Leave this layer out of the targets.")
    return (mha.embed_dim, mha.embed_dim)


class FusedAttention:
    """Injects up to four part modules (keyed "q_proj", "k_proj", "v_proj", "out_proj") into one attention.

    The parts are ordinary Linear-shaped `NetworkModule`s owned by the network; each brings its own multiplier
    and module/rank dropout. Network (neuron) dropout does not apply here: the deltas act as weights.
    """

    def __init__(self, base_name: str, mha: nn.MultiheadAttention, parts: dict[str, NetworkModule]):
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise NetworkError(f"{base_name}: unknown fused attention parts {sorted(unknown)}; use {PARTS}.")
        self.base_name = base_name
        self.mha = mha
        self.parts = parts
        self._org_forward = None
        self._saved_instance_forward = None

    def apply(self) -> None:
        """Replace the attention's `forward` by `self.forward` (idempotent)."""
        if self._org_forward is not None:
            return
        self._saved_instance_forward = self.mha.__dict__.get("forward")
        self._org_forward = self.mha.forward
        self.mha.forward = self.forward

    def restore(self) -> None:
        """Put the attention's original `forward` back exactly (idempotent)."""
        if self._org_forward is None:
            return
        if self._saved_instance_forward is None:
            self.mha.__dict__.pop("forward", None)
        else:
            self.mha.forward = self._saved_instance_forward
        self._org_forward = None
        self._saved_instance_forward = None

    def _part_delta(self, part: str, like: torch.Tensor) -> torch.Tensor | None:
        module = self.parts.get(part)
        if module is None or module.multiplier == 0 or module_dropped(module.module_dropout, module.training):
            return None
        delta = output_channel_dropout(module.delta_weight(), module.rank_dropout, module.training)
        return (delta * module.multiplier).to(like.dtype)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(in_proj_weight + cat(dq, dk, dv), out_proj.weight + dout), or None when every delta is off."""
        mha = self.mha
        deltas = {part: self._part_delta(part, mha.in_proj_weight) for part in PARTS}
        if all(d is None for d in deltas.values()):
            return None
        zeros = None
        qkv = []
        for part in PARTS[:3]:
            if deltas[part] is None:
                zeros = zeros if zeros is not None else torch.zeros(
                    mha.embed_dim, mha.embed_dim, device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
                qkv.append(zeros)
            else:
                qkv.append(deltas[part])
        in_w = mha.in_proj_weight + torch.cat(qkv, dim=0)
        out_w = mha.out_proj.weight if deltas["out_proj"] is None else mha.out_proj.weight + deltas["out_proj"]
        return in_w, out_w

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """`nn.MultiheadAttention.forward` with the part deltas added to its weights (same arguments, same result
        layout); the original forward when every delta is off."""
        weights = self.weights()
        if weights is None:
            return self._org_forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                     attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                     is_causal=is_causal)
        in_w, out_w = weights
        mha = self.mha
        batched = query.dim() == 3
        if mha.batch_first and batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, attn = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, in_w, mha.in_proj_bias, mha.bias_k, mha.bias_v,
            mha.add_zero_attn, mha.dropout, out_w, mha.out_proj.bias, training=mha.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if mha.batch_first and batched:
            out = out.transpose(1, 0)
        return out, attn
