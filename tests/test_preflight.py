"""Checks before training: errors shown by one rule, output folder and name, leftovers of killed saves, resume state,
the step plan, the network's size estimate, the external VAE, and corrupt images found while caching latents."""
from __future__ import annotations

import errno
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.config import TrainConfig, update_config
from lora_trainer.errors import (
    EXIT_BUG, EXIT_CONFIG, EXIT_FAILED, ConfigError, ModelLoadError, TrainingError, describe_error,
)
from lora_trainer.models.checkpoint import read_state_dict
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.networks import LoRANetwork
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train.preflight import (
    check_before_model, check_output, check_output_name, clean_leftovers, describe_plan,
)
from lora_trainer.train.preparation import plan_steps
from lora_trainer.train.resources import check_resources, count_network_parameters
from lora_trainer.train.state import check_state_folder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter(tiny_sd1):
    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                   tokenizer_dir=tiny_sd1.tokenizer_dir)


def _config(tiny, data, out, **values) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(tiny.checkpoint), diffusers_config_dir=str(tiny.config_dir),
                tokenizer_dir=str(tiny.tokenizer_dir), train_data_dir=str(data), output_dir=str(out),
                output_name="t", resolution=(64, 64), max_train_steps=4, seed=7, cache_latents=True)
    base.update(values)
    return update_config(TrainConfig(), base)


def mount_tmpfs(path: Path, options: str) -> None:
    """Mount a tmpfs (root only); skips the test with the reason when mounting is not allowed here."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root in a "
                    "container that allows mounts")


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a read-only file system (chmod does not stop root, a read-only mount does)."""
    path = tmp_path / "ro"
    mount_tmpfs(path, "ro,size=1m")
    yield path
    subprocess.run(["umount", str(path)], check=False)


# -- one rule for errors ----------------------------------------------------------------------------------------------
def test_describe_error_separates_mistakes_from_bugs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as info:
        os.makedirs(tmp_path / "file" / "sub")
    report = describe_error(info.value)
    assert report.expected and report.exit_code == EXIT_FAILED
    assert str(tmp_path / "file") in report.message and "regular file" in report.message

    full = describe_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.safetensors")))
    assert full.expected and "a.safetensors" in full.message and "Free disk space" in full.message
    assert describe_error(ConfigError("network_dim: bad. Fix.")).exit_code == EXIT_CONFIG
    oom = describe_error(RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: not enough memory"))
    assert oom.expected and "network_dim" in oom.message
    with pytest.raises(ValueError) as info:
        int("not a number")  # a ValueError from outside the package is not a message written for the user
    bug = describe_error(info.value)
    assert not bug.expected and bug.exit_code == EXIT_BUG and "ValueError" in bug.message


def test_cli_shows_a_bug_with_its_traceback_and_a_mistake_without():
    import io

    from lora_trainer.__main__ import report_error

    try:
        None.split()  # a real bug: AttributeError with a traceback
    except AttributeError as exc:
        stream = io.StringIO()
        assert report_error(exc, stream) == EXIT_BUG
    shown = stream.getvalue()
    assert "Traceback" in shown and "This is a bug in lora_trainer" in shown
    stream = io.StringIO()
    assert report_error(ConfigError("network_dim: 0 is not positive. Use 1 or more."), stream) == EXIT_CONFIG
    assert stream.getvalue() == "error: network_dim: 0 is not positive. Use 1 or more.\n"


# -- output folder and name --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a\0b", "sub/name", "..", ""])
def test_output_name_that_is_no_file_name_is_refused(name):
    with pytest.raises(ConfigError, match="output_name"):
        check_output_name(name)


def test_output_name_too_long_for_the_file_system_is_refused(tmp_path):
    config = update_config(TrainConfig(), {"output_dir": str(tmp_path / "out"), "output_name": "x" * 230})
    with pytest.raises(ConfigError, match="output_name: 230 characters is too long"):
        check_output(config)
    check_output(update_config(config, {"output_name": "x" * 200}))  # 200 + the longest suffix still fits
    assert not [p for p in (tmp_path / "out").iterdir()], "the probe file is removed"


def test_output_dir_below_a_file_names_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    config = update_config(TrainConfig(), {"output_dir": str(tmp_path / "file" / "out")})
    with pytest.raises(ConfigError, match=f"{tmp_path / 'file'} is a regular file"):
        check_output(config)


def test_read_only_output_dir_is_refused(read_only_dir):
    config = update_config(TrainConfig(), {"output_dir": str(read_only_dir / "out")})
    with pytest.raises(ConfigError, match="output_dir: .* cannot be created .*[Rr]ead-only"):
        check_output(config)
    with pytest.raises(ConfigError, match="output_dir: .* is not writable .*[Rr]ead-only"):
        check_output(update_config(config, {"output_dir": str(read_only_dir)}))


# -- leftovers of a killed save ----------------------------------------------------------------------------------------
def test_leftovers_of_this_run_are_removed_and_a_lone_old_state_restored(tmp_path):
    temp = tmp_path / ".t-step00000002.safetensors.0a1b2c3d.tmp"
    temp.write_bytes(b"half")
    half_state = tmp_path / ".t-step00000002-state.k3j4h5g6"
    half_state.mkdir()
    (half_state / "network.safetensors").write_bytes(b"half")
    lone_old = tmp_path / ".t-state.old"
    lone_old.mkdir()
    (lone_old / "train_state.json").write_text("{}")
    other = tmp_path / ".other.safetensors.0a1b2c3d.tmp"
    other.write_bytes(b"another run's")

    done = clean_leftovers(tmp_path, "t")

    assert not temp.exists() and not half_state.exists() and other.exists()
    assert (tmp_path / "t-state" / "train_state.json").is_file() and not lone_old.exists()
    assert len(done) == 3 and any(str(temp) in line for line in done)


# -- resume state -------------------------------------------------------------------------------------------------------
def test_corrupt_train_state_is_named(tmp_path):
    for name in ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "train_state.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TrainingError, match=f"{tmp_path / 'train_state.json'} is corrupt"):
        check_state_folder(tmp_path)


# -- the step plan -----------------------------------------------------------------------------------------------------
def test_plan_says_which_key_wins():
    plan = plan_steps(75, 1, 6, 3)
    assert plan.total_steps == 225
    assert describe_plan(plan, 6, 3) == ("training plan: 225 steps (max_train_epochs = 3 wins over max_train_steps "
                                         "= 6: 75 steps per epoch x 3 epochs)")
    assert "max_train_steps = 6:" in describe_plan(plan_steps(75, 1, 6, None), 6, None)


def test_checks_before_the_model_scan_the_dataset_and_plan(tiny_sd1, tmp_path):
    data = write_square_dataset(tmp_path / "data", folder="3_sq", count=4)
    config = _config(tiny_sd1, data, tmp_path / "out", max_train_epochs=2, max_train_steps=5, train_batch_size=2)
    checked = check_before_model(config, "cpu")
    assert len(checked.index.items) == 4 and checked.plan.total_steps == 12
    assert "max_train_epochs = 2 wins over max_train_steps = 5" in checked.plan_note
    with pytest.raises(ConfigError, match="--device cuda"):
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
        check_before_model(config, "cuda")


# -- network size, memory and disk --------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [{"network_dim": 4}, {"network_dim": 8, "conv_dim": 4},
                                    {"network_dim": 4, "algo": "loha", "network_module": "lycoris.kohya", "network_train_unet_only": True}])
