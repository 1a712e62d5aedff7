"""The models-folder listing (nested checkpoints, architecture from the header only) and the checkpoint checks that
run before the model loads."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.checkpoint_list import inspect_checkpoint, list_checkpoints, read_safetensors_shapes
from lora_trainer.testing.tiny_models import full_size_original_state_dict

HUGE = 8 << 30  # the tensor bytes a full-size file would have after its header


def _sparse_checkpoint(path: Path, arch: str, **changed: list[int]) -> Path:
    """A file with the real header of a full-size checkpoint (shapes `changed` by key) and 8 GiB of (sparse,
    unwritten) tensor bytes."""
    shapes = {k: list(v.shape) for k, v in full_size_original_state_dict(arch).items()}
    shapes.update(changed)
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2
        for n in shape:
            size *= n
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + max(offset, HUGE))
    return path


def _bytes_read() -> int:
    with open("/proc/self/io", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("rchar:"))


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux's /proc/self/io to count bytes read")
def test_listing_finds_nested_checkpoints_from_their_headers_only(tmp_path, tiny_sd2):
    models = tmp_path / "Stable-diffusion"
    _sparse_checkpoint(models / "xl" / "base" / "big_xl.safetensors", "sdxl")
    _sparse_checkpoint(models / "v1.safetensors", "sd1")
    (models / "sd2").mkdir()
    shutil.copyfile(tiny_sd2.checkpoint, models / "sd2" / "tiny_768v.safetensors")
    (models / "sd2" / "tiny_768v.yaml").write_text("model:\n  params:\n    parameterization: v\n    unet_config:\n"
                                                    "      params: {in_channels: 4}\n", encoding="utf-8")
    (models / "old.ckpt").write_bytes(b"pickle")
    (models / "lora.safetensors").write_bytes(b"\x00" * 4)
    size = sum(p.stat().st_size for p in models.rglob("*") if p.is_file())
    before = _bytes_read()
    found = list_checkpoints(models)
    read = _bytes_read() - before
    assert [(c.name, c.architecture) for c in found] == [
        ("lora.safetensors", None), ("old.ckpt", None), ("sd2/tiny_768v.safetensors", "sd2-v"),
        ("v1.safetensors", "sd1"), ("xl/base/big_xl.safetensors", "sdxl")]
    assert [c.label for c in found][2:] == ["sd2/tiny_768v.safetensors [SD2 v]", "v1.safetensors [SD1]",
                                            "xl/base/big_xl.safetensors [SDXL]"]
    assert "not a valid safetensors file" in found[0].note and "pickle" in found[1].note
    print(f"listing read {read / 1e6:.2f} MB of {size / 1e9:.1f} GB")
    assert read < 16 << 20 < size          # headers only (about 1 MB here), never the tensors


def test_header_shapes_match_the_tensors(tiny_sd1):
    from safetensors import safe_open

    shapes = read_safetensors_shapes(tiny_sd1.checkpoint)
    with safe_open(str(tiny_sd1.checkpoint), framework="pt") as handle:
        assert shapes == {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def test_missing_models_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: models folder not found"):
        list_checkpoints(tmp_path / "nowhere")


def test_inpainting_is_refused_from_the_header(tmp_path):
    path = _sparse_checkpoint(tmp_path / "inpaint.safetensors", "sd1",
                              **{"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]})
    with pytest.raises(ModelLoadError, match="9 input channels"):
        inspect_checkpoint(path)


def _config(tmp_path, checkpoint, dataset):
    from lora_trainer.config import config_from_dict

    return config_from_dict({"pretrained_model_name_or_path": str(checkpoint), "train_data_dir": str(dataset),
                             "output_dir": str(tmp_path / "out"), "resolution": "64", "max_train_steps": 2}).config


def test_preflight_names_a_malformed_yaml_before_the_model_loads(tmp_path, tiny_sd1):
    from lora_trainer.testing.datasets import write_square_dataset
    from lora_trainer.train.preflight import check_before_model

    dataset = write_square_dataset(tmp_path / "data")
    checkpoint = tmp_path / "m" / "model.safetensors"
    checkpoint.parent.mkdir()
    shutil.copyfile(tiny_sd1.checkpoint, checkpoint)
    shutil.copyfile(tiny_sd1.yaml, checkpoint.with_suffix(".yaml"))
    assert check_before_model(_config(tmp_path, checkpoint, dataset), loads_checkpoint=True).architecture == "sd1"
    checkpoint.with_suffix(".yaml").write_text("model: {params: [1, 2\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"model\.yaml: not valid YAML"):
        check_before_model(_config(tmp_path, checkpoint, dataset), loads_checkpoint=True)
