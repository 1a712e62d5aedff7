"""reForge's model objects made ready for training, through reForge's own memory manager and patchers.

reForge keeps A1111's ldm object (`shared.sd_model`) and puts ComfyUI-style patchers beside it in
`sd_model.forge_objects` (`unet`, `clip`, `vae`); `forge_objects_original` holds the patchers without prompt
LoRAs. A prompt LoRA is a patched clone of the UNet/CLIP patcher: its weights are merged into the shared modules
when the clone is loaded (`ModelPatcher.patch_weight_to_device`, the originals kept in the patcher's `backup`,
which all clones share) and taken out when another clone of the same model is loaded. So loading the original
patchers fully (`load_models_gpu(..., force_full_load=True)`) both takes every merged LoRA off with reForge's own
unpatch and makes the weights fully resident. Functions here get reForge's objects passed in; only `reforge.py`
imports reForge.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)

UNET_KEY_PREFIX = "diffusion_model."


@dataclass
class ResidentReport:
    """What `make_resident` did.

    Attributes:
        unpatched (list[str]): UNet weight keys ("diffusion_model....") that had a prompt LoRA merged in.
        patchers (int): patchers loaded (UNet, CLIP, VAE).
    """

    unpatched: list[str] = field(default_factory=list)
    patchers: int = 0


def original_patchers(sd_model) -> list:
    """The patchers without prompt LoRAs: UNet, CLIP (its `.patcher`) and VAE (its `.patcher`), those present."""
    objects = sd_model.forge_objects_original
    found = [objects.unet]
    found += [getattr(part, "patcher", None) for part in (objects.clip, objects.vae) if part is not None]
    return [patcher for patcher in found if patcher is not None]


def check_sampler_modules(sd_model) -> None:
    """Refuse a model whose ldm attributes are not the modules reForge's sampler and text encoder call.

    Raises:
        ModelLoadError: `sd_model.model.diffusion_model` is not `forge_objects_original.unet.model.diffusion_model`.
    """
    sampled = sd_model.forge_objects_original.unet.model.diffusion_model
    if sd_model.model.diffusion_model is not sampled:
        raise ModelLoadError("reForge: shared.sd_model.model.diffusion_model is not the UNet reForge samples with "
                             "(forge_objects.unet); an extension replaced it. Disable that extension, reload the "
                             "checkpoint and start again.")


def make_resident(sd_model, model_management) -> ResidentReport:
    """Take prompt LoRAs off and load UNet, CLIP and VAE fully, with reForge's memory manager (run it on reForge's
    main thread).

    Args:
        sd_model: `shared.sd_model` (with `forge_objects_original`).
        model_management: `ldm_patched.modules.model_management`.

    Returns:
        ResidentReport: the UNet keys that were unpatched.

    Raises:
        ModelLoadError: weight patches on the original patchers (an extension's), or a model left partly loaded
            (reForge's --always-no-vram / low-VRAM modes).
    """
    patchers = original_patchers(sd_model)
    unet = patchers[0]
    unpatched = sorted(key for key in unet.backup if key.startswith(UNET_KEY_PREFIX))
    for patcher in patchers:
        if patcher.patches:
            raise ModelLoadError(
                f"reForge: the base {type(patcher.model).__name__} carries weight patches of an extension "
                f"({len(patcher.patches)} keys). Training would learn on top of them; turn that extension off, "
                "reload the checkpoint and start again.")
    model_management.load_models_gpu(patchers, force_full_load=True)
    for patcher in patchers:
        model = patcher.model
        if getattr(model, "model_lowvram", False):
            raise ModelLoadError(
                f"reForge: {type(model).__name__} is only partly loaded (low-VRAM mode: weights stream in during "
                "each step, which training cannot go through). Restart reForge without --always-no-vram / "
                "--always-low-vram, or train with `python -m lora_trainer train` on the checkpoint file.")
        if patcher.backup:
            raise ModelLoadError(f"reForge: {len(patcher.backup)} weights of {type(model).__name__} still hold a "
                                 "merged LoRA after unpatching. Reload the checkpoint and start again.")
    logger.info("reForge: %d patchers fully loaded, %d UNet weights had a prompt LoRA taken off", len(patchers),
                len(unpatched))
    return ResidentReport(unpatched=unpatched, patchers=len(patchers))


class TrainingView:
    """What a run changes on reForge's objects while it trains; put back for a pause and at the end (idempotent).

    - `sd_model.forge_objects` points at the LoRA-free patchers (the text wrappers load `forge_objects.clip`, which
      after a generation with a prompt LoRA is that LoRA's patched clone);
    - `forge_clip.move_clip_to_gpu` does nothing: the CLIP is already resident, and each call (one per caption
      batch) would run reForge's memory manager, which may evict part of the training UNet to make room.

    Args:
        sd_model: `shared.sd_model`.
        forge_clip: `modules_forge.forge_clip`.
    """

    def __init__(self, sd_model, forge_clip):
        self.sd_model, self.forge_clip = sd_model, forge_clip
        self._saved = None

    def enter(self) -> None:
        if self._saved is not None:
            return
        self._saved = (self.sd_model.forge_objects, self.forge_clip.move_clip_to_gpu)
        self.sd_model.forge_objects = self.sd_model.forge_objects_original.shallow_copy()
        self.forge_clip.move_clip_to_gpu = _already_resident

    def leave(self) -> None:
        if self._saved is None:
            return
        (self.sd_model.forge_objects, self.forge_clip.move_clip_to_gpu), self._saved = self._saved, None


def rss_bytes() -> int:
    """This process's resident memory now (Linux `/proc`; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _already_resident() -> None:
    """Stands in for `move_clip_to_gpu` while a training job holds the model (loaded by `make_resident`)."""


__all__ = ["ResidentReport", "TrainingView", "check_sampler_modules", "make_resident", "original_patchers",
           "rss_bytes"]
