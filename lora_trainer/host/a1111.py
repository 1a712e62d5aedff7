"""The WebUI host: train on AUTOMATIC1111's loaded model in its own process. The only module that imports `modules`.

`prepare_model` runs the handshake: (1) LoRAs the built-in Lora extension merged into the weights are taken out
with the extension's own path (`loaded_networks` emptied, `network_apply_weights` on every merged layer, which
restores from `network_weights_backup`), then the UNet is compared with the checkpoint file; (2) refusals
(--medvram/--lowvram hooks, fp8 storage), then every weight frozen with devices, dtypes, `requires_grad`,
train/eval and checkpoint flags remembered (`handshake.borrowed_model`); the compatibility self-test checks that
every LoRA module name lands where the WebUI's Lora extension will put it. On leaving, everything is put back.
`job` runs the work as a WebUI job (`shared.state`, progress bar, Interrupt) holding the generation queue lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

from lora_trainer.errors import ModelLoadError, NetworkError, TrainingError
from lora_trainer.host.a1111_job import QueueLock, WebUIJob
from lora_trainer.host.a1111_keys import check_names, describe, file_module_names
from lora_trainer.host.a1111_text import sd_text_encoder, sdxl_text_encoder
from lora_trainer.host.handshake import borrowed_model, compare_with_file
from lora_trainer.models.ldm_adapter import LdmAdapter
from lora_trainer.models.sgm_adapter import SgmAdapter, TextCheckpointingFallback
from lora_trainer.train.job import JobManager

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
CHECK_EXTRA_TENSORS = 16


def _webui():
    from modules import call_queue, shared

    return shared, call_queue


def webui_shared():
    """`modules.shared` (options, state, cmd_opts) for the extension's glue (`a1111_tab.py`)."""
    return _webui()[0]


def lora_extension():
    """The built-in Lora extension's `networks` module, or None when the extension is not loaded."""
    module = sys.modules.get("networks")
    return module if module is not None and hasattr(module, "network_apply_weights") else None


class WebUILdmAdapter(TextCheckpointingFallback, LdmAdapter):
    """LdmAdapter for the WebUI's SD1/SD2 (its transformers may be too old for non-reentrant TE checkpointing)."""


def restore_merged_loras(sd_model) -> list[str]:
    """Take LoRAs the built-in extension merged into weights out again, with the extension's own restore path.

    Args:
        sd_model: `shared.sd_model`.

    Returns:
        list[str]: layer names that were restored from `network_weights_backup`.
    """
    networks = lora_extension()
    mapping = getattr(sd_model, "network_layer_mapping", None)
    if networks is None or mapping is None:
        logger.info("handshake 1: the Lora extension is not active; no merged weights to restore")
        return []
    networks.loaded_networks.clear()
    restored = []
    with torch.no_grad():
        for name, module in mapping.items():
            if getattr(module, "network_current_names", ()) != ():
                networks.network_apply_weights(module)  # wanted == () -> restore from backup
                restored.append(name)
    logger.info("handshake 1: restored %d layers merged by the Lora extension", len(restored))
    return restored


def _unet_params_of(sd_model, layer_names: list[str]) -> list[str]:
    """Parameter names (relative to diffusion_model) of restored UNet layers (`diffusion_model_...` mapping keys)."""
    unet = sd_model.model.diffusion_model
    by_id = {id(m): path for path, m in unet.named_modules()}
    names = []
    for layer in layer_names:
        module = sd_model.network_layer_mapping.get(layer)
        path = by_id.get(id(module))
        if path is None:
            continue
        names += [f"{path}.{p}" if path else p for p, _ in module.named_parameters(recurse=False)]
    return names


