"""`python -m lora_trainer grid LORA... --checkpoint model.safetensors`: a strength x snapshot x seed grid of one
LoRA (or the epoch/step files of its run) on a checkpoint, saved beside the LoRA with its settings in the PNG text."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

from lora_trainer.errors import LoraTrainerError


def add_parser(sub) -> None:
    parser = sub.add_parser("grid", help="render a LoRA at several strengths, snapshots and seeds in one grid")
    parser.add_argument("loras", nargs="+", type=Path, help="LoRA file(s): each is one snapshot")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the base model (.safetensors or .ckpt)")
    parser.add_argument("--run-snapshots", action="store_true",
                        help="add every epoch/step file (and EMA file, <name>-ema) saved beside the first LoRA by "
                        "its run")
    parser.add_argument("--prompt", default=None, help="default: the LoRA's most frequent dataset tags")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--strengths", default="0, 0.2, 0.4, 0.6, 0.8, 1",
                        help='LoRA strengths, e.g. "0, 0.5, 1" or "0-1 [6]" (0 = the base model)')
    parser.add_argument("--seeds", default="1", help='noise seeds, e.g. "1, 2, 3"')
    parser.add_argument("--sampler", default="Euler a", help='e.g. "Euler", "Euler a", "DPM++ 2M Karras", "DDIM"')
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--clip-skip", type=int, default=1)
    parser.add_argument("--validation", type=Path, default=None, metavar="CSV",
                        help="the run's validation.csv (in its logging_dir): labels each snapshot with the "
                             "validation loss at its step and marks the lowest")
    parser.add_argument("--weights", action="append", default=[], metavar="VALUE",
                        help='a module-weights axis value (repeatable): "UNet + TE", "UNet only", a LoRA Block '
                             'Weight preset such as OUTD, or a vector "1,0,0,..."')
    parser.add_argument("--presets", action="append", default=[], type=Path, metavar="FILE",
                        help="block-weight preset files (NAME:v1,v2,... lines) for --weights")
    parser.add_argument("--layout", default=None,
                        help='axes for x,y,z, e.g. "strength,snapshot,seed" or "strength,weights,seed" '
                             '(default: strength across)')
    parser.add_argument("--max-cells", type=int, default=None, help="cell limit (default 64)")
    parser.add_argument("--yes", action="store_true", help="render even when over the cell limit")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <lora>-grid-NNNN.png beside it)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--config-dir", default=None, help="diffusers config folder (default: shipped configs)")
    parser.add_argument("--tokenizer-dir", default=None, help="CLIP tokenizer folder (default: built offline)")
    parser.add_argument("--v-parameterization", action="store_true", help="the checkpoint predicts v (SD2 768-v)")


def run(args) -> int:
    try:
        plan, files = _plan(args)
    except (LoraTrainerError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}")
        return 2
    try:
        return _render(args, plan, files)
    except (LoraTrainerError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1


def _plan(args):
    from lora_trainer.grids import (
        DEFAULT_CELL_LIMIT, FileSnapshot, GridSettings, RenderSettings, check_cell_limit, parse_numbers, plan_grid,
        prompt_from_metadata, run_snapshot_files, seed_axis, snapshot_axis, strength_axis,
    )
    from lora_trainer.grids import best_snapshot, lora_file_step, rank_snapshots, read_validation_csv, weights_axis
    from lora_trainer.tools.presets import load_presets
    from lora_trainer.models.sampling import resolve_sampler
    from lora_trainer.networks import load_lora

    files = list(args.loras)
    if args.run_snapshots:
        files = [f for f in run_snapshot_files(files[0]) if f not in files] + files
    snapshots = [FileSnapshot(path) for path in dict.fromkeys(files)]
    prompt = args.prompt if args.prompt is not None else prompt_from_metadata(load_lora(files[0])[1])
    if not prompt.strip():
        raise ValueError(f"--prompt: not given, and {files[0]} records no dataset tags. Give a prompt.")
    sampler = resolve_sampler(args.sampler).name
    render = RenderSettings(width=args.width, height=args.height, steps=args.steps, cfg_scale=args.cfg,
                            sampler=sampler, clip_skip=args.clip_skip)
    layout = tuple(p.strip() for p in args.layout.split(",")) if args.layout else None
    ranked = []
    if args.validation is not None:
        ranked = rank_snapshots([(s.label, lora_file_step(s.path)) for s in snapshots],
                                read_validation_csv(args.validation))
        if not any(r.loss is not None for r in ranked):
            print(f"note: {args.validation} has no validation loss at the step of any snapshot; none is marked")
    notes = [r.note() for r in ranked] or None
    weights = weights_axis(args.weights, load_presets(args.presets)) if args.weights else None
    plan = plan_grid(GridSettings(prompt, render, args.negative), strength_axis(parse_numbers(args.strengths,
                     "--strengths")), snapshot_axis(snapshots, notes),
                     seed_axis(parse_numbers(args.seeds, "--seeds", True)), layout, weights)
    plan.best_snapshot = best_snapshot(ranked)
    check_cell_limit(plan, args.max_cells or DEFAULT_CELL_LIMIT, confirmed=args.yes)
    return plan, [s.path for s in snapshots]


def _render(args, plan, files: list[Path]) -> int:
    import torch

    from lora_trainer.grids import adapter_renderer, estimate_grid, grid_path_beside, measure_speed, run_grid
    from lora_trainer.grids import save_grid_png
    from lora_trainer.models.loading import load_checkpoint_adapter

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = load_checkpoint_adapter(args.checkpoint, v_parameterization=args.v_parameterization,
                                      config_dir=args.config_dir, tokenizer_dir=args.tokenizer_dir, device=device,
                                      dtype=torch.float32 if device == "cpu" else torch.float16)
    render = adapter_renderer(adapter)
    estimate = estimate_grid(plan, measure_speed(render, plan.settings))
    print(f"grid: {estimate.describe()} (Ctrl+C stops after the current cell)")
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        result = run_grid(plan, adapter, render, cancel=cancel, on_cell=_print_cell)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.cancelled:
        print(f"cancelled after {len(result.cells)} of {len(plan.cells)} cells; nothing saved")
        return 1
    out = args.out or grid_path_beside(files[-1])
    data = {**plan.describe(), "lora": ", ".join(f.stem for f in files), "files": [f.name for f in files],
            "checkpoint": Path(args.checkpoint).name, "seconds": round(result.seconds, 2)}
    save_grid_png(result.image, out, data)
    print(f"grid: {out} ({result.image.width}x{result.image.height}, {result.seconds:.1f} s, "
          f"{result.seconds_per_render():.2f} s per image)")
    best = plan.best_snapshot
    if best is not None:
        print(f"grid: lowest validation loss: {best.label} ({best.loss:.4f} at step {best.step})")
    return 0


def _print_cell(cell_result, done: int, total: int) -> None:
    cell = cell_result.cell
    weights = f", {cell.weights.label}" if cell.weights is not None else ""
    print(f"  {done}/{total}: {cell.snapshot.label}, strength {cell.strength:g}{weights}, seed {cell.seed} "
          f"({cell_result.seconds:.2f} s)")
