"""`NetworkModule`: one trainable delta on one target layer, injected kohya-style (bypass forward)."""
from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import nn

from ..errors import NetworkError
from .functional import module_dropped

logger = logging.getLogger(__name__)


def is_linear(module: nn.Module) -> bool:
    """True for `nn.Linear` and for layers that act as one without subclassing it (a host's own Linear class, e.g.
    Forge's `ForgeOperations.Linear`, an `nn.Module` with `in_features`, `out_features` and a 2-D `weight`).

    Args:
        module (nn.Module): a layer.

    Returns:
        bool: whether a LoRA can treat it as a Linear.
    """
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Conv2d) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "out_features", None), getattr(module, "in_features", None)))


def describe_layer(lora_name: str, module: nn.Module, shape=None) -> tuple[torch.Size, dict | None]:
    """The weight shape and Conv2d op arguments of a target layer (None for Linear).

    Args:
        lora_name (str): kohya name, for error messages.
        module (nn.Module): a Linear (`is_linear`) or an `nn.Conv2d` (ungrouped, zero padding).
        shape (tuple, optional): force a Linear of this `[out, in]` shape (fused attention parts), defaults to None.

    Returns:
        tuple: (weight shape, conv kwargs or None).
    """
    if shape is not None:
        return torch.Size(shape), None
    if is_linear(module):
        return module.weight.shape, None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise NetworkError(
                f"{lora_name}: grouped or non-zero-padded Conv2d is not supported. Leave this layer out of the targets."
            )
        return module.weight.shape, {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
    raise NetworkError(
        f"{lora_name}: {type(module).__name__} cannot carry a LoRA. Targets must be nn.Linear, nn.Conv2d or "
        "nn.MultiheadAttention; fix the adapter's lora_targets()."
    )


class NetworkModule(nn.Module):
    """Base of LoRA/LoHa modules: owns layer-kind dispatch, injection (`apply`/`restore`) and state-dict I/O.

    The target keeps its weights; its `forward` is replaced by one returning
    `org_forward(x) + delta_forward(x) * multiplier * scale` with `scale = alpha / dim`. Subclasses declare
    `name`, `weight_keys`, `detect_keys` and implement `diff_weight()`, `delta_forward(x)` and `rank_of(tensors)`.
    Dropouts act only while this module is in training mode (`network.train()`).

    Args:
        lora_name (str): kohya module name.
        org_module (nn.Module): the target layer (kept by reference, not registered as a submodule).
        dim (int): rank.
        alpha (float, optional): kohya alpha; None or 0 means alpha = dim (scale 1), defaults to None.
        dropout (float, optional): network_dropout, defaults to None.
        rank_dropout (float, optional): defaults to None.
        module_dropout (float, optional): defaults to None.
        multiplier (float, optional): defaults to 1.0.
        shape (tuple, optional): treat the target as a Linear of this shape (fused attention parts).
    """

    name: ClassVar[str] = ""
    weight_keys: ClassVar[tuple[str, ...]] = ()
    detect_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lora_name, org_module, dim, alpha=None, *, dropout=None, rank_dropout=None,
                 module_dropout=None, multiplier=1.0, shape=None):
        super().__init__()
        if int(dim) <= 0:
            raise NetworkError(f"{lora_name}: rank {dim} is not positive. Use a network_dim/conv_dim of 1 or more.")
        self.lora_name = lora_name
        self._org = [org_module]
        self.weight_shape, self.conv = describe_layer(lora_name, org_module, shape)
        self.dim = int(dim)
        alpha = self.dim if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.dim
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = float(multiplier)
        self._org_forward = None
        self._saved_instance_forward = None

    @property
    def org_module(self) -> nn.Module:
        """The target layer."""
        return self._org[0]

    @property
    def applied(self) -> bool:
        """True while this module's forward is injected."""
        return self._org_forward is not None

    def param_device_dtype(self, dtype=torch.float32) -> dict:
        """Factory kwargs placing new parameters on the target's device (float32 unless told)."""
        weight = getattr(self.org_module, "weight", None)
        if weight is None:
            weight = getattr(self.org_module, "in_proj_weight", None)
        device = weight.device if weight is not None else None
        return {"device": device, "dtype": dtype}

    # -- injection -------------------------------------------------------------------------------------------
    def apply(self) -> None:
        """Replace the target's `forward` by this module's bypass forward (idempotent)."""
        if self.applied:
            return
        org = self.org_module
        self._saved_instance_forward = org.__dict__.get("forward")
        self._org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Put the target's original `forward` back exactly (instance attribute removed if there was none)."""
        if not self.applied:
            return
        org = self.org_module
        if self._saved_instance_forward is None:
            org.__dict__.pop("forward", None)
        else:
            org.forward = self._saved_instance_forward
        self._org_forward = None
        self._saved_instance_forward = None

    def forward(self, x, *args, **kwargs):
        out = self._org_forward(x, *args, **kwargs)
        if self.multiplier == 0 or module_dropped(self.module_dropout, self.training):
            return out
        delta = self.delta_forward(x)
        return out + (delta * (self.multiplier * self.scale)).to(out.dtype)

    # -- formulas (subclasses) -------------------------------------------------------------------------------
    def diff_weight(self) -> torch.Tensor:
        """The unscaled weight delta, shaped like the target weight."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled delta output for input `x` (dropouts applied in training mode)."""
        raise NotImplementedError

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a module from its file tensors (suffix -> tensor)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The scaled weight delta `diff * alpha / dim` (multiplier not applied), shaped like the target weight."""
        return self.diff_weight() * self.scale

    def add_delta_(self, target: torch.Tensor, multiplier: float) -> None:
        """`target += multiplier * delta_weight()` in place (merging into a weight; `target` has its shape).

        Args:
            target (torch.Tensor): a float32 copy of the target weight (or its rows of a fused weight).
            multiplier (float): the strength.
        """
        delta = self.delta_weight().detach().to(device=target.device, dtype=target.dtype)
        target.add_(delta.reshape(target.shape), alpha=multiplier)

    # -- state dict ------------------------------------------------------------------------------------------
    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's tensors keyed by kohya suffix (`lora_down.weight`, ..., `alpha`)."""
        return {key: value.detach() for key, value in self.state_dict().items()}

    def check_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise `NetworkError` unless every suffix is one of this module's and every shape matches.

        Args:
            tensors (dict[str, torch.Tensor]): suffix -> tensor (`alpha` optional: old files omit it).
        """
        own = self.state_dict()
        for suffix, value in tensors.items():
            key = f"{self.lora_name}.{suffix}"
            if suffix not in own:
                raise NetworkError(f"{key}: not a {self.name} weight (expected {sorted(own)}). "
                                   "The file holds another network type; load it with its own algorithm.")
            if suffix != "alpha" and tuple(own[suffix].shape) != tuple(value.shape):
                raise NetworkError(
                    f"{key}: shape {tuple(value.shape)} in the file, {tuple(own[suffix].shape)} in the network. "
                    "This LoRA was made for another architecture/dim; create the network with the file's dims."
                )

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Check, then copy tensors keyed by kohya suffix into this module; `alpha` (dim when absent) sets `scale`.

        Args:
            tensors (dict[str, torch.Tensor]): suffix -> tensor.

        Raises:
            NetworkError: a suffix this module does not have, or a shape that differs.
        """
        self.check_tensors(tensors)
        own = self.state_dict()
        if "alpha" not in tensors:  # old files: no alpha means alpha = dim (scale 1), as kohya and the WebUI read it
            tensors = {**tensors, "alpha": torch.tensor(float(self.dim))}
        with torch.no_grad():
            for suffix, value in tensors.items():
                if suffix == "alpha":
                    alpha = float(value.reshape(()).float())
                    self.alpha.fill_(alpha)
                    self.scale = (alpha if alpha != 0 else self.dim) / self.dim
                else:
                    own[suffix].copy_(value.to(own[suffix].dtype))

    @classmethod
    def from_state_dict(cls, lora_name: str, org_module: nn.Module, tensors: dict[str, torch.Tensor], **kwargs):
        """Build a module whose rank and alpha come from a file's tensors, and load them.

        Args:
            lora_name (str): kohya name.
            org_module (nn.Module): the target layer.
            tensors (dict[str, torch.Tensor]): suffix -> tensor for this module.
            **kwargs: forwarded to the constructor (multiplier, shape, dropouts).

        Returns:
            NetworkModule: the loaded module (not applied).
        """
        alpha = tensors.get("alpha")
        alpha = None if alpha is None else float(alpha.float())
        module = cls(lora_name, org_module, cls.rank_of(tensors), alpha, **kwargs)
        module.load_tensors(tensors)
        return module
