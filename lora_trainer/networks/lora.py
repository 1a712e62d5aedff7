"""LoRA / LoCon (kohya `networks.lora`): Linear, Conv 1x1 and Conv kxk (down conv with the base kernel, up 1x1)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import NetworkModule
from .functional import dropout, lora_diff_weight, rank_dropout


class LoRAModule(NetworkModule):
    """`lora_down`/`lora_up` pair; init as kohya: down kaiming_uniform(a=sqrt(5)), up zeros (starts as a no-op)."""

    name = "lora"
    weight_keys = ("lora_down.weight", "lora_up.weight", "alpha")
    detect_keys = ("lora_down.weight",)

    def __init__(self, lora_name, org_module, dim, alpha=None, **kwargs):
        super().__init__(lora_name, org_module, dim, alpha, **kwargs)
        out_dim, in_dim = self.weight_shape[0], self.weight_shape[1]
        factory = self.param_device_dtype()
        if self.conv is None:
            self.lora_down = nn.Linear(in_dim, self.dim, bias=False, **factory)
            self.lora_up = nn.Linear(self.dim, out_dim, bias=False, **factory)
        else:
            kernel = tuple(self.weight_shape[2:])
            self.lora_down = nn.Conv2d(in_dim, self.dim, kernel, bias=False, **self.conv, **factory)
            self.lora_up = nn.Conv2d(self.dim, out_dim, 1, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> int:
        return int(tensors["lora_down.weight"].shape[0])

    def diff_weight(self) -> torch.Tensor:
        return lora_diff_weight(self.lora_down.weight, self.lora_up.weight, self.weight_shape)

    def add_delta_(self, target: torch.Tensor, multiplier: float) -> None:
        if not target.is_contiguous():  # channels-last kernels: no flat view to accumulate into
            return super().add_delta_(target, multiplier)
        # one GEMM accumulating into the weight: no weight-sized delta (nor its scaled copy) is allocated
        up, down = (w.detach().to(device=target.device, dtype=target.dtype) for w in (self.lora_up.weight,
                                                                                      self.lora_down.weight))
        target.view(target.shape[0], -1).addmm_(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1),
                                                alpha=multiplier * self.scale)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        h = dropout(h, self.dropout, self.training)
        h = rank_dropout(h, self.rank_dropout, self.training, channel_dim=-1 if self.conv is None else 1)
        return self.lora_up(h)
