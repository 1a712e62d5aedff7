"""A tiny SD1 run from a kohya dataset config (CLI, `--set dataset_config=...`): the LoRA lists the subsets."""
from __future__ import annotations

import json

import pytest

from lora_trainer.__main__ import main
from lora_trainer.config import load_toml
from lora_trainer.networks import load_lora
from lora_trainer.testing.datasets import write_square_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def test_training_from_a_dataset_config_writes_kohya_subset_metadata(tiny_sd1, tmp_path, capsys, caplog):
    write_square_dataset(tmp_path / "data", folder="squares", count=2, caption="square, red, item{i}")
    write_square_dataset(tmp_path / "data", folder="reg", count=2, caption="blue, plain", fill=(20, 20, 240))
    (tmp_path / "data" / "dataset.toml").write_text("""
[general]
resolution = 64
batch_size = 2
[[datasets]]
  [[datasets.subsets]]
  image_dir = "squares"
  num_repeats = 2
  keep_tokens = 1
  shuffle_caption = true
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "shape"
""", encoding="utf-8")
    train = tmp_path / "train.toml"
    train.write_text(f"""
pretrained_model_name_or_path = '{tiny_sd1.checkpoint}'
diffusers_config_dir = '{tiny_sd1.config_dir}'
tokenizer_dir = '{tiny_sd1.tokenizer_dir}'
train_data_dir = '{tmp_path / "data"}'
output_dir = '{tmp_path / "out"}'
output_name = "ds"
resolution = "512,512"
max_train_steps = 3
learning_rate = 1e-3
seed = 1
network_dim = 2
network_train_unet_only = true
save_precision = "float"
""", encoding="utf-8")
    dataset_config = tmp_path / "data" / "dataset.toml"
    assert main(["train", "--config", str(train), "--set", f"dataset_config={dataset_config}", "--device",
                 "cpu"]) == 0
    assert "train_data_dir: not used because dataset_config is set" in capsys.readouterr().out + caplog.text

    _, meta = load_lora(tmp_path / "out" / "ds.safetensors")
    (dataset,) = json.loads(meta["ss_datasets"])
    assert (dataset["batch_size_per_device"], dataset["resolution"]) == (2, [64, 64])  # the dataset config's
    assert [(s["image_dir"], s["is_reg"], s["num_repeats"], s["img_count"]) for s in dataset["subsets"]] == [
        ("squares", False, 2, 2), ("reg", True, 1, 2)]
    assert dataset["subsets"][0]["keep_tokens"] == 1 and dataset["subsets"][0]["shuffle_caption"] is True
    assert json.loads(meta["ss_dataset_dirs"]) == {"squares": {"n_repeats": 2, "img_count": 2}}
    assert set(json.loads(meta["ss_tag_frequency"])) == {"squares", "reg"}
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_num_batches_per_epoch"]) == ("4", "2", "4")
    assert "ss_resolution" not in meta and "ss_reg_dataset_dirs" not in meta  # kohya keeps them per dataset
    saved = load_toml(tmp_path / "out" / "ds.toml").config
    assert saved.dataset.dataset_config == str(dataset_config)  # the run can be repeated from the saved config
