"""`python -m lora_trainer train --config run.toml [--set key=value ...]`: train a LoRA on a checkpoint file.

Everything that needs no model is checked first (seconds), then the checkpoint loads; errors are raised to the
entry point (`lora_trainer.__main__`), which prints each one once.

Under `accelerate launch --multi_gpu --num_processes N` (or `torchrun --nproc_per_node N`) every process trains on
its share of each batch (train_batch_size is per process, as in kohya: a step takes N x train_batch_size images)
and only the first one prints, logs and writes files.

A single process pauses after its current step on SIGUSR1 (`kill -USR1 <pid>`) and goes on at the next one, with
the losses of a run that never paused; Ctrl+C stops and saves, also while paused.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from lora_trainer.cli.signal_relay import SignalRelay

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    parser = sub.add_parser("train", help="train a LoRA from a kohya-style TOML config")
    parser.add_argument("--config", type=Path, required=True, help="kohya-style TOML (flat or sectioned)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set network_dim=16 (repeatable)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--threads", default="auto", metavar="N|auto",
                        help="torch threads when training on the CPU (default: auto: one per idle core by the load "
                             "average, at least one; OMP_NUM_THREADS, when set, wins)")


def run(args) -> int:
    from lora_trainer.config import apply_overrides, load_toml

    loaded = load_toml(args.config)
    config = apply_overrides(loaded.config, args.overrides)
    report_config_keys(loaded)
    choose_cpu_threads(args.threads)  # a bad value is refused before anything loads
    return train(config, args.device, threads=args.threads)


def choose_cpu_threads(requested: str | int = "auto", cores: int | None = None, load: float | None = None,
                       environ=None) -> int | None:
    """How many torch threads CPU training gets. On a machine whose cores are busy, torch's default (one per core)
    ran 20x slower than one thread (benchmarks/cpu_threads.py prints the comparison), so `auto` takes only the
    cores the 1-minute load average leaves idle, and at least one.

    Args:
        requested (str | int, optional): a count, or "auto", defaults to "auto".
        cores (int, optional): usable cores, defaults to those this process may run on.
        load (float, optional): the load average, defaults to the system's 1-minute figure.
        environ (Mapping, optional): the environment, defaults to os.environ.

    Returns:
        int | None: the count, or None for "auto" when OMP_NUM_THREADS is set (torch already follows it).

    Raises:
        ValueError: `requested` is neither a positive count nor "auto".
    """
    text = str(requested).strip().lower()
    if text != "auto":
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"--threads: {requested!r} is not a thread count. Use a number such as 1, or auto.")
        return int(text)
    if (os.environ if environ is None else environ).get("OMP_NUM_THREADS"):
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load)))


def _set_cpu_threads(requested: str | int) -> None:
    import torch

    threads = choose_cpu_threads(requested)
    if threads is None:
        threads, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        why = f"--threads {requested}, load average {load:.1f}"
    log.info("CPU training on %d thread%s (%s)", threads, "s" * (threads > 1), why)


def report_config_keys(loaded) -> None:
    for key in loaded.unknown_keys:
        print(f"warning: unknown key '{key}' is not used (check its spelling)")
    for key, reason in loaded.ignored_keys.items():
        print(f"note: '{key}' is accepted but not used: {reason}")
    for warning in loaded.warnings:
        print(f"warning: {warning}")


def train(config, device: str | None = None, extra_subscribers=(), threads: str | int = "auto") -> int:
    """Check what needs no model, load the checkpoint named by the config, train, and report. Ctrl+C stops and
    saves. Errors are raised (the entry point prints them once).

    Args:
        config (TrainConfig): the run's config.
        device (str, optional): "cuda", "cpu", ...; defaults to CUDA when available.
        extra_subscribers (Iterable[Callable], optional): more event subscribers.
        threads (str | int, optional): torch threads when training on the CPU, a count or "auto" (see
            `choose_cpu_threads`), defaults to "auto".

    Returns:
        int: 0.
    """
    from lora_trainer.train.distributed import launched, process_device
    from lora_trainer.train.preflight import check_before_model

    launch = launched()
    if launch is None:
        checked = check_before_model(config, device, loads_checkpoint=True)  # before torch and the model load
        return _train_checked(config, device, checked, extra_subscribers, threads=threads)
    return _train_in_group(config, process_device(device, launch), extra_subscribers)


def toggle_pause(commands) -> None:
    """The SIGUSR1 handler: pause after the current step, or go on when paused (or pausing).

    Args:
        commands (TrainCommands): the run's commands.
    """
    if commands.pause_requested:
        commands.resume()
    else:
        commands.pause()


def _train_in_group(config, device: str | None, extra_subscribers) -> int:
    """One of several launched processes: the main one checks the output folder first (its probe file), then the
    others; only the main one shows progress."""
    from lora_trainer.train.distributed import join_process_group
    from lora_trainer.train.preflight import check_before_model, check_device

    check_device(device)  # before joining: NCCL would fail on a device that is not there with a long error
    group = join_process_group(device)
    try:
        if not group.is_main:
            logging.getLogger("lora_trainer").setLevel(logging.WARNING)  # one copy of each info line
        with group.main_first():
            checked = check_before_model(config, device, loads_checkpoint=True, processes=group.world_size)
        return _train_checked(config, device, checked, extra_subscribers if group.is_main else (), group)
    finally:
        group.close()


def _train_checked(config, device: str | None, checked, extra_subscribers=(), group=None,
                   threads: str | int | None = None) -> int:
    from lora_trainer.cli.progress_bar import TrainingProgressBar
    from lora_trainer.host.standalone import StandaloneHost
    from lora_trainer.train import EventBus, Trainer, TrainCommands

    main = group is None or group.is_main

    # The standalone host's loader decides device and weight dtype, so the CLI and `ui` load a config alike.
    host = StandaloneHost(lora_dir=config.save.output_dir or "output", device=device)
    if host.device == "cpu" and threads is not None:  # one process alone on the machine's cores
        _set_cpu_threads(threads)
    adapter = host.load(config)
    bus = EventBus()
    if main:
        bus.subscribe(TrainingProgressBar())
    for subscriber in extra_subscribers:
        bus.subscribe(subscriber)
    saved: list[tuple[str, int]] = []
    validation: dict[int, float] = {}
    bus.subscribe(lambda event: _remember(event, saved, validation))
    commands = TrainCommands()
    relay = SignalRelay()  # the handlers must not set the commands' Events themselves (see signal_relay)
    previous = signal.signal(signal.SIGINT, relay.handler(lambda: commands.request_stop(save=True)))
    toggle = getattr(signal, "SIGUSR1", None) if group is None else None  # `kill -USR1 <pid>`: pause / go on
    previous_toggle = signal.signal(toggle, relay.handler(lambda: toggle_pause(commands))) \
        if toggle is not None else None
    try:
        result = Trainer(config, adapter, events=bus, commands=commands, preflight=checked, group=group).run()
    finally:
        signal.signal(signal.SIGINT, previous)
        if toggle is not None:
            signal.signal(toggle, previous_toggle)
        relay.close()
    if main:
        print(f"{'stopped' if result.stopped else 'finished'} after {result.steps} steps: {result.lora_path}")
        if validation:
            print(best_snapshot_line(saved, validation))
    return 0


def _remember(event, saved: list[tuple[str, int]], validation: dict[int, float]) -> None:
    from lora_trainer.train import Saved, Validation

    if isinstance(event, Saved):
        saved.append((event.path, event.step))
    elif isinstance(event, Validation):
        validation[event.step] = event.loss


def best_snapshot_line(saved: list[tuple[str, int]], validation: dict[int, float]) -> str:
    """The summary line naming the saved file with the lowest validation loss at its step.

    Args:
        saved (list[tuple[str, int]]): (file, step) of every file the run wrote.
        validation (dict[int, float]): validation loss per step.

    Returns:
        str: "best snapshot: FILE (validation loss 0.1234 at step 8)", or the lowest loss's step when no file was
        saved at a validated step.
    """
    from lora_trainer.grids.best_snapshot import best_snapshot, rank_snapshots

    best = best_snapshot(rank_snapshots(saved, validation))
    if best is not None:
        return f"best snapshot: {best.label} (validation loss {best.loss:.4f} at step {best.step})"
    step, loss = min(validation.items(), key=lambda item: item[1])
    return f"lowest validation loss {loss:.4f} at step {step}; no file was saved at a validated step"

