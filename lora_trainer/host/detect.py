"""Which WebUI we run in, told by the packages it has (capabilities), never by version strings or git tags.

Forks keep the `modules` package of AUTOMATIC1111 and add their own beside it: lllyasviel's Forge has `backend`
(its own diffusion engines) and `modules_forge`; reForge has `modules_forge` over ComfyUI's `ldm_patched`; plain
A1111 has neither. `HOSTS` is the table, tried in order; adding a host is one `HostKind` line.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass

from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostKind:
    """One WebUI family and the packages that tell it apart.

    Attributes:
        name (str): the host's name ("forge", "a1111", ...).
        requires (tuple[str, ...]): modules the host has (all must be importable).
        lacks (tuple[str, ...]): modules the host does not have (none may be importable).
        factory (str): "module:Class" of its Host, imported only once it is chosen.
    """

    name: str
    requires: tuple[str, ...]
    lacks: tuple[str, ...]
    factory: str


HOSTS: tuple[HostKind, ...] = (
    HostKind("forge", ("modules", "modules_forge", "backend.diffusion_engine"), (),
             "lora_trainer.host.forge:ForgeHost"),
    HostKind("reforge", ("modules", "modules_forge", "ldm_patched"), ("backend.diffusion_engine",),
             "lora_trainer.host.reforge:ReForgeHost"),
    HostKind("a1111", ("modules", "modules.sd_models"), ("modules_forge",),
             "lora_trainer.host.a1111:A1111Host"),
)


def has_module(name: str) -> bool:
    """True when `name` is loaded or importable (a parent package missing counts as not importable).

    Args:
        name (str): a dotted module name.

    Returns:
        bool: whether the module exists in this process.
    """
    if sys.modules.get(name) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module loaded without a spec
        return False


def _missing(kind: HostKind) -> list[str]:
    """What keeps `kind` from matching: required modules absent, or modules it lacks present."""
    reasons = [f"no '{name}'" for name in kind.requires if not has_module(name)]
    reasons += [f"'{name}' present" for name in kind.lacks if has_module(name)]
    return reasons


def detect_host_kind(hosts: tuple[HostKind, ...] = HOSTS) -> HostKind:
    """The first host of the table whose capabilities this process has.

    Args:
        hosts (tuple[HostKind, ...], optional): the table, defaults to `HOSTS`.

    Returns:
        HostKind: the matching host.

    Raises:
        ModelLoadError: no host matches; the message says, for each known host, what is missing.
    """
    why_not = []
    for kind in hosts:
        missing = _missing(kind)
        if not missing:
            logger.info("host: %s (has %s)", kind.name, ", ".join(kind.requires))
            return kind
        why_not.append(f"{kind.name}: {', '.join(missing)}")
    raise ModelLoadError(
        "WebUI: this program is none of the WebUIs the extension knows (" + "; ".join(why_not) + "). "
        "Run the extension in AUTOMATIC1111's WebUI or Stable Diffusion WebUI Forge, or train with "
        "`python -m lora_trainer train`.")


def detect_host(hosts: tuple[HostKind, ...] = HOSTS, **kwargs):
    """The Host object for the WebUI this process runs in.

    Args:
        hosts (tuple[HostKind, ...], optional): the table, defaults to `HOSTS`.
        **kwargs: passed to the Host's constructor (e.g. `lora_dir`).

    Returns:
        Host: e.g. `A1111Host` or `ForgeHost`.

    Raises:
        ModelLoadError: an unknown host (see `detect_host_kind`).
    """
    module_name, class_name = detect_host_kind(hosts).factory.split(":")
    return getattr(importlib.import_module(module_name), class_name)(**kwargs)
