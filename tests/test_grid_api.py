"""`POST /lora_trainer/v1/test/grid` over HTTP (FastAPI's TestClient, the route registered as the extension does, a
real JobManager on the standalone host that trained a tiny SD1 LoRA): the grid and every cell come back as PNGs with
their strength, seed and snapshot; strength 0 is the base model bit for bit; bad bodies are 4xx naming the field."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lora_trainer.config import config_from_dict
from lora_trainer.host import StandaloneHost
from lora_trainer.host.a1111_api import GRID_ROUTE, GridApi
from lora_trainer.host.grid_service import IN_MEMORY, GridService
from lora_trainer.train.job import JobManager

SMALL = {"width": 32, "height": 32, "steps": 2, "sampler_name": "Euler"}


def _png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def trained(tiny_sd1, tmp_path_factory):
    """A JobManager whose last run trained UNet and text encoder for 2 steps, saving a step file and the final."""
    root = tmp_path_factory.mktemp("grid_api")
    data = root / "data" / "1_dot"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (120 * i, 90, 180)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"dot, blue, item{i}", encoding="utf-8")
    config = config_from_dict({
        "pretrained_model_name_or_path": str(tiny_sd1.checkpoint), "diffusers_config_dir": str(tiny_sd1.config_dir),
        "tokenizer_dir": str(tiny_sd1.tokenizer_dir), "train_data_dir": str(data.parent),
        "output_dir": str(root / "out"), "resolution": "64,64", "output_name": "gridapi", "max_train_steps": 2,
        "network_dim": 2, "network_alpha": 2, "learning_rate": 0.05, "seed": 1, "save_every_n_steps": 1,
        "save_precision": "float"}).config
    manager = JobManager(StandaloneHost(root / "loras", device="cpu"))
    job = manager.start(config)
    status = job.wait(300)
    assert status.state.value == "finished", status.message
    return manager


def _client(manager) -> TestClient:
    app = FastAPI()
    GridApi(GridService(manager, cell_limit=8)).register(app)
    return TestClient(app)


def test_the_grid_and_every_cell_come_back_with_their_values(trained, single_thread):
    client = _client(trained)
    body = {"prompt": "dot, blue", "strengths": [0, 1], "seeds": [3, 4], "snapshots": ["step 1", IN_MEMORY], **SMALL}
    answer = client.post(GRID_ROUTE, json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    cells = data["cells"]
    assert len(cells) == 8
    assert {(c["strength"], c["seed"], c["snapshot"]) for c in cells} == {
        (s, seed, snap) for s in (0.0, 1.0) for seed in (3, 4) for snap in ("step 1", IN_MEMORY)}
    images = {(c["strength"], c["seed"], c["snapshot"]): np.asarray(_png(c["image"])) for c in cells}
    assert all(image.shape == (32, 32, 3) for image in images.values())
    for seed in (3, 4):  # strength 0 is the base model, whatever the snapshot
        assert np.array_equal(images[(0.0, seed, "step 1")], images[(0.0, seed, IN_MEMORY)])
        assert not np.array_equal(images[(0.0, seed, IN_MEMORY)], images[(1.0, seed, IN_MEMORY)])
    assert not np.array_equal(images[(1.0, 3, "step 1")], images[(1.0, 3, IN_MEMORY)])
    grid = _png(data["grid"])
    assert grid.width > 2 * 2 * 32 and grid.height > 2 * 32  # 2 strengths x 2 sub-grids (seeds), labels around
    saved = Image.open(data["path"])
    assert json.loads(saved.text["lora_trainer_grid"])["prompt"] == "dot, blue"
    assert data["lora"] == "gridapi" and data["path"].endswith(".png") and "gridapi-grid-" in data["path"]


def test_strength_zero_equals_the_base_model_and_the_model_is_given_back(trained, single_thread):
    from lora_trainer.grids import RenderSettings
    from lora_trainer.host.handshake import state_fingerprint

    client = _client(trained)
    host, config = trained.host, trained.last.config
    adapter = host.load(config)
    before = state_fingerprint(adapter.unet()), state_fingerprint(adapter.text_encoders()[0])
    answer = client.post(GRID_ROUTE, json={"prompt": "dot", "strengths": [0, 0.5], "seeds": [7],
                                           "snapshots": [IN_MEMORY], **SMALL})
    assert answer.status_code == 200, answer.text
    with host.grid_session(config) as (_adapter, render):
        plain = np.asarray(render("dot", "", 7, RenderSettings(32, 32, steps=2, sampler="Euler")))
    zero = next(c for c in answer.json()["cells"] if c["strength"] == 0)
    assert np.array_equal(np.asarray(_png(zero["image"])), plain)
    assert (state_fingerprint(adapter.unet()), state_fingerprint(adapter.text_encoders()[0])) == before
    assert trained.last.live_lora.multiplier == 1.0 and not trained.last.live_lora.applied


@pytest.mark.parametrize("body, status, needles", [
    ({"prompt": "  "}, 400, ["prompt", "empty"]),
    ({"prompt": "dot", "width": 36}, 400, ["width", "multiple of 8"]),
    ({"prompt": "dot", "strengths": ["a"]}, 400, ["strengths[0]", "number"]),
    ({"prompt": "dot", "strengths": 0.5}, 400, ["strengths", "list"]),
    ({"prompt": "dot", "seeds": [1.5]}, 400, ["seeds[0]", "whole number"]),
    ({"prompt": "dot", "strengths": [0, 0.5, 1], "seeds": [1, 2, 3], "snapshots": [IN_MEMORY]}, 400, ["9 cells", "limit of 8", "Confirm"]),
    ({"prompt": "dot", "snapshots": ["epoch 9"]}, 400, ["snapshots", "'epoch 9'", IN_MEMORY]),
    ({"prompt": "dot", "sampler_name": "Nope"}, 400, ["Nope", "Euler"]),
    ({"prompt": "dot", "cells": 3}, 400, ["unknown field", "cells"]),
    ({}, 400, ["prompt", "missing"]),
])
def test_bad_bodies_are_named(trained, body, status, needles):
    answer = _client(trained).post(GRID_ROUTE, json={**SMALL, **body} if body else {})
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    for needle in needles:
        assert needle in detail, detail


def test_before_any_run_the_route_says_to_train_first(tmp_path):
    answer = _client(JobManager(StandaloneHost(tmp_path))).post(GRID_ROUTE, json={"prompt": "dot", **SMALL})
    assert answer.status_code == 400 and "Train a LoRA first" in answer.json()["detail"]


def test_a_run_in_progress_is_409(trained, tmp_path):
    from lora_trainer.config import update_config

    manager = JobManager(trained.host)
    config = update_config(trained.last.config, {"max_train_steps": 100000, "output_dir": str(tmp_path),
                                                 "save_every_n_steps": 100000})
    manager.start(config)
    try:
        answer = _client(manager).post(GRID_ROUTE, json={"prompt": "dot", **SMALL})
        assert answer.status_code == 409 and "in progress" in answer.json()["detail"]
    finally:
        manager.stop(save=False)
        manager.last.wait(120)


def test_the_panel_form_and_cancel_between_cells(trained, single_thread):
    from lora_trainer.errors import ConfigError
    from lora_trainer.ui.test_actions import GridRun, lora_tag, request_from_form

    request = request_from_form("dot", "", "Euler", 2, 7, 32, 32, "1, 2", "0-1 [3]", [IN_MEMORY], False)
    assert request.strengths == (0.0, 0.5, 1.0) and request.seeds == (1, 2) and request.snapshots == (IN_MEMORY,)
    with pytest.raises(ConfigError, match="width: 32.5 is not a whole number"):
        request_from_form("dot", "", "Euler", 2, 7, 32.5, 32, "1", "1", [], False)
    assert lora_tag("gridapi", "0.60") == "<lora:gridapi:0.6>" and lora_tag("", 1) == ""

    folder = Path(trained.last.config.save.output_dir)
    files = sorted(folder.iterdir())
    run = GridRun()
    run.cancel.set()  # Cancel pressed before the first cell
    run.start(GridService(trained), request).thread.join(60)
    assert run.error is None and run.outcome.result.cancelled and run.outcome.path is None
    assert run.cells == [] and run.outcome.result.image is None and not trained.last.live_lora.applied
    assert sorted(folder.iterdir()) == files  # nothing saved
