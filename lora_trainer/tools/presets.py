"""Block-weight presets: the community's names and vectors, user preset files, and literal vectors.

A preset file holds `NAME:v1,v2,...` lines and `#` comments, the format of LoRA Block Weight's `lbwpresets.txt`
(which the WebUI's copy of that extension keeps in its `scripts/` folder). Lines whose values are not plain
numbers (the extension's random `R`/`U` and inherited `X` items) or whose length fits no layout are kept as
unusable with the reason, so that naming one gives a clear error while the rest of the file still loads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .blocks import LAYOUTS, BlockWeights, expand_vector, parse_vector

logger = logging.getLogger(__name__)

# LoRA Block Weight's built-in presets (17 values: the SD1/SD2 plain-LoRA layout).
BUILTIN_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1) + (0,) * 13,
    "IND": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10,
    "INALL": (1,) * 7 + (0,) * 10,
    "MIDD": (1, 0, 0, 0) + (1,) * 8 + (0,) * 5,
    "OUTD": (1,) + (0,) * 7 + (1, 1, 1, 1) + (0,) * 5,
    "OUTS": (1,) + (0,) * 11 + (1,) * 5,
    "OUTALL": (1,) + (0,) * 7 + (1,) * 9,
    "ALL0.5": (0.5,) * 17,
}
_LENGTHS = sorted({n for table in LAYOUTS.values() for n in table})
PRESET_FILE_NAME = "lbwpresets.txt"


@dataclass
class PresetBook:
    """Presets by name: built-in ones, then files read later override them.

    Attributes:
        presets (dict[str, tuple[float, ...]]): usable vectors by name.
        unusable (dict[str, str]): names from files whose line cannot be used, with the reason.
        sources (list[Path]): files read.
    """

    presets: dict = field(default_factory=lambda: dict(BUILTIN_PRESETS))
    unusable: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)

    def read_file(self, path) -> None:
        """Add the presets of a `NAME:v1,...` file (`#` comments; blank lines ignored).

        Args:
            path (str | Path): the file; a missing file raises FileNotFoundError.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: preset file not found. Check the path.")
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, vector = line.partition(":")
            name = name.strip()
            if not sep or not name:
                self.unusable[name or f"line {number}"] = f"{path}:{number}: not NAME:v1,v2,... ({line!r})"
                continue
            try:
                values = tuple(parse_vector(vector, f"{path}:{number} ({name})"))
            except ValueError as err:
                self.unusable[name] = str(err)
                continue
            if len(values) not in _LENGTHS:
                self.unusable[name] = (f"{path}:{number} ({name}): {len(values)} values; block-weight vectors have "
                                       f"{', '.join(map(str, _LENGTHS))} values")
                continue
            self.presets[name] = values
            self.unusable.pop(name, None)
        self.sources.append(path)

    def vector(self, name: str) -> tuple[float, ...]:
        """The values of a preset (exact name first, then case-insensitive).

        Raises:
            ValueError: unknown name, or a name whose line cannot be used (with the reason).
        """
        if name in self.presets:
            return self.presets[name]
        folded = {k.lower(): k for k in self.presets}
        if name.lower() in folded:
            return self.presets[folded[name.lower()]]
        if name in self.unusable:
            raise ValueError(f"preset {name}: {self.unusable[name]}. Fix that line of the preset file.")
        raise ValueError(f"preset {name!r}: unknown. Known presets: {', '.join(sorted(self.presets))}; or give "
                         "the values themselves, e.g. 1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0.")


def webui_preset_file(webui_dir) -> Path | None:
    """LoRA Block Weight's preset file inside a WebUI folder, when the extension is installed.

    Args:
        webui_dir (str | Path): the WebUI root (the folder holding `extensions/`).

    Returns:
        Path | None: `extensions/<lbw>/scripts/lbwpresets.txt`, or None.
    """
    extensions = Path(webui_dir) / "extensions"
    if not extensions.is_dir():
        return None
    for candidate in sorted(extensions.glob(f"*/scripts/{PRESET_FILE_NAME}")):
        return candidate
    return None


def load_presets(files=(), webui_dir=None) -> PresetBook:
    """Built-in presets, then the WebUI's LBW file (when it exists), then the given files (later files win).

    Args:
        files (Iterable[str | Path], optional): user preset files.
        webui_dir (str | Path, optional): a WebUI root to look for LoRA Block Weight's file in.

    Returns:
        PresetBook: the presets.
    """
    book = PresetBook()
    lbw_file = webui_preset_file(webui_dir) if webui_dir else None
    if lbw_file is not None:
        book.read_file(lbw_file)
    for path in files:
        book.read_file(path)
    return book


def resolve_weights(spec: str, architecture: str, book: PresetBook | None = None) -> BlockWeights:
    """Turn a preset name or a literal vector into block weights for an architecture.

    Args:
        spec (str): a preset name (`OUTD`) or values (`1,0,0.5,...`).
        architecture (str): the LoRA's architecture.
        book (PresetBook, optional): presets to look names up in, defaults to the built-in ones.

    Returns:
        BlockWeights: the vector expanded to every slot.

    Raises:
        ValueError: unknown name, non-number, or a length that does not fit the architecture.
    """
    spec = spec.strip()
    if "," in spec or _is_number(spec):
        return expand_vector(parse_vector(spec), architecture, "block weights")
    book = book or PresetBook()
    return expand_vector(book.vector(spec), architecture, f"preset {spec}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


__all__ = ["BUILTIN_PRESETS", "PRESET_FILE_NAME", "PresetBook", "load_presets", "resolve_weights",
           "webui_preset_file"]
