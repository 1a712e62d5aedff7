"""The training loop: `Trainer(config, adapter, events, commands).run() -> TrainResult`.

It talks to the model only through the adapter, reports through events and reads stop requests between steps.
Preparation lives in `preparation.py`, model modes in `model_state.py`, saving in `checkpoints.py`/`state.py`.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.errors import OUT_OF_MEMORY_FIX, LoraTrainerError, TrainingError, describe_error, is_out_of_memory
from lora_trainer.progress import ProgressTracker
from lora_trainer.train import checkpoints
from lora_trainer.train.distributed import ProcessGroup, process_share
from lora_trainer.train.ema import LoraEma
from lora_trainer.train.events import (
    EventBus, Failed, Finished, Sample, Saved, Started, Step, TrainCommands, Validation,
)
from lora_trainer.train.logs import build_log_subscribers
from lora_trainer.train.loss import LossOptions, compute_target, diffusion_loss
from lora_trainer.train.model_state import Precision, training_mode
from lora_trainer.train.noise import add_noise, sample_noise, sample_timesteps
from lora_trainer.train.optimizers import build_optimizer, current_lr
from lora_trainer.train.pause import pause_here
from lora_trainer.train.preflight import Preflight, check_before_model, describe_plan
from lora_trainer.train.resources import check_resources
from lora_trainer.train.preparation import (
    TextSource, build_network, param_groups, plan_steps, prepare_data, seed_everything,
)
from lora_trainer.train.samples import Sampler
from lora_trainer.train.schedulers import build_scheduler
from lora_trainer.train.state import TrainState, capture_rng, config_hash, load_state, restore_rng, save_state
from lora_trainer.train.validation import Validator, split_validation

logger = logging.getLogger(__name__)

OOM_MESSAGE = f"training: ran out of memory. {OUT_OF_MEMORY_FIX}"


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        lora_path (str, optional): the last LoRA file written (None when stopped without saving).
        steps (int): optimizer steps done.
        epochs (int): epochs finished.
        stopped (bool): ended by a stop command.
        losses (list[float]): the loss of every step (of the resumed run's start too).
    """

    lora_path: str | None
    steps: int
    epochs: int
    stopped: bool
    losses: list[float] = field(default_factory=list)


@dataclass
class _Position:
    global_step: int = 0
    epoch: int = 0          # 0-based epoch the next step belongs to (= epochs finished)
    step_in_epoch: int = 0
    losses: list[float] = field(default_factory=list)


