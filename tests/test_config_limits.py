"""Finite numbers and upper limits in config validation: the CLI, the panel and the API refuse a typo such as
network_dim = 10**12 or learning_rate = inf by name, and real configs at the limits still load."""
from __future__ import annotations

import pytest

from lora_trainer.config import config_from_dict, load_toml
from lora_trainer.config.validate import LIMITS, MAX_RANK, MAX_SIDE, MAX_STEPS
from lora_trainer.errors import ConfigError


@pytest.mark.parametrize("data, needles", [
    ({"network_dim": 10**12}, ["network_dim", "1000000000000", f"1 to {MAX_RANK}"]),
    ({"conv_dim": 10**6}, ["conv_dim", f"1 to {MAX_RANK}"]),
    ({"max_train_steps": 10**30}, ["max_train_steps", f"1 to {MAX_STEPS}"]),
    ({"max_train_steps": 1e30}, ["max_train_steps", f"1 to {MAX_STEPS}"]),
    ({"max_train_epochs": 10**9}, ["max_train_epochs", "100000"]),
    ({"train_batch_size": 10**6}, ["train_batch_size", "1024"]),
    ({"resolution": "16384,512"}, ["resolution", str(MAX_SIDE)]),
    ({"max_bucket_reso": 100_000, "enable_bucket": True}, ["max_bucket_reso", str(MAX_SIDE)]),
    ({"save_every_n_steps": 10**12}, ["save_every_n_steps"]),
    ({"gradient_accumulation_steps": 10**9}, ["gradient_accumulation_steps"]),
    ({"seed": 2**64}, ["seed", str(2**64 - 1)]),
    ({"network_args": ["block_dims=" + ",".join(["8"] * 24 + ["99999"])]}, ["block_dims", str(MAX_RANK)]),
    ({"learning_rate": float("inf")}, ["learning_rate", "inf", "finite"]),
    ({"learning_rate": "nan"}, ["learning_rate", "nan", "finite"]),
    ({"unet_lr": float("-inf")}, ["unet_lr", "finite"]),
    ({"noise_offset": float("nan")}, ["noise_offset", "finite"]),
    ({"network_alpha": 10**400}, ["network_alpha", "finite"]),
    ({"block_alphas": ",".join(["1"] * 24 + ["inf"])}, ["block_alphas", "finite"]),
    ({"max_train_steps": float("inf")}, ["max_train_steps", "whole number"]),
])
def test_out_of_range_and_non_finite_values_are_refused_by_name(data, needles):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert message.rstrip().endswith(".")


def test_values_at_the_limits_still_load():
    upper = {key: high for key, (low, high) in LIMITS.items()}
    upper.update(resolution=f"{MAX_SIDE},{MAX_SIDE}", enable_bucket=True, min_bucket_reso=256, bucket_reso_steps=64,
                 lr_scheduler="linear", save_every_n_epochs=1, max_train_epochs=10)
    config = config_from_dict(upper).config
    assert config.network.network_dim == MAX_RANK and config.training.max_train_steps == MAX_STEPS
    assert config.dataset.resolution == (MAX_SIDE, MAX_SIDE) and config.training.seed == 2**64 - 1


def test_a_toml_file_gets_the_same_checks(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("[additional_network_arguments]\nnetwork_dim = 1_000_000_000_000\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"big\.toml: network_dim = 1000000000000: out of range"):
        load_toml(path)
    path.write_text("learning_rate = inf\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="learning_rate = inf: not a finite number"):
        load_toml(path)


@pytest.mark.parametrize("prefix", ["../../elsewhere/", "logs/run", "a\\b"])
def test_log_prefix_cannot_lead_out_of_logging_dir(prefix):
    with pytest.raises(ConfigError, match="log_prefix.*logging_dir"):
        config_from_dict({"logging_dir": "logs", "log_prefix": prefix})
    assert config_from_dict({"log_prefix": "run1_"}).config.logging.log_prefix == "run1_"
