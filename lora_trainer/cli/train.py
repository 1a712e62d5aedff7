"""`python -m lora_trainer train --config run.toml [--set key=value ...]`: train a LoRA on a checkpoint file.

Everything that needs no model is checked first (seconds), then the checkpoint loads; errors are raised to the
entry point (`lora_trainer.__main__`), which prints each one once.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    parser = sub.add_parser("train", help="train a LoRA from a kohya-style TOML config")
    parser.add_argument("--config", type=Path, required=True, help="kohya-style TOML (flat or sectioned)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set network_dim=16 (repeatable)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


def run(args) -> int:
    from lora_trainer.config import apply_overrides, load_toml

    loaded = load_toml(args.config)
    config = apply_overrides(loaded.config, args.overrides)
    report_config_keys(loaded)
    return train(config, args.device)


def report_config_keys(loaded) -> None:
    for key in loaded.unknown_keys:
        print(f"warning: unknown key '{key}' is not used (check its spelling)")
    for key, reason in loaded.ignored_keys.items():
        print(f"note: '{key}' is accepted but not used: {reason}")
    for warning in loaded.warnings:
        print(f"warning: {warning}")


def train(config, device: str | None = None, extra_subscribers=()) -> int:
    """Check what needs no model, load the checkpoint named by the config, train, and report. Ctrl+C stops and
    saves. Errors are raised (the entry point prints them once).

    Args:
        config (TrainConfig): the run's config.
        device (str, optional): "cuda", "cpu", ...; defaults to CUDA when available.
        extra_subscribers (Iterable[Callable], optional): more event subscribers.

    Returns:
        int: 0.
    """
    from lora_trainer.train.preflight import check_before_model

    checked = check_before_model(config, device, loads_checkpoint=True)  # before torch and the model are loaded
    from lora_trainer.cli.progress_bar import TrainingProgressBar
    from lora_trainer.host.standalone import StandaloneHost
    from lora_trainer.train import EventBus, Trainer, TrainCommands

    # The standalone host's loader decides device and weight dtype, so the CLI and `ui` load a config alike.
    host = StandaloneHost(lora_dir=config.save.output_dir or "output", device=device)
    adapter = host.load(config)
    bus = EventBus()
    bus.subscribe(TrainingProgressBar())
    for subscriber in extra_subscribers:
        bus.subscribe(subscriber)
    commands = TrainCommands()
    previous = signal.signal(signal.SIGINT, lambda *_: commands.request_stop(save=True))
    try:
        result = Trainer(config, adapter, events=bus, commands=commands, preflight=checked).run()
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"{'stopped' if result.stopped else 'finished'} after {result.steps} steps: {result.lora_path}")
    return 0

