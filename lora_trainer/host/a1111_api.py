"""HTTP routes of the WebUI extension: start / stop / status of a training job, so the whole flow runs without a
browser. Registered on the WebUI's FastAPI app (`on_app_started`); nothing here imports the WebUI.

- `POST /lora_trainer/v1/train/start`: `{"config": {kohya keys...}}` or `{"toml": "path/to/config.toml"}`, plus an
  optional `"overrides": {...}` applied on top. Returns the job status. 400 for a bad body or config (the message
  names the field or key), 403 for a path outside the allowed folders while the WebUI listens on the network
  (`folder_policy.py`), 409 while a job is running.
- `POST /lora_trainer/v1/train/stop`: `{"save": true|false}` (JSON booleans; default true).
- `POST /lora_trainer/v1/train/pause` and `/resume` (empty body): pause the running job after its current step
  (the WebUI's queue is free meanwhile: txt2img and the grid route run) and go on; the answer is the status plus
  `pause_requested` / `resume_requested` (false when no job could take it).
- `GET /lora_trainer/v1/train/status`: the status of the current or last job (`JobStatus.to_dict`), plus `compat`
  (the self-test of the saved file against the loaded model, once the job has ended). Always answers 200.
- `POST /lora_trainer/v1/test/grid`: `{"prompt", "negative_prompt", "strengths": [...], "seeds": [...],
  "snapshots": [...] (labels, optional), "steps", "cfg_scale", "sampler_name", "width", "height", "confirm",
  "weights": [...] (optional: "UNet + TE", "UNet only", block-weight presets or vectors)}` renders a strength x
  snapshot x seed (x weights) grid on the last run's LoRA in memory (`GridApi`); answers the grid PNG, every cell as
  base64 PNG with its strength, seed, snapshot and weights, and `best_snapshot` (the lowest validation loss among
  the grid's snapshots, or null). 409 while a run is in progress.
Errors are answered as `{"detail": message, "error": type}` (`api_routes.py`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Mapping

from lora_trainer.errors import TrainingError
from lora_trainer.host.api_body import BodyField, RequestError, read_body
from lora_trainer.host.api_routes import add_json_route
from lora_trainer.host.folder_policy import FolderPolicy
from lora_trainer.train.job import JobStatus

logger = logging.getLogger(__name__)

PREFIX = "/lora_trainer/v1/train"
GRID_ROUTE = "/lora_trainer/v1/test/grid"
GRID_FIELDS = {
    "prompt": BodyField("str", required=True), "negative_prompt": BodyField("str", default=""),
    "strengths": BodyField("list", items="number", minimum=-10, maximum=10),
    "seeds": BodyField("list", items="int", minimum=0, maximum=2**32 - 1),
    "snapshots": BodyField("list", items="str"),
    "steps": BodyField("int", default=20, minimum=1, maximum=150),
    "cfg_scale": BodyField("number", default=7.0, minimum=0, maximum=30),
    "sampler_name": BodyField("str", default="Euler a"),
    "width": BodyField("int", default=512, minimum=8, maximum=4096),
    "height": BodyField("int", default=512, minimum=8, maximum=4096),
    "confirm": BodyField("bool", default=False),
    "weights": BodyField("list", items="str"),
}
START_FIELDS = {"config": BodyField("object"), "toml": BodyField("path"), "overrides": BodyField("object")}
STOP_FIELDS = {"save": BodyField("bool", default=True)}
NO_FIELDS: dict[str, BodyField] = {}


def status_dict(status: JobStatus) -> dict[str, Any]:
    """A JobStatus as JSON-ready dict (`state` as its text value, NaN/inf as None).

    Args:
        status (JobStatus): the snapshot.

    Returns:
        dict[str, Any]: its fields.
    """
    return status.to_dict()


def config_from_request(body: Any, policy: FolderPolicy | None = None):
    """The TrainConfig a start request asks for, its paths checked against the folder policy.

    Args:
        body (Any): the decoded body: `{"config": {...}}` or `{"toml": path}`, optional `"overrides"`.
        policy (FolderPolicy, optional): the folders requests may name, defaults to None (any folder).

    Returns:
        LoadedConfig: config, unknown and ignored keys, warnings.

    Raises:
        RequestError: a wrong body (400), neither or both of `config` and `toml` (400), a path outside the
            policy's folders (403).
        ConfigError, FileNotFoundError: a bad config or a missing TOML file (inside the allowed folders).
    """
    from lora_trainer.config import config_from_dict, load_toml, update_config

    values = read_body(body, START_FIELDS, "train/start", policy)
    if (values["config"] is None) == (values["toml"] is None):
        raise RequestError('train/start: give either "config" (kohya keys as a JSON object) or "toml" (a config '
                           'file path), not both or neither. Send {"config": {...}} or {"toml": "..."}.')
    loaded = load_toml(values["toml"]) if values["toml"] else config_from_dict(values["config"])
    overrides = values["overrides"] or {}
    if overrides:
        loaded = dataclasses.replace(loaded, config=update_config(loaded.config, overrides))
    if policy is not None:
        raw = dict(values["config"] or {}, **overrides)
        policy.check_config(loaded.config, raw=raw, where="toml: " if values["toml"] else "")
    return loaded


class TrainApi:
    """The training routes (start, stop, pause, resume, status) over a JobManager.

    Args:
        manager (JobManager): the WebUI's job manager (shared with the tab).
        check_file (callable, optional): `path -> CompatReport`, the self-test of a saved file, defaults to None.
        folder_policy (callable, optional): `() -> FolderPolicy`, read at every request (settings may change),
            defaults to None (any folder).
    """

    def __init__(self, manager, check_file=None, folder_policy: Callable[[], FolderPolicy] | None = None):
        self.manager = manager
        self.check_file = check_file
        self.folder_policy = folder_policy or FolderPolicy
        self._checked: dict[str, dict] = {}

    def start(self, body: Any) -> dict[str, Any]:
        loaded = config_from_request(body, self.folder_policy())
        if loaded.unknown_keys:
            raise RequestError(f"config: unknown keys {sorted(loaded.unknown_keys)[:10]}. Remove or rename them "
                               "(kohya key names are expected).")
        try:
            job = self.manager.start(loaded.config)
        except TrainingError as error:
            if self.manager.current is not None:
                raise RequestError(str(error), status=409) from error
            raise
        result = status_dict(job.status())
        result["warnings"] = list(loaded.warnings)
        return result

    def stop(self, body: Any) -> dict[str, Any]:
        save = read_body(body, STOP_FIELDS, "train/stop")["save"]
        stopped = self.manager.stop(save)
        return dict(status_dict(self.manager.status()), stop_requested=stopped)

    def pause(self, body: Any) -> dict[str, Any]:
        read_body(body, NO_FIELDS, "train/pause")
        asked = self.manager.pause()
        return dict(status_dict(self.manager.status()), pause_requested=asked)

    def resume(self, body: Any) -> dict[str, Any]:
        read_body(body, NO_FIELDS, "train/resume")
        asked = self.manager.resume()
        return dict(status_dict(self.manager.status()), resume_requested=asked)

    def status(self) -> dict[str, Any]:
        """The last job's status; never raises (a snapshot that cannot be read is reported in `message`)."""
        try:
            status = self.manager.status()
            data = status_dict(status)
            if data["state"] in ("finished", "stopped") and status.lora_path and self.check_file is not None:
                data["compat"] = self._compat(status.lora_path)
            json.dumps(data, allow_nan=False)  # what the route will send must encode
            return data
        except Exception as error:  # polling must keep working whatever the job left behind
            logger.exception("reading the job status failed")
            return dict(status_dict(JobStatus()), state="unknown",
                        message=f"status: could not be read ({type(error).__name__}: {error}). This is a bug in "
                                "the LoRA trainer; please report it with the console log.")

    def _compat(self, path: str) -> dict:
        if path not in self._checked:
            try:
                report = self.check_file(path)
                self._checked[path] = {"ok": True, "checked": report.checked if report else 0}
            except Exception as error:  # the self-test's failure is part of the answer, not a failed request
                logger.info("self-test of %s: %s", path, error)
                self._checked[path] = {"ok": False, "message": str(error)}
        return self._checked[path]

    def register(self, app, credentials: Mapping[str, str] | None = None) -> None:
        """Add the routes to a FastAPI app.

        Args:
            app (fastapi.FastAPI): the WebUI's app.
            credentials (Mapping[str, str], optional): user -> password (the WebUI's `--api-auth`) every request
                must send as HTTP Basic auth, defaults to None (none needed).
        """
        add_json_route(app, f"{PREFIX}/start", self.start, credentials=credentials)
        add_json_route(app, f"{PREFIX}/stop", self.stop, credentials=credentials)
        add_json_route(app, f"{PREFIX}/pause", self.pause, credentials=credentials)
        add_json_route(app, f"{PREFIX}/resume", self.resume, credentials=credentials)
        add_json_route(app, f"{PREFIX}/status", self.status, method="GET", credentials=credentials)
        logger.info("API routes added under %s", PREFIX)


