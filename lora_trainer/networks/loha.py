"""LoHa (LyCORIS `hada_*` keys): delta = (w1a @ w1b) * (w2a @ w2b) * alpha / dim; conv kernels flattened."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import NetworkModule
from .functional import dropout, layer_op, loha_diff_weight, output_channel_dropout


class LoHaModule(NetworkModule):
    """Init as LyCORIS: w1a ~ N(0, 0.1), w1b ~ N(0, 1), w2b ~ N(0, 1), w2a = 0, so the product starts at zero.

    Rank dropout drops output rows of the delta weight (LyCORIS); network dropout acts on the delta output.
    """

    name = "loha"
    weight_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")
    detect_keys = ("hada_w1_a",)

    def __init__(self, lora_name, org_module, dim, alpha=None, **kwargs):
        super().__init__(lora_name, org_module, dim, alpha, **kwargs)
        out_dim = self.weight_shape[0]
        in_dim = math.prod(self.weight_shape[1:])
        factory = self.param_device_dtype()
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, self.dim, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(self.dim, in_dim, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, self.dim, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(self.dim, in_dim, **factory))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> int:
        return int(tensors["hada_w1_b"].shape[0])

    def diff_weight(self) -> torch.Tensor:
        return loha_diff_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.weight_shape)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = output_channel_dropout(self.diff_weight(), self.rank_dropout, self.training)
        y = layer_op(x.to(weight.dtype), weight, self.conv)
        return dropout(y, self.dropout, self.training)
