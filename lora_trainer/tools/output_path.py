"""Checks on the file a checkpoint tool writes, made before any work starts (the LoRA tools' rules plus two that
matter for multi-GiB outputs: no silent replacement, and no output that is an input under another name)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .output import check_output as check_lora_output


def check_output(out: str | Path, inputs: Iterable[str | Path], overwrite: bool = False) -> Path:
    """Refuse an output that would overwrite an input, climb out of its folder or silently replace a file.

    Args:
        out (str | Path): the output `.safetensors` file.
        inputs (Iterable[str | Path]): the files the job reads (never modified).
        overwrite (bool, optional): allow replacing an existing output file, defaults to False.

    Returns:
        Path: the output path (its folder is created by the writer, once the job has started writing).

    Raises:
        ValueError: `..` in the path, not `.safetensors`, output equal to an input (also through a link), or an
            existing file without `overwrite`.
    """
    inputs = [Path(p) for p in inputs]
    path = check_lora_output(out, inputs)
    for source in inputs:
        if path.exists() and source.exists() and path.samefile(source):
            raise ValueError(f"{out}: the output is one of the inputs ({source}) under another name. Inputs are "
                             "never modified; choose another output name.")
    if path.is_dir():
        raise ValueError(f"{out}: is a folder. Give a file name.")
    if path.exists() and not overwrite:
        raise ValueError(f"{out}: the file exists. Choose another name or allow overwriting (--overwrite).")
    return path


__all__ = ["check_output"]
