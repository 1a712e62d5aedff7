"""Rendering inside the WebUI for the Test panel, the grid route and the X/Y/Z plot axes.

Images come from the WebUI's own `StableDiffusionProcessingTxt2Img` on `shared.sd_model` (its samplers, schedulers,
prompt syntax and VAE), nothing is saved to the outputs folder, no file is written or read and the model is not
reloaded. Our LoRA is merged into the weights (`networks.MergedWeights`: once per strength in a grid, per cell in
the X/Y/Z plot; the original weight tensors are put back afterwards), so both render the same pixels, and the same
as the WebUI's Lora extension with the saved file. Two WebUI details matter:
- the built-in Lora extension may have merged a LoRA into the weights; it is restored first (as the training
  handshake does) and again afterwards, and the model must hold the same weight tensors after the grid, none
  written (`WeightCheck`; with DEBUG logging also the same sha256);
- the WebUI caches prompt conditioning by prompt text, not by our modules, so the cache is emptied whenever the
  LoRA state changes (a text-encoder LoRA at another strength encodes the same prompt differently).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.grids.plan import Render, RenderSettings
from lora_trainer.host.a1111 import webui_shared
from lora_trainer.host.handshake import changed_weights, state_fingerprint, weight_identities

logger = logging.getLogger(__name__)

XYZ_STRENGTH = "LoRA Trainer: strength"
XYZ_SNAPSHOT = "LoRA Trainer: snapshot"
XYZ_WEIGHTS = "LoRA Trainer: module weights"
_P_STRENGTH, _P_SNAPSHOT = "lora_trainer_strength", "lora_trainer_snapshot"
_P_WEIGHTS = "lora_trainer_weights"


def invalidate_cond_cache(p=None) -> None:
    """Empty the WebUI's prompt-conditioning caches (first pass and hires), so the next render encodes anew.

    The caches are lists shared by reference: a processing object made before (an X/Y/Z plot copies one per cell)
    keeps the list it was given, so the lists are cleared in place, `p`'s own ones too.

    Args:
        p (StableDiffusionProcessing, optional): a processing object whose cache lists are cleared as well.
    """
    from modules import processing

    owners = [(processing.StableDiffusionProcessing, ("cached_c", "cached_uc")),
              (processing.StableDiffusionProcessingTxt2Img, ("cached_hr_c", "cached_hr_uc"))]
    if p is not None:
        owners.append((p, ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")))
    for owner, names in owners:
        for name in names:
            cache = getattr(owner, name, None)
            if isinstance(cache, list):
                cache[:] = [None] * len(cache)  # Forge's caches hold a third item


def sampler_names() -> list[str]:
    """The WebUI's visible sampler names (its txt2img dropdown)."""
    from modules import sd_samplers

    return list(sd_samplers.visible_sampler_names())


def check_sampler(name: str) -> None:
    """Refuse a sampler the WebUI does not know (it would silently fall back to its default).

    Args:
        name (str): a sampler name, optionally with a schedule type ("DPM++ 2M Karras").

    Raises:
        ConfigError: naming the known samplers.
    """
    from modules import sd_samplers, sd_schedulers

    known = set(sd_samplers.all_samplers_map)
    suffixes = {o for s in sd_schedulers.schedulers for o in (s.label, s.name, *(s.aliases or []))}
    if name in known or any(name == f"{sampler} {suffix}" for sampler in known for suffix in suffixes):
        return
    raise ConfigError(f"sampler_name: {name!r} is not a sampler of this WebUI. Use one of "
                      f"{', '.join(sampler_names())}.")


