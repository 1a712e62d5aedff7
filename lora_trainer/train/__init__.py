"""Training: the loop, optimizers, schedules, noise and loss weighting, events and commands, resume state, logs."""
from lora_trainer.train.events import (
    EventBus,
    Failed,
    Finished,
    Progress,
    Sample,
    Saved,
    Started,
    Step,
    TrainCommands,
)
from lora_trainer.train.job import JobManager, JobState, JobStatus, TrainingJob
from lora_trainer.train.live_lora import LiveLoRA
from lora_trainer.train.logs import (
    CsvLogger,
    JsonLinesLogger,
    TensorBoardLogger,
    build_log_subscribers,
)
from lora_trainer.train.loop import Trainer, TrainResult
from lora_trainer.train.loss import (
    LossOptions,
    compute_target,
    debiased_weight,
    diffusion_loss,
    min_snr_weight,
    snr,
)
from lora_trainer.train.noise import (
    add_noise,
    offset_noise,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
)
from lora_trainer.train.optimizers import (
    OPTIMIZER_TYPES,
    build_optimizer,
    current_lr,
    parse_optimizer_args,
)
from lora_trainer.train.preflight import (
    Preflight,
    check_before_model,
    clean_leftovers,
    describe_plan,
)
from lora_trainer.train.resources import (
    ResourceEstimate,
    check_resources,
    count_network_parameters,
)
from lora_trainer.train.schedulers import (
    SCHEDULERS,
    build_scheduler,
    resolve_warmup_steps,
)
from lora_trainer.train.state import (
    LoadedState,
    TrainState,
    check_state_folder,
    config_hash,
    load_state,
    save_state,
)

__all__ = [
    "OPTIMIZER_TYPES", "SCHEDULERS",
    "CsvLogger", "EventBus", "Failed", "Finished", "JobManager", "JobState", "JobStatus", "JsonLinesLogger",
    "LiveLoRA", "TrainingJob", "LoadedState", "LossOptions", "Preflight", "Progress", "ResourceEstimate",
    "Sample", "Saved", "Started", "Step", "TensorBoardLogger", "TrainCommands", "TrainResult", "TrainState",
    "Trainer",
    "add_noise", "build_log_subscribers", "build_optimizer", "build_scheduler", "check_before_model",
    "check_resources", "check_state_folder", "clean_leftovers", "compute_target", "config_hash",
    "count_network_parameters", "describe_plan",
    "current_lr", "debiased_weight", "diffusion_loss", "load_state", "min_snr_weight", "offset_noise",
    "parse_optimizer_args", "pyramid_noise", "resolve_warmup_steps", "sample_noise", "sample_timesteps",
    "save_state", "snr",
]
