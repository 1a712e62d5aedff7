"""LoRA files: atomic save, load, algorithm detection, kohya/addnet hashes, ss_* metadata."""
from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch

from lora_trainer.errors import NetworkError
from lora_trainer.networks import (
    TrainingFacts, base_model_version, build_metadata, detect_algorithm, kohya_hashes, load_lora, model_hashes,
    save_lora,
)

ZEROS_16_SHA256 = "374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb"
EMPTY_SHA256_8 = "e3b0c442"


def test_hashes_of_a_known_small_file(tmp_path):
    path = save_lora(tmp_path / "z.safetensors", {"w": torch.zeros(4)}, {"ss_x": "1"}, add_hashes=False)
    # Model hash covers only the bytes after the header: the 16 zero bytes of the tensor.
    # Legacy hash reads the window at 1 MiB, which is empty for a small file.
    assert model_hashes(path) == (ZEROS_16_SHA256, EMPTY_SHA256_8)
    assert model_hashes(path.read_bytes()) == (ZEROS_16_SHA256, EMPTY_SHA256_8)


def test_hashes_of_a_large_file_match_the_byte_windows(tmp_path):
    sd = {"a": torch.arange(400_000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}
    meta = {"ss_network_dim": "4", "ss_output_name": "x"}
    path = save_lora(tmp_path / "big.safetensors", sd, meta, add_hashes=False)
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert model_hashes(path) == (hashlib.sha256(raw[8 + header:]).hexdigest(),
                                  hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8])
    # kohya precalculates over tensors + ss_* metadata only: for a file holding just those, the same values.
    assert kohya_hashes(sd, {**meta, "user_note": "not hashed"}) == model_hashes(path)


def test_save_adds_kohya_hashes_that_survive_metadata_changes(tmp_path):
    sd = {"lora_unet_x.lora_down.weight": torch.randn(2, 3), "lora_unet_x.alpha": torch.tensor(1.0)}
    path = save_lora(tmp_path / "h.safetensors", sd, {"ss_network_dim": "2", "modelspec.title": "t"})
    loaded, meta = load_lora(path)
    assert meta["sshs_model_hash"] == model_hashes(path)[0]
    assert meta["sshs_legacy_hash"] == kohya_hashes(sd, {"ss_network_dim": "2"})[1]
    assert meta["modelspec.title"] == "t"
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_failed_write_leaves_old_file_intact_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "keep.safetensors"
    save_lora(path, {"w": torch.ones(2)}, {"ss_a": "old"})
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_lora(path, {"w": torch.zeros(2)}, {"ss_a": "new"})
    with pytest.raises(OSError):
        save_lora(tmp_path / "new.safetensors", {"w": torch.zeros(2)}, {})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_non_string_metadata_is_refused_by_key(tmp_path):
    with pytest.raises(ValueError, match="ss_network_dim"):
        save_lora(tmp_path / "m.safetensors", {"w": torch.ones(1)}, {"ss_network_dim": 4})
    assert not any(tmp_path.iterdir())


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(NetworkError, match="broken.safetensors"):
        load_lora(broken)


def test_detect_algorithm():
    assert detect_algorithm(["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha"]) \
        == "lora"
    assert detect_algorithm(["lora_te_a.hada_w1_a", "lora_te_a.hada_w2_b", "lora_te_a.alpha"]) == "loha"
    assert detect_algorithm(["lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2", "lora_unet_a.alpha"]) == "lokr"
    with pytest.raises(NetworkError, match="lokr_w1"):
        detect_algorithm(["lora_unet_a.oft_blocks", "lora_unet_a.alpha"])


