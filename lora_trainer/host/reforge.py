"""The reForge host: Panchovix's stable-diffusion-webui-reForge. With `reforge_*.py`, the only modules that import
reForge's `modules_forge` and `ldm_patched`.

reForge keeps AUTOMATIC1111's `modules` (options, `shared.state`, the call queue lock, the Lora folder, txt2img
processing, the X/Y/Z plot script), so `ReForgeHost` is `A1111Host` with these differences:
- Model: `shared.sd_model` is A1111's ldm `LatentDiffusion` / sgm `DiffusionEngine`, but its UNet, VAE and text
  transformers are ComfyUI modules loaded by `modules_forge.forge_loader` (under `no_grad`: ordinary tensors).
  `sd_model.model.diffusion_model` *is* `forge_objects.unet.model.diffusion_model` (the same object, checked before
  each run), so LoRA modules put on it are on what the sampler calls; the text wrappers
  (`sd_model.cond_stage_model`, `forge_clip.CLIP_SD_*`) run `forge_objects.clip`'s transformers. ComfyUI's Linear/
  Conv2d subclass torch's, so kohya's target rules find them. See `reforge_adapter.py` for VAE and dtype details.
- Prompt LoRAs: the Lora extension keeps no `network_layer_mapping` and merges nothing itself; `<lora:...>` makes a
  patched clone of the UNet/CLIP patcher (`ldm_patched.modules.sd.load_lora_for_models`) whose weights are merged
  when the clone is loaded (`ModelPatcher.patch_model`) and unmerged from the shared `backup` when another clone of
  that model is loaded (`unpatch_model`). `make_resident` (`reforge_model.py`) loads the LoRA-free patchers
  (`forge_objects_original`) with `force_full_load`: reForge's own unpatch, and every weight resident in its
  compute dtype. Files are read through `functools.lru_cache` by file name and the applied set is remembered in
  `sd_model.current_lora_hash`: `refresh_loras` clears both, so a file rewritten under the same name is read anew.
- Text conditioning: the same `...WithCustomWords` wrappers as A1111 (`a1111_text.py`), except that the SD1/SD2
  wrapper calls `forge_clip.move_clip_to_gpu` (reForge's memory manager) on every encode; during a run the CLIP is
  already resident, so that call is skipped, and `forge_objects` points at the LoRA-free patchers
  (`reforge_model.TrainingView`).
- Task queue: txt2img/img2img from the UI hold the queue lock, then run as a task on `modules_forge.main_thread`;
  the API holds the queue lock and runs in its own thread. A job (training or a test grid) holds the queue lock,
  then the main-thread queue with a task of ours that runs its model loading (`reforge_queue`); a generation sent
  meanwhile waits, then runs. A paused run lets go of both (and of `TrainingView`), so generation from the UI and
  the API runs during the pause; resuming loads the model fully again and unpatches what the pause merged.
- Memory: reForge may leave a model partly loaded (low-VRAM modes) or offloaded to the CPU; `make_resident` loads
  fully and refuses a model still partly loaded. Generation runs under `torch.inference_mode()`, so weights it moved
  or patched are inference tensors: `handshake.make_ordinary` turns them into ordinary ones in place before training.
- X/Y/Z plot: reForge's `scripts/xyz_grid.py` has A1111's `AxisOption`; our axes register unchanged.
"""
from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.host.a1111 import A1111Host, lora_extension
from lora_trainer.host.a1111_text import sd_text_encoder, sdxl_text_encoder
from lora_trainer.host.a1111_job import QueueLock
from lora_trainer.host.handshake import borrowed_model, make_ordinary, state_fingerprint
from lora_trainer.host.reforge_adapter import ReForgeLdmAdapter, ReForgeSgmAdapter
from lora_trainer.host.reforge_keys import check_names, module_index
from lora_trainer.host.reforge_model import UNET_KEY_PREFIX, TrainingView, check_sampler_modules, make_resident, \
    rss_bytes