def test_parameter_estimate_matches_the_network(adapter, values):
    config = update_config(TrainConfig(), values)
    include_conv = bool(config.network.conv_dim)
    network = LoRANetwork.create(adapter.lora_targets(include_conv), config.network)
    actual = sum(p.numel() for p in network.parameters() if p.requires_grad)
    estimate = count_network_parameters(adapter.lora_targets(include_conv), config.network)
    assert abs(estimate - actual) <= 0.01 * actual, (estimate, actual)


def test_huge_rank_is_refused_before_anything_is_allocated(tiny_sd1, adapter, tmp_path):
    # Ranks are capped at 4096 by the config; what does not fit is a large rank on a device with little free memory.
    config = _config(tiny_sd1, tmp_path, tmp_path, network_dim=4096)
    with pytest.raises(TrainingError, match="network_dim: a rank of 4096 .* needing about .* has 16.0 MiB free"):
        check_resources(config, adapter, plan_steps(4, 1, 4, None), tmp_path, free_memory=16 * 2**20)


def test_saves_that_do_not_fit_on_the_disk_are_refused(tiny_sd1, adapter, tmp_path):
    small = tmp_path / "small"
    mount_tmpfs(small, "size=256k")
    try:
        config = _config(tiny_sd1, tmp_path, small, network_dim=64, save_every_n_steps=1, save_state=True)
        with pytest.raises(TrainingError, match=f"output_dir: {small} has .* free"):
            check_resources(config, adapter, plan_steps(4, 1, 4, None), small)
    finally:
        subprocess.run(["umount", str(small)], check=False)


# -- checkpoints that cannot be read -----------------------------------------------------------------------------------
def test_unreadable_checkpoint_says_why(tmp_path):
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="is a folder"):
        read_state_dict(folder)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file .* download or save it again"):
        read_state_dict(tmp_path / "bad.safetensors")


