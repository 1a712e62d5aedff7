"""`python -m lora_trainer inspect FILE [--json]`: architecture, algorithm, ranks, blocks, metadata, key check."""
from __future__ import annotations

import json
from pathlib import Path

from lora_trainer.cli.merge import USER_ERRORS


def add_parser(sub) -> None:
    parser = sub.add_parser("inspect", help="describe a LoRA file and check its keys against its architecture")
    parser.add_argument("file", type=Path, help="the LoRA file")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")


def run(args) -> int:
    from lora_trainer.tools.inspect_lora import inspect_lora, rank_summary

    try:
        report = inspect_lora(args.file)
    except USER_ERRORS as error:
        print(f"error: {error}")
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return 0 if report.keys_ok else 1
    print(f"{report.path}: {report.architecture} {report.algorithm}, {report.modules} modules "
          f"({report.unet_modules} UNet, {report.te_modules} text encoder, {report.conv_modules} 3x3 conv)")
    print(f"ranks: {rank_summary(report)}")
    alphas = sorted(set(report.alphas.values()), key=lambda a: a or 0)
    print("alphas: " + ", ".join(f"{a:g}" if a is not None else "none" for a in alphas))
    for slot, block in report.by_block.items():
        print(f"  {slot:9s} {block.modules:4d} modules  ranks {block.ranks}")
    for key, value in report.metadata.items():
        if key.startswith("ss_") or key.startswith("lora_trainer_"):
            print(f"  {key} = {value}")
    if report.dora_modules:
        print(f"DoRA modules: {len(report.dora_modules)}")
    if report.outside_kohya_targets:
        print(f"note: {len(report.outside_kohya_targets)} modules on layers kohya does not target, "
              f"e.g. {report.outside_kohya_targets[0]}")
    if report.unmatched:
        print(f"key check FAILED: {len(report.unmatched)} module names land on no {report.architecture} module "
              f"(the WebUI drops them), e.g. {report.unmatched[:3]}")
        return 1
    print(f"key check: all {report.modules} module names land on {report.architecture} modules")
    return 0
