"""Errors the user sees. Each message names the file or key, what is wrong, and how to fix it.

`describe_error(exc)` is the one rule every entry point (CLI, panels, job status) uses to show an error.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass


class LoraTrainerError(Exception):
    """Base of every error this package raises on bad input or state."""


class ConfigError(LoraTrainerError, ValueError):
    """A configuration key or value is wrong."""


class DatasetError(LoraTrainerError):
    """A dataset folder, image or caption cannot be used."""


class ModelLoadError(LoraTrainerError):
    """A checkpoint or model folder cannot be loaded."""


class NetworkError(LoraTrainerError):
    """A LoRA file or network setting does not fit."""


class TrainingError(LoraTrainerError):
    """Training cannot go on (NaN loss, out of memory, ...)."""


class TaggerError(LoraTrainerError):
    """A tagger model or image cannot be used."""


# -- one rule for every entry point ------------------------------------------------------------------------------------
# An *expected* failure (bad input, a missing or unwritable file, a full disk, too little memory) is shown as one
# message that names the file or key and the fix; anything else is a bug and keeps its traceback.

EXIT_FAILED = 1   # an expected failure: the message says what to fix
EXIT_CONFIG = 2   # a config or command-line value is wrong
EXIT_BUG = 70     # sysexits' EX_SOFTWARE: an internal error, shown with its traceback

BUG_NOTE = "This is a bug in lora_trainer, not a mistake in your input: please report it with the traceback above."

OUT_OF_MEMORY_FIX = (
    "Lower network_dim / conv_dim (the LoRA rank), train_batch_size or resolution, set gradient_checkpointing = "
    "true and cache_latents = true, or use mixed_precision = \"fp16\"/\"bf16\"."
)

_OS_FIXES = {
    errno.ENOENT: "Check the path.",
    errno.EACCES: "Fix its permissions, or choose a path you may use.",
    errno.EPERM: "Fix its permissions, or choose a path you may use.",
    errno.ENOTDIR: "A part of the path is a regular file, not a folder: choose a path below a folder.",
    errno.EISDIR: "It is a folder: give a file.",
    errno.ENOSPC: "Free disk space, or choose an output_dir on a disk with room.",
    errno.EDQUOT: "Free disk space (the disk quota is used up), or choose another folder.",
    errno.EROFS: "The file system is read-only: choose a writable folder.",
    errno.ENAMETOOLONG: "Use a shorter name or path.",
    errno.EEXIST: "Remove it, or choose another name.",
}
_OS_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class ErrorReport:
    """How an entry point shows an error.

    Attributes:
        message (str): one line for the user ("<file or key>: <what is wrong>. <how to fix>").
        expected (bool): a mistake in input or environment (no traceback); False for a bug (show the traceback
            and BUG_NOTE).
        exit_code (int): EXIT_CONFIG, EXIT_FAILED or EXIT_BUG.
    """

    message: str
    expected: bool
    exit_code: int


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch running out of GPU or CPU memory (without importing torch).

    Args:
        exc (BaseException): the error.

    Returns:
        bool: True for `torch.OutOfMemoryError` and the CPU allocator's "not enough memory" RuntimeError.
    """
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "out of memory" in text.lower())


def _raised_by_us(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return True  # never raised: built by our own code to be shown
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def _os_message(exc: OSError) -> str:
    if exc.errno is None or not exc.strerror:
        return str(exc).strip().strip("'\"")  # raised by our code with its own message
    where = exc.filename if exc.filename is not None else "file"
    fix = _OS_FIXES.get(exc.errno, "Check the path and its permissions.")
    return f"{where}: {exc.strerror.lower()}. {fix}"


def describe_error(exc: BaseException) -> ErrorReport:
    """Classify an error the way every entry point (CLI, panel, job status) shows it.

    Expected: our `LoraTrainerError`s, config `ValueError`s raised by this package, missing / unreadable /
    misplaced files, a full or read-only disk, and running out of memory. Anything else is a bug.

    Args:
        exc (BaseException): the error.

    Returns:
        ErrorReport: the message, whether it is expected, and the exit code.
    """
    raw = str(exc).strip()
    text = raw.strip("'\"")  # a KeyError's message comes quoted
    if isinstance(exc, ConfigError):
        return ErrorReport(text, True, EXIT_CONFIG)
    if isinstance(exc, LoraTrainerError):
        return ErrorReport(text or type(exc).__name__, True, EXIT_FAILED)
    if is_out_of_memory(exc):
        return ErrorReport(f"out of memory ({text.splitlines()[0][:200] if text else type(exc).__name__}). "
                           f"{OUT_OF_MEMORY_FIX}", True, EXIT_FAILED)
    if isinstance(exc, _OS_ERRORS) or (isinstance(exc, OSError) and exc.errno in _OS_FIXES):
        return ErrorReport(_os_message(exc), True, EXIT_FAILED)
    if isinstance(exc, ValueError) and text and _raised_by_us(exc):
        return ErrorReport(text, True, EXIT_CONFIG)
    name = type(exc).__name__
    return ErrorReport(f"internal error: {name}: {raw}" if raw else f"internal error: {name}", False, EXIT_BUG)
