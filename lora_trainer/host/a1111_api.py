"""HTTP routes of the WebUI extension: start / stop / status of a training job, so the whole flow runs without a
browser. Registered on the WebUI's FastAPI app (`on_app_started`); nothing here imports the WebUI.

- `POST /lora_trainer/v1/train/start`: `{"config": {kohya keys...}}` or `{"toml": "path/to/config.toml"}`, plus an
  optional `"overrides": {...}` applied on top. Returns the job status; 400 with the message for a bad config or a
  job already running.
- `POST /lora_trainer/v1/train/stop`: `{"save": true|false}` (default true).
- `GET /lora_trainer/v1/train/status`: the status of the current or last job (`JobStatus` fields, `state` as text),
  plus `compat` (the self-test of the saved file against the loaded model, once the job has ended).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from lora_trainer.errors import LoraTrainerError

logger = logging.getLogger(__name__)

PREFIX = "/lora_trainer/v1/train"


def status_dict(status) -> dict[str, Any]:
    """A JobStatus as JSON-ready dict (`state` as its text value).

    Args:
        status (JobStatus): the snapshot.

    Returns:
        dict[str, Any]: its fields.
    """
    data = dataclasses.asdict(status)
    data["state"] = getattr(status.state, "value", str(status.state))
    return data


def config_from_request(body: dict[str, Any]):
    """The TrainConfig a start request asks for.

    Args:
        body (dict): `{"config": {...}}` or `{"toml": path}`, optional `"overrides"`.

    Returns:
        LoadedConfig: config, unknown and ignored keys, warnings.

    Raises:
        ValueError: neither or both of `config` and `toml` given.
    """
    from lora_trainer.config import config_from_dict, load_toml, update_config

    if ("config" in body) == ("toml" in body):
        raise ValueError('start request: give either "config" (kohya keys as JSON) or "toml" (a config file path).')
    loaded = load_toml(body["toml"]) if "toml" in body else config_from_dict(body["config"] or {})
    if body.get("overrides"):
        loaded = dataclasses.replace(loaded, config=update_config(loaded.config, body["overrides"]))
    return loaded


class TrainApi:
    """The three routes over a JobManager.

    Args:
        manager (JobManager): the WebUI's job manager (shared with the tab).
        check_file (callable, optional): `path -> CompatReport`, the self-test of a saved file, defaults to None.
    """

    def __init__(self, manager, check_file=None):
        self.manager = manager
        self.check_file = check_file
        self._checked: dict[str, dict] = {}

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        loaded = config_from_request(body)
        if loaded.unknown_keys:
            raise ValueError(f"config: unknown keys {sorted(loaded.unknown_keys)[:10]}. Remove or rename them "
                             "(kohya key names are expected).")
        job = self.manager.start(loaded.config)
        result = status_dict(job.status())
        result["warnings"] = list(loaded.warnings)
        return result

    def stop(self, body: dict[str, Any]) -> dict[str, Any]:
        stopped = self.manager.stop(bool(body.get("save", True)))
        return dict(status_dict(self.manager.status()), stop_requested=stopped)

    def status(self) -> dict[str, Any]:
        status = self.manager.status()
        data = status_dict(status)
        ended = data["state"] in ("finished", "stopped")
        if ended and status.lora_path and self.check_file is not None:
            data["compat"] = self._compat(status.lora_path)
        return data

    def _compat(self, path: str) -> dict:
        if path not in self._checked:
            try:
                report = self.check_file(path)
                self._checked[path] = {"ok": True, "checked": report.checked if report else 0}
            except (LoraTrainerError, OSError) as error:
                self._checked[path] = {"ok": False, "message": str(error)}
        return self._checked[path]

    def register(self, app) -> None:
        """Add the routes to a FastAPI app.

        Args:
            app (fastapi.FastAPI): the WebUI's app.
        """
        from fastapi import Body, HTTPException

        def guarded(fn, *args):
            try:
                return fn(*args)
            except (LoraTrainerError, ValueError, FileNotFoundError) as error:
                raise HTTPException(status_code=400, detail=str(error)) from error

        app.add_api_route(f"{PREFIX}/start", lambda body=Body(...): guarded(self.start, body), methods=["POST"])
        app.add_api_route(f"{PREFIX}/stop", lambda body=Body(default={}): guarded(self.stop, body), methods=["POST"])
        app.add_api_route(f"{PREFIX}/status", lambda: guarded(self.status), methods=["GET"])
        logger.info("API routes added under %s", PREFIX)
