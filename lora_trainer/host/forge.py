"""The Forge host: lllyasviel's Stable Diffusion WebUI Forge (its own `backend` package). With `forge_adapter.py`
the only modules importing Forge's `backend` and `modules_forge`.

Forge keeps A1111's `modules` (options, `shared.state` with its progress and Interrupt, the generation queue lock,
the Lora folder), so `ForgeHost` reuses `A1111Host` for those and replaces the model handshake:

1. the model: `shared.sd_model` is a placeholder until the first generation; it is loaded the way generation does
   (`forge_model_reload`). Quantised UNet storage (fp8/nf4/fp4/gguf) is refused.
2. prompt LoRAs Forge merged into the weights are taken out with Forge's own path (each patcher's `LoraLoader`
   refreshed with no patches, which restores its backups; `current_lora_hash` cleared so the next generation
   merges them again), then UNet, text encoder(s) and VAE are loaded fully onto Forge's device through
   `memory_management.load_models_gpu`; a weight left elsewhere (partial offload) is refused.
3. Forge loads under `torch.inference_mode`, so its weights are inference tensors autograd cannot use: each is
   replaced by an ordinary copy, one tensor at a time (`handshake.make_ordinary`), values bit-identical.
4. the usual borrow (`handshake.borrowed_model`: frozen, flags remembered and put back) and the compatibility
   self-test with Forge's own LoRA key mapping (`model_lora_keys_unet/clip`, `load_lora`).

Jobs run on Forge's main-thread task queue (`modules_forge.main_thread`, where its generation runs) while the job's
own thread holds the generation queue lock for them, so a txt2img sent meanwhile waits and then runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import sys
import threading
from pathlib import Path

import torch
from torch import nn

from lora_trainer.errors import ModelLoadError, NetworkError
from lora_trainer.host.a1111 import A1111Host, _webui
from lora_trainer.host.a1111_job import QueueLock as _QueueLock
from lora_trainer.host.a1111_keys import CompatReport, file_module_names
from lora_trainer.host.forge_adapter import ForgeAdapter, engine_architecture
from lora_trainer.host.handshake import borrowed_model, make_ordinary, state_fingerprint
from lora_trainer.host.reforge_keys import check_names, module_index

logger = logging.getLogger(__name__)

QUANTISED_STORAGE = ("nf4", "fp4", "gguf", "float8_e4m3fn", "float8_e5m2")


def _forge():
    from backend import memory_management
    from backend.patcher import lora
    from backend.text_processing import emphasis
    from modules import sd_models
    from modules_forge import main_thread

    return sd_models, memory_management, lora, emphasis, main_thread


def forge_networks():
    """Forge's built-in Lora extension (`extensions-builtin/sd_forge_lora/networks.py`), or None."""
    module = sys.modules.get("networks")
    return module if module is not None and hasattr(module, "load_lora_state_dict") else None


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (`VmRSS`) or at its peak (`VmHWM`), from Linux `/proc`; 0 elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak_rss() -> bool:
    """Start `VmHWM` (peak resident memory) again from the current RSS (Linux `clear_refs` 5); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give memory freed inside the C heap back to the system (glibc `malloc_trim`; nothing elsewhere): the
    originals `make_ordinary` frees sit between live blocks, where the heap alone would keep them resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _LentQueueLock(_QueueLock):
    """The generation queue lock; a job's thread holds it and lends it to the main-thread task running the job."""

    def __init__(self):
        super().__init__()
        self.lent_to: int | None = None

    @contextlib.contextmanager
    def held(self):
        if self.lent_to == threading.get_ident():
            yield
            return
        with super().held():
            yield


def _storage_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refuse_quantised(engine) -> None:
    """Refuse a UNet stored quantised: its weights are not float tensors a LoRA can train through in place.

    Args:
        engine: the Forge engine.

    Raises:
        ModelLoadError: fp8/nf4/fp4/gguf storage (the message offers training from the checkpoint file).
    """
    kmodel = engine.forge_objects.unet.model
    storage = _storage_name(getattr(kmodel, "storage_dtype", ""))
    quantised = [name for name, p in kmodel.named_parameters()
                 if hasattr(p, "bnb_quantized") or hasattr(p, "gguf_cls") or _storage_name(p.dtype) in
                 QUANTISED_STORAGE]
    if storage in QUANTISED_STORAGE or quantised:
        info = getattr(engine, "sd_checkpoint_info", None)
        source = getattr(info, "filename", "the checkpoint file")
        raise ModelLoadError(
            f"Forge: the loaded UNet is stored as {storage if storage in QUANTISED_STORAGE else 'quantised'} "
            f"(e.g. {quantised[:1] or 'all weights'}); LoRA training needs float weights (fp16/bf16/fp32). Set "
            "'Diffusion in Low Bits' to Automatic and generate once to reload it, or train from the checkpoint file: "
            f"`python -m lora_trainer train --pretrained_model_name_or_path {source} ...`.")


