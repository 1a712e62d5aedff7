"""`python -m lora_trainer lbw IN.safetensors --weights OUTD|1,0,...|NAME --out OUT.safetensors`."""
from __future__ import annotations

import json
from pathlib import Path

from lora_trainer.cli.merge import USER_ERRORS, add_preset_options


def add_parser(sub) -> None:
    parser = sub.add_parser("lbw", help="bake LoRA Block Weight block weights into a new LoRA file")
    parser.add_argument("input", type=Path, help="the LoRA file (never modified)")
    parser.add_argument("--weights", required=True,
                        help="preset name (OUTD, ALL0.5, a name from a preset file) or 12/17/20/26 values")
    parser.add_argument("--out", type=Path, required=True, help="the new .safetensors file")
    add_preset_options(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from lora_trainer.tools import read_lora
    from lora_trainer.tools.block_weights import apply_block_weights
    from lora_trainer.tools.presets import load_presets, resolve_weights

    try:
        lora = read_lora(args.input)
        weights = resolve_weights(args.weights, lora.architecture, load_presets(args.presets, args.webui_dir))
        result = apply_block_weights(lora, weights, args.out)
    except USER_ERRORS as error:
        print(f"error: {error}")
        return 2
    summary = {"written": str(result.path), "architecture": lora.architecture, "vector": weights.text(),
               "blocks": {slot: {"modules": n, "weight": w} for slot, (n, w) in result.by_block.items()},
               "dropped_modules": len(result.dropped), "zero_filled_blocks_used": result.zero_filled_used}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"written: {result.path} ({lora.architecture}, vector {weights.text()})")
    for slot, (count, weight) in result.by_block.items():
        print(f"  {slot:9s} {count:4d} modules  x {weight:g}")
    if result.dropped:
        print(f"left out {len(result.dropped)} modules weighted 0")
    if result.zero_filled_used:
        print(f"note: blocks {', '.join(result.zero_filled_used)} are not in the {len(weights.given)}-value layout "
              "and got weight 0, as LoRA Block Weight does; give all slots to weight them")
    return 0
