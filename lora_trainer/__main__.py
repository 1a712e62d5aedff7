"""`python -m lora_trainer <command> ...`: see `lora_trainer.cli.COMMANDS`.

Every command's error goes through `lora_trainer.errors.describe_error`: an expected failure prints one
`error: <file or key>: <what is wrong>. <fix>` line on stderr (exit 1, or 2 for a config value); a bug prints its
traceback and a line saying it is a bug (exit 70).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from lora_trainer.cli import COMMANDS
from lora_trainer.errors import BUG_NOTE, describe_error

EXIT_INTERRUPTED = 130  # the shell's code for a program ended by Ctrl+C
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Libraries whose INFO lines are chatter for our users (one httpx line per browser request, gradio's start-up):
# shown from WARNING up, everything with --verbose.
CHATTY_LIBRARIES = ("httpx", "httpcore", "gradio", "gradio_client", "urllib3", "uvicorn.access", "asyncio",
                    "PIL", "matplotlib", "fsspec", "multipart", "python_multipart", "huggingface_hub",
                    "diffusers", "transformers", "onnxruntime")
# Warnings about nothing this program uses, printed by libraries on every run: (logger, text the message holds).
# bitsandbytes tries an optional 4-bit CPU kernel at import (diffusers imports it); we use only its 8-bit
# optimizers, which still work. diffusers warns about "modules kept in float32: []", an empty list.
NOISE = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
         ("diffusers.models.modeling_utils", "should be kept in float32: []"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description="LoRA trainer, tagger and tools.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every log line, libraries' included (before the command: -v ui)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen command's module is imported; the others register a placeholder parser.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, module_name in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module_name).add_parser(sub)
        else:
            sub.add_parser(name, help=f"see `{name} --help`", add_help=False)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except KeyboardInterrupt:  # Ctrl+C outside training (loading, scanning): no traceback for a wish to stop
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one place a command's error is shown: once, with a fix or as a bug
        return report_error(exc)


class _DropNoise(logging.Filter):
    """Drops the records of one logger whose message holds a given text."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def configure_logging(verbose: bool = False) -> None:
    """Our INFO lines, libraries from WARNING up and without known noise; `verbose`: every logger at DEBUG.

    Args:
        verbose (bool, optional): show everything (`-v`/`--verbose`), defaults to False.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    if verbose:
        # diffusers and transformers set their own level when first imported, from these variables
        for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
            os.environ.setdefault(variable, "info")
        return
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, text in NOISE:  # a logger's own filter sees every record it is given, whatever the handler
        logging.getLogger(name).addFilter(_DropNoise(text))


def report_error(exc: BaseException, stream=None) -> int:
    """Print an error as the CLI shows it.

    Args:
        exc (BaseException): the error.
        stream (file, optional): where to print, defaults to sys.stderr.

    Returns:
        int: the exit code.
    """
    stream = stream or sys.stderr
    report = describe_error(exc)
    if not report.expected:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
        print(f"error: {report.message}\n{BUG_NOTE}", file=stream)
    else:
        print(f"error: {report.message}", file=stream)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