def _png_base64(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class GridApi:
    """`POST /lora_trainer/v1/test/grid` over a GridService (the Test panel's engine).

    Args:
        service (GridService): the last run's LoRA and the host's renderer.
    """

    def __init__(self, service):
        self.service = service

    def grid(self, body: Any) -> dict[str, Any]:
        from lora_trainer.grids import DEFAULT_STRENGTHS
        from lora_trainer.host.grid_service import GridRequest

        values = read_body(body, GRID_FIELDS, "test/grid")
        request = GridRequest(
            prompt=values["prompt"], negative_prompt=values["negative_prompt"],
            strengths=tuple(values["strengths"] if values["strengths"] is not None else DEFAULT_STRENGTHS),
            seeds=tuple(values["seeds"] if values["seeds"] is not None else (1,)),
            snapshots=tuple(values["snapshots"] or ()), steps=values["steps"], cfg_scale=values["cfg_scale"],
            sampler_name=values["sampler_name"], width=values["width"], height=values["height"],
            confirmed=values["confirm"], weights=tuple(values["weights"] or ()))
        try:
            outcome = self.service.run(request)
        except TrainingError as error:
            if self.service.manager.current is not None:
                raise RequestError(str(error), status=409) from error
            raise
        result = outcome.result
        best = result.plan.best_snapshot  # the lowest validation loss among the grid's snapshots
        return {"grid": _png_base64(result.image), "best_snapshot": best.label if best is not None else None,
                "cells": [{"image": _png_base64(c.image), "strength": c.cell.strength, "seed": c.cell.seed,
                           "snapshot": c.cell.snapshot.label, "x": c.cell.x, "y": c.cell.y, "z": c.cell.z,
                           "weights": c.cell.weights.label if c.cell.weights is not None else None}
                          for c in result.cells],
                "parameters": result.plan.describe(), "path": str(outcome.path) if outcome.path else None,
                "lora": outcome.lora_name, "seconds": round(result.seconds, 3)}

    def register(self, app, credentials: Mapping[str, str] | None = None) -> None:
        """Add the route to a FastAPI app (behind `credentials` as HTTP Basic auth when given)."""
        add_json_route(app, GRID_ROUTE, self.grid, credentials=credentials)
        logger.info("API route added: %s", GRID_ROUTE)