def webui_renderer(sd_model) -> Render:
    """A grid `render` through the WebUI's txt2img processing.

    Args:
        sd_model: `shared.sd_model`.

    Returns:
        Render: `(prompt, negative, seed, settings) -> PIL.Image`; the conditioning cache is emptied whenever
        `settings.lora_state` differs from the previous call's.
    """
    last_state = [None]

    def render(prompt: str, negative: str, seed: int, settings: RenderSettings):
        from modules import processing, scripts

        check_sampler(settings.sampler)
        if settings.lora_state != last_state[0]:
            invalidate_cond_cache()
            last_state[0] = settings.lora_state
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=sd_model, prompt=prompt, negative_prompt=negative, seed=int(seed), sampler_name=settings.sampler,
            steps=settings.steps, cfg_scale=settings.cfg_scale, width=settings.width, height=settings.height,
            batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True)
        p.scripts, p.script_args = scripts.ScriptRunner(), []  # no scripts run; reForge needs a runner, not None
        try:
            processed = processing.process_images(p)
        finally:
            p.close()
        return processed.images[0]

    return render


def _check_same_model(host, sd_model, config) -> None:
    trained = getattr(getattr(config, "model", None), "pretrained_model_name_or_path", None)
    info = host.checkpoint_info(sd_model)
    if not trained or info is None:
        return
    if Path(str(info.filename)).resolve() != Path(str(trained)).resolve():
        raise ModelLoadError(
            f"{Path(str(info.filename)).name}: the WebUI's model changed since training (the LoRA was trained on "
            f"{Path(str(trained)).name}). Load that checkpoint at the top of the page and test again, or use the "
            "saved file with <lora:NAME:S> in txt2img.")


@contextlib.contextmanager
def grid_session(host, config):
    """The loaded model and a WebUI renderer for one grid, inside a WebUI job (queue lock, progress, Interrupt).

    Args:
        host (A1111Host): the host.
        config (TrainConfig): the run whose LoRA is tested (its checkpoint must be the loaded one).

    Yields:
        tuple: `(adapter, render)`.

    Raises:
        ModelLoadError: no model, another model than the run's, or weights changed by the grid.
    """
    shared = webui_shared()
    with host.job("LoRA Trainer: test grid", 1):
        sd_model = shared.sd_model
        if sd_model is None:
            raise ModelLoadError("WebUI: no model is loaded. Pick a checkpoint at the top of the page first.")
        _check_same_model(host, sd_model, config)
        host.take_off_prompt_loras(sd_model)
        check = WeightCheck(sd_model)
        adapter = host.adapter(sd_model)
        invalidate_cond_cache()
        failed = True
        try:
            yield adapter, webui_renderer(sd_model)
            failed = False
        finally:
            invalidate_cond_cache()
            # a <lora:...> in the grid's prompt stays merged until the next generation: its backups are copied back
            restored = host.take_off_prompt_loras(sd_model)
            changed = check.changed(writes_expected=bool(restored))
        if changed and not failed:
            raise ModelLoadError("WebUI: the model's weights changed during the grid. Reload the checkpoint "
                                 "(Settings > Actions > Reload checkpoint) and report this with the console log.")


class WeightCheck:
    """That a grid gives the model back as it was: the same weight tensors, none written (`weight_identities`, free);
    with DEBUG logging also a sha256 of every weight before and after (seconds on a full-size model).

    Args:
        model (nn.Module): the model (or a module tree holding all of its weights).
    """

    def __init__(self, model):
        self.model = model
        self.identities = weight_identities(model)
        self.digest = state_fingerprint(model) if logger.isEnabledFor(logging.DEBUG) else None

    def changed(self, writes_expected: bool = False) -> bool:
        """Compare with the model now, log the outcome.

        Args:
            writes_expected (bool, optional): the host wrote its backups back into weights it had merged a prompt
                LoRA into, so only replaced tensors count (at DEBUG the sha256 compares the bytes), defaults to
                False.

        Returns:
            bool: True when a weight differs.
        """
        replaced = changed_weights(self.identities, weight_identities(self.model), writes_expected)
        differs = bool(replaced)
        if self.digest is not None:
            differs = differs or state_fingerprint(self.model) != self.digest
        if differs:
            logger.error("grid: the model's weights differ from before the grid%s",
                         f" (replaced or written: {replaced[:3]})" if replaced else "")
        elif self.digest is not None:
            logger.info("grid: the model is bit-identical to before the grid (sha256 %s)", self.digest[:16])
        else:
            logger.info("grid: the model holds the same weight tensors as before the grid, none written")
        return differs


