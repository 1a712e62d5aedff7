"""`python -m lora_trainer <command> ...`: see `lora_trainer.cli.COMMANDS`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lora_trainer.cli import COMMANDS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description="LoRA trainer, tagger and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen command's module is imported; the others register a placeholder parser.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, module_name in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module_name).add_parser(sub)
        else:
            sub.add_parser(name, help=f"see `{name} --help`", add_help=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return importlib.import_module(COMMANDS[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