from lora_trainer.host.reforge_queue import MainThreadWorker, QueueAndMainThread

logger = logging.getLogger(__name__)


def _reforge() -> SimpleNamespace:
    """reForge's modules this host uses (imported on use: building the host imports nothing)."""
    from ldm_patched.modules import lora, model_management
    from modules import sd_models, shared
    from modules_forge import forge_clip, main_thread

    return SimpleNamespace(shared=shared, sd_models=sd_models, forge_clip=forge_clip, main_thread=main_thread,
                           lora=lora, model_management=model_management)


def loaded_model(sd_models):
    """reForge's loaded model, without loading one (`shared.sd_model` would load it on first access).

    Args:
        sd_models: reForge's `modules.sd_models`.

    Returns:
        The model (with `forge_objects_original`).

    Raises:
        ModelLoadError: no model yet, or one without reForge's patchers (SD3 and other non-UNet models).
    """
    sd_model = sd_models.model_data.sd_model
    if sd_model is None:
        raise ModelLoadError("reForge: no model is loaded yet. Pick a checkpoint at the top of the page (or "
                             "generate once) and start again.")
    if getattr(sd_model, "is_sd3", False) or getattr(sd_model, "forge_objects_original", None) is None:
        raise ModelLoadError("reForge: the loaded model is not an SD1, SD2 or SDXL UNet model. Load one of those, "
                             "or train with `python -m lora_trainer train` on the checkpoint file.")
    return sd_model


