"""`python -m lora_trainer merge A.safetensors:0.7 B.safetensors:-0.4[:OUTD] --out M.safetensors [--rank N]`."""
from __future__ import annotations

import json
from pathlib import Path

from lora_trainer.errors import LoraTrainerError

USER_ERRORS = (LoraTrainerError, ValueError, FileNotFoundError, OSError)


def add_parser(sub) -> None:
    parser = sub.add_parser("merge", help="merge LoRAs exactly (rank concatenation) or to a rank by SVD")
    parser.add_argument("inputs", nargs="+", metavar="FILE[:RATIO[:WEIGHTS]]",
                        help="LoRA file, its ratio (default 1, negative subtracts) and optional block weights "
                             "(preset name or 12/17/20/26 values)")
    parser.add_argument("--out", type=Path, required=True, help="the merged .safetensors file")
    parser.add_argument("--rank", type=int, default=None, help="SVD merge to this rank (default: exact merge)")
    parser.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 conv modules (default: --rank)")
    parser.add_argument("--precision", default="float", choices=["float", "fp16", "bf16"], help="stored dtype")
    add_preset_options(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def add_preset_options(parser) -> None:
    parser.add_argument("--presets", type=Path, action="append", default=[], help="a NAME:v1,... preset file")
    parser.add_argument("--webui-dir", type=Path, default=None,
                        help="WebUI folder: its LoRA Block Weight preset file is read when present")


def split_input(spec: str) -> tuple[str, float, str | None]:
    """`path[:ratio[:weights]]` -> (path, ratio, weights); a path may itself contain ':' (drive letters)."""
    parts = spec.split(":")
    for i in range(1, len(parts)):
        try:
            ratio = float(parts[i])
        except ValueError:
            continue
        return ":".join(parts[:i]), ratio, ":".join(parts[i + 1:]) or None
    return spec, 1.0, None


def print_report(report, as_json: bool, extra: dict) -> None:
    summary = {**extra, **report.summary()}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for key, value in extra.items():
        print(f"{key}: {value}")
    print(f"retained (Frobenius) overall: {summary['retained_overall']:.6f}")
    print("retained by block: " + ", ".join(f"{slot} {share:.4f}" for slot, share in
                                            summary["retained_by_block"].items()))
    print(f"largest relative error: {summary['largest_relative_error']:.3e} ({summary['largest_error_module']})")


def run(args) -> int:
    from lora_trainer.tools import read_lora
    from lora_trainer.tools.merge import MergeInput, merge_loras
    from lora_trainer.tools.presets import load_presets, resolve_weights

    try:
        book = load_presets(args.presets, args.webui_dir)
        inputs = []
        for spec in args.inputs:
            path, ratio, weights = split_input(spec)
            lora = read_lora(path)
            vector = resolve_weights(weights, lora.architecture, book) if weights else None
            inputs.append(MergeInput(lora, ratio, vector))
        result = merge_loras(inputs, args.out, args.rank, args.conv_rank, args.precision)
    except USER_ERRORS as error:
        print(f"error: {error}")
        return 2
    ranks = sorted(set(result.ranks.values()))
    print_report(result.report, args.json, {"written": str(result.path), "mode": result.mode,
                                            "modules": len(result.ranks), "ranks": ranks})
    return 0