class Trainer:
    """Trains one LoRA on an adapter's model.

    Args:
        config (TrainConfig): the run's config.
        adapter (ModelAdapter): the model; left as it was found when `run` returns or raises.
        events (EventBus, optional): receives Progress/Started/Step/Sample/Saved/Finished/Failed.
        commands (TrainCommands, optional): stop / stop-and-save requests, read between steps.
        preflight (Preflight, optional): the result of `check_before_model` when the caller ran it before loading
            the model; run here otherwise.
        group (ProcessGroup, optional): the data-parallel processes training together (`train/distributed.py`);
            each trains on its share of every global batch and only the main one writes files, logs and samples.
            Defaults to this process alone.
        host_job (JobHandle, optional): the host's job; its `paused()` lends the model out while paused
            (`train/pause.py`), defaults to None (nothing to let go of).
    """

    def __init__(self, config, adapter, events: EventBus | None = None, commands: TrainCommands | None = None,
                 preflight: Preflight | None = None, group: ProcessGroup | None = None, host_job=None):
        self.config = config
        self.group = group or ProcessGroup()
        self.adapter = adapter
        self.events = events or EventBus()
        self.commands = commands or TrainCommands()
        self.preflight = preflight
        self.host_job = host_job
        self._last_saved: str | None = None
        self._validated_at: int | None = None

    def run(self) -> TrainResult:
        """Train. Errors are emitted as `Failed` and raised (`TrainingError` for NaN loss and out of memory).
        Log writers asked for by `config.logging` subscribe for the run.

        Returns:
            TrainResult: files, steps and losses.
        """
        log_writers: list = []
        try:
            if self.group.is_main:
                log_writers = build_log_subscribers(self.config.logging, self.config.save.output_name)
            for writer in log_writers:
                self.events.subscribe(writer)
            return self._run()
        except LoraTrainerError as error:
            self.events.emit(Failed(str(error)))
            raise
        except Exception as exc:  # reported to subscribers (a UI waits for an ending), then raised
            if is_out_of_memory(exc):
                error = TrainingError(OOM_MESSAGE)
                self.events.emit(Failed(str(error)))
                raise error from exc
            self.events.emit(Failed(describe_error(exc).message))
            raise
        finally:
            for writer in log_writers:
                self.events.unsubscribe(writer)

    # -- setup ---------------------------------------------------------------------------------------------------
    def _run(self) -> TrainResult:
        cfg = self.config
        checked = self.preflight or check_before_model(cfg, processes=self.group.world_size)
        self.folder = checked.output_dir
        resumed = load_state(cfg.save.resume) if cfg.save.resume else None
        seed = resumed.train_state.seed if resumed and resumed.train_state.seed is not None else cfg.training.seed
        self.seed = seed_everything(seed)
        self.started_at = time.time()
        check_resources(cfg, self.adapter, checked.plan, self.folder)
        self.network = build_network(cfg, self.adapter)
        train_te = bool(self.network.te_names())
        split = self._split(checked.index)
        with self.group.main_first():  # a disk latent cache is written once, then read by the others
            self.data = prepare_data(cfg, self.adapter, self.events, train_te, cancel=self.commands,
                                     index=split.train)
        self.validator = self._validator(split.held_out)
        self.data.dataset.processes = self.group.world_size
        self.text = TextSource(self.adapter, cfg.model, self.data.text_cache, train_te)
        with training_mode(self.adapter, train_te=train_te, gradient_checkpointing=cfg.model.gradient_checkpointing,
                           offload_vae=self.data.dataset.cache is not None,
                           offload_text_encoders=self.data.text_cache is not None) as self.model_modes:
            self.network.apply()
            self.network.train()
            try:
                return self._train(resumed)
            finally:
                self.network.remove()

    def _split(self, index):
        """The held-out images come out of the index before anything is cached or planned."""
        from lora_trainer.data.folders import scan_dataset

        t = self.config.training
        index = index if index is not None else scan_dataset(self.config.dataset)
        self.validation_seed = self.seed if t.validation_seed is None else t.validation_seed
        return split_validation(index, t.validation_split, self.validation_seed)

    def _validator(self, held_out) -> Validator:
        """The evaluator; its fixed captions join the text-encoder cache while the encoders are still loaded."""
        validator = Validator(self.config, self.adapter, held_out, self.validation_seed)
        if self.data.text_cache is not None and validator.captions:
            model = self.config.model
            self.data.text_cache.encode_all(
                validator.captions, lambda c: self.adapter.encode_captions(c, model.clip_skip, model.max_token_length))
        return validator

    def _train(self, resumed) -> TrainResult:
        cfg, opt, t = self.config, self.config.optimizer, self.config.training
        self.optimizer = build_optimizer(opt.optimizer_type, param_groups(cfg, self.network), opt.learning_rate,
                                         list(opt.optimizer_args))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema = LoraEma.from_config(cfg, self.network, self.params, self.adapter.device)
        self.plan = plan_steps(self.data.dataset.batches_per_epoch(), opt.gradient_accumulation_steps,
                               t.max_train_steps, t.max_train_epochs)
        self.scheduler = build_scheduler(opt.lr_scheduler, self.optimizer, self.plan.total_steps, opt.lr_warmup_steps,
                                         opt.lr_scheduler_num_cycles, opt.lr_scheduler_power)
        self.precision = Precision(cfg.model.mixed_precision, self.adapter.device, self.adapter.dtype)
        if cfg.model.full_fp16 or cfg.model.full_bf16:
            logger.info("full_fp16/full_bf16: LoRA weights stay float32; autocast runs the model in %s",
                        cfg.model.mixed_precision)
        self.loss_options = LossOptions(self.adapter.prediction_type, t.min_snr_gamma, t.debiased_estimation_loss)
        self.sampler = Sampler(cfg, self.adapter, self.seed)
        position = self._resume(resumed) if resumed else _Position()
        return self._loop(position)

    def _resume(self, resumed) -> _Position:
        state = resumed.train_state
        if state.config_hash and state.config_hash != config_hash(self.config):
            logger.warning("resume: the config differs from the run that saved %s; continuing with the new one",
                           self.config.save.resume)
        try:
            self.network.load_state_dict(resumed.network)
            self.optimizer.load_state_dict(resumed.optimizer)
            self.scheduler.load_state_dict(resumed.scheduler)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainingError(
                f"resume: {self.config.save.resume} does not fit this run ({str(exc)[:300]}). Resume with the "
                "network and optimizer settings of the run that saved it, or start without resume."
            ) from exc
        if self.precision.scaler is not None and resumed.scaler:
            self.precision.scaler.load_state_dict(resumed.scaler)
        restore_rng(resumed.rng, {})
        if self.ema is not None:
            self.ema.load_state_dict(resumed.ema, str(self.config.save.resume))
        logger.info("resumed from %s at step %d (epoch %d)", self.config.save.resume, state.global_step,
                    state.epoch + 1)
        return _Position(state.global_step, state.epoch, self._step_in_epoch(state), list(state.losses))

    def _step_in_epoch(self, state: TrainState) -> int:
        """The saved position inside its epoch, in this run's steps: another process count or batch size plans
        the epoch in other steps, so the same fraction of the epoch is skipped."""
        now = self.plan.steps_per_epoch
        if not state.steps_per_epoch or state.steps_per_epoch == now:
            return state.step_in_epoch
        placed = min(now, round(state.step_in_epoch * now / state.steps_per_epoch))
        logger.info("resume: the state was saved by %d process(es) with %d steps per epoch; this run has %d "
                    "process(es) and %d steps per epoch, so it continues at step %d of epoch %d",
                    state.processes, state.steps_per_epoch, self.group.world_size, now, placed, state.epoch + 1)
        return placed

    # -- the loop --------------------------------------------------------------------------------------------------
    def _loop(self, pos: _Position) -> TrainResult:
        plan, t = self.plan, self.config.training
        note = describe_plan(plan, t.max_train_steps, t.max_train_epochs)
        if self.preflight is None or self.preflight.plan != plan:
            logger.info("%s", note)
        self.events.emit(Started(plan.total_steps, plan.total_epochs, pos.global_step, note))
        self.tracker = ProgressTracker(plan.total_steps, done=pos.global_step)
        while pos.global_step < plan.total_steps:
            for group in self._step_groups(pos.epoch, pos.step_in_epoch):
                if self.commands.pause_requested and pos.global_step < plan.total_steps:
                    pause_here(self, pos.global_step, pos.epoch + 1)
                if self.group.any(self.commands.stop_requested):
                    return self._stop(pos)
                if pos.global_step >= plan.total_steps:
                    break
                pos.losses.append(self._train_step(group, pos))
                pos.global_step += 1
                pos.step_in_epoch += 1
                self._after_step(pos)
            # every group ran (a break happens only at total_steps), or the run ended on the epoch's last step
            if pos.global_step < plan.total_steps or pos.step_in_epoch >= plan.steps_per_epoch:
                pos.epoch += 1
                pos.step_in_epoch = 0
                self._after_epoch(pos)
        return self._finish(pos)

    def _step_groups(self, epoch: int, skip: int) -> list[list[tuple[int, object]]]:
        """The epoch's batches, grouped per optimizer step; the first `skip` steps (already done) left out."""
        plans = list(enumerate(self.data.dataset.epoch_batches(epoch + 1, self.seed)))
        size = max(1, int(self.config.optimizer.gradient_accumulation_steps or 1))
        return [plans[i:i + size] for i in range(0, len(plans), size)][skip:]

    def _train_step(self, group: list[tuple[int, object]], pos: _Position) -> float:
        """One optimizer step over the micro-batches of `group` (gradient accumulation). Each process trains on
        its share of every global batch, its loss weighted by that share, so the summed gradients are those of the
        whole batch in one process."""
        shares = []
        for index, plan in group:
            share = process_share(len(plan.items), self.group.rank, self.group.world_size)
            loss = torch.zeros((), device=self.adapter.device)
            if share.stop > share.start:  # a global batch smaller than the process count leaves some idle
                batch = self.data.dataset.load_batch(plan, self.seed, pos.epoch + 1, index, share)
                with self.precision.autocast():
                    part = self._batch_loss(batch, self._noise_generator(pos.epoch + 1, index), share,
                                            len(plan.items))
                loss = part * ((share.stop - share.start) / len(plan.items))
                self.precision.backward(loss / len(group))
            shares.append(loss.detach().float())
        losses = self.group.sum_values(torch.stack(shares)).tolist()  # the one host sync of a step
        for value in losses:
            if not math.isfinite(value):
                raise self._nan_error(pos.global_step + 1, value)
        self.group.sum_gradients(self.params)
        self.precision.step(self.optimizer, self.params, self.config.optimizer.max_grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses)

    def _noise_generator(self, epoch: int, index: int) -> torch.Generator:
        """Noise and timesteps of a global batch follow (seed, epoch, batch): the same in any process count and
        after a resume."""
        return torch.Generator().manual_seed(random.Random(f"noise:{self.seed}:{epoch}:{index}").getrandbits(63))

    def _batch_loss(self, batch, generator: torch.Generator, share: slice, total: int) -> torch.Tensor:
        """The loss of this process's `share` of a global batch of `total` samples (noise drawn for all)."""
        t, device, ac = self.config.training, self.adapter.device, self.adapter.alphas_cumprod
        latents = batch.latents.to(device=device, dtype=torch.float32)
        whole = latents.new_empty((total, *latents.shape[1:]))
        mine = slice(share.start, share.start + len(latents))  # shorter than `share` when an image was unreadable
        noise = sample_noise(whole, generator, t.noise_offset, t.multires_noise_iterations,
                             t.multires_noise_discount)[mine]
        timesteps = sample_timesteps(total, t.min_timestep, t.max_timestep, generator, device)[mine]
        noisy = add_noise(latents, noise, timesteps, ac)
        cond = self.text(batch.captions)
        pred = self.adapter.predict(noisy, timesteps, cond, batch.size_cond.to(device))
        target = compute_target(latents, noise, timesteps, ac, self.adapter.prediction_type)
        return diffusion_loss(pred, target, timesteps, ac, self.loss_options, batch.loss_weights)

    def _nan_error(self, step: int, value: float) -> TrainingError:
        kept = f"the last saved file {self._last_saved} is kept" if self._last_saved else "nothing was saved"
        return TrainingError(
            f"step {step}: the loss is {value} (NaN/inf), so training stopped and {kept}. Lower learning_rate "
            f"(now {self.config.optimizer.learning_rate:g}), use mixed_precision = \"bf16\" or \"no\" instead of "
            "fp16, keep max_grad_norm at 1.0, and check the model with a plain generation."
        )

    # -- after steps and epochs ------------------------------------------------------------------------------------
    def _after_step(self, pos: _Position) -> None:
        if self.ema is not None:
            self.ema.after_step(pos.global_step)
        info = self.tracker.update()
        window = pos.losses[-self.plan.steps_per_epoch:]
        self.events.emit(Step(pos.global_step, self.plan.total_steps, pos.epoch + 1, pos.losses[-1],
                              sum(window) / len(window), current_lr(self.optimizer, self.scheduler),
                              info.rate_per_s, info.eta_s))
        every = self.config.save.save_every_n_steps
        if every and pos.global_step % every == 0 and pos.global_step < self.plan.total_steps:
            self._save(pos, checkpoints.checkpoint_stem(self.config.save.output_name, step=pos.global_step))
        if self.sampler.due(step=pos.global_step):
            self._sample(pos)
        if self.validator.due(step=pos.global_step):
            self._validate(pos)

    def _after_epoch(self, pos: _Position) -> None:
        save, name, every = self.config.save, self.config.save.output_name, self.config.save.save_every_n_epochs
        if every and pos.epoch % every == 0 and pos.epoch < self.plan.total_epochs:
            self._save(pos, checkpoints.checkpoint_stem(name, epoch=pos.epoch))
            if self.group.is_main:
                checkpoints.prune_old_epochs(self.folder, name, pos.epoch, every, save.save_last_n_epochs)
        if self.sampler.due(epoch=pos.epoch):
            self._sample(pos)
        if self.validator.due(epoch=pos.epoch):
            self._validate(pos)

    def _validate(self, pos: _Position) -> None:
        """Every process has the same weights, so the main one evaluates alone."""
        if self._validated_at == pos.global_step:  # a step and an epoch ending together validate once
            return
        self._validated_at = pos.global_step
        if self.group.is_main:
            result = self.validator.evaluate(self.network, self.text, self.precision, self.loss_options)
            logger.info("step %d: validation loss %.6f", pos.global_step, result.loss)
            self.events.emit(Validation(pos.global_step, pos.epoch, result.loss, result.per_concept))
        self.group.barrier()

    def _sample(self, pos: _Position) -> None:
        if self.group.is_main:
            images = self.sampler.render(self.network)
            self.events.emit(Sample(pos.global_step, images, self.sampler.image_infos()))
        self.group.barrier()

    def _save(self, pos: _Position, stem: str, final: bool = False) -> str:
        """Write the LoRA (and state) from the main process; every process has the same weights."""
        checkpoints.check_finite(self.network.state_dict(), pos.global_step)
        path = self.folder / f"{stem}.safetensors"
        if self.group.is_main:
            self._write(pos, path, stem, final)
        self.group.barrier()  # the file exists for every process once this returns
        self._last_saved = str(path)
        self.events.emit(Saved(str(path), pos.global_step, pos.epoch))
        return str(path)

    def _write(self, pos: _Position, path: Path, stem: str, final: bool) -> None:
        checkpoints.write_lora(path, self.network, self.config, self._metadata(pos, final), self.ema)
        if self.config.save.save_state:
            state = TrainState(pos.global_step, pos.epoch, pos.step_in_epoch, config_hash(self.config),
                               list(pos.losses), self.seed, self.plan.steps_per_epoch, self.group.world_size)
            save_state(self.folder / f"{stem}-state", state, self.network.state_dict(), self.optimizer,
                       self.scheduler, capture_rng({}), self.precision.scaler, self.ema)

    def _metadata(self, pos: _Position, final: bool) -> dict[str, str]:
        from lora_trainer.networks import TrainingFacts, build_metadata

        index, cfg = self.data.index, self.config
        facts = TrainingFacts(
            session_id=random.SystemRandom().randint(0, 2**31 - 1), training_started_at=self.started_at,
            training_finished_at=time.time() if final else None, epoch=pos.epoch, steps=pos.global_step,
            num_epochs=self.plan.total_epochs, max_train_steps=self.plan.total_steps,
            num_train_images=index.num_train_images, num_reg_images=index.num_reg_images,
            num_batches_per_epoch=self.plan.batches_per_epoch,
            total_batch_size=cfg.dataset.train_batch_size * max(1, cfg.optimizer.gradient_accumulation_steps)
            * self.group.world_size,
            sd_model_name=Path(cfg.model.pretrained_model_name_or_path or self.adapter.model_id).name,
            new_sd_model_hash=getattr(self.adapter, "checkpoint_sha256", None),
            dataset_dirs=index.dirs, reg_dataset_dirs=index.reg_dirs, tag_frequency=index.tag_frequency,
            bucket_info=self.data.dataset.bucket_info(), datasets=self.data.dataset.datasets_metadata(),
        )
        return build_metadata(cfg, facts, self.adapter.architecture)

    # -- endings ---------------------------------------------------------------------------------------------------
    def _finish(self, pos: _Position) -> TrainResult:
        path = self._save(pos, self.config.save.output_name, final=True)
        self.events.emit(Finished(path, False, pos.global_step))
        return TrainResult(path, pos.global_step, pos.epoch, False, list(pos.losses))

    def _stop(self, pos: _Position) -> TrainResult:
        wanted = self.group.any(self.commands.save_requested) and pos.global_step > 0
        path = self._save(pos, self.config.save.output_name, final=True) if wanted else None
        logger.info("stopped at step %d%s", pos.global_step, f"; saved {path}" if path else " without saving")
        self.events.emit(Finished(path, True, pos.global_step))
        return TrainResult(path, pos.global_step, pos.epoch, True, list(pos.losses))