# -- external VAE ------------------------------------------------------------------------------------------------------
def test_external_vae_replaces_the_checkpoints_own(tiny_sd1, adapter, tmp_path):
    prefix = "first_stage_model."
    vae = {k[len(prefix):]: v.clone() for k, v in load_file(str(tiny_sd1.checkpoint)).items() if k.startswith(prefix)}
    vae["decoder.conv_out.weight"] *= 0.5
    save_file(vae, str(tmp_path / "vae.safetensors"))

    with_vae = load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                       tokenizer_dir=tiny_sd1.tokenizer_dir, vae=tmp_path / "vae.safetensors")

    loaded = with_vae.vae().decoder.conv_out.weight
    assert torch.equal(loaded, vae["decoder.conv_out.weight"])
    assert not torch.equal(loaded, adapter.vae().decoder.conv_out.weight)
    assert with_vae.model_id != adapter.model_id, "cached latents must follow the VAE"
    with pytest.raises(ModelLoadError, match="vae: .*missing.safetensors"):
        load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                tokenizer_dir=tiny_sd1.tokenizer_dir, vae=tmp_path / "missing.safetensors")


def test_missing_vae_is_refused_before_the_model_loads(tiny_sd1, tmp_path):
    data = write_square_dataset(tmp_path / "data")
    config = _config(tiny_sd1, data, tmp_path / "out", vae=str(tmp_path / "vae.safetensors"))
    with pytest.raises(FileNotFoundError, match="vae: .*vae.safetensors not found"):
        check_before_model(config, loads_checkpoint=True)


# -- corrupt image data found while caching -----------------------------------------------------------------------------
def corrupt_png_data(path: Path) -> None:
    """Break a PNG's compressed pixels but keep every chunk CRC valid: the header opens, decoding fails."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    body = start + 8
    for i in range(body + 2, body + length):
        data[i] ^= 0x5A
    crc = zlib.crc32(bytes(data[start + 4:body + length])) & 0xFFFFFFFF
    data[body + length:body + length + 4] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_image_corrupt_past_its_header_is_skipped_while_caching(tiny_sd1, adapter, tmp_path, caplog):
    from lora_trainer.data.folders import scan_dataset
    from lora_trainer.data.loader import TrainDataset

    data = write_square_dataset(tmp_path / "data", folder="1_sq", count=3)
    bad = data / "1_sq" / "001.png"
    corrupt_png_data(bad)
    config = _config(tiny_sd1, data, tmp_path / "out", train_batch_size=3)
    index = scan_dataset(config.dataset)
    assert len(index.items) == 3, "the scan cannot see this corruption (the chunk CRCs are valid)"
    dataset = TrainDataset(index, config.dataset, adapter.model_id, adapter.encode_images)

    report = dataset.cache_latents(batch_size=3)

    assert report.skipped == (str(bad),) and report.encoded == 2
    assert [item.path for item in dataset.items] == [str(data / "1_sq" / "000.png"), str(data / "1_sq" / "002.png")]
    assert f"{bad}: image data cannot be decoded" in caplog.text and "(skipped)" in caplog.text
    batch = dataset.load_batch(dataset.epoch_batches(1, 0)[0], 0, 1, 0)
    assert batch.latents.shape[0] == 2


# -- a disk that fills up during a save ---------------------------------------------------------------------------------
def test_full_disk_during_a_save_names_the_file_and_keeps_the_old_one(tmp_path):
    from lora_trainer.atomic_io import FileWriteError, atomic_write_bytes, temp_files

    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=64k")
    try:
        target = disk / "t.safetensors"
        atomic_write_bytes(target, b"old")
        with pytest.raises(FileWriteError) as info:
            atomic_write_bytes(target, b"x" * 200_000)
        assert info.value.errno == errno.ENOSPC
        assert describe_error(info.value).message.startswith(f"{target}: cannot be written (No space left")
        assert "Free disk space" in str(info.value)
        assert target.read_bytes() == b"old" and temp_files(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_image_corrupt_past_its_header_is_left_out_of_its_batch_without_caching(tiny_sd1, adapter, tmp_path, caplog):
    from lora_trainer.data.folders import scan_dataset
    from lora_trainer.data.loader import TrainDataset

    data = write_square_dataset(tmp_path / "data", folder="1_sq", count=3)
    bad = data / "1_sq" / "002.png"
    corrupt_png_data(bad)
    config = _config(tiny_sd1, data, tmp_path / "out", train_batch_size=3, cache_latents=False)
    dataset = TrainDataset(scan_dataset(config.dataset), config.dataset, adapter.model_id, adapter.encode_images)

    batch = dataset.load_batch(dataset.epoch_batches(1, 0)[0], 0, 1, 0)

    assert sorted(batch.paths) == [str(data / "1_sq" / "000.png"), str(data / "1_sq" / "001.png")]
    assert batch.latents.shape[0] == len(batch.captions) == len(batch.loss_weights) == batch.size_cond.shape[0] == 2
    assert f"{bad}: image data cannot be decoded" in caplog.text
