"""Which folders HTTP requests may name while the WebUI is reachable from the network.

The WebUI's own rule (AUTOMATIC1111 `modules/shared_cmd_options.py`): it counts as exposed when started with
`--share`, `--listen`, `--ngrok` or `--server-name`, and then turns extension installs off unless
`--enable-insecure-extension-access` is given. Under the same condition every path a request names must resolve
(symlinks and `..` followed, `~` both ways) inside a folder the owner allowed: the WebUI's models, Lora and data
folders, the extension's output folder, and the folders of the setting `SETTING_KEY`. A refusal is a 403 that
names the setting and never the path or where it leads, so a caller cannot learn what exists outside. On a local
WebUI every path is allowed, as before.

Nothing here imports the WebUI: `a1111_tab.py` builds the policy from its options, tests build it directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from lora_trainer.host.api_body import RequestError

SETTING_KEY = "lora_trainer_api_folders"
SETTING_LABEL = "Extra folders API requests may use when the WebUI listens on the network (one per line)"
SETTING_PLACE = f'Settings > LoRA Trainer > "{SETTING_LABEL}"'
# config keys that name a file or folder the trainer reads or writes
CONFIG_PATH_KEYS = ("pretrained_model_name_or_path", "vae", "tokenizer_dir", "diffusers_config_dir",
                    "network_weights", "train_data_dir", "reg_data_dir", "output_dir", "resume", "sample_prompts",
                    "logging_dir")
# kohya keys that name files but are not read here; refused all the same so no request points outside
UNREAD_PATH_KEYS = ("dataset_config", "in_json", "output_config", "config_file")


class PathNotAllowedError(RequestError):
    """A path outside the allowed folders (HTTP 403)."""

    def __init__(self, message: str):
        super().__init__(message, status=403)


def is_exposed(cmd_opts: Any) -> bool:
    """The WebUI's rule for a server reachable from the network without extension access.

    Args:
        cmd_opts (Any): the WebUI's parsed command line (`shared.cmd_opts`), or any object with its attributes.

    Returns:
        bool: True when the WebUI disables extension access (exposed, and no
        `--enable-insecure-extension-access`).
    """
    disabled = getattr(cmd_opts, "disable_extension_access", None)
    if disabled is not None:  # set by the WebUI itself (v1.6 and later)
        return bool(disabled)
    exposed = any(getattr(cmd_opts, name, None) for name in ("share", "listen", "ngrok", "server_name"))
    return exposed and not getattr(cmd_opts, "enable_insecure_extension_access", False)


def split_folders(text: str | None) -> list[str]:
    """The folders of the setting: one per line (`;` also separates).

    Args:
        text (str, optional): the setting's value.

    Returns:
        list[str]: the non-empty entries.
    """
    entries = (text or "").replace(";", "\n").splitlines()
    return [entry.strip() for entry in entries if entry.strip()]


def _resolved(path: str) -> list[str]:
    """Where `path` leads: as written and with `~` expanded (code that reads it may do either)."""
    text = os.fspath(path)
    forms = {text, os.path.expanduser(text)}
    return [os.path.normcase(os.path.realpath(form)) for form in forms]


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives, or a mix of absolute and relative
        return False


@dataclass(frozen=True)
class FolderPolicy:
    """The folders requests may name.

    Attributes:
        restricted (bool): True when the WebUI is exposed (`is_exposed`); False allows every path.
        roots (tuple[str, ...]): the allowed folders, resolved (use `FolderPolicy.build`).
    """

    restricted: bool = False
    roots: tuple[str, ...] = ()

    @classmethod
    def build(cls, restricted: bool, roots: Iterable[str | os.PathLike | None]) -> FolderPolicy:
        """A policy over the given folders (empty entries skipped, each resolved once now).

        Args:
            restricted (bool): enforce the folders.
            roots (Iterable[str | PathLike | None]): allowed folders.

        Returns:
            FolderPolicy: the policy.
        """
        resolved = []
        for root in roots:
            if root is None or not str(root).strip():
                continue
            try:
                resolved.extend(_resolved(str(root).strip()))
            except (ValueError, OSError):  # a root that cannot be resolved allows nothing
                continue
        return cls(restricted=restricted, roots=tuple(dict.fromkeys(resolved)))

    def allows(self, path: str | os.PathLike) -> bool:
        """Whether a request may name `path`.

        Args:
            path (str | PathLike): the path as the request gives it (relative paths are relative to the WebUI's
                working folder, as the trainer reads them).

        Returns:
            bool: True when unrestricted, or when every form of the path lies inside an allowed folder.
        """
        if not self.restricted:
            return True
        try:
            forms = _resolved(os.fspath(path))
        except (ValueError, OSError, TypeError):  # NUL bytes, a loop, not a path
            return False
        return all(any(_inside(form, root) for root in self.roots) for form in forms)

    def check(self, key: str, path: str | os.PathLike) -> None:
        """Refuse a path outside the allowed folders.

        Args:
            key (str): the config key or request field, named in the message.
            path (str | PathLike): the path.

        Raises:
            PathNotAllowedError: (403) the message names `key` and the setting, not the path.
        """
        if not self.allows(path):
            raise PathNotAllowedError(
                f"{key}: this path is outside the folders API requests may use while the WebUI listens on the "
                "network (--listen, --share, --ngrok or --server-name without --enable-insecure-extension-access). "
                "Use a path inside the WebUI's models, Lora or data folder, or have the WebUI's owner add its "
                f"folder to {SETTING_PLACE}.")

    def check_config(self, config, raw: Mapping[str, Any] | None = None, where: str = "") -> None:
        """Refuse a config that names a path outside the allowed folders.

        Args:
            config (TrainConfig): the config a request asks for (from JSON or from a TOML file).
            raw (Mapping[str, Any], optional): the request's own keys, for kohya path keys the config does not
                keep (`UNREAD_PATH_KEYS`), defaults to None.
            where (str, optional): prefix for the key in messages, e.g. "toml: ", defaults to "".

        Raises:
            PathNotAllowedError: (403) naming the key.
        """
        if not self.restricted:
            return
        from lora_trainer.config import field_values

        values = field_values(config)
        for key in CONFIG_PATH_KEYS:
            if values.get(key):
                self.check(where + key, values[key])
        for key, value in _flat_items(raw or {}):
            if key in UNREAD_PATH_KEYS and isinstance(value, str) and value.strip():
                self.check(where + key, value)


def _flat_items(raw: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Top-level keys and those of kohya sections (`{"general": {...}}`), as the config reader flattens them."""
    items = []
    for key, value in raw.items():
        items.extend(value.items() if isinstance(value, Mapping) else [(key, value)])
    return items


__all__ = ["CONFIG_PATH_KEYS", "SETTING_KEY", "SETTING_LABEL", "FolderPolicy", "PathNotAllowedError",
           "is_exposed", "split_folders"]
