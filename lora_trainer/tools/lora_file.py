"""Read any LoRA file into per-module weights: LoRA/LoCon (incl. PEFT `lora_A/B` and Tucker `lora_mid`), LoHa,
LoKr and full deltas, written by us, kohya or LyCORIS, for SD1, SD2 and SDXL.

Each module gives its full delta weight (shaped like the target weight, with the scale the WebUI applies:
`scale` key, else `alpha / rank`, else 1) and, for LoRA/LoCon, its `up`/`down` factors. DoRA (`dora_scale`)
modules are read and listed by name so that a tool that cannot carry them refuses the file instead of dropping
them. Types the WebUI loads but these tools do not (IA3, OFT, GLoRA, Norm) are refused by name.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetworkError
from ..networks.files import load_lora
from ..networks.functional import loha_diff_weight, lokr_diff_weight, lora_diff_weight
from ..networks.keys import component_of, split_key
from .architectures import architecture_modules, detect_lora_architecture

logger = logging.getLogger(__name__)

# suffix -> algorithm; PEFT names are read as kohya's.
_SUFFIX_ALGO = {
    "lora_up.weight": "lora", "lora_down.weight": "lora", "lora_mid.weight": "lora",
    "lora_A.weight": "lora", "lora_B.weight": "lora",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "diff": "full",
}
_PEFT = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_COMMON = ("alpha", "scale", "dora_scale")
_UNSUPPORTED = {"on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA",
                "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "w_norm": "Norm", "b_norm": "Norm",
                "diff_b": "full (bias delta)", "weight": "IA3"}
_REQUIRED = {"lora": ("lora_up.weight", "lora_down.weight"),
             "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
             "full": ("diff",)}


@dataclass(frozen=True)
class Factors:
    """A LoRA/LoCon delta as `scale * up @ down`.

    Attributes:
        up (torch.Tensor): `[out, r]`.
        down (torch.Tensor): `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d); a Tucker `lora_mid` is folded in.
        scale (float): the WebUI's scale (`alpha / r`, `scale` key, or 1).
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraModuleWeights:
    """One module of a LoRA file.

    Attributes:
        name (str): kohya module name.
        algorithm (str): "lora" (LoRA/LoCon), "loha", "lokr" or "full".
        tensors (dict[str, torch.Tensor]): weight tensors by suffix as stored (PEFT names renamed to kohya's).
        shape (tuple[int, ...]): the target weight shape.
        alpha (float, optional): the stored alpha.
        scale_key (float, optional): a stored `scale` (takes precedence over alpha / rank, as in the WebUI).
        dora_scale (torch.Tensor, optional): DoRA magnitude, when the module has one.
    """

    name: str
    algorithm: str
    tensors: dict
    shape: tuple
    alpha: float | None = None
    scale_key: float | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        """The rank the WebUI divides alpha by (None for full-matrix LoKr and full deltas)."""
        t = self.tensors
        if self.algorithm == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.algorithm == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.algorithm == "lokr":
            low = t.get("lokr_w2_b", t.get("lokr_w1_b"))
            return int(low.shape[0]) if low is not None else None
        return None

    @property
    def scale(self) -> float:
        """The factor the WebUI applies to the stored delta: `scale`, else alpha / rank, else 1."""
        if self.scale_key is not None:
            return self.scale_key
        if self.alpha is not None and self.rank:
            return self.alpha / self.rank
        return 1.0

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """`up`, `down` and scale of a LoRA/LoCon module (NetworkError for other algorithms)."""
        if self.algorithm != "lora":
            raise NetworkError(f"{self.name}: a {self.algorithm} module has no up/down factors. Use its full delta.")
        up = self.tensors["lora_up.weight"].to(dtype)
        down = self.tensors["lora_down.weight"].to(dtype)
        up = up.reshape(up.shape[0], -1)
        mid = self.tensors.get("lora_mid.weight")
        if mid is not None:  # Tucker: down (in -> m), mid (m -> n, kernel), up (n -> out)
            down = torch.einsum("nmkl,mj->njkl", mid.to(dtype), down.reshape(down.shape[0], -1))
        return Factors(up, down.reshape(down.shape[0], *self.shape[1:]), self.scale)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight delta with the WebUI's scale, shaped like the target weight (multiplier 1)."""
        t = {k: v.to(dtype) for k, v in self.tensors.items()}
        if self.algorithm == "lora":
            f = self.factors(dtype)
            return lora_diff_weight(f.down, f.up, self.shape) * f.scale
        if self.algorithm == "loha":
            return self._loha(t) * self.scale
        if self.algorithm == "lokr":
            return self._lokr(t) * self.scale
        return t["diff"].reshape(self.shape) * self.scale

    def _loha(self, t: dict) -> torch.Tensor:
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
            return (w1 * w2).reshape(self.shape)
        return loha_diff_weight(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], self.shape)

    def _lokr(self, t: dict) -> torch.Tensor:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = _lokr_w2(t)
        return lokr_diff_weight(w1, w2, self.shape)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: core `[r, r, kh, kw]`, wa `[r, out]`, wb `[r, in]` -> `[out, in, kh, kw]`."""
    return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)


def _lokr_w2(t: dict) -> torch.Tensor:
    if "lokr_w2" in t:
        return t["lokr_w2"]
    if "lokr_t2" in t:
        return _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    return t["lokr_w2_a"] @ t["lokr_w2_b"]


@dataclass
class LoraFile:
    """A LoRA file read into modules.

    Attributes:
        path (Path, optional): the file (None for a state dict built in memory).
        metadata (dict[str, str]): safetensors metadata (`ss_*`...).
        architecture (str): "sd1", "sd2" or "sdxl" (from metadata, else from names and shapes).
        modules (dict[str, LoraModuleWeights]): by kohya module name, in file order.
        ignored_keys (list[str]): keys outside any LoRA component (bundled embeddings ...), kept out of the tools.
    """

    path: Path | None
    metadata: dict
    architecture: str
    modules: dict
    ignored_keys: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "LoRA"

    @property
    def algorithm(self) -> str:
        """"lora", "locon" (LoRA with kxk conv or resnet modules), "loha", "lokr", "full" or "mixed"."""
        algos = {m.algorithm for m in self.modules.values()}
        if len(algos) > 1:
            return "mixed"
        algo = algos.pop() if algos else "lora"
        if algo == "lora" and any(_is_locon_module(m) for m in self.modules.values()):
            return "locon"
        return algo

    @property
    def dora_modules(self) -> list[str]:
        """Names of modules carrying a DoRA `dora_scale`."""
        return [name for name, m in self.modules.items() if m.dora_scale is not None]

    def require_no_dora(self, action: str) -> None:
        """Raise a NetworkError naming the DoRA modules when there are any (tools that cannot carry DoRA)."""
        names = self.dora_modules
        if names:
            raise NetworkError(
                f"{self.label}: {len(names)} modules carry DoRA weights (`dora_scale`, e.g. {names[0]}), which "
                f"{action} cannot keep exactly. Use the file as it is, or ask its trainer for a plain LoRA export.")

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Full weight delta of one module (see `LoraModuleWeights.delta`)."""
        return self.modules[name].delta(dtype)

    def factors(self, name: str, dtype: torch.dtype = torch.float32) -> Factors:
        """up/down factors of one LoRA/LoCon module (see `LoraModuleWeights.factors`)."""
        return self.modules[name].factors(dtype)


def _is_locon_module(module: LoraModuleWeights) -> bool:
    if module.is_conv and module.kernel != (1, 1):
        return True
    return any(part in module.name for part in ("_resnets_", "_downsamplers_", "_upsamplers_", "_in_layers_",
                                                "_out_layers_", "_emb_layers_", "_skip_connection", "_op"))


def _group(sd: dict, label: str) -> tuple[dict[str, dict], list[str]]:
    groups: dict[str, dict] = {}
    ignored = []
    for key, tensor in sd.items():
        name, suffix = split_key(key)
        if component_of(name) is None:
            ignored.append(key)
            continue
        if suffix in _UNSUPPORTED:
            raise NetworkError(f"{label}: {key} belongs to a LyCORIS {_UNSUPPORTED[suffix]} module, which the LoRA "
                               "tools do not support. Supported: LoRA, LoCon, LoHa, LoKr and full deltas.")
        if suffix not in _SUFFIX_ALGO and suffix not in _COMMON:
            raise NetworkError(f"{label}: key {key} has an unknown suffix {suffix!r}. The file is not a LoRA/LoCon/"
                               "LoHa/LoKr file these tools can read.")
        groups.setdefault(name, {})[_PEFT.get(suffix, suffix)] = tensor
    return groups, ignored


def _module_algorithm(name: str, tensors: dict, label: str) -> str:
    algos = {_SUFFIX_ALGO[s] for s in tensors if s in _SUFFIX_ALGO}
    if len(algos) != 1:
        what = "no weights" if not algos else f"keys of several types {sorted(algos)}"
        raise NetworkError(f"{label}: module {name} has {what}. The file is damaged or mixes formats; "
                           "export it again from its trainer.")
    algo = algos.pop()
    required = _REQUIRED.get(algo, ())
    if algo == "lokr":
        has_1 = "lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= set(tensors)
        has_2 = "lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= set(tensors)
        required = () if has_1 and has_2 else ("lokr_w1 (or _a/_b)", "lokr_w2 (or _a/_b)")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise NetworkError(f"{label}: module {name} lacks {missing}. The file is damaged; export it again.")
    return algo


def _flat_shape(out: int, in_flat: int, kernel_of, name: str, label: str) -> tuple:
    """A delta stored as `[out, in * kh * kw]`: the target shape from the architecture's kernel size."""
    kernel = kernel_of(name)
    size = math.prod(kernel) if kernel else 1
    if not kernel:
        return (out, in_flat)
    if in_flat % size:
        raise NetworkError(f"{label}: module {name} has {in_flat} inputs, not a multiple of its {kernel} kernel. "
                           "The file does not fit this architecture.")
    return (out, in_flat // size, *kernel)


def _target_shape(name: str, algo: str, t: dict, kernel_of, label: str) -> tuple:
    if algo == "lora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        mid = t.get("lora_mid.weight")
        spatial = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        return (int(up.shape[0]), int(down.shape[1]), *spatial)
    if algo == "loha":
        if "hada_t1" in t:
            return (int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]), *t["hada_t1"].shape[2:])
        return _flat_shape(int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1]), kernel_of, name, label)
    if algo == "lokr":
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = tuple(t["lokr_w2"].shape)
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        out, inp = int(w1[0] * w2[0]), int(w1[1] * w2[1])
        return (out, inp, *w2[2:]) if len(w2) == 4 else _flat_shape(out, inp, kernel_of, name, label)
    return tuple(t["diff"].shape)


def lora_from_state_dict(sd: dict, metadata: dict | None = None, path=None,
                         architecture: str | None = None) -> LoraFile:
    """Build a `LoraFile` from a state dict.

    Args:
        sd (dict[str, torch.Tensor]): the file's tensors.
        metadata (dict[str, str], optional): its metadata.
        path (str | Path, optional): where it came from (for messages).
        architecture (str, optional): force the architecture instead of detecting it.

    Returns:
        LoraFile: the modules.

    Raises:
        NetworkError: unsupported module types, damaged modules, or no LoRA modules at all.
    """
    metadata = dict(metadata or {})
    label = str(path) if path is not None else "LoRA"
    groups, ignored = _group(sd, label)
    if not groups:
        raise NetworkError(f"{label}: no LoRA modules (keys starting lora_unet_ / lora_te_ / lora_te1_ / lora_te2_). "
                           "Only kohya-style LoRA files can be read; convert diffusers-format files first.")
    algos = {name: _module_algorithm(name, tensors, label) for name, tensors in groups.items()}
    arch = architecture or detect_lora_architecture(groups, metadata, label)

    def kernel_of(name: str) -> tuple:  # only flattened LoHa/LoKr conv deltas need the (slower) module table
        return architecture_modules(arch).kernel(name)

    modules = {}
    for name, tensors in groups.items():
        weights = {k: v for k, v in tensors.items() if k not in _COMMON}
        alpha, scale = tensors.get("alpha"), tensors.get("scale")
        modules[name] = LoraModuleWeights(
            name, algos[name], weights, _target_shape(name, algos[name], weights, kernel_of, label),
            alpha=float(alpha.float().reshape(-1)[0]) if alpha is not None else None,
            scale_key=float(scale.float().reshape(-1)[0]) if scale is not None else None,
            dora_scale=tensors.get("dora_scale"),
        )
    if ignored:
        logger.warning("%s: %d keys outside the LoRA modules are left out, e.g. %s", label, len(ignored), ignored[0])
    return LoraFile(Path(path) if path is not None else None, metadata, arch, modules, ignored)


def read_lora(path, architecture: str | None = None) -> LoraFile:
    """Read a LoRA file (`.safetensors`, or `.pt`/`.ckpt` through a weights-only load).

    Args:
        path (str | Path): the file.
        architecture (str, optional): force "sd1", "sd2" or "sdxl" instead of detecting it.

    Returns:
        LoraFile: its modules, metadata and architecture.
    """
    sd, metadata = load_lora(path)
    return lora_from_state_dict(sd, metadata, path, architecture)


__all__ = ["Factors", "LoraFile", "LoraModuleWeights", "lora_from_state_dict", "read_lora"]