class XyzAxes:
    """Our axes in the WebUI's X/Y/Z plot: the apply functions only mark the cell's processing object; the
    always-on script (`scripts/lora_trainer_tab.py`) merges the snapshot into the weights in `process` and puts the
    original weights back in `postprocess`, so a generation without our axes never has our LoRA on.

    Args:
        host (A1111Host): the host.
        service (GridService): the last run's snapshots.
    """

    def __init__(self, host, service):
        self.host, self.service = host, service
        self._current = None
        self._merged = None

    def register(self) -> bool:
        """Append our two axes to the X/Y/Z plot script's `axis_options` (once); call from `on_before_ui`.

        Returns:
            bool: False when the X/Y/Z plot script is not loaded.
        """
        from modules import scripts

        xyz = next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)
        if xyz is None:
            logger.warning("the X/Y/Z plot script is not loaded; our axes are not added")
            return False
        if any(option.label == XYZ_STRENGTH for option in xyz.axis_options):
            return True
        xyz.axis_options += [
            xyz.AxisOption(XYZ_STRENGTH, float, _marker(_P_STRENGTH)),
            xyz.AxisOption(XYZ_SNAPSHOT, str, _marker(_P_SNAPSHOT), confirm=self._confirm_snapshots,
                           choices=self.service.snapshot_labels),
            xyz.AxisOption(XYZ_WEIGHTS, str, _marker(_P_WEIGHTS), confirm=self._confirm_weights),
        ]
        logger.info("X/Y/Z plot: added the axes %r, %r and %r", XYZ_STRENGTH, XYZ_SNAPSHOT, XYZ_WEIGHTS)
        return True

    def _confirm_snapshots(self, _p, labels) -> None:
        self.service.snapshots(tuple(labels))  # raises naming the known snapshots

    def _confirm_weights(self, _p, values) -> None:
        from lora_trainer.grids.weights import weights_axis

        weights_axis(values, self.service.presets())  # raises naming an unknown preset or a bad vector

    def before(self, p) -> None:
        """Put the cell's snapshot on the model at the cell's strength (strength 1 and the in-memory LoRA, or the
        last file, by default); take ours off when the cell has none."""
        self.after(p)
        from lora_trainer.grids.weights import parse_weights, weigh_network

        strength, label = getattr(p, _P_STRENGTH, None), getattr(p, _P_SNAPSHOT, None)
        spec = getattr(p, _P_WEIGHTS, None)
        if strength is None and label is None and spec is None:
            return
        snapshot = self.service.snapshots((label,) if label else ())[-1]
        strength = 1.0 if strength is None else float(strength)
        weights = parse_weights(spec, self.service.presets()) if spec is not None else None
        self._current = snapshot
        if strength != 0:
            from lora_trainer.networks import MergedWeights

            adapter = self.host.adapter(webui_shared().sd_model)
            network = snapshot.bind(adapter)
            weigh_network(network, strength, weights, adapter.architecture)
            self._merged = MergedWeights(network)
            self._merged.merge()
        invalidate_cond_cache(p)
        p.extra_generation_params["LoRA Trainer"] = f"{snapshot.label} at {strength:g}" + (
            f", {weights.label}" if weights is not None else "")

    def after(self, p=None) -> None:
        """Take our LoRA off the model: its original weight tensors back (idempotent)."""
        if self._merged is not None:
            self._merged.restore()
            self._merged = None
        if self._current is not None:
            self._current.release()
            self._current = None
            self.service.release_memory()
            invalidate_cond_cache(p)


def _marker(attribute: str):
    def apply(p, value, _values):
        setattr(p, attribute, value)

    return apply


__all__ = ["XYZ_SNAPSHOT", "XYZ_STRENGTH", "XYZ_WEIGHTS", "WeightCheck", "XyzAxes", "check_sampler", "grid_session", "invalidate_cond_cache",
           "sampler_names", "webui_renderer"]