def restore_merged_loras(engine, memory_management) -> int:
    """Take prompt LoRAs out of the weights with Forge's own path; returns how many weights were restored.

    Args:
        engine: the Forge engine.
        memory_management: `backend.memory_management`.

    Returns:
        int: weights restored from the LoraLoader backups.
    """
    restored = 0
    originals = engine.forge_objects_original
    for patcher in (originals.unet, originals.clip.patcher):
        loader = patcher.lora_loader
        restored += len(loader.backup) + len(loader.online_backup)
        loader.refresh(lora_patches={}, offload_device=patcher.offload_device, force_refresh=True)
    engine.current_lora_hash = None  # the next generation builds its LoRA patches again
    engine.forge_objects = originals.shallow_copy()
    memory_management.signal_empty_cache = True
    logger.info("handshake 1: restored %d weights Forge had merged prompt LoRAs into", restored)
    return restored


def load_resident(engine, memory_management) -> list[nn.Module]:
    """Load UNet, text encoder(s) and VAE onto Forge's device, all of them; returns the three module trees.

    Raises:
        ModelLoadError: a weight stayed on another device (Forge offloads when the GPU is too small).
    """
    objects = engine.forge_objects_original
    patchers = [objects.unet, objects.clip.patcher, objects.vae.patcher]
    memory_management.load_models_gpu(patchers)
    roots = [objects.unet.model, objects.clip.cond_stage_model, objects.vae.first_stage_model]
    for patcher, root in zip(patchers, roots):
        device = torch.device(patcher.load_device)
        away = [n for n, p in root.named_parameters() if p.device.type != device.type]
        if away:
            raise ModelLoadError(
                f"Forge: {len(away)} weights of {type(root).__name__} (e.g. {away[0]}) stay on "
                f"{root.get_parameter(away[0]).device} while the model runs on {device}: Forge offloads part of "
                "the model when the GPU is too small. Raise 'GPU Weights' to the maximum (or close other programs) "
                "and start again, or train with `python -m lora_trainer train`.")
    return roots


