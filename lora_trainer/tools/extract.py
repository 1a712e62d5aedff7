"""Extract a LoRA / LoCon from two checkpoints: a truncated SVD of `tuned - base` per kohya target, streamed.

As kohya's `extract_lora_from_models.py`: rank `min(dim, out, in)` for Linear and 1x1 conv layers and
`min(conv_dim, ...)` for kxk convs (resnet / sampler layers only with `conv_dim`), `up = U * S`, `down = V^T`, both
clamped to the `clamp_quantile` quantile of their joined values (0.99; 1 turns clamping off), `alpha = rank` (scale
1). A text encoder is left out when no weight differs by more than `min_diff` (per encoder here; kohya decides for
all at once). UNet layers whose difference is exactly zero are left out too, and when nothing differs at all the
extraction is refused and no file is written. Both files are read one tensor at a time; no model is loaded.
`fast=True` replaces the full SVD by a randomized truncated one (much cheaper at low rank); the energy each module
keeps is reported either way.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetworkError
from ..networks.files import save_lora
from ..networks.metadata import base_model_version
from .architectures import architecture_modules
from .ckpt_keys import LoraTarget, checkpoint_family, lora_targets, open_clip_trained_layers
from .output import lora_tensors
from .output_path import check_output
from .tensor_stream import PRECISIONS, TensorReader

logger = logging.getLogger(__name__)


class NothingToExtract(ValueError):
    """The two checkpoints hold the same weights on every LoRA target."""


@dataclass
class ExtractResult:
    """What an extraction wrote.

    Attributes:
        path (Path): the LoRA file.
        architecture (str): "sd1", "sd2" or "sdxl".
        modules (int): modules written.
        skipped_text_encoders (list[str]): encoders ("te", "te1", "te2") left out as identical (<= min_diff).
        identical_modules (list[str]): UNet modules left out because their difference is exactly zero.
        te_max_diff (dict[str, float]): largest absolute weight difference per text encoder.
        retained_energy (dict[str, float]): per module, the share of the difference's energy the rank keeps.
        seconds (float): wall time.
    """

    path: Path
    architecture: str
    modules: int = 0
    skipped_text_encoders: list[str] = field(default_factory=list)
    identical_modules: list[str] = field(default_factory=list)
    te_max_diff: dict[str, float] = field(default_factory=dict)
    retained_energy: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def min_retained(self) -> float:
        """The smallest per-module retained energy (1.0 when nothing was extracted)."""
        return min(self.retained_energy.values(), default=1.0)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile` (linear interpolation) without its 2**24-element limit."""
    flat = values.reshape(-1)
    position = q * (flat.numel() - 1)
    low = int(position)
    high = min(low + 1, flat.numel() - 1)
    lo_val = torch.kthvalue(flat, low + 1).values
    hi_val = torch.kthvalue(flat, high + 1).values if high != low else lo_val
    return lo_val + (hi_val - lo_val) * (position - low)


@dataclass(frozen=True)
class Factorization:
    """LoRA factors of one weight difference.

    Attributes:
        up (torch.Tensor): `lora_up`, `[out, r]` or `[out, r, 1, 1]`.
        down (torch.Tensor): `lora_down`, `[r, in]` or `[r, in, kh, kw]`.
        retained (float): share of the difference's energy (squared Frobenius norm) the rank-r factors keep,
            before clamping (1.0 at full rank).
    """

    up: torch.Tensor
    down: torch.Tensor
    retained: float


def _top_singular(matrix: torch.Tensor, rank: int, fast: bool):
    if fast and 2 * rank < min(matrix.shape):
        # randomized range finder (Halko et al. 2011) with power iterations: near-optimal for decaying spectra
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 10, min(matrix.shape)), niter=4)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def svd_factors(delta: torch.Tensor, rank: int, clamp_quantile: float = 0.99, fast: bool = False) -> Factorization:
    """kohya-style LoRA factors of a weight difference: `up = U_r * S_r`, `down = V_r^T`.

    Args:
        delta (torch.Tensor): `[out, in]` or `[out, in, kh, kw]`, float32.
        rank (int): wanted rank (capped at the layer's size).
        clamp_quantile (float, optional): clamp both factors to this quantile of their joined values; >= 1 keeps
            them exact. Defaults to 0.99.
        fast (bool, optional): a randomized truncated SVD (`torch.svd_lowrank`, 4 power iterations) instead of
            the full one when the rank is below half the layer size; defaults to False (exact, as kohya).

    Returns:
        Factorization: factors with `up @ down ~= delta`, and the energy they retain.
    """
    out_dim = delta.shape[0]
    matrix = delta.reshape(out_dim, -1)
    rank = max(1, min(rank, *matrix.shape))
    u, s, vh = _top_singular(matrix, rank, fast)
    total = float(matrix.pow(2).sum())
    retained = float(s.pow(2).sum()) / total if total > 0 else 1.0
    up, down = u * s, vh
    if clamp_quantile < 1:
        limit = _quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if delta.ndim == 4:
        up, down = up.reshape(out_dim, rank, 1, 1), down.reshape(rank, *delta.shape[1:])
    return Factorization(up.contiguous(), down.contiguous(), min(retained, 1.0))