def _config(algo="lora", network_module=None):
    return SimpleNamespace(
        model=SimpleNamespace(v2=False, v_parameterization=False, clip_skip=2, max_token_length=225,
                              mixed_precision="bf16", full_fp16=False, gradient_checkpointing=True, lowram=False),
        network=SimpleNamespace(network_module=network_module, algo=algo, network_dim=16, network_alpha=8.0,
                                conv_dim=4, conv_alpha=2.0, network_dropout=None, rank_dropout=0.1,
                                module_dropout=None, network_args=[], block_dims=None),
        optimizer=SimpleNamespace(optimizer_type="AdamW8bit", learning_rate=1e-4, unet_lr=1e-4,
                                  text_encoder_lr=5e-6, optimizer_args=["weight_decay=0.1"],
                                  lr_scheduler="cosine", lr_warmup_steps=50, max_grad_norm=1.0,
                                  gradient_accumulation_steps=1),
        dataset=SimpleNamespace(resolution=(768, 512), train_batch_size=4, shuffle_caption=True, keep_tokens=1,
                                caption_dropout_rate=0.0, caption_tag_dropout_rate=0.2, flip_aug=False,
                                cache_latents=True, enable_bucket=True, min_bucket_reso=256,
                                max_bucket_reso=1536),
        training=SimpleNamespace(seed=42, noise_offset=0.0, multires_noise_iterations=6,
                                 multires_noise_discount=0.3, min_snr_gamma=5.0),
        save=SimpleNamespace(output_name="mychar"),
    )


REQUIRED = [
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2",
    "ss_sd_model_name", "ss_new_sd_model_hash", "ss_dataset_dirs", "ss_tag_frequency", "ss_bucket_info",
    "ss_optimizer", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_train_steps", "ss_num_epochs",
    "ss_epoch", "ss_steps", "ss_seed", "ss_clip_skip", "ss_resolution", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_min_snr_gamma", "ss_lr_scheduler",
    "ss_lr_warmup_steps", "ss_training_started_at", "ss_training_finished_at", "ss_output_name",
    "ss_training_comment", "ss_mixed_precision", "ss_full_fp16", "ss_gradient_checkpointing",
    "ss_gradient_accumulation_steps", "ss_num_train_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_batch_size_per_device", "ss_caption_dropout_rate", "ss_caption_tag_dropout_rate", "ss_shuffle_caption",
    "ss_keep_tokens", "ss_flip_aug", "ss_max_token_length", "ss_cache_latents", "ss_session_id",
]


def test_build_metadata_has_kohya_keys_as_strings(tmp_path):
    facts = TrainingFacts(
        session_id=123, training_started_at=1700000000.0, training_finished_at=1700003600.0, epoch=3, steps=300,
        num_epochs=10, max_train_steps=1000, num_train_images=300, num_batches_per_epoch=75,
        sd_model_name="model.safetensors", new_sd_model_hash="abc123",
        dataset_dirs={"10_mychar": {"n_repeats": 10, "img_count": 30}},
        tag_frequency={"10_mychar": {"1girl": 30, "smile": 12}},
        bucket_info={"buckets": {"0": {"resolution": [768, 512], "count": 300}}, "mean_img_ar_error": 0.0},
    )
    meta = build_metadata(_config(), facts, "sd1")
    missing = [k for k in REQUIRED if k not in meta]
    assert not missing
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "8.0")
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_optimizer"] == "AdamW8bit(weight_decay=0.1)"
    assert meta["ss_resolution"] == "(768, 512)" and meta["ss_epoch"] == "3" and meta["ss_steps"] == "300"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_mychar": {"n_repeats": 10, "img_count": 30}}
    assert json.loads(meta["ss_tag_frequency"])["10_mychar"]["1girl"] == 30
    assert meta["ss_new_sd_model_hash"] == "abc123" and meta["ss_training_comment"] == "None"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    save_lora(tmp_path / "m.safetensors", {"w": torch.ones(1)}, meta)
    assert load_lora(tmp_path / "m.safetensors")[1]["ss_tag_frequency"] == meta["ss_tag_frequency"]


def test_loha_module_name_and_base_model_versions():
    meta = build_metadata(_config(algo="loha"), TrainingFacts(), "sdxl", modelspec=False)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and not any(k.startswith("modelspec") for k in meta)
    assert build_metadata(_config(), TrainingFacts(), "sd2-v")["ss_v2"] == "True"
    assert [base_model_version(a) for a in ("sd1", "sd2", "sd2-v", "sdxl")] == \
        ["sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"]
    assert base_model_version("sd2", v_parameterization=True) == "sd_v2_v"
    with pytest.raises(ValueError, match="sd3"):
        base_model_version("sd3")
