"""What the Train panel shows, without a browser: form <-> config for every preset, TOML text in and out, status
text, loss rows, prompt files."""
from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest

from lora_trainer.config import PRESETS, TrainConfig, update_config
from lora_trainer.errors import ConfigError
from lora_trainer.networks.settings import NetworkSettings
from lora_trainer.train.job import JobState, JobStatus
from lora_trainer.ui import train_views as views


def _form(config, **changes) -> list:
    values = dict(zip(views.FORM_KEYS, views.config_to_form(config)))
    values.update(changes)
    return [values[key] for key in views.FORM_KEYS]


@pytest.mark.parametrize("preset", [views.NO_PRESET, *PRESETS])
def test_form_gives_back_the_preset_and_toml_text_round_trips(preset):
    base = update_config(views.base_config(preset), {"train_data_dir": "/data/train"})
    config = views.form_to_config(base, "/data/train", _form(base))
    assert config == base
    again, notes = views.config_from_text(views.toml_text(config))
    assert again == config and notes == []


def test_form_values_win_and_keys_the_form_lacks_are_kept():
    base = update_config(views.base_config("sd1_style_lora"), {"block_dims": [4] * 25, "block_alphas": [2] * 25})
    config = views.form_to_config(base, " /data ", _form(base, network_dim=8, algo="loha", conv_dim="4",
                                                         unet_lr="", seed="", resolution="64,96"))
    assert config.network.network_dim == 8 and config.network.algo == "loha"
    assert config.network.network_module == "lycoris.kohya"       # LoHa needs LyCORIS: chosen for the user
    assert config.network.conv_dim == 4
    assert config.optimizer.unet_lr is None and config.training.seed is None   # empty text = unset
    assert config.dataset.resolution == (64, 96) and config.dataset.train_data_dir == "/data"
    assert list(config.network.block_dims) == [4] * 25             # not in the form, kept from the base
    back = views.form_to_config(config, "/data", _form(config, algo="lora"))
    assert back.network.network_module == "networks.lora"


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="resolution"):
        views.form_to_config(TrainConfig(), "/d", _form(TrainConfig(), resolution="big"))


def test_toml_text_notes_unknown_keys_and_reports_syntax_errors():
    config, notes = views.config_from_text('[training_arguments]\nmax_train_steps = 7\nmystery = 1\n')
    assert config.training.max_train_steps == 7
    assert any("mystery" in note for note in notes)
    with pytest.raises(ConfigError, match="not valid TOML"):
        views.config_from_text("max_train_steps = = 3")


def test_prompt_lines_become_a_file_and_paths_stay(tmp_path):
    form = _form(TrainConfig(), sample_prompts="a cat --w 64\na dog")
    path = views.form_to_config(None, "/d", form).sample.sample_prompts
    assert Path(path).read_text(encoding="utf-8") == "a cat --w 64\na dog\n"
    assert views.prompts_file(str(tmp_path / "p.txt")) == str(tmp_path / "p.txt")


def test_status_text():
    assert "idle" in views.status_markdown(JobStatus())
    running = JobStatus(JobState.RUNNING, step=3, total_steps=10, epoch=1, total_epochs=2, loss=0.12345,
                        avg_loss=0.2, lr=1e-4, it_per_s=2.5, eta_s=3725, message="training", started_at=time.time())
    text = views.status_markdown(running)
    for part in ("**running**", "step 3/10", "epoch 1/2", "loss 0.1235", "1.00e-04", "2.50 it/s", "ETA 1:02:05"):
        assert part in text, text
    failed = views.status_markdown(JobStatus(JobState.FAILED, message="train_data_dir: folder '/x' does not exist"))
    assert "**Error:** train_data_dir: folder '/x'" in failed


def test_loss_rows_are_thinned_keeping_the_last_point():
    status = JobStatus(losses=[(i, float(i)) for i in range(1, 5002)])
    rows = views.loss_rows(status, limit=1000)
    training = [step for step, series in zip(rows["step"], rows["series"]) if series == "training"]
    assert len(training) <= 1001 and training[0] == 1 and training[-1] == 5001
    assert views.loss_rows(JobStatus(losses=[(1, 0.5)])) == {
        "step": [1, 1], "loss": [0.5, 0.5], "series": ["training", "training (average)"]}


def test_kohya_fields_the_panel_lacked_round_trip_through_form_and_toml():
    form = _form(TrainConfig(), algo="lokr", network_args="factor=4", network_weights="/loras/start.safetensors",
                 optimizer_args="weight_decay=0.05\nbetas=0.9,0.99", reg_data_dir="/data/reg")
    config = views.form_to_config(None, "/data/train", form)
    assert config.network.algo == "lokr" and config.network.network_module == "lycoris.kohya"
    assert config.network.network_args == ("factor=4",) and NetworkSettings.from_config(config).factor == 4
    assert config.network.network_weights == "/loras/start.safetensors"
    assert config.optimizer.optimizer_args == ("weight_decay=0.05", "betas=0.9,0.99")
    assert config.dataset.reg_data_dir == "/data/reg" and config.dataset.train_data_dir == "/data/train"
    text = views.toml_text(config)
    written = tomllib.loads(text)
    assert {"algo=lokr", "factor=4"} <= set(written["network_args"]) and written["reg_data_dir"] == "/data/reg"
    again, notes = views.config_from_text(text)
    assert again == config and notes == []
    shown = dict(zip(views.FORM_KEYS, views.config_to_form(again)))
    assert shown["optimizer_args"] == "weight_decay=0.05 betas=0.9,0.99" and shown["network_args"] == "factor=4"
    assert views.form_to_config(again, "/data/train", views.config_to_form(again)) == config


def test_new_fields_take_the_same_validation_path():
    with pytest.raises(ConfigError, match="optimizer_args"):
        views.form_to_config(None, "/d", _form(TrainConfig(), optimizer_args="weight_decay"))
    with pytest.raises(ConfigError, match="network_args"):
        views.form_to_config(None, "/d", _form(TrainConfig(), network_args="factor"))


def test_dataset_config_replaces_the_dataset_folder(tmp_path):
    config = views.form_to_config(None, "/data/train", _form(TrainConfig(), dataset_config="/data/sets.toml"))
    assert config.dataset.dataset_config == "/data/sets.toml" and config.dataset.train_data_dir is None
    again, _ = views.config_from_text(views.toml_text(config))
    assert again.dataset.dataset_config == "/data/sets.toml"
