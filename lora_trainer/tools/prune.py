"""Prune a checkpoint, streamed: drop EMA weights and training leftovers, optionally store fp16/bf16.

Kept: the UNet (`model.diffusion_model.`), VAE (`first_stage_model.`) and text encoders (`cond_stage_model.`,
`conditioner.`), which hold every key the WebUI reads to tell SDXL (`conditioner.embedders.1.model.ln_final.weight`)
and SD2 (`cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight`) apart, its v-prediction probe (the
UNet) and inpainting / instruct models (input conv channels), and that our loader reads. Also kept: the extra
models the WebUI detects (`depth_model.`, unCLIP `embedder.` / `noise_augmentor.`) and the marker keys other UIs
read for v-prediction / zero-terminal-SNR / EDM models (`v_pred`, `ztsnr`, `edm_*`).
Dropped: `model_ema.*` and everything else (diffusion schedule buffers such as `alphas_cumprod`, optimizer
leftovers), which the WebUI rebuilds from its config.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .ckpt_keys import checkpoint_family
from .output_path import check_output
from .recipe import recipe_metadata
from .tensor_stream import TensorInfo, TensorReader, output_dtype, write_safetensors

logger = logging.getLogger(__name__)

KEEP_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                 "depth_model.", "embedder.", "noise_augmentor.")
KEEP_KEYS = ("v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")


def keep_key(key: str) -> bool:
    """Whether pruning keeps a checkpoint key (see the module docstring)."""
    return key.startswith(KEEP_PREFIXES) or key in KEEP_KEYS


@dataclass
class PruneResult:
    """What a prune wrote.

    Attributes:
        path (Path): the pruned file.
        family (str): "sd1", "sd2" or "sdxl".
        kept (int): keys written.
        dropped (list[str]): keys left out.
        size_in (int): input file size in bytes.
        size_out (int): output file size in bytes.
        seconds (float): wall time.
    """

    path: Path
    family: str
    kept: int = 0
    dropped: list[str] = field(default_factory=list)
    size_in: int = 0
    size_out: int = 0
    seconds: float = 0.0


def prune_checkpoint(src: str | Path, out: str | Path, *, precision: str | None = None, overwrite: bool = False,
                     hash_inputs: bool = False) -> PruneResult:
    """Write a pruned copy of a checkpoint, one tensor at a time.

    Args:
        src (str | Path): the checkpoint (`.safetensors`, or a weights-only `.ckpt`).
        out (str | Path): the output `.safetensors` file.
        precision (str, optional): "fp16", "bf16" or "fp32" for floating tensors, defaults to keeping dtypes.
        overwrite (bool, optional): replace an existing output, defaults to False.
        hash_inputs (bool, optional): record the input's sha256 in the metadata, defaults to False.

    Returns:
        PruneResult: kept and dropped keys, sizes.

    Raises:
        ValueError: bad output path or precision.
        ModelLoadError: not a Stable Diffusion checkpoint.
        FileWriteError: the output cannot be written (no partial file is left).
    """
    started = time.perf_counter()
    src = Path(src)
    out = check_output(out, [src], overwrite)
    with TensorReader(src) as reader:
        family = checkpoint_family(reader.infos, str(src))
        result = PruneResult(out, family, size_in=src.stat().st_size)
        infos = []
        for key, info in reader.infos.items():
            if keep_key(key):
                infos.append(TensorInfo(key, output_dtype(info.dtype, precision), info.shape))
            else:
                result.dropped.append(key)
        recipe = {"type": "lora_trainer prune", "model": src.name, "precision": precision,
                  "dropped": len(result.dropped)}
        metadata = recipe_metadata(reader.metadata, recipe, [(src, reader.metadata)], hash_inputs)
        write_safetensors(out, infos, lambda info: reader.get(info.key).to(info.dtype), metadata)
    result.kept = len(infos)
    result.size_out = out.stat().st_size
    result.seconds = time.perf_counter() - started
    logger.info("pruned %s -> %s: %d keys kept, %d dropped, %.1f -> %.1f MiB", src, out, result.kept,
                len(result.dropped), result.size_in / 2**20, result.size_out / 2**20)
    return result


__all__ = ["KEEP_KEYS", "KEEP_PREFIXES", "PruneResult", "keep_key", "prune_checkpoint"]
