"""Checks on the file a checkpoint tool writes, made before any work starts."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def check_output(out: str | Path, inputs: Iterable[str | Path], overwrite: bool = False,
                 suffix: str = ".safetensors") -> Path:
    """Refuse an output that would overwrite an input, climb out of its folder or silently replace a file.

    Args:
        out (str | Path): the output file.
        inputs (Iterable[str | Path]): the files the job reads (never modified).
        overwrite (bool, optional): allow replacing an existing output file, defaults to False.
        suffix (str, optional): the required suffix, defaults to ".safetensors".

    Returns:
        Path: the output path (its folder is created by the writer, once the job has started writing).

    Raises:
        ValueError: `..` in the path, wrong suffix, output equal to an input, or an existing file without
            `overwrite`.
    """
    path = Path(out)
    if ".." in path.parts:
        raise ValueError(f"{out}: '..' in an output name is not allowed. Give a name or a path without '..'.")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{out}: the output must be a {suffix} file. Change the name to end in {suffix}.")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise ValueError(f"{out}: the output is also an input ({source}); inputs are never modified. Choose "
                             "another output name.")
    if path.exists() and not overwrite:
        raise ValueError(f"{out}: the file exists. Choose another name or allow overwriting (--overwrite).")
    if path.is_dir():
        raise ValueError(f"{out}: is a folder. Give a file name.")
    return path


__all__ = ["check_output"]
