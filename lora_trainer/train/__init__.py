"""Training: the loop, optimizers, schedules, noise and loss weighting, events and commands, resume state, logs,
and the checks before a run.

Names are imported on first use, so that an entry point can check a config (train.preflight) in a fraction of a
second, before torch and diffusers are imported.
"""

from lora_trainer.lazy import lazy_names

_LAZY = {
    "CsvLogger": "lora_trainer.train.logs",
    "EventBus": "lora_trainer.train.events",
    "Failed": "lora_trainer.train.events",
    "Finished": "lora_trainer.train.events",
    "JobManager": "lora_trainer.train.job",
    "JobState": "lora_trainer.train.job",
    "JobStatus": "lora_trainer.train.job",
    "JsonLinesLogger": "lora_trainer.train.logs",
    "LiveLoRA": "lora_trainer.train.live_lora",
    "LoadedState": "lora_trainer.train.state",
    "LossOptions": "lora_trainer.train.loss",
    "OPTIMIZER_TYPES": "lora_trainer.train.optimizers",
    "Preflight": "lora_trainer.train.preflight",
    "Progress": "lora_trainer.train.events",
    "ResourceEstimate": "lora_trainer.train.resources",
    "SCHEDULERS": "lora_trainer.train.schedulers",
    "Sample": "lora_trainer.train.events",
    "Saved": "lora_trainer.train.events",
    "Started": "lora_trainer.train.events",
    "Step": "lora_trainer.train.events",
    "TensorBoardLogger": "lora_trainer.train.logs",
    "TrainCommands": "lora_trainer.train.events",
    "TrainResult": "lora_trainer.train.loop",
    "TrainState": "lora_trainer.train.state",
    "Trainer": "lora_trainer.train.loop",
    "TrainingJob": "lora_trainer.train.job",
    "add_noise": "lora_trainer.train.noise",
    "build_log_subscribers": "lora_trainer.train.logs",
    "build_optimizer": "lora_trainer.train.optimizers",
    "build_scheduler": "lora_trainer.train.schedulers",
    "check_before_model": "lora_trainer.train.preflight",
    "check_resources": "lora_trainer.train.resources",
    "check_state_folder": "lora_trainer.train.state",
    "clean_leftovers": "lora_trainer.train.preflight",
    "compute_target": "lora_trainer.train.loss",
    "config_hash": "lora_trainer.train.state",
    "count_network_parameters": "lora_trainer.train.resources",
    "current_lr": "lora_trainer.train.optimizers",
    "debiased_weight": "lora_trainer.train.loss",
    "describe_plan": "lora_trainer.train.preflight",
    "diffusion_loss": "lora_trainer.train.loss",
    "load_state": "lora_trainer.train.state",
    "min_snr_weight": "lora_trainer.train.loss",
    "offset_noise": "lora_trainer.train.noise",
    "parse_optimizer_args": "lora_trainer.train.optimizers",
    "pyramid_noise": "lora_trainer.train.noise",
    "resolve_warmup_steps": "lora_trainer.train.schedulers",
    "sample_noise": "lora_trainer.train.noise",
    "sample_timesteps": "lora_trainer.train.noise",
    "save_state": "lora_trainer.train.state",
    "snr": "lora_trainer.train.loss",
}

__getattr__ = lazy_names(globals(), _LAZY)
__all__ = sorted(_LAZY)
