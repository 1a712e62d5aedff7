"""Strength-grid speed: the LoRA in memory against the path users take today, beside a plain base-model render.

One process, one loaded model, a LoRA with random weights (every module trained: UNet and text encoder), a grid
of 6 strengths (0, 0.2, ..., 1) x 2 seeds, rendered four ways:
    base model      the same 12 renders with no LoRA at all (the reference time per image)
    in memory       `lora_trainer.grids.run_grid` with the network kept in memory: merged into the weights once per
                    strength (into buffers allocated at the first merge), both seeds rendered, the original weight
                    tensors put back; strength 0 renders the base model, once per seed
    in memory, bypass  the LoRA injected as extra forwards (how training and its previews apply it)
    file, bypass    save the LoRA once, then per strength load it by name (read + build the network) and render
                    both seeds with it injected, then take it off
    file, merged    as the WebUI's built-in Lora extension: save once, per strength load it by name, merge
                    `strength * delta` into the model's weights (backing them up) and render both seeds, restore

Each way runs --repeat times, the ways taking turns; the table shows the best total (the run least disturbed by
other work on the machine), the time per cell, the part of it spent rendering (the rest is merging or loading), and
per cell against the base model. On Linux CPUs the script runs itself again with a steady heap (`steady_heap.py`).
Compare rows of one invocation. Nothing here is asserted.

    python benchmarks/grid_speed.py                              # tiny SD1, 64 px, 20 steps (about a minute)
    python benchmarks/grid_speed.py --size 128 --steps 10 --dim 32
    python benchmarks/grid_speed.py --full --size 64 --steps 8 --repeat 1   # full-size SD1 with random weights
    python benchmarks/grid_speed.py --full --cache-dir /tmp/bench-cache     # where the full-size model is kept
    python benchmarks/grid_speed.py --checkpoint model.safetensors --size 512 --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.config import NetworkConfig  # noqa: E402
from lora_trainer.grids import (  # noqa: E402
    DEFAULT_STRENGTHS, GridSettings, LiveSnapshot, RenderSettings, adapter_renderer, plan_grid, run_grid, seed_axis,
    snapshot_axis, strength_axis,
)
from lora_trainer.models.loading import load_checkpoint_adapter  # noqa: E402
from lora_trainer.networks import LoRANetwork, load_lora  # noqa: E402
from lora_trainer.train import LiveLoRA  # noqa: E402
from steady_heap import use_steady_heap  # noqa: E402

SEEDS = (1, 2)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the tiny SD1 test model")
    parser.add_argument("--full", action="store_true",
                        help="a full-size SD1 checkpoint with random weights (built once in the cache folder)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="folder for the --full model, default: ~/.cache/lora_trainer/benchmarks")
    parser.add_argument("--config-dir", default=None)
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--dim", type=int, default=16, help="LoRA rank")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--merge-only", action="store_true", help="only time merging the LoRA (no renders)")
    parser.add_argument("--default-malloc", action="store_true", help="glibc's default heap (see steady_heap.py)")
    parser.add_argument("--ways", nargs="+", choices=list(SLUGS), default=list(SLUGS),
                        help="ways to render, default: all (base is always rendered: the reference)")
    return parser.parse_args()


def _adapter(args, work: Path):
    checkpoint, config_dir, tokenizer_dir = args.checkpoint, args.config_dir, args.tokenizer_dir
    if checkpoint is None and args.full:
        from lora_trainer.testing.random_models import build_random_model

        cache = args.cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_trainer" \
            / "benchmarks"
        checkpoint = build_random_model("sd1", cache / "full_sd1").checkpoint
    elif checkpoint is None:
        from lora_trainer.testing.tiny_models import build_tiny_model

        tiny = build_tiny_model("sd1", work / "tiny_sd1", seed=0)
        checkpoint, config_dir, tokenizer_dir = tiny.checkpoint, tiny.config_dir, tiny.tokenizer_dir
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    return load_checkpoint_adapter(checkpoint, config_dir=config_dir, tokenizer_dir=tokenizer_dir,
                                   device=args.device, dtype=dtype)


def _random_live_lora(adapter, dim: int) -> LiveLoRA:
    network = LoRANetwork.create(adapter.lora_targets(), NetworkConfig(network_dim=dim, network_alpha=dim))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return LiveLoRA(network, lambda a: a.lora_targets())


def _base(adapter, render, settings: GridSettings, live, work: Path) -> int:
    for _ in DEFAULT_STRENGTHS:
        for seed in SEEDS:
            render(settings.prompt, settings.negative_prompt, seed, settings.render)
    return len(DEFAULT_STRENGTHS) * len(SEEDS)


def _in_memory(adapter, render, settings: GridSettings, live, work: Path) -> int:
    plan = plan_grid(settings, strength_axis(DEFAULT_STRENGTHS), snapshot_axis([LiveSnapshot(live)]),
                     seed_axis(SEEDS))
    return len(run_grid(plan, adapter, render).cells)


def _in_memory_bypass(adapter, render, settings: GridSettings, live, work: Path) -> int:
    cells = 0
    before = live.multiplier
    for strength in DEFAULT_STRENGTHS:
        live.multiplier = strength
        live.apply(adapter)
        for seed in SEEDS:
            render(settings.prompt, settings.negative_prompt, seed, settings.render)
            cells += 1
        live.remove()
    live.multiplier = before
    return cells


def _load_by_name(adapter, path: Path) -> LoRANetwork:
    state_dict, _ = load_lora(path)
    return LoRANetwork.from_kohya(adapter.lora_targets(), state_dict).to(adapter.device)


def _file_bypass(adapter, render, settings: GridSettings, live, work: Path) -> int:
    path = live.save(work / "today.safetensors")
    cells = 0
    for strength in DEFAULT_STRENGTHS:
        network = _load_by_name(adapter, path)
        network.multiplier = strength
        network.apply()
        for seed in SEEDS:
            render(settings.prompt, settings.negative_prompt, seed, settings.render)
            cells += 1
        network.remove()
    return cells


@torch.no_grad()
def _file_merged(adapter, render, settings: GridSettings, live, work: Path) -> int:
    path = live.save(work / "today.safetensors")
    cells = 0
    for strength in DEFAULT_STRENGTHS:
        network = _load_by_name(adapter, path)
        backups = []
        for module in network.loras.values():
            weight = module.org_module.weight
            backups.append((weight, weight.detach().clone()))
            weight.add_((module.delta_weight() * strength).reshape(weight.shape).to(weight.dtype))
        for seed in SEEDS:
            render(settings.prompt, settings.negative_prompt, seed, settings.render)
            cells += 1
        for weight, backup in backups:
            weight.copy_(backup)
    return cells


WAYS = {"base model": _base, "in memory": _in_memory, "in memory, bypass": _in_memory_bypass,
        "file, bypass": _file_bypass, "file, merged": _file_merged}
SLUGS = dict(zip(("base", "memory", "memory-bypass", "file-bypass", "file-merged"), WAYS))


def _merge_seconds(live, adapter) -> tuple[float, float]:
    """Merging the LoRA into the weights at a new strength (and restoring them): the first merge of a grid (it
    allocates the merged weights) and the best of the later ones (they write into the same buffers)."""
    from lora_trainer.networks import MergedWeights

    merger = MergedWeights(live.bind(adapter))
    times = []
    for strength in (0.2, 0.4, 0.6, 0.8):
        live.network.multiplier = strength
        start = time.perf_counter()
        merger.merge()
        merger.restore()
        times.append(time.perf_counter() - start)
    merger.release()
    return times[0], min(times[1:])


def _print_merge(live, adapter) -> None:
    weights = sum(m.org_module.weight.numel() if hasattr(m.org_module, "weight") else 0
                  for m in live.network.loras.values())
    first, later = _merge_seconds(live, adapter)
    print(f"merge + restore per strength: first {first:.3f} s, later {later:.3f} s ({len(live.network.loras)} "
          f"modules, {weights / 1e6:.0f} M weights touched, merged copy {weights * 4 / 2**20:.0f} MiB float32)")


def _timed(render, spent: list[float]):
    def timed(*args):
        start = time.perf_counter()
        image = render(*args)
        spent[0] += time.perf_counter() - start
        return image

    return timed


def main() -> int:
    args = _arguments()
    heap = use_steady_heap(args.default_malloc, rerun=args.device == "cpu")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapter = _adapter(args, work)
        live = _random_live_lora(adapter, args.dim)
        spent = [0.0]  # seconds inside render calls
        render = _timed(adapter_renderer(adapter), spent)
        settings = GridSettings("square, red, blue background",
                                RenderSettings(width=args.size, height=args.size, steps=args.steps,
                                               sampler=args.sampler))
        if args.merge_only:
            _print_merge(live, adapter)
            return 0
        render(settings.prompt, "", 0, settings.render)  # warm-up
        chosen = {name: WAYS[name] for name in ["base model", *(SLUGS[slug] for slug in args.ways if slug != "base")]}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}  # (total, in render) seconds
        cells = {}
        for _ in range(args.repeat):
            for name, way in chosen.items():
                spent[0] = 0.0
                start = time.perf_counter()
                cells[name] = way(adapter, render, settings, live, work)
                runs[name].append((time.perf_counter() - start, spent[0]))
        _print_merge(live, adapter)
    _print_table(args, heap, runs, cells)
    return 0


def _print_table(args, heap: str, runs: dict[str, list[tuple[float, float]]], cells: dict[str, int]) -> None:
    print(f"grid {len(DEFAULT_STRENGTHS)} strengths x {len(SEEDS)} seeds, {args.size}x{args.size}, {args.steps} "
          f"steps, {args.sampler}, LoRA rank {args.dim}, {args.device}, {args.threads} thread(s), best of "
          f"{args.repeat}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, heap: {heap}")
    best = {name: min(times) for name, times in runs.items()}
    base_cell = best["base model"][0] / cells["base model"]
    in_memory = (best.get("in memory") or best["base model"])[0]
    print(f"{'way':<18} {'total s':>8} {'s/cell':>8} {'render s/cell':>13} {'cell/base':>9} {'vs in memory':>12}")
    for name, (total, rendering) in best.items():
        per_cell = total / cells[name]
        print(f"{name:<18} {total:8.2f} {per_cell:8.3f} {rendering / cells[name]:13.3f} {per_cell / base_cell:9.2f} "
              f"{total / in_memory:11.2f}x")


if __name__ == "__main__":
    sys.exit(main())
