"""Test grids on Forge: the LoRA in memory rendered through Forge's own txt2img processing.

The renderer is A1111's (`a1111_render.webui_renderer`: Forge keeps `modules.processing`, its samplers and prompt
syntax); what differs on Forge:
- the model is the engine's three module trees (`forge_objects_original`: UNet, text encoder(s), VAE), not one
  `nn.Module`, so the weight check (`a1111_render.WeightCheck`) is taken over those;
- prompt LoRAs Forge merged into the weights are taken out with Forge's own path (`forge.restore_merged_loras`)
  before the grid and again after it; the engine's LoRA hash is cleared, so each cell's processing builds
  `forge_objects_after_applying_lora` anew from the restored weights;
- our LoRA acts by bypass forwards on Forge's layers (its `Linear` is not `nn.Linear`; the training targets are
  the same objects), which `LoraLoader.refresh` leaves alone: it replaces Parameters, not modules or forwards;
- the setup and every render run on Forge's main-thread task queue, where its generation runs
  (`ForgeHost.run_job`), while the grid's thread holds the generation queue lock.
"""
from __future__ import annotations

import contextlib

from torch import nn

from lora_trainer.errors import ModelLoadError
from lora_trainer.host.a1111_render import WeightCheck, _check_same_model, invalidate_cond_cache, webui_renderer
from lora_trainer.host.forge import _forge, restore_merged_loras


def engine_modules(engine) -> nn.ModuleList:
    """UNet, text encoder(s) and VAE of a Forge engine, as one module tree (for fingerprints).

    Args:
        engine: the Forge engine (`shared.sd_model`).

    Returns:
        nn.ModuleList: the three module trees (not copies).
    """
    objects = engine.forge_objects_original
    return nn.ModuleList([objects.unet.model, objects.clip.cond_stage_model, objects.vae.first_stage_model])


@contextlib.contextmanager
def grid_session(host, config):
    """Forge's loaded model and a renderer through its txt2img, inside a job (queue lock, progress, Interrupt).

    Args:
        host (ForgeHost): the host.
        config (TrainConfig): the run whose LoRA is tested (its checkpoint must be the loaded one).

    Yields:
        tuple: `(adapter, render)`.

    Raises:
        ModelLoadError: no model, another model than the run's, or weights changed by the grid.
    """
    with host.job("LoRA Trainer: test grid", 1):
        engine = host.run_job(host.loaded_engine)
        _check_same_model(host, engine, config)
        tree = engine_modules(engine)

        def start():
            restore_merged_loras(engine, _forge()[1])
            invalidate_cond_cache()
            return WeightCheck(tree)

        check = host.run_job(start)
        adapter = host.adapter(engine)
        render = webui_renderer(engine)
        failed = True
        try:
            yield adapter, lambda *args, **kwargs: host.run_job(lambda: render(*args, **kwargs))
            failed = False
        finally:
            def finish():
                invalidate_cond_cache()
                # a <lora:...> in the grid's prompt is not left merged (Forge puts its backup tensors back)
                return check.changed(writes_expected=bool(restore_merged_loras(engine, _forge()[1])))

            changed = host.run_job(finish)
        if changed and not failed:
            raise ModelLoadError("Forge: the model's weights changed during the grid. Load the checkpoint again "
                                 "(pick another one and this one at the top of the page) and report this with the "
                                 "console log.")


__all__ = ["engine_modules", "grid_session"]
