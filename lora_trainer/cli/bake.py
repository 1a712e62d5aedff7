"""`python -m lora_trainer bake CKPT.safetensors LORA.safetensors:0.8 [LORA2:RATIO ...] --out CKPT2.safetensors`:
merge LoRA files into a checkpoint's weights and write a new checkpoint (the input is never modified).

Exit status: 0 on success, 2 on bad input (nothing written).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lora_trainer.cli.ckpt_progress import run_job


def add_parser(sub) -> None:
    p = sub.add_parser("bake", help="bake LoRA files into a checkpoint (new file)",
                       description="Write a copy of CKPT with LoRA files merged into its weights, tensor by tensor.")
    p.add_argument("checkpoint", type=Path, help="single-file SD1/SD2/SDXL checkpoint (.safetensors or .ckpt)")
    p.add_argument("loras", nargs="+", metavar="LORA[:RATIO]", help="LoRA file and multiplier (default 1)")
    p.add_argument("--out", type=Path, required=True, help="the new checkpoint (.safetensors)")
    p.add_argument("--block-weights", metavar="V1,V2,...", help="LoRA Block Weight vector (12/17/20/26 values) "
                   "applied to every LoRA")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), help="store floats in this type (default: "
                   "as the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")


def run(args) -> int:
    from lora_trainer.tools.bake import bake_loras, parse_lora_spec
    from lora_trainer.tools.blocks import parse_vector

    def job(progress):
        specs = [parse_lora_spec(text) for text in args.loras]
        if args.block_weights:
            vector = tuple(parse_vector(args.block_weights, "--block-weights"))
            specs = [replace(spec, block_weights=vector) for spec in specs]
        return bake_loras(args.checkpoint, specs, args.out, precision=args.precision, overwrite=args.overwrite,
                          progress=progress)

    result, status = run_job(job, "bake")
    if result is not None:
        print(f"wrote {result.path}: {result.modules} LoRA modules baked into {result.weights_changed} "
              f"{result.architecture} weights in {result.seconds:.1f} s")
    return status