class ForgeHost(A1111Host):
    """The Host (see `host/base.py`) for Stable Diffusion WebUI Forge (see module doc).

    Args:
        lora_dir (str | Path, optional): where LoRAs go, defaults to Forge's Lora folder (`--lora-dir`).
        verify_weights (bool, optional): log a sha256 of all weights before and after each run (slow on big
            models), defaults to False; the log's DEBUG level turns it on too.
    """

    name = "forge"

    def __init__(self, lora_dir: str | Path | None = None, verify_weights: bool = False):
        super().__init__(lora_dir=lora_dir, verify_weights=verify_weights)
        self._lock = _LentQueueLock()
        self.last_conversion = None

    # -- where the work runs -------------------------------------------------------------------------------------
    def run_job(self, work):
        """Run work (a training job's body) on Forge's main-thread task queue, holding the generation lock meanwhile.

        Args:
            work (callable): no arguments.

        Returns:
            What `work` returns; its exception is raised here again.
        """
        main_thread = _forge()[4]
        outcome = {}

        def task():
            self._lock.lent_to = threading.get_ident()
            try:
                outcome["result"] = work()
            except BaseException as exc:  # handed back to the caller's thread below
                outcome["error"] = exc
            finally:
                self._lock.lent_to = None

        with self._lock.held():
            main_thread.run_and_wait_result(task)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    def loaded_engine(self):
        """`shared.sd_model`, loaded the way Forge's generation loads it when it is still the placeholder."""
        shared, _ = _webui()
        sd_models = _forge()[0]
        engine = shared.sd_model
        if getattr(engine, "forge_objects", None) is None:
            logger.info("Forge: no model loaded yet; loading the selected checkpoint")
            with torch.inference_mode():
                engine, _ = sd_models.forge_model_reload()
        if engine is None or getattr(engine, "forge_objects", None) is None:
            raise ModelLoadError("Forge: no model is loaded. Pick a checkpoint at the top of the page first.")
        return engine

    # -- Host contract -------------------------------------------------------------------------------------------
    def refresh_loras(self) -> None:
        """List the new file and make Forge read LoRA files again (it caches them by file name)."""
        networks = forge_networks()
        if networks is None:
            logger.warning("Forge's Lora extension is not loaded; the new file shows after enabling it")
            return
        networks.load_lora_state_dict.cache_clear()
        engine = _webui()[0].sd_model
        if getattr(engine, "forge_objects_original", None) is not None:
            engine.current_lora_hash = None
            for patcher in (engine.forge_objects_original.unet, engine.forge_objects_original.clip.patcher):
                patcher.lora_loader.loaded_hash = None  # merge again even when a file name repeats
        networks.list_available_networks()
        logger.info("Lora list reloaded: %d networks", len(networks.available_networks))

    @contextlib.contextmanager
    def prepare_model(self, config):
        """Hand out Forge's loaded model as a ForgeAdapter and take it back as it was (see module doc)."""
        memory_management = _forge()[1]
        with self._lock.held():
            engine = self.loaded_engine()
            engine_architecture(engine)
            refuse_quantised(engine)
            restore_merged_loras(engine, memory_management)
            roots = load_resident(engine, memory_management)
            tree = nn.ModuleList(roots)
            before = self._fingerprint(tree)
            self.last_conversion = self._make_ordinary(roots)
            adapter = self.adapter(engine)
            self.check_compat(adapter, include_conv=bool(config.network.conv_dim))
            with borrowed_model(tree, adapter, "Forge's loaded model"), torch.inference_mode(False), \
                    torch.enable_grad():
                yield adapter
            self._check_unchanged(tree, before)

    def adapter(self, sd_model):
        """The ForgeAdapter over Forge's engine (captions taken literally, the checkpoint's hashes attached).

        Args:
            sd_model: `shared.sd_model` (a loaded Forge engine).

        Returns:
            ForgeAdapter: the adapter.
        """
        emphasis = _forge()[3]
        adapter = ForgeAdapter(sd_model, emphasis.get_current_option("None")(), model_id=self.model_hash(sd_model))
        info = self.checkpoint_info(sd_model)
        adapter.checkpoint_sha256 = getattr(info, "sha256", None) if info is not None else None
        return adapter

    def grid_session(self, config):
        """The loaded model and Forge's txt2img as a grid renderer (see `forge_render.grid_session`)."""
        from lora_trainer.host.forge_render import grid_session

        return grid_session(self, config)

    def _make_ordinary(self, roots):
        rss = rss_bytes()
        measured = reset_peak_rss()
        report = make_ordinary(roots, release=trim_heap)
        peak = f"peak {(rss_bytes('VmHWM') - rss) / 2**20:+.1f} MiB" if measured else "peak not measurable here"
        logger.info("handshake 3: %d inference tensors (%.1f MiB) made ordinary in place; largest copy %.1f MiB; "
                    "resident memory %+.1f MiB, %s", report.converted, report.bytes / 2**20,
                    report.peak_extra_bytes / 2**20, (rss_bytes() - rss) / 2**20, peak)
        return report

    def _fingerprint(self, tree: nn.Module) -> str | None:
        if not (self.verify_weights or logger.isEnabledFor(logging.DEBUG)):
            return None
        return state_fingerprint(tree)

    def _check_unchanged(self, tree: nn.Module, before: str | None) -> None:
        if before is None:
            return
        after = state_fingerprint(tree)
        if after != before:
            raise ModelLoadError("Forge: the model's weights differ after the run. Reload the checkpoint "
                                 "(pick it again at the top of the page) before generating.")
        logger.info("handshake: weights bit-identical after the run (sha256 %s)", after[:16])

    def fill_config(self, config):
        """A1111Host.fill_config with the architecture read from Forge's engine (loaded first when needed)."""
        engine = self.run_job(self.loaded_engine)
        config = super().fill_config(config)
        arch = engine_architecture(engine)
        model = dataclasses.replace(config.model, sdxl=arch == "sdxl", v2=arch.startswith("sd2"),
                                    v_parameterization=arch == "sd2-v")
        return dataclasses.replace(config, model=model)

    # -- the compatibility self-test with Forge's own key mapping -------------------------------------------------
    def key_maps(self, engine) -> tuple[dict, dict]:
        """Forge's kohya-name -> parameter-key maps of the UNet (KModel) and the text encoders."""
        lora = _forge()[2]
        objects = engine.forge_objects_original
        return (lora.model_lora_keys_unet(objects.unet.model, {}),
                lora.model_lora_keys_clip(objects.clip.cond_stage_model, {}))

    def name_checker(self, adapter):
        """Forge's placement of kohya names (`A1111Host.check_compat` runs it): its LoRA loader's key maps
        (`key_maps`), looked up the way `reforge_keys.py` does for reForge's ComfyUI-style maps."""
        objects = adapter.engine.forge_objects_original
        unet_map, clip_map = self.key_maps(adapter.engine)
        index = module_index(objects.unet.model, objects.clip.cond_stage_model)
        return lambda targets: check_names(targets, {**unet_map, **clip_map}, index)

    def check_file(self, path: str | Path):
        """Forge's own key matching (`load_lora`) on a saved file: every key must be used.

        Args:
            path (str | Path): the `.safetensors` file.

        Returns:
            CompatReport: the report (`unmatched`: file keys Forge would not load).

        Raises:
            NetworkError: keys Forge would leave unmatched.
        """
        from safetensors.torch import load_file

        lora = _forge()[2]
        engine = self.loaded_engine()
        unet_map, clip_map = self.key_maps(engine)
        tensors = load_file(str(path))
        _, rest = lora.load_lora(tensors, unet_map)
        _, rest = lora.load_lora(rest, clip_map)
        report = CompatReport(checked=len(file_module_names(tensors.keys())), unmatched=sorted(rest))
        if rest:
            raise NetworkError(f"{path}: Forge's LoRA loader leaves {len(rest)} keys unmatched, e.g. "
                               f"{sorted(rest)[:3]}. Train it on this model, or load the model it was trained on.")
        return report
