"""Network settings read from a kohya-keyed config: dims, alphas, dropouts, block dims and block LR weights.

Values are read with getattr, falling back to kohya's `network_args` ("conv_dim=4", "algo=loha", ...), so any
object with kohya attribute names works (our NetworkConfig, a TrainConfig holding one, a SimpleNamespace).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from ..errors import NetworkError
from .keys import NUM_BLOCKS, NUM_DOWN_BLOCKS, unet_block_index

logger = logging.getLogger(__name__)

ALGOS = ("lora", "locon", "loha", "lokr")
_ARG_ALIASES = {"network_dropout": ("network_dropout", "dropout")}


def _network_section(cfg):
    if cfg is not None and not hasattr(cfg, "network_dim") and hasattr(cfg, "network"):
        return cfg.network
    return cfg


def parse_network_args(args) -> dict[str, str]:
    """kohya `network_args` ("key=value" strings, or a dict) -> {key: value-string}."""
    if not args:
        return {}
    if isinstance(args, dict):
        return {str(k): str(v) for k, v in args.items()}
    parsed = {}
    for item in args:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise NetworkError(f"network_args: {item!r} is not key=value. Write it as e.g. \"conv_dim=4\".")
        parsed[key.strip()] = value.strip()
    return parsed


def read_setting(cfg, key: str, default=None):
    """The key from `cfg.network_args` when given there (kohya reads these keys from network_args), else
    `cfg.<key>` unless None, else `default`."""
    cfg = _network_section(cfg)
    args = parse_network_args(getattr(cfg, "network_args", None))
    for name in _ARG_ALIASES.get(key, (key,)):
        if name in args and args[name] not in ("", "None"):
            return args[name]
    value = getattr(cfg, key, None)
    return default if value is None else value


def _numbers(key: str, value, cast, length: int | None) -> list | None:
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [cast(float(v)) if str(v).strip() else cast(0) for v in items]
    except ValueError as exc:
        raise NetworkError(f"{key}: {value!r} is not a list of numbers ({exc}). Write e.g. \"1,1,...\".") from exc
    if length is not None and len(numbers) != length:
        raise NetworkError(f"{key}: {len(numbers)} values given, {length} needed (IN00..IN11, MID, OUT00..OUT11).")
    return numbers


def _lr_preset(key: str, value: str) -> list[float]:
    name, _, base = value.partition("+")
    base = float(base) if base else 0.0
    n = NUM_DOWN_BLOCKS
    curves = {
        "cosine": [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))],
        "sine": [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)],
        "linear": [i / (n - 1) + base for i in range(n)],
        "reverse_linear": [i / (n - 1) + base for i in reversed(range(n))],
        "zeros": [base] * n,
    }
    if name not in curves:
        raise NetworkError(f"{key}: unknown preset {name!r}. Use 12 numbers or one of {sorted(curves)}.")
    return curves[name]


def _lr_list(key: str, value, length: int) -> list[float] | None:
    if isinstance(value, str) and value.split("+")[0].strip().isalpha():
        return _lr_preset(key, value.strip())
    numbers = _numbers(key, value if not isinstance(value, (int, float)) else [value], float, None)
    if numbers is None:
        return None
    if len(numbers) > length:
        logger.warning("%s: %d values given, only the first %d are used", key, len(numbers), length)
    return (numbers + [1.0] * length)[:length]


def block_lr_weights(cfg) -> list[float] | None:
    """25 LR multipliers (IN00..IN11, MID, OUT00..OUT11) from down/mid/up_lr_weight, None when none is set.

    As kohya: short lists are padded with 1.0; weights <= `block_lr_zero_threshold` become 0.

    Args:
        cfg: object with kohya keys `down_lr_weight` (12), `mid_lr_weight` (1), `up_lr_weight` (12).

    Returns:
        list[float] | None: the weights.
    """
    down = _lr_list("down_lr_weight", read_setting(cfg, "down_lr_weight"), NUM_DOWN_BLOCKS)
    mid = _lr_list("mid_lr_weight", read_setting(cfg, "mid_lr_weight"), 1)
    up = _lr_list("up_lr_weight", read_setting(cfg, "up_lr_weight"), NUM_DOWN_BLOCKS)
    if down is None and mid is None and up is None:
        return None
    threshold = float(read_setting(cfg, "block_lr_zero_threshold", 0.0) or 0.0)
    weights = (down or [1.0] * 12) + (mid or [1.0]) + (up or [1.0] * 12)
    return [w if w > threshold else 0.0 for w in weights]


@dataclass
class NetworkSettings:
    """Everything `LoRANetwork.create` needs, parsed and checked once."""

    algo: str = "lora"
    network_dim: int = 4
    network_alpha: float | None = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_unet: bool = True
    train_te: bool = True
    block_dims: list | None = None
    block_alphas: list | None = None
    conv_block_dims: list | None = None
    conv_block_alphas: list | None = None
    lr_weights: list | None = None
    factor: int = -1

    @classmethod
    def from_config(cls, cfg) -> "NetworkSettings":
        """Read kohya keys from `cfg` (see module docstring); raises `NetworkError` naming a bad key."""
        algo = str(read_setting(cfg, "algo", "lora")).lower()
        if algo not in ALGOS:
            raise NetworkError(f"algo: {algo!r} is not supported. Use one of {ALGOS}.")
        unet_only = _bool(read_setting(cfg, "network_train_unet_only", False))
        te_only = _bool(read_setting(cfg, "network_train_text_encoder_only", False))
        if unet_only and te_only:
            raise NetworkError("network_train_unet_only and network_train_text_encoder_only are both set. "
                               "Set at most one of them.")
        dim = int(float(read_setting(cfg, "network_dim", 4)))
        alpha = _opt_float(read_setting(cfg, "network_alpha", 1.0))
        conv_dim = read_setting(cfg, "conv_dim")
        conv_dim = int(float(conv_dim)) if conv_dim is not None else None
        conv_alpha = _opt_float(read_setting(cfg, "conv_alpha"))
        settings = cls(
            algo=algo, network_dim=dim, network_alpha=alpha, conv_dim=conv_dim or None,
            conv_alpha=conv_alpha if conv_alpha is not None else (1.0 if conv_dim else None),
            network_dropout=_opt_float(read_setting(cfg, "network_dropout")),
            rank_dropout=_opt_float(read_setting(cfg, "rank_dropout")),
            module_dropout=_opt_float(read_setting(cfg, "module_dropout")),
            train_unet=not te_only, train_te=not unet_only,
            lr_weights=block_lr_weights(cfg),
            factor=int(float(read_setting(cfg, "factor", -1))),
        )
        settings._read_blocks(cfg)
        settings._check_ranges()
        return settings

    def _check_ranges(self) -> None:
        if self.network_dim <= 0:
            raise NetworkError(f"network_dim: {self.network_dim} is not positive. Use 1 or more (e.g. 16 or 32).")
        for key, upper in (("network_dropout", 1.0), ("rank_dropout", 1.0), ("module_dropout", 1.0 + 1e-9)):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < upper:
                raise NetworkError(f"{key}: {value} is outside [0, 1). Use a probability such as 0.1, or leave it unset.")

    def _read_blocks(self, cfg) -> None:
        self.block_dims = _numbers("block_dims", read_setting(cfg, "block_dims"), int, NUM_BLOCKS)
        self.block_alphas = _numbers("block_alphas", read_setting(cfg, "block_alphas"), float, NUM_BLOCKS)
        self.conv_block_dims = _numbers("conv_block_dims", read_setting(cfg, "conv_block_dims"), int, NUM_BLOCKS)
        self.conv_block_alphas = _numbers("conv_block_alphas", read_setting(cfg, "conv_block_alphas"), float,
                                          NUM_BLOCKS)
        if self.block_alphas is not None and self.block_dims is None:
            self.block_dims = [self.network_dim] * NUM_BLOCKS
        if self.block_dims is not None and self.block_alphas is None:
            self.block_alphas = [self.network_alpha] * NUM_BLOCKS
        if self.conv_block_dims is not None and self.conv_block_alphas is None:
            self.conv_block_alphas = [self.conv_alpha if self.conv_alpha is not None else 1.0] * NUM_BLOCKS

    def module_kwargs(self) -> dict:
        """Constructor arguments only some module classes take (LoKr's `factor`, from network_args)."""
        return {"factor": self.factor} if self.algo == "lokr" else {}

    @property
    def wants_conv(self) -> bool:
        """True when kxk convs get modules (conv_dim or conv_block_dims set): ask the adapter for conv targets."""
        return bool(self.conv_dim) or bool(self.conv_block_dims and any(self.conv_block_dims))

    def dim_alpha(self, name: str, module: nn.Module, component: str) -> tuple[int, float | None]:
        """(rank, alpha) for one target; rank 0 means no module (block dim 0, block LR weight 0, no conv_dim)."""
        is_kxk = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        idx = unet_block_index(name) if component == "unet" else None
        if idx is not None and self.lr_weights is not None and self.lr_weights[idx] == 0:
            return 0, None
        if is_kxk:
            if self.conv_block_dims is not None and idx is not None:
                return self.conv_block_dims[idx], self.conv_block_alphas[idx]
            return (self.conv_dim or 0), self.conv_alpha
        if self.block_dims is not None and idx is not None:
            return self.block_dims[idx], self.block_alphas[idx]
        return self.network_dim, self.network_alpha

    def lr_weight(self, name: str) -> float:
        """The block LR multiplier of a UNet module name (1.0 outside blocks or without block LR weights)."""
        idx = unet_block_index(name)
        if self.lr_weights is None or idx is None:
            return 1.0
        return self.lr_weights[idx]


def _opt_float(value) -> float | None:
    return None if value is None or value == "None" else float(value)


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)

