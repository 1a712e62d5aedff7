"""Pausing a run between steps so the host can generate with its model, then going on as if nothing happened.

While paused: the training network is off the model (its forwards exactly the host's again), the model is in its
pre-training shape (modes, devices, checkpointing: `model_state.lent_out`), the host's job lets go of its
generation lock (`JobHandle.paused()`: the WebUI's queue lock, the standalone host's model lock), and a `Paused`
event carries a frozen copy of the network (`LiveLoRA`) for test renders. The run's own state is never touched:
optimizer, scheduler, network weights and data order stay as they are, and the global RNG streams (which any
generation draws from) are captured before and put back after, so the losses are those of a run that never paused.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from lora_trainer.errors import LoraTrainerError
from lora_trainer.progress import ProgressTracker
from lora_trainer.train.events import Paused, Resumed
from lora_trainer.train.model_state import lent_out
from lora_trainer.train.state import capture_rng, restore_rng

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2


def pause_here(trainer, step: int, epoch: int) -> None:
    """Wait here until the run is resumed or stopped, the model lent out to the host meanwhile.

    When the host cannot give the model back as it was (the WebUI loaded another checkpoint meanwhile), the run
    stops and saves what it trained so far; the reason is logged and carried on `Resumed.reason`.

    Args:
        trainer (Trainer): the run (its network applied, the model in `training_mode`).
        step (int): global steps done.
        epoch (int): current epoch, 1-based.
    """
    commands = trainer.commands
    if trainer.group.world_size > 1:
        logger.warning("pause: not available when several processes train together; training goes on")
        commands.resume()
        return
    rng = capture_rng({})
    network = trainer.network
    network.remove()
    reason = ""
    try:
        with lent_out(trainer.adapter, trainer.model_modes):
            _wait_lent_out(trainer, step, epoch)
    except LoraTrainerError as error:  # the model cannot be trained on any more; keep what was trained
        reason = str(error)
        logger.error("%s", reason)
        commands.request_stop(save=True)
    finally:
        network.apply()
        restore_rng(rng, {})
        trainer.tracker = ProgressTracker(trainer.plan.total_steps, done=step)  # it/s and ETA leave out the pause
    logger.info("resumed at step %d%s", step, "; stopping" if commands.stop_requested else "")
    trainer.events.emit(Resumed(step, commands.stop_requested, reason))


def _wait_lent_out(trainer, step: int, epoch: int) -> None:
    commands = trainer.commands
    with _host_pause(trainer.host_job) as watch:
        lora = paused_lora(trainer.network, trainer.adapter, trainer.config, trainer.ema)
        trainer.events.emit(Paused(step, epoch, lora))
        logger.info("paused after step %d; the model is free for generations until resumed", step)
        while commands.wait_while_paused(POLL_SECONDS):
            if watch.interrupted:
                logger.info("the host's Interrupt was pressed during the pause: stopping and saving")
                commands.request_stop(save=True)


def paused_lora(network, adapter, config, ema=None):
    """A frozen copy of `network` (same weights, own parameters) that test renders can apply at any strength
    without touching the training network's modes, multiplier or gradients.

    Args:
        network (LoRANetwork): the training network (removed from the model).
        adapter (ModelAdapter): the model it trains on.
        config (TrainConfig): the run's config (conv targets).
        ema (LoraEma, optional): the run's EMA; its weights at pause time render as "in memory (EMA)".

    Returns:
        LiveLoRA: the copy, bound to the same model modules.
    """
    from lora_trainer.networks import LoRANetwork, NetworkSettings
    from lora_trainer.train.live_lora import LiveLoRA

    include_conv = NetworkSettings.from_config(config.network).wants_conv
    with torch.no_grad():
        copy = LoRANetwork.from_kohya(adapter.lora_targets(include_conv), network.state_dict_kohya(torch.float32),
                                      strict=True)
    device = next((p.device for p in network.parameters()), None)
    if device is not None:
        copy.to(device=device)
    return LiveLoRA(copy, lambda adapter: adapter.lora_targets(include_conv), ema=ema)


class _NoWatch:
    """The pause of a host without a job system: nothing to let go of, no Interrupt."""

    interrupted = False


def _host_pause(handle):
    """The host job's `paused()` context (lock released, Interrupt watched), or nothing for a host without one."""
    paused = getattr(handle, "paused", None)
    return paused() if paused is not None else contextlib.nullcontext(_NoWatch())


__all__ = ["paused_lora", "pause_here"]
