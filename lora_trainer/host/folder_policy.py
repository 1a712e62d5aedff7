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
                    "network_weights", "train_data_dir", "reg_data_dir", "dataset_config", "output_dir", "resume",
                    "sample_prompts", "logging_dir")
# keys checked as the request writes them (kohya sections included), whether or not the config keeps them
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
        if values.get("dataset_config"):
            for folder in self._subset_folders(values["dataset_config"]):
                self.check(where + "dataset_config image_dir", folder)

    def _subset_folders(self, path: str) -> list[str]:
        """Where the subsets of a kohya dataset config lead: each `image_dir`, a relative one beside the file when
        it is an allowed folder there (as the reader finds it), else both beside the file and from the working
        folder. Existence is asked only inside allowed folders, so a refusal never says whether an outside folder
        is there; a file that cannot be read names no folder (the reader reports it)."""
        beside_file = os.path.dirname(os.path.abspath(path))
        forms = []
        for folder in _image_dirs(path):
            beside = os.path.join(beside_file, os.path.expanduser(folder))
            if os.path.isabs(folder) or (self.allows(beside) and os.path.isdir(beside)):
                forms.append(beside)
            else:
                forms += [beside, folder]
        return forms


def _image_dirs(path: str) -> list[str]:
    """The `image_dir` values of a kohya dataset config (TOML, or JSON as kohya also reads), as written."""
    import json
    import tomllib

    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
        data = json.loads(text) if str(path).lower().endswith(".json") else tomllib.loads(text)
    except (OSError, ValueError):
        return []
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(datasets, list):
        return []
    subsets = [subset for dataset in datasets if isinstance(dataset, dict)
               for subset in dataset.get("subsets") or [] if isinstance(subset, dict)]
    return [str(subset["image_dir"]) for subset in subsets if subset.get("image_dir")]


def _flat_items(raw: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Top-level keys and those of kohya sections (`{"general": {...}}`), as the config reader flattens them."""
    items = []
    for key, value in raw.items():
        items.extend(value.items() if isinstance(value, Mapping) else [(key, value)])
    return items


__all__ = ["CONFIG_PATH_KEYS", "SETTING_KEY", "SETTING_LABEL", "FolderPolicy", "PathNotAllowedError",
           "is_exposed", "split_folders"]
