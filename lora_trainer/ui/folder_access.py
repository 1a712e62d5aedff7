"""Which paths the panels may use: the host's folder rule (`host/folder_policy.py`), read at each action.

Standalone nothing is restricted. A WebUI that listens on the network without extension access passes its rule
in (`build_tab(..., folder_policy=...)`), and every panel action that takes a path checks it first, refusing with
the API's message (it names the setting, never the path or what lies outside).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Union

from lora_trainer.host.folder_policy import FolderPolicy

# A rule, or a function returning the rule now (the WebUI's settings can change while the page is open).
PolicySource = Union[FolderPolicy, Callable[[], FolderPolicy], None]
UNRESTRICTED = FolderPolicy()


def current_policy(source: PolicySource) -> FolderPolicy:
    """The rule in force now.

    Args:
        source (PolicySource): a FolderPolicy, a function returning one, or None (unrestricted).

    Returns:
        FolderPolicy: the rule.
    """
    if source is None:
        return UNRESTRICTED
    return source() if callable(source) else source


def check_path(source: PolicySource, key: str, path: str | os.PathLike | None) -> None:
    """Refuse a path the rule does not allow (an empty path is left to the action's own message).

    Args:
        source (PolicySource): the rule.
        key (str): the field, named in the message.
        path (str | PathLike, optional): the path as typed.

    Raises:
        PathNotAllowedError: the path lies outside the allowed folders.
    """
    if path is not None and str(path).strip():
        current_policy(source).check(key, str(path).strip())


def check_config(source: PolicySource, config, own_folders: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a training config naming a path outside the allowed folders.

    Args:
        source (PolicySource): the rule.
        config (TrainConfig): the run's config.
        own_folders (Iterable[str | PathLike], optional): folders the panel itself writes to (its prompt files),
            allowed besides the rule's.

    Raises:
        PathNotAllowedError: naming the config key.
    """
    policy = current_policy(source)
    if policy.restricted:
        FolderPolicy.build(True, [*policy.roots, *own_folders]).check_config(config)


__all__ = ["PolicySource", "check_config", "check_path", "current_policy"]
