"""`python -m lora_trainer ckpt-merge A B [C] --mode sum|add-diff --alpha M | --block-alpha v1,...,v26 --out X`:
merge checkpoints tensor by tensor: weighted sum `A*(1-M) + B*M` or add difference `A + (B-C)*M`, with one M or
one per block (26 values for SD1/SD2, 20 for SDXL, BASE first, as SuperMerger's MBW).

Exit status: 0 on success, 2 on bad input (nothing written).
"""
from __future__ import annotations

from pathlib import Path

from lora_trainer.cli.ckpt_progress import run_job


def add_parser(sub) -> None:
    p = sub.add_parser("ckpt-merge", help="merge checkpoints (weighted sum / add difference, per-block alpha)",
                       description="Merge two (sum) or three (add-diff) checkpoints into a new file.")
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL", help="A B (sum) or A B C (add-diff)")
    p.add_argument("--out", type=Path, required=True, help="the merged checkpoint (.safetensors)")
    p.add_argument("--mode", choices=("sum", "add-diff"), default="sum", help="default: sum")
    alpha = p.add_mutually_exclusive_group()
    alpha.add_argument("--alpha", type=float, default=0.5, help="M for every weight (default: 0.5)")
    alpha.add_argument("--block-alpha", metavar="V1,...", help="one M per block: 26 values (SD1/SD2) or 20 (SDXL), "
                       "BASE (text encoders, VAE) first")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), help="store floats in this type (default: as A)")
    p.add_argument("--no-hash", action="store_true", help="do not record the inputs' sha256 in the metadata")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")


def run(args) -> int:
    from lora_trainer.tools.blocks import parse_vector
    from lora_trainer.tools.ckpt_merge import merge_checkpoints

    def job(progress):
        need = 3 if args.mode == "add-diff" else 2
        if len(args.models) != need:
            raise ValueError(f"MODEL: --mode {args.mode} takes {need} checkpoints, got {len(args.models)}.")
        block = parse_vector(args.block_alpha, "--block-alpha") if args.block_alpha else None
        c = args.models[2] if need == 3 else None
        return merge_checkpoints(args.models[0], args.models[1], args.out, c=c, mode=args.mode, alpha=args.alpha,
                                 block_alpha=block, precision=args.precision, overwrite=args.overwrite,
                                 hash_inputs=not args.no_hash, progress=progress)

    result, status = run_job(job, "merge")
    if result is not None:
        print(f"wrote {result.path}: {result.merged} tensors merged, {len(result.copied_from_a)} copied from A, "
              f"{len(result.copied_from_b)} from B, {len(result.left_out)} left out, in {result.seconds:.1f} s")
    return status
