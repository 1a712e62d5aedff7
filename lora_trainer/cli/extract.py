"""`python -m lora_trainer extract TUNED.safetensors BASE.safetensors --dim 16 --out L.safetensors`: extract the
difference of two checkpoints as a LoRA (LoCon with --conv-dim) by SVD.

Exit status: 0 on success, 2 on bad input or identical checkpoints (nothing written).
"""
from __future__ import annotations

from pathlib import Path

from lora_trainer.cli.ckpt_progress import run_job


def add_parser(sub) -> None:
    p = sub.add_parser("extract", help="extract a LoRA from two checkpoints (tuned - base)",
                       description="SVD of TUNED - BASE per LoRA target, kohya names and metadata.")
    p.add_argument("tuned", type=Path, help="the fine-tuned checkpoint")
    p.add_argument("base", type=Path, help="the checkpoint it was tuned from")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--dim", type=int, default=4, help="rank of Linear / 1x1 layers (default: 4)")
    p.add_argument("--conv-dim", type=int, help="rank of 3x3 convs; adds the resnet layers (LoCon)")
    p.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp factors to this quantile (default: "
                   "0.99; 1 = no clamping)")
    p.add_argument("--min-diff", type=float, default=0.01, help="a text encoder differing by at most this is left "
                   "out (default: 0.01)")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16", help="default: fp16")
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda (default: cpu)")
    p.add_argument("--fast", action="store_true", help="randomized truncated SVDs: much faster at low rank, "
                   "near-optimal (the retained energy is printed)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")


def run(args) -> int:
    from lora_trainer.tools.extract import extract_lora

    def job(progress):
        return extract_lora(args.tuned, args.base, args.out, dim=args.dim, conv_dim=args.conv_dim,
                            clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, precision=args.precision,
                            overwrite=args.overwrite, device=args.device, fast=args.fast, progress=progress)

    result, status = run_job(job, "extract", unit="module")
    if result is not None:
        skipped = ", ".join(result.skipped_text_encoders) or "none"
        print(f"wrote {result.path}: {result.modules} {result.architecture} modules in {result.seconds:.1f} s "
              f"(text encoders left out as identical: {skipped}; identical UNet layers: "
              f"{len(result.identical_modules)}); energy retained per module: min {result.min_retained:.4f}, "
              f"mean {sum(result.retained_energy.values()) / max(1, len(result.retained_energy)):.4f}")
    return status
