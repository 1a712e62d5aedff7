"""Seconds per training step on the CPU with 1, 2, ... torch threads, beside the load average at the time.

On a machine whose cores are busy with other work, torch's default (one thread per core) can be many times slower
than one thread: its threads wait for each other at every operation while the scheduler hands their cores to
someone else. `train --threads auto` (the default) picks one thread when the load average says the cores are
busy; this prints what each choice costs here and now, and what `auto` would pick.

Each count trains the tiny SD1 model (64 px, rank 4, batch 2, latents cached) for a few steps through the real path
(config -> StandaloneHost -> Trainer) in this process; the counts take turns, round after round, so a change in
the machine's load hits them alike. Step times are the median of the per-step times after the first step.
Nothing here asserts a timing.

    python benchmarks/cpu_threads.py                   # 1 and every count up to the cores, 3 rounds of 4 steps
    python benchmarks/cpu_threads.py --threads 1,2 --rounds 5 --steps 6
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _config(root: Path, steps: int):
    from lora_trainer.config import config_from_dict
    from lora_trainer.testing.datasets import write_square_dataset
    from lora_trainer.testing.tiny_models import build_tiny_model

    tiny = build_tiny_model("sd1", root / "tiny")
    data = write_square_dataset(root / "data", folder="5_square", caption="square")
    return config_from_dict({
        "pretrained_model_name_or_path": str(tiny.checkpoint), "diffusers_config_dir": str(tiny.config_dir),
        "tokenizer_dir": str(tiny.tokenizer_dir), "train_data_dir": str(data), "output_dir": str(root / "out"),
        "resolution": "64,64", "network_dim": 4, "network_alpha": 2, "train_batch_size": 2,
        "max_train_steps": steps, "cache_latents": True, "seed": 1}).config


def _step_seconds(config, host, threads: int) -> float:
    import torch

    from lora_trainer.train import EventBus, Step, Trainer

    torch.set_num_threads(threads)
    marks: list[float] = []
    bus = EventBus()
    bus.subscribe(lambda event: marks.append(time.perf_counter()) if isinstance(event, Step) else None)
    Trainer(config, host.load(config), events=bus).run()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return statistics.median(steps) if steps else float("nan")


def main(argv: list[str] | None = None) -> int:
    from lora_trainer.__main__ import configure_logging
    from lora_trainer.cli.train import choose_cpu_threads

    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=",".join(str(n) for n in range(1, cores + 1)),
                        help="thread counts to compare, comma separated (default: 1 to the number of cores)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the counts (default: 3)")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (default: 4)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]
    configure_logging()
    from lora_trainer.host.standalone import StandaloneHost

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp), args.steps)
        host = StandaloneHost(Path(tmp) / "out", device="cpu")
        host.load(config)  # load once before timing
        times: dict[int, list[float]] = {n: [] for n in counts}
        loads = []
        for _ in range(args.rounds):
            for n in counts:
                loads.append(os.getloadavg()[0])
                times[n].append(_step_seconds(config, host, n))
    print(f"cores: {cores}; load average (1 min) during the runs: {min(loads):.1f} .. {max(loads):.1f}")
    print(f"{'threads':>7} {'s/step (median of rounds)':>26} {'rounds':>30}")
    best = min(statistics.median(v) for v in times.values())
    for n, values in times.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:.2f}" for v in values)
        print(f"{n:>7} {median:>20.2f} ({median / best:4.1f}x) {rounds:>30}")
    load_now = os.getloadavg()[0]
    print(f"train --threads auto would pick {choose_cpu_threads('auto', cores, load_now, environ={})} now "
          f"(load {load_now:.1f} on {cores} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
