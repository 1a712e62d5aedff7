"""Package names imported on first use, so that light entry points (the tag editor, the CLI) skip heavy imports."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package_globals: dict, table: dict[str, str]) -> Callable[[str], object]:
    """Make a module-level `__getattr__` that imports `name` from `table[name]` on first use and keeps it.

    Args:
        package_globals (dict): the package's `globals()`, where a loaded name is stored.
        table (dict[str, str]): public name -> module that defines it.

    Returns:
        Callable[[str], object]: the package's `__getattr__`.
    """

    def __getattr__(name: str):
        module_name = table.get(name)
        if module_name is None:
            raise AttributeError(f"module {package_globals['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        package_globals[name] = value
        return value

    return __getattr__
