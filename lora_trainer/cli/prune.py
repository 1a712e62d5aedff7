"""`python -m lora_trainer prune IN --out OUT [--precision fp16]`: drop EMA weights and training leftovers from a
checkpoint, keeping everything the WebUI and the trainer read; optionally store fp16/bf16.

Exit status: 0 on success, 2 on bad input (nothing written).
"""
from __future__ import annotations

from pathlib import Path

from lora_trainer.cli.ckpt_progress import run_job


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint (drop model_ema.*, save fp16/bf16)",
                       description="Write a pruned copy of a checkpoint.")
    p.add_argument("checkpoint", type=Path, help="the checkpoint (.safetensors or .ckpt)")
    p.add_argument("--out", type=Path, required=True, help="the pruned checkpoint (.safetensors)")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), help="store floats in this type (default: "
                   "keep)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")


def run(args) -> int:
    from lora_trainer.tools.prune import prune_checkpoint

    result, status = run_job(lambda progress: prune_checkpoint(args.checkpoint, args.out, precision=args.precision,
                                                               overwrite=args.overwrite), "prune")
    if result is not None:
        print(f"wrote {result.path}: {result.kept} tensors kept, {len(result.dropped)} dropped, "
              f"{result.size_in / 2**20:.1f} -> {result.size_out / 2**20:.1f} MiB")
    return status
