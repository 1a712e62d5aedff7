"""`python -m lora_trainer resize IN.safetensors --rank 4 | --dynamic sv_fro:0.9 --out OUT.safetensors`."""
from __future__ import annotations

from pathlib import Path

from lora_trainer.cli.merge import USER_ERRORS, print_report


def add_parser(sub) -> None:
    parser = sub.add_parser("resize", help="change a LoRA's rank (fixed or dynamic), keeping its strength")
    parser.add_argument("input", type=Path, help="the LoRA file (never modified)")
    parser.add_argument("--rank", type=int, default=None, help="new rank (with --dynamic: the cap)")
    parser.add_argument("--conv-rank", type=int, default=None, help="new rank of 3x3 conv modules")
    parser.add_argument("--dynamic", default=None, metavar="METHOD:VALUE",
                        help="sv_ratio:R, sv_fro:F or sv_cumulative:C")
    parser.add_argument("--precision", default=None, choices=["float", "fp16", "bf16"],
                        help="stored dtype (default: the input's)")
    parser.add_argument("--out", type=Path, required=True, help="the new .safetensors file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from lora_trainer.tools import read_lora
    from lora_trainer.tools.resize import resize_lora

    try:
        result = resize_lora(read_lora(args.input), args.out, args.rank, args.dynamic, args.conv_rank,
                             args.precision)
    except USER_ERRORS as error:
        print(f"error: {error}")
        return 2
    after = sorted({r for _, r in result.ranks.values()})
    print_report(result.report, args.json, {"written": str(result.path), "modules": len(result.ranks),
                                            "ranks": after})
    return 0
