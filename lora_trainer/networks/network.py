"""`LoRANetwork`: creates, injects, groups for the optimizer, saves and loads the modules of one LoRA."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NetworkError
from .base import NetworkModule
from .fused_qkv import FusedAttention, part_shape
from .keys import TE_COMPONENTS, component_of, fused_attention_part, split_key, unet_block_index
from .lokr import LoKrModule
from .lora import LoRAModule
from .loha import LoHaModule
from .settings import NetworkSettings

logger = logging.getLogger(__name__)

NETWORKS = [LoRAModule, LoHaModule, LoKrModule]
_ALGO_CLASSES = {"lora": LoRAModule, "locon": LoRAModule, "loha": LoHaModule, "lokr": LoKrModule}


def module_class(algo: str) -> type[NetworkModule]:
    """The module class of an algo name ("lora", "locon", "loha", "lokr")."""
    try:
        return _ALGO_CLASSES[algo]
    except KeyError:
        raise NetworkError(f"algo: {algo!r} is not supported. Use one of {sorted(_ALGO_CLASSES)}.") from None


@dataclass
class LoadReport:
    """What `load_kohya` did: module names loaded, network modules the file lacks, file keys left unused."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def _names_preview(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class LoRANetwork(nn.Module):
    """A set of `NetworkModule`s keyed by kohya name, plus fused-attention injectors.

    Use `create(targets, cfg)` for training or `from_kohya(targets, sd)` to rebuild a saved file. A new network is
    in eval mode (no dropout); call `train()` for training. `multiplier` may be set at any time and acts on the
    next forward.
    """

    def __init__(self, modules: dict[str, NetworkModule], fused: list[FusedAttention], algo: str = "lora",
                 train_unet: bool = True, train_te: bool = True, settings: NetworkSettings | None = None):
        super().__init__()
        self.loras = nn.ModuleDict(modules)
        self.fused = fused
        self._fused_parts = {id(m) for f in fused for m in f.parts.values()}
        self.algo = algo
        self.train_unet = train_unet
        self.train_te = train_te
        self.settings = settings or NetworkSettings(algo=algo)
        self._multiplier = 1.0
        self.applied = False
        self.eval()

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, targets: dict[str, dict[str, nn.Module]], cfg) -> "LoRANetwork":
        """Build fresh (zero-effect) modules for the adapter's targets under kohya settings.

        Args:
            targets (dict): `adapter.lora_targets(include_conv)`: {"unet"|"te"|"te1"|"te2": {kohya_name: module}}.
            cfg: object with kohya keys (network_dim, network_alpha, conv_dim, conv_alpha, algo, dropouts,
                network_train_*_only, block_dims/alphas, conv_block_dims/alphas, down/mid/up_lr_weight), read with
                getattr; `network_args` fills keys left None.

        Returns:
            LoRANetwork: not yet applied.
        """
        settings = NetworkSettings.from_config(cfg)
        module_cls = module_class(settings.algo)
        drops = {"dropout": settings.network_dropout, "rank_dropout": settings.rank_dropout,
                 "module_dropout": settings.module_dropout, **settings.module_kwargs()}
        modules: dict[str, NetworkModule] = {}
        for component, named in targets.items():
            if not (settings.train_unet if component == "unet" else settings.train_te):
                continue
            for name, target in named.items():
                dim, alpha = settings.dim_alpha(name, target, component)
                if dim <= 0:
                    continue
                shape = part_shape(name, target) if isinstance(target, nn.MultiheadAttention) else None
                modules[name] = module_cls(name, target, dim, alpha, shape=shape, **drops)
        network = cls(modules, _fused_groups(modules), settings.algo, settings.train_unet, settings.train_te,
                      settings)
        logger.info("created %s network: %d UNet and %d text-encoder modules", settings.algo,
                    len(network.unet_names()), len(network.te_names()))
        return network

    @classmethod
    def from_kohya(cls, targets: dict[str, dict[str, nn.Module]], sd: dict[str, torch.Tensor],
                   strict: bool = True, multiplier: float = 1.0) -> "LoRANetwork":
        """Rebuild a network whose ranks and alphas come from a kohya state dict, with its weights loaded.

        Args:
            targets (dict): as for `create` (include conv targets to load LoCon files).
            sd (dict[str, torch.Tensor]): kohya keys -> tensors (`load_lora(path)[0]`).
            strict (bool, optional): unmatched keys raise `NetworkError`; else they are skipped with a warning.
            multiplier (float, optional): defaults to 1.0.

        Returns:
            LoRANetwork: not yet applied.
        """
        from .files import detect_algorithm

        algo = detect_algorithm(sd.keys())
        module_cls = module_class(algo)
        flat = {name: module for named in targets.values() for name, module in named.items()}
        grouped = _group_keys(sd)
        unmatched = sorted(name for name in grouped if name not in flat)
        _check_unmatched(unmatched, strict)
        modules = {}
        for name, tensors in grouped.items():
            if name in flat:
                target = flat[name]
                shape = part_shape(name, target) if isinstance(target, nn.MultiheadAttention) else None
                modules[name] = module_cls.from_state_dict(name, target, tensors, shape=shape)
        components = {component_of(name) for name in modules}
        network = cls(modules, _fused_groups(modules), algo, "unet" in components,
                      bool(components & set(TE_COMPONENTS)))
        network.multiplier = multiplier
        return network

    # -- names and parameters --------------------------------------------------------------------------------
    def unet_names(self) -> list[str]:
        """Kohya names of the UNet modules."""
        return [n for n in self.loras if component_of(n) == "unet"]

    def te_names(self) -> list[str]:
        """Kohya names of the text-encoder modules (te, te1, te2)."""
        return [n for n in self.loras if component_of(n) in TE_COMPONENTS]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer should update (frozen ones, e.g. LR weight 0, left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def multiplier(self) -> float:
        """Strength of every module's delta (0 = base model); set it at any time."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for module in self.loras.values():
            module.multiplier = float(value)

    # -- injection -------------------------------------------------------------------------------------------
    def apply(self) -> None:
        """Inject every module into its target (bypass forward). Idempotent."""
        for module in self.loras.values():
            if id(module) not in self._fused_parts:
                module.apply()
        for fused in self.fused:
            fused.apply()
        self.applied = True

    def remove(self) -> None:
        """Restore every target's original forward exactly. Idempotent."""
        for fused in reversed(self.fused):
            fused.restore()
        for module in reversed(list(self.loras.values())):
            if id(module) not in self._fused_parts:
                module.restore()
        self.applied = False

    # -- optimizer -------------------------------------------------------------------------------------------
    def param_groups(self, unet_lr: float | None, te_lr: float | None, cfg=None,
                     default_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups as kohya builds them.

        One text-encoder group at `te_lr`, then the UNet: one group at `unet_lr`, or with block LR weights
        (down/mid/up_lr_weight in `cfg`, else those given at creation) one group per block at `unet_lr * weight`.
        A group whose lr is 0 is omitted and its parameters frozen.

        Args:
            unet_lr (float, optional): None -> `default_lr`.
            te_lr (float, optional): None -> `default_lr`.
            cfg (optional): kohya-keyed object for block LR weights, defaults to the creation settings.
            default_lr (float, optional): used for a None lr; when also None the group has no "lr" key.

        Returns:
            list[dict]: groups with "params", "lr" (when known) and "name".
        """
        settings = NetworkSettings.from_config(cfg) if cfg is not None else self.settings
        te_lr = default_lr if te_lr is None else te_lr
        unet_lr = default_lr if unet_lr is None else unet_lr
        groups = []
        te_params = [p for n in self.te_names() for p in self.loras[n].parameters()]
        _add_group(groups, "textencoder", te_params, te_lr)
        if settings.lr_weights is None:
            _add_group(groups, "unet", [p for n in self.unet_names() for p in self.loras[n].parameters()], unet_lr)
            return groups
        by_block = defaultdict(list)
        for name in self.unet_names():
            by_block[unet_block_index(name)].extend(self.loras[name].parameters())
        for idx in sorted(by_block, key=lambda i: -1 if i is None else i):
            weight = 1.0 if idx is None else settings.lr_weights[idx]
            lr = None if unet_lr is None else unet_lr * weight
            label = "unet" if idx is None else f"unet_block_{idx:02d}"
            _add_group(groups, label, by_block[idx], lr if weight != 0 else 0.0)
        return groups

    # -- state dict ------------------------------------------------------------------------------------------
    def state_dict_kohya(self, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
        """kohya keys (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`, or `.hada_*`) -> CPU tensors.

        Args:
            dtype (torch.dtype, optional): save precision (alpha included, as kohya); None keeps each dtype.

        Returns:
            dict[str, torch.Tensor]: contiguous CPU tensors.
        """
        out = {}
        for name, module in self.loras.items():
            for suffix, tensor in module.to_state_dict().items():
                tensor = tensor.detach().to("cpu")
                out[f"{name}.{suffix}"] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
        return out

    def load_kohya(self, sd: dict[str, torch.Tensor], strict: bool = True) -> LoadReport:
        """Load a kohya state dict into the existing modules (all checks happen before anything is copied).

        Args:
            sd (dict[str, torch.Tensor]): kohya keys -> tensors.
            strict (bool, optional): unmatched keys or network modules absent from the file raise; else they
                are reported and skipped. Defaults to True.

        Returns:
            LoadReport: loaded, missing and unmatched names.

        Raises:
            NetworkError: unmatched keys (strict), missing modules (strict), or a shape mismatch (always).
        """
        grouped = _group_keys(sd)
        unmatched = sorted(k for k in sd if split_key(k)[0] not in self.loras)
        _check_unmatched(unmatched, strict)
        missing = [name for name in self.loras if name not in grouped]
        if missing and strict:
            raise NetworkError(
                f"{len(missing)} modules of this network have no weights in the file ({_names_preview(missing)}). "
                "The file was made with other targets or dims; create the network with from_kohya() instead."
            )
        for name, tensors in grouped.items():
            if name in self.loras:
                self.loras[name].check_tensors(tensors)
        loaded = []
        for name, tensors in grouped.items():
            if name in self.loras:
                self.loras[name].load_tensors(tensors)
                loaded.append(name)
        return LoadReport(loaded, missing, unmatched)


def _group_keys(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        name, suffix = split_key(key)
        grouped[name][suffix] = value
    return dict(grouped)


def _check_unmatched(unmatched: list[str], strict: bool) -> None:
    if not unmatched:
        return
    message = (f"{len(unmatched)} keys match no module of this model ({_names_preview(unmatched)}). "
               "This LoRA was made for another architecture or with other targets (conv layers need conv targets).")
    if strict:
        raise NetworkError(message)
    logger.warning("%s Skipped.", message)


def _add_group(groups: list[dict], name: str, params: list, lr: float | None) -> None:
    if not params:
        return
    if lr == 0:
        for p in params:
            p.requires_grad_(False)
        return
    for p in params:
        p.requires_grad_(True)
    group = {"params": params, "name": name}
    if lr is not None:
        group["lr"] = lr
    groups.append(group)


def _fused_groups(modules: dict[str, NetworkModule]) -> list[FusedAttention]:
    groups: dict[int, tuple[str, nn.Module, dict]] = {}
    for name, module in modules.items():
        if not isinstance(module.org_module, nn.MultiheadAttention):
            continue
        split = fused_attention_part(name)
        if split is None:
            raise NetworkError(f"{name}: an nn.MultiheadAttention target must be named ..._self_attn_"
                               "{q,k,v,out}_proj. Fix the adapter's lora_targets().")
        base, part = split
        entry = groups.setdefault(id(module.org_module), (base, module.org_module, {}))
        entry[2][part] = module
    return [FusedAttention(base, mha, parts) for base, mha, parts in groups.values()]