class A1111Host:
    """The Host (see `host/base.py`) for AUTOMATIC1111's WebUI.

    Args:
        lora_dir (str | Path, optional): where LoRAs go, defaults to the WebUI's Lora folder (`--lora-dir`).
        verify_weights (bool, optional): compare the UNet with the checkpoint file before training, defaults to
            True.
    """

    name = "a1111"

    def __init__(self, lora_dir: str | Path | None = None, verify_weights: bool = True):
        self._lora_dir = Path(lora_dir) if lora_dir else None
        self.verify_weights = verify_weights
        self._lock = QueueLock()
        self.last_check = None

    # -- Host contract -----------------------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        shared, _ = _webui()
        return self._lora_dir or Path(shared.cmd_opts.lora_dir)

    def checkpoint_dir(self) -> Path:
        """The WebUI's Stable-diffusion folder (`--ckpt-dir`, else models/Stable-diffusion)."""
        shared, _ = _webui()
        return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or os.path.join(shared.models_path, "Stable-diffusion"))

    def webui_dir(self) -> Path:
        """The WebUI's data folder (holds `extensions/`, where LoRA Block Weight keeps its presets)."""
        shared, _ = _webui()
        return Path(getattr(shared, "data_path", None) or Path(shared.models_path).parent)

    def refresh_loras(self) -> None:
        networks = lora_extension()
        if networks is None:
            logger.warning("the Lora extension is not loaded; the new file shows after enabling it")
            return
        networks.list_available_networks()
        logger.info("Lora list reloaded: %d networks", len(networks.available_networks))

    @contextlib.contextmanager
    def job(self, title: str, total_steps: int):
        """Run as a WebUI job: job name, progress bar, Interrupt; generation waits for the queue lock meanwhile
        (except while a run is paused: `WebUIJob.paused`)."""
        shared, _ = _webui()
        with self._lock.held():
            try:
                yield WebUIJob(shared.state, title, total_steps, self._lock, guard=self._pause_guard)
            finally:
                shared.state.end()

    def _pause_guard(self):
        """Remember the loaded model when a run pauses; the returned check, run when it resumes, takes out LoRAs
        the Lora extension merged during the pause (a `<lora:...>` prompt) and refuses another checkpoint."""
        shared, _ = _webui()
        sd_model = shared.sd_model
        before = getattr(self.checkpoint_info(sd_model), "filename", None)

        def check() -> None:
            now = shared.sd_model
            loaded = getattr(self.checkpoint_info(now), "filename", None) if now is not None else None
            if now is not sd_model or loaded != before:
                raise TrainingError(
                    f"WebUI: another checkpoint ({loaded}) was loaded during the pause; the run on {before} cannot "
                    "go on, so it stops and saves the LoRA trained so far. Load that checkpoint again before "
                    "resuming a paused run (with save_state on, Resume from the saved state folder goes on).")
            self.take_off_prompt_loras(sd_model)

        return check

    @contextlib.contextmanager
    def prepare_model(self, config):
        """Hand out `shared.sd_model` as a ModelAdapter and take it back exactly as it was (see module doc)."""
        shared, _ = _webui()
        with self._lock.held():
            sd_model = shared.sd_model
            if sd_model is None:
                raise ModelLoadError("WebUI: no model is loaded. Pick a checkpoint at the top of the page first.")
            self._refuse_low_vram(shared, sd_model)
            restored = restore_merged_loras(sd_model)
            if self.verify_weights:
                self._verify_unet(sd_model, restored)
            adapter = self.adapter(sd_model)
            self.check_compat(adapter, include_conv=bool(config.network.conv_dim))
            with borrowed_model(sd_model, adapter, "the WebUI's loaded model"), torch.inference_mode(False), \
                    torch.enable_grad():
                yield adapter

    # -- the Test panel's renderer (a1111_render.py) -------------------------------------------------------------
    def grid_session(self, config):
        """The loaded model and the WebUI's txt2img as a grid renderer (see `a1111_render.grid_session`)."""
        from lora_trainer.host.a1111_render import grid_session

        return grid_session(self, config)

    def sampler_names(self) -> list[str]:
        """The WebUI's visible samplers."""
        from lora_trainer.host.a1111_render import sampler_names

        return sampler_names()

    def check_sampler(self, name: str) -> None:
        """Raise ConfigError for a sampler the WebUI does not know."""
        from lora_trainer.host.a1111_render import check_sampler

        check_sampler(name)

    # -- pieces ------------------------------------------------------------------------------------------------
    def adapter(self, sd_model):
        """The ModelAdapter over `sd_model` (ldm SD1/SD2, sgm SDXL) with the WebUI's own caption encoding.

        Args:
            sd_model: `shared.sd_model`.

        Returns:
            ModelAdapter: LdmAdapter or SgmAdapter.
        """
        shared, _ = _webui()
        model_id = self.model_hash(sd_model)
        if getattr(sd_model, "is_sdxl", False):
            encode = sdxl_text_encoder(list(sd_model.conditioner.embedders)[:2], shared.opts)
            adapter = SgmAdapter(sd_model, text_encode=encode, model_id=model_id)
        else:
            encode = sd_text_encoder(sd_model.cond_stage_model, shared.opts)
            adapter = WebUILdmAdapter(sd_model, text_encode=encode, model_id=model_id)
        info = self.checkpoint_info(sd_model)
        # the host checkpoint's full sha256, for `ss_new_sd_model_hash` in the LoRA's metadata
        adapter.checkpoint_sha256 = getattr(info, "sha256", None) if info is not None else None
        return adapter

    @staticmethod
    def checkpoint_info(sd_model=None):
        """`sd_model.sd_checkpoint_info` of the loaded model (filename, name, hashes)."""
        if sd_model is None:
            sd_model = _webui()[0].sd_model
        return getattr(sd_model, "sd_checkpoint_info", None)

    def model_hash(self, sd_model) -> str:
        info = self.checkpoint_info(sd_model)
        if info is None:
            return "webui-unknown"
        return getattr(info, "sha256", None) or info.calculate_shorthash() or Path(info.filename).name

    @property
    def offload_idle(self) -> bool:
        """The setting "Keep the trained LoRA's weights on the CPU while it is not applied" (default on)."""
        shared, _ = _webui()
        return bool(shared.opts.data.get("lora_trainer_keep_on_cpu", True))

    def fill_config(self, config):
        """The run's config with what the WebUI knows: checkpoint path (-> `ss_sd_model_name`), architecture flags
        (-> `ss_v2`, `ss_base_model_version`), and the Lora folder as `output_dir` when none is set.

        Args:
            config (TrainConfig): the config from the UI or API.

        Returns:
            TrainConfig: a new config.
        """
        shared, _ = _webui()
        sd_model, info = shared.sd_model, self.checkpoint_info()
        model = config.model
        changes = {}
        if info is not None:
            changes["pretrained_model_name_or_path"] = str(info.filename)
        if sd_model is not None:
            sdxl = bool(getattr(sd_model, "is_sdxl", False))
            v2 = bool(getattr(sd_model, "is_sd2", False))
            v_pred = getattr(sd_model, "parameterization", "eps") == "v"
            changes.update(sdxl=sdxl, v2=v2, v_parameterization=v_pred)
        config = self.apply_settings(dataclasses.replace(config, model=dataclasses.replace(model, **changes)))
        if not config.save.output_dir:
            config = dataclasses.replace(config, save=dataclasses.replace(config.save, output_dir=str(self.lora_dir())))
        return config

    def apply_settings(self, config):
        """Fill the run's config from the WebUI settings of this extension (sample every N steps).

        Args:
            config (TrainConfig): the config.

        Returns:
            TrainConfig: a new config.
        """
        shared, _ = _webui()
        every = int(shared.opts.data.get("lora_trainer_sample_every_n_steps", 0) or 0)
        if every > 0 and not config.sample.sample_every_n_steps and not config.sample.sample_every_n_epochs:
            config = dataclasses.replace(config, sample=dataclasses.replace(config.sample,
                                                                           sample_every_n_steps=every))
        folder = shared.opts.data.get("lora_trainer_output_dir", "")
        if folder and not config.save.output_dir:
            config = dataclasses.replace(config, save=dataclasses.replace(config.save, output_dir=folder))
        return config

    def _refuse_low_vram(self, shared, sd_model) -> None:
        opts = shared.cmd_opts
        if getattr(opts, "medvram", False) or getattr(opts, "lowvram", False) or getattr(sd_model, "lowvram", False):
            raise ModelLoadError(
                "WebUI: started with --medvram/--lowvram, whose hooks move UNet parts between CPU and GPU during a "
                "forward pass; training cannot run through them. Restart the WebUI without --medvram/--lowvram "
                "(--medvram-sdxl only applies to SDXL), or train with `python -m lora_trainer train`."
            )

    def _verify_unet(self, sd_model, restored: list[str]) -> None:
        info = self.checkpoint_info(sd_model)
        if info is None or not str(info.filename).endswith(".safetensors"):
            logger.info("handshake 1: weight check skipped (checkpoint is not a .safetensors file)")
            return
        names = self.restored_unet_params(sd_model, restored)
        differ = compare_with_file(sd_model.model.diffusion_model, info.filename, UNET_PREFIX, names,
                                   limit=CHECK_EXTRA_TENSORS)
        if differ:
            raise ModelLoadError(
                f"{info.filename}: the loaded UNet differs from the file in {len(differ)} tensors (e.g. {differ[0]}) "
                "even after restoring merged LoRAs. Reload the checkpoint (Settings > Actions > Reload checkpoint) "
                "and start again."
            )
        logger.info("handshake 1: UNet equals %s (%d restored + %d sampled tensors checked)", info.filename,
                    len(names), CHECK_EXTRA_TENSORS)

    def check_compat(self, adapter, include_conv: bool = False, names=None):
        """The compatibility self-test on the loaded model (module names of all targets, or of `names`).

        Args:
            adapter: the model adapter.
            include_conv (bool, optional): include LoCon targets, defaults to False.
            names (iterable[str], optional): only these kohya module names (e.g. a saved file's), defaults to all.

        Returns:
            CompatReport | None: None when the Lora extension is not loaded.

        Raises:
            NetworkError: a name would be dropped or misplaced, or is not a target of the loaded model.
        """
        check = self.name_checker(adapter)
        if check is None:
            logger.warning("compatibility self-test skipped: the built-in Lora extension is not loaded")
            return None
        targets = {}
        for component in adapter.lora_targets(include_conv).values():
            targets.update(component)
        if names is not None:
            missing = [n for n in names if n not in targets]
            if missing:
                raise NetworkError(f"LoRA: {len(missing)} module names are not targets of the loaded model, e.g. "
                                   f"{missing[:3]}. Train it on this model, or load the model it was trained on.")
            targets = {n: targets[n] for n in names}
        report = check(targets)
        self.last_check = report
        if not report.ok:
            raise NetworkError(describe(report, "compatibility self-test"))
        logger.info("compatibility self-test: all %d module names map onto the loaded model", report.checked)
        return report

    def name_checker(self, adapter):
        """How this WebUI's Lora extension places kohya names: `{name: module} -> CompatReport`, or None without
        the extension (A1111: `network_layer_mapping` and the extension's own name conversion)."""
        networks = lora_extension()
        if networks is None:
            return None
        sd_model = adapter.model
        if not hasattr(sd_model, "network_layer_mapping"):
            networks.assign_network_names_to_compvis_modules(sd_model)
        return lambda targets: check_names(targets, networks, sd_model.network_layer_mapping)

    def take_off_prompt_loras(self, sd_model) -> list[str]:
        """Take LoRAs that generation merged into the weights off again (A1111: `restore_merged_loras`).

        Args:
            sd_model: `shared.sd_model`.

        Returns:
            list[str]: the layers or weight keys that were restored.
        """
        return restore_merged_loras(sd_model)

    def restored_unet_params(self, sd_model, restored: list[str]) -> list[str]:
        """UNet parameter names (relative to `diffusion_model`) of what `take_off_prompt_loras` restored."""
        return _unet_params_of(sd_model, restored)

    def check_file(self, path: str | Path):
        """Run the self-test on a saved LoRA file against the loaded model.

        Args:
            path (str | Path): the `.safetensors` file.

        Returns:
            CompatReport | None: the report (None without the Lora extension).
        """
        from safetensors import safe_open

        shared, _ = _webui()
        with safe_open(str(path), framework="pt") as handle:
            names = list(file_module_names(handle.keys()))
        return self.check_compat(self.adapter(shared.sd_model), include_conv=True, names=names)


class WebUIJobManager(JobManager):
    """A JobManager whose jobs get `A1111Host.fill_config` first (checkpoint name, architecture, settings)."""

    def start(self, config):
        return super().start(self.host.fill_config(config))
