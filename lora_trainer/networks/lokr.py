"""LoKr (LyCORIS `lokr_*` keys): delta = kron(w1, w2) * alpha / dim, with w2 low-rank (`lokr_w2_a @ lokr_w2_b`)
when the rank is small against the layer, else full (`lokr_w2`, and then scale 1 as LyCORIS and the WebUI use)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NetworkError
from .base import NetworkModule
from .functional import dropout, factorization, layer_op, lokr_diff_weight, output_channel_dropout


class LoKrModule(NetworkModule):
    """Kronecker-product delta. Init as LyCORIS: w1 and w2_a kaiming-uniform, w2 (or w2_b) zero, so it starts at 0.

    The target's `[out, in]` is split into `(out_l, out_k)` and `(in_m, in_n)` by `factorization(., factor)`;
    w1 is `[out_l, in_m]` and w2 carries the rest, including a conv kernel.

    Args:
        factor (int, optional): LyCORIS `factor` (-1: factors near the square root), defaults to -1.
        w1_shape (tuple, optional): `(out_l, in_m)` read from a file, overriding `factor`.
        full_w2 (bool, optional): a file's w2 is full (`lokr_w2`); None decides by rank, as LyCORIS does.
        Other arguments as `NetworkModule`.
    """

    name = "lokr"
    weight_keys = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha")
    detect_keys = ("lokr_w1", "lokr_w1_a")

    def __init__(self, lora_name, org_module, dim, alpha=None, *, factor=-1, w1_shape=None, full_w2=None,
                 **kwargs):
        super().__init__(lora_name, org_module, dim, alpha, **kwargs)
        out_dim, in_dim = self.weight_shape[0], self.weight_shape[1]
        kernel = tuple(self.weight_shape[2:])
        out_l, in_m = w1_shape if w1_shape is not None else (factorization(out_dim, factor)[0],
                                                             factorization(in_dim, factor)[0])
        if out_dim % out_l or in_dim % in_m:
            raise NetworkError(f"{lora_name}: lokr_w1 shape {(out_l, in_m)} does not divide the layer's "
                               f"{(out_dim, in_dim)}. The file was made for another architecture.")
        out_k, in_n = out_dim // out_l, in_dim // in_m
        self.full_w2 = self.dim >= max(out_k, in_n) / 2 if full_w2 is None else bool(full_w2)
        factory = self.param_device_dtype()
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m, **factory))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *kernel, **factory))
            self.alpha.fill_(self.dim)  # full factors: scale 1, whatever alpha says (LyCORIS, the WebUI)
            self.scale = 1.0
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, self.dim, **factory))
            self.lokr_w2_b = nn.Parameter(torch.zeros(self.dim, in_n * math.prod(kernel), **factory))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> int:
        if "lokr_w2_b" in tensors:
            return int(tensors["lokr_w2_b"].shape[0])
        return max(int(tensors["lokr_w2"].shape[0]), int(tensors["lokr_w2"].shape[1]))

    @classmethod
    def from_state_dict(cls, lora_name, org_module, tensors, **kwargs):
        if "lokr_w1" not in tensors or not ({"lokr_w2"} <= tensors.keys() or
                                            {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys()):
            raise NetworkError(f"{lora_name}: LoKr keys {sorted(tensors)} are not supported (a decomposed w1 or a "
                               "Tucker core). Train or convert it with lokr_w1 and lokr_w2 or lokr_w2_a/_b.")
        kwargs.update(w1_shape=tuple(tensors["lokr_w1"].shape), full_w2="lokr_w2" in tensors)
        return super().from_state_dict(lora_name, org_module, tensors, **kwargs)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        if self.full_w2:
            self.scale = 1.0

    def w2(self) -> torch.Tensor:
        """The second Kronecker factor (rebuilt from its low-rank pair when it has one)."""
        return self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b

    def diff_weight(self) -> torch.Tensor:
        return lokr_diff_weight(self.lokr_w1, self.w2(), self.weight_shape)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = output_channel_dropout(self.diff_weight(), self.rank_dropout, self.training)
        y = layer_op(x.to(weight.dtype), weight, self.conv)
        return dropout(y, self.dropout, self.training)