class ReForgeHost(A1111Host):
    """The Host (see `host/base.py`) for stable-diffusion-webui-reForge (differences from A1111: module doc).

    Args:
        lora_dir (str | Path, optional): where LoRAs go, defaults to reForge's Lora folder.
        verify_weights (bool, optional): compare the UNet with the checkpoint file before training, defaults to
            True.
    """

    name = "reforge"

    def __init__(self, lora_dir=None, verify_weights: bool = True):
        super().__init__(lora_dir=lora_dir, verify_weights=verify_weights)
        self.main_thread = MainThreadWorker(lambda: _reforge().main_thread)
        self._lock = QueueAndMainThread(QueueLock(), self.main_thread)  # jobs, prepare_model and pauses use both
        self._view: TrainingView | None = None
        self.last_conversion = None

    @contextlib.contextmanager
    def prepare_model(self, config):
        """Hand out reForge's loaded model: prompt LoRAs unpatched and every weight resident through reForge's
        memory manager (on its main thread), inference tensors made ordinary, the self-test on reForge's key map,
        then frozen; everything is put back on leaving."""
        forge = _reforge()
        with self._lock.held():
            sd_model = loaded_model(forge.sd_models)
            check_sampler_modules(sd_model)
            report = self.main_thread.call(make_resident, sd_model, forge.model_management)
            if self.verify_weights:
                self._verify_unet(sd_model, report.unpatched)
            self.last_conversion = self._make_ordinary(sd_model)
            before = state_fingerprint(sd_model) if logger.isEnabledFor(logging.DEBUG) else None
            adapter = self.adapter(sd_model)
            self.check_compat(adapter, include_conv=bool(config.network.conv_dim))
            self._view = TrainingView(sd_model, forge.forge_clip)
            self._view.enter()
            try:
                with borrowed_model(sd_model, adapter, "reForge's loaded model"), torch.inference_mode(False), \
                        torch.enable_grad():
                    yield adapter
            finally:
                self._view.leave()
                self._view = None
            if before is not None:
                self._check_unchanged(sd_model, before)

    def _pause_guard(self):
        """A pause gives reForge its objects back (`TrainingView.leave`) besides the queue lock and main thread; on
        resume, A1111's check (same checkpoint, prompt LoRAs taken off: here through reForge's patchers, which also
        loads everything fully again), inference tensors made ordinary again, and the training view back."""
        check_model, view = super()._pause_guard(), self._view
        if view is not None:
            view.leave()

        def check() -> None:
            check_model()
            if view is not None:
                self.last_conversion = self._make_ordinary(view.sd_model)
                view.enter()

        return check

    @staticmethod
    def _make_ordinary(sd_model):
        rss = rss_bytes()
        report = make_ordinary([sd_model])
        logger.info("handshake 3: %d inference tensors (%.1f MiB) made ordinary in place; largest copy %.1f MiB, "
                    "resident memory %+.1f MiB", report.converted, report.bytes / 2**20,
                    report.peak_extra_bytes / 2**20, (rss_bytes() - rss) / 2**20)
        return report

    @staticmethod
    def _check_unchanged(sd_model, before: str) -> None:
        after = state_fingerprint(sd_model)
        if after != before:
            raise ModelLoadError("reForge: the model's weights differ after the run. Reload the checkpoint (pick it "
                                 "again at the top of the page) before generating.")
        logger.info("handshake: weights bit-identical after the run (sha256 %s)", after[:16])

    def adapter(self, sd_model):
        """The ModelAdapter over reForge's model (SD1/SD2: `ReForgeLdmAdapter`, SDXL: `ReForgeSgmAdapter`) with the
        WebUI wrappers' own caption encoding.

        Args:
            sd_model: `shared.sd_model`.

        Returns:
            ModelAdapter: the adapter.
        """
        opts = _reforge().shared.opts
        original = sd_model.forge_objects_original
        base, vae = original.unet.model, original.vae.first_stage_model
        model_id = self.model_hash(sd_model)
        if getattr(sd_model, "is_sdxl", False):
            encode = sdxl_text_encoder(list(sd_model.conditioner.embedders)[:2], opts)
            adapter = ReForgeSgmAdapter(sd_model, base, vae, encode, model_id)
        else:
            adapter = ReForgeLdmAdapter(sd_model, base, vae, sd_text_encoder(sd_model.cond_stage_model, opts),
                                        model_id)
        info = self.checkpoint_info(sd_model)
        adapter.checkpoint_sha256 = getattr(info, "sha256", None) if info is not None else None
        return adapter

    def name_checker(self, adapter):
        """reForge's placement of kohya names: the key map its Lora loader builds (`reforge_keys.py`)."""
        lora = _reforge().lora
        original = adapter.model.forge_objects_original
        roots = [original.unet.model]
        key_map: dict[str, str] = {}
        lora.model_lora_keys_unet(original.unet.model, key_map)
        if original.clip is not None:
            lora.model_lora_keys_clip(original.clip.cond_stage_model, key_map)
            roots.append(original.clip.cond_stage_model)
        index = module_index(*roots)
        return lambda targets: check_names(targets, key_map, index)

    def take_off_prompt_loras(self, sd_model) -> list[str]:
        """Unpatch prompt LoRAs with reForge's patchers (on its main thread; the caller holds the queue).

        Args:
            sd_model: `shared.sd_model`.

        Returns:
            list[str]: UNet weight keys that were unpatched.
        """
        return self.main_thread.call(make_resident, sd_model, _reforge().model_management).unpatched

    def restored_unet_params(self, sd_model, restored: list[str]) -> list[str]:
        """`diffusion_model....` weight keys -> parameter names relative to the UNet."""
        return [key[len(UNET_KEY_PREFIX):] for key in restored if key.startswith(UNET_KEY_PREFIX)]

    def refresh_loras(self) -> None:
        """Reload the Lora list, forget reForge's cached LoRA files and the applied set, so a file rewritten under
        the same name is read again at the next generation."""
        super().refresh_loras()
        networks = lora_extension()
        cached = getattr(networks, "load_lora_state_dict", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        sd_model = _reforge().sd_models.model_data.sd_model
        if sd_model is not None and hasattr(sd_model, "current_lora_hash"):
            sd_model.current_lora_hash = None


__all__ = ["ReForgeHost", "loaded_model"]