def _select_targets(targets: dict[str, LoraTarget], arch: str, conv_dim: int | None) -> dict[str, LoraTarget]:
    layers = open_clip_trained_layers(arch)
    chosen = {}
    for name, target in targets.items():
        if target.kind == "other" or (target.kind == "conv_block" and not conv_dim):
            continue
        if target.component != "unet" and layers is not None and "resblocks." in target.key:
            if int(target.key.split("resblocks.")[1].split(".")[0]) >= layers:
                continue
        chosen[name] = target
    return chosen


def _difference(readers: tuple[TensorReader, TensorReader], target: LoraTarget, cache: dict) -> torch.Tensor:
    """`tuned - base` of one target; the last read tensor pair is cached (fused q/k/v share one)."""
    if cache.get("key") != target.key:
        tuned, base = (r.get(target.key).float() for r in readers)
        cache.clear()
        cache.update(key=target.key, diff=tuned - base)
    diff = cache["diff"]
    return diff if target.rows is None else diff[target.rows[0]:target.rows[1]]


def _te_max_diff(readers, targets: list[LoraTarget]) -> float:
    cache: dict = {}
    return max((float(_difference(readers, t, cache).abs().max()) for t in targets), default=0.0)


def _metadata(arch: str, dim: int, conv_dim: int | None, recipe: dict, out: Path) -> dict[str, str]:
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(dim),
            "ss_base_model_version": base_model_version(arch), "ss_v2": str(arch == "sd2"),
            "ss_output_name": out.stem, "ss_training_comment": f"extracted from {recipe['tuned']} minus "
                                                               f"{recipe['base']}",
            "lora_trainer_recipe": json.dumps(recipe)}
    if conv_dim:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)})
    return meta


def _check_names(names, arch: str, out: Path) -> None:
    """The trainer's rule before saving: every module name lands on a module of the architecture."""
    known = architecture_modules(arch).shapes
    stray = [name for name in names if name not in known]
    if stray:
        raise NetworkError(f"{out}: {len(stray)} extracted names are not modules of {arch} (e.g. {stray[0]}); "
                           "nothing was written. This is a bug; please report it with both checkpoints' key lists.")


