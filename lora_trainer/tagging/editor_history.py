"""Undo/redo history of the tag editor: each step holds only the images it changed (old and new text + tags)."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_STEPS = 500


@dataclass(frozen=True)
class EditResult:
    """What one operation (or its undo/redo) did.

    Attributes:
        operation: e.g. ``"add_tags"``, ``"undo add_tags"``.
        scope: ``"selection"``, ``"all"`` or ``"image"``.
        in_scope: number of images the operation looked at.
        changed: indices of the images whose caption changed.
        skipped: indices left alone because their caption is not UTF-8 (locked).
    """

    operation: str
    scope: str
    in_scope: int
    changed: tuple[int, ...]
    skipped: tuple[int, ...] = ()

    @property
    def n_changed(self) -> int:
        return len(self.changed)


@dataclass(frozen=True)
class Edit:
    """One history step: per changed image its index, old and new caption text and tags."""

    operation: str
    scope: str
    in_scope: int
    indices: tuple[int, ...]
    old_text: tuple[str, ...]
    old_tags: tuple[tuple[str, ...], ...]
    new_text: tuple[str, ...]
    new_tags: tuple[tuple[str, ...], ...]
    skipped: tuple[int, ...] = ()

    def result(self, prefix: str = "") -> EditResult:
        """The `EditResult` of this step, its operation name prefixed (``"undo "``, ``"redo "``)."""
        return EditResult(prefix + self.operation, self.scope, self.in_scope, self.indices, self.skipped)


class History:
    """Undo and redo stacks; a new step clears redo; the oldest steps go beyond `max_steps`."""

    def __init__(self, max_steps: int = DEFAULT_MAX_STEPS):
        self.max_steps = max_steps
        self._undo: list[Edit] = []
        self._redo: list[Edit] = []

    def push(self, edit: Edit) -> None:
        self._undo.append(edit)
        if len(self._undo) > self.max_steps:
            del self._undo[: len(self._undo) - self.max_steps]
        self._redo.clear()

    def pop_undo(self) -> Edit | None:
        if not self._undo:
            return None
        edit = self._undo.pop()
        self._redo.append(edit)
        return edit

    def pop_redo(self) -> Edit | None:
        if not self._redo:
            return None
        edit = self._redo.pop()
        self._undo.append(edit)
        return edit

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def names(self) -> list[str]:
        return [e.operation for e in self._undo]
