"""The training routes over HTTP (FastAPI's TestClient on an app with the routes registered as the extension does,
a real JobManager on the standalone host): every bad body is a 4xx naming the field, `/status` always answers, and
the folder rule of an exposed WebUI refuses paths outside the allowed folders without revealing them."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lora_trainer.config import config_from_dict, save_toml
from lora_trainer.host import StandaloneHost
from lora_trainer.host.a1111_api import PREFIX, TrainApi
from lora_trainer.host.folder_policy import FolderPolicy
from lora_trainer.train.job import JobManager, JobState, JobStatus


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http_data") / "1_dot"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 180)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"dot, item{i}", encoding="utf-8")
    return folder.parent


def _config(tiny, data, out, steps=2, **extra):
    config = {"pretrained_model_name_or_path": str(tiny.checkpoint), "diffusers_config_dir": str(tiny.config_dir),
              "tokenizer_dir": str(tiny.tokenizer_dir), "train_data_dir": str(data), "output_dir": str(out),
              "resolution": "64,64", "output_name": "http", "max_train_steps": steps, "network_dim": 2,
              "network_alpha": 2, "cache_latents": True, "network_train_unet_only": True, "seed": 1}
    config.update(extra)
    return config


def _client(manager, policy=None) -> TestClient:
    app = FastAPI()
    TrainApi(manager, folder_policy=(lambda: policy) if policy else None).register(app)
    return TestClient(app)


def _wait(client, timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = client.get(f"{PREFIX}/status")
        assert response.status_code == 200, response.text
        if response.json()["state"] in ("finished", "stopped", "failed"):
            return response.json()
        time.sleep(0.1)
    raise TimeoutError(response.text)


@pytest.fixture
def client(tmp_path):
    return _client(JobManager(StandaloneHost(tmp_path / "loras")))


# -- bad bodies ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, needles", [
    ('{"toml": 123}', ["toml", "the number 123", "string"]),
    ('{"config": "x"}', ["config", 'the string "x"', "JSON object"]),
    ('{"config": [1, 2]}', ["config", "a list"]),
    ("[1, 2]", ["train/start", "a list", "not a JSON object"]),
    ('"config"', ["train/start", "not a JSON object"]),
    ('{"config": {}, "steps": 5}', ["train/start", "'steps'", "config, toml, overrides"]),
    ('{"config": {}, "overrides": 3}', ["overrides", "the number 3"]),
    ('{"config": {}, "overrides": ["network_dim=4"]}', ["overrides", "a list"]),
    ('{"config": {}, "toml": "x.toml"}', ["either", "config", "toml"]),
    ("{}", ["either"]),
    ("", ["either"]),
    ("{not json", ["request body", "not valid JSON"]),
    ('{"config": {"learning_rate": NaN}}', ["learning_rate", "not a finite number"]),
    ('{"config": {"learning_rate": Infinity}}', ["learning_rate", "inf", "not a finite number"]),
    ('{"config": {"learning_rate": "inf"}}', ["learning_rate", "not a finite number"]),
    ('{"config": {}, "overrides": {"unet_lr": -Infinity}}', ["unet_lr", "not a finite number"]),
    ('{"config": {"network_dim": 1000000000000}}', ["network_dim", "1000000000000", "1 to 4096"]),
    ('{"config": {"max_train_steps": 1000000000000000000000000000000}}', ["max_train_steps", "1 to 10000000"]),
    ('{"config": {"max_train_epochs": 1e12}}', ["max_train_epochs", "1 to 100000"]),
    ('{"config": {"train_batch_size": 100000}}', ["train_batch_size", "1 to 1024"]),
    ('{"config": {"resolution": "100000,512"}}', ["resolution", "8192"]),
    ('{"config": {"network_dim": "big"}}', ["network_dim", "'big'", "whole number"]),
    ('{"config": {"cache_latents": "maybe"}}', ["cache_latents", "true or false"]),
    ('{"config": {"no_such_key": 1}}', ["no_such_key", "unknown"]),
    ('{"config": {}, "overrides": {"no_such_key": 1}}', ["no_such_key", "unknown config key"]),
    ('{"config": {"network_args": 5}}', ["network_args"]),
    ('{"toml": "/no/such/folder/run.toml"}', ["run.toml", "not found"]),
    ('{"toml": ""}', ["toml", "string"]),
    ("[" * 50000, ["request body", "not valid JSON"]),
])
def test_a_bad_start_body_is_a_400_naming_the_field(client, body, needles):
    response = client.post(f"{PREFIX}/start", content=body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    assert client.get(f"{PREFIX}/status").json()["state"] == "idle"  # nothing started


@pytest.mark.parametrize("body, needles", [
    ('{"save": "false"}', ["save", 'the string "false"', '{"save": false}', "true/false"]),
    ('{"save": "true"}', ["save", '{"save": true}']),
    ('{"save": 0}', ["save", "the number 0", '{"save": false}']),
    ('{"save": "no"}', ["save", '{"save": true} or {"save": false}']),
    ("[true]", ["train/stop", "a list"]),
    ('"stop"', ["train/stop", 'the string "stop"']),
    ('{"sav": false}', ["train/stop", "'sav'", "save"]),
])
def test_a_bad_stop_body_is_a_400_naming_the_field(client, body, needles):
    response = client.post(f"{PREFIX}/stop", content=body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, detail


@pytest.mark.parametrize("body", ["", "{}", "null", '{"save": null}', '{"save": true}'])
def test_an_empty_or_default_stop_body_is_accepted(client, body):
    response = client.post(f"{PREFIX}/stop", content=body)
    assert response.status_code == 200, response.text
    assert response.json()["stop_requested"] is False  # nothing was running


def test_a_second_start_is_409_and_a_string_save_does_not_save(tiny_sd1, dataset, tmp_path, single_thread):
    client = _client(JobManager(StandaloneHost(tmp_path / "loras")))
    config = _config(tiny_sd1, dataset, tmp_path / "out", steps=100_000)
    assert client.post(f"{PREFIX}/start", json={"config": config}).status_code == 200
    second = client.post(f"{PREFIX}/start", json={"config": config})
    assert second.status_code == 409 and "already" in second.json()["detail"], second.text
    refused = client.post(f"{PREFIX}/stop", json={"save": "false"})
    assert refused.status_code == 400
    assert client.get(f"{PREFIX}/status").json()["state"] in ("preparing", "running")  # still training
    stopped = client.post(f"{PREFIX}/stop", json={"save": False})
    assert stopped.status_code == 200 and stopped.json()["stop_requested"] is True
    status = _wait(client)
    assert status["state"] == "stopped" and status["lora_path"] is None, status
    assert not list((tmp_path / "out").glob("*.safetensors"))


# -- status ----------------------------------------------------------------------------------------------------------
def test_status_answers_after_a_job_with_an_infinite_learning_rate(tiny_sd1, dataset, tmp_path, single_thread):
    manager = JobManager(StandaloneHost(tmp_path / "loras"))
    client = _client(manager)
    config = config_from_dict(_config(tiny_sd1, dataset, tmp_path / "out", steps=4)).config
    # the config check refuses inf; a config built in code (or a loss that overflows) still reaches the job
    manager.start(dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer,
                                                                           learning_rate=math.inf)))
    status = _wait(client)
    assert status["state"] == "failed" and "NaN/inf" in status["message"], status
    assert status["lr"] is None and "lr = inf" in status["message"]
    response = client.get(f"{PREFIX}/status")
    assert response.status_code == 200 and response.json() == status


def test_a_snapshot_with_nan_is_json_safe_and_names_what_was_replaced():
    status = JobStatus(state=JobState.FAILED, step=3, loss=math.nan, lr=math.inf, avg_loss=0.5,
                       losses=[(1, 0.5), (2, math.nan)], message="step 3: the loss is nan")
    data = status.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["loss"] is None and data["lr"] is None and data["avg_loss"] == 0.5
    assert data["losses"] == [(1, 0.5), (2, None)]
    assert data["message"].startswith("step 3: the loss is nan (") and "loss = nan" in data["message"]
    assert "lr = inf" in data["message"] and "1 loss values" in data["message"]
    assert JobStatus(loss=0.25).to_dict()["message"] == ""  # nothing replaced, nothing added


def test_status_answers_even_when_the_snapshot_cannot_be_read(tmp_path):
    class BrokenSnapshot(JobManager):
        def status(self):
            raise RuntimeError("snapshot lost")

    response = _client(BrokenSnapshot(StandaloneHost(tmp_path))).get(f"{PREFIX}/status")
    assert response.status_code == 200
    data = response.json()
    assert data["state"] == "unknown" and "snapshot lost" in data["message"] and "bug" in data["message"]


# -- folders ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path, tiny_sd1, dataset):
    """An exposed WebUI: its models folder (the tiny model's), its data folder, the dataset as an extra folder from
    the setting, and a private folder outside all of them."""
    data = tmp_path / "webui_data"
    data.mkdir()
    outside = tmp_path / "private"
    (outside / "1_secret").mkdir(parents=True)
    (data / "link").symlink_to(outside, target_is_directory=True)
    policy = FolderPolicy.build(True, [tiny_sd1.checkpoint.parent, data, dataset])
    return dict(data=data, outside=outside, dataset=dataset, policy=policy)


def _refused(client, body, key, hidden):
    response = client.post(f"{PREFIX}/start", json=body)
    assert response.status_code == 403, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"{key}: ") and "Settings > LoRA Trainer" in detail, detail
    assert hidden not in detail and "private" not in detail, detail
    return detail


def test_an_exposed_webui_refuses_paths_outside_the_allowed_folders(folders, tiny_sd1, tmp_path):
    client = _client(JobManager(StandaloneHost(tmp_path / "loras")), folders["policy"])
    outside, data = folders["outside"], folders["data"]
    good = _config(tiny_sd1, folders["dataset"], data / "out")
    cases = [("output_dir", str(outside)), ("train_data_dir", str(outside)), ("reg_data_dir", str(outside)),
             ("output_dir", str(data / "link")), ("train_data_dir", str(data / "link" / "1_secret")),
             ("output_dir", str(data / ".." / ".." / "private")), ("network_weights", str(outside / "w.safetensors")),
             ("resume", str(outside / "state")), ("pretrained_model_name_or_path", str(outside / "m.safetensors")),
             ("vae", str(outside / "vae.safetensors")), ("logging_dir", str(outside)),
             ("sample_prompts", str(outside / "prompts.txt"))]
    for key, path in cases:
        _refused(client, {"config": dict(good, **{key: path})}, key, str(outside))
    _refused(client, {"config": good, "overrides": {"output_dir": str(outside)}}, "output_dir", str(outside))
    _refused(client, {"config": dict(good, dataset_config=str(outside / "d.toml"))}, "dataset_config", str(outside))
    sectioned = {"general": {"dataset_config": str(outside / "d.toml")}, "training_arguments": good}
    _refused(client, {"config": sectioned}, "dataset_config", str(outside))
    # a missing folder outside reads exactly like an existing one: the answer reveals nothing about the disk
    existing = _refused(client, {"config": dict(good, output_dir=str(outside / "1_secret"))}, "output_dir", str(outside))
    missing = _refused(client, {"config": dict(good, output_dir=str(outside / "nothing"))}, "output_dir", str(outside))
    assert existing == missing
    assert client.get(f"{PREFIX}/status").json()["state"] == "idle"


def test_an_exposed_webui_checks_a_toml_and_the_paths_inside_it(folders, tiny_sd1, tmp_path):
    client = _client(JobManager(StandaloneHost(tmp_path / "loras")), folders["policy"])
    outside, data = folders["outside"], folders["data"]
    save_toml(config_from_dict(_config(tiny_sd1, folders["dataset"], data / "out")).config, outside / "run.toml")
    (data / "run_link.toml").symlink_to(outside / "run.toml")
    _refused(client, {"toml": str(outside / "run.toml")}, "toml", str(outside))
    _refused(client, {"toml": str(outside / "none.toml")}, "toml", str(outside))  # missing: the same refusal
    _refused(client, {"toml": str(data / "run_link.toml")}, "toml", str(outside))
    _refused(client, {"toml": str(data / "link" / "run.toml")}, "toml", str(outside))
    save_toml(config_from_dict(_config(tiny_sd1, outside, data / "out")).config, data / "points_outside.toml")
    _refused(client, {"toml": str(data / "points_outside.toml")}, "toml: train_data_dir", str(outside))
    missing = client.post(f"{PREFIX}/start", json={"toml": str(data / "missing.toml")})
    assert missing.status_code == 400 and "not found" in missing.json()["detail"]  # inside: a plain answer


def test_an_exposed_webui_trains_inside_the_allowed_folders(folders, tiny_sd1, tmp_path, single_thread):
    client = _client(JobManager(StandaloneHost(tmp_path / "loras")), folders["policy"])
    data = folders["data"]
    save_toml(config_from_dict(_config(tiny_sd1, folders["dataset"], data / "out")).config, data / "run.toml")
    response = client.post(f"{PREFIX}/start", json={"toml": str(data / "run.toml"),
                                                    "overrides": {"output_name": "exposed"}})
    assert response.status_code == 200, response.text
    status = _wait(client)
    assert status["state"] == "finished", status["message"]
    assert status["lora_path"] == str(data / "out" / "exposed.safetensors")
    assert Path(status["lora_path"]).is_file()


def test_on_localhost_any_folder_is_used_as_before(tiny_sd1, dataset, tmp_path, single_thread):
    for policy in (None, FolderPolicy.build(False, [tmp_path / "unrelated"])):
        client = _client(JobManager(StandaloneHost(tmp_path / "loras")), policy)
        out = tmp_path / f"anywhere_{policy is None}"
        response = client.post(f"{PREFIX}/start", json={"config": _config(tiny_sd1, dataset, out, steps=1)})
        assert response.status_code == 200, response.text
        status = _wait(client)
        assert status["state"] == "finished", status["message"]
        assert Path(status["lora_path"]).parent == out and Path(status["lora_path"]).is_file()


def test_routes_ask_for_the_webuis_api_credentials_when_it_has_them(tmp_path):
    from lora_trainer.host.api_routes import parse_credentials

    credentials = parse_credentials("alice:s3cret:x, bob:pw,broken")
    assert credentials == {"alice": "s3cret:x", "bob": "pw"}
    app = FastAPI()
    TrainApi(JobManager(StandaloneHost(tmp_path))).register(app, credentials=credentials)
    client = TestClient(app)
    for auth in (None, ("alice", "wrong"), ("carol", "pw"), ("bob", "pw ")):
        response = client.get(f"{PREFIX}/status", auth=auth)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Basic", auth
        assert client.post(f"{PREFIX}/stop", json={}, auth=auth).status_code == 401
    assert client.get(f"{PREFIX}/status", headers={"Authorization": "Basic !!"}).status_code == 401
    assert client.get(f"{PREFIX}/status", auth=("alice", "s3cret:x")).status_code == 200
    assert client.post(f"{PREFIX}/stop", json={"save": True}, auth=("bob", "pw")).status_code == 200