def extract_lora(tuned: str | Path, base: str | Path, out: str | Path, *, dim: int = 4, conv_dim: int | None = None,
                 clamp_quantile: float = 0.99, min_diff: float = 0.01, precision: str = "fp16",
                 overwrite: bool = False, device: str = "cpu", fast: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract `tuned - base` as a kohya LoRA (LoCon with `conv_dim`).

    Args:
        tuned (str | Path): the fine-tuned checkpoint.
        base (str | Path): the checkpoint it was tuned from (same architecture).
        out (str | Path): the LoRA `.safetensors` to write.
        dim (int, optional): rank of Linear / 1x1 layers, defaults to 4 (kohya's default).
        conv_dim (int, optional): rank of kxk convs; also adds the resnet / sampler layers, defaults to None.
        clamp_quantile (float, optional): see `svd_factors`, defaults to 0.99.
        min_diff (float, optional): a text encoder whose largest weight difference is at most this is left out,
            defaults to 0.01.
        precision (str, optional): "fp16", "bf16" or "fp32" for the saved tensors, defaults to "fp16".
        overwrite (bool, optional): replace an existing output, defaults to False.
        device (str, optional): where the SVDs run ("cpu", "cuda"), defaults to "cpu".
        fast (bool, optional): randomized truncated SVDs (see `svd_factors`), defaults to False.
        progress (Callable[[int, int], None], optional): called with (done, total) modules.

    Returns:
        ExtractResult: modules written, encoders skipped, the differences seen.

    Raises:
        NothingToExtract: the checkpoints do not differ on any target (no file is written).
        ValueError: different architectures or layouts, bad output path, rank or precision.
    """
    started = time.perf_counter()
    if dim < 1 or (conv_dim is not None and conv_dim < 1):
        raise ValueError(f"dim={dim}, conv_dim={conv_dim}: ranks must be at least 1.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: unknown. Use one of {sorted(PRECISIONS)}.")
    tuned, base = Path(tuned), Path(base)
    out = check_output(out, [tuned, base], overwrite)
    with ExitStack() as stack:
        readers = (stack.enter_context(TensorReader(tuned)), stack.enter_context(TensorReader(base)))
        arch = checkpoint_family(readers[0].infos, str(tuned))
        other = checkpoint_family(readers[1].infos, str(base))
        if other != arch:
            raise ValueError(f"{base}: a {other} checkpoint, but {tuned} is {arch}. Extract between checkpoints of "
                             "the same architecture.")
        targets = _select_targets(lora_targets(readers[0].infos, arch), arch, conv_dim)
        for target in targets.values():
            if readers[1].infos.get(target.key) is None or readers[1].infos[target.key].shape != \
                    readers[0].infos[target.key].shape:
                raise ValueError(f"{target.key}: missing or of another shape in {base}. The checkpoints do not have "
                                 "the same layout.")
        result = ExtractResult(out, arch)
        state_dict = _extract_modules(readers, targets, result, dim, conv_dim, clamp_quantile, min_diff,
                                      PRECISIONS[precision], device, fast, progress)
    if not state_dict:
        raise NothingToExtract(f"{tuned}: holds the same weights as {base} on every LoRA target (text encoders "
                               f"differ by at most {min_diff}); there is nothing to extract and no file was written.")
    recipe = {"type": "lora_trainer extract", "tuned": tuned.name, "base": base.name, "dim": dim,
              "conv_dim": conv_dim, "clamp_quantile": clamp_quantile, "min_diff": min_diff, "fast_svd": fast,
              "skipped_text_encoders": result.skipped_text_encoders}
    _check_names({key.split(".")[0] for key in state_dict}, arch, out)
    save_lora(out, state_dict, _metadata(arch, dim, conv_dim, recipe, out))
    result.seconds = time.perf_counter() - started
    logger.info("extracted %d modules from %s - %s into %s in %.1f s (text encoders left out: %s)", result.modules,
                tuned, base, out, result.seconds, result.skipped_text_encoders or "none")
    return result


def _extract_modules(readers, targets: dict[str, LoraTarget], result: ExtractResult, dim: int, conv_dim: int | None,
                     clamp_quantile: float, min_diff: float, dtype: torch.dtype, device: str, fast: bool,
                     progress) -> dict[str, torch.Tensor]:
    by_component: dict[str, list[LoraTarget]] = {}
    for target in targets.values():
        by_component.setdefault(target.component, []).append(target)
    for component, members in by_component.items():
        if component == "unet":
            continue
        result.te_max_diff[component] = _te_max_diff(readers, members)
        if result.te_max_diff[component] <= min_diff:
            result.skipped_text_encoders.append(component)
    chosen = [t for t in targets.values() if t.component not in result.skipped_text_encoders]
    state_dict: dict[str, torch.Tensor] = {}
    cache: dict = {}
    for done, target in enumerate(chosen, 1):
        diff = _difference(readers, target, cache)
        if target.component == "unet" and not diff.any():
            result.identical_modules.append(target.name)
            continue
        is_kxk = diff.ndim == 4 and tuple(diff.shape[2:]) != (1, 1)
        factors = svd_factors(diff.to(device), conv_dim if is_kxk else dim, clamp_quantile, fast)
        state_dict.update(lora_tensors(target.name, factors.up.cpu(), factors.down.cpu(), factors.down.shape[0],
                                       target.shape, dtype))
        result.retained_energy[target.name] = factors.retained
        result.modules += 1
        if progress is not None:
            progress(done, len(chosen))
    return state_dict


__all__ = ["ExtractResult", "Factorization", "NothingToExtract", "extract_lora", "svd_factors"]
