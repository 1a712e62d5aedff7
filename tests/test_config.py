"""Config: kohya TOML in/out, validation messages, network_args parsing, overrides, presets, seed configs."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from lora_trainer import __version__
from lora_trainer.config import (
    FIELDS, IGNORED_KEYS, NETWORK_ALGOS, OPTIMIZERS, PRESETS, SCHEDULERS, TrainConfig, apply_overrides,
    block_lr_preset, coerce, config_from_dict, load_toml, preset_config, save_toml, to_kohya_dict, update_config,
)
from lora_trainer.config.values import tomllib
from lora_trainer.errors import ConfigError

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "presets"
needs_seeds = pytest.mark.skipif(not SEEDS.is_dir(), reason=f"seed configs not found at {SEEDS} (the repository's "
                                 "sibling folder shared/presets); they ship outside this repository")


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def roundtrip(config: TrainConfig, tmp_path: Path) -> TrainConfig:
    loaded = load_toml(save_toml(config, tmp_path / "saved" / "again.toml"))
    assert loaded.unknown_keys == []
    expected = {"xformers"} if config.model.xformers else set()  # saved only when set: it has no effect
    assert {key for key in loaded.ignored_keys if not key.startswith("network_args.")} == expected
    return loaded.config


# ---- the seed configs ------------------------------------------------------------------------------------------

@needs_seeds
def test_seed_style_loha_loads_unchanged(tmp_path):
    loaded = load_toml(SEEDS / "seed000_style_loha.toml")
    c = loaded.config
    assert (c.network.network_module, c.network.algo, c.network.effective_algo) == ("lycoris.kohya", "loha", "loha")
    assert (c.network.network_dim, c.network.network_alpha) == (16, 8.0)
    assert (c.network.conv_dim, c.network.conv_alpha, c.network.network_dropout) == (4, 2.0, 0.1)
    assert c.network.network_args == ()
    assert (c.optimizer.optimizer_type, c.optimizer.lr_scheduler) == ("Lion", "cosine_with_restarts")
    assert (c.optimizer.lr_scheduler_num_cycles, c.optimizer.text_encoder_lr) == (3, 5e-6)
    assert c.training.min_snr_gamma == 5.0
    assert (c.training.multires_noise_iterations, c.training.multires_noise_discount) == (6, 0.3)
    assert c.dataset.resolution == (768, 1024)
    assert c.model.max_token_length == 225
    assert any("max_token_length = 255" in w and "225" in w for w in loaded.warnings)
    assert any("network_dropout" in w and "dropout=0.1" in w for w in loaded.warnings)
    assert {"xformers", "model_train_type", "weighted_captions", "persistent_data_loader_workers",
            "cache_text_encoder_outputs_to_disk"} == set(loaded.ignored_keys)
    assert "SDPA" in loaded.ignored_keys["xformers"]
    assert loaded.unknown_keys == []
    assert roundtrip(c, tmp_path) == c


@needs_seeds
def test_seed_style_lora_loads_unchanged(tmp_path):
    loaded = load_toml(SEEDS / "seed000_style_lora.toml")
    c = loaded.config
    assert (c.network.network_module, c.network.effective_algo) == ("networks.lora", "lora")
    assert (c.network.network_dim, c.network.network_alpha, c.network.network_dropout) == (128, 128.0, 0.1)
    assert (c.optimizer.unet_lr, c.optimizer.text_encoder_lr, c.optimizer.lr_warmup_steps) == (6e-5, 6e-6, 0)
    assert (c.dataset.resolution, c.dataset.min_bucket_reso, c.dataset.max_bucket_reso) == ((768, 768), 256, 1536)
    assert (c.dataset.train_batch_size, c.dataset.keep_tokens, c.dataset.caption_tag_dropout_rate) == (4, 1, 0.2)
    assert c.dataset.shuffle_caption and c.dataset.cache_latents and c.dataset.cache_latents_to_disk
    assert (c.model.clip_skip, c.model.mixed_precision, c.save.save_precision) == (2, "bf16", "bf16")
    assert (c.training.seed, c.training.max_train_epochs, c.save.output_name) == (1337, 15, "myrn_v1")
    assert c.dataset.train_data_dir.endswith("毛玉乳牛")
    assert (c.logging.log_with, c.logging.logging_dir) == ("tensorboard", "./logs")
    assert "weighted_captions" in loaded.ignored_keys and loaded.unknown_keys == []
    assert roundtrip(c, tmp_path) == c


@needs_seeds
def test_seed_sdxl_sectioned_loads_unchanged(tmp_path):
    loaded = load_toml(SEEDS / "seed001_sdxl_lora.toml")
    c = loaded.config
    assert c.model.sdxl and c.model.no_half_vae and c.model.gradient_checkpointing and c.model.sdpa
    assert any("sdxl_arguments" in w for w in loaded.warnings)
    assert c.model.vae == "/path/to/vae.safetensors"
    assert c.optimizer.optimizer_type == "Adafactor"  # written "AdaFactor"
    assert c.optimizer.optimizer_args == ("scale_parameter=False", "relative_step=False", "warmup_init=False")
    assert (c.optimizer.lr_scheduler, c.optimizer.lr_warmup_steps, c.optimizer.max_grad_norm) == (
        "constant_with_warmup", 100, 0.0)
    assert (c.network.network_dim, c.network.network_alpha, c.network.conv_dim, c.network.conv_alpha) == (
        32, 16.0, 32, 16.0)
    assert c.network.effective_algo == "locon" and c.network.network_train_unet_only
    assert c.network.train_unet and not c.network.train_text_encoder
    assert c.dataset.cache_text_encoder_outputs and not c.dataset.shuffle_caption
    assert (c.dataset.resolution, c.dataset.max_data_loader_n_workers) == ((1024, 1024), 8)
    assert (c.training.min_timestep, c.training.max_timestep, c.training.max_train_epochs) == (0, 1000, 100)
    assert (c.sample.sample_every_n_epochs, c.sample.sample_sampler) == (1, "euler_a")
    assert c.logging.log_prefix == "sdxl_lora_WeThinkIn"
    assert {"in_json", "color_aug", "token_warmup_min", "token_warmup_step", "debug_dataset", "dataset_repeats",
            "mem_eff_attn", "xformers", "persistent_data_loader_workers", "no_metadata"} == set(loaded.ignored_keys)
    assert "train_data_dir" in loaded.ignored_keys["in_json"]
    assert loaded.unknown_keys == []
    assert roundtrip(c, tmp_path) == c


# ---- loading ---------------------------------------------------------------------------------------------------

def test_flat_and_sectioned_files_give_the_same_config(tmp_path):
    flat = write(tmp_path, 'network_dim = 8\noptimizer_type = "Prodigy"\nresolution = 640\n', "flat.toml")
    sectioned = write(tmp_path, '[additional_network_arguments]\nnetwork_dim = 8\n[optimizer_arguments]\n'
                                'optimizer_type = "Prodigy"\n[dataset_arguments]\nresolution = 640\n', "sect.toml")
    a, b = load_toml(flat).config, load_toml(sectioned).config
    assert a == b
    assert (a.network.network_dim, a.optimizer.optimizer_type, a.dataset.resolution) == (8, "Prodigy", (640, 640))
    assert a.model == TrainConfig().model  # untouched sections keep their defaults


def test_config_from_dict_flattens_sections_and_reports_deeper_tables():
    loaded = config_from_dict({"sdxl_arguments": {"cache_text_encoder_outputs": True},
                               "model_arguments": {"clip_skip": 2, "extra": {"a": 1}}})
    assert loaded.config.model.sdxl and loaded.config.dataset.cache_text_encoder_outputs
    assert loaded.config.model.clip_skip == 2
    assert loaded.unknown_keys == ["extra"]
    assert any("extra" in w and "nested" in w for w in loaded.warnings)


def test_unknown_keys_are_reported_by_name_not_dropped_silently(tmp_path, caplog):
    path = write(tmp_path, 'network_dim = 8\nnetwork_dimm = 16\n[training_arguments]\nmy_own_flag = true\n')
    with caplog.at_level(logging.WARNING, logger="lora_trainer.config"):
        loaded = load_toml(path)
    assert loaded.unknown_keys == ["network_dimm", "my_own_flag"]
    assert loaded.config.network.network_dim == 8
    assert "network_dimm" in caplog.text and "my_own_flag" in caplog.text


@pytest.mark.parametrize("text, key", [
    ("color_aug = true", "color_aug"),
    ("token_warmup_step = 5", "token_warmup_step"),
    ("weighted_captions = true", "weighted_captions"),
    ('loss_type = "huber"', "loss_type"),
    ('save_model_as = "ckpt"', "save_model_as"),
    ('model_train_type = "flux-lora"', "model_train_type"),
])
def test_unsupported_kohya_features_are_refused_not_ignored(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_toml(write(tmp_path, text + "\n"))
    message = str(info.value)
    assert "run.toml" in message and key in message
    assert "Remove" in message or "Use" in message or "Set" in message


def test_ignored_keys_at_neutral_values_are_listed_with_reasons(tmp_path):
    loaded = load_toml(write(tmp_path, 'color_aug = false\nlog_tracker_name = "x"\nmodel_train_type = "sdxl-lora"\n'
                                       'caption_extention = ".caption"\n'))
    assert set(loaded.ignored_keys) == {"color_aug", "log_tracker_name", "model_train_type"}
    assert all(reason for reason in loaded.ignored_keys.values())
    assert loaded.config.model.sdxl  # model_train_type names sdxl
    assert loaded.config.dataset.caption_extension == ".caption"  # kohya's old spelling
    assert any("caption_extention" in w for w in loaded.warnings)


def test_key_set_twice_in_sections_warns_and_last_wins(tmp_path):
    loaded = load_toml(write(tmp_path, '[a]\nkeep_tokens = 1\n[b]\nkeep_tokens = 2\n'))
    assert loaded.config.dataset.keep_tokens == 2
    assert any("keep_tokens" in w and "more than once" in w for w in loaded.warnings)


def test_bad_toml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="run.toml.*not valid TOML"):
        load_toml(write(tmp_path, 'pretrained_model_name_or_path = C:\\models\\x.safetensors\n'))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_toml(tmp_path / "nope.toml")


# ---- validation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, needles", [
    ({"network_dim": 0}, ["network_dim", "0", "at least 1"]),
    ({"network_dim": -4}, ["network_dim", "-4"]),
    ({"optimizer_type": "Adam"}, ["optimizer_type", "'Adam'", *OPTIMIZERS]),
    ({"lr_scheduler": "cosine_annealing"}, ["lr_scheduler", "cosine_annealing", *SCHEDULERS]),
    ({"mixed_precision": "fp8"}, ["mixed_precision", "fp8", "bf16"]),
    ({"save_precision": "int8"}, ["save_precision", "int8", "float"]),
    ({"resolution": "768,1024,3"}, ["resolution", "width,height"]),
    ({"resolution": "abc"}, ["resolution", "abc"]),
    ({"resolution": 500}, ["resolution", "multiples of 8"]),
    ({"learning_rate": -1e-4}, ["learning_rate", "negative"]),
    ({"text_encoder_lr": -1.0}, ["text_encoder_lr", "negative"]),
    ({"max_token_length": 100}, ["max_token_length", "100", "75, 150, 225"]),
    ({"network_dropout": 1.5}, ["network_dropout", "1.5"]),
    ({"lr_warmup_steps": 10}, ["lr_warmup_steps", "constant_with_warmup"]),
    ({"lr_warmup_steps": -3, "lr_scheduler": "linear"}, ["lr_warmup_steps", "negative"]),
    ({"lr_warmup_steps": 2.5, "lr_scheduler": "linear"}, ["lr_warmup_steps", "2.5"]),
    ({"full_fp16": True, "mixed_precision": "bf16"}, ["full_fp16", "fp16"]),
    ({"caption_extension": "txt"}, ["caption_extension", ".txt"]),
    ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, ["nothing would train"]),
    ({"min_timestep": 500, "max_timestep": 100}, ["min_timestep"]),
    ({"network_module": "networks.dylora"}, ["network_module", "lycoris.kohya"]),
    ({"network_args": ["algo=dylora"], "network_module": "lycoris.kohya"}, ["algo", "dylora", *NETWORK_ALGOS]),
    ({"network_args": ["algo=loha"]}, ["network_module", "lycoris.kohya"]),
    ({"network_args": ["conv_dim"]}, ["network_args", "key=value"]),
    ({"network_args": ["block_dims=2,4"]}, ["block_dims", "25"]),
    ({"train_batch_size": "four"}, ["train_batch_size", "four", "whole number"]),
    ({"shuffle_caption": "maybe"}, ["shuffle_caption", "true or false"]),
    ({"output_name": "a/b"}, ["output_name", "output_dir"]),
    ({"v2": True, "sdxl": True}, ["sdxl", "v2"]),
])
def test_invalid_values_raise_config_error_naming_key_value_and_fix(data, needles):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert message.rstrip().endswith(".")  # "<key> = <value>: <problem>. <fix>."


def test_optimizer_and_scheduler_names_match_case_insensitively_and_keep_canonical_spelling():
    for written, canonical in [("adamw8bit", "AdamW8bit"), ("PAGEDADAMW8BIT", "PagedAdamW8bit"),
                               ("dadaptadam", "DAdaptAdam"), ("sgdnesterov", "SGDNesterov")]:
        assert config_from_dict({"optimizer_type": written}).config.optimizer.optimizer_type == canonical
    assert config_from_dict({"lr_scheduler": "Cosine"}).config.optimizer.lr_scheduler == "cosine"
    assert config_from_dict({"save_precision": "fp32"}).config.save.save_precision == "float"


@pytest.mark.parametrize("value, expected", [
    ("768,1024", (768, 1024)), (512, (512, 512)), ("640", (640, 640)), ([640, 448], (640, 448)),
    ("1024x768", (1024, 768)),
])
def test_resolution_is_width_height(value, expected):
    assert config_from_dict({"resolution": value}).config.dataset.resolution == expected


def test_lr_warmup_steps_is_steps_or_ratio():
    ratio = config_from_dict({"lr_warmup_steps": 0.05, "lr_scheduler": "cosine"}).config.optimizer
    assert ratio.lr_warmup_steps == 0.05 and ratio.warmup_steps(1000) == 50
    steps = config_from_dict({"lr_warmup_steps": 100.0, "lr_scheduler": "cosine"}).config.optimizer
    assert steps.lr_warmup_steps == 100 and isinstance(steps.lr_warmup_steps, int)
    assert steps.warmup_steps(1000) == 100


def test_max_token_length_above_225_is_clamped_with_a_warning():
    loaded = config_from_dict({"max_token_length": 255})
    assert loaded.config.model.max_token_length == 225
    assert any("255" in w and "225" in w for w in loaded.warnings)
    assert config_from_dict({"max_token_length": 150}).warnings == []


# ---- network_args ----------------------------------------------------------------------------------------------

def test_kohya_network_args_parse_into_fields_and_unknown_ones_are_kept_and_reported(tmp_path):
    up = ",".join(["1"] * 12)
    loaded = config_from_dict({"network_module": "networks.lora", "network_dim": 8, "network_args": [
        "conv_dim=8", "conv_alpha=4", "rank_dropout=0.1", "module_dropout=0.2", "down_lr_weight=sine",
        "mid_lr_weight=0.5", f"up_lr_weight={up}", "block_lr_zero_threshold=0.1", "loraplus_lr_ratio=16"]})
    n = loaded.config.network
    assert (n.conv_dim, n.conv_alpha, n.rank_dropout, n.module_dropout) == (8, 4.0, 0.1, 0.2)
    assert n.effective_algo == "locon"
    assert len(n.down_lr_weight) == 12 and n.down_lr_weight[0] == 0.0 and n.down_lr_weight[-1] == pytest.approx(1)
    assert n.mid_lr_weight == 0.5 and n.up_lr_weight == (1.0,) * 12 and n.block_lr_zero_threshold == 0.1
    assert n.network_args == ("loraplus_lr_ratio=16",)
    assert "network_args.loraplus_lr_ratio" in loaded.ignored_keys
    args = to_kohya_dict(loaded.config)["network_args"]
    assert "conv_dim=8" in args and "loraplus_lr_ratio=16" in args and "algo=lora" not in args
    assert roundtrip(loaded.config, tmp_path) == loaded.config


def test_block_lr_presets_follow_kohya_curves():
    sine = block_lr_preset("down_lr_weight", "sine")
    assert sine[0] == 0.0 and sine[-1] == pytest.approx(1.0) and list(sine) == sorted(sine)
    assert block_lr_preset("up_lr_weight", "cosine") == tuple(reversed(sine))
    assert block_lr_preset("up_lr_weight", "zeros+.25") == (0.25,) * 12
    with pytest.raises(ConfigError, match="down_lr_weight.*sine"):
        block_lr_preset("down_lr_weight", "wave")


def test_block_dims_need_25_values_and_round_trip(tmp_path):
    dims = ",".join(str(2 + i % 3) for i in range(25))
    config = config_from_dict({"network_args": [f"block_dims={dims}", f"block_alphas={dims}"]}).config
    assert config.network.block_dims == tuple(2 + i % 3 for i in range(25))
    assert config.network.block_alphas == tuple(float(2 + i % 3) for i in range(25))
    assert roundtrip(config, tmp_path) == config


def test_lycoris_without_conv_dim_trains_convs_at_network_dim_like_lycoris():
    loaded = config_from_dict({"network_module": "lycoris.kohya", "network_dim": 8, "network_alpha": 4})
    n = loaded.config.network
    assert (n.algo, n.conv_dim, n.conv_alpha, n.effective_algo) == ("lora", 8, 4.0, "locon")
    assert any("conv_dim" in w for w in loaded.warnings)


def test_kohya_conv_alpha_defaults_to_one():
    n = config_from_dict({"network_args": ["conv_dim=4"]}).config.network
    assert (n.conv_dim, n.conv_alpha) == (4, 1.0)
    assert config_from_dict({"network_args": ["conv_dim=0"]}).config.network.effective_algo == "lora"


# ---- save / round trip -----------------------------------------------------------------------------------------

def test_save_toml_is_sectioned_kohya_with_version_and_leaves_no_temp_files(tmp_path):
    config = config_from_dict({"network_args": ["conv_dim=4"], "resolution": "768,1024", "seed": 7}).config
    path = save_toml(config, tmp_path / "out" / "lora.toml")
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    assert document["lora_trainer_version"] == __version__
    assert document["dataset_arguments"]["resolution"] == "768,1024"
    assert document["additional_network_arguments"]["network_args"] == ["conv_dim=4", "conv_alpha=1.0"]
    assert "conv_dim" not in document["additional_network_arguments"]  # kohya reads it from network_args
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.toml"]
    assert load_toml(path).config == config


def test_to_kohya_dict_has_only_known_kohya_or_our_keys_and_no_none():
    flat = to_kohya_dict(preset_config("sd1_style_loha"))
    assert all(value is not None for value in flat.values())
    assert set(flat) <= set(FIELDS)
    assert flat["network_args"] == ["algo=loha", "conv_dim=4", "conv_alpha=2.0", "dropout=0.1"]
    assert flat["resolution"] == "768,768" and flat["optimizer_type"] == "Lion"


def test_every_field_default_survives_coercion_and_the_table_is_complete():
    for key, spec in FIELDS.items():
        assert coerce(key, spec.default) == spec.default, key
    assert FIELDS["network_dim"].section == "network" and FIELDS["network_dim"].default == 4
    assert FIELDS["resolution"].default == (512, 512) and FIELDS["lr_warmup_steps"].type == "int | float"
    assert not set(FIELDS) & set(IGNORED_KEYS)


def test_config_is_frozen():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.network.network_dim = 8


# ---- overrides -------------------------------------------------------------------------------------------------

def test_apply_overrides_coerces_to_field_types():
    base = TrainConfig()
    new = apply_overrides(base, ["network_dim=16", "network.network_alpha=8", "learning_rate=2e-4",
                                 "shuffle_caption=true", "resolution=768,1024", "seed=none",
                                 'output_name="my lora"', 'optimizer_args=["weight_decay=0.1"]',
                                 "lr_scheduler=COSINE", "lr_warmup_steps=0.1"])
    assert (new.network.network_dim, new.network.network_alpha, new.optimizer.learning_rate) == (16, 8.0, 2e-4)
    assert new.dataset.shuffle_caption and new.dataset.resolution == (768, 1024)
    assert new.training.seed is None and new.save.output_name == "my lora"
    assert new.optimizer.optimizer_args == ("weight_decay=0.1",)
    assert (new.optimizer.lr_scheduler, new.optimizer.lr_warmup_steps) == ("cosine", 0.1)
    assert base == TrainConfig()  # the original is untouched
    assert apply_overrides(base, []) is base


def test_override_of_network_args_parses_them():
    new = apply_overrides(TrainConfig(), ["network_module=lycoris.kohya",
                                          'network_args=["algo=loha", "conv_dim=4", "conv_alpha=2"]'])
    assert (new.network.effective_algo, new.network.conv_dim, new.network.conv_alpha) == ("loha", 4, 2.0)
    assert apply_overrides(new, ["conv_dim=8"]).network.conv_dim == 8


@pytest.mark.parametrize("override, needles", [
    ("network_dimm=16", ["network_dimm", "network_dim"]),
    ("dataset.network_dim=16", ["dataset.network_dim"]),
    ("color_aug=true", ["color_aug", "no effect"]),
    ("network_dim", ["key=value"]),
    ("network_dim=abc", ["network_dim", "abc"]),
    ("optimizer_type=adam", ["optimizer_type", "AdamW"]),
])
def test_bad_overrides_raise_config_error(override, needles):
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), [override])
    for needle in needles:
        assert needle in str(info.value)


# ---- presets ---------------------------------------------------------------------------------------------------

def test_presets_match_design(tmp_path):
    assert set(PRESETS) == {"sd1_style_lora", "sd1_style_loha", "sd1_character_lora", "sdxl_lora"}
    style = preset_config("sd1_style_lora")
    assert (style.network.network_dim, style.network.network_alpha, style.optimizer.optimizer_type) == (
        128, 128.0, "Lion")
    assert (style.optimizer.lr_scheduler_num_cycles, style.training.min_snr_gamma) == (3, 5.0)
    assert (style.dataset.max_bucket_reso, style.model.clip_skip, style.model.mixed_precision) == (1536, 2, "bf16")
    loha = preset_config("sd1_style_loha")
    assert (loha.network.effective_algo, loha.network.network_dim, loha.network.conv_dim) == ("loha", 16, 4)
    assert loha.optimizer.text_encoder_lr == 5e-6
    character = preset_config("sd1_character_lora")
    assert (character.optimizer.optimizer_type, character.optimizer.warmup_steps(5000)) == ("AdamW8bit", 250)
    sdxl = preset_config("sdxl_lora", train_data_dir="/data/x", conv_dim=32, conv_alpha=16)
    assert sdxl.model.sdxl and sdxl.network.network_train_unet_only and sdxl.dataset.cache_text_encoder_outputs
    assert "relative_step=False" in sdxl.optimizer.optimizer_args and sdxl.optimizer.lr_warmup_steps == 100
    assert (sdxl.network.effective_algo, sdxl.dataset.train_data_dir) == ("locon", "/data/x")
    for name in PRESETS:
        config = preset_config(name)
        assert roundtrip(config, tmp_path / name) == config


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="sd1_style_lora"):
        preset_config("style")


def test_update_config_validates():
    with pytest.raises(ConfigError, match="network_dim"):
        update_config(preset_config("sd1_style_lora"), {"network_dim": 0})
