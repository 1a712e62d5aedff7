"""Which dataset images training would skip: the same safe check as the training scan (`data.images.verify_image`),
so the dataset report names them and leaves them out of its counts instead of counting them as normal images."""
from __future__ import annotations

import os
from collections.abc import Sequence

from lora_trainer.data.images import verify_image
from lora_trainer.errors import DatasetError


class ImageCheck:
    """Results of `verify_image` per image file, kept while the file's size and modification time stay the same."""

    def __init__(self):
        self._seen: dict[str, tuple[tuple[int, int], str | None]] = {}

    def problem(self, path: str | os.PathLike) -> str | None:
        """Why training would skip this image (the message names the file and the fix), or None when it is usable.

        Args:
            path (str | PathLike): the image file.

        Returns:
            str | None: the problem, or None.
        """
        key = os.fspath(path)
        try:
            st = os.stat(key)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError as err:
            return f"{key}: cannot be read ({err.strerror}). Check the file, or remove it from the dataset folder."
        cached = self._seen.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            verify_image(key)
            problem = None
        except DatasetError as err:
            problem = str(err)
        self._seen[key] = (stamp, problem)
        return problem

    def unusable(self, paths: Sequence[str | os.PathLike]) -> dict[int, str]:
        """The images training would skip, by position in `paths`.

        Args:
            paths (Sequence[str | PathLike]): image files.

        Returns:
            dict[int, str]: position -> problem, for the unusable ones only.
        """
        found = {}
        for i, path in enumerate(paths):
            problem = self.problem(path)
            if problem is not None:
                found[i] = problem
        return found
