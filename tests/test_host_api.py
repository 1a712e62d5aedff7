"""The start/stop/status routes' logic (`host/a1111_api.TrainApi`) on a real JobManager and the standalone host;
the FastAPI registration itself runs in the real-WebUI tests (tests/webui)."""
from __future__ import annotations

import time

import pytest
from PIL import Image

from lora_trainer.errors import NetworkError
from lora_trainer.host import StandaloneHost
from lora_trainer.host.a1111_api import TrainApi, config_from_request, status_dict
from lora_trainer.train.job import JobManager, JobStatus


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api_data") / "1_dot"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 180)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"dot, item{i}", encoding="utf-8")
    return folder.parent


def _config(tiny, data, steps=2, **extra):
    config = {"pretrained_model_name_or_path": str(tiny.checkpoint), "diffusers_config_dir": str(tiny.config_dir),
              "tokenizer_dir": str(tiny.tokenizer_dir), "train_data_dir": str(data), "resolution": "64,64",
              "output_name": "api", "max_train_steps": steps, "network_dim": 2, "network_alpha": 2,
              "cache_latents": True, "network_train_unet_only": True, "seed": 1}
    config.update(extra)
    return config


def _wait(api, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = api.status()
        if status["state"] in ("finished", "stopped", "failed"):
            return status
        time.sleep(0.1)
    raise TimeoutError(status)


def test_config_from_request_takes_json_or_toml_and_overrides(tmp_path):
    from lora_trainer.config import TrainConfig, save_toml, update_config

    loaded = config_from_request({"config": {"network_dim": 8}, "overrides": {"learning_rate": 0.5}})
    assert loaded.config.network.network_dim == 8 and loaded.config.optimizer.learning_rate == 0.5
    path = tmp_path / "c.toml"
    save_toml(update_config(TrainConfig(), {"network_dim": 16}), path)
    assert config_from_request({"toml": str(path)}).config.network.network_dim == 16
    for body in ({}, {"config": {}, "toml": str(path)}):
        with pytest.raises(ValueError, match="either"):
            config_from_request(body)


def test_status_dict_is_json_ready():
    data = status_dict(JobStatus())
    assert data["state"] == "idle" and data["step"] == 0 and isinstance(data["losses"], list)


def test_start_status_and_the_file_check_through_the_api(tiny_sd1, dataset, tmp_path):
    checked = []

    def check_file(path):
        checked.append(path)
        raise NetworkError("compatibility self-test: 1 module names the WebUI's Lora extension cannot place")

    api = TrainApi(JobManager(StandaloneHost(tmp_path / "loras")), check_file=check_file)
    assert api.stop({})["stop_requested"] is False
    started = api.start({"config": _config(tiny_sd1, dataset)})
    assert started["state"] in ("preparing", "running", "finished") and started["warnings"] == []
    status = _wait(api)
    assert status["state"] == "finished", status["message"]
    assert status["step"] == 2 and status["lora_path"].startswith(str(tmp_path / "loras"))
    assert status["compat"] == {"ok": False, "message": "compatibility self-test: 1 module names the WebUI's Lora "
                                                        "extension cannot place"}
    api.status()
    assert checked == [status["lora_path"]]  # checked once, then remembered


def test_unknown_keys_and_a_second_start_are_refused(tiny_sd1, dataset, tmp_path):
    from lora_trainer.host.api_body import RequestError

    api = TrainApi(JobManager(StandaloneHost(tmp_path / "loras")))
    with pytest.raises(ValueError, match="no_such_key"):
        api.start({"config": {"no_such_key": 1}})
    api.start({"config": _config(tiny_sd1, dataset, steps=200)})
    with pytest.raises(RequestError, match="already") as busy:
        api.start({"config": _config(tiny_sd1, dataset)})
    assert busy.value.status == 409
    assert api.stop({"save": False})["stop_requested"] is True
    status = _wait(api)
    assert status["state"] == "stopped" and status["lora_path"] is None
